"""Window geometry: what a Conv, ConvTranspose, pool, Col2Im or DeformConv node's attributes say about the
window it slides over the spatial axes.

``Window`` holds that geometry once, from the side the window reads (``size_in``) to the side it writes
(``size_out``). The adjoint of a windowed sum is a ConvTranspose with the same strides, dilations and begin
pads, whose end pads and output_padding (``Window.end``, ``Window.extra``) put back the rows a strided window
never reached: ``adjoint`` emits it, ``forward`` the Conv it is the adjoint of. Sizes known only at run time
are None: what the attributes still fix (kernel, strides, the end pad a window never passes) stays static,
the adjoint takes output_padding stride - 1 and a Slice to the run-time size, and auto_pad SAME over such
sizes pads with pads computed from Shape (``padded`` / ``unpad``) and slides a VALID window.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import Emitter, arange_of_size, attr, same_dim


@dataclass(frozen=True)
class Window:
    """A sliding window per spatial axis: ``size_out`` windows over ``size_in`` (begin-padded by ``begin``).

    A size known only at run time is None. What the structure still fixes then is kept: ``hint``, the spill
    (see ``_spill``) where it does not depend on the sizes (stride 1: minus the end pad), and ``bound``, an end
    pad at least ``end`` (the forward's own end pad, plus stride - 1 under ceil_mode). ``source`` is a value whose
    axes 2.. have the sizes ``size_in`` at run time (before ``run_pads``, auto_pad SAME's pads computed at run
    time, 1-D int64 [begins, ends], are applied: the window then slides over the padded value, begins 0). ``top``:
    the largest spill the run-time sizes can give, where the structure bounds it (s - 1 - the end pad without
    ceil_mode: the last window starts less than a stride before the end of the padded input)."""

    size_in: tuple[int | None, ...]
    size_out: tuple[int | None, ...]
    kernel: tuple[int, ...]
    strides: tuple[int, ...]
    dilations: tuple[int, ...]
    begin: tuple[int, ...]
    hint: tuple[int | None, ...] | None = None
    bound: tuple[int, ...] | None = None
    source: ir.Value | None = field(default=None, compare=False)
    run_pads: ir.Value | None = field(default=None, compare=False)
    top: tuple[int | None, ...] | None = None

    @property
    def rank(self) -> int:
        return len(self.size_in)

    @property
    def static(self) -> bool:
        """Whether every size is known (the window's tables and pads are then numbers)."""
        return all(isinstance(v, int) for v in (*self.size_in, *self.size_out)) and self.run_pads is None

    def _spill(self) -> list[int | None]:
        """Input rows past the last window's reach (> 0), or window rows past the input (< 0); None where it
        depends on sizes known only at run time."""
        out: list[int | None] = []
        for a, (n, m, k, s, d, b) in enumerate(zip(
                self.size_in, self.size_out, self.kernel, self.strides, self.dilations, self.begin, strict=True)):
            if n is not None and m is not None:
                out.append(n + b - (s * (m - 1) + d * (k - 1) + 1))
            else:
                out.append(None if self.hint is None else self.hint[a])
        return out

    @property
    def end(self) -> tuple[int | None, ...]:
        """End pads that make the window reach exactly as far as the last window does."""
        return tuple(None if r is None else max(0, -r) for r in self._spill())

    @property
    def extra(self) -> tuple[int | None, ...]:
        """Input rows no window reads: the adjoint's output_padding."""
        return tuple(None if r is None else max(0, r) for r in self._spill())

    @property
    def pads(self) -> list[int]:
        """Begin and end pads with which the windows reach exactly to the last one (or, where that depends on
        run-time sizes, at least to it: ``bound``)."""
        assert self.bound is not None or None not in self.end
        return [*self.begin, *(e if e is not None else self.bound[a]  # type: ignore[index]
                               for a, e in enumerate(self.end))]

    @property
    def may_drop(self) -> bool:
        """Under ceil_mode over run-time sizes: whether a Conv with end pads ``bound`` may find one window more than
        the pool keeps (one that would start in the end pad: possible where end pad + stride > reach)."""
        assert self.bound is not None  # a last window starts at its stride's first row past the padded input
        return any(b > d * (k - 1) for b, d, k in zip(self.bound, self.dilations, self.kernel, strict=True))

    @property
    def one_window(self) -> bool:
        """True when a single window covers the input exactly (no pads, no dilation)."""
        return not any(self.begin) and self.run_pads is None and all(
            m == 1 and k == n and d == 1
            for n, m, k, d in zip(self.size_in, self.size_out, self.kernel, self.dilations, strict=True)
        )

    @property
    def overlapping(self) -> bool:
        """True when two windows along some axis (may) share an input row."""
        return any((m is None or m > 1) and s < d * (k - 1) + 1
                   for m, k, s, d in zip(self.size_out, self.kernel, self.strides, self.dilations, strict=True))

    def positions(self) -> list[np.ndarray]:
        """Per axis, the input coordinate each window tap (row-major over the kernel, first axis) reads for each
        window (row-major, second axis), in unpadded coordinates (static sizes only)."""
        size_out = [int(m) for m in self.size_out]  # type: ignore[arg-type]
        grids = np.meshgrid(
            *[np.arange(k) for k in self.kernel], *[np.arange(m) for m in size_out], indexing="ij"
        )
        n, shape = self.rank, (math.prod(self.kernel), math.prod(size_out))
        return [
            (grids[n + a] * self.strides[a] - self.begin[a] + grids[a] * self.dilations[a]).reshape(shape)
            for a in range(n)
        ]

    def taps(self) -> tuple[np.ndarray, np.ndarray]:
        """(index, valid): for each window tap and each window (see ``positions``), the flat position it reads
        in the unpadded input (clipped into it), and whether that position is inside it (static sizes only)."""
        pos = self.positions()
        size_in = tuple(int(n) for n in self.size_in)  # type: ignore[arg-type]
        valid = np.logical_and.reduce([(p >= 0) & (p < size) for p, size in zip(pos, size_in, strict=True)])
        clipped = [np.clip(p, 0, size - 1) for p, size in zip(pos, size_in, strict=True)]
        return np.ravel_multi_index(clipped, size_in).astype(np.int64), valid


# ------------------------------------------------------------------ from node attributes
Sizes = tuple[int | None, ...]


def spatial(node: ir.Node, v: ir.Value | None, what: str) -> tuple[int, ...]:
    """The static spatial dims (axes 2..) of ``v``, for a gradient that needs them as numbers."""
    assert v is not None
    dims = None if v.shape is None else list(v.shape)[2:]
    if dims is None or not all(isinstance(d, int) for d in dims):
        raise ValueError(
            f"{node.op_type} '{node.name}': the gradient needs the static spatial shape of its {what} "
            f"'{v.name}' (got {v.shape}): give the node kernel_shape or the weight a static shape"
        )
    return tuple(int(d) for d in dims)  # type: ignore[arg-type]


def spatial_sizes(node: ir.Node, v: ir.Value | None, what: str) -> Sizes:
    """The spatial dims (axes 2..) of ``v``, None where known only at run time; its rank must be known."""
    assert v is not None
    if v.shape is None:
        raise ValueError(f"{node.op_type} '{node.name}': the gradient needs the rank of its {what} '{v.name}'")
    return tuple(d if isinstance(d, int) else None for d in list(v.shape)[2:])


def ints(node: ir.Node, name: str, n: int, default: int) -> tuple[int, ...]:
    """An ints attribute, or ``n`` times ``default`` when absent (or empty)."""
    value = attr(node, name, None)
    return tuple(int(v) for v in value) if value else (default,) * n


def same_pads(auto_pad: str, size: Sequence[int | None], kernel: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int]) -> tuple[list[int | None], list[int | None]]:
    """Begin and end pads of auto_pad SAME_UPPER (odd pad at the end) / SAME_LOWER (at the begin); None where
    they depend on a size known only at run time (a stride > 1)."""
    begin: list[int | None] = []
    end: list[int | None] = []
    for n, k, s, d in zip(size, kernel, strides, dilations, strict=True):
        if n is None and s != 1:
            begin.append(None)
            end.append(None)
            continue
        total = d * (k - 1) if n is None else max(0, (-(-n // s) - 1) * s + d * (k - 1) + 1 - n)
        b = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        begin.append(b)
        end.append(total - b)
    return begin, end


def explicit_pads(node: ir.Node, size: Sequence[int | None], kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int]) -> tuple[list[int | None], list[int | None]]:
    """Begin and end pads as numbers, whether the node gives ``pads`` or ``auto_pad`` (None: known only at run
    time, see ``same_pads``)."""
    n = len(size)
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        return same_pads(auto_pad, size, kernel, strides, dilations)
    if auto_pad == "VALID":
        return [0] * n, [0] * n
    pads = ints(node, "pads", 2 * n, 0)
    return list(pads[:n]), list(pads[n:])


def window_count(size: int, k: int, s: int, d: int, b: int, e: int, ceil: bool = False) -> int:
    """How many windows fit; with ceil_mode a last window may hang over, unless it starts in the end pad."""
    span = size + b + e - d * (k - 1) - 1
    count = (span + s - 1) // s + 1 if ceil else span // s + 1
    if ceil and (count - 1) * s >= size + b:
        count -= 1
    return count


def _padded_window(size: Sizes, kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
                   begin: Sequence[int], end: Sequence[int], ceil: bool = False,
                   source: ir.Value | None = None) -> Window:
    out = tuple(None if n is None else window_count(n, *a, ceil=ceil)
                for n, *a in zip(size, kernel, strides, dilations, begin, end, strict=True))
    hint = tuple(-e if s == 1 and not ceil else None for s, e in zip(strides, end, strict=True))
    bound = tuple(e + (s - 1 if ceil else 0) for s, e in zip(strides, end, strict=True))
    top = None if ceil else tuple(s - 1 - e for s, e in zip(strides, end, strict=True))
    return Window(tuple(size), out, tuple(kernel), tuple(strides), tuple(dilations), tuple(begin), hint, bound,
                  source, top=top)


def _needs_runtime_pads(em: Emitter | None, node: ir.Node, x: ir.Value, what: str) -> ValueError:
    """The error for a window whose pads depend on sizes known only at run time, where Pad takes no run-time pads."""
    return ValueError(
        f"{node.op_type} '{node.name}': {what} known only at run time ('{x.name}': {x.shape}) needs Pad with "
        "run-time pads (opset >= 11)" + ("" if em is None else f", the model has opset {em.opset}")
        + ": make the spatial sizes static or convert the model to a newer opset"
    )


def _run_time_same(em: Emitter | None, node: ir.Node, x: ir.Value, kernel: Sequence[int], strides: Sequence[int],
                   dilations: Sequence[int]) -> Window:
    """auto_pad SAME over sizes known only at run time: the pads computed from Shape(x), 1-D int64
    [begins, ends], total = max(0, (ceil(n / s) - 1) * s + d * (k - 1) + 1 - n), and a VALID window over x
    padded by them."""
    auto_pad = attr(node, "auto_pad", "NOTSET")
    if em is None or not em.runtime_pads:
        raise _needs_runtime_pads(em, node, x, f"auto_pad {auto_pad} with strides {list(strides)} over spatial "
                                               "sizes")
    n = len(kernel)
    i64 = ir.DataType.INT64
    size = em.dims(x, range(2, n + 2))
    size = em.ints(size) if isinstance(size, list) else size
    s = em.ints(strides)
    reach = [d * (k - 1) + 1 for k, d in zip(kernel, dilations, strict=True)]
    count = em.Div(em.Add(size, em.ints([v - 1 for v in strides])), s)
    raw = em.Sub(em.Add(em.Mul(em.Sub(count, em.ints([1] * n)), s), em.ints(reach)), size)
    total = em.Div(em.Add(raw, em.Abs(raw)), em.ints([2] * n))  # max(0, raw)
    half = em.Div(total, em.ints([2] * n))
    begin = half if auto_pad == "SAME_UPPER" else em.Sub(total, half)
    pads = em.Concat(begin, em.Sub(total, begin), axis=0)
    pads.dtype, pads.shape = i64, ir.Shape([2 * n])
    hint = tuple(0 if r >= s_ else None for r, s_ in zip(reach, strides, strict=True))
    unknown = (None,) * n
    return Window(unknown, unknown, tuple(kernel), tuple(strides), tuple(dilations), (0,) * n, hint, (0,) * n, x,
                  pads)


def _kernel(node: ir.Node, w: ir.Value, n: int) -> tuple[int, ...]:
    return ints(node, "kernel_shape", n, 0) if attr(node, "kernel_shape") else spatial(node, w, "weight")


def conv_window(node: ir.Node, x: ir.Value, w: ir.Value, em: Emitter | None = None) -> Window:
    """Conv's geometry, from X's spatial shape to Y's (``em`` emits the pads that only the run time knows)."""
    size = spatial_sizes(node, x, "input")
    n = len(size)
    kernel = _kernel(node, w, n)
    strides, dilations = ints(node, "strides", n, 1), ints(node, "dilations", n, 1)
    begin, end = explicit_pads(node, size, kernel, strides, dilations)
    if None in begin:
        return _run_time_same(em, node, x, kernel, strides, dilations)
    return _padded_window(size, kernel, strides, dilations, begin, end, source=x)  # type: ignore[arg-type]


def pool_window(node: ir.Node, x: ir.Value, em: Emitter | None = None) -> tuple[Window, tuple[int, ...]]:
    """A pool's geometry (X to Y) and its own end pads."""
    size = spatial_sizes(node, x, "input")
    n = len(size)
    kernel = ints(node, "kernel_shape", n, 1)
    strides, dilations = ints(node, "strides", n, 1), ints(node, "dilations", n, 1)
    begin, end = explicit_pads(node, size, kernel, strides, dilations)
    ceil = bool(attr(node, "ceil_mode", 0))
    if None in begin:
        return _run_time_same(em, node, x, kernel, strides, dilations), (0,) * n
    return (_padded_window(size, kernel, strides, dilations, begin, end, ceil, x),  # type: ignore[arg-type]
            tuple(end))  # type: ignore[arg-type]


def pool_counts(win: Window, end: Sequence[int], include_pad: bool) -> np.ndarray | None:
    """AveragePool's divisor per window (row-major): the window taps inside the input, or inside the padded
    input with ``include_pad`` (ceil_mode windows are clipped there, as onnxruntime does); None when every
    window lies whole inside the input (the divisor is the kernel size). Static sizes only."""
    _, valid = win.taps()
    if valid.all():
        return None
    if not include_pad:
        return valid.sum(axis=0)
    padded = tuple(n + b + e for n, b, e in zip(win.size_in, win.begin, end, strict=True))  # type: ignore[operator]
    _, inside = Window(padded, win.size_out, win.kernel, win.strides, win.dilations, (0,) * win.rank).taps()
    return inside.sum(axis=0)


def conv_transpose_window(node: ir.Node, x: ir.Value, w: ir.Value, em: Emitter | None = None) -> Window:
    """ConvTranspose's geometry seen as the Conv it is the adjoint of: from Y's spatial shape to X's. With
    output_shape over an input size known only at run time, the pads are computed at run time (``em``)."""
    size = spatial_sizes(node, x, "input")
    n = len(size)
    kernel = _kernel(node, w, n)
    strides, dilations = ints(node, "strides", n, 1), ints(node, "dilations", n, 1)
    extra = ints(node, "output_padding", n, 0)
    reach = [d * (k - 1) + 1 for k, d in zip(kernel, dilations, strict=True)]
    full = [None if m is None else s * (m - 1) + p + r for m, s, p, r in zip(size, strides, extra, reach,
                                                                           strict=True)]
    auto_pad = attr(node, "auto_pad", "NOTSET")
    target = attr(node, "output_shape", None)
    if target and None in full:
        return _run_time_transpose_pads(em, node, x, list(target)[-n:], strides, extra, reach, kernel, dilations)
    if target or auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        if target:
            target = list(target)[-n:]
            total = [max(0, f - t) for f, t in zip(full, target, strict=True)]  # type: ignore[operator]
        else:  # SAME: target = m * s, so total = max(0, output_padding + reach - s) whatever m
            target = [None if m is None else m * s for m, s in zip(size, strides, strict=True)]
            total = [max(0, p + r - s) for p, r, s in zip(extra, reach, strides, strict=True)]
        begin = [t // 2 if auto_pad == "SAME_UPPER" else t - t // 2 for t in total]
        out = tuple(target)
        end = [t - b for t, b in zip(total, begin, strict=True)]
    else:
        pads = [0] * (2 * n) if auto_pad == "VALID" else ints(node, "pads", 2 * n, 0)
        begin, end = list(pads[:n]), list(pads[n:])
        out = tuple(None if f is None else f - b - e for f, b, e in zip(full, begin, end, strict=True))
    hint = tuple(p - e for p, e in zip(extra, end, strict=True))  # rows past the last window: output_padding
    return Window(out, size, kernel, strides, dilations, tuple(begin), hint, tuple(max(0, -h) for h in hint),
                  node.outputs[0])


def _run_time_transpose_pads(em: Emitter | None, node: ir.Node, x: ir.Value, target: Sequence[int],
                             strides: Sequence[int], extra: Sequence[int], reach: Sequence[int],
                             kernel: Sequence[int], dilations: Sequence[int]) -> Window:
    """ConvTranspose with output_shape over an input size known only at run time: total padding
    s * (m - 1) + output_padding + reach - target (m from Shape(X)), split as ``conv_transpose_window`` does,
    and a VALID window over dY padded by it."""
    if em is None or not em.runtime_pads:
        raise _needs_runtime_pads(em, node, x, "output_shape over an input size")
    n = len(target)
    upper = attr(node, "auto_pad", "NOTSET") == "SAME_UPPER"
    m = em.dims(x, range(2, n + 2))
    m = em.ints(m) if isinstance(m, list) else m
    s = em.ints(strides)
    raw = em.Add(em.Mul(em.Sub(m, em.ints([1] * n)), s),
                 em.ints([p + r - t for p, r, t in zip(extra, reach, target, strict=True)]))
    total = em.Div(em.Add(raw, em.Abs(raw)), em.ints([2] * n))  # max(0, raw)
    half = em.Div(total, em.ints([2] * n))
    begin = half if upper else em.Sub(total, half)
    pads = em.Concat(begin, em.Sub(total, begin), axis=0)
    pads.dtype, pads.shape = ir.DataType.INT64, ir.Shape([2 * n])
    unknown = (None,) * n
    return Window(unknown, unknown, tuple(kernel), tuple(strides), tuple(dilations), (0,) * n, (None,) * n,
                  (0,) * n, node.outputs[0], pads)


def col2im_window(node: ir.Node, size: Sequence[int], kernel: Sequence[int]) -> Window:
    """Col2Im's blocks over its image (``image_shape`` and ``block_shape`` given as numbers)."""
    n = len(size)
    pads = ints(node, "pads", 2 * n, 0)
    return _padded_window(size, kernel, ints(node, "strides", n, 1), ints(node, "dilations", n, 1), pads[:n],
                          pads[n:])


def deform_conv_window(node: ir.Node, x: ir.Value, w: ir.Value) -> Window:
    """DeformConv's undeformed geometry, from X's spatial shape to Y's (explicit pads only)."""
    size = spatial_sizes(node, x, "input")
    n = len(size)
    pads = ints(node, "pads", 2 * n, 0)
    return _padded_window(size, _kernel(node, w, n), ints(node, "strides", n, 1), ints(node, "dilations", n, 1),
                          pads[:n], pads[n:], source=x)


# ------------------------------------------------------------------ the window as ops
def run_time_positions(em: Emitter, win: Window, out: ir.Value, like: ir.Value) -> list[ir.Value]:
    """``Window.positions`` over run-time sizes, per axis flattened to (1, 1, 1, taps * windows) in like's
    dtype: window index * stride - begin + tap index * dilation, the windows counted from ``out``'s axes 2..."""
    n = win.rank
    sizes = em.Gather(em.shape_of(out), em.ints(range(2, n + 2)))
    assert like.dtype is not None
    taps = np.meshgrid(*[np.arange(k) for k in win.kernel], indexing="ij")
    found = []
    for a in range(n):
        index = em.Reshape(em.Cast(em.arange(em.dim(out, 2 + a)), to=like.dtype),
                           em.ints([-1 if i == a else 1 for i in range(n)]))
        grid = em.Reshape(em.Expand(index, sizes), em.ints([1, -1]))  # (1, windows), row-major
        offset = (taps[a] * win.dilations[a] - win.begin[a]).reshape(-1, 1)  # (taps, 1)
        pos = em.Add(em.Mul(grid, em.const(float(win.strides[a]), like=like)), em.const(offset, like=like))
        found.append(em.Reshape(pos, em.ints([1, 1, 1, -1])))
    return found



def crop(em: Emitter, v: ir.Value, sizes: Sequence[int], over: Sequence[int]) -> ir.Value:
    """v[:, :, :sizes...] when some ``over`` (how far the result may exceed ``sizes``) is positive."""
    if not any(o > 0 for o in over):
        return v
    n = len(sizes)
    return em.slice(v, [0] * n, list(sizes), list(range(2, n + 2)))


def crop_to(em: Emitter, v: ir.Value, like: ir.Value | None, axes: Sequence[int]) -> ir.Value:
    """v cut to like's run-time sizes along the spatial ``axes`` (0 is axis 2): a Slice with run-time ends
    (opset 10), else a Gather of the first positions along each axis."""
    if not axes:
        return v
    if like is None:
        raise ValueError("cutting a window's gradient to a run-time size needs the value that has that size")
    onnx_axes = [2 + a for a in axes]
    rank = None if v.shape is None else v.shape.rank()
    if em.opset >= 10 and rank is not None and like.shape is not None and like.shape.rank() == rank and all(
            same_dim(v.shape[i], like.shape[i]) for i in range(2)):  # type: ignore[index]
        out = em.Slice(v, em.ints([0] * rank), em.shape_of(like))  # every axis: like's whole shape as the ends
    elif em.opset >= 10:
        out = em.Slice(v, em.ints([0] * len(axes)), em.Gather(em.shape_of(like), em.ints(onnx_axes)),
                       em.ints(onnx_axes))
    else:
        out = v
        for a in onnx_axes:
            out = em.Gather(out, arange_of_size(em, em.dim(like, a)), axis=a)
    out.dtype = v.dtype
    if v.shape is not None:
        out.shape = ir.Shape([None if i in onnx_axes else d for i, d in enumerate(v.shape)])
    return out


def padded(em: Emitter, v: ir.Value, win: Window, value: float = 0.0) -> ir.Value:
    """v padded by the window's run-time pads (auto_pad SAME over run-time sizes), filled with ``value``."""
    if win.run_pads is None:
        return v
    n = win.rank
    zero = em.ints([0, 0])
    pads = em.Concat(zero, em.slice(win.run_pads, [0], [n], [0]), zero, em.slice(win.run_pads, [n], [2 * n], [0]),
                     axis=0)
    out = em.Pad(v, pads, em.const(value, like=v)) if value else em.Pad(v, pads)
    out.dtype = v.dtype
    if v.shape is not None:  # the rank, and the batch and channels, carry over
        out.shape = ir.Shape([*list(v.shape)[:2], *[None] * n])
    return out


def unpad(em: Emitter, v: ir.Value, win: Window) -> ir.Value:
    """The inverse cut of ``padded``: v[..., begin : begin + n] with n the source's run-time sizes."""
    if win.run_pads is None:
        return v
    n = win.rank
    begin = em.slice(win.run_pads, [0], [n], [0])
    assert win.source is not None
    ends = em.Add(begin, em.Gather(em.shape_of(win.source), em.ints(range(2, n + 2))))
    out = em.Slice(v, begin, ends, em.ints(range(2, n + 2)))
    out.dtype = v.dtype
    return out


def adjoint(em: Emitter, g: ir.Value, kernel: ir.Value, win: Window, group: int = 1) -> ir.Value:
    """The adjoint of a window op whose output gradient is g: a ConvTranspose back to ``size_in``. Where the
    rows no window reads depend on run-time sizes, output_padding stride - 1 (and no end pad) covers the input
    whatever they are, and a Slice cuts the result to the source's run-time size. Where the spill is at most
    ``top``, output_padding minus end pad = top is enough (the output is then S + top - spill rows)."""
    extra, end = list(win.extra), list(win.end)
    if None not in extra and win.run_pads is None:
        return em.ConvTranspose(
            g, kernel, strides=list(win.strides), dilations=list(win.dilations), group=group, pads=win.pads,
            output_padding=extra if any(extra) else None,
        )
    unknown = [a for a, e in enumerate(extra) if e is None]
    top = win.top if win.top is not None and win.run_pads is None else (None,) * win.rank
    for a in unknown:
        if top[a] is not None and top[a] < win.strides[a]:  # type: ignore[operator]
            extra[a], end[a] = max(0, top[a]), max(0, -top[a])  # type: ignore[operator]
    extra = [s - 1 if e is None else e for e, s in zip(extra, win.strides, strict=True)]
    out = em.ConvTranspose(
        g, kernel, strides=list(win.strides), dilations=list(win.dilations), group=group,
        pads=[*win.begin, *(0 if e is None else e for e in end)], output_padding=extra if any(extra) else None,
    )
    out.dtype = g.dtype
    channels = None if kernel.shape is None else kernel.shape[1]
    if g.shape is not None and out.shape is None:  # (N, channels, *unknown): crop_to may then take like's shape
        out.shape = ir.Shape([g.shape[0], channels * group if isinstance(channels, int) else None,
                              *[None] * win.rank])
    return unpad(em, out, win) if win.run_pads is not None else crop_to(em, out, win.source, unknown)


def forward(em: Emitter, g: ir.Value, kernel: ir.Value, win: Window, group: int = 1,
            like: ir.Value | None = None) -> ir.Value:
    """A Conv over ``size_in`` with the window's geometry: the adjoint of ``adjoint`` (``like``: a value with
    the sizes ``size_out`` at run time, for the windows past them to be cut off)."""
    out = em.Conv(padded(em, g, win), kernel, strides=list(win.strides), dilations=list(win.dilations), group=group,
                  pads=win.pads)
    over = [None if e is None else e - s + 1 for e, s in zip(win.extra, win.strides, strict=True)]
    late = [a for a, (o, m) in enumerate(zip(over, win.size_out, strict=True)) if (o is None or o > 0) and m is None]
    if late:
        return crop_to(em, out, like, late)
    return crop(em, out, win.size_out, over)  # type: ignore[arg-type]


def ones_over(em: Emitter, win: Window, like: ir.Value) -> ir.Value:
    """Ones of shape (1, 1, *size_in) at run time (the source's spatial sizes), in like's dtype."""
    assert win.source is not None
    n = win.rank
    sizes = em.dims(win.source, range(2, n + 2))
    shape = em.cat_ints([1, 1], sizes)
    shape.shape = ir.Shape([n + 2])
    out = em.full(shape, 1.0, like=like)
    out.shape = ir.Shape([1, 1, *win.size_in])
    return out


def whole_windows(win: Window, end: Sequence[int], ceil: bool) -> bool:
    """Whether every window lies whole inside the input whatever the run-time sizes: no pads, no ceil_mode."""
    return not any(win.begin) and not any(end) and win.run_pads is None and not ceil


def window_counts(em: Emitter, win: Window, end: Sequence[int], include_pad: bool, ceil: bool,
                  dy: ir.Value) -> ir.Value:
    """AveragePool's divisor per window at run time, (1, 1, *size_out): a Conv with a ones kernel over ones of
    the input's shape, zero-padded (``include_pad``: one-padded by the pool's own pads, zero-padded past them, as
    onnxruntime clips ceil_mode windows there); cut to dY's windows where ceil_mode's end pads hold one more."""
    n = win.rank
    ones = ones_over(em, win, dy)
    kernel = em.const(np.ones((1, 1, *win.kernel)), like=dy)
    if win.run_pads is not None:
        ones = padded(em, ones, win, 1.0 if include_pad else 0.0)
        pads = win.pads
    elif include_pad:
        spread = [0, 0, *win.begin, 0, 0, *end]
        ones = em.Pad(ones, em.ints(spread), em.const(1.0, like=dy)) if em.runtime_pads else em.Pad(
            ones, pads=spread, value=1.0)
        pads = [0] * n + [max(0, b - e) for b, e in zip(win.pads[n:], end, strict=True)]
    else:
        pads = win.pads
    count = em.Conv(ones, kernel, strides=list(win.strides), dilations=list(win.dilations), pads=pads)
    return crop_to(em, count, dy, list(range(n))) if ceil and win.may_drop else count
