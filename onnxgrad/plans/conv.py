"""Conv's gradient forms on onnxruntime's CPU kernels (measured with onnxruntime 1.31, ``bench/conv_grad.py``).

Weight gradient dW = dY (*) X, four forms, tried in this order:

- ``interleaved``: ONE batch-1 Conv of X with its channels interleaved into the last spatial axis;
- ``by_batch``: where the batch N is known only at run time and decides between ``gemm`` (N * out < M) and
  ``interleaved``: an If on N, one of them in each branch;
- ``gemm``: im2col of X (one Slice per kernel tap) and ONE Gemm;
- ``grouped``: one grouped Conv of X^T with dY^T as the kernel (always applies).

Input gradient dX, two forms: ``flipped`` (stride 1: a Conv of dY with W flipped and its channel axes
swapped within each group) and ``transpose`` (a ConvTranspose of dY with W; always applies). A Conv with a constant
kernel takes onnxruntime's NCHWc path, a ConvTranspose never: a 7x7 depthwise dX (ConvNeXt) costs 10x its
forward Conv as a ConvTranspose.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import Emitter, static_dims
from onnxgrad.geometry import Window, adjoint, crop
from onnxgrad.plans.base import NotApplicable, Plan, choose


# ------------------------------------------------------------------------ dW
def weight_grad_interleaved(em: Emitter, x: ir.Value, g: ir.Value, win: Window, group: int,
                            w: ir.Value) -> ir.Value | NotApplicable:
    """dW as ONE batch-1 Conv: X's channels interleaved into its last spatial axis, (1, N, *S, S_last*C), with
    dY^T (M, N, *out) as the kernel, dilated by the strides (by stride*C on the last axis); output position
    t*C + c of the last axis is dW[:, c, ..., t]. A static batch N > 1 runs it as N groups."""
    wd, xd = static_dims(w), x.shape
    if group != 1:
        return NotApplicable(f"grouped conv (group {group})")
    if wd is None or xd is None:
        return NotApplicable("W's shape or X's rank is not known")
    if any(d != 1 for d in win.dilations):
        return NotApplicable("dilated: the taps of one output position are not contiguous")
    slower = gemm_is_faster(em, x, win, w)
    if slower:
        return NotApplicable(slower)
    return _interleaved(em, x, g, win, w)


def _interleaved(em: Emitter, x: ir.Value, g: ir.Value, win: Window, w: ir.Value) -> ir.Value:
    """The interleaved dW Conv (``weight_grad_interleaved``), its conditions checked by the caller."""
    wd, xd = static_dims(w), x.shape
    assert wd is not None and xd is not None
    batch = xd[0] if isinstance(xd[0], int) else 1
    m, c, n = wd[0], wd[1], win.rank
    xt = em.Transpose(x, perm=[0, *range(2, n + 2), 1])  # (N, *S, C)
    begin, end = list(win.begin), list(win.pads[n:])
    begin[-1] *= c
    end[-1] *= c
    dilations = [*win.strides[:-1], win.strides[-1] * c]
    if win.static:
        # rows no window reads would only widen the output (4x the work for a 1x1 stride-2 conv): cut them
        *lead, last = [size - extra for size, extra in zip(win.size_in, win.extra, strict=True)]  # type: ignore[operator]
        if any(win.extra):
            xt = em.slice(xt, [0] * n, [*lead, last], list(range(1, n + 1)))
        xi = em.Reshape(xt, em.ints([1, -1, *lead, last * c]))
        out = win.size_out
    else:  # run-time sizes: the end pads reach at least the last window; the taps past the kernel are cut below
        if _pads_at_run_time(em, win):  # or exactly to it: X end-padded (or cut) at run time
            xt = em.Pad(xt, _run_time_end_pads(em, x, g, win))
            end = [0] * n
        xi = em.unsqueeze(em.Reshape(xt, em.ints([0] * n + [-1])), [0])  # (1, N, *S[:-1], S_last * C)
        out = tuple(0 if d is None else d for d in win.size_out)  # Reshape's 0: dY's own size there
    if batch > 1:  # static batch: one group per sample, dY (N*M, 1, *out) as is; the N partial dWs summed by
        # a MatMul with ones (2-3% faster on the CNN than transposing dY; onnxruntime's ReduceSum is slower)
        dw = em.Conv(xi, em.Reshape(g, em.ints([-1, 1, *out])), dilations=dilations,
                     pads=[*begin, *end], group=batch)  # (1, N*M, *k, k_last * C)
        dw = _cut_taps(em, dw, win, c)
        dw = em.MatMul(em.const(np.ones((1, batch)), like=g), em.Reshape(dw, em.ints([batch, -1])))
    else:
        dw = em.Conv(xi, _channels_first(em, g), dilations=dilations, pads=[*begin, *end])  # (1, M, *k, k_last * C)
        dw = _cut_taps(em, dw, win, c)
    dw = em.Reshape(dw, em.ints([m, *win.kernel, c]))
    return em.Transpose(dw, perm=[0, n + 1, *range(1, n + 1)])


def _pads_at_run_time(em: Emitter, win: Window) -> bool:
    """Whether the interleaved dW pads X's ends at run time: where the spill depends on run-time sizes (strides
    > 1) and Pad takes its pads as an input."""
    return em.runtime_pads and win.run_pads is None and None in win.extra


def _run_time_end_pads(em: Emitter, x: ir.Value, g: ir.Value, win: Window) -> ir.Value:
    """Pads of X^T (N, *S, C) that end it where the last window ends, reach = s * (m - 1) + k - begin with m
    dY's size: s * m - S + k - begin - s past each axis S (negative: rows no window reads, cut)."""
    n = win.rank
    size, count = em.dims(x, range(2, n + 2)), em.dims(g, range(2, n + 2))
    size = em.ints(size) if isinstance(size, list) else size
    count = em.ints(count) if isinstance(count, list) else count
    past = [k - b - s for k, b, s in zip(win.kernel, win.begin, win.strides, strict=True)]
    end = em.Add(em.Sub(em.Mul(count, em.ints(win.strides)), size), em.ints(past))
    return em.cat_ints([0] * (n + 3), end, [0])


def _cut_taps(em: Emitter, dw: ir.Value, win: Window, c: int) -> ir.Value:
    """The interleaved dW cut to the kernel's taps, where run-time sizes left end pads past the last window (or
    rows no window reads)."""
    if win.static or not any(e is None or e > 0 for e in win.extra) or _pads_at_run_time(em, win):
        return dw
    *lead, last = win.kernel
    return em.slice(dw, [0] * win.rank, [*lead, last * c], list(range(2, win.rank + 2)))


def gemm_is_faster(em: Emitter, x: ir.Value, win: Window, w: ir.Value) -> str | None:
    """Why im2col + Gemm beats the interleaved Conv for dW, or None: for unstrided 1x1 kernels (a plain Gemm, no
    copies), and where the weight outweighs the activations (N * out < M), as the interleaved plan's final
    transpose of dW then dominates."""
    if math.prod(win.kernel) == 1 and all(s == 1 for s in win.strides):
        return "unstrided 1x1 kernel: im2col + Gemm is a plain Gemm"
    wd, xd = static_dims(w), x.shape
    batch = xd[0] if xd is not None and isinstance(xd[0], int) else 1
    if None in win.size_out:  # run-time sizes: an image-sized output is taken to outweigh W
        return None
    cost = batch * _sample_cost(em, win)
    if wd is not None and cost < wd[0]:
        return f"W outweighs the activations (N * out * phases = {cost} < M = {wd[0]}): im2col + Gemm is faster"
    return None


def _sample_cost(em: Emitter, win: Window) -> int:
    """One sample's share of im2col's cost against the interleaved plan's, out * phases (static output sizes):
    im2col copies ~2 * C * taps * N * out values, 4x slower when strided taps need phase slices (opset < 10);
    the interleaved plan's dW transpose costs ~2 * M * C * taps more than the Gemm plan's reshape."""
    phases = 4 if not em.slice_inputs and any(s != 1 for s in win.strides) else 1
    return math.prod(win.size_out) * phases  # type: ignore[arg-type]


def weight_grad_by_batch(em: Emitter, x: ir.Value, g: ir.Value, win: Window, group: int,
                         w: ir.Value) -> ir.Value | NotApplicable:
    """dW by ``gemm`` where N * out * phases < M, else by the interleaved Conv: ``gemm_is_faster``'s test, which a
    batch N known only at run time leaves open, made by an If on N (it costs ~0.05 ms; the wrong plan costs up to
    1.5x the dW: a 128@8 3x3 layer at N = 16 takes 2.2 forward convs by im2col, 1.5 interleaved)."""
    xd, wd = x.shape, static_dims(w)
    if xd is None or isinstance(xd[0], int):
        return NotApplicable("the batch is static: the plans choose at build time")
    if group != 1 or wd is None or any(d != 1 for d in win.dilations) or None in win.size_out:
        return NotApplicable("the interleaved plan does not apply, or would for every batch (run-time sizes)")
    if em.opset < 9:
        return NotApplicable("opset < 9: a branch's int64 constants would be initializers of the branch")
    if math.prod(win.kernel) == 1 and all(s == 1 for s in win.strides):
        return NotApplicable("unstrided 1x1 kernel: im2col + Gemm for every batch")
    cost = _sample_cost(em, win)
    if cost >= wd[0]:
        return NotApplicable(f"one sample's output outweighs W (out * phases = {cost} >= M = {wd[0]}): "
                             "the interleaved Conv for every batch")
    small = _branch(em, "gemm", lambda e: weight_grad_gemm(e, x, g, win, group, w))
    if small is None:
        return NotApplicable("im2col + Gemm does not apply")
    large = _branch(em, "interleaved", lambda e: _interleaved(e, x, g, win, w))
    assert large is not None
    below = em.Less(em.dim(x, 0), em.const(np.array(-(-wd[0] // cost)), dtype=ir.DataType.INT64))  # N * cost < M
    dw = em.op("If", below, then_branch=small, else_branch=large)
    dw.type, dw.shape = w.type, ir.Shape(wd)
    return dw


def _branch(em: Emitter, tag: str, plan: Callable[[Emitter], ir.Value | NotApplicable]) -> ir.Graph | None:
    """An If branch that computes ``plan`` (its reads of outer values are captures), or None where the plan
    does not apply."""
    body = ir.Graph([], [], nodes=[], opset_imports={"": em.opset}, name=em.fresh_name(f"{tag}_branch"))
    emb = Emitter(body, em.opset, body.name, em.ir_version, em.aggregation)
    out = plan(emb)
    if isinstance(out, NotApplicable):
        emb.rollback()
        return None
    emb.commit([out])
    producer = out.producer()
    if producer is None or producer.graph is not body:  # an outer value: a branch output must be made inside
        node = ir.Node("", "Identity", [out], name=emb.fresh_name("Identity"))
        node.outputs[0].name = node.name
        node.outputs[0].type, node.outputs[0].shape = out.type, out.shape
        body.append(node)
        out = node.outputs[0]
    body.outputs.append(out)
    return body


def weight_grad_gemm(em: Emitter, x: ir.Value, g: ir.Value, win: Window, group: int,
                     w: ir.Value) -> ir.Value | NotApplicable:
    """dW = dY_(M, N*out) @ im2col(X)_(C*K, N*out)^T, one Gemm."""
    wd = static_dims(w)
    if group != 1:
        return NotApplicable(f"grouped conv (group {group})")
    if wd is None or x.shape is None or g.shape is None:
        return NotApplicable("W's shape or the rank of X or dY is not known")
    if any(s != 1 for s in win.strides) and not em.slice_inputs and win.rank != 2:
        return NotApplicable("strided taps without Slice steps are cut in 2-D only")
    if not win.static and not em.slice_inputs and any(s != 1 for s in win.strides):
        return NotApplicable("strided taps over run-time sizes need Slice steps (opset 10)")
    m, c = wd[0], wd[1]
    taps = _taps(em, _channels_first(em, x), win)
    stacked = taps[0] if len(taps) == 1 else em.Concat(*[em.unsqueeze(t, [1]) for t in taps], axis=1)
    cols = em.Reshape(stacked, em.ints([c * len(taps), -1]))
    gm = em.Reshape(_channels_first(em, g), em.ints([m, -1]))
    return em.Reshape(em.gemm(gm, cols, trans_b=1), em.ints(list(wd)))


def weight_grad_grouped(em: Emitter, x: ir.Value, g: ir.Value, win: Window, group: int, w: ir.Value) -> ir.Value:
    """dW of ``Conv(x, W)`` (W: (M, Cg, *k)) given g = dY: one grouped Conv of x with its batch and
    channel axes swapped, using g (batch and channel swapped) as the kernel; strides and dilations trade places."""
    n = win.rank
    perm = [1, 0, *range(2, n + 2)]
    xt = em.Transpose(x, perm=perm)  # (C, N, *in)
    if group > 1:
        wd = list(w.shape)[1] if w.shape is not None else None
        xd = list(x.shape)[1] if x.shape is not None else None
        cg = wd if isinstance(wd, int) else xd // group if isinstance(xd, int) else None
        if cg is None:
            raise ValueError(f"grouped weight gradient needs the channel count of '{x.name}' or '{w.name}'")
        size = list(win.size_in) if win.static else em.dims(x, range(2, n + 2))
        xt = em.Reshape(xt, em.cat_ints([group, cg, -1], size))  # type: ignore[arg-type]
        xt = em.Transpose(xt, perm=[1, 0, *range(2, n + 3)])  # (Cg, group, N, *in)
        xt = em.Reshape(xt, em.cat_ints([0, -1], size))  # type: ignore[arg-type]  # (Cg, group * N, *in)
    dw = em.Conv(
        xt, em.Transpose(g, perm=perm), strides=list(win.dilations), dilations=list(win.strides),
        group=group, pads=win.pads,
    )
    over = [1 if e is None else e - d + 1 for e, d in zip(win.extra, win.dilations, strict=True)]
    dw = crop(em, dw, win.kernel, over)  # run-time sizes: the end pads reach at least the last window
    return em.Transpose(dw, perm=perm)


def _channels_first(em: Emitter, v: ir.Value) -> ir.Value:
    """(N, C, *s) -> (C, N, *s); a Reshape (no copy) when the shape is static and N is 1."""
    dims = static_dims(v)
    if dims is not None and dims[0] == 1:
        return em.Reshape(v, em.ints([dims[1], 1, *dims[2:]]))
    rank = None if v.shape is None else v.shape.rank()
    assert rank is not None
    return em.Transpose(v, perm=[1, 0, *range(2, rank)])


def _taps(em: Emitter, xt: ir.Value, win: Window) -> list[ir.Value]:
    """For each kernel tap (row-major), the input each output position reads there: (C, N, *size_out).

    Strided taps use Slice steps (opset 10); before, 2-D only: whole stride blocks are cut, split by a
    Reshape and phase 0 taken. Over run-time sizes, see ``_run_time_taps``."""
    if not win.static:
        return _run_time_taps(em, xt, win)
    n = win.rank
    size_out = [int(m) for m in win.size_out]  # type: ignore[arg-type]
    strided = any(s != 1 for s in win.strides)
    phases = strided and not em.slice_inputs
    reach = [(k - 1) * d + (s * m if phases else s * (m - 1) + 1)
             for k, d, s, m in zip(win.kernel, win.dilations, win.strides, size_out, strict=True)]
    end = [max(0, r - (size + b)) for r, size, b in zip(reach, win.size_in, win.begin, strict=True)]  # type: ignore[operator]
    if any(win.begin) or any(end):
        xt = em.pad(xt, [0, 0, *win.begin, 0, 0, *end])
    axes = list(range(2, n + 2))
    taps = []
    for tap in np.ndindex(*win.kernel):
        starts = [t * d for t, d in zip(tap, win.dilations, strict=True)]
        if phases:
            ends = [st + s * m for st, s, m in zip(starts, win.strides, size_out, strict=True)]
            (sh, sw), (mh, mw) = win.strides, size_out
            split = em.Reshape(em.slice(xt, starts, ends, axes), em.ints([0, 0, mh, sh, mw, sw]))
            taps.append(em.Reshape(em.slice(split, [0, 0], [1, 1], [3, 5]), em.ints([0, 0, mh, mw])))
        else:
            ends = [st + s * (m - 1) + 1 for st, s, m in zip(starts, win.strides, size_out, strict=True)]
            taps.append(em.slice(xt, starts, ends, axes, list(win.strides) if strided else None))
    return taps


def _run_time_taps(em: Emitter, xt: ir.Value, win: Window) -> list[ir.Value]:
    """``_taps`` over run-time sizes: X padded by the window's pads, whose end pad reaches the last window but not
    a whole stride past it, so along an axis the tap at offset o = t * d ends d * (k - 1) - o before the padded
    end: static Slices (steps for strides) with negative ends."""
    n = win.rank
    xt = em.pad(xt, [0, 0, *win.pads[:n], 0, 0, *win.pads[n:]])
    strided = any(s != 1 for s in win.strides)
    reach = [d * (k - 1) for k, d in zip(win.kernel, win.dilations, strict=True)]
    taps = []
    for tap in np.ndindex(*win.kernel):
        starts = [t * d for t, d in zip(tap, win.dilations, strict=True)]
        ends = [st - r if st < r else _END for st, r in zip(starts, reach, strict=True)]
        whole = not strided and not any(starts) and all(e == _END for e in ends)  # a 1x1 unstrided tap: X itself
        taps.append(xt if whole else em.slice(xt, starts, ends, list(range(2, n + 2)),
                                              list(win.strides) if strided else None))
    return taps


_END = 2**62  # a Slice end past any axis


WEIGHT_GRAD: dict[str, Plan] = {
    "interleaved": weight_grad_interleaved, "by_batch": weight_grad_by_batch, "gemm": weight_grad_gemm,
    "grouped": weight_grad_grouped,
}


def conv_weight_grad(em: Emitter, x: ir.Value, g: ir.Value, win: Window, group: int, w: ir.Value) -> ir.Value:
    """dW of ``Conv(x, W)`` given g = dY, by the first plan of ``WEIGHT_GRAD`` that applies."""
    return choose(WEIGHT_GRAD, em, x, g, win, group, w)[1]


# ------------------------------------------------------------------------ dX
def input_grad_flipped(em: Emitter, g: ir.Value, w: ir.Value, win: Window, group: int) -> ir.Value | NotApplicable:
    """dX of a stride-1 conv: Conv(dY, W flipped, channels swapped within each group)."""
    if any(s != 1 for s in win.strides):
        return NotApplicable("strided: the flipped Conv would need dY dilated")
    if w.shape is None:
        return NotApplicable("W's rank is not known")
    reach = [(k - 1) * d for k, d in zip(win.kernel, win.dilations, strict=True)]
    begin = [r - b for r, b in zip(reach, win.begin, strict=True)]
    end = [r - e for r, e in zip(reach, win.end, strict=True)]
    if any(v < 0 for v in begin + end):
        return NotApplicable("a pad wider than the kernel's reach (the flipped Conv's pads would be negative)")
    n = win.rank
    if group == 1:
        flipped = em.Transpose(w, perm=[1, 0, *range(2, n + 2)])
    else:  # (G * Mg, Cg, *k) -> (G * Cg, Mg, *k); a Reshape alone for a depthwise conv (Mg or Cg is 1)
        wd = static_dims(w)
        if wd is None:
            return NotApplicable(f"grouped conv (group {group}) of a W whose shape is not static")
        mg, cg, k = wd[0] // group, wd[1], list(wd[2:])
        flipped = em.Reshape(w, em.ints([group, mg, cg, *k]))
        if mg > 1 and cg > 1:
            flipped = em.Transpose(flipped, perm=[0, 2, 1, *range(3, n + 3)])
        flipped = em.Reshape(flipped, em.ints([group * cg, mg, *k]))
    taps = math.prod(win.kernel)
    if 1 < taps <= _FLIP_BY_MATMUL and w.dtype in _MATMUL_TYPES:
        # every spatial axis reversed = the row-major taps reversed: one MatMul of (I, O, taps) with the exchange
        # matrix, exact (one product by 1 per output, the rest by 0), 3x faster than a Gather per axis
        # (0.26 against 0.88 ms for a [128, 128, 3, 3] W, with the Transpose)
        exchange = em.const(np.eye(taps)[::-1], like=w)
        rows = em.MatMul(em.Reshape(flipped, em.ints([0, 0, -1])), exchange)
        flipped = em.Reshape(rows, em.ints([0, 0, *win.kernel]))
    else:
        for axis, k in zip(range(2, n + 2), win.kernel, strict=True):
            if k > 1:
                flipped = em.Gather(flipped, em.ints(list(range(k - 1, -1, -1))), axis=axis)
    return em.Conv(g, flipped, pads=[*begin, *end], dilations=list(win.dilations), group=group if group > 1 else None)


_FLIP_BY_MATMUL = 64  # kernels of up to this many taps are flipped by one MatMul (its cost grows with taps^2)
_MATMUL_TYPES = (ir.DataType.FLOAT, ir.DataType.FLOAT16, ir.DataType.DOUBLE)  # MatMul's float types at every opset


def input_grad_transpose(em: Emitter, g: ir.Value, w: ir.Value, win: Window, group: int) -> ir.Value:
    """dX = ConvTranspose(dY, W): end pads and output_padding restore the rows a strided conv drops."""
    return adjoint(em, g, w, win, group)


INPUT_GRAD: dict[str, Plan] = {"flipped": input_grad_flipped, "transpose": input_grad_transpose}


def conv_input_grad(em: Emitter, g: ir.Value, w: ir.Value, win: Window, group: int) -> ir.Value:
    """dX of ``Conv(X, w)`` given g = dY, by the first plan of ``INPUT_GRAD`` that applies."""
    return choose(INPUT_GRAD, em, g, w, win, group)[1]
