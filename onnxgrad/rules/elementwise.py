"""Arithmetic and unary math."""

from __future__ import annotations

import math
from collections.abc import Sequence

import onnx_ir as ir

from onnxgrad.emitter import Emitter
from onnxgrad.registry import register

Grads = Sequence[ir.Value | None]
Out = list[ir.Value | None]


@register("Identity")
def identity(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy"""
    return [dy[0]]


@register("Add", broadcast=True)
def add(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """da = dy, db = dy"""
    return [dy[0], dy[0]]


@register("Sub", broadcast=True)
def sub(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """da = dy, db = -dy"""
    return [dy[0], em.Neg(dy[0])]


@register("Mul", broadcast=True)
def mul(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """da = dy * b, db = dy * a"""
    a, b = node.inputs
    return [em.Mul(dy[0], b), em.Mul(dy[0], a)]


@register("Div", broadcast=True)
def div(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """da = dy / b, db = -dy * z / b"""
    _, b = node.inputs
    da = em.Div(dy[0], b)
    return [da, em.Neg(em.Mul(da, node.outputs[0]))]


@register("Neg")
def neg(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = -dy"""
    return [em.Neg(dy[0])]


@register("Sum", broadcast=True)
def sum_(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx_i = dy"""
    return [dy[0]] * len(node.inputs)


@register("Exp")
def exp(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * y"""
    return [em.Mul(dy[0], node.outputs[0])]


@register("Log")
def log(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy / x"""
    return [em.Div(dy[0], node.inputs[0])]


@register("Sqrt")
def sqrt(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * 0.5 / y"""
    y = node.outputs[0]
    return [em.Div(em.Mul(dy[0], em.const(0.5, like=y)), y)]


@register("Pow", broadcast=True)
def pow_(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * e * x^(e-1), de = dy * z * log(x) (0 where x <= 0)"""
    x, e = node.inputs
    assert x is not None and e is not None
    z = node.outputs[0]
    ef = e if e.dtype == x.dtype else em.Cast(e, to=x.dtype)
    dx = em.Mul(em.Mul(dy[0], ef), em.Pow(x, em.Sub(ef, em.const(1.0, like=x))))
    positive = em.indicator(em.Greater(x, em.const(0.0, like=x)), x)
    safe_log = em.Mul(em.Log(em.Add(em.Mul(x, positive), em.Sub(em.const(1.0, like=x), positive))), positive)
    de = em.Mul(em.Mul(dy[0], z), safe_log)
    if e.dtype != x.dtype:
        de = em.Cast(de, to=e.dtype) if e.dtype is not None and e.dtype.is_floating_point() else None
    return [dx, de]


@register("Cast")
def cast(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = cast(dy, dtype(x))"""
    x = node.inputs[0]
    assert x is not None and x.dtype is not None
    return [em.Cast(dy[0], to=x.dtype)]


# ------------------------------------------------------------------ unary math
@register("Abs")
def abs_(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * sign(x) (0 at x = 0)"""
    x = node.inputs[0]
    assert x is not None
    return [em.Mul(dy[0], em.sign(x))]


@register("Reciprocal")
def reciprocal(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = -dy * y^2"""
    y = node.outputs[0]
    return [em.Neg(em.Mul(dy[0], em.Mul(y, y)))]


@register("Sin", since=7)
def sin(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * cos(x)"""
    return [em.Mul(dy[0], em.Cos(node.inputs[0]))]


@register("Cos", since=7)
def cos(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = -dy * sin(x)"""
    return [em.Neg(em.Mul(dy[0], em.Sin(node.inputs[0])))]


@register("Tan", since=7)
def tan(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * (1 + y^2)"""
    y = node.outputs[0]
    return [em.Mul(dy[0], em.Add(em.const(1.0, like=y), em.Mul(y, y)))]


def _one_minus_x2(em: Emitter, node: ir.Node) -> ir.Value:
    """1 - x^2 for the node's input x."""
    x = node.inputs[0]
    assert x is not None
    return em.Sub(em.const(1.0, like=x), em.Mul(x, x))


@register("Asin", since=7)
def asin(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy / sqrt(1 - x^2)"""
    return [em.Div(dy[0], em.Sqrt(_one_minus_x2(em, node)))]


@register("Acos", since=7)
def acos(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = -dy / sqrt(1 - x^2)"""
    return [em.Neg(em.Div(dy[0], em.Sqrt(_one_minus_x2(em, node))))]


@register("Atan", since=7)
def atan(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy / (1 + x^2)"""
    x = node.inputs[0]
    assert x is not None
    return [em.Div(dy[0], em.Add(em.const(1.0, like=x), em.Mul(x, x)))]


@register("Sinh", since=9)
def sinh(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * cosh(x)"""
    return [em.Mul(dy[0], em.Cosh(node.inputs[0]))]


@register("Cosh", since=9)
def cosh(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * sinh(x)"""
    return [em.Mul(dy[0], em.Sinh(node.inputs[0]))]


@register("Asinh", since=9)
def asinh(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy / sqrt(x^2 + 1)"""
    x = node.inputs[0]
    assert x is not None
    return [em.Div(dy[0], em.Sqrt(em.Add(em.Mul(x, x), em.const(1.0, like=x))))]


@register("Acosh", since=9)
def acosh(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy / sqrt(x^2 - 1)"""
    x = node.inputs[0]
    assert x is not None
    return [em.Div(dy[0], em.Sqrt(em.Sub(em.Mul(x, x), em.const(1.0, like=x))))]


@register("Atanh", since=9)
def atanh(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy / (1 - x^2)"""
    return [em.Div(dy[0], _one_minus_x2(em, node))]


@register("Erf", since=9)
def erf(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * 2/sqrt(pi) * exp(-x^2)"""
    x = node.inputs[0]
    assert x is not None
    return [em.Mul(dy[0], em.Mul(em.const(2.0 / math.sqrt(math.pi), like=x), em.Exp(em.Neg(em.Mul(x, x)))))]


# ------------------------------------------------------- binary, variadic, select
@register("Mod", since=10, broadcast=True)
def mod(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """da = dy, db = -dy * n with n = (a - y) / b = trunc(a/b) (fmod=1) or floor(a/b) (fmod=0)"""
    a, b = node.inputs
    assert a is not None and b is not None
    n = em.Div(em.Sub(a, node.outputs[0]), b)
    return [dy[0], em.Neg(em.Mul(dy[0], n))]


def _select_grads(em: Emitter, node: ir.Node, dy: ir.Value, cmp: str) -> Out:
    """dx_i = dy * [x_i == y] / #{j: x_j == y}, with x_i == y tested as not(x_i cmp y)."""
    if len(node.inputs) == 1:
        return [dy]
    y = node.outputs[0]
    masks = [em.indicator(em.Not(em.op(cmp, x, y)), y) for x in node.inputs]
    share = em.Div(dy, em.Sum(*masks))
    return [em.Mul(share, m) for m in masks]


@register("Max", broadcast=True, notes="ties split the gradient evenly among the tied inputs")
def max_(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx_i = dy * [x_i == y] / (number of inputs equal to y)"""
    return _select_grads(em, node, dy[0], "Less")  # type: ignore[arg-type]


@register("Min", broadcast=True, notes="ties split the gradient evenly among the tied inputs")
def min_(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx_i = dy * [x_i == y] / (number of inputs equal to y)"""
    return _select_grads(em, node, dy[0], "Greater")  # type: ignore[arg-type]


@register("Mean", broadcast=True)
def mean(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx_i = dy / n"""
    g = dy[0]
    assert g is not None
    if len(node.inputs) > 1:
        g = em.Mul(g, em.const(1.0 / len(node.inputs), like=g))
    return [g] * len(node.inputs)


@register("Where", since=9, broadcast=(1, 2))
def where(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dX = where(c, dy, 0), dY = where(c, 0, dy); no gradient for c"""
    c = node.inputs[0]
    g = dy[0]
    assert c is not None and g is not None
    zero = em.const(0.0, like=g)
    return [None, em.Where(c, g, zero), em.Where(c, zero, g)]
