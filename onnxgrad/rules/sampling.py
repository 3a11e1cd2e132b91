"""Resampling, ROI pooling and unpooling: Resize, Upsample, GridSample, AffineGrid, RoiAlign, MaxRoiPool, MaxUnpool.

Geometry given as data (Resize's roi, scales and sizes, RoiAlign's and MaxRoiPool's rois) gets no gradient,
as in TensorFlow and PyTorch; GridSample's grid (linear and cubic modes) and AffineGrid's theta do.
Every rule follows onnxruntime's CPU kernels where the ONNX text leaves details open (GridSample pads
pixel indices, not coordinates; MaxRoiPool rounds half away from zero; RoiAlign's max mode takes the
largest weighted corner).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import (
    Emitter,
    arange_of_size,
    attr,
    contract_axis,
    eye_of_size,
    rank,
    same_dim,
    static_dims,
    static_value,
)
from onnxgrad.registry import UNDEFINED, Undefined, register

Grads = Sequence[ir.Value | None]
Out = list[ir.Value | None]
Grad = ir.Value | Undefined | None
F32 = ir.DataType.FLOAT
I64 = ir.DataType.INT64


# ------------------------------------------------------------------ helpers
def _fdim(em: Emitter, n: int | ir.Value, like: ir.Value) -> ir.Value:
    """A size as a scalar in like's dtype."""
    if isinstance(n, int):
        return em.const(float(n), like=like)
    assert like.dtype is not None
    return em.Cast(n, to=like.dtype)


def _entry(em: Emitter, v: ir.Value, i: int, dtype: ir.DataType) -> tuple[float | None, ir.Value]:
    """Element i of a 1-D input: (its value when constant, a 1-element tensor of it)."""
    found = static_value(em, v)
    if found is not None:
        value = float(np.asarray(found).reshape(-1)[i])
        return value, em.const(np.array([value]), dtype=dtype)
    return None, em.slice(v, [i], [i + 1], [0])


def _given(em: Emitter, v: ir.Value | None) -> bool:
    """An optional input that is present and not an empty constant."""
    if v is None:
        return False
    found = em.constant_value(v)
    return found is None or found.size > 0


def _eye(em: Emitter, node: ir.Node, x: ir.Value, axis: int) -> ir.Value:
    """An identity matrix as large as x along ``axis``."""
    return eye_of_size(em, em.dim(x, axis), like=x)


def _contract(em: Emitter, g: ir.Value, m: ir.Value, axis: int, rank: int) -> ir.Value:
    """Contract g's ``axis`` (length out) with m (in x out): the result has length in along ``axis``."""
    return contract_axis(em, g, m, axis, rank)


MatrixFn = Callable[[int, ir.Value], ir.Value]


def _separable_grad(em: Emitter, node: ir.Node, dy: ir.Value, axes: Sequence[int], matrix: MatrixFn) -> ir.Value:
    """dx = dy with every resized axis k contracted with M_k, where M_k[j, o] = d y_o / d x_j along k.

    The resampling ops here are separable (a tensor product of one 1-D map per axis), so M_k is the op
    itself applied to an identity matrix along one axis: built at run time, it matches the runtime's
    own coordinate conventions exactly."""
    x = node.inputs[0]
    assert x is not None
    r = rank(x, node)
    g = dy
    for k in axes:
        g = _contract(em, g, matrix(k, _eye(em, node, x, k)), k, r)
    return g


def _x_only(node: ir.Node, dx: ir.Value) -> Out:
    """A gradient for input 0 and none for the other inputs."""
    return [dx] + [None] * (len(node.inputs) - 1)


def _not_one(values: Sequence[float | None]) -> list[int]:
    """The axes whose scale is not the constant 1 (a scale of 1 leaves its axis as it is)."""
    return [k for k, v in enumerate(values) if v != 1.0]


# --------------------------------------------------------------- Upsample
@register("Upsample", since=7, notes="gradient w.r.t. X; static or run-time sizes alike")
def upsample_7(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dX = dY contracted along each resized axis with that axis's interpolation matrix"""
    scales = [float(s) for s in attr(node, "scales")]
    mode = attr(node, "mode", "nearest")

    def matrix(k: int, e: ir.Value) -> ir.Value:
        return em.Upsample(e, mode=mode, scales=[1.0, scales[k]])

    assert dy[0] is not None
    return [_separable_grad(em, node, dy[0], [k for k, s in enumerate(scales) if s != 1.0], matrix)]


@register("Upsample", since=9, notes="gradient w.r.t. X only; scales get none")
def upsample_9(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dX = dY contracted along each resized axis with that axis's interpolation matrix"""
    return [_scales_form(em, node, dy, "Upsample"), None]


@register("Resize", since=10, notes="gradient w.r.t. X only; scales get none")
def resize_10(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dX = dY contracted along each resized axis with that axis's interpolation matrix"""
    return [_scales_form(em, node, dy, "Resize"), None]


def _scales_form(em: Emitter, node: ir.Node, dy: Grads, op: str) -> ir.Value:
    """Upsample-9 and Resize-10: (X, scales), attribute ``mode``."""
    x, scales = node.inputs[0], node.inputs[1]
    assert x is not None and scales is not None and dy[0] is not None
    mode = attr(node, "mode", "nearest")
    entries = [_entry(em, scales, k, F32) for k in range(rank(x, node))]

    def matrix(k: int, e: ir.Value) -> ir.Value:
        return em.op(op, e, em.Concat(em.const(np.ones(1), dtype=F32), entries[k][1], axis=0), mode=mode)

    return _separable_grad(em, node, dy[0], _not_one([v for v, _ in entries]), matrix)


_RESIZE_ATTRS = ("mode", "coordinate_transformation_mode", "cubic_coeff_a", "exclude_outside", "nearest_mode",
                 "antialias")
_RESIZE_NOTES = ("gradient w.r.t. X, and w.r.t. a run-time roi under tf_crop_and_resize (linear: the samples move "
                 "with the box; nearest: zero; cubic: undefined); scales and sizes get none; each resized axis "
                 "contracts with its interpolation matrix, the op applied to an identity at run time (memory "
                 "O(in x out) per axis)")
_ASPECT_NOTES = ("; keep_aspect_ratio_policy other than 'stretch' with run-time sizes or lengths: each axis's map "
                 "comes from a Resize of an (n, 1, n, n_j) block (memory O(n^2 n_j))")


@register("Resize", since=11, notes=_RESIZE_NOTES)
@register("Resize", since=13, notes=_RESIZE_NOTES)
@register("Resize", since=18, notes=_RESIZE_NOTES + _ASPECT_NOTES)
@register("Resize", since=19, notes=_RESIZE_NOTES + _ASPECT_NOTES)
def resize(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dX = dY contracted along each resized axis with that axis's interpolation matrix"""
    x, _, scales, sizes = [*node.inputs, None, None, None][:4]
    assert x is not None and dy[0] is not None
    r = rank(x, node)
    axes = [a % r for a in attr(node, "axes", range(r))]
    attrs = {a: attr(node, a) for a in _RESIZE_ATTRS if attr(node, a) is not None}
    crop = attrs.get("coordinate_transformation_mode") == "tf_crop_and_resize"
    if crop:
        attrs["extrapolation_value"] = 0.0  # outside the crop the output is a constant: no gradient
    use_sizes = _given(em, sizes)
    if use_sizes and attr(node, "keep_aspect_ratio_policy", "stretch") != "stretch":
        return _x_only(node, _resize_keep_aspect(em, node, dy[0], axes, attrs))
    params = sizes if use_sizes else scales
    assert params is not None
    empty = em.const(np.zeros(0), dtype=F32)

    resized: list[int] = []
    per_axis: dict[int, tuple[ir.Value, ir.Value]] = {}
    for i, k in enumerate(axes):
        value, entry = _entry(em, params, i, I64 if use_sizes else F32)
        box, whole = _crop_box(em, node, i, len(axes)) if crop else (empty, True)
        same = value == 1.0 if not use_sizes else value == em.dim(x, k) or (value is None and _kept(node, k, i))
        if same and whole:
            continue
        resized.append(k)
        if use_sizes:
            n = em.dim(x, k)
            lead = em.ints([n]) if isinstance(n, int) else em.Reshape(n, em.ints([1]))
            per_axis[k] = (box, em.Concat(lead, entry, axis=0))
        else:
            per_axis[k] = (box, em.Concat(em.const(np.ones(1), dtype=F32), entry, axis=0))

    def matrix(k: int, e: ir.Value) -> ir.Value:
        box, p = per_axis[k]
        return em.Resize(e, box, empty, p, **attrs) if use_sizes else em.Resize(e, box, p, **attrs)

    dx = _separable_grad(em, node, dy[0], resized, matrix)
    roi = node.inputs[1]
    if not crop or roi is None or em.constant_value(roi) is not None:
        return _x_only(node, dx)
    droi = _crop_roi_grad(em, node, dy[0], axes, resized, matrix)
    return [dx, droi, *([None] * (len(node.inputs) - 2))]  # type: ignore[list-item]


def _tent_slope(em: Emitter, offset: ir.Value) -> ir.Value:
    """d/d pos of the linear weight max(0, 1 - |i - pos|) of pixel i, given offset = i - pos: sign(offset) within 1
    of the pixel, 0 beyond (and at the pixel itself, a kink)."""
    return em.Mul(em.sign(offset), em.indicator(em.Less(em.Abs(offset), em.const(1.0, like=offset)), offset))


def _crop_roi_grad(em: Emitter, node: ir.Node, g: ir.Value, axes: Sequence[int], resized: Sequence[int],
                   matrix: MatrixFn) -> Grad:
    """tf_crop_and_resize's d roi. Along axis k (n long, m out) output o samples pos = (s + f_o (e - s)) (n - 1),
    f_o = o / (m - 1) (1/2 when m = 1), and 0 outside [0, n - 1]; a linear weight moves with pos by -sign(pos - i)
    within 1 of pixel i, so dL/dpos_o = sum_i slope[i, o] U[i, o], U[i, o] = sum of X[.., i, ..] times dY
    contracted along the other axes [.., o, ..]; ds = sum_o dL/dpos_o (1 - f_o) (n - 1), de = ... f_o (n - 1)."""
    x, roi = node.inputs[0], node.inputs[1]
    assert x is not None and roi is not None
    mode = attr(node, "mode", "nearest")
    if mode == "nearest":  # piecewise constant in the roi
        return em.zeros_like(roi)
    if mode != "linear" or attr(node, "antialias", 0):
        return UNDEFINED
    r, dtype = rank(x, node), x.dtype
    zero = em.const(np.zeros(1), like=x)
    one, half = em.const(1.0, like=x), em.const(0.5, like=x)
    starts, ends = [zero] * len(axes), [zero] * len(axes)
    for i, k in enumerate(axes):
        if k not in resized:
            continue
        t = g
        for j in resized:
            if j != k:
                t = _contract(em, t, matrix(j, _eye(em, node, x, j)), j, r)
        perm = [a for a in range(r) if a != k] + [k]
        n, m = em.dim(x, k), em.dim(g, k)
        rows = em.Reshape(em.Transpose(x, perm=perm), em.cat_ints([-1], _int(em, n, 1)))  # (R, n)
        cols = em.Reshape(em.Transpose(t, perm=perm), em.cat_ints([-1], _int(em, m, 1)))  # (R, m)
        u = em.MatMul(em.Transpose(rows, perm=[1, 0]), cols)  # (n, m)
        start, end = (_entry(em, roi, c, roi.dtype or F32)[1] for c in (i, i + len(axes)))
        if roi.dtype != dtype:
            start, end = em.Cast(start, to=dtype), em.Cast(end, to=dtype)
        last = em.Sub(_fdim(em, n, x), one)
        steps = em.Sub(_fdim(em, m, x), one)
        frac = em.where(em.Equal(steps, em.const(0.0, like=x)), half,
                        em.Div(_positions(em, m, x, [1, -1]), em.Max(steps, one)))  # (1, m)
        pos = em.Mul(em.Add(start, em.Mul(frac, em.Sub(end, start))), last)
        inside = em.And(em.Not(em.Less(pos, em.const(0.0, like=x))), em.Not(em.Greater(pos, last)))
        slope = em.Mul(_tent_slope(em, em.Sub(_positions(em, n, x, [-1, 1]), pos)), em.indicator(inside, x))  # (n, m)
        d_pos = em.Mul(em.reduce_sum(em.Mul(slope, u), [0], keepdims=True), last)  # (1, m)
        ends[i] = em.reduce_sum(em.Mul(d_pos, frac), [1], keepdims=False)
        starts[i] = em.Sub(em.reduce_sum(d_pos, [1], keepdims=False), ends[i])
    out = em.Concat(*starts, *ends, axis=0)
    return out if roi.dtype == dtype else em.Cast(out, to=roi.dtype)


def _kept(node: ir.Node, k: int, i: int) -> bool:
    """Whether the node's output is known to be as long as its input along axis k (sizes known at run time only):
    entry i of sizes is read from Shape(X), as in PyTorch's ``size=`` exports, or shape inference says so."""
    x, y = node.inputs[0], node.outputs[0]
    sources = _dim_sources(node.inputs[3])
    if sources is not None and len(sources) > i and sources[i] == (id(x), k):
        return True
    return x is not None and x.shape is not None and y.shape is not None and same_dim(x.shape[k], y.shape[k])


def _dim_sources(v: ir.Value | None, depth: int = 8) -> list[tuple[int, int] | None] | None:
    """Per entry of a 1-D int64 value: (id(u), k) where it is u's run-time length along axis k, read through
    Shape, Cast, Concat and Gather or Slice by constants; None for an entry of another origin; None for all of it
    when its length is unknown."""
    if v is None:
        return None
    node = v.producer()
    n = v.shape[0] if v.shape is not None and v.shape.rank() == 1 else None
    unknown = [None] * n if isinstance(n, int) else None
    if node is None or depth == 0 or node.domain not in ("", "ai.onnx") or not node.inputs:
        return unknown  # a graph input, a Constant (no inputs: PyTorch's sizes of Concat(Shape, Constant))
    x = node.inputs[0]
    if node.op_type == "Shape" and x is not None and x.shape is not None:
        return [(id(x), k) for k in range(len(x.shape))[attr(node, "start", 0):attr(node, "end", None)]]
    if node.op_type == "Cast":
        return _dim_sources(x, depth - 1)
    if node.op_type == "Concat":
        parts = [_dim_sources(p, depth - 1) for p in node.inputs]
        return None if any(p is None for p in parts) else [e for p in parts for e in p]  # type: ignore[union-attr]
    data = _dim_sources(x, depth - 1) if node.op_type in ("Gather", "Slice") else None
    consts = [Emitter.constant_value(b) for b in node.inputs[1:]]
    if data is None or not consts or any(c is None for c in consts):
        return unknown
    picks = [int(c) for c in np.asarray(consts[0]).reshape(-1)]
    if node.op_type == "Gather" and attr(node, "axis", 0) == 0 and all(-len(data) <= j < len(data) for j in picks):
        return [data[j] for j in picks]
    rest = [int(np.asarray(c).reshape(-1)[0]) for c in consts[1:]]  # ends, then axes and steps when given
    if node.op_type == "Slice" and rest and rest[1:] in ([], [0], [0, 1]):
        return data[picks[0]:rest[0]]
    return unknown


def _crop_box(em: Emitter, node: ir.Node, i: int, n: int, lead: bool = True) -> tuple[ir.Value, bool]:
    """The roi of a 2-axis Resize that crops its second axis like axis i of the node (its first axis
    whole; with ``lead=False`` the order is swapped), and whether axis i's own crop is the whole [0, 1]."""
    roi = node.inputs[1]
    if roi is None:
        raise ValueError(f"Resize '{node.name}': coordinate_transformation_mode='tf_crop_and_resize' needs roi")
    dtype = roi.dtype or F32
    r0, start = _entry(em, roi, i, dtype)
    r1, end = _entry(em, roi, i + n, dtype)
    zero, one = em.const(np.zeros(1), dtype=dtype), em.const(np.ones(1), dtype=dtype)
    parts = (zero, start, one, end) if lead else (start, zero, end, one)
    return em.Concat(*parts, axis=0), (r0, r1) == (0.0, 1.0)


def _resize_keep_aspect(
    em: Emitter, node: ir.Node, dy: ir.Value, axes: Sequence[int], attrs: dict[str, object]
) -> ir.Value:
    """Resize with sizes and keep_aspect_ratio_policy: every axis in ``axes`` uses one common scale
    s = min (or max) of sizes_i / in_i and gets round(s * in_k) outputs. Axis k's matrix comes from a
    Resize of shape (in_k, 1, in_k, in_j), constant along the last axis, where j is the axis that sets s:
    the policy then picks the same s, and one slice along the last axis is axis k's 1-D map."""
    x, sizes = node.inputs[0], node.inputs[3]
    assert x is not None and sizes is not None
    policy = attr(node, "keep_aspect_ratio_policy")
    found = static_value(em, sizes)
    known = {k: em.dim(x, k) for k in axes}
    dims = {k: d for k, d in known.items() if isinstance(d, int)}
    if found is None or len(dims) < len(axes):
        return _resize_keep_aspect_runtime(em, node, dy, axes, attrs)
    want = [int(v) for v in np.asarray(found).reshape(-1)]
    ratios = [np.float32(w) / np.float32(dims[k]) for w, k in zip(want, axes, strict=True)]
    j = int(np.argmin(ratios) if policy == "not_larger" else np.argmax(ratios))
    crop = "extrapolation_value" in attrs
    empty = em.const(np.zeros(0), dtype=F32)

    def matrix(k: int, e: ir.Value) -> ir.Value:
        i, n = list(axes).index(k), dims[k]
        box = _crop_box(em, node, i, len(axes), lead=i == j)[0] if crop else empty
        if i == j:
            return em.Resize(e, box, empty, em.ints([n, want[i]]), **attrs)
        block = em.Expand(em.Reshape(e, em.ints([n, 1, n, 1])), em.ints([n, 1, n, dims[axes[j]]]))
        out = em.Resize(block, box, empty, em.ints([want[i], want[j]]), axes=[2, 3],
                        keep_aspect_ratio_policy=policy, **attrs)
        return em.Reshape(em.slice(out, [0], [1], [3]), em.ints([n, -1]))

    return _separable_grad(em, node, dy, [] if ratios[j] == 1.0 else list(axes), matrix)


def _resize_keep_aspect_runtime(
    em: Emitter, node: ir.Node, dy: ir.Value, axes: Sequence[int], attrs: dict[str, object]
) -> ir.Value:
    """``_resize_keep_aspect`` with sizes or input lengths known only at run time: the axis j that sets the
    common scale is found at run time (the arg min or max of sizes_i / in_i, in float32 as the runtime has it),
    and every axis k's matrix comes from a Resize of shape (in_k, 1, in_k, in_j) to (sizes_k, sizes_j)."""
    x, sizes = node.inputs[0], node.inputs[3]
    assert x is not None and sizes is not None
    policy = attr(node, "keep_aspect_ratio_policy")
    lengths = em.dims(x, axes)
    have = em.ints(lengths) if isinstance(lengths, list) else lengths
    want = sizes if sizes.dtype == I64 else em.Cast(sizes, to=I64)
    ratios = em.Div(em.Cast(want, to=F32), em.Cast(have, to=F32))
    j = em.op("ArgMin" if policy == "not_larger" else "ArgMax", ratios, axis=0, keepdims=1)
    last = em.Gather(want, j, axis=0), em.Gather(have, j, axis=0)  # sizes_j and in_j, each of shape (1,)
    crop = "extrapolation_value" in attrs
    empty = em.const(np.zeros(0), dtype=F32)

    def matrix(k: int, e: ir.Value) -> ir.Value:
        i = list(axes).index(k)
        box = _crop_box(em, node, i, len(axes), lead=False)[0] if crop else empty
        n = em.dim(x, k)
        side = em.ints([n]) if isinstance(n, int) else em.Reshape(n, em.ints([1]))
        block = em.Expand(em.Reshape(e, em.ints([0, 1, -1, 1])), em.Concat(side, em.ints([1]), side, last[1], axis=0))
        out = em.Resize(block, box, empty, em.Concat(em.slice(want, [i], [i + 1], [0]), last[0], axis=0),
                        axes=[2, 3], keep_aspect_ratio_policy=policy, **attrs)
        return em.Reshape(em.slice(out, [0], [1], [3]), em.ints([0, -1]))

    return _separable_grad(em, node, dy, list(axes), matrix)


# -------------------------------------------------------------- MaxUnpool
@register("MaxUnpool", since=9, notes="gradient w.r.t. X; indices and output_shape get none")
@register("MaxUnpool", since=11, notes="gradient w.r.t. X; indices and output_shape get none")
def max_unpool(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """Y.flat[I] = X: dX = dY.flat[I]"""
    assert dy[0] is not None and node.inputs[1] is not None
    return _x_only(node, em.Gather(em.Reshape(dy[0], em.ints([-1])), node.inputs[1], axis=0))


# ------------------------------------------------------------- AffineGrid
@register("AffineGrid", since=20, notes="gradient w.r.t. theta; size gets none")
def affine_grid(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """grid[n, p] = theta[n] @ (base[p], 1): dtheta[n] = sum_p dgrid[n, p] (x) (base[p], 1)"""
    theta, size = node.inputs
    g = dy[0]
    assert theta is not None and size is not None and g is not None
    d = theta.shape[1] if theta.shape is not None and isinstance(theta.shape[1], int) else None
    if d is None:
        size_dims = static_dims(size)
        if size_dims is None:
            raise ValueError(f"AffineGrid '{node.name}': the gradient needs the static shape of theta or size")
        d = size_dims[0] - 2
    unit = em.const(np.eye(d, d + 1)[None], like=theta)
    one_image = em.Concat(em.ints([1]), em.slice(size, [1], [d + 2], [0]), axis=0)
    base = em.Reshape(em.AffineGrid(unit, one_image, align_corners=attr(node, "align_corners", 0)), em.ints([1, -1, d]))
    flat = em.Reshape(g, em.ints([0, -1, d]))  # (N, points, d)
    linear = em.MatMul(em.Transpose(flat, perm=[0, 2, 1]), base)
    shift = em.unsqueeze(em.reduce_sum(flat, [1], keepdims=False), [2])
    return [em.Concat(linear, shift, axis=2), None]


# ------------------------------------------------------------- GridSample
_GRID_MODES = {"bilinear": "linear", "bicubic": "cubic"}
_CUBIC_A = -0.75  # GridSample's cubic convolution constant

Tap = tuple[ir.Value, ir.Value | None, ir.Value | None]  # (index as float, weight, d weight / d coordinate)


def _poly(em: Emitter, s: ir.Value, coeffs: Sequence[float]) -> ir.Value:
    """coeffs[0] * s^n + ... + coeffs[n] by Horner's rule."""
    acc = em.const(coeffs[0], like=s)
    for c in coeffs[1:]:
        acc = em.Add(em.Mul(acc, s), em.const(c, like=s))
    return acc


def _cubic_taps(em: Emitter, u: ir.Value) -> list[Tap]:
    """Keys' cubic convolution at floor(u) - 1 .. floor(u) + 2, with the weights' derivatives."""
    a = _CUBIC_A
    near = [a + 2, -(a + 3), 0.0, 1.0]  # |s| <= 1
    far = [a, -5 * a, 8 * a, -4 * a]  # 1 < |s| < 2
    d_near, d_far = [3 * near[0], 2 * near[1], 0.0], [3 * far[0], 2 * far[1], far[2]]
    base = em.Floor(u)
    t = em.Sub(u, base)
    one, two = em.const(1.0, like=u), em.const(2.0, like=u)
    dists = [(em.Add(t, one), far, d_far, 1.0), (t, near, d_near, 1.0), (em.Sub(one, t), near, d_near, -1.0),
             (em.Sub(two, t), far, d_far, -1.0)]
    taps: list[Tap] = []
    for i, (s, kernel, d_kernel, sign) in enumerate(dists):
        d = _poly(em, s, d_kernel)
        taps.append((em.Add(base, em.const(i - 1.0, like=u)), _poly(em, s, kernel), d if sign > 0 else em.Neg(d)))
    return taps


def _reflect(em: Emitter, i: ir.Value, lo: ir.Value, hi: ir.Value) -> ir.Value:
    """Fold an index back into [lo, hi] by repeated reflection at the borders (as GridSample pads)."""
    span = em.Sub(hi, lo)
    below, above = em.Less(i, lo), em.Greater(i, hi)
    dist = em.where(below, em.Sub(lo, i), em.Sub(i, hi))
    folds = em.Floor(em.Div(dist, span))
    rest = em.Sub(dist, em.Mul(folds, span))
    half = em.Floor(em.Div(folds, em.const(2.0, like=i)))
    even = em.Equal(em.Mul(half, em.const(2.0, like=i)), folds)
    from_lo = em.Equal(below, even)  # below with an even number of folds, or above with an odd one
    folded = em.where(from_lo, em.Add(lo, rest), em.Sub(hi, rest))
    return em.where(em.Or(below, above), folded, i)


def _pad_taps(em: Emitter, taps: list[Tap], size: ir.Value, padding: str, align: bool) -> list[Tap]:
    """Map each tap's index into the image as the padding mode does; zero padding zeroes the weights instead."""
    zero = em.const(0.0, like=size)
    last = em.Sub(size, em.const(1.0, like=size))
    out: list[Tap] = []
    for i, w, dw in taps:
        clipped = em.Max(em.Min(i, last), zero)
        if padding == "zeros":
            inside = em.indicator(em.Equal(clipped, i), size)
            w = inside if w is None else em.Mul(w, inside)
            dw = None if dw is None else em.Mul(dw, inside)
            i = clipped
        elif padding == "border":
            i = clipped
        else:
            half = em.const(0.0 if align else 0.5, like=size)
            i = em.Max(em.Min(_reflect(em, i, em.Sub(zero, half), em.Add(last, half)), last), zero)
        out.append((i, w, dw))
    return out


def _product(em: Emitter, factors: Sequence[ir.Value | None], like: ir.Value) -> ir.Value:
    """The product of the factors that are given (ones when none is)."""
    given = [f for f in factors if f is not None]
    if not given:
        return em.ones_like(like)
    acc = given[0]
    for f in given[1:]:
        acc = em.Mul(acc, f)
    return acc


@register("GridSample", since=16, notes="gradient w.r.t. X, and w.r.t. grid in bilinear/bicubic modes")
@register("GridSample", since=20, notes="gradient w.r.t. X, and w.r.t. grid in linear/cubic modes")
@register("GridSample", since=22, notes="gradient w.r.t. X, and w.r.t. grid in linear/cubic modes")
def grid_sample(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """Y[n,c,p] = sum_t w_t(u[n,p]) X[n,c,i_t]: dX[i_t] += dY w_t, du = sum_c sum_t dY X[i_t] dw_t/du"""
    x, grid = node.inputs
    g = dy[0]
    assert x is not None and grid is not None and g is not None
    mode = attr(node, "mode", "linear")
    mode = _GRID_MODES.get(mode, mode)
    padding, align = attr(node, "padding_mode", "zeros"), bool(attr(node, "align_corners", 0))
    d = rank(x, node) - 2
    flat = em.Reshape(x, em.ints([0, 0, -1]))
    points = em.Reshape(grid, em.ints([0, -1, d]))
    one, two = em.const(1.0, like=grid), em.const(2.0, like=grid)
    per_axis: list[list[Tap]] = []
    sizes: list[int | ir.Value] = []
    du_dg: list[ir.Value] = []
    for j in range(d):  # spatial axis j of X is component d - 1 - j of the grid
        n = em.dim(x, 2 + j)
        size = _fdim(em, n, grid)
        sizes.append(n)
        gj = em.Gather(points, em.const(np.array(d - 1 - j), dtype=I64), axis=2)
        if align:  # u = (g + 1) / 2 * (size - 1)
            du_dg.append(em.Div(em.Sub(size, one), two))
            u = em.Mul(em.Add(gj, one), du_dg[-1])
        else:  # u = ((g + 1) * size - 1) / 2
            du_dg.append(em.Div(size, two))
            u = em.Div(em.Sub(em.Mul(em.Add(gj, one), size), one), two)
        if mode == "nearest":
            taps: list[Tap] = [(em.Round(u), None, None)]
        elif mode == "linear":
            base = em.Floor(u)
            taps = [(base, em.Sub(em.Add(base, one), u), em.const(-1.0, like=u)),
                    (em.Add(base, one), em.Sub(u, base), one)]
        else:
            taps = _cubic_taps(em, u)
        per_axis.append(_pad_taps(em, taps, size, padding, align))

    strides: list[int | ir.Value] = [1] * d
    for j in range(d - 2, -1, -1):
        nxt, step = sizes[j + 1], strides[j + 1]
        both = isinstance(nxt, int) and isinstance(step, int)
        strides[j] = nxt * step if both else em.Mul(_int(em, nxt), _int(em, step))  # type: ignore[operator]
    index_terms, weights, d_weights = [], [], []
    for combo in itertools.product(*per_axis):
        flat_index = None
        for (i, _, _), stride in zip(combo, strides, strict=True):
            term = em.Mul(em.Cast(i, to=I64), _int(em, stride))
            flat_index = term if flat_index is None else em.Add(flat_index, term)
        index_terms.append(flat_index)
        weights.append(_product(em, [w for _, w, _ in combo], u))
        d_weights.append([_product(em, [dw if a == j else w for a, (_, w, dw) in enumerate(combo)], u)
                          for j in range(d)])
    k = len(index_terms)
    index = em.Concat(*index_terms, axis=1)
    weight = em.Concat(*weights, axis=1)
    channels = em.dim(x, 1)
    index = em.Expand(em.unsqueeze(index, [1]), em.Concat(em.ints([1]), _int(em, channels, 1), em.ints([1]), axis=0))
    dyk = em.Tile(em.Reshape(g, em.ints([0, 0, -1])), em.ints([1, 1, k]))
    dx = em.ScatterElements(em.zeros_like(flat), index, em.Mul(dyk, em.unsqueeze(weight, [1])), axis=2,
                            reduction="add")
    if mode == "nearest":
        return [em.reshape_like(dx, x), None]

    paired = em.reduce_sum(em.Mul(em.GatherElements(flat, index, axis=2), dyk), [1], keepdims=False)
    comps: list[ir.Value] = []
    for j in reversed(range(d)):  # grid component d - 1 - j
        dwj = em.Concat(*[dw[j] for dw in d_weights], axis=1)
        per_point = em.reduce_sum(em.Reshape(em.Mul(paired, dwj), em.ints([0, k, -1])), [1], keepdims=False)
        comps.append(em.unsqueeze(em.Mul(per_point, du_dg[j]), [2]))
    return [em.reshape_like(dx, x), em.reshape_like(em.Concat(*comps, axis=2), grid)]


def _int(em: Emitter, n: int | ir.Value, length: int = 0) -> ir.Value:
    """A size as an int64 scalar, or as a 1-D tensor of ``length`` 1."""
    if isinstance(n, int):
        return em.const(np.array([n] if length else n), dtype=I64)
    return em.Reshape(n, em.ints([1])) if length else n


# ------------------------------------------------------- RoiAlign, MaxRoiPool
def _column(em: Emitter, rois: ir.Value, i: int) -> ir.Value:
    """rois[:, i] as a (R, 1, 1) tensor."""
    return em.unsqueeze(em.Gather(rois, em.const(np.array(i), dtype=I64), axis=1), [1, 2])


def _positions(em: Emitter, n: int | ir.Value, like: ir.Value, shape: Sequence[int]) -> ir.Value:
    """0 .. n-1 in like's dtype, shaped ``shape`` with -1 where the n values go."""
    assert like.dtype is not None
    return em.Reshape(em.Cast(em.arange(n), to=like.dtype), em.ints(shape))


def _to_batch(em: Emitter, node: ir.Node, x: ir.Value, per_roi: ir.Value, batch: ir.Value) -> ir.Value:
    """dX[n] = sum over the rois r of image n of per_roi[r] (per_roi: (R, C, H, W), batch: (R,) int64)."""
    onehot = em.Gather(_eye(em, node, x, 0), batch, axis=0)  # (R, N)
    flat = em.Reshape(per_roi, em.ints([0, -1]))
    return em.reshape_like(em.MatMul(em.Transpose(onehot, perm=[1, 0]), flat), x)


def _gather_spots(em: Emitter, images: ir.Value, spots: ir.Value, area: int | ir.Value,
                  channels: int | ir.Value) -> ir.Value:
    """images[r, c, spots[r, m]] for images (R, C, P) and spots (R, M): (R, C, M), as a plain Gather."""
    rows = em.Reshape(em.Transpose(images, perm=[0, 2, 1]), em.Concat(em.ints([-1]), _int(em, channels, 1), axis=0))
    count = em.Gather(em.Shape(spots), em.const(np.array(0), dtype=I64))
    offsets = em.Mul(em.Reshape(em.arange(count), em.ints([-1, 1])), _int(em, area))
    return em.Transpose(em.Gather(rows, em.Add(spots, offsets), axis=0), perm=[0, 2, 1])


class _Samples:
    """RoiAlign's sample points along one spatial axis, for every roi and output bin."""

    def __init__(self, pos: ir.Value, inside: ir.Value, exists: ir.Value | None, inv_count: ir.Value,
                 size: int | ir.Value, frac: ir.Value, stretch: ir.Value | None) -> None:
        self.pos = pos  # (R, out, S): S is the largest number of samples any roi takes
        self.inside = inside  # (R, out, S) bool: the point lies in [-1, size] (else it samples zeros)
        self.exists = exists  # (R, 1, S) bool: the roi takes that many samples (None: every roi does)
        self.inv_count = inv_count  # (R, 1, 1): 1 / samples per bin
        self.size = size
        self.frac = frac  # (R, out, S): pos = start + frac * length
        self.stretch = stretch  # (R, 1, 1): d length / d (end - start), 0 where forced to 1 (None: always 1)


def _roi_align_axis(em: Emitter, node: ir.Node, x: ir.Value, rois: ir.Value, axis: int, out: int,
                    half_pixel: bool) -> _Samples:
    """Sample points along spatial axis 2 + axis (0: y from rois[:, 1::2], 1: x from rois[:, 0::2])."""
    ratio = int(attr(node, "sampling_ratio", 0))
    scale = em.const(float(attr(node, "spatial_scale", 1.0)), like=x)
    start, end = (em.Mul(_column(em, rois, c), scale) for c in ((1, 3) if axis == 0 else (0, 2)))
    if half_pixel:
        start, end = (em.Sub(v, em.const(0.5, like=x)) for v in (start, end))
    length = em.Sub(end, start)
    stretch = None
    if not half_pixel:  # malformed rois are forced to 1 x 1
        stretch = em.indicator(em.Greater(length, em.const(1.0, like=x)), x)
        length = em.Max(length, em.const(1.0, like=x))
    bins = em.const(float(out), like=x)
    step = em.Div(length, bins)
    exists = None
    if ratio > 0:
        count: ir.Value = em.const(float(ratio), like=x)
        s = em.Add(_positions(em, ratio, x, [1, 1, -1]), em.const(0.5, like=x))
    else:
        count = em.Ceil(em.Div(length, bins))
        most = em.Cast(em.reduce("ReduceMax", count, None, keepdims=False), to=I64)
        s = em.Add(_positions(em, most, x, [1, 1, -1]), em.const(0.5, like=x))
        exists = em.Less(s, count)
    pos = em.Add(em.Add(start, em.Mul(_positions(em, out, x, [1, -1, 1]), step)), em.Div(em.Mul(s, step), count))
    n = em.dim(x, 2 + axis)
    inside = em.Not(em.Or(em.Less(pos, em.const(-1.0, like=x)), em.Greater(pos, _fdim(em, n, x))))
    frac = em.Div(em.Add(_positions(em, out, x, [1, -1, 1]), em.Div(s, count)), bins)
    return _Samples(pos, inside, exists, em.Reciprocal(count), n, frac, stretch)


def _clip_to(em: Emitter, pos: ir.Value, n: int | ir.Value, like: ir.Value) -> ir.Value:
    """pos clipped into [0, n - 1] (RoiAlign's border handling)."""
    return em.Max(em.Min(pos, em.Sub(_fdim(em, n, like), em.const(1.0, like=like))), em.const(0.0, like=like))


def _roi_align(em: Emitter, node: ir.Node, dy: Grads, default_mode: str) -> Out:
    x, rois, batch = node.inputs
    g = dy[0]
    assert x is not None and rois is not None and batch is not None and g is not None
    half_pixel = attr(node, "coordinate_transformation_mode", default_mode) == "half_pixel"
    oh, ow = int(attr(node, "output_height", 1)), int(attr(node, "output_width", 1))
    axes = [_roi_align_axis(em, node, x, rois, a, o, half_pixel) for a, o in ((0, oh), (1, ow))]
    if attr(node, "mode", "avg") == "max":
        return [_to_batch(em, node, x, _roi_align_max(em, x, batch, g, axes, (oh, ow)), batch), None, None]
    mats = []
    for ax in axes:
        at = em.unsqueeze(_clip_to(em, ax.pos, ax.size, x), [3])
        tent = em.Relu(em.Sub(em.const(1.0, like=x), em.Abs(em.Sub(at, _positions(em, ax.size, x, [1, 1, 1, -1])))))
        ok = ax.inside if ax.exists is None else em.And(ax.inside, ax.exists)
        weighted = em.Mul(tent, em.unsqueeze(em.indicator(ok, x), [3]))
        mats.append(em.Mul(em.reduce_sum(weighted, [2], keepdims=False), ax.inv_count))  # (R, out, size)
    rows = em.unsqueeze(em.Transpose(mats[0], perm=[0, 2, 1]), [1])
    per_roi = em.MatMul(em.MatMul(rows, g), em.unsqueeze(mats[1], [1]))
    return [_to_batch(em, node, x, per_roi, batch), _roi_align_boxes(em, node, x, batch, g, axes, mats), None]


def _roi_align_boxes(em: Emitter, node: ir.Node, x: ir.Value, batch: ir.Value, g: ir.Value, axes: list[_Samples],
                     mats: list[ir.Value]) -> ir.Value:
    """d rois of avg mode: Y[r,c] = A_r X[b_r,c] B_r^T, so dA_r = sum_c dY[r,c] B_r X^T, dB_r = sum_c dY^T A_r X;
    each sample's tent weight moves with its position (slope -sign(pos - h) within 1 of pixel h, 0 where pos is
    clipped to the border), and pos = start + frac * (end - start) moves with the roi's two edges."""
    images = em.Gather(x, batch, axis=0)  # (R, C, H, W)
    first, second = (em.unsqueeze(m, [1]) for m in mats)  # (R, 1, OH, H), (R, 1, OW, W)
    d_first = em.MatMul(em.MatMul(g, second), em.Transpose(images, perm=[0, 1, 3, 2]))  # (R, C, OH, H)
    d_second = em.MatMul(em.Transpose(g, perm=[0, 1, 3, 2]), em.MatMul(first, images))  # (R, C, OW, W)
    one, zero = em.const(1.0, like=x), em.const(0.0, like=x)
    edges = []
    for ax, dm in zip(axes, (d_first, d_second), strict=True):
        dm = em.reduce_sum(dm, [1], keepdims=False)  # (R, out, size)
        at = _clip_to(em, ax.pos, ax.size, x)
        slope = _tent_slope(em, em.Sub(_positions(em, ax.size, x, [1, 1, 1, -1]), em.unsqueeze(at, [3])))
        free = em.And(em.Greater(ax.pos, zero), em.Less(ax.pos, em.Sub(_fdim(em, ax.size, x), one)))
        ok = em.And(em.And(ax.inside, free), ax.exists) if ax.exists is not None else em.And(ax.inside, free)
        d_pos = em.Mul(em.Mul(em.reduce_sum(em.Mul(slope, em.unsqueeze(dm, [2])), [3], keepdims=False),
                              em.indicator(ok, x)), ax.inv_count)  # (R, out, S)
        moved = ax.frac if ax.stretch is None else em.Mul(ax.frac, ax.stretch)
        d_end = em.reduce_sum(em.Mul(d_pos, moved), [1, 2], keepdims=False)
        d_start = em.Sub(em.reduce_sum(d_pos, [1, 2], keepdims=False), d_end)
        edges.append((d_start, d_end))
    scale = em.const(float(attr(node, "spatial_scale", 1.0)), like=x)
    (y1, y2), (x1, x2) = edges
    return em.Mul(em.Concat(*(em.unsqueeze(v, [1]) for v in (x1, y1, x2, y2)), axis=1), scale)


_ROI_ALIGN_NOTES = (
    "gradient w.r.t. X (avg and max modes) and, in avg mode, w.r.t. rois (each sample point moves with the box's "
    "edges; undefined where a point crosses a pixel centre or the adaptive sample count changes); batch_indices get "
    "none, nor do rois in max mode")


def _roi_align_max(em: Emitter, x: ir.Value, batch: ir.Value, g: ir.Value, axes: list[_Samples],
                   out: Sequence[int]) -> ir.Value:
    """Max mode takes, per bin, the largest w * X over every sample's four weighted corners: dY goes to the
    corner chosen (the first on ties), times its weight. Returns the per-roi gradient (R, C, H * W)."""
    corners = []  # per axis: (weights (R, out, S, 2), indices (R, out, S, 2))
    one = em.const(1.0, like=x)
    for ax in axes:
        at = _clip_to(em, ax.pos, ax.size, x)
        low = em.Floor(at)
        high = em.Min(em.Add(low, one), em.Sub(_fdim(em, ax.size, x), one))
        frac = em.Sub(at, low)
        inside = em.indicator(ax.inside, x)
        w = em.Concat(em.unsqueeze(em.Mul(em.Sub(one, frac), inside), [3]), em.unsqueeze(em.Mul(frac, inside), [3]),
                      axis=3)
        i = em.Cast(em.Concat(em.unsqueeze(low, [3]), em.unsqueeze(high, [3]), axis=3), to=I64)
        corners.append((w, i))
    (wy, iy), (wx, ix) = corners
    ys, xs = [2, 4, 6], [1, 3, 5]  # to (R, OH, OW, Sh, Sw, 2, 2)
    full = em.Mul(em.unsqueeze(wy, ys), em.unsqueeze(wx, xs))
    width = _int(em, axes[1].size)
    index = em.Add(em.Mul(em.unsqueeze(iy, ys), width), em.unsqueeze(ix, xs))
    bins = em.Concat(em.slice(em.Shape(full), [0], [3], [0]), em.ints([-1]), axis=0)
    w, index = (em.unsqueeze(em.Reshape(v, bins), [1]) for v in (full, index))  # (R, 1, OH, OW, K)
    area = em.dim(x, 2)
    area = area * axes[1].size if isinstance(area, int) and isinstance(axes[1].size, int) else em.Mul(
        _int(em, area), width)
    images = em.Reshape(em.Gather(x, batch, axis=0), em.ints([0, 0, -1]))  # (R, C, H * W)
    values = _gather_spots(em, images, em.Reshape(index, em.ints([0, -1])), area, em.dim(x, 1))
    score = em.Mul(em.Reshape(values, em.ints([0, 0, *out, -1])), w)  # (R, C, OH, OW, K)
    exists = [ax.exists for ax in axes]
    if exists[0] is not None and exists[1] is not None:
        real = em.And(em.unsqueeze(exists[0], [2, 4, 5, 6]), em.unsqueeze(exists[1], [2, 3, 5, 6]))
        hole = em.where(real, em.const(0.0, like=x), em.const(-np.inf, like=x))
        hole = em.unsqueeze(em.Reshape(em.Expand(hole, em.Shape(full)), bins), [1])
        score = em.Add(score, hole)
    pick = em.ArgMax(score, axis=4, keepdims=1)
    first = em.Equal(pick, em.Reshape(em.arange(em.Gather(em.Shape(score), em.const(np.array(4), dtype=I64))),
                                      em.ints([1, 1, 1, 1, -1])))
    chosen_w = em.reduce_sum(em.Mul(em.indicator(first, x), w), [4], keepdims=True)
    chosen = em.reduce_sum(em.Mul(em.Cast(first, to=I64), index), [4], keepdims=True)
    hit = em.indicator(em.Equal(chosen, em.Reshape(em.arange(area), em.ints([1, 1, 1, 1, -1]))), x)
    share = em.Mul(em.unsqueeze(g, [4]), chosen_w)
    return em.reduce_sum(em.Mul(hit, share), [2, 3], keepdims=False)


@register("RoiAlign", since=10, notes=_ROI_ALIGN_NOTES)
def roi_align_10(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """avg: Y[r,c] = A_r X[b_r,c] B_r^T (bilinear sample weights): dX[b_r,c] += A_r^T dY[r,c] B_r"""
    return _roi_align(em, node, dy, "output_half_pixel")


@register("RoiAlign", since=16, notes=_ROI_ALIGN_NOTES)
def roi_align_16(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """avg: Y[r,c] = A_r X[b_r,c] B_r^T (bilinear sample weights): dX[b_r,c] += A_r^T dY[r,c] B_r"""
    return _roi_align(em, node, dy, "half_pixel")


@register("MaxRoiPool", notes="gradient w.r.t. X (to every element equal to its bin's maximum); rois get none")
def max_roi_pool(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """Y[r,c,i,j] = max of X[b_r,c] over bin (i,j): dX[b_r,c,h,w] += dY[r,c,i,j] where X[b_r,c,h,w] is that max"""
    x, rois = node.inputs
    g, y = dy[0], node.outputs[0]
    assert x is not None and rois is not None and g is not None
    pooled = [int(p) for p in attr(node, "pooled_shape")]
    scale = em.const(float(attr(node, "spatial_scale", 1.0)), like=x)
    one = em.const(1.0, like=x)
    members = []
    for axis, cols, bins in ((0, (2, 4), pooled[0]), (1, (1, 3), pooled[1])):
        start, end = (_round_away(em, em.Mul(_column(em, rois, c), scale)) for c in cols)  # (R, 1, 1)
        length = em.Add(em.Relu(em.Sub(end, start)), one)  # max(end - start + 1, 1), Max broadcasts from opset 8
        step = em.Div(length, em.const(float(bins), like=x))
        index = _positions(em, bins, x, [1, -1, 1])
        lo = em.Add(em.Floor(em.Mul(index, step)), start)
        hi = em.Add(em.Ceil(em.Mul(em.Add(index, one), step)), start)
        assert x.dtype is not None  # positions along the axis (opset < 9 and a run-time size: arange_of_size)
        at = em.Reshape(em.Cast(arange_of_size(em, em.dim(x, 2 + axis)), to=x.dtype), em.ints([1, 1, -1]))
        members.append(em.And(em.Not(em.Less(at, lo)), em.Less(at, hi)))  # (R, bins, size)
    inside = em.And(em.unsqueeze(members[0], [1, 3, 5]), em.unsqueeze(members[1], [1, 2, 4]))
    batch = em.Cast(em.Gather(rois, em.const(np.array(0), dtype=I64), axis=1), to=I64)
    images = em.unsqueeze(em.Gather(x, batch, axis=0), [2, 3])  # (R, C, 1, 1, H, W)
    best = em.unsqueeze(y, [4, 5])
    hit = em.And(inside, em.Not(em.Or(em.Less(images, best), em.Greater(images, best))))
    per_roi = em.reduce_sum(em.Mul(em.indicator(hit, x), em.unsqueeze(g, [4, 5])), [2, 3], keepdims=False)
    return [_to_batch(em, node, x, per_roi, batch), None]


def _round_away(em: Emitter, v: ir.Value) -> ir.Value:
    """Round half away from zero (C's round), unlike ONNX Round's half to even."""
    return em.Mul(em.sign(v), em.Floor(em.Add(em.Abs(v), em.const(0.5, like=v))))
