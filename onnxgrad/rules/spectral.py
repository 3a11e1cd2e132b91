"""Gradient rules: spectral."""

from __future__ import annotations
