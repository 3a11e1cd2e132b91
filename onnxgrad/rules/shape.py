"""Data movement: reshapes, permutations, slicing, gathering, scattering, padding and tiling.

Every rule here is linear in dY: the gradient is the adjoint of the forward copy. Where the forward
reads an element several times (Gather with repeated indices, Expand, Tile, edge/reflect/wrap Pad),
the adjoint adds the copies back up.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import (
    Dims,
    Emitter,
    arange_of_size,
    attr,
    contract_axis,
    eye_of_size,
    rank,
    static_dims,
    static_value,
    swap_with_last,
)
from onnxgrad.registry import register

Grads = Sequence[ir.Value | None]
Out = list[ir.Value | None]

INT64_MAX = 2**63 - 1
_INT64 = ir.DataType.INT64


# ------------------------------------------------------------------------------------------- helpers
def _first(node: ir.Node, dx: ir.Value | None) -> Out:
    """A gradient for the first input only (the others are shapes, indices, conditions)."""
    return [dx] + [None] * (len(node.inputs) - 1)


def _axis(node: ir.Node, x: ir.Value, default: int = 0) -> int:
    """The node's ``axis`` attribute, made non-negative."""
    a = int(attr(node, "axis", default))
    return a if a >= 0 else a % rank(x, node)


def _ints_of(em: Emitter, v: ir.Value | None) -> list[int] | None:
    """An int tensor's values as a flat list when the graph fixes them (``static_value``), else None."""
    found = static_value(em, v)
    return None if found is None else [int(i) for i in np.asarray(found).reshape(-1)]


def _scalar(em: Emitter, n: int | ir.Value) -> ir.Value:
    return em.const(np.array(n), dtype=_INT64) if isinstance(n, int) else n


def _prod(em: Emitter, items: Sequence[int | ir.Value]) -> int | ir.Value:
    """The product of static and run-time (0-D int64) sizes, folded where static."""
    static = int(np.prod([i for i in items if isinstance(i, int)], dtype=np.int64))
    out: int | ir.Value = static
    for v in (i for i in items if not isinstance(i, int)):
        out = v if isinstance(out, int) and out == 1 else em.Mul(_scalar(em, out), v)
    return out


def _as_int64(em: Emitter, v: ir.Value) -> ir.Value:
    return v if v.dtype == _INT64 else em.Cast(v, to=_INT64)


def _positions(em: Emitter, x: ir.Value) -> ir.Value:
    """An int64 tensor shaped like x holding each element's flat (row-major) position (needs opset 9)."""
    return em.Reshape(em.arange(em.Size(x)), em.shape_of(x))


def _scatter_positions(em: Emitter, x: ir.Value, sel: ir.Value, g: ir.Value) -> ir.Value:
    """zeros_like(x) with g written at the (distinct) flat positions sel."""
    flat = em.ints([-1])
    out = em.scatter_elements(em.Reshape(em.zeros_like(x), flat), em.Reshape(sel, flat), em.Reshape(g, flat), 0)
    return em.reshape_like(out, x)


def _same_op(em: Emitter, node: ir.Node, t: ir.Value) -> ir.Value:
    """The node's own op, attributes and extra inputs applied to t instead of its first input."""
    attrs = {name: attr(node, name) for name in node.attributes}
    return em.op(node.op_type, t, *node.inputs[1:], **attrs)


def _selection_adjoint(em: Emitter, node: ir.Node, g: ir.Value) -> ir.Value:
    """For ops that copy a subset of x's elements (Slice, Compress): run the op on x's positions, scatter back."""
    x = node.inputs[0]
    assert x is not None
    try:
        return _scatter_positions(em, x, _same_op(em, node, _positions(em, x)), g)
    except ValueError as e:
        raise ValueError(f"{node.op_type} '{node.name}': without static shapes and unit steps this gradient "
                         f"scatters dY back by position, and {e}") from e


# ------------------------------------------------------------------------------- reshapes, permutes
@register("Reshape")
def reshape(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = reshape(dy, shape(x))"""
    x = node.inputs[0]
    assert x is not None and dy[0] is not None
    return _first(node, em.reshape_like(dy[0], x))


@register("Flatten")
def flatten(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = reshape(dy, shape(x))"""
    return reshape(em, node, dy)


@register("Squeeze")
def squeeze(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = reshape(dy, shape(x))  (axes as attribute or input alike)"""
    return reshape(em, node, dy)


@register("Unsqueeze")
def unsqueeze(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = reshape(dy, shape(x))  (axes as attribute or input alike)"""
    return reshape(em, node, dy)


@register("Transpose")
def transpose(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = transpose(dy, inverse(perm))"""
    perm = attr(node, "perm")
    if perm is None:
        return [em.Transpose(dy[0])]
    return [em.Transpose(dy[0], perm=[int(i) for i in np.argsort(perm)])]


@register("CastLike", since=15)
def cast_like(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = cast(dy, dtype(x))"""
    x = node.inputs[0]
    assert x is not None and dy[0] is not None
    return _first(node, em.CastLike(dy[0], x))


@register("DepthToSpace")
def depth_to_space(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """DCR: dx = SpaceToDepth(dy); CRD: dx = the inverse reshape-transpose-reshape"""
    x, g = node.inputs[0], dy[0]
    assert x is not None and g is not None
    b = int(attr(node, "blocksize"))
    if attr(node, "mode", "DCR") == "DCR":
        return [em.SpaceToDepth(g, blocksize=b)]
    target = em.cat_ints([0], em.dims(g, [1]), em.dims(x, [2]), [b], em.dims(x, [3]), [b])
    return [em.reshape_like(em.Transpose(em.Reshape(g, target), perm=[0, 1, 3, 5, 2, 4]), x)]


@register("SpaceToDepth")
def space_to_depth(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = DepthToSpace(dy) in the same mode (the exact inverse permutation)"""
    mode = attr(node, "mode", "DCR")
    return [em.DepthToSpace(dy[0], blocksize=int(attr(node, "blocksize")), mode=None if mode == "DCR" else mode)]


@register("ReverseSequence", since=10)
def reverse_sequence(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = ReverseSequence(dy)  (an involution: its own adjoint)"""
    axes = {k: attr(node, k) for k in ("batch_axis", "time_axis")}
    return _first(node, em.ReverseSequence(dy[0], node.inputs[1], **axes))


@register("Trilu", since=14)
def trilu(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = Trilu(dy)  (a 0/1 mask: its own adjoint)"""
    return _first(node, em.Trilu(dy[0], *node.inputs[1:], upper=attr(node, "upper")))


# --------------------------------------------------------------------------- concatenate and split
@register("Concat")
def concat(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx_i = the piece of dy along axis that x_i filled"""
    xs = [x for x in node.inputs if x is not None]
    g = dy[0]
    assert g is not None
    a = _axis(node, xs[0])
    return list(em.split(g, [em.dim(x, a, keepdims=True) for x in xs], a))


@register("Split", dense=True)
def split(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = concat(dy_0, ..., dy_n) along axis  (outputs without gradient come as zeros)"""
    x = node.inputs[0]
    assert x is not None
    return _first(node, em.Concat(*dy, axis=_axis(node, x)))


# -------------------------------------------------------------------------------------------- slice
def _unit_slice_plan(
    x: ir.Value, starts: Sequence[int], ends: Sequence[int], axes: Sequence[int], steps: Sequence[int]
) -> tuple[list[int], list[int]] | None:
    """(pads, reversed axes) turning dy into dx for a slice of static bounds and steps +-1, else None."""
    shape = x.shape
    if shape is None:
        return None
    r = len(shape)
    pads, rev = [0] * (2 * r), []
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a %= r
        d = shape[a]
        if not isinstance(d, int):
            if st == 1 and s == 0 and e >= 2**31 - 1:  # the whole of an axis of unknown length
                continue
            return None
        picked = range(d)[s:e:st]
        if st not in (1, -1) or not picked:
            return None
        lo, hi = min(picked[0], picked[-1]), max(picked[0], picked[-1])
        pads[a], pads[a + r] = lo, d - 1 - hi
        if st == -1:
            rev.append(a)
    return pads, rev


def _slice_grad(
    em: Emitter,
    node: ir.Node,
    g: ir.Value,
    starts: list[int] | None,
    ends: list[int] | None,
    axes: list[int] | None,
    steps: list[int] | None,
    runtime_starts: ir.Value | None = None,
) -> ir.Value:
    """A zero Pad of dy when the slice has steps +-1 (and static axes); else a scatter at the sliced positions."""
    x = node.inputs[0]
    assert x is not None
    if (starts is None or ends is None) and runtime_starts is not None and axes is not None and steps is not None \
            and em.runtime_pads:
        found = _unit_slice_runtime_bounds(em, x, g, runtime_starts, axes, steps)
        if found is not None:
            return found
    plan = None
    if starts is not None and ends is not None and axes is not None and steps is not None:
        plan = _unit_slice_plan(x, starts, ends, axes, steps)
    if plan is None and starts is not None and ends is not None and axes is not None and steps is not None:
        if not em.has_op("NonZero"):  # no run-time positions before opset 9
            return _slice_by_matrices(em, node, g, starts, ends, axes)
        if em.runtime_pads and (found := _unit_slice_runtime(em, node, g, starts, ends, axes, steps)) is not None:
            return found
    if plan is None:
        return _selection_adjoint(em, node, g)
    pads, rev = plan
    if rev:
        k = len(rev)
        g = em.slice(g, [-1] * k, [-INT64_MAX] * k, rev, [-1] * k)
    return em.pad(g, pads)


def _unit_slice_runtime(em: Emitter, node: ir.Node, g: ir.Value, starts: Sequence[int], ends: Sequence[int],
                        axes: Sequence[int], steps: Sequence[int]) -> ir.Value | None:
    """dx = a zero Pad of dy (reversed along the step -1 axes) for static bounds and steps +-1 on axes of run-time
    length n: before the slice come min(picked positions, n) elements, found by slicing 0..n-1 alike, after it
    n - before - len(dy). None where a step is not +-1 or a static axis picks nothing."""
    x = node.inputs[0]
    assert x is not None
    if x.shape is None or any(st not in (1, -1) for st in steps):
        return None
    r = len(x.shape)
    zero: list[int] = [0]
    before: list[Dims] = [zero] * r
    after: list[Dims] = [zero] * r
    rev = []
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        a %= r
        d = x.shape[a]
        if isinstance(d, int):
            picked = range(d)[s:e:st]
            if not picked:
                return None
            before[a], after[a] = [min(picked[0], picked[-1])], [d - 1 - max(picked[0], picked[-1])]
        elif not (st == 1 and s == 0 and e >= 2**31 - 1):  # (the whole of an axis)
            n = em.dim(x, a, keepdims=True)
            positions = em.Slice(em.arange(em.dim(x, a)), em.ints([s]), em.ints([e]), em.ints([0]), em.ints([st]))
            before[a] = em.reduce("ReduceMin", em.Concat(positions, n, axis=0), [0], keepdims=True)
            count = em.dim(g, a, keepdims=True)
            after[a] = em.Sub(em.Sub(n, before[a]), em.ints([count]) if isinstance(count, int) else count)
        if st == -1:
            rev.append(a)
    if rev:
        g = em.slice(g, [-1] * len(rev), [-INT64_MAX] * len(rev), rev, [-1] * len(rev))
    return em.Pad(g, em.cat_ints(*before, *after))


def _unit_slice_runtime_bounds(em: Emitter, x: ir.Value, g: ir.Value, starts: ir.Value, axes: Sequence[int],
                               steps: Sequence[int]) -> ir.Value | None:
    """dx = a zero Pad of dy (reversed along the step -1 axes) for steps +-1 and starts known at run time: with
    n = x's length and s = starts + n where starts < 0, the first picked position is p = clamp(s, 0, n - 1) for
    step -1 (pads n - 1 - p after) and clamp(s, 0, n) for step +1 (pads p before), len(dy) fills the rest.
    None where a step is not +-1 or x's rank is unknown."""
    if x.shape is None or any(st not in (1, -1) for st in steps):
        return None
    r, k = len(x.shape), len(axes)
    axes = [a % r for a in axes]
    n = em.dims(x, axes)
    count = em.dims(g, axes)
    n_v = em.ints(n) if isinstance(n, list) else n
    count_v = em.ints(count) if isinstance(count, list) else count
    zero = em.ints([0] * k)
    s = starts if starts.dtype == _INT64 else em.Cast(starts, to=_INT64)
    s = em.Where(em.Less(s, zero), em.Add(s, n_v), s)
    s = em.Where(em.Less(s, zero), zero, s)
    rev = [st == -1 for st in steps]
    top = em.Sub(n_v, em.ints([int(b) for b in rev])) if any(rev) else n_v  # the largest start that picks
    p = em.Where(em.Less(top, s), top, s)
    if all(rev):
        after = em.Sub(top, p)
        before = em.Sub(em.Sub(n_v, after), count_v)
    elif any(rev):  # before = p where step +1, p + 1 - len(dy) where step -1
        flag = em.ints([int(b) for b in rev])
        before = em.Add(p, em.Mul(flag, em.Sub(em.ints([1] * k), count_v)))
        after = em.Sub(em.Sub(n_v, before), count_v)
    else:
        before = p
        after = em.Sub(em.Sub(n_v, before), count_v)
    slot = {a: i for i, a in enumerate(axes)}  # pads = [before..., after...] over every axis, 0 off the slice
    index = [slot.get(a, 2 * k) for a in range(r)] + [slot[a] + k if a in slot else 2 * k for a in range(r)]
    pads = em.Gather(em.Concat(before, after, em.ints([0]), axis=0), em.ints(index))
    flipped = [a for a, b in zip(axes, rev, strict=True) if b]
    if flipped:
        m = len(flipped)
        g = em.slice(g, [-1] * m, [-INT64_MAX] * m, flipped, [-1] * m)
    return em.Pad(g, pads)


def _slice_by_matrices(em: Emitter, node: ir.Node, g: ir.Value, starts: Sequence[int], ends: Sequence[int],
                       axes: Sequence[int]) -> ir.Value:
    """dx = dy with each sliced axis a contracted with S_a = I_n[:, start:end], the slice applied to an identity
    (unit steps: Slice before opset 10), so the run-time length n clamps the bounds as the runtime does."""
    x = node.inputs[0]
    assert x is not None
    r = rank(x, node)
    for s, e, a in zip(starts, ends, axes, strict=True):
        a %= r
        if s == 0 and e >= 2**31 - 1:  # the whole axis
            continue
        g = contract_axis(em, g, em.slice(eye_of_size(em, em.dim(x, a), g), [s], [e], [1]), a, r)
    return g


@register("Slice", since=1)
def slice_v1(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = zeros_like(x) with dy at the sliced positions  (starts/ends/axes attributes)"""
    starts, ends = attr(node, "starts"), attr(node, "ends")
    axes = attr(node, "axes", list(range(len(starts))))
    assert dy[0] is not None
    return [_slice_grad(em, node, dy[0], starts, ends, axes, [1] * len(starts))]


def _static_length(v: ir.Value | None) -> int | None:
    """The length of a 1-D value whose shape the graph fixes, else None."""
    shape = None if v is None else v.shape
    return int(shape[0]) if shape is not None and len(shape) == 1 and isinstance(shape[0], int) else None


@register("Slice", since=10)
def slice_v10(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = zeros_like(x) with dy at the sliced positions  (starts/ends/axes/steps inputs)"""
    ins = [*node.inputs, None, None][:5]
    starts, ends = _ints_of(em, ins[1]), _ints_of(em, ins[2])
    n = len(starts) if starts is not None else (len(ends) if ends is not None else _static_length(ins[1]))
    axes = _ints_of(em, ins[3]) if ins[3] is not None else (None if n is None else list(range(n)))
    n = len(axes) if n is None and axes is not None else n
    steps = _ints_of(em, ins[4]) if ins[4] is not None else (None if n is None else [1] * n)
    assert dy[0] is not None
    return _first(node, _slice_grad(em, node, dy[0], starts, ends, axes, steps, ins[1]))


@register("Compress", since=9)
def compress(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = zeros_like(x) with dy at the selected positions"""
    assert dy[0] is not None
    return _first(node, _selection_adjoint(em, node, dy[0]))


@register("CenterCropPad", since=18)
def center_crop_pad(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = CenterCropPad(dy, shape(x))  (crop and pad offsets agree, so it is the adjoint)"""
    x = node.inputs[0]
    assert x is not None
    axes = attr(node, "axes")
    target = em.cat_ints(em.dims(x, axes if axes is not None else range(rank(x, node))))
    return _first(node, em.CenterCropPad(dy[0], target, axes=axes))


# ---------------------------------------------------------------------------------------- gathering
_ONE_HOT_NOTE = (
    "repeated indices accumulate: ScatterND/ScatterElements with reduction='add' from opset 16; before, "
    "a one-hot product (exact, but memory O(number of indices x axis length))"
)


@register("Gather", notes=_ONE_HOT_NOTE)
def gather(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = zeros_like(x) with dy added at the gathered indices along axis (repeats accumulate)"""
    x, idx = node.inputs
    g = dy[0]
    assert x is not None and idx is not None and g is not None
    r, q, a = rank(x, node), rank(idx, node), _axis(node, x)
    others = [i for i in range(r) if i != a]
    if a:  # indices' axes first, then x's other axes
        g = em.Transpose(g, perm=[*range(a, a + q), *range(a), *range(a + q, r + q - 1)])
    m, rest = em.dim(x, a), em.dims(x, others)
    flat = em.Reshape(g, em.cat_ints([-1], rest))
    out = em.scatter_add_rows(flat, em.Reshape(em.wrap_indices(idx, m), em.ints([-1])), m, rest)
    return [out if not a else em.Transpose(out, perm=[*range(1, a + 1), 0, *range(a + 1, r)]), None]


@register("GatherElements", since=11, notes=_ONE_HOT_NOTE)
def gather_elements(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = zeros_like(x) with dy added at the gathered positions (repeats accumulate)"""
    x, idx = node.inputs
    assert x is not None and idx is not None and dy[0] is not None
    a = _axis(node, x)
    return [em.scatter_add(x, em.wrap_indices(idx, em.dim(x, a)), dy[0], a), None]


@register("GatherND", since=11, notes=_ONE_HOT_NOTE)
def gather_nd(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = zeros_like(x) with dy added at the gathered slices (repeats accumulate)"""
    x, idx = node.inputs
    assert x is not None and idx is not None and dy[0] is not None
    b, r, q = int(attr(node, "batch_dims", 0)), rank(x, node), rank(idx, node)
    k = idx.shape[-1] if idx.shape is not None else None
    if not isinstance(k, int):
        raise ValueError(f"GatherND '{node.name}': the gradient needs the static last dimension of the indices")
    lin = _linear_index(em, x, idx, b, k)
    if b:  # each batch element owns a block of prod(x.shape[b:b+k]) rows
        batch = [em.dim(x, i) for i in range(b)]
        shape = em.cat_ints(em.dims(x, range(b)), [1] * (q - 1 - b))
        block = _prod(em, [em.dim(x, i) for i in range(b, b + k)])
        lin = em.Add(em.Mul(em.Reshape(em.arange(_prod(em, batch)), shape), _scalar(em, block)), lin)
    rest = em.dims(x, range(b + k, r))
    flat = em.Reshape(dy[0], em.cat_ints([-1], rest))
    m = _prod(em, [em.dim(x, i) for i in range(b + k)])
    out = em.scatter_add_rows(flat, em.Reshape(lin, em.ints([-1])), m, rest)
    return [em.reshape_like(out, x), None]


def _linear_index(em: Emitter, x: ir.Value, idx: ir.Value, b: int, k: int) -> ir.Value:
    """Row-major position of each index tuple within x.shape[b:b+k] (Horner's rule)."""
    lin: ir.Value | None = None
    for j in range(k):
        d = em.dim(x, b + j)
        col = em.wrap_indices(em.Gather(_as_int64(em, idx), _scalar(em, j), axis=-1), d)
        lin = col if lin is None else em.Add(em.Mul(lin, _scalar(em, d)), col)
    assert lin is not None
    return lin


@register("TopK")
def topk(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = zeros_like(x) with dValues at Indices (the Indices output has no gradient)"""
    x, g = node.inputs[0], dy[0]
    assert x is not None
    if g is None:
        return _first(node, None)
    return _first(node, em.scatter_add(x, node.outputs[1], g, _axis(node, x, -1), unique=True))


# --------------------------------------------------------------------------------------- scattering
ScatterFn = Callable[[ir.Value, ir.Value, "str | None"], ir.Value]

_SCATTER_NOTES = (
    "reduction none: with repeated indices every update gets the gradient, although only one of them lands; "
    "mul: dupdates = gather(dy * y) / updates (inf/NaN where an update is 0); "
    "max/min: every element equal to the result gets the full gradient (ties are counted more than once)"
)


def _scatter_grads(
    em: Emitter, node: ir.Node, g: ir.Value, scatter: ScatterFn, gather: Callable[[ir.Value], ir.Value]
) -> Out:
    """[ddata, None, dupdates] of a scatter op, from scatter(data, updates, reduction) and gather(t)."""
    x, _, u = node.inputs[:3]
    y = node.outputs[0]
    assert x is not None and u is not None
    reduction = attr(node, "reduction", "none")
    if reduction == "none":
        return [scatter(g, em.zeros_like(u), None), None, gather(g)]
    if reduction == "add":
        return [g, None, gather(g)]
    if reduction == "mul":
        dx = em.Mul(g, scatter(em.ones_like(x), u, "mul"))
        return [dx, None, em.Div(gather(em.Mul(g, y)), u)]
    # max / min: the gradient flows to whichever inputs equal the result
    dx = em.Mul(g, em.indicator(em.Equal(x, y), g))
    return [dx, None, em.Mul(gather(g), em.indicator(em.Equal(u, gather(y)), g))]


@register("ScatterElements", since=11, notes=_SCATTER_NOTES)
def scatter_elements(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """none: dx = dy with scattered positions zeroed, du = GatherElements(dy); add/mul/max/min in notes"""
    assert node.inputs[0] is not None and dy[0] is not None
    idx, a = node.inputs[1], _axis(node, node.inputs[0])
    return _scatter_grads(
        em, node, dy[0],
        lambda d, u, red: em.ScatterElements(d, idx, u, axis=a, reduction=red),
        lambda t: em.GatherElements(t, idx, axis=a),
    )


@register("ScatterND", since=11, notes=_SCATTER_NOTES)
def scatter_nd(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """none: dx = dy with scattered slices zeroed, du = GatherND(dy); add/mul/max/min in notes"""
    assert dy[0] is not None
    idx = node.inputs[1]
    return _scatter_grads(
        em, node, dy[0], lambda d, u, red: em.ScatterND(d, idx, u, reduction=red), lambda t: em.GatherND(t, idx)
    )


@register("Scatter", since=9, notes="deprecated at opset 11; repeated indices as for ScatterElements")
def scatter(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy with scattered positions zeroed, du = dy at the scattered positions"""
    x, idx = node.inputs[0], node.inputs[1]
    assert x is not None and idx is not None and dy[0] is not None
    a = _axis(node, x)
    return _scatter_grads(
        em, node, dy[0],
        lambda d, u, red: em.scatter_elements(d, idx, u, a),
        lambda t: em.gather_elements(t, idx, a),
    )


@register("TensorScatter", since=24)
def tensor_scatter(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dpast = dy with the written window zeroed, dupdate = dy read at the written window"""
    past, upd = node.inputs[0], node.inputs[1]
    w = node.inputs[2] if len(node.inputs) > 2 else None
    g = dy[0]
    assert past is not None and upd is not None and g is not None
    r = rank(past, node)
    a = int(attr(node, "axis", -2)) % r
    mode = attr(node, "mode", "linear")
    dpast = em.TensorScatter(g, em.zeros_like(upd), w, axis=a, mode=mode)
    pos = em.Reshape(em.arange(em.dim(upd, a)), em.ints([1] * a + [-1] + [1] * (r - a - 1)))
    if w is not None:
        pos = em.Add(pos, em.Reshape(w, em.ints([-1] + [1] * (r - 1))))
    if mode == "circular":
        pos = em.Mod(pos, _scalar(em, em.dim(past, a)))
    return [dpast, em.GatherElements(g, em.Expand(pos, em.shape_of(upd)), axis=a), None][: len(node.inputs)]


# -------------------------------------------------------------------------------- broadcast, tile, pad
@register("Expand", since=8, broadcast=(0,))
def expand(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy summed over the broadcast axes (the walk's unbroadcast)"""
    return _first(node, dy[0])


@register("Tile", since=6)
def tile(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = sum over the tiles: reshape dy to (r0, d0, r1, d1, ...) and sum the r axes"""
    x, reps = node.inputs
    assert x is not None and reps is not None and dy[0] is not None
    r = rank(x, node)
    rv, dims = _ints_of(em, reps), static_dims(x)
    if rv is not None and dims is not None:
        target = em.ints([v for pair in zip(rv, dims, strict=True) for v in pair])
    else:
        pairs = em.Concat(em.unsqueeze(reps, [1]), em.unsqueeze(em.shape_of(x), [1]), axis=1)
        target = em.Reshape(pairs, em.ints([-1]))
    return _first(node, em.reduce_sum(em.Reshape(dy[0], target), list(range(0, 2 * r, 2)), keepdims=False))


_NP_PAD_MODES = {"reflect": "reflect", "edge": "edge", "wrap": "wrap"}


def _pad_axis_adjoint(em: Emitter, g: ir.Value, a: int, r: int, n: int, b: int, e: int, mode: str) -> ir.Value:
    """The adjoint of padding axis a (length n) by (b, e) in ``mode``: the kept window goes back in place,
    each border element is added to the element it copied (one small one-hot MatMul)."""
    cut_b, cut_e, pad_b, pad_e = max(-b, 0), max(-e, 0), max(b, 0), max(e, 0)
    kept = n - cut_b - cut_e
    source = np.pad(np.arange(kept), (pad_b, pad_e), mode=_NP_PAD_MODES[mode]) + cut_b  # type: ignore[call-overload]
    core = g if not (pad_b or pad_e) else em.slice(g, [pad_b], [pad_b + kept], [a])
    back = [0] * (2 * r)
    back[a], back[a + r] = cut_b, cut_e
    out = em.pad(core, back)
    border = [i for i in range(len(source)) if not pad_b <= i < pad_b + kept]
    if not border:
        return out
    hot = np.zeros((len(border), n))
    hot[np.arange(len(border)), source[border]] = 1.0
    perm = swap_with_last(r, a)
    taken = em.Gather(g, em.ints(border), axis=a)
    folded = em.MatMul(taken if a == r - 1 else em.Transpose(taken, perm=perm), em.const(hot, like=g))
    return em.Add(out, folded if a == r - 1 else em.Transpose(folded, perm=perm))


def _pad_grad(em: Emitter, node: ir.Node, g: ir.Value, pads: Sequence[int], mode: str) -> ir.Value:
    """dx for a Pad with static ``pads`` (all begins, then all ends)."""
    if mode == "constant":
        return em.pad(g, [-p for p in pads])
    x = node.inputs[0]
    assert x is not None
    r = rank(x, node)
    for a in range(r):
        b, e = pads[a], pads[a + r]
        if not (b or e):
            continue
        n = x.shape[a] if x.shape is not None else None
        if isinstance(n, int):
            g = _pad_axis_adjoint(em, g, a, r, n, b, e, mode)
            continue
        cut = [0] * (2 * r)  # run-time length: crop first (the adjoint pads back), then fold the border
        cut[a], cut[a + r] = max(-b, 0), max(-e, 0)
        if b > 0 or e > 0:
            kept = em.Sub(em.dim(x, a), em.const(np.array(cut[a] + cut[a + r]), dtype=_INT64))
            fold = _unwrap if mode == "wrap" else functools.partial(_fold_border, mode=mode)
            g = fold(em, g, a, r, kept, max(b, 0), max(e, 0))
        g = em.pad(g, cut)
    return g


def _fold_border(em: Emitter, g: ir.Value, a: int, r: int, n: ir.Value, b: int, e: int, mode: str) -> ir.Value:
    """The adjoint of edge/reflect padding axis a, of run-time length n (0-D int64), by (b, e) >= 0: dy's middle,
    plus each border element added onto the element it copied (a one-hot (b + e) x n MatMul built at run time,
    as ``_pad_axis_adjoint`` builds it from constants). Edge copies x[0] and x[n - 1], reflect x[b - i] (i < b)
    and x[n - 2 - i] (i < e)."""
    core = em.slice(g, [b], [-e if e else INT64_MAX], [a])
    head = [0] * b if mode == "edge" else list(range(b, 0, -1))
    back = [1] * e if mode == "edge" else list(range(2, e + 2))  # source n - back[i] for the i-th element after x
    sources = [em.ints(head)] if b else []
    if e:
        sources.append(em.Sub(em.Reshape(n, em.ints([1])), em.ints(back)))
    source = sources[0] if len(sources) == 1 else em.Concat(*sources, axis=0)
    hot = em.indicator(em.Equal(em.unsqueeze(source, [1]), em.unsqueeze(arange_of_size(em, n), [0])), g)
    pieces = ([em.slice(g, [0], [b], [a])] if b else []) + ([em.slice(g, [-e], [INT64_MAX], [a])] if e else [])
    taken = pieces[0] if len(pieces) == 1 else em.Concat(*pieces, axis=a)
    perm = swap_with_last(r, a)
    folded = em.MatMul(taken if a == r - 1 else em.Transpose(taken, perm=perm), hot)
    return em.Add(core, folded if a == r - 1 else em.Transpose(folded, perm=perm))


def _unwrap(em: Emitter, g: ir.Value, a: int, r: int, n: ir.Value, b: int, e: int) -> ir.Value:
    """The adjoint of wrap-padding an axis of run-time length n (0-D int64) by (b, e) >= 0: padded element i is
    x[(i - b) mod n], so dy zero-padded to start at a multiple of n and end on a whole period, summed over periods."""
    side = em.Reshape(n, em.ints([1]))
    front = em.Mod(em.Sub(side, em.Mod(em.ints([b]), side)), side)
    total = em.Add(front, em.Add(side, em.ints([b + e])))
    back = em.Mod(em.Sub(side, em.Mod(total, side)), side)
    padded = em.Pad(g, em.cat_ints([0] * a, front, [0] * (r - 1), back, [0] * (r - a - 1)))
    periods = em.Reshape(padded, em.cat_ints([0] * a, [-1], side, em.dims(g, range(a + 1, r))))
    return em.reduce_sum(periods, [a], keepdims=False)


def _pad_runtime(em: Emitter, node: ir.Node, g: ir.Value, mode: str) -> ir.Value:
    """dx for an edge/reflect/wrap Pad whose pads (or axes) are known only at run time: the same Pad applied to
    each element's flat position says where each element of dY was copied from; dY is added back there."""
    x, pads_v, _, axes_v = [*node.inputs, None, None][:4]
    assert x is not None and pads_v is not None
    if em.can_scatter("add"):
        source = em.Pad(_positions(em, x), pads_v, None, axes_v, mode=mode)
        flat = em.ints([-1])
        summed = em.ScatterElements(em.zeros(em.Reshape(em.Size(x), flat), like=g), em.Reshape(source, flat),
                                    em.Reshape(g, flat), axis=0, reduction="add")
        return em.reshape_like(summed, x)
    if axes_v is not None:  # (Pad takes axes from opset 18, ScatterElements adds from 16: not reached)
        raise ValueError(f"Pad '{node.name}': mode '{mode}' with run-time axes needs ScatterElements' add")
    r = rank(x, node)
    for a in range(r):  # each axis: contract with Pad(I_n) along its second axis, the 0/1 map of padded -> source
        pads = em.cat_ints([0], em.slice(pads_v, [a], [a + 1], [0]), [0], em.slice(pads_v, [a + r], [a + r + 1], [0]))
        hot = em.Pad(eye_of_size(em, em.dim(x, a), g), pads, mode=mode)
        g = contract_axis(em, g, hot, a, r)
    return g


_PAD_NOTES = (
    "edge/reflect/wrap with pads (and axes) the graph fixes: the border folded back, at any length of the padded "
    "axes; with pads known only at run time: dY scattered back by source position (opset 16+), before that one "
    "0/1 matrix per axis (memory O(n^2), time O(n) per element)"
)


@register("Pad", since=2, notes="edge/reflect: the border folded back onto what it copied, at any length of the axes")
def pad_v2(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """constant: dx = Pad(dy, -pads); edge/reflect: the border folded back onto what it copied"""
    assert dy[0] is not None
    return [_pad_grad(em, node, dy[0], attr(node, "pads"), attr(node, "mode", "constant"))]


@register("Pad", since=11, notes=_PAD_NOTES)
def pad_v11(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx as for Pad-2; dconstant_value = sum(dy) - sum(dx)"""
    x, pads_v, cval, axes_v = [*node.inputs, None, None][:4]
    g = dy[0]
    assert x is not None and pads_v is not None and g is not None
    mode = attr(node, "mode", "constant")
    pads, axes = _ints_of(em, pads_v), _ints_of(em, axes_v) if axes_v is not None else None
    if pads is not None and axes_v is not None and axes is not None:
        r = rank(x, node)
        full = [0] * (2 * r)
        for i, ax in enumerate(axes):
            full[ax % r], full[ax % r + r] = pads[i], pads[i + len(axes)]
        pads = full
    if pads is None or (axes_v is not None and axes is None):
        dx = em.Pad(g, em.Neg(pads_v), None, axes_v) if mode == "constant" else _pad_runtime(em, node, g, mode)
    else:
        dx = _pad_grad(em, node, g, pads, mode)
    dc = None
    if cval is not None and mode == "constant":
        dc = em.reshape_like(em.Sub(em.reduce_sum(g, None, False), em.reduce_sum(dx, None, False)), cval)
    return [dx, None, dc, None][: len(node.inputs)]
