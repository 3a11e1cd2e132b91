"""Gradient rules: the experimental ops ONNX once had and has removed (onnx 1.23 has no schema for them;
``schemas.REMOVED_EXPERIMENTAL``), which models of the early model zoo still carry (tiny-YOLOv2's ImageScaler,
CoreML and Caffe2 conversions' Scale, Crop, Affine...) and onnxruntime still runs: elementwise maps of attributes,
Crop a slice, DynamicSlice Slice-10's form. ATen, GRUUnit, ConstantFill and GivenTensorFill get no rule."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from onnxgrad.emitter import Emitter, attr, static_dims
from onnxgrad.registry import register
from onnxgrad.rules.shape import slice_v10

Grads = Sequence[ir.Value | None]
Out = list[ir.Value | None]

def _times(em: Emitter, node: ir.Node, dy: Grads, factor: str) -> Out:
    """dy times the node's float attribute ``factor`` (1 when absent)."""
    return [em.Mul(dy[0], em.const(attr(node, factor, 1.0), like=node.inputs[0]))]


@register("ImageScaler", since=1)
def image_scaler(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """y = scale * x + bias[c]: dx = scale * dy"""
    return _times(em, node, dy, "scale")


@register("Scale", since=1)
def scale(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """y = scale * x: dx = scale * dy"""
    return _times(em, node, dy, "scale")


@register("Affine", since=1)
def affine(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """y = alpha * x + beta: dx = alpha * dy"""
    return _times(em, node, dy, "alpha")


@register("ScaledTanh", since=1)
def scaled_tanh(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """y = alpha * tanh(beta * x): dx = dy * beta * (alpha - y^2 / alpha)"""
    y = node.outputs[0]
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    slope = em.Sub(em.const(alpha * beta, like=y), em.Mul(em.Mul(y, y), em.const(beta / alpha, like=y)))
    return [em.Mul(dy[0], slope)]


@register("ParametricSoftplus", since=1)
def parametric_softplus(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """y = alpha * ln(exp(beta * x) + 1): dx = dy * alpha * beta * sigmoid(beta * x)"""
    x = node.inputs[0]
    assert x is not None
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    gate = em.Sigmoid(em.Mul(x, em.const(beta, like=x)))
    return [em.Mul(dy[0], em.Mul(gate, em.const(alpha * beta, like=x)))]


@register("Crop", since=1)
def crop(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """y = x[:, :, top:top + h, left:left + w] (border = [left, top, right, bottom], or the size from scale): dx =
    dy padded back with zeros"""
    x, y = node.inputs[0], node.outputs[0]
    assert x is not None
    xd, yd = static_dims(x), static_dims(y)
    if xd is None or yd is None or len(xd) != 4:
        raise ValueError(f"Crop '{node.name}': the gradient needs the static NCHW shapes of its input and output")
    left, top = [*attr(node, "border", [0, 0, 0, 0]), 0, 0][:2]
    pads = [0, 0, top, left, 0, 0, xd[2] - top - yd[2], xd[3] - left - yd[3]]
    return [em.pad(dy[0], pads) if any(pads) else dy[0]]


register("DynamicSlice", since=1)(slice_v10)  # data, starts, ends, axes: Slice-10's inputs
