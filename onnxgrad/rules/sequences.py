"""Gradients of the sequence ops and the Optional ops on float paths.

The gradient of a sequence is a sequence of the elements' gradients. Two places build one from pieces, and both
need the sequence's elements to share one shape (what exporters emit: unbind, split into equal chunks, lists of
like tensors): SequenceAt's gradient (the incoming gradient at one position, zeros elsewhere, stacked and split
again) and the walk's sum of several gradients of one sequence (``backprop.add_terms``).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import Emitter, attr, rank
from onnxgrad.registry import register, register_nondifferentiable

Grads = Sequence[ir.Value | None]
INT64 = ir.DataType.INT64


def as_sequence(v: ir.Value, like: ir.Value) -> ir.Value:
    """v typed as a sequence of like's element type (the emitter types outputs as tensors)."""
    assert like.dtype is not None
    v.type, v.shape = ir.SequenceType(ir.TensorType(like.dtype)), None
    return v


def _length(em: Emitter, seq: ir.Value) -> ir.Value:
    n = em.SequenceLength(seq)
    n.type, n.shape = ir.TensorType(INT64), ir.Shape([])
    return n


def _index(em: Emitter, seq: ir.Value, pos: ir.Value | None, default_last: bool = False) -> ir.Value:
    """pos as a non-negative int64 scalar into seq (negative counts from the back); without pos, the length
    (the end), or the last index with ``default_last``."""
    n = _length(em, seq)
    if pos is None:
        return em.Sub(n, em.const(np.array(1), dtype=INT64)) if default_last else n
    p = em.Cast(pos, to=INT64)
    zero = em.const(np.array(0), dtype=INT64)
    return em.Where(em.Less(p, zero), em.Add(p, n), p)


def _element(em: Emitter, seq: ir.Value, index: ir.Value, like: ir.Value | None = None) -> ir.Value:
    out = em.SequenceAt(seq, index)
    if like is not None:
        out.type, out.shape = like.type, like.shape
    return out


@register("SequenceConstruct", since=11, notes="dx_i = dS[i]")
def sequence_construct(em: Emitter, node: ir.Node, grads: Grads) -> list[ir.Value | None]:
    """dx_i = dS[i]"""
    (g,) = grads
    assert g is not None
    return [_element(em, g, em.const(np.array(i), dtype=INT64), x) for i, x in enumerate(node.inputs)]


@register("SequenceAt", since=11, wrt=1, notes="dy at the position, zeros elsewhere: the elements must share "
          "one shape")
def sequence_at(em: Emitter, node: ir.Node, grads: Grads) -> list[ir.Value | None]:
    """dS = split(onehot(pos) (x) dy): dy at pos, zeros elsewhere"""
    (g,) = grads
    assert g is not None
    seq, y = node.inputs[0], node.outputs[0]
    assert seq is not None
    index = _index(em, seq, node.inputs[1])
    hot = em.indicator(em.Equal(em.arange(_length(em, seq)), index), g)
    r = rank(y, node)
    stacked = em.Mul(em.unsqueeze(hot, list(range(1, r + 1))), em.unsqueeze(g, [0]))
    return [as_sequence(em.SplitToSequence(stacked, axis=0, keepdims=0), seq)]


@register("SequenceInsert", since=11, wrt=2, notes="dS = dS' without the inserted position, dt = dS'[position]")
def sequence_insert(em: Emitter, node: ir.Node, grads: Grads) -> list[ir.Value | None]:
    """dS = erase(dS', pos), dt = dS'[pos]"""
    (g,) = grads
    assert g is not None
    seq, t = node.inputs[0], node.inputs[1]
    assert seq is not None and t is not None
    index = _index(em, seq, node.inputs[2] if len(node.inputs) > 2 else None)
    return [as_sequence(em.SequenceErase(g, index), seq), _element(em, g, index, t)]


@register("SequenceErase", since=11, wrt=1, notes="dS = dS' with zeros inserted at the erased position")
def sequence_erase(em: Emitter, node: ir.Node, grads: Grads) -> list[ir.Value | None]:
    """dS = insert(dS', zeros like S[pos], pos)"""
    (g,) = grads
    assert g is not None
    seq = node.inputs[0]
    assert seq is not None
    index = _index(em, seq, node.inputs[1] if len(node.inputs) > 1 else None, default_last=True)
    zeros = em.zeros_like(_element(em, seq, index))
    return [as_sequence(em.SequenceInsert(g, zeros, index), seq)]


@register("ConcatFromSequence", since=11, notes="dS = dy split back into the elements' sizes (a Loop reads them)")
def concat_from_sequence(em: Emitter, node: ir.Node, grads: Grads) -> list[ir.Value | None]:
    """dS = split(dy, sizes of the elements along axis)"""
    (g,) = grads
    assert g is not None
    seq = node.inputs[0]
    assert seq is not None
    axis = int(attr(node, "axis"))
    if attr(node, "new_axis", 0):
        return [as_sequence(em.SplitToSequence(g, axis=axis, keepdims=0), seq)]
    return [as_sequence(em.SplitToSequence(g, _sizes(em, seq, axis), axis=axis), seq)]


def _sizes(em: Emitter, seq: ir.Value, axis: int) -> ir.Value:
    """Each element's size along axis, as a 1-D int64 tensor: a Loop over the sequence (no float flows in it)."""
    tag = em.fresh_name("element_sizes")
    step = ir.Value(name=f"{tag}/i", type=ir.TensorType(INT64), shape=ir.Shape([]))
    go_on = ir.Value(name=f"{tag}/cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    g = ir.Graph([step, go_on], [], nodes=[], name=tag)
    emb = Emitter(g, em.opset, tag, em.ir_version, em.aggregation)
    element = emb.SequenceAt(seq, step)
    whole = emb.Shape(element)
    size = emb.Gather(whole, emb.const(np.array(axis), dtype=INT64))
    keep = emb.Identity(go_on)
    emb.commit([keep, size])
    keep.type, keep.shape = go_on.type, go_on.shape
    size.type, size.shape = ir.TensorType(INT64), ir.Shape([])
    g.outputs.extend([keep, size])
    out = em.op("Loop", _length(em, seq), em.const(np.array(True), dtype=ir.DataType.BOOL), body=g)
    out.type, out.shape = ir.TensorType(INT64), ir.Shape([None])
    return out


@register("SplitToSequence", since=11, wrt=1, notes="dx = the elements' gradients concatenated (or stacked)")
def split_to_sequence(em: Emitter, node: ir.Node, grads: Grads) -> list[ir.Value | None]:
    """dx = concat(dS, axis), or stack(dS, axis) when the elements lost the axis (keepdims=0, no split)"""
    (g,) = grads
    assert g is not None
    axis = int(attr(node, "axis", 0))
    squeezed = len(node.inputs) < 2 or node.inputs[1] is None
    new_axis = int(squeezed and not attr(node, "keepdims", 1))
    out = em.ConcatFromSequence(g, axis=axis, new_axis=new_axis)
    x = node.inputs[0]
    assert x is not None
    out.type, out.shape = x.type, x.shape
    return [out]


@register("Optional", since=15, notes="dx = the element of dO")
def optional(em: Emitter, node: ir.Node, grads: Grads) -> list[ir.Value | None]:
    """dx = element(dO)"""
    (g,) = grads
    assert g is not None
    out = em.OptionalGetElement(g)
    x = node.inputs[0]
    if x is not None:
        out.type, out.shape = x.type, x.shape
    return [out]


@register("OptionalGetElement", since=15, notes="dO = Optional(dy) (dy itself for a plain tensor input, opset 18)")
def optional_get_element(em: Emitter, node: ir.Node, grads: Grads) -> list[ir.Value | None]:
    """dO = Optional(dy)"""
    (g,) = grads
    assert g is not None
    o = node.inputs[0]
    assert o is not None
    if not isinstance(o.type, ir.OptionalType):
        return [g]
    out = em.Optional(g)
    out.type, out.shape = o.type, None
    return [out]


register_nondifferentiable("SequenceLength", "SequenceEmpty", since=11, notes="integer length / no float input")
register_nondifferentiable("OptionalHasElement", since=15, notes="bool output")
