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


def spread(em: Emitter, node: ir.Node, g: ir.Value) -> ir.Value:
    """g (shaped like the reduction's result) broadcast back to the input's shape."""
    x = node.inputs[0]
    assert x is not None
    target = keepdims_shape(em, node)
    if target is not None:
        g = em.Reshape(g, target)
    return em.expand(g, x)


def reduced_count(em: Emitter, node: ir.Node) -> ir.Value:
    """How many input elements fed each output element, in x's dtype."""
    x, y = node.inputs[0], node.outputs[0]
    assert x is not None
    xd, yd = static_dims(x), static_dims(y)
    if xd is not None and yd is not None:
        return em.const(float(np.prod(xd)) / max(float(np.prod(yd)), 1.0), like=x)
    assert x.dtype is not None
    return em.Div(em.Cast(em.Size(x), to=x.dtype), em.Cast(em.Size(y), to=x.dtype))


@register("ReduceSum")
def reduce_sum(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = broadcast(dy)"""
    assert dy[0] is not None
    if reduced_axes(em, node) == []:
        return [dy[0]]
    return [spread(em, node, dy[0])]


@register("ReduceMean")
def reduce_mean(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = broadcast(dy) / n"""
    assert dy[0] is not None
    if reduced_axes(em, node) == []:
        return [dy[0]]
    return [em.Div(spread(em, node, dy[0]), reduced_count(em, node))]
