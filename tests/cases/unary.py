"""Rule cases: unary."""

from __future__ import annotations

from tests.gradcheck import Case

CASES: list[Case] = []
