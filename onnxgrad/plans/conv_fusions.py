"""Fusions: a Conv and the per-output-channel factor after it, differentiated together.

When a Conv's output Z feeds only a node that scales each output channel by k (an inference
BatchNormalization, k = scale * inv, or a Mul by a per-channel tensor), dZ = dY * k never needs to exist:
k moves onto the kernel and onto dW and dB (work the size of W instead of the size of the output), so

    dX = dX_conv(dY, W * k),   dW = dW_conv(X, dY) * k,   dB = sum(dY) * k.

For the BatchNormalization, sum(dY * (Z - mean)) per channel, the heart of dscale and dvar, is
sum(W * dW_conv(X, dY)) - (mean - B_conv) * sum(dY): the weight gradient is computed once and shared, Z is
never read, and onnxruntime may fuse Conv and BatchNormalization in the forward part as it does for inference.
Each fusion below returns a ``Fusion`` or the reason it does not apply.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import onnx_ir as ir

from onnxgrad import registry
from onnxgrad.emitter import Emitter, attr, static_dims
from onnxgrad.geometry import Window, conv_window, padded
from onnxgrad.plans.base import Fusion, FusionGrad, NotApplicable, own_rule
from onnxgrad.plans.conv import conv_input_grad, conv_weight_grad

if TYPE_CHECKING:
    from onnxgrad.backprop import WalkContext

def kernel_fold(conv: ir.Node) -> str | None:
    """Why a per-output-channel factor on this Conv's dY is not better moved onto W and dW (work the size of W)
    than applied to dY (work the size of the output), or None when it is: W has no more values than the output
    (batch 1 if the batch is dynamic; an output of run-time spatial size is taken to be larger, as the dW plans take
    it). ResNet-50's deep layers at batch 1 have 5-20x more weights than outputs."""
    w, out = conv.inputs[1], conv.outputs[0]
    wd = None if w is None else static_dims(w)
    dims = None if out.shape is None else list(out.shape)
    if wd is None or not dims or not isinstance(dims[1], int):
        return "the sizes of W or the Conv output's channel count are not static"
    if not all(isinstance(d, int) for d in dims[2:]):  # run-time sizes: an image-sized output outweighs W
        return None
    batch = dims[0] if isinstance(dims[0], int) else 1
    size = batch * math.prod(dims[1:])  # type: ignore[arg-type]
    if math.prod(wd) > size:
        return f"W has more values ({math.prod(wd)}) than the Conv output ({size})"
    return None


def _conv_feeding(ctx: WalkContext, node: ir.Node, index: int, on_path: set[int]) -> ir.Node | NotApplicable:
    """The Conv whose output is input ``index`` of ``node`` and that the walk differentiates, where nothing but
    ``node`` reads that output and no gradient reaches it from elsewhere."""
    z = node.inputs[index]
    conv = None if z is None else z.producer()
    if z is None or conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx"):
        return NotApplicable("not fed by a Conv")
    if id(conv) not in on_path:
        return NotApplicable("the Conv is not differentiated")
    if z.is_graph_output() or z in ctx.xs or z in ctx.ys or z in ctx.stop:
        return NotApplicable("the Conv output is a graph output, an x, a y or stopped")
    if [u for u in z.uses() if u.node.graph is not None] != [(node, index)]:
        return NotApplicable("the Conv output has other readers")
    if not (own_rule(ctx, "Conv") and own_rule(ctx, node.op_type)):
        return NotApplicable("a gradient rule registered by the user replaces onnxgrad's own")
    slower = kernel_fold(conv)
    return NotApplicable(slower) if slower else conv


def _as(em: Emitter, v: ir.Value, like: ir.Value) -> ir.Value:
    """v in like's dtype (a Cast only where they differ)."""
    return v if v.dtype == like.dtype or like.dtype is None else em.Cast(v, to=like.dtype)


def _folded(em: Emitter, conv: ir.Node, win: Window, g: ir.Value, k: ir.Value,
            dw: ir.Value | None = None) -> list[tuple[ir.Value, ir.Value | None]]:
    """Conv's (input, gradient) pairs for output gradient g * k, k one factor per output channel (M,): k on the
    kernel and on dW (``dw``: the weight gradient for output gradient g, when already emitted) and dB."""
    x, w = conv.inputs[0], conv.inputs[1]
    assert x is not None and w is not None
    group = attr(conv, "group", 1)
    c = em.Reshape(k, em.ints([-1, *[1] * (win.rank + 1)]))
    kernel = em.Mul(w, c)
    kernel.shape = w.shape
    dx = conv_input_grad(em, g, kernel, win, group)
    dw = em.Mul(dw if dw is not None else conv_weight_grad(em, padded(em, x, win), g, win, group, w), c)
    pairs = [(x, dx), (w, dw)]
    if len(conv.inputs) > 2 and conv.inputs[2] is not None:
        pairs.append((conv.inputs[2], em.Mul(em.reduce_sum(g, [0, *range(2, win.rank + 2)], keepdims=False), k)))
    return pairs


# ------------------------------------------------------------------ Conv -> BatchNormalization
def conv_batch_norm(ctx: WalkContext, bn: ir.Node, on_path: set[int]) -> Fusion | NotApplicable:
    """Conv followed by an inference BatchNormalization, Y = (Z - mean) * k + B with k = scale * inv,
    inv = 1/sqrt(var + epsilon): the Conv's dW' for dY gives dscale = (sum(W * dW') - (mean - b) * sum(dY)) * inv
    without reading Z, and k moves onto the Conv's kernel, dW and dB."""
    if ctx.opset < 7 or len(bn.outputs) != 1 or attr(bn, "training_mode", 0) or not attr(bn, "spatial", 1):
        return NotApplicable("not an inference BatchNormalization (opset >= 7, one output, spatial)")
    conv = _conv_feeding(ctx, bn, 0, on_path)
    if isinstance(conv, NotApplicable):
        return conv
    if conv.inputs[1] not in ctx.wanted:
        return NotApplicable("the Conv's weight gradient is not wanted (dscale would need one of its own)")

    def grad(em: Emitter, dy: Sequence[ir.Value | None]) -> list[tuple[ir.Value, ir.Value | None]]:
        g = dy[0]
        x, w = conv.inputs[0], conv.inputs[1]
        b = conv.inputs[2] if len(conv.inputs) > 2 else None
        _, scale, bias, mean, var = bn.inputs
        assert g is not None and x is not None and w is not None
        assert scale is not None and bias is not None and mean is not None and var is not None
        z = bn.inputs[0]
        assert z is not None
        win = conv_window(conv, x, w, em)
        axes = [0, *range(2, win.rank + 2)]
        inv = em.Reciprocal(em.Sqrt(em.Add(_as(em, var, z), em.const(attr(bn, "epsilon", 1e-5), like=z))))
        k = em.Mul(_as(em, scale, z), inv)
        d_bias = em.reduce_sum(g, axes, keepdims=False)
        dw = conv_weight_grad(em, padded(em, x, win), g, win, attr(conv, "group", 1), w)  # dY itself: no k on it
        dy_z = em.reduce_sum(em.Mul(w, dw), list(range(1, win.rank + 2)), keepdims=False)
        shift = _as(em, mean, z) if b is None else em.Sub(_as(em, mean, z), _as(em, b, z))
        d_scale = em.Mul(em.Sub(dy_z, em.Mul(shift, d_bias)), inv)  # sum(dY * (Z - mean)) * inv
        d_var = em.Mul(em.Mul(d_scale, em.Mul(k, inv)), em.const(-0.5, like=z))
        return [*_folded(em, conv, win, g, k, dw), (scale, _as(em, d_scale, scale)), (bias, _as(em, d_bias, bias)),
                (mean, _as(em, em.Neg(em.Mul(d_bias, k)), mean)), (var, _as(em, d_var, var))]

    return Fusion((conv, bn), grad)


# ------------------------------------------------------------------ Conv -> Mul by a per-channel tensor
def conv_mul(ctx: WalkContext, mul: ir.Node, on_path: set[int]) -> Fusion | NotApplicable:
    """Conv followed by Y = Z * s with s one factor per output channel, shaped (M, 1, ...) or (1, M, 1, ...):
    s moves onto the Conv's kernel, dW and dB; ds is the Mul rule's (it reads Z)."""
    reasons = []
    for index in (0, 1):
        conv = _conv_feeding(ctx, mul, index, on_path)
        if isinstance(conv, NotApplicable):
            reasons.append(conv.reason)
            continue
        s, w = mul.inputs[1 - index], conv.inputs[1]
        m, out = static_dims(w) if w is not None else None, conv.outputs[0].shape
        dims = None if s is None or s.shape is None else list(s.shape)
        rank = None if out is None else out.rank()
        if m is None or rank is None or dims not in ([m[0], *[1] * (rank - 2)], [1, m[0], *[1] * (rank - 2)]):
            reasons.append("the other factor is not one per output channel, (M, 1, ...) or (1, M, 1, ...)")
            continue
        return Fusion((conv, mul), _conv_mul_grad(ctx, conv, mul, index))
    return NotApplicable("; ".join(dict.fromkeys(reasons)))


def _conv_mul_grad(ctx: WalkContext, conv: ir.Node, mul: ir.Node, index: int) -> FusionGrad:
    def grad(em: Emitter, dy: Sequence[ir.Value | None]) -> list[tuple[ir.Value, ir.Value | None]]:
        g, s, x, w = dy[0], mul.inputs[1 - index], conv.inputs[0], conv.inputs[1]
        assert g is not None and s is not None and x is not None and w is not None
        pairs = _folded(em, conv, conv_window(conv, x, w, em), g, em.Reshape(s, em.ints([-1])))
        if s in ctx.wanted:  # the Mul rule's own gradient for s, reduced to s's shape as the walk would
            rule = registry.lookup(mul.domain, mul.op_type, ctx.opset)
            assert rule is not None and rule.fn is not None
            ds = rule.fn(em, mul, [g])[1 - index]
            assert isinstance(ds, ir.Value)
            if rule.unbroadcast_input(1 - index):
                if ds.shape is None:
                    ds.shape = mul.outputs[0].shape
                ds = em.unbroadcast(ds, s)
            pairs.append((s, ds))
        return pairs

    return grad
