"""Gradient rules: normalization.

Every rule works in X's dtype (stash_type is not followed: a float16 X gets a float16 gradient) and recomputes
the statistics it needs (LayerNormalization reuses its Mean/InvStdDev outputs when they exist in X's dtype).
``xhat`` is the standardized input, ``inv`` 1/sqrt(var + epsilon), both from ``plans.normalization.standardize``
(over trailing axes in float32 and float16, one LayerNormalization kernel computes them, in float32)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import Emitter, attr, rank, rank_of, static_dims
from onnxgrad.plans.normalization import mean_over, standardize
from onnxgrad.registry import register

Grads = Sequence[ir.Value | None]
Out = list[ir.Value | None]


def _as(em: Emitter, v: ir.Value, like: ir.Value) -> ir.Value:
    """v in like's dtype (a Cast only where they differ)."""
    return v if v.dtype == like.dtype or like.dtype is None else em.Cast(v, to=like.dtype)


def _count(em: Emitter, x: ir.Value, axes: Sequence[int]) -> ir.Value:
    """How many elements of x one statistic over ``axes`` covers, in x's dtype."""
    dims = static_dims(x)
    if dims is not None:
        return em.const(float(np.prod([dims[a] for a in axes])), like=x)
    assert x.dtype is not None
    sizes = em.Gather(em.shape_of(x), em.ints(list(axes)), axis=0)
    return em.Cast(em.reduce("ReduceProd", sizes, None, keepdims=False), to=x.dtype)


def _standardize_back(em: Emitter, g: ir.Value, xhat: ir.Value, inv: ir.Value, axes: Sequence[int],
                      centered: bool = True) -> ir.Value:
    """dx for xhat = (x - mean(x)) * inv over ``axes``, given g = dL/dxhat:
    inv * (g - mean(g) - xhat * mean(g * xhat)); without centering (RMS) the mean(g) term drops."""
    t = em.Mul(xhat, mean_over(em, em.Mul(g, xhat), axes))
    if centered:
        t = em.Add(t, mean_over(em, g, axes))
    return em.Mul(inv, em.Sub(g, t))


def _stat_back(em: Emitter, x: ir.Value, axes: Sequence[int], xhat: ir.Value, inv: ir.Value,
               g_mean: ir.Value | None, g_var: ir.Value | None) -> ir.Value | None:
    """dx from gradients reaching the mean (g_mean) and the variance (g_var) of x over ``axes``:
    g_mean / n + g_var * 2 (x - mean) / n."""
    n = _count(em, x, axes)
    out = None
    if g_var is not None:
        out = em.Div(em.Mul(em.Mul(g_var, em.const(2.0, like=x)), em.Div(xhat, inv)), n)
    if g_mean is not None:
        term = em.Div(g_mean, n)
        out = em.expand(term, x) if out is None else em.Add(out, term)
    return out


def _scale(em: Emitter, a: ir.Value | None, k: float, like: ir.Value) -> ir.Value | None:
    return None if a is None else em.Mul(a, em.const(k, like=like))


# ------------------------------------------------------------------------------- BatchNormalization


def _batch_norm(em: Emitter, node: ir.Node, dy: Grads, training: bool) -> Out:
    """Inference: Y = (X - mean) * inv(var) * scale + B per channel (axis 1); training: batch statistics,
    and running_mean/var = input_mean/var * momentum + batch mean/var * (1 - momentum)."""
    x, scale, bias, mean, var = node.inputs[:5]
    assert x is not None and scale is not None and bias is not None and mean is not None and var is not None
    n_axes, eps, mom = rank(x, node), attr(node, "epsilon", 1e-5), attr(node, "momentum", 0.9)
    spatial = attr(node, "spatial", 1)
    axes = [0, *range(2, n_axes)] if spatial else [0]  # spatial=0 (opset 7): per activation, params (C, D...)

    def chan(v: ir.Value | None) -> ir.Value | None:  # a per-channel tensor in x's dtype
        return None if v is None else _as(em, v, x)

    def view(v: ir.Value | None) -> ir.Value | None:  # ... broadcastable against x
        v = chan(v)
        return v if v is None or not spatial else em.unsqueeze(v, list(range(1, n_axes - 1)))

    def total(v: ir.Value) -> ir.Value:
        return em.reduce_sum(v, axes, keepdims=False)

    g = dy[0]
    if not training:
        if g is None:
            return [None] * 5
        inv = em.Reciprocal(em.Sqrt(em.Add(chan(var), em.const(eps, like=x))))
        k = em.Mul(chan(scale), inv)
        d_bias, factor = total(g), view(k)
        d_scale = em.Mul(total(em.Mul(g, em.Sub(x, view(mean)))), inv)  # sum(dY * xhat): inv after the sum
        d_var = em.Mul(em.Mul(d_scale, em.Mul(k, inv)), em.const(-0.5, like=x))
        return [em.Mul(g, factor), _as(em, d_scale, scale), _as(em, d_bias, bias),
                _as(em, em.Neg(em.Mul(d_bias, k)), mean), _as(em, d_var, var)]
    xhat, inv = standardize(em, x, axes, eps)
    g_rm, g_rv = (dy[i] if len(dy) > i else None for i in (1, 2))
    g_sm, g_sv = (dy[i] if len(dy) > i else None for i in (3, 4))  # saved_mean/var, before opset 14
    g_mean = em.add_all(_scale(em, view(g_rm), 1.0 - mom, x), view(g_sm))
    g_var = _scale(em, view(g_rv), 1.0 - mom, x)
    if g_sv is not None:  # onnxruntime stores inv (not the variance) in saved_var: d inv/d var = -inv^3 / 2
        g_var = em.add_all(g_var, em.Mul(view(g_sv), em.Mul(em.Mul(inv, em.Mul(inv, inv)), em.const(-0.5, like=x))))
    dx = _stat_back(em, x, axes, xhat, inv, g_mean, g_var)
    d_scale = d_bias = None
    if g is not None:
        dx = em.add_all(dx, _standardize_back(em, em.Mul(g, view(scale)), xhat, inv, axes))
        d_scale, d_bias = _as(em, total(em.Mul(g, xhat)), scale), _as(em, total(g), bias)
    d_mean = None if g_rm is None else _as(em, em.Mul(g_rm, em.const(mom, like=g_rm)), mean)
    d_var = None if g_rv is None else _as(em, em.Mul(g_rv, em.const(mom, like=g_rv)), var)
    return [dx, d_scale, d_bias, d_mean, d_var]


@register("BatchNormalization", since=7, notes="training when the node has more than one output "
          "(batch statistics, outputs mean, var, saved_mean, saved_var; saved_var read as onnxruntime "
          "writes it, 1/sqrt(var + epsilon)); spatial=0 supported. Inference mode after a Conv whose output "
          "feeds nothing else: differentiated together with the Conv, dscale from its weight gradient, so X "
          "is never read (onnxgrad/plans/conv_fusions.py)")
def batch_norm_v7(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dX = dY * scale * inv; dscale = sum(dY * xhat); dB = sum(dY); dmean = -dB * scale * inv; dvar ..."""
    return _batch_norm(em, node, dy, training=len(node.outputs) > 1)


@register("BatchNormalization", since=14, notes="training_mode=1: batch statistics, outputs running mean/var. "
          "Inference mode after a Conv whose output feeds nothing else: differentiated together with the Conv, "
          "dscale from its weight gradient, so X is never read (onnxgrad/plans/conv_fusions.py)")
def batch_norm_v14(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dX = dY * scale * inv; dscale = sum(dY * xhat); dB = sum(dY); dmean = -dB * scale * inv; dvar ..."""
    return _batch_norm(em, node, dy, training=bool(attr(node, "training_mode", 0)))


# ------------------------------------------------------------------------ Instance, Layer, Group, RMS


@register("InstanceNormalization")
def instance_norm(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """statistics per (n, c) over the spatial axes: dX = standardize'(dY * scale); dscale = sum(dY * xhat);
    dB = sum(dY)"""
    x, scale, bias = node.inputs
    assert x is not None and scale is not None and bias is not None and dy[0] is not None
    n_axes = rank(x, node)
    axes, per_channel = list(range(2, n_axes)), [0, *range(2, n_axes)]
    xhat, inv = standardize(em, x, axes, attr(node, "epsilon", 1e-5))
    g = em.Mul(dy[0], em.unsqueeze(scale, list(range(1, n_axes - 1))))
    return [_standardize_back(em, g, xhat, inv, axes), em.reduce_sum(em.Mul(dy[0], xhat), per_channel, False),
            em.reduce_sum(dy[0], per_channel, False)]


@register("LayerNormalization", since=17, broadcast=(1, 2), notes="closed form; Mean and InvStdDev outputs "
          "differentiable too")
def layer_norm(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dX = inv * (g - mean(g) - xhat * mean(g * xhat)), g = dY * Scale; dScale = dY * xhat; dB = dY
    (+ dMean / n - dInvStdDev * inv^2 * xhat / n)"""
    x, scale = node.inputs[0], node.inputs[1]
    assert x is not None and scale is not None
    n_axes = rank(x, node)
    axes = list(range(attr(node, "axis", -1) % n_axes, n_axes))
    stats = [v if v is not None and v.name and v.dtype == x.dtype else None for v in node.outputs[1:3]]
    if len(stats) == 2 and stats[0] is not None and stats[1] is not None:
        mu, inv = stats
        d = em.Sub(x, mu)  # onnxruntime's float32 Mean, corrected as in plans.normalization
        xhat = em.Mul(em.Sub(d, mean_over(em, d, axes)), inv)
    else:
        xhat, inv = standardize(em, x, axes, attr(node, "epsilon", 1e-5))
    g_mean, g_inv = (_as(em, g, x) if g is not None else None for g in [*dy[1:3], None, None][:2])
    g_var = None if g_inv is None else em.Mul(em.Mul(g_inv, em.Mul(inv, em.Mul(inv, inv))), em.const(-0.5, like=x))
    dx = _stat_back(em, x, axes, xhat, inv, g_mean, g_var)
    if dy[0] is None:
        return [dx, None, None][: len(node.inputs)]
    dx = em.add_all(dx, _standardize_back(em, em.Mul(dy[0], scale), xhat, inv, axes))
    return [dx, em.Mul(dy[0], xhat), dy[0]][: len(node.inputs)]


def _group_norm(em: Emitter, node: ir.Node, dy: Grads, per_group: bool) -> Out:
    """Statistics per (n, group) over the group's channels and the spatial axes; scale and bias per group
    (opset 18) or per channel (21)."""
    x, scale, bias = node.inputs
    assert x is not None and scale is not None and bias is not None and dy[0] is not None
    groups, n_axes = int(attr(node, "num_groups")), rank(x, node)
    grouped = em.ints([0, groups, -1])
    xhat, inv = standardize(em, em.Reshape(x, grouped), [2], attr(node, "epsilon", 1e-5))
    if per_group:
        dyg = em.Reshape(dy[0], grouped)
        g = em.Mul(dyg, em.unsqueeze(scale, [1]))
        d_scale, d_bias = em.reduce_sum(em.Mul(dyg, xhat), [0, 2], False), em.reduce_sum(dyg, [0, 2], False)
    else:
        per_channel = [0, *range(2, n_axes)]
        g = em.Reshape(em.Mul(dy[0], em.unsqueeze(scale, list(range(1, n_axes - 1)))), grouped)
        d_scale = em.reduce_sum(em.Mul(dy[0], em.reshape_like(xhat, x)), per_channel, False)
        d_bias = em.reduce_sum(dy[0], per_channel, False)
    return [em.reshape_like(_standardize_back(em, g, xhat, inv, [2]), x), d_scale, d_bias]


@register("GroupNormalization", since=18, notes="scale and bias per group")
def group_norm_v18(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dX = standardize'(dY * scale[group]) per group; dscale = sum(dY * xhat); dbias = sum(dY) per group"""
    return _group_norm(em, node, dy, per_group=True)


@register("GroupNormalization", since=21, notes="scale and bias per channel")
def group_norm_v21(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dX = standardize'(dY * scale[channel]) per group; dscale = sum(dY * xhat); dbias = sum(dY) per channel"""
    return _group_norm(em, node, dy, per_group=False)


@register("RMSNormalization", since=23, broadcast=(1,))
def rms_norm(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dX = inv * (g - xhat * mean(g * xhat)), g = dY * scale, xhat = X * inv; dscale = dY * xhat"""
    x, scale = node.inputs
    assert x is not None and scale is not None and dy[0] is not None
    n_axes = rank(x, node)
    axes = list(range(attr(node, "axis", -1) % n_axes, n_axes))
    eps = em.const(attr(node, "epsilon", 1e-5), like=x)
    inv = em.Reciprocal(em.Sqrt(em.Add(mean_over(em, em.Mul(x, x), axes), eps)))
    xhat = em.Mul(x, inv)
    return [_standardize_back(em, em.Mul(dy[0], scale), xhat, inv, axes, centered=False), em.Mul(dy[0], xhat)]


# ------------------------------------------------------------------------------------ Lp, MeanVariance


@register("LpNormalization", notes="p = 1 or 2; not finite where the norm is 0 (onnxruntime outputs 0 there)")
def lp_norm(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """y = x / |x|_p: dx = (dy - d|x|_p/dx * sum(dy * y)) / |x|_p, d|x|_2/dx = y, d|x|_1/dx = sign(x)"""
    x, y = node.inputs[0], node.outputs[0]
    assert x is not None and dy[0] is not None
    p, axis, n_axes = attr(node, "p", 2), attr(node, "axis", -1), rank_of(x)
    axes = [axis % n_axes if n_axes is not None else axis]
    if p not in (1, 2):
        raise ValueError(f"LpNormalization '{node.name}': p must be 1 or 2, got {p}")
    norm = em.reduce("ReduceL2" if p == 2 else "ReduceL1", x, axes, keepdims=True)
    slope = y if p == 2 else em.sign(x)
    along = em.reduce_sum(em.Mul(dy[0], y), axes, keepdims=True)
    return [em.Div(em.Sub(dy[0], em.Mul(slope, along)), norm)]


@register("MeanVarianceNormalization", since=9)
def mean_variance_norm(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """y = (x - mean) / (std + 1e-9): dx = (dy - mean(dy)) / (std + 1e-9) - y * mean(dy * y) / std"""
    x, y = node.inputs[0], node.outputs[0]
    assert x is not None and dy[0] is not None
    axes = [a % rank(x, node) for a in attr(node, "axes", [0, 2, 3])]
    d = em.Sub(x, mean_over(em, x, axes))
    std = em.Sqrt(mean_over(em, em.Mul(d, d), axes))
    centered = em.Div(em.Sub(dy[0], mean_over(em, dy[0], axes)), em.Add(std, em.const(1e-9, like=x)))
    return [em.Sub(centered, em.Div(em.Mul(y, mean_over(em, em.Mul(dy[0], y), axes)), std))]
