"""Activations and softmax."""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx_ir as ir

from onnxgrad.emitter import Emitter, attr, rank_of
from onnxgrad.registry import register

Grads = Sequence[ir.Value | None]
Out = list[ir.Value | None]


@register("Relu")
def relu(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * (y > 0)  (y > 0 exactly where x > 0: the forward input need not be kept for the backward)"""
    y = node.outputs[0]
    return [em.Mul(dy[0], em.indicator(em.Greater(y, em.const(0.0, like=y)), y))]


@register("Tanh")
def tanh(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * (1 - y^2)"""
    y = node.outputs[0]
    return [em.Mul(dy[0], em.Sub(em.const(1.0, like=y), em.Mul(y, y)))]


@register("Sigmoid")
def sigmoid(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * y * (1 - y)"""
    y = node.outputs[0]
    return [em.Mul(em.Mul(dy[0], y), em.Sub(em.const(1.0, like=y), y))]


def _softmax_axes(node: ir.Node, default: int) -> tuple[int, bool]:
    """The softmax axis (made non-negative when the rank is known) and whether it flattens (older schemas)."""
    x = node.inputs[0]
    assert x is not None
    axis = attr(node, "axis", default)
    rank = rank_of(x)
    if axis < 0 and rank is not None:
        axis += rank
    return axis, default == 1


def _sum_over_softmax_axes(em: Emitter, node: ir.Node, t: ir.Value, default: int) -> ir.Value:
    """sum(t) over the softmax axis (from opset 13 on) or over every axis from ``axis`` on (the older schemas)."""
    axis, flattens = _softmax_axes(node, default)
    x = node.inputs[0]
    assert x is not None
    if not flattens:
        return em.reduce_sum(t, [axis])
    rank = rank_of(x)
    if rank is not None and axis >= 0:
        return em.reduce_sum(t, list(range(axis, rank)))
    flat = em.Flatten(t, axis=axis)
    summed = em.Expand(em.reduce_sum(flat, [1]), em.Shape(flat))
    return em.Reshape(summed, em.Shape(t))


@register("Softmax", since=1)
def softmax_v1(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = y * (dy - sum(dy * y)) over the flattened trailing axes"""
    y = node.outputs[0]
    s = _sum_over_softmax_axes(em, node, em.Mul(dy[0], y), 1)
    return [em.Mul(y, em.Sub(dy[0], s))]


@register("Softmax", since=13)
def softmax_v13(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = y * (dy - sum(dy * y, axis))"""
    y = node.outputs[0]
    s = _sum_over_softmax_axes(em, node, em.Mul(dy[0], y), -1)
    return [em.Mul(y, em.Sub(dy[0], s))]


@register("LogSoftmax", since=1)
def log_softmax_v1(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy - exp(y) * sum(dy) over the flattened trailing axes"""
    y = node.outputs[0]
    return [em.Sub(dy[0], em.Mul(em.Exp(y), _sum_over_softmax_axes(em, node, dy[0], 1)))]  # type: ignore[arg-type]


@register("LogSoftmax", since=13)
def log_softmax_v13(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy - exp(y) * sum(dy, axis)"""
    y = node.outputs[0]
    return [em.Sub(dy[0], em.Mul(em.Exp(y), _sum_over_softmax_axes(em, node, dy[0], -1)))]  # type: ignore[arg-type]


def _x(node: ir.Node) -> ir.Value:
    x = node.inputs[0]
    assert x is not None
    return x


def _positive(em: Emitter, x: ir.Value) -> ir.Value:
    """The bool condition x > 0."""
    return em.Greater(x, em.const(0.0, like=x))


def _positive_input(em: Emitter, node: ir.Node, sign_kept: bool) -> ir.Value:
    """x > 0, read from the output y when y > 0 exactly where x > 0 (``sign_kept``): then the forward input
    need not stay alive until the backward reaches the node."""
    return _positive(em, node.outputs[0] if sign_kept else _x(node))


@register("LeakyRelu")
def leaky_relu(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy if x > 0 else alpha * dy"""
    x = _x(node)
    g = dy[0]
    assert g is not None
    alpha = attr(node, "alpha", 0.01)
    return [em.where(_positive_input(em, node, alpha >= 0), g, em.Mul(g, em.const(alpha, like=x)))]


@register("PRelu", broadcast=(1,))
def prelu(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy if x >= 0 else slope * dy; dslope = dy * x where x < 0"""
    x, slope = node.inputs
    g = dy[0]
    assert x is not None and slope is not None and g is not None
    negative = em.Less(x, em.const(0.0, like=x))
    dx = em.where(negative, em.Mul(g, slope), g)
    return [dx, em.Mul(g, em.Mul(x, em.indicator(negative, x)))]


@register("Elu")
def elu(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy if x > 0 else dy * (y + alpha)"""
    x, y, g = _x(node), node.outputs[0], dy[0]
    assert g is not None
    alpha = attr(node, "alpha", 1.0)
    return [em.where(_positive_input(em, node, alpha > 0), g, em.Mul(g, em.Add(y, em.const(alpha, like=x))))]


_SELU_ALPHA = 1.67326319217681884765625
_SELU_GAMMA = 1.05070102214813232421875


@register("Selu")
def selu(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * gamma if x > 0 else dy * (y + gamma * alpha)"""
    x, y, g = _x(node), node.outputs[0], dy[0]
    assert g is not None
    alpha, gamma = attr(node, "alpha", _SELU_ALPHA), attr(node, "gamma", _SELU_GAMMA)
    positive = _positive_input(em, node, alpha > 0 and gamma > 0)
    slope = em.where(positive, em.const(gamma, like=x), em.Add(y, em.const(gamma * alpha, like=x)))
    return [em.Mul(g, slope)]


@register("Celu", since=12)
def celu(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy if x > 0 else dy * exp(x / alpha) = dy * (y / alpha + 1)"""
    x, y, g = _x(node), node.outputs[0], dy[0]
    assert g is not None
    one = em.const(1.0, like=x)
    alpha = attr(node, "alpha", 1.0)
    inner = em.Add(em.Div(y, em.const(alpha, like=x)), one)
    return [em.where(_positive_input(em, node, alpha > 0), g, em.Mul(g, inner))]


def _gelu_slope(em: Emitter, x: ir.Value) -> ir.Value:
    """Phi(x) + x * phi(x)"""
    one, half = em.const(1.0, like=x), em.const(0.5, like=x)
    cdf = em.Mul(half, em.Add(one, em.Erf(em.Mul(x, em.const(math.sqrt(0.5), like=x)))))
    pdf = em.Mul(em.Exp(em.Mul(em.Mul(x, x), em.const(-0.5, like=x))), em.const(1.0 / math.sqrt(2.0 * math.pi), like=x))
    return em.Add(cdf, em.Mul(x, pdf))


def _gelu_tanh_slope(em: Emitter, x: ir.Value) -> ir.Value:
    """0.5 * (1 + t) + 0.5 * x * (1 - t^2) * k * (1 + 3a x^2), t = tanh(k * (x + a x^3))"""
    k, a = math.sqrt(2.0 / math.pi), 0.044715
    one, half, x2 = em.const(1.0, like=x), em.const(0.5, like=x), em.Mul(x, x)
    t = em.Tanh(em.Mul(em.Mul(x, em.const(k, like=x)), em.Add(one, em.Mul(x2, em.const(a, like=x)))))
    du = em.Mul(em.const(k, like=x), em.Add(one, em.Mul(x2, em.const(3.0 * a, like=x))))
    return em.Add(em.Mul(half, em.Add(one, t)), em.Mul(em.Mul(em.Mul(half, x), em.Sub(one, em.Mul(t, t))), du))


@register("Gelu", since=20)
def gelu(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * (Phi(x) + x * phi(x)); with approximate='tanh', dy times the tanh form's derivative"""
    x = _x(node)
    tanh_form = attr(node, "approximate", "none") == "tanh"
    return [em.Mul(dy[0], _gelu_tanh_slope(em, x) if tanh_form else _gelu_slope(em, x))]


@register("HardSigmoid")
def hard_sigmoid(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * alpha where 0 < y < 1"""
    y, g = node.outputs[0], dy[0]
    assert g is not None
    inside = em.And(em.Greater(y, em.const(0.0, like=y)), em.Less(y, em.const(1.0, like=y)))
    return [em.Mul(em.Mul(g, em.const(attr(node, "alpha", 0.2), like=y)), em.indicator(inside, y))]


@register("HardSwish", since=14)
def hard_swish(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * (hardsigmoid(x) + x/6 * [|x| < 3])"""
    x, g = _x(node), dy[0]
    assert g is not None
    h = em.HardSigmoid(x, alpha=1.0 / 6.0, beta=0.5)
    inside = em.indicator(em.Less(em.Abs(x), em.const(3.0, like=x)), x)
    return [em.Mul(g, em.Add(h, em.Mul(em.Mul(x, em.const(1.0 / 6.0, like=x)), inside)))]


@register("Mish", since=18)
def mish(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * (t + x * (1 - t^2) * sigmoid(x)), t = tanh(softplus(x)), softplus as log(exp(x) + 1)"""
    x, g = _x(node), dy[0]
    assert g is not None
    one = em.const(1.0, like=x)
    t = em.Tanh(em.Log(em.Add(em.Exp(x), one)))  # not Softplus: onnxruntime has no float64 Softplus kernel
    return [em.Mul(g, em.Add(t, em.Mul(em.Mul(x, em.Sub(one, em.Mul(t, t))), em.Sigmoid(x))))]


@register("Softplus")
def softplus(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * sigmoid(x)"""
    return [em.Mul(dy[0], em.Sigmoid(_x(node)))]


@register("Softsign")
def softsign(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy / (1 + |x|)^2 = dy * (1 - |y|)^2"""
    y = node.outputs[0]
    s = em.Sub(em.const(1.0, like=y), em.Abs(y))
    return [em.Mul(dy[0], em.Mul(s, s))]


@register("ThresholdedRelu", since=10)
def thresholded_relu(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * (x > alpha)"""
    x = _x(node)
    return [em.Mul(dy[0], em.indicator(em.Greater(x, em.const(attr(node, "alpha", 1.0), like=x)), x))]


@register("Shrink", since=9)
def shrink(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * (|x| > lambd)"""
    x = _x(node)
    outside = em.Greater(em.Abs(x), em.const(attr(node, "lambd", 0.5), like=x))
    return [em.Mul(dy[0], em.indicator(outside, x))]


@register("Swish", since=24)
def swish(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * (s + alpha * y * (1 - s)), s = sigmoid(alpha * x)"""
    x, y = _x(node), node.outputs[0]
    alpha = em.const(attr(node, "alpha", 1.0), like=x)
    s = em.Sigmoid(em.Mul(x, alpha))
    return [em.Mul(dy[0], em.Add(s, em.Mul(em.Mul(alpha, y), em.Sub(em.const(1.0, like=x), s))))]


_FLT_MAX = 3.4028234663852886e38


@register("Clip", since=1)
def clip_v1(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy where min <= x <= max (min, max attributes)"""
    x = _x(node)
    below = em.Less(x, em.const(attr(node, "min", -_FLT_MAX), like=x))
    above = em.Greater(x, em.const(attr(node, "max", _FLT_MAX), like=x))
    return [em.Mul(dy[0], em.indicator(em.Not(em.Or(below, above)), x))]


@register("Clip", since=11, broadcast=(1, 2))
def clip_v11(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy where min <= x <= max; dmin = dy where x < min; dmax = dy where x > max (y = max if min > max)"""
    x, g = _x(node), dy[0]
    assert g is not None
    lo, hi = [*node.inputs[1:], None, None][:2]
    below = None if lo is None else em.Less(x, lo)
    above = None if hi is None else em.Greater(x, hi)
    outside = below if above is None else above if below is None else em.Or(below, above)
    if below is not None and above is not None:  # min > max clamps everything to max
        crossed = em.Greater(lo, hi)
        below, above = em.And(below, em.Not(crossed)), em.Or(above, crossed)
    dx = g if outside is None else em.Mul(g, em.indicator(em.Not(outside), x))
    dlo = None if below is None else em.Mul(g, em.indicator(below, x))
    dhi = None if above is None else em.Mul(g, em.indicator(above, x))
    return [dx, dlo, dhi][: len(node.inputs)]


@register("SwiGLU", since=28)
def swiglu(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """da = dy * b * (s + alpha * a * s * (1 - s)), db = dy * a * s, s = sigmoid(alpha * a)"""
    a, b = node.inputs
    assert a is not None and b is not None
    alpha = em.const(attr(node, "alpha", 1.0), like=a)
    s = em.Sigmoid(em.Mul(a, alpha))
    sw = em.Mul(a, s)
    dsw = em.Add(s, em.Mul(em.Mul(alpha, sw), em.Sub(em.const(1.0, like=a), s)))
    return [em.Mul(em.Mul(dy[0], b), dsw), em.Mul(dy[0], sw)]
