"""Gradient rules: nondiff."""

from __future__ import annotations
