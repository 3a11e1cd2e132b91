"""What a plan is: a function that returns its value, or the reason it does not apply."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import onnx_ir as ir

from onnxgrad import registry

if TYPE_CHECKING:
    from onnxgrad.backprop import WalkContext
    from onnxgrad.emitter import Emitter


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


FusionGrad = Callable[["Emitter", Sequence[ir.Value | None]], list[tuple[ir.Value, ir.Value | None]]]


@dataclass(frozen=True)
class Fusion:
    """Nodes differentiated together by one function: ``nodes`` in graph order, and only the last one's outputs
    receive gradient from outside the group. ``grad`` maps the gradients of the last node's outputs to
    (input value read from outside the group, its gradient contribution) pairs."""

    nodes: tuple[ir.Node, ...]
    grad: FusionGrad


def own_rule(ctx: WalkContext, op_type: str) -> bool:
    """Whether ``op_type``'s gradient is onnxgrad's own rule (a fusion must not bypass one a user registered)."""
    rule = registry.lookup("", op_type, ctx.opset)
    return rule is not None and rule.fn is not None and rule.fn.__module__.startswith("onnxgrad.rules.")
