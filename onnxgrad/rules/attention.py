"""Gradient rules: attention."""

from __future__ import annotations
