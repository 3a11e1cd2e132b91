"""Window geometry: what a Conv, ConvTranspose, pool, Col2Im or DeformConv node's attributes say about the
window it slides over the spatial axes.

``Window`` holds that geometry once, from the side the window reads (``size_in``) to the side it writes
(``size_out``). The adjoint of a windowed sum is a ConvTranspose with the same strides, dilations and begin
pads, whose end pads and output_padding (``Window.end``, ``Window.extra``) put back the rows a strided window
never reached: ``adjoint`` emits it, ``forward`` the Conv it is the adjoint of. Spatial sizes must be static
(the batch size may vary): pads, output_padding and window tables are attributes and constants.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import Emitter, attr


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

    @property
    def one_window(self) -> bool:
        """True when a single window covers the input exactly (no pads, no dilation)."""
        return not any(self.begin) and all(
            m == 1 and k == n and d == 1
            for n, m, k, d in zip(self.size_in, self.size_out, self.kernel, self.dilations, strict=True)
        )

    @property
    def overlapping(self) -> bool:
        """True when two windows along some axis share an input row."""
        return any(m > 1 and s < d * (k - 1) + 1
                   for m, k, s, d in zip(self.size_out, self.kernel, self.strides, self.dilations, strict=True))

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


# ------------------------------------------------------------------ from node attributes
def spatial(node: ir.Node, v: ir.Value | None, what: str) -> tuple[int, ...]:
    """The static spatial dims (axes 2..) of ``v``; the gradient needs them as attributes."""
    assert v is not None
    dims = None if v.shape is None else list(v.shape)[2:]
    if dims is None or not all(isinstance(d, int) for d in dims):
        raise ValueError(
            f"{node.op_type} '{node.name}': the gradient needs the static spatial shape of its {what} "
            f"'{v.name}' (got {v.shape}); only the batch dimension may be dynamic"
        )
    return tuple(int(d) for d in dims)  # type: ignore[arg-type]


def ints(node: ir.Node, name: str, n: int, default: int) -> tuple[int, ...]:
    """An ints attribute, or ``n`` times ``default`` when absent (or empty)."""
    value = attr(node, name, None)
    return tuple(int(v) for v in value) if value else (default,) * n


def same_pads(auto_pad: str, size: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
              dilations: Sequence[int]) -> tuple[list[int], list[int]]:
    """Begin and end pads of auto_pad SAME_UPPER (odd pad at the end) / SAME_LOWER (at the begin)."""
    begin, end = [], []
    for n, k, s, d in zip(size, kernel, strides, dilations, strict=True):
        total = max(0, (-(-n // s) - 1) * s + d * (k - 1) + 1 - n)
        b = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
        begin.append(b)
        end.append(total - b)
    return begin, end


def explicit_pads(node: ir.Node, size: Sequence[int], kernel: Sequence[int], strides: Sequence[int],
                  dilations: Sequence[int]) -> tuple[list[int], list[int]]:
    """Begin and end pads as numbers, whether the node gives ``pads`` or ``auto_pad``."""
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


def _padded_window(size: Sequence[int], kernel: Sequence[int], strides: Sequence[int], dilations: Sequence[int],
                   begin: Sequence[int], end: Sequence[int], ceil: bool = False) -> Window:
    out = tuple(window_count(*a, ceil=ceil) for a in zip(size, kernel, strides, dilations, begin, end, strict=True))
    return Window(tuple(size), out, tuple(kernel), tuple(strides), tuple(dilations), tuple(begin))


def _kernel(node: ir.Node, w: ir.Value, n: int) -> tuple[int, ...]:
    return ints(node, "kernel_shape", n, 0) if attr(node, "kernel_shape") else spatial(node, w, "weight")


def conv_window(node: ir.Node, x: ir.Value, w: ir.Value) -> Window:
    """Conv's geometry, from X's spatial shape to Y's."""
    size = spatial(node, x, "input")
    n = len(size)
    kernel = _kernel(node, w, n)
    strides, dilations = ints(node, "strides", n, 1), ints(node, "dilations", n, 1)
    return _padded_window(size, kernel, strides, dilations, *explicit_pads(node, size, kernel, strides, dilations))


def pool_window(node: ir.Node, x: ir.Value) -> tuple[Window, tuple[int, ...]]:
    """A pool's geometry (X to Y) and its own end pads."""
    size = spatial(node, x, "input")
    n = len(size)
    kernel = ints(node, "kernel_shape", n, 1)
    strides, dilations = ints(node, "strides", n, 1), ints(node, "dilations", n, 1)
    begin, end = explicit_pads(node, size, kernel, strides, dilations)
    ceil = bool(attr(node, "ceil_mode", 0))
    return _padded_window(size, kernel, strides, dilations, begin, end, ceil), tuple(end)


def pool_counts(win: Window, end: Sequence[int], include_pad: bool) -> np.ndarray | None:
    """AveragePool's divisor per window (row-major): the window taps inside the input, or inside the padded
    input with ``include_pad`` (ceil_mode windows are clipped there, as onnxruntime does); None when every
    window lies whole inside the input (the divisor is the kernel size)."""
    _, valid = win.taps()
    if valid.all():
        return None
    if not include_pad:
        return valid.sum(axis=0)
    padded = tuple(n + b + e for n, b, e in zip(win.size_in, win.begin, end, strict=True))
    _, inside = Window(padded, win.size_out, win.kernel, win.strides, win.dilations, (0,) * win.rank).taps()
    return inside.sum(axis=0)


def conv_transpose_window(node: ir.Node, x: ir.Value, w: ir.Value) -> Window:
    """ConvTranspose's geometry seen as the Conv it is the adjoint of: from Y's spatial shape to X's."""
    size = spatial(node, x, "input")
    n = len(size)
    kernel = _kernel(node, w, n)
    strides, dilations = ints(node, "strides", n, 1), ints(node, "dilations", n, 1)
    extra = ints(node, "output_padding", n, 0)
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
        pads = [0] * (2 * n) if auto_pad == "VALID" else ints(node, "pads", 2 * n, 0)
        begin = list(pads[:n])
        out = tuple(f - b - e for f, b, e in zip(full, begin, pads[n:], strict=True))
    return Window(out, size, kernel, strides, dilations, tuple(begin))


def col2im_window(node: ir.Node, size: Sequence[int], kernel: Sequence[int]) -> Window:
    """Col2Im's blocks over its image (``image_shape`` and ``block_shape`` given as numbers)."""
    n = len(size)
    pads = ints(node, "pads", 2 * n, 0)
    return _padded_window(size, kernel, ints(node, "strides", n, 1), ints(node, "dilations", n, 1), pads[:n],
                          pads[n:])


def deform_conv_window(node: ir.Node, x: ir.Value, w: ir.Value) -> Window:
    """DeformConv's undeformed geometry, from X's spatial shape to Y's (explicit pads only)."""
    size = spatial(node, x, "input")
    n = len(size)
    pads = ints(node, "pads", 2 * n, 0)
    return _padded_window(size, _kernel(node, w, n), ints(node, "strides", n, 1), ints(node, "dilations", n, 1),
                          pads[:n], pads[n:])


# ------------------------------------------------------------------ the window as ops
def crop(em: Emitter, v: ir.Value, sizes: Sequence[int], over: Sequence[int]) -> ir.Value:
    """v[:, :, :sizes...] when some ``over`` (how far the result may exceed ``sizes``) is positive."""
    if not any(o > 0 for o in over):
        return v
    n = len(sizes)
    return em.slice(v, [0] * n, list(sizes), list(range(2, n + 2)))


def adjoint(em: Emitter, g: ir.Value, kernel: ir.Value, win: Window, group: int = 1) -> ir.Value:
    """The adjoint of a window op whose output gradient is g: a ConvTranspose back to ``size_in``."""
    extra = list(win.extra)
    return em.ConvTranspose(
        g, kernel, strides=list(win.strides), dilations=list(win.dilations), group=group, pads=win.pads,
        output_padding=extra if any(extra) else None,
    )


def forward(em: Emitter, g: ir.Value, kernel: ir.Value, win: Window, group: int = 1) -> ir.Value:
    """A Conv over ``size_in`` with the window's geometry: the adjoint of ``adjoint``."""
    out = em.Conv(g, kernel, strides=list(win.strides), dilations=list(win.dilations), group=group, pads=win.pads)
    return crop(em, out, win.size_out, [e - s + 1 for e, s in zip(win.extra, win.strides, strict=True)])
