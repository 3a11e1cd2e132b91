"""Convolution and pooling: Conv, ConvTranspose, the pools, LRN, Col2Im, DeformConv.

Every op here slides a window over the spatial axes. ``Window`` holds that geometry once, from the
side the window reads (``size_in``) to the side it writes (``size_out``); the adjoint of a windowed
sum is a ConvTranspose with the same strides, dilations and begin pads, whose end pads and
output_padding (``Window.end``, ``Window.extra``) put back the rows a strided window never reached.
Spatial sizes must be static (the batch size may vary): pads, output_padding and window tables are
attributes and constants.

Conv's weight gradient has two plans (``_prefers_gemm`` picks, by measured onnxruntime CPU cost); the Conv rule
also looks one node downstream: a dY that is some g times a per-output-channel factor (what an inference
BatchNormalization sends back) lets the factor move onto the kernel and onto dW, so that BatchNormalization
and the Conv share one weight gradient (see ``rules/normalization.py``).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import Emitter, attr, same_dim, static_dims
from onnxgrad.registry import register

Grads = Sequence[ir.Value | None]
Out = list[ir.Value | None]


# ------------------------------------------------------------------ geometry
@dataclass(frozen=True)
class Window:
    """A sliding window per spatial axis: ``size_out`` windows over ``size_in`` (begin-padded by ``begin``)."""

    size_in: tuple[int, ...]
    size_out: tuple[int, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begin: tuple[int, ...]

    @property
    def rank(self) -> int:
        return len(self.size_in)

    def _spill(self) -> list[int]:
        """Input rows past the last window's reach (> 0), or window rows past the input (< 0)."""
        return [
            n + b - (s * (m - 1) + d * (k - 1) + 1)
            for n, m, k, s, d, b in zip(
                self.size_in, self.size_out, self.kernel, self.strides, self.dilations, self.begin, strict=True
            )
        ]

    @property
    def end(self) -> tuple[int, ...]:
        """End pads that make the window reach exactly as far as the last window does."""
        return tuple(max(0, -r) for r in self._spill())

    @property
    def extra(self) -> tuple[int, ...]:
        """Input rows no window reads: the adjoint's output_padding."""
        return tuple(max(0, r) for r in self._spill())

    @property
    def pads(self) -> list[int]:
        return [*self.begin, *self.end]

    def positions(self) -> list[np.ndarray]:
        """Per axis, the input coordinate each window tap (row-major over the kernel, first axis) reads for each
        window (row-major, second axis), in unpadded coordinates."""
        grids = np.meshgrid(
            *[np.arange(k) for k in self.kernel], *[np.arange(m) for m in self.size_out], indexing="ij"
        )
        n, shape = self.rank, (math.prod(self.kernel), math.prod(self.size_out))
        return [
            (grids[n + a] * self.strides[a] - self.begin[a] + grids[a] * self.dilations[a]).reshape(shape)
            for a in range(n)
        ]

    def taps(self) -> tuple[np.ndarray, np.ndarray]:
        """(index, valid): for each window tap and each window (see ``positions``), the flat position it reads
        in the unpadded input (clipped into it), and whether that position is inside it."""
        pos = self.positions()
        valid = np.logical_and.reduce([(p >= 0) & (p < size) for p, size in zip(pos, self.size_in, strict=True)])
        clipped = [np.clip(p, 0, size - 1) for p, size in zip(pos, self.size_in, strict=True)]
        return np.ravel_multi_index(clipped, self.size_in).astype(np.int64), valid


def _spatial(node: ir.Node, v: ir.Value | None, what: str) -> tuple[int, ...]:
    """The static spatial dims (axes 2..) of ``v``; the gradient needs them as attributes."""
    assert v is not None
    dims = None if v.shape is None else list(v.shape)[2:]
    if dims is None or not all(isinstance(d, int) for d in dims):
        raise ValueError(
            f"{node.op_type} '{node.name}': the gradient needs the static spatial shape of its {what} "
            f"'{v.name}' (got {v.shape}); only the batch dimension may be dynamic"
        )
    return tuple(int(d) for d in dims)  # type: ignore[arg-type]


def _ints(node: ir.Node, name: str, n: int, default: int) -> tuple[int, ...]:
    value = attr(node, name, None)
    return tuple(int(v) for v in value) if value else (default,) * n


def _same_pads(auto_pad: str, size: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
               dilations: Sequence[int]) -> tuple[list[int], list[int]]:
    """Begin and end pads of auto_pad SAME_UPPER (odd pad at the end) / SAME_LOWER (at the begin)."""
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations, strict=True):
        total = max(0, (-(-n // s) - 1) * s + d * (k - 1) + 1 - n)
        b = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        begin.append(b)
        end.append(total - b)
    return begin, end


def _explicit_pads(node: ir.Node, size: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                   dilations: Sequence[int]) -> tuple[list[int], list[int]]:
    n = len(size)
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return _same_pads(auto_pad, size, kernel, strides, dilations)
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    pads = _ints(node, "pads", 2 * n, 0)
    return list(pads[:n]), list(pads[n:])


def _windows(size: int, k: int, s: int, d: int, b: int, e: int, ceil: bool) -> int:
    """How many windows fit; with ceil_mode a last window may hang over, unless it starts in the end pad."""
    span = size + b + e - d * (k - 1) - 1
    count = (span + s - 1) // s + 1 if ceil else span // s + 1
    if ceil and (count - 1) * s >= size + b:
        count -= 1
    return count


def _conv_window(node: ir.Node, x: ir.Value, w: ir.Value) -> Window:
    """Conv's geometry, from X's spatial shape to Y's."""
    size = _spatial(node, x, "input")
    n = len(size)
    kernel = _ints(node, "kernel_shape", n, 0) if attr(node, "kernel_shape") else _spatial(node, w, "weight")
    strides, dilations = _ints(node, "strides", n, 1), _ints(node, "dilations", n, 1)
    begin, end = _explicit_pads(node, size, kernel, strides, dilations)
    out = tuple(_windows(*a, ceil=False) for a in zip(size, kernel, strides, dilations, begin, end, strict=True))
    return Window(size, out, kernel, strides, dilations, tuple(begin))


def _pool_window(node: ir.Node, x: ir.Value) -> tuple[Window, tuple[int, ...]]:
    """A pool's geometry (X to Y) and its own end pads."""
    size = _spatial(node, x, "input")
    n = len(size)
    kernel = _ints(node, "kernel_shape", n, 1)
    strides, dilations = _ints(node, "strides", n, 1), _ints(node, "dilations", n, 1)
    begin, end = _explicit_pads(node, size, kernel, strides, dilations)
    ceil = bool(attr(node, "ceil_mode", 0))
    out = tuple(_windows(*a, ceil=ceil) for a in zip(size, kernel, strides, dilations, begin, end, strict=True))
    return Window(size, out, kernel, strides, dilations, tuple(begin)), tuple(end)


# ------------------------------------------------------------ building blocks
def _adjoint(em: Emitter, g: ir.Value, kernel: ir.Value, win: Window, group: int = 1) -> ir.Value:
    """The adjoint of a window op whose output gradient is g: a ConvTranspose back to ``size_in``."""
    extra = list(win.extra)
    return em.ConvTranspose(
        g, kernel, strides=list(win.strides), dilations=list(win.dilations), group=group, pads=win.pads,
        output_padding=extra if any(extra) else None,
    )


def _crop(em: Emitter, v: ir.Value, sizes: Sequence[int], over: Sequence[int]) -> ir.Value:
    """v[:, :, :sizes...] when some ``over`` (how far the result may exceed ``sizes``) is positive."""
    if not any(o > 0 for o in over):
        return v
    n = len(sizes)
    return em.slice(v, [0] * n, list(sizes), list(range(2, n + 2)))


def _forward(em: Emitter, g: ir.Value, kernel: ir.Value, win: Window, group: int = 1) -> ir.Value:
    """A Conv over ``size_in`` with the window's geometry: the adjoint of ``_adjoint``."""
    out = em.Conv(g, kernel, strides=list(win.strides), dilations=list(win.dilations), group=group, pads=win.pads)
    return _crop(em, out, win.size_out, [e - s + 1 for e, s in zip(win.extra, win.strides, strict=True)])


def _one_window(win: Window) -> bool:
    """True when a single window covers the input exactly (no pads, no dilation)."""
    return not any(win.begin) and all(
        m == 1 and k == n and d == 1
        for n, m, k, d in zip(win.size_in, win.size_out, win.kernel, win.dilations, strict=True)
    )


def _spread(em: Emitter, g: ir.Value, win: Window, scale: float) -> ir.Value:
    """The adjoint of a ones-kernel window sum, times ``scale``: each window's dY copied over its window, as
    (NC, 1, *size_in) from g = (NC, 1, *size_out). One window over the whole input: one broadcast Mul (10x
    faster than onnxruntime's ConvTranspose); else a ConvTranspose (a 5-D broadcast that tiles the input is
    7x slower than it)."""
    if _one_window(win):
        return em.Mul(g, em.const(np.full((1, 1, *win.kernel), scale), like=g))
    if scale != 1.0:
        g = em.Mul(g, em.const(scale, like=g))
    return _adjoint(em, g, em.const(np.ones((1, 1, *win.kernel)), like=g), win)


def _weight_grad(em: Emitter, x: ir.Value, g: ir.Value, win: Window, group: int, w: ir.Value) -> ir.Value:
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
        xt = em.Reshape(xt, em.ints([group, cg, -1, *win.size_in]))
        xt = em.Transpose(xt, perm=[1, 0, *range(2, n + 3)])  # (Cg, group, N, *in)
        xt = em.Reshape(xt, em.ints([0, -1, *win.size_in]))  # (Cg, group * N, *in)
    dw = em.Conv(
        xt, em.Transpose(g, perm=perm), strides=list(win.dilations), dilations=list(win.strides),
        group=group, pads=win.pads,
    )
    dw = _crop(em, dw, win.kernel, [e - d + 1 for e, d in zip(win.extra, win.dilations, strict=True)])
    return em.Transpose(dw, perm=perm)


def _bias_grad(em: Emitter, node: ir.Node, g: ir.Value, rank: int, index: int = 2) -> list[ir.Value | None]:
    """[db] = [sum of dY over all axes but the channels] when the node has a bias (input ``index``)."""
    if len(node.inputs) <= index or node.inputs[index] is None:
        return []
    return [em.reduce_sum(g, [0, *range(2, rank + 2)], keepdims=False)]


def _per_channel(em: Emitter, v: ir.Value, sizes: Sequence[int]) -> ir.Value:
    """(N, C, *sizes) viewed as (N*C, 1, *sizes), so one-channel kernels serve every channel."""
    return em.Reshape(v, em.ints([-1, 1, *sizes]))


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
    notes="dX: for stride 1, one Conv of dY with W flipped and its channel axes swapped, else ConvTranspose(dY, W) "
    "(end pads / output_padding restore the rows a strided conv drops); dW: for group 1 and no dilation, ONE "
    "batch-1 Conv of X with its channels interleaved into the last spatial axis and dY^T as the kernel, unless "
    "the kernel is 1x1 unstrided or W outweighs the activations: then im2col of X (one Slice per kernel tap) "
    "and ONE Gemm; grouped convs: one grouped Conv of X^T with dY^T; dB = sum of dY. A per-output-channel "
    "factor on dY (an inference BatchNormalization after the Conv) moves onto W and dW when W is no larger "
    "than the output. Spatial sizes must be static.",
)
def conv(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = conv(dy, flip(w)^T) (stride 1) or conv_transpose(dy, w), dw = dy (*) x, db = sum(dy)"""
    x, w, g = node.inputs[0], node.inputs[1], dy[0]
    assert x is not None and w is not None and g is not None
    win = _conv_window(node, x, w)
    group = attr(node, "group", 1)
    factor = _channel_factor(g, w) if folds_channel_factor(node) else None
    if factor is not None:  # dY = g * c per output channel: c moves onto the kernel and onto dW, dB
        g, c = factor
        c = em.Reshape(c, em.ints([-1, *[1] * (win.rank + 1)]))
        kernel = em.Mul(w, c)
        kernel.shape = w.shape
    else:
        c, kernel = None, w
    dx = (_adjoint_conv(em, g, kernel, win) if group == 1 else None) or _adjoint(em, g, kernel, win, group)
    dw, db = conv_weight_grad(em, node, g), _bias_grad(em, node, g, win.rank)
    if c is not None:
        dw = em.Mul(dw, c)
        db = [em.Mul(d, em.Reshape(c, em.ints([-1]))) for d in db]
    return [dx, dw, *db]


def conv_weight_grad(em: Emitter, node: ir.Node, g: ir.Value) -> ir.Value:
    """dW of a Conv node whose output gradient is g (emitted the same way for the same g, so that a second
    request shares the first one's nodes)."""
    x, w = node.inputs[0], node.inputs[1]
    assert x is not None and w is not None
    return _weight_grad_plans(em, x, g, _conv_window(node, x, w), attr(node, "group", 1), w)


def _weight_grad_plans(em: Emitter, x: ir.Value, g: ir.Value, win: Window, group: int, w: ir.Value) -> ir.Value:
    """dW of ``Conv(x, W)`` given g = dY, by the cheapest plan that applies."""
    dw = None
    if group == 1:
        dw = None if _prefers_gemm(em, x, win, w) else _weight_grad_interleaved(em, x, g, win, w)
        dw = dw or _weight_grad_gemm(em, x, g, win, w)
    return dw or _weight_grad(em, x, g, win, group, w)


def _prefers_gemm(em: Emitter, x: ir.Value, win: Window, w: ir.Value) -> bool:
    """Whether im2col + Gemm beats the interleaved Conv for dW (measured on onnxruntime 1.31's CPU kernels,
    ``bench/conv_grad.py``): for unstrided 1x1 kernels (a plain Gemm, no copies), and where the weight
    outweighs the activations (N * out < M), as the interleaved plan's final transpose of dW then dominates."""
    if math.prod(win.kernel) == 1 and all(s == 1 for s in win.strides):
        return True
    wd, xd = static_dims(w), x.shape
    batch = xd[0] if xd is not None and isinstance(xd[0], int) else 1
    # im2col copies ~2 * C * taps * N * out values, 4x slower when strided taps need phase slices (opset < 10);
    # the interleaved plan's dW transpose costs ~2 * M * C * taps more than the Gemm plan's reshape
    phases = 4 if not em.slice_steps and any(s != 1 for s in win.strides) else 1
    return wd is not None and batch * math.prod(win.size_out) * phases < wd[0]


def folds_channel_factor(node: ir.Node) -> bool:
    """Whether a per-output-channel factor on this Conv's dY is better moved onto W and dW (work the size of
    W) than applied to dY (work the size of the output): when W has no more values than the output (batch 1
    if the batch is dynamic). ResNet-50's deep layers at batch 1 have 5-20x more weights than outputs."""
    w, out = node.inputs[1], node.outputs[0]
    wd = None if w is None else static_dims(w)
    dims = None if out.shape is None else list(out.shape)
    if wd is None or not dims or not all(isinstance(d, int) for d in dims[1:]):
        return False
    batch = dims[0] if isinstance(dims[0], int) else 1
    return math.prod(wd) <= batch * math.prod(dims[1:])  # type: ignore[arg-type]


def _channel_factor(g: ir.Value, w: ir.Value) -> tuple[ir.Value, ir.Value] | None:
    """(g', c) when g = Mul(g', c) with c one factor per output channel, shaped (M, 1, ...) or (1, M, 1, ...)
    (BatchNormalization's dX after a Conv): then dX = adjoint(g', W * c), dW = (g' (*) x) * c, dB = sum(g') * c,
    and the full-size product g' * c is no longer read."""
    node = g.producer()
    if node is None or node.op_type != "Mul" or node.domain not in ("", "ai.onnx") or g.shape is None:
        return None
    m = static_dims(w)
    rank = g.shape.rank()
    for a, b in (node.inputs, node.inputs[::-1]):
        if a is None or b is None or b.shape is None or a.shape is None or a.shape.rank() != rank:
            continue
        if not all(same_dim(p, q) for p, q in zip(a.shape, g.shape, strict=True)):
            continue  # g' itself broadcast (a channel axis of 1, say): it is not the Conv's dY
        dims = list(b.shape)
        if m is not None and dims in ([m[0], *[1] * (rank - 2)], [1, m[0], *[1] * (rank - 2)]):
            return a, b
    return None


def _channels_first(em: Emitter, v: ir.Value) -> ir.Value:
    """(N, C, *s) -> (C, N, *s); a Reshape (no copy) when the shape is static and N is 1."""
    dims = static_dims(v)
    if dims is not None and dims[0] == 1:
        return em.Reshape(v, em.ints([dims[1], 1, *dims[2:]]))
    rank = None if v.shape is None else v.shape.rank()
    assert rank is not None
    return em.Transpose(v, perm=[1, 0, *range(2, rank)])


def _taps(em: Emitter, xt: ir.Value, win: Window) -> list[ir.Value] | None:
    """For each kernel tap (row-major), the input each output position reads there: (C, N, *size_out).

    Strided taps use Slice steps (opset 10); before, 2-D only: whole stride blocks are cut, split by a
    Reshape and phase 0 taken."""
    n = win.rank
    strided = any(s != 1 for s in win.strides)
    phases = strided and not em.slice_steps
    if phases and n != 2:
        return None
    reach = [(k - 1) * d + (s * m if phases else s * (m - 1) + 1)
             for k, d, s, m in zip(win.kernel, win.dilations, win.strides, win.size_out, strict=True)]
    end = [max(0, r - (size + b)) for r, size, b in zip(reach, win.size_in, win.begin, strict=True)]
    if any(win.begin) or any(end):
        xt = em.pad(xt, [0, 0, *win.begin, 0, 0, *end])
    axes = list(range(2, n + 2))
    taps = []
    for tap in np.ndindex(*win.kernel):
        starts = [t * d for t, d in zip(tap, win.dilations, strict=True)]
        if phases:
            ends = [st + s * m for st, s, m in zip(starts, win.strides, win.size_out, strict=True)]
            (sh, sw), (mh, mw) = win.strides, win.size_out
            split = em.Reshape(em.slice(xt, starts, ends, axes), em.ints([0, 0, mh, sh, mw, sw]))
            taps.append(em.Reshape(em.slice(split, [0, 0], [1, 1], [3, 5]), em.ints([0, 0, mh, mw])))
        else:
            ends = [st + s * (m - 1) + 1 for st, s, m in zip(starts, win.strides, win.size_out, strict=True)]
            taps.append(em.slice(xt, starts, ends, axes, list(win.strides) if strided else None))
    return taps


def _weight_grad_gemm(em: Emitter, x: ir.Value, g: ir.Value, win: Window, w: ir.Value) -> ir.Value | None:
    """dW = dY_(M, N*out) @ im2col(X)_(C*K, N*out)^T, one Gemm; None where it does not apply."""
    wd = static_dims(w)
    if wd is None or x.shape is None or g.shape is None:
        return None
    m, c = wd[0], wd[1]
    taps = _taps(em, _channels_first(em, x), win)
    if taps is None:
        return None
    stacked = taps[0] if len(taps) == 1 else em.Concat(*[em.unsqueeze(t, [1]) for t in taps], axis=1)
    cols = em.Reshape(stacked, em.ints([c * len(taps), -1]))
    gm = em.Reshape(_channels_first(em, g), em.ints([m, -1]))
    zero = em.const(0.0, like=g) if em.opset < 11 else None
    dw = em.Gemm(gm, cols, zero, transB=1, beta=0.0 if zero is not None else None)
    return em.Reshape(dw, em.ints(list(wd)))


def _weight_grad_interleaved(em: Emitter, x: ir.Value, g: ir.Value, win: Window, w: ir.Value) -> ir.Value | None:
    """dW as ONE batch-1 Conv: X's channels interleaved into its last spatial axis, (1, N, *S, S_last*C), with
    dY^T (M, N, *out) as the kernel, dilated by the strides (by stride*C on the last axis); output position
    t*C + c of the last axis is dW[:, c, ..., t]. A static batch N > 1 runs it as N groups. None for dilated
    convs (the taps of one output position would not be contiguous)."""
    wd, xd = static_dims(w), x.shape
    if wd is None or xd is None or any(d != 1 for d in win.dilations):
        return None
    batch = xd[0] if isinstance(xd[0], int) else 1
    m, c, n = wd[0], wd[1], win.rank
    xt = em.Transpose(x, perm=[0, *range(2, n + 2), 1])  # (N, *S, C)
    # rows no window reads would only widen the output (4x the work for a 1x1 stride-2 conv): cut them
    *lead, last = [size - extra for size, extra in zip(win.size_in, win.extra, strict=True)]
    if any(win.extra):
        xt = em.slice(xt, [0] * n, [*lead, last], list(range(1, n + 1)))
    xi = em.Reshape(xt, em.ints([1, -1, *lead, last * c]))
    begin, end = list(win.begin), list(win.end)
    begin[-1] *= c
    end[-1] *= c
    dilations = [*win.strides[:-1], win.strides[-1] * c]
    if batch > 1:  # static batch: one group per sample, dY (N*M, 1, *out) as is; the N partial dWs summed by
        # a MatMul with ones (2-3% faster on the CNN than transposing dY; onnxruntime's ReduceSum is slower)
        dw = em.Conv(xi, em.Reshape(g, em.ints([-1, 1, *win.size_out])), dilations=dilations,
                     pads=[*begin, *end], group=batch)  # (1, N*M, *k, k_last * C)
        dw = em.MatMul(em.const(np.ones((1, batch)), like=g), em.Reshape(dw, em.ints([batch, -1])))
    else:
        dw = em.Conv(xi, _channels_first(em, g), dilations=dilations, pads=[*begin, *end])  # (1, M, *k, k_last * C)
    dw = em.Reshape(dw, em.ints([m, *win.kernel, c]))
    return em.Transpose(dw, perm=[0, n + 1, *range(1, n + 1)])


def _adjoint_conv(em: Emitter, g: ir.Value, w: ir.Value, win: Window) -> ir.Value | None:
    """dX of a stride-1 conv: Conv(dY, W flipped, channels swapped); None where it does not apply."""
    if any(s != 1 for s in win.strides) or w.shape is None:
        return None
    reach = [(k - 1) * d for k, d in zip(win.kernel, win.dilations, strict=True)]
    begin = [r - b for r, b in zip(reach, win.begin, strict=True)]
    end = [r - e for r, e in zip(reach, win.end, strict=True)]
    if any(v < 0 for v in begin + end):
        return None
    n = win.rank
    flipped = em.Transpose(w, perm=[1, 0, *range(2, n + 2)])
    for axis, k in zip(range(2, n + 2), win.kernel, strict=True):
        if k > 1:
            flipped = em.Gather(flipped, em.ints(list(range(k - 1, -1, -1))), axis=axis)
    return em.Conv(g, flipped, pads=[*begin, *end], dilations=list(win.dilations))


def _conv_transpose_window(node: ir.Node, x: ir.Value, w: ir.Value) -> Window:
    """ConvTranspose's geometry seen as the Conv it is the adjoint of: from Y's spatial shape to X's."""
    size = _spatial(node, x, "input")
    n = len(size)
    kernel = _ints(node, "kernel_shape", n, 0) if attr(node, "kernel_shape") else _spatial(node, w, "weight")
    strides, dilations = _ints(node, "strides", n, 1), _ints(node, "dilations", n, 1)
    extra = _ints(node, "output_padding", n, 0)
    full = [s * (m - 1) + p + d * (k - 1) + 1 for m, s, p, d, k in zip(size, strides, extra, dilations, kernel,
                                                                      strict=True)]
    auto_pad = attr(node, "auto_pad", "NOTSET")
    target = attr(node, "output_shape", None)
    if target or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        target = list(target)[-n:] if target else [m * s for m, s in zip(size, strides, strict=True)]
        total = [max(0, f - t) for f, t in zip(full, target, strict=True)]
        begin = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total]
        out = tuple(target)
    else:
        pads = [0] * (2 * n) if auto_pad == "VALID" else _ints(node, "pads", 2 * n, 0)
        begin = list(pads[:n])
        out = tuple(f - b - e for f, b, e in zip(full, begin, pads[n:], strict=True))
    return Window(out, size, kernel, strides, dilations, tuple(begin))


@register(
    "ConvTranspose",
    notes="dX = Conv(dY, W) with the effective pads (output_shape / SAME split as the spec and onnxruntime "
    "do: odd total padding at the end for SAME_UPPER, at the begin otherwise); dW: Conv's weight gradient with "
    "the roles of X and dY swapped (the same plans); dB = sum of dY. Spatial sizes must be static.",
)
def conv_transpose(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = conv(dy, w), dw = dy (*) x (the Conv weight gradient, roles swapped), db = sum(dy)"""
    x, w, g = node.inputs[0], node.inputs[1], dy[0]
    assert x is not None and w is not None and g is not None
    win = _conv_transpose_window(node, x, w)
    group = attr(node, "group", 1)
    return [_forward(em, g, w, win, group), _weight_grad_plans(em, g, x, win, group, w),
            *_bias_grad(em, node, g, win.rank)]


# ---------------------------------------------------------------------- pools
@register(
    "AveragePool",
    notes="dX = ConvTranspose of dY / divisor with a ones kernel, channels folded into the batch; the "
    "divisor per window is static: window taps inside the input (count_include_pad=0) or inside the "
    "padded input (count_include_pad=1; ceil_mode windows are clipped there, as onnxruntime does).",
)
def average_pool(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = sum over windows holding x of dy / divisor"""
    x, g = node.inputs[0], dy[0]
    assert x is not None and g is not None
    win, end = _pool_window(node, x)
    g = _per_channel(em, g, win.size_out)
    _, valid = win.taps()
    if valid.all():
        return [em.reshape_like(_spread(em, g, win, 1.0 / math.prod(win.kernel)), x)]
    if attr(node, "count_include_pad", 0):
        _, inside = Window(
            tuple(n + b + e for n, b, e in zip(win.size_in, win.begin, end, strict=True)), win.size_out,
            win.kernel, win.strides, win.dilations, (0,) * win.rank,
        ).taps()
        count = inside.sum(axis=0)
    else:
        count = valid.sum(axis=0)
    g = em.Mul(g, em.const((1.0 / np.maximum(count, 1)).reshape(1, 1, *win.size_out), like=x))
    return [em.reshape_like(_spread(em, g, win, 1.0), x)]


def _indices(em: Emitter, node: ir.Node, x: ir.Value) -> ir.Value:
    """The row-major Indices of node's windows: its own second output, or that of a MaxPool recomputed with
    the same windows."""
    y = node.outputs[0]
    if len(node.outputs) > 1 and node.outputs[1].name and not attr(node, "storage_order", 0):
        return node.outputs[1]
    names = ("auto_pad", "kernel_shape", "pads", "strides", "ceil_mode", "dilations")  # the window, as the node has it
    _, indices = em.op("MaxPool", x, _outputs=2, **{k: attr(node, k, None) for k in names})
    indices.dtype, indices.shape = ir.DataType.INT64, y.shape
    return indices


def _max_pool_scatter(em: Emitter, node: ir.Node, x: ir.Value, g: ir.Value, win: Window) -> ir.Value | None:
    """dX by ONE ScatterElements of dY through the Indices output (flat positions in X); None before opset 11,
    and for overlapping windows before opset 16 (two windows may pick one element: reduction="add")."""
    overlap = any(m > 1 and s < d * (k - 1) + 1
                  for m, k, s, d in zip(win.size_out, win.kernel, win.strides, win.dilations, strict=True))
    if not em.can_scatter("add" if overlap else None):
        return None
    assert x.dtype is not None
    flat = em.ints([-1])
    zeros = em.ConstantOfShape(em.Shape(em.Reshape(x, flat)),
                               value=ir.tensor(np.zeros(1, x.dtype.numpy()), dtype=x.dtype))
    zeros.dtype = x.dtype
    dx = em.scatter_elements(zeros, em.Reshape(_indices(em, node, x), flat), em.Reshape(g, flat), axis=0,
                             reduction="add" if overlap else None)
    return em.reshape_like(dx, x)


@register(
    "MaxPool",
    notes="dX: dY goes to each window's first maximum in row-major window order (the element the Indices "
    "output names; ties are not split). From opset 11 (16 for overlapping windows) one ScatterElements "
    "routes dY through the Indices of a recomputed MaxPool (or of the node's own Indices output); before, "
    "windows are gathered exactly with a static index table and the ArgMax routed back by a ConvTranspose "
    "with a one-hot kernel. The Indices output gets no gradient. Spatial sizes must be static.",
)
def max_pool(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = sum over windows holding x of dy * (x is the window's first maximum)"""
    x, g = node.inputs[0], dy[0]
    assert x is not None and g is not None
    win, _ = _pool_window(node, x)
    scattered = _max_pool_scatter(em, node, x, g, win)
    if scattered is not None:
        return [scattered]
    index, valid = win.taps()
    taps, count = index.shape
    size = math.prod(win.size_in)
    # window values, (taps, windows, N*C): whole rows gathered from x^T (a fast Gather along axis 0); taps
    # in the padding read an appended row of -inf
    columns = em.Transpose(em.Reshape(x, em.ints([-1, size])), perm=[1, 0])
    if not valid.all():
        hole = em.expand(em.const(np.full((1, 1), -np.inf), like=x), em.slice(columns, [0], [1], [0]))
        columns = em.Concat(columns, hole, axis=0)
        index = np.where(valid, index, size)
    windows = em.Reshape(em.Gather(columns, em.ints(index.reshape(-1)), axis=0), em.ints([taps, count, -1]))
    first = em.Transpose(em.ArgMax(windows, axis=0, keepdims=1), perm=[2, 0, 1])  # (N*C, 1, windows)
    tap = em.const(np.arange(taps).reshape(1, taps, 1), dtype=ir.DataType.INT64)
    routed = em.where(em.Equal(first, tap), em.Reshape(g, em.ints([-1, 1, count])), em.const(0.0, like=x))
    routed = em.Reshape(routed, em.ints([-1, taps, *win.size_out]))
    one_hot = em.const(np.eye(taps).reshape(taps, 1, *win.kernel), like=x)
    return [em.reshape_like(_adjoint(em, routed, one_hot, win), x)]


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
    win, _ = _pool_window(node, x)
    g = _per_channel(em, _lp_scale(em, g, y, p), win.size_out)
    return [em.Mul(em.reshape_like(_spread(em, g, win, 1.0), x), _lp_factor(em, x, p))]


def _spatial_count(em: Emitter, x: ir.Value, y: ir.Value) -> ir.Value:
    """How many spatial positions a global pool reduces, in x's dtype."""
    dims = None if x.shape is None else list(x.shape)[2:]
    if dims is not None and all(isinstance(d, int) for d in dims):
        return em.const(float(math.prod(dims)), like=x)  # type: ignore[arg-type]
    assert x.dtype is not None
    return em.Div(em.Cast(em.Size(x), to=x.dtype), em.Cast(em.Size(y), to=x.dtype))


@register("GlobalAveragePool")
def global_average_pool(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = broadcast(dy) / (spatial size)"""
    x, g = node.inputs[0], dy[0]
    assert x is not None and g is not None
    return [em.Div(em.expand(g, x), _spatial_count(em, x, node.outputs[0]))]


@register(
    "GlobalMaxPool",
    notes="dY goes to the first maximum in row-major spatial order (ties are not split). Spatial sizes must "
    "be static.",
)
def global_max_pool(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * (x is the first spatial maximum)"""
    x, g = node.inputs[0], dy[0]
    assert x is not None and g is not None
    count = math.prod(_spatial(node, x, "input"))
    first = em.ArgMax(em.Reshape(x, em.ints([0, 0, -1])), axis=2, keepdims=1)
    position = em.const(np.arange(count).reshape(1, 1, count), dtype=ir.DataType.INT64)
    return [em.Mul(em.reshape_like(em.mask(em.Equal(first, position), x), x), g)]


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
    size, kernel = tuple(int(v) for v in image), tuple(int(v) for v in block)
    n = len(size)
    strides, dilations = _ints(node, "strides", n, 1), _ints(node, "dilations", n, 1)
    pads = _ints(node, "pads", 2 * n, 0)
    out = tuple(_windows(*a, ceil=False) for a in zip(size, kernel, strides, dilations, pads[:n], pads[n:],
                                                       strict=True))
    index, valid = Window(size, out, kernel, strides, dilations, pads[:n]).taps()
    cols = em.Gather(em.Reshape(g, em.ints([-1, math.prod(size)])), em.ints(index.reshape(-1)), axis=1)
    if not valid.all():
        cols = em.Mul(cols, em.const(valid.reshape(1, -1), like=x))
    return [em.reshape_like(cols, x), None, None]



# ----------------------------------------------------------------- DeformConv
def _deform_corners(
    em: Emitter, pos: list[ir.Value], size: Sequence[int]
) -> tuple[ir.Value, ir.Value, list[ir.Value]]:
    """Multilinear sampling at fractional positions ``pos`` (one per axis, zero outside the input): the flat
    index of every corner (clipped inside), its weight (0 when outside), and per axis d(weight)/d(pos),
    each with the 2^n corners concatenated along the last axis."""
    n = len(size)
    like = pos[0]
    zero, one = em.const(0.0, like=like), em.const(1.0, like=like)
    low = [em.Floor(p) for p in pos]
    frac = [em.Sub(p, lo) for p, lo in zip(pos, low, strict=True)]
    rest = [em.Sub(one, f) for f in frac]
    strides = [math.prod(size[a + 1:]) for a in range(n)]
    flats, weights, slopes = [], [], [[] for _ in range(n)]
    for corner in np.ndindex(*([2] * n)):
        coord = [em.Add(low[a], one) if corner[a] else low[a] for a in range(n)]
        inside = None
        for a, c in enumerate(coord):
            ok = em.And(em.GreaterOrEqual(c, zero), em.LessOrEqual(c, em.const(size[a] - 1.0, like=like)))
            inside = ok if inside is None else em.And(inside, ok)
        assert inside is not None
        factor = [frac[a] if corner[a] else rest[a] for a in range(n)]
        flat = None
        for a, c in enumerate(coord):
            term = em.Mul(em.Min(em.Max(c, zero), em.const(size[a] - 1.0, like=like)), em.const(strides[a], like=like))
            flat = term if flat is None else em.Add(flat, term)
        flats.append(em.Cast(flat, to=ir.DataType.INT64))
        weight = em.mask(inside, like)
        for f in factor:
            weight = em.Mul(weight, f)
        weights.append(weight)
        for a in range(n):
            slope = em.mask(inside, like) if corner[a] else em.Neg(em.mask(inside, like))
            for b in range(n):
                if b != a:
                    slope = em.Mul(slope, factor[b])
            slopes[a].append(slope)
    return em.Concat(*flats, axis=3), em.Concat(*weights, axis=3), [em.Concat(*s, axis=3) for s in slopes]


@register(
    "DeformConv",
    since=19,
    notes="built from Gather/ScatterElements(reduction=add), valid from opset 19: the bilinear (multilinear "
    "in N-D) samples are regathered with GatherElements, dW and the column gradient are batched MatMuls per "
    "group, dX scatter-adds the column gradient into the 2^n sampling corners, d(offset) is the sampled "
    "slope, d(mask) the unmasked samples. Undefined where a sampling coordinate is an integer (the "
    "interpolation has a kink there). Spatial sizes and the channel count must be static.",
)
def deform_conv(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """y = W * cols + b, cols = mask * bilinear(x, base + offset): dW = dy cols^T, dcols = W^T dy, ..."""
    x, w, off, g = node.inputs[0], node.inputs[1], node.inputs[2], dy[0]
    mask = node.inputs[4] if len(node.inputs) > 4 else None
    assert x is not None and w is not None and off is not None and g is not None
    size = _spatial(node, x, "input")
    n = len(size)
    kernel = _ints(node, "kernel_shape", n, 0) if attr(node, "kernel_shape") else _spatial(node, w, "weight")
    strides, dilations = _ints(node, "strides", n, 1), _ints(node, "dilations", n, 1)
    pads = _ints(node, "pads", 2 * n, 0)
    out = tuple(_windows(*a, ceil=False) for a in zip(size, kernel, strides, dilations, pads[:n], pads[n:],
                                                       strict=True))
    win = Window(size, out, kernel, strides, dilations, pads[:n])
    group, og = attr(node, "group", 1), attr(node, "offset_group", 1)
    channels = list(x.shape)[1] if x.shape is not None else None
    if not isinstance(channels, int):
        raise ValueError(f"DeformConv '{node.name}': the gradient needs the static channel count of '{x.name}'")
    taps, count = math.prod(kernel), math.prod(out)
    tp = taps * count
    # sampling positions, (N, og, 1, taps * count) per axis
    parts = em.split(em.Reshape(off, em.ints([0, og, taps, n, count])), [1] * n, axis=3)
    for part in parts:  # the emitter types only a node's first output
        part.dtype = off.dtype
    pos = [
        em.Add(em.Reshape(p, em.ints([0, og, 1, tp])), em.const(base.reshape(1, 1, 1, tp), like=x))
        for p, base in zip(parts, win.positions(), strict=True)
    ]
    flat, weight, slopes = _deform_corners(em, pos, size)
    corners = 2**n
    index = em.Expand(flat, em.ints([1, 1, channels // og, 1]))  # (N, og, C/og, corners * tp)
    x4 = em.Reshape(x, em.ints([0, og, -1, math.prod(size)]))
    values = em.GatherElements(x4, index, axis=3)

    def corner_sum(v: ir.Value) -> ir.Value:  # (N, og, C/og, corners * tp) -> (N, og, C/og, tp)
        return em.reduce_sum(em.Reshape(v, em.ints([0, og, -1, corners, tp])), [3], keepdims=False)

    samples = corner_sum(em.Mul(values, weight))
    m = None if mask is None else em.Reshape(mask, em.ints([0, og, 1, tp]))
    cols = samples if m is None else em.Mul(samples, m)
    # the convolution proper: per group, y = W_g @ cols_g
    g4 = em.Reshape(g, em.ints([0, group, -1, count]))  # (N, group, M/group, count)
    cols4 = em.Reshape(cols, em.ints([0, group, -1, count]))  # (N, group, C/group * taps, count)
    dw = em.reduce_sum(em.MatMul(g4, em.Transpose(cols4, perm=[0, 1, 3, 2])), [0], keepdims=False)
    w4 = em.Reshape(w, em.ints([1, group, -1, channels // group * taps]))
    dcols = em.Reshape(em.MatMul(em.Transpose(w4, perm=[0, 1, 3, 2]), g4), em.ints([0, og, -1, tp]))
    dsamples = dcols if m is None else em.Mul(dcols, m)
    # dx: scatter-add into the sampling corners
    updates = em.Mul(em.Concat(*([dsamples] * corners), axis=3), weight)
    assert x.dtype is not None
    zero = ir.tensor(np.zeros(1, dtype=x.dtype.numpy()), dtype=x.dtype)
    zeros = em.Reshape(em.ConstantOfShape(em.shape_of(x), value=zero), em.ints([0, og, -1, math.prod(size)]))
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
