"""Which fusions apply: the table of fusions by the op type of the node that ends them (a Conv's inference
BatchNormalization or per-channel Mul: ``conv_fusions``; an exported GELU: ``activation_fusions``), which the walk
asks for the path it differentiates."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import onnx_ir as ir

from onnxgrad.plans.activation_fusions import gelu
from onnxgrad.plans.base import Fusion, NotApplicable
from onnxgrad.plans.conv_fusions import conv_batch_norm, conv_mul
from onnxgrad.plans.quantization import fake_quant

if TYPE_CHECKING:
    from onnxgrad.backprop import WalkContext

Maker = Callable[["WalkContext", ir.Node, set[int]], Fusion | NotApplicable]
FUSIONS: dict[str, tuple[Maker, ...]] = {  # by the op type of the node that ends a fusion; the first that applies
    "BatchNormalization": (conv_batch_norm,), "Mul": (conv_mul, gelu), "DequantizeLinear": (fake_quant,),
}


def _found(ctx: WalkContext, node: ir.Node, on_path: set[int]) -> Fusion | NotApplicable | None:
    """The first fusion that ``node`` ends, why none does, or None where no fusion ends with its op type."""
    makers = FUSIONS.get(node.op_type, ()) if node.domain in ("", "ai.onnx") else ()
    reasons = []
    for make in makers:
        found = make(ctx, node, on_path)
        if isinstance(found, Fusion):
            return found
        reasons.append(found.reason)
    return NotApplicable("; ".join(reasons)) if reasons else None


def explain(ctx: WalkContext, path: Sequence[ir.Node]) -> dict[str, str | None]:
    """For each node of ``path`` that may end a fusion (by its first output's name): None where a fusion
    applies, else why none does."""
    on_path = {id(n) for n in path}
    out = {}
    for node in path:
        found = _found(ctx, node, on_path)
        if found is not None:
            out[node.outputs[0].name or node.op_type] = found.reason if isinstance(found, NotApplicable) else None
    return out


def fusions(ctx: WalkContext, path: Sequence[ir.Node]) -> list[Fusion]:
    """The fusions that apply on ``path`` (the nodes the walk differentiates, in graph order)."""
    on_path = {id(n) for n in path}
    return [f for node in path if isinstance(f := _found(ctx, node, on_path), Fusion)]
