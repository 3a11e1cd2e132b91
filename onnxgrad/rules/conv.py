"""Gradient rules: conv."""

from __future__ import annotations
