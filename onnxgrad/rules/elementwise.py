"""Arithmetic and unary math."""

from __future__ import annotations

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
    positive = em.mask(em.Greater(x, em.const(0.0, like=x)), x)
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
