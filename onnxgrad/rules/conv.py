"""Convolution and pooling: Conv, ConvTranspose, the pools, LRN, Col2Im, DeformConv.

Every op here slides a window over the spatial axes; its geometry (``Window``: sizes, pads, what a strided
window never reaches) lives in ``onnxgrad/geometry.py``. Where a gradient has several exact forms (Conv's dW
and dX, a pool's window sum, MaxPool's routing), ``onnxgrad/plans`` picks the one onnxruntime runs fastest;
a Conv followed by a per-channel factor (an inference BatchNormalization) is differentiated together with it
(``onnxgrad/plans/conv_fusions.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxgrad import plans
from onnxgrad.emitter import Emitter, arange_of_size, attr
from onnxgrad.geometry import (
    col2im_window,
    conv_transpose_window,
    conv_window,
    deform_conv_window,
    forward,
    padded,
    pool_counts,
    pool_window,
    run_time_positions,
    spatial_sizes,
    whole_windows,
    window_counts,
)
from onnxgrad.registry import register

Grads = Sequence[ir.Value | None]
Out = list[ir.Value | None]


# ------------------------------------------------------------ building blocks
def _bias_grad(em: Emitter, node: ir.Node, g: ir.Value, rank: int, index: int = 2) -> list[ir.Value | None]:
    """[db] = [sum of dY over all axes but the channels] when the node has a bias (input ``index``)."""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return []
    return [em.reduce_sum(g, [0, *range(2, rank + 2)], keepdims=False)]


def _per_channel(em: Emitter, v: ir.Value, sizes: Sequence[int | None]) -> ir.Value:
    """(N, C, *sizes) viewed as (N*C, 1, *sizes), so one-channel kernels serve every channel (a size known only
    at run time is Reshape's 0: v's own)."""
    return em.Reshape(v, em.ints([-1, 1, *(0 if s is None else s for s in sizes)]))


def _lp_factor(em: Emitter, x: ir.Value, p: float) -> ir.Value:
    """d|x|^p / dx / p = sign(x) |x|^(p-1)."""
    if p == 1:
        return em.sign(x)
    if p == 2:
        return x
    return em.Mul(x, em.Pow(em.Abs(x), em.const(p - 2.0, like=x)))


def _lp_scale(em: Emitter, g: ir.Value, y: ir.Value, p: float) -> ir.Value:
    """dy * y^(1-p), the outer factor of d(sum |x|^p)^(1/p)."""
    if p == 1:
        return g
    if p == 2:
        return em.Div(g, y)
    return em.Mul(g, em.Pow(y, em.const(1.0 - p, like=y)))


# ---------------------------------------------------------------------- convs
@register(
    "Conv",
    notes="dX = ConvTranspose(dY, W) (end pads / output_padding restore the rows a strided conv drops), or for "
    "stride 1 one Conv of dY with W flipped and its channel axes swapped; dW: for group 1 and no dilation, ONE "
    "batch-1 Conv of X with its channels interleaved into the last spatial axis and dY^T as the kernel, unless "
    "the kernel is 1x1 unstrided or W outweighs the activations: then im2col of X (one Slice per kernel tap) "
    "and ONE Gemm (under a run-time batch that decides it, an If on the batch size picks one of the two); "
    "grouped convs: one grouped Conv of X^T with dY^T; dB = sum of dY (plans: onnxgrad/plans/conv.py). "
    "Followed by an inference BatchNormalization or a per-output-channel Mul, the factor moves onto W and dW when "
    "W is no larger than the output (onnxgrad/plans/conv_fusions.py). Spatial sizes may be known only at run "
    "time: dX then takes output_padding stride - 1 and a Slice to X's size, dW crops to the kernel, auto_pad "
    "SAME with strides pads X by pads computed from Shape (opset >= 11); the weight's shape must be static.",
)
def conv(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = conv_transpose(dy, w), dw = x (*) dy, db = sum(dy)"""
    x, w, g = node.inputs[0], node.inputs[1], dy[0]
    assert x is not None and w is not None and g is not None
    win, group = conv_window(node, x, w, em), attr(node, "group", 1)
    dx = plans.conv_input_grad(em, g, w, win, group)
    return [dx, plans.conv_weight_grad(em, padded(em, x, win), g, win, group, w), *_bias_grad(em, node, g, win.rank)]


@register(
    "ConvTranspose",
    notes="dX = Conv(dY, W) with the effective pads (output_shape / SAME split as the spec and onnxruntime "
    "do: odd total padding at the end for SAME_UPPER, at the begin otherwise); dW: Conv's weight gradient with "
    "the roles of X and dY swapped (the same plans); dB = sum of dY. Spatial sizes may be known only at run "
    "time (output_shape over a run-time input size pads dY at run time, opset >= 11).",
)
def conv_transpose(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = conv(dy, w), dw = dy (*) x (the Conv weight gradient, roles swapped), db = sum(dy)"""
    x, w, g = node.inputs[0], node.inputs[1], dy[0]
    assert x is not None and w is not None and g is not None
    win, group = conv_transpose_window(node, x, w, em), attr(node, "group", 1)
    return [forward(em, g, w, win, group, like=x), plans.conv_weight_grad(em, padded(em, g, win), x, win, group, w),
            *_bias_grad(em, node, g, win.rank)]


# ---------------------------------------------------------------------- pools
@register(
    "AveragePool",
    notes="dX = ConvTranspose of dY / divisor with a ones kernel (one broadcast Mul for one window over the whole "
    "input), channels folded into the batch; the divisor per window is static: window taps inside the input "
    "(count_include_pad=0) or inside the padded input (count_include_pad=1; ceil_mode windows are clipped "
    "there, as onnxruntime does); over run-time spatial sizes, the same counts by a Conv of ones over X's shape.",
)
def average_pool(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = sum over windows holding x of dy / divisor"""
    x, g = node.inputs[0], dy[0]
    assert x is not None and g is not None
    win, end = pool_window(node, x, em)
    include, ceil = bool(attr(node, "count_include_pad", 0)), bool(attr(node, "ceil_mode", 0))
    count = pool_counts(win, end, include) if win.static else None
    g = _per_channel(em, g, win.size_out)
    if count is None and (win.static or whole_windows(win, end, ceil)):  # every window whole: one divisor
        return [em.reshape_like(plans.spread(em, g, win, 1.0 / math.prod(win.kernel)), x)]
    if count is not None:
        g = em.Mul(g, em.const((1.0 / np.maximum(count, 1)).reshape(1, 1, *win.size_out), like=x))
    else:  # run-time sizes: the same divisors counted at run time
        g = em.Div(g, window_counts(em, win, end, include, ceil, g))
    return [em.reshape_like(plans.spread(em, g, win, 1.0), x)]


@register(
    "MaxPool",
    notes="dX: dY goes to each window's first maximum in row-major window order (the element the Indices "
    "output names; ties are not split). From opset 11 (16 for overlapping windows) one ScatterElements "
    "routes dY through the Indices of a recomputed MaxPool (or of the node's own Indices output); before, "
    "windows are gathered exactly with a static index table and the ArgMax routed back by a ConvTranspose "
    "with a one-hot kernel (plans: onnxgrad/plans/pool.py), or over run-time spatial sizes, read by a Conv "
    "with that one-hot kernel and compared with Y. The Indices output gets no gradient.",
)
def max_pool(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = sum over windows holding x of dy * (x is the window's first maximum)"""
    x, g = node.inputs[0], dy[0]
    assert x is not None and g is not None
    return [plans.max_pool_input_grad(em, node, x, g, pool_window(node, x, em)[0])]


def _p(node: ir.Node) -> float:
    p = float(attr(node, "p", 2))
    if p < 1:
        raise ValueError(f"{node.op_type} '{node.name}': no gradient rule for p = {p} < 1")
    return p


@register(
    "LpPool",
    notes="dX = sign(x)|x|^(p-1) * ConvTranspose(dY * Y^(1-p)) with a ones kernel; undefined (inf/nan) "
    "where a window's norm Y is 0 and p > 1.",
)
def lp_pool(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = sign(x) |x|^(p-1) * sum over windows holding x of dy * y^(1-p)"""
    x, y, g = node.inputs[0], node.outputs[0], dy[0]
    assert x is not None and g is not None
    p = _p(node)
    win, _ = pool_window(node, x, em)
    g = _per_channel(em, _lp_scale(em, g, y, p), win.size_out)
    return [em.Mul(em.reshape_like(plans.spread(em, g, win, 1.0), x), _lp_factor(em, x, p))]


def _spatial_count(em: Emitter, x: ir.Value, y: ir.Value) -> ir.Value:
    """How many spatial positions a global pool reduces, in x's dtype."""
    dims = None if x.shape is None else list(x.shape)[2:]
    if dims is not None and all(isinstance(d, int) for d in dims):
        return em.const(float(math.prod(dims)), like=x)  # type: ignore[arg-type]
    assert x.dtype is not None
    return em.Cast(em.Div(em.Size(x), em.Size(y)), to=x.dtype)


@register("GlobalAveragePool")
def global_average_pool(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = broadcast(dy) / (spatial size)"""
    x, g = node.inputs[0], dy[0]
    assert x is not None and g is not None
    return [em.Div(em.expand(g, x), _spatial_count(em, x, node.outputs[0]))]


@register(
    "GlobalMaxPool",
    notes="dY goes to the first maximum in row-major spatial order (ties are not split).",
)
def global_max_pool(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * (x is the first spatial maximum)"""
    x, g = node.inputs[0], dy[0]
    assert x is not None and g is not None
    flat = em.Reshape(x, em.ints([0, 0, -1]))
    first = em.ArgMax(flat, axis=2, keepdims=1)
    sizes = spatial_sizes(node, x, "input")
    if None in sizes:
        position = em.Reshape(arange_of_size(em, em.dim(flat, 2)), em.ints([1, 1, -1]))
    else:
        count = math.prod(sizes)  # type: ignore[arg-type]
        position = em.const(np.arange(count).reshape(1, 1, count), dtype=ir.DataType.INT64)
    return [em.Mul(em.reshape_like(em.indicator(em.Equal(first, position), x), x), g)]


@register("GlobalLpPool", notes="undefined (inf/nan) where Y is 0 and p > 1.")
def global_lp_pool(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = sign(x) |x|^(p-1) * dy * y^(1-p)"""
    x, y, g = node.inputs[0], node.outputs[0], dy[0]
    assert x is not None and g is not None
    p = _p(node)
    return [em.Mul(em.expand(_lp_scale(em, g, y, p), x), _lp_factor(em, x, p))]


# ------------------------------------------------------------------------ LRN
@register(
    "LRN",
    notes="the channel-window sums are Convs with a ones (size, 1) kernel over x viewed as (N, 1, C, rest).",
)
def lrn(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """y = x s^-b, s = k + a/n sum_win x^2: dx = dy s^-b - 2ab/n x sum_win' (dy x s^(-b-1))"""
    x, g = node.inputs[0], dy[0]
    assert x is not None and g is not None
    size = int(attr(node, "size"))
    alpha, beta = float(attr(node, "alpha", 1e-4)), float(attr(node, "beta", 0.75))
    bias = float(attr(node, "bias", 1.0))
    lo, hi = (size - 1) // 2, size - 1 - (size - 1) // 2
    ones = em.const(np.ones((1, 1, size, 1)), like=x)

    def planes(v: ir.Value) -> ir.Value:  # (N, C, ...) -> (N, 1, C, rest)
        return em.unsqueeze(em.Reshape(v, em.ints([0, 0, -1])), [1])

    xp, gp = planes(x), planes(g)
    window = em.Conv(em.Mul(xp, xp), ones, pads=[lo, 0, hi, 0])
    s = em.Add(em.const(bias, like=x), em.Mul(window, em.const(alpha / size, like=x)))
    t = em.Pow(s, em.const(-beta, like=x))
    back = em.Conv(em.Div(em.Mul(em.Mul(gp, xp), t), s), ones, pads=[hi, 0, lo, 0])
    dx = em.Sub(em.Mul(gp, t), em.Mul(em.Mul(xp, back), em.const(2.0 * alpha * beta / size, like=x)))
    return [em.reshape_like(dx, x)]


# --------------------------------------------------------------------- Col2Im
@register(
    "Col2Im",
    since=18,
    notes="the adjoint is im2col: one Gather of dY with a static index table (zero where a block reads "
    "padding). image_shape and block_shape must be constants.",
)
def col2im(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx[n, c*K + k, l] = dy[n, c, position of tap k of block l]"""
    x, g = node.inputs[0], dy[0]
    assert x is not None and g is not None
    image, block = em.constant_value(node.inputs[1]), em.constant_value(node.inputs[2])
    if image is None or block is None:
        raise ValueError(f"Col2Im '{node.name}': the gradient needs constant image_shape and block_shape")
    win = col2im_window(node, [int(v) for v in image], [int(v) for v in block])
    index, valid = win.taps()
    cols = em.Gather(em.Reshape(g, em.ints([-1, math.prod(win.size_in)])), em.ints(index.reshape(-1)), axis=1)
    if not valid.all():
        cols = em.Mul(cols, em.const(valid.reshape(1, -1), like=x))
    return [em.reshape_like(cols, x), None, None]



# ----------------------------------------------------------------- DeformConv
def _deform_corners(
    em: Emitter, pos: list[ir.Value], size: Sequence[int | None], sizes: list[ir.Value] | None = None
) -> tuple[ir.Value, ir.Value, list[ir.Value]]:
    """Multilinear sampling at fractional positions ``pos`` (one per axis, zero outside the input): the flat
    index of every corner (clipped inside), its weight (0 when outside), and per axis d(weight)/d(pos),
    each with the 2^n corners concatenated along the last axis. ``sizes``: the input's sizes as scalars in
    pos's dtype, where ``size`` is known only at run time."""
    n = len(size)
    like = pos[0]
    zero, one = em.const(0.0, like=like), em.const(1.0, like=like)
    low = [em.Floor(p) for p in pos]
    frac = [em.Sub(p, lo) for p, lo in zip(pos, low, strict=True)]
    rest = [em.Sub(one, f) for f in frac]

    def top(a: int) -> ir.Value:  # the last position along axis a
        return em.const(size[a] - 1.0, like=like) if sizes is None else em.Sub(sizes[a], one)  # type: ignore[operator]

    def stride(a: int) -> ir.Value:  # the flat index's step along axis a
        if sizes is None:
            return em.const(math.prod(size[a + 1:]), like=like)  # type: ignore[arg-type]
        step = one
        for v in sizes[a + 1:]:
            step = em.Mul(step, v)
        return step

    flats, weights, slopes = [], [], [[] for _ in range(n)]
    for corner in np.ndindex(*([2] * n)):
        coord = [em.Add(low[a], one) if corner[a] else low[a] for a in range(n)]
        inside = None
        for a, c in enumerate(coord):
            ok = em.And(em.GreaterOrEqual(c, zero), em.LessOrEqual(c, top(a)))
            inside = ok if inside is None else em.And(inside, ok)
        assert inside is not None
        factor = [frac[a] if corner[a] else rest[a] for a in range(n)]
        flat = None
        for a, c in enumerate(coord):
            term = em.Mul(em.Min(em.Max(c, zero), top(a)), stride(a))
            flat = term if flat is None else em.Add(flat, term)
        flats.append(em.Cast(flat, to=ir.DataType.INT64))
        weight = em.indicator(inside, like)
        for f in factor:
            weight = em.Mul(weight, f)
        weights.append(weight)
        for a in range(n):
            slope = em.indicator(inside, like) if corner[a] else em.Neg(em.indicator(inside, like))
            for b in range(n):
                if b != a:
                    slope = em.Mul(slope, factor[b])
            slopes[a].append(slope)
    return em.Concat(*flats, axis=3), em.Concat(*weights, axis=3), [em.Concat(*s, axis=3) for s in slopes]


def _out_channels(node: ir.Node, w: ir.Value, g: ir.Value) -> int:
    """The output channel count M, from W's or dY's static shape."""
    for d in (None if w.shape is None else w.shape[0], None if g.shape is None else g.shape[1]):
        if isinstance(d, int):
            return d
    raise ValueError(f"{node.op_type} '{node.name}': the gradient needs the static output channel count of "
                     f"'{w.name}' where the spatial sizes are known only at run time")


@register(
    "DeformConv",
    since=19,
    notes="built from Gather/ScatterElements(reduction=add), valid from opset 19: the bilinear (multilinear "
    "in N-D) samples are regathered with GatherElements, dW and the column gradient are batched MatMuls per "
    "group, dX scatter-adds the column gradient into the 2^n sampling corners, d(offset) is the sampled "
    "slope, d(mask) the unmasked samples. Undefined where a sampling coordinate is an integer (the "
    "interpolation has a kink there). The channel counts must be static (spatial sizes may be known only at "
    "run time).",
)
def deform_conv(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """y = W * cols + b, cols = mask * bilinear(x, base + offset): dW = dy cols^T, dcols = W^T dy, ..."""
    x, w, off, g = node.inputs[0], node.inputs[1], node.inputs[2], dy[0]
    mask = node.inputs[4] if len(node.inputs) > 4 else None
    assert x is not None and w is not None and off is not None and g is not None
    win = deform_conv_window(node, x, w)
    size, kernel, out, n = win.size_in, win.kernel, win.size_out, win.rank
    group, og = attr(node, "group", 1), attr(node, "offset_group", 1)
    channels = list(x.shape)[1] if x.shape is not None else None
    if not isinstance(channels, int):
        raise ValueError(f"DeformConv '{node.name}': the gradient needs the static channel count of '{x.name}'")
    static = win.static  # else the windows (count, tp) and the image (area) are Reshape's -1
    taps = math.prod(kernel)
    count = math.prod(out) if static else -1  # type: ignore[arg-type]
    tp = taps * count if static else -1
    per_og = [0, og, -1, math.prod(size)] if static else [0, og, channels // og, -1]  # type: ignore[arg-type]
    # sampling positions, (N, og, 1, taps * count) per axis
    parts = em.split(em.Reshape(off, em.ints([0, og, taps, n, count])), [1] * n, axis=3)
    for part in parts:  # the emitter types only a node's first output
        part.dtype = off.dtype
    if static:
        pos = [
            em.Add(em.Reshape(p, em.ints([0, og, 1, tp])), em.const(base.reshape(1, 1, 1, tp), like=x))
            for p, base in zip(parts, win.positions(), strict=True)
        ]
    else:
        pos = [em.Add(em.Reshape(p, em.ints([0, og, 1, -1])), base)
               for p, base in zip(parts, run_time_positions(em, win, g, x), strict=True)]
    assert x.dtype is not None
    sizes = None if static else [em.Cast(em.dim(x, 2 + a), to=x.dtype) for a in range(n)]
    flat, weight, slopes = _deform_corners(em, pos, size, sizes)  # type: ignore[arg-type]
    corners = 2**n
    index = em.Expand(flat, em.ints([1, 1, channels // og, 1]))  # (N, og, C/og, corners * tp)
    x4 = em.Reshape(x, em.ints(per_og))
    values = em.GatherElements(x4, index, axis=3)

    def corner_sum(v: ir.Value) -> ir.Value:  # (N, og, C/og, corners * tp) -> (N, og, C/og, tp)
        shape = [0, og, -1, corners, tp] if static else [0, og, channels // og, corners, -1]
        return em.reduce_sum(em.Reshape(v, em.ints(shape)), [3], keepdims=False)

    samples = corner_sum(em.Mul(values, weight))
    m = None if mask is None else em.Reshape(mask, em.ints([0, og, 1, tp]))
    cols = samples if m is None else em.Mul(samples, m)
    # the convolution proper: per group, y = W_g @ cols_g
    g4 = em.Reshape(g, em.ints([0, group, -1, count] if static else [0, group, _out_channels(node, w, g) // group, -1]))
    cols4 = em.Reshape(cols, em.ints([0, group, -1, count] if static else [0, group, channels // group * taps, -1]))
    dw = em.reduce_sum(em.MatMul(g4, em.Transpose(cols4, perm=[0, 1, 3, 2])), [0], keepdims=False)
    w4 = em.Reshape(w, em.ints([1, group, -1, channels // group * taps]))
    dcols = em.Reshape(em.MatMul(em.Transpose(w4, perm=[0, 1, 3, 2]), g4),
                       em.ints([0, og, -1, tp] if static else [0, og, channels // og, -1]))
    dsamples = dcols if m is None else em.Mul(dcols, m)
    # dx: scatter-add into the sampling corners
    updates = em.Mul(em.Concat(*([dsamples] * corners), axis=3), weight)
    assert x.dtype is not None
    zero = ir.tensor(np.zeros(1, dtype=x.dtype.numpy()), dtype=x.dtype)
    zeros = em.Reshape(em.ConstantOfShape(em.shape_of(x), value=zero), em.ints(per_og))
    dx = em.reshape_like(em.ScatterElements(zeros, index, updates, axis=3, reduction="add"), x)
    # d(offset): the slope of the interpolation along each axis
    doff = [
        em.Reshape(em.reduce_sum(em.Mul(dsamples, corner_sum(em.Mul(values, s))), [2], keepdims=True),
                   em.ints([0, og, taps, 1, count]))
        for s in slopes
    ]
    grads: Out = [dx, em.reshape_like(dw, w), em.reshape_like(em.Concat(*doff, axis=3), off)]
    if len(node.inputs) > 3:
        grads.extend(_bias_grad(em, node, g, n, index=3) or [None])
    if mask is not None:
        grads.append(em.reshape_like(em.reduce_sum(em.Mul(dcols, samples), [2], keepdims=True), mask))
    return grads
