"""Fake quantisation differentiated by a straight-through estimator, when asked (``straight_through=True``).

``DequantizeLinear(QuantizeLinear(x))`` rounds x onto an integer grid and back: its true derivative is zero almost
everywhere, and the integer value between the two carries no gradient at all. Quantisation-aware training and
attacks on quantised models take the estimator of torch.ao's FakeQuantize instead (``torch.fake_quantize_per_tensor_
affine`` / ``_per_channel_affine``): the pair is the identity where x lands inside the grid and flat where it clamps,

    dx = dy * s_dq / s_q * 1[q_min <= round(x / s_q) + z_q <= q_max],

with q_min, q_max the bounds of the integer type and the scales (and zero point) per tensor or along ``axis``. The
scales and zero points get no gradient (FakeQuantize learns neither). Blocked quantisation (``block_size``) and the
float8 types are left alone: there the pair stays a path without gradient."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import onnx_ir as ir

from onnxgrad.emitter import Emitter
from onnxgrad.plans.base import Fusion, NotApplicable

if TYPE_CHECKING:
    from onnxgrad.backprop import WalkContext

BOUNDS = {  # the integer grids QuantizeLinear rounds onto
    ir.DataType.UINT8: (0, 255), ir.DataType.INT8: (-128, 127), ir.DataType.UINT16: (0, 65535),
    ir.DataType.INT16: (-32768, 32767), ir.DataType.UINT4: (0, 15), ir.DataType.INT4: (-8, 7),
}


def _scale_rank(v: ir.Value | None) -> int | None:
    return None if v is None or v.shape is None else v.shape.rank()


def fake_quant(ctx: WalkContext, last: ir.Node, on_path: set[int]) -> Fusion | NotApplicable:
    """y = DequantizeLinear(QuantizeLinear(x)) as x inside the grid, clamped outside: one gradient from x."""
    if not ctx.straight_through:
        return NotApplicable("straight_through is off: the integer value between the pair carries no gradient")
    q = last.inputs[0]
    quant = None if q is None else q.producer()
    if quant is None or quant.op_type != "QuantizeLinear" or quant.domain not in ("", "ai.onnx") \
            or id(quant) not in on_path or id(last) not in on_path:
        return NotApplicable("its input is not the output of a QuantizeLinear on the path")
    x, s_q, s_dq = quant.inputs[0], quant.inputs[1], last.inputs[1]
    if x is None or x not in ctx.wanted or s_q is None or s_dq is None:
        return NotApplicable("x's gradient is not wanted")
    if any(n.attributes.get_int("block_size", 0) for n in (quant, last)):
        return NotApplicable("blocked quantisation (block_size) is not taken")
    assert q is not None
    bounds = BOUNDS.get(q.dtype) if q.dtype is not None else None
    if bounds is None:
        return NotApplicable(f"{q.dtype} is not an integer grid QuantizeLinear rounds onto")
    rank = None if x.shape is None else x.shape.rank()
    z_q = quant.inputs[2] if len(quant.inputs) > 2 else None
    per_axis = [v for v in (s_q, s_dq, z_q) if v is not None and _scale_rank(v) != 0]
    if per_axis and (rank is None or any(_scale_rank(v) != 1 for v in per_axis)):
        return NotApplicable("per-axis scales need x's rank and one-axis scales")

    def along(em: Emitter, v: ir.Value, node: ir.Node) -> ir.Value:
        """v (a scale or zero point) in x's dtype, shaped to broadcast along the node's axis when it has one."""
        if v.dtype != x.dtype:
            v = em.Cast(v, to=x.dtype)
        if _scale_rank(v) == 0 or rank is None:
            return v
        shape = [1] * rank
        shape[node.attributes.get_int("axis", 1) % rank] = -1
        return em.Reshape(v, em.ints(shape))

    def grad(em: Emitter, dy: Sequence[ir.Value | None]) -> list[tuple[ir.Value, ir.Value | None]]:
        """dx = dy * s_dq / s_q where q_min <= round(x / s_q) + z_q <= q_max, else 0"""
        assert dy[0] is not None
        scale = along(em, s_q, quant)
        t = em.Round(em.Div(x, scale))
        if z_q is not None:
            t = em.Add(t, along(em, z_q, quant))
        low, high = (em.const(float(b), like=x) for b in bounds)
        inside = em.And(em.Not(em.Less(t, low)), em.Not(em.Greater(t, high)))
        g = em.Mul(dy[0], em.indicator(inside, x))
        if s_dq is not s_q:
            g = em.Mul(g, em.Div(along(em, s_dq, last), scale))
        return [(x, g)]

    return Fusion((quant, last), grad)
