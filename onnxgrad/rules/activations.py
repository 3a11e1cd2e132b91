"""Activations and softmax."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from onnxgrad.emitter import Emitter, attr, rank_of
from onnxgrad.registry import register

Grads = Sequence[ir.Value | None]
Out = list[ir.Value | None]


@register("Relu")
def relu(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * (x > 0)"""
    x = node.inputs[0]
    assert x is not None
    return [em.Mul(dy[0], em.mask(em.Greater(x, em.const(0.0, like=x)), x))]


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
    """The softmax axis (made non-negative when the rank is known) and whether it flattens (opset < 13)."""
    x = node.inputs[0]
    assert x is not None
    axis = attr(node, "axis", default)
    rank = rank_of(x)
    if axis < 0 and rank is not None:
        axis += rank
    return axis, default == 1


def _sum_over_softmax_axes(em: Emitter, node: ir.Node, t: ir.Value, default: int) -> ir.Value:
    """sum(t) over the softmax axis (opset >= 13) or over every axis from ``axis`` on (before)."""
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
