"""Reductions."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import Emitter, attr, rank_of, static_dims
from onnxgrad.registry import register

Grads = Sequence[ir.Value | None]
Out = list[ir.Value | None]


def reduced_axes(em: Emitter, node: ir.Node) -> list[int] | ir.Value | None:
    """The axes a Reduce* node reduces: a sorted list of non-negative ints, [] for none (a no-op),
    None for all axes, or a run-time value when the axes input is not a constant."""
    x = node.inputs[0]
    assert x is not None
    if len(node.inputs) > 1 and node.inputs[1] is not None:
        found = em.constant_value(node.inputs[1])
        if found is None:
            return node.inputs[1]
        axes = [int(a) for a in np.asarray(found).reshape(-1)]
    else:
        axes = attr(node, "axes", None)
    if not axes:
        return [] if attr(node, "noop_with_empty_axes", 0) else None
    rank = rank_of(x)
    if rank is None:
        if any(a < 0 for a in axes):
            return em.ints(axes)
        return sorted(axes)
    return sorted(a % rank for a in axes)


def keepdims_shape(em: Emitter, node: ir.Node) -> ir.Value | None:
    """The run-time shape of the node's result with keepdims=1 (None when keepdims is already 1)."""
    x = node.inputs[0]
    assert x is not None
    if attr(node, "keepdims", 1):
        return None
    axes = reduced_axes(em, node)
    dims = static_dims(x)
    if isinstance(axes, list) and dims is not None:
        return em.ints([1 if i in axes else d for i, d in enumerate(dims)])
    if axes is None:
        return em.ints([1] * rank_of(x)) if rank_of(x) is not None else em.Shape(  # type: ignore[operator]
            em.reduce_sum(x, None, keepdims=True)
        )
    return em.Shape(em.reduce_sum(x, axes, keepdims=True))


def kept(em: Emitter, node: ir.Node, v: ir.Value) -> ir.Value:
    """v (shaped like the reduction's result) in keepdims form, so it broadcasts against the input."""
    target = keepdims_shape(em, node)
    return v if target is None else em.Reshape(v, target)


def spread(em: Emitter, node: ir.Node, g: ir.Value) -> ir.Value:
    """g (shaped like the reduction's result) broadcast back to the input's shape."""
    x = node.inputs[0]
    assert x is not None
    return em.expand(kept(em, node, g), x)


def reduced_count(em: Emitter, node: ir.Node) -> ir.Value:
    """How many input elements fed each output element, in x's dtype."""
    x, y = node.inputs[0], node.outputs[0]
    assert x is not None
    xd, yd = static_dims(x), static_dims(y)
    if xd is not None and yd is not None:
        return em.const(float(np.prod(xd)) / max(float(np.prod(yd)), 1.0), like=x)
    assert x.dtype is not None
    return em.Div(em.Cast(em.Size(x), to=x.dtype), em.Cast(em.Size(y), to=x.dtype))


@register("ReduceSum", wrt=1)
def reduce_sum(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = broadcast(dy)"""
    assert dy[0] is not None
    if reduced_axes(em, node) == []:
        return [dy[0]]
    return [spread(em, node, dy[0])]


@register("ReduceMean", wrt=1)
def reduce_mean(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = broadcast(dy) / n"""
    assert dy[0] is not None
    if reduced_axes(em, node) == []:
        return [dy[0]]
    return [em.Div(spread(em, node, dy[0]), reduced_count(em, node))]


def _same_axes(em: Emitter, node: ir.Node, op: str, v: ir.Value) -> ir.Value:
    """``op`` of v over the node's reduced axes, keepdims=1 (an empty axis list reduces nothing)."""
    axes = reduced_axes(em, node)
    return em.reduce(op, v, axes, keepdims=True)


# With noop_with_empty_axes=1 and no axes, onnxruntime and onnx's reference reduce over zero axes,
# i.e. apply the op to each element alone (ReduceL1 -> |x|, ReduceSumSquare -> x^2, ReduceLogSum -> log x),
# and the rules below follow from the same formulas: kept() is then the identity.


@register("ReduceL1", wrt=1)
def reduce_l1(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * sign(x)"""
    x = node.inputs[0]
    assert x is not None and dy[0] is not None
    return [em.Mul(kept(em, node, dy[0]), em.sign(x))]


@register("ReduceL2", wrt=1, notes="the gradient is NaN where the norm is 0")
def reduce_l2(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * x / y"""
    x = node.inputs[0]
    assert x is not None and dy[0] is not None
    return [em.Mul(x, kept(em, node, em.Div(dy[0], node.outputs[0])))]


@register("ReduceSumSquare", wrt=1)
def reduce_sum_square(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = 2 * dy * x"""
    x = node.inputs[0]
    assert x is not None and dy[0] is not None
    return [em.Mul(kept(em, node, dy[0]), em.Mul(x, em.const(2.0, like=x)))]


@register("ReduceLogSum", wrt=1)
def reduce_log_sum(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy / exp(y)  (exp(y) is the sum)"""
    assert dy[0] is not None
    return [spread(em, node, em.Div(dy[0], em.Exp(node.outputs[0])))]


@register("ReduceLogSumExp", wrt=1)
def reduce_log_sum_exp(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * exp(x - y)"""
    x = node.inputs[0]
    assert x is not None and dy[0] is not None
    return [em.Mul(kept(em, node, dy[0]), em.Exp(em.Sub(x, kept(em, node, node.outputs[0]))))]


def _extremum(em: Emitter, node: ir.Node, dy: Grads, beyond: str) -> Out:
    """dx = dy * (x == y) / #ties: the subgradient shared evenly among the elements that attain y."""
    x = node.inputs[0]
    assert x is not None and dy[0] is not None
    # x == y spelled as not(x < y) / not(x > y): Equal takes floats only from opset 11.
    hit = em.indicator(em.Not(em.op(beyond, x, kept(em, node, node.outputs[0]))), x)
    ties = _same_axes(em, node, "ReduceSum", hit)
    return [em.Mul(hit, em.Div(kept(em, node, dy[0]), ties))]


@register("ReduceMax", wrt=1, notes="at ties the gradient is split evenly among the maxima")
def reduce_max(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * (x == y) / #maxima"""
    return _extremum(em, node, dy, "Less")


@register("ReduceMin", wrt=1, notes="at ties the gradient is split evenly among the minima")
def reduce_min(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * (x == y) / #minima"""
    return _extremum(em, node, dy, "Greater")


@register("ReduceProd", wrt=1, notes="exact with zeros: the product of the other elements, no division by 0 "
          "(its own derivative at zeros is not: the zero masks are constants)")
def reduce_prod(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx_i = dy * prod_{j != i} x_j: p/x_i without zeros, p at the only zero, 0 with two or more"""
    x = node.inputs[0]
    assert x is not None and dy[0] is not None
    zero = em.indicator(em.Not(em.Greater(em.Abs(x), em.const(0.0, like=x))), x)
    nonzero = em.Add(x, zero)  # x with its zeros replaced by ones
    p = _same_axes(em, node, "ReduceProd", nonzero)  # product of the non-zero elements
    zeros = _same_axes(em, node, "ReduceSum", zero)
    half = em.const(0.5, like=x)
    none = em.indicator(em.Less(zeros, half), x)
    one = em.indicator(em.Less(em.Abs(em.Sub(zeros, em.const(1.0, like=x))), half), x)
    factor = em.Add(em.Mul(none, em.Reciprocal(nonzero)), em.Mul(zero, one))
    return [em.Mul(em.Mul(kept(em, node, dy[0]), p), factor)]


@register("CumSum", since=11)
def cumsum(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = cumsum(dy) in the opposite direction (same exclusive)"""
    rev, exc = attr(node, "reverse", 0), attr(node, "exclusive", 0)
    return [em.CumSum(dy[0], node.inputs[1], exclusive=exc, reverse=1 - rev), None]


@register("CumProd", since=26, notes="divides by x: the gradient is not finite where x has zeros")
def cumprod(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = cumsum(dy * y) in the opposite direction (same exclusive) / x"""
    x = node.inputs[0]
    assert x is not None and dy[0] is not None
    rev, exc = attr(node, "reverse", 0), attr(node, "exclusive", 0)
    back = em.CumSum(em.Mul(dy[0], node.outputs[0]), node.inputs[1], exclusive=exc, reverse=1 - rev)
    return [em.Div(back, x), None]
