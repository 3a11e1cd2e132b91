"""What a plan is: a function that returns its value, or the reason it does not apply."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import onnx_ir as ir


@dataclass(frozen=True)
class NotApplicable:
    """Why a plan does not apply here."""

    reason: str


Plan = Callable[..., "ir.Value | NotApplicable"]


def choose(plans: Mapping[str, Plan], *args: Any) -> tuple[str, ir.Value]:
    """The first plan (in the mapping's order) that applies to ``args``: its name and its value."""
    for name, plan in plans.items():
        out = plan(*args)
        if not isinstance(out, NotApplicable):
            return name, out
    raise AssertionError(f"no plan applies among {list(plans)}: the last one should always apply")


def explain(plans: Mapping[str, Plan], *args: Any) -> dict[str, str | None]:
    """Every plan tried on ``args``: None where it applies, else why not (what was emitted is left unused)."""
    out = {name: plan(*args) for name, plan in plans.items()}
    return {name: v.reason if isinstance(v, NotApplicable) else None for name, v in out.items()}
