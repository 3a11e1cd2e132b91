"""Gradient rules: spectral (DFT, STFT).

Both ops are linear, so the gradient is the adjoint transform. On (re, im) pairs the real transpose of a
complex-linear map is its conjugate transpose: for the n-point DFT matrix W, ``W^H = n * IDFT`` and
``(IDFT)^H = DFT / n``. The remaining pieces are the adjoints of the index maps around it: truncating or
zero-padding to ``dft_length`` (its adjoint pads or truncates back), dropping the bins past n//2 (RFFT:
zero-fill them), taking the real part (real input: keep channel 0) and the Hermitian extension of IRFFT
(bin k counts ``c_k = 2`` times, except the DC bin and, for even n, the Nyquist bin).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import Emitter, attr, rank_of
from onnxgrad.registry import register

Grads = Sequence[ir.Value | None]
Out = list[ir.Value | None]
Dim = int | ir.Value  # a static size, or a 1-element int64 tensor holding it

_I64 = ir.DataType.INT64


def _tensor(em: Emitter, d: Dim) -> ir.Value:
    return em.ints([d]) if isinstance(d, int) else d


def _length_input(em: Emitter, v: ir.Value | None) -> Dim | None:
    """A scalar int input (dft_length, frame_length...) as an int when constant, else a 1-element int64."""
    if v is None:
        return None
    known = em.constant_value(v)
    if known is not None:
        return int(known)
    return em.Reshape(em.Cast(v, to=_I64), em.ints([1]))


def _fit(em: Emitter, h: ir.Value, axis: int, rank: int, cur: Dim, want: Dim) -> ir.Value:
    """Zero-pad or truncate h along ``axis`` from length ``cur`` to ``want``."""
    if isinstance(cur, int) and isinstance(want, int):
        if cur == want:
            return h
        if cur > want:
            return em.Slice(h, em.ints([0]), em.ints([want]), em.ints([axis]))
        pads = [0] * (2 * rank)
        pads[rank + axis] = want - cur
        return em.Pad(h, em.ints(pads))
    extra = em.Max(em.Sub(_tensor(em, want), _tensor(em, cur)), em.ints([0]))
    pads = em.Concat(em.ints([0] * (rank + axis)), extra, em.ints([0] * (rank - axis - 1)), axis=0)
    return em.Slice(em.Pad(h, pads), em.ints([0]), _tensor(em, want), em.ints([axis]))


def _times(em: Emitter, h: ir.Value, n: Dim, like: ir.Value, invert: bool = False) -> ir.Value:
    """h * n (or h / n)."""
    if isinstance(n, int):
        return em.Mul(h, em.const(1.0 / n if invert else float(n), like=like))
    f = em.Cast(n, to=like.dtype)
    return em.Div(h, f) if invert else em.Mul(h, f)


def _half_bins(em: Emitter, n: Dim) -> Dim:
    """n // 2 + 1."""
    if isinstance(n, int):
        return n // 2 + 1
    return em.Add(em.Div(n, em.ints([2])), em.ints([1]))


def _hermitian_weights(em: Emitter, n: Dim, axis: int, rank: int, like: ir.Value) -> ir.Value:
    """c_k / n for k < n//2 + 1 (c_k = 1 for DC and the even-n Nyquist bin, else 2), shaped along ``axis``."""
    along = [1] * axis + [-1] + [1] * (rank - axis - 1)
    if isinstance(n, int):
        c = np.full(n // 2 + 1, 2.0)
        c[0] = 1.0
        if n % 2 == 0:
            c[-1] = 1.0
        return em.const((c / n).reshape(along), like=like)
    k = em.Range(em.const(0, dtype=_I64), em.Squeeze(_half_bins(em, n)), em.const(1, dtype=_I64))
    ones = em.Add(em.Cast(em.Equal(k, em.const(0, dtype=_I64)), to=like.dtype),
                  em.Cast(em.Equal(em.Add(k, k), em.Squeeze(n)), to=like.dtype))
    c = em.Div(em.Sub(em.const(2.0, like=like), ones), em.Cast(n, to=like.dtype))
    return em.Reshape(c, em.ints(along))


def _dft_backward(
    em: Emitter, x: ir.Value, g: ir.Value, axis: int, inverse: bool, onesided: bool, length: ir.Value | None
) -> ir.Value:
    """The adjoint of DFT(x) along ``axis`` applied to g."""
    rank = rank_of(x)
    channels = None if x.shape is None else x.shape[-1]
    if rank is None or not isinstance(channels, int):
        raise ValueError(f"DFT gradient needs the rank and last dimension of '{x.name}'")
    axis %= rank
    size = em.dim(x, axis, keepdims=True)
    n = _length_input(em, length)
    if onesided and inverse:  # IRFFT: the real output of the Hermitian extension of the first n//2 + 1 bins
        if n is None:
            n = 2 * (size - 1) if isinstance(size, int) else em.Mul(em.Sub(size, em.ints([1])), em.ints([2]))
        h = em.Mul(em.dft(g, axis, onesided=True), _hermitian_weights(em, n, axis, rank, x))
        return _fit(em, h, axis, rank, _half_bins(em, n), size)
    n = size if n is None else n
    if onesided:  # RFFT: the bins it drops get zero gradient
        g = _fit(em, g, axis, rank, _half_bins(em, n), n)
    h = _times(em, em.dft(g, axis, inverse=not inverse), n, x, invert=inverse)
    return _real(em, _fit(em, h, axis, rank, n, size), channels)


def _real(em: Emitter, h: ir.Value, channels: int) -> ir.Value:
    """Real input: the gradient is the real channel of the complex adjoint."""
    if channels == 2:
        return h
    return em.Slice(h, em.ints([0]), em.ints([1]), em.ints([-1]))


@register("DFT", since=17, wrt=1)
def dft_v17(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = adjoint DFT of dy (conjugate direction, scaled by n or 1/n, fitted back to x)"""
    x, length = [*node.inputs, None][:2]
    assert x is not None and dy[0] is not None
    g = _dft_backward(em, x, dy[0], attr(node, "axis", 1), bool(attr(node, "inverse", 0)),
                      bool(attr(node, "onesided", 0)), length)
    return [g]


@register("DFT", since=20, wrt=1)
def dft_v20(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = adjoint DFT of dy (conjugate direction, scaled by n or 1/n, fitted back to x)"""
    x, length, axis_in = [*node.inputs, None, None][:3]
    assert x is not None and dy[0] is not None
    axis = -2 if axis_in is None else em.constant_value(axis_in)
    if axis is None:
        raise ValueError(f"DFT '{node.name}': the gradient needs a constant axis input")
    g = _dft_backward(em, x, dy[0], int(axis), bool(attr(node, "inverse", 0)), bool(attr(node, "onesided", 0)),
                      length)
    return [g]


@register("STFT", since=17, wrt=3)
def stft(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dframes = window * adjoint DFT(dy), overlap-added into dsignal; dwindow = sum(adjoint * frames)"""
    signal, step, window, frame_len = [*node.inputs, None, None][:4]
    assert signal is not None and step is not None and dy[0] is not None
    y = node.outputs[0]
    channels = None if signal.shape is None else signal.shape[-1]
    if not isinstance(channels, int):
        raise ValueError(f"STFT '{node.name}': the gradient needs the last dimension of the signal")
    fl = em.dim(window, 0, keepdims=True) if window is not None else _length_input(em, frame_len)
    if fl is None:
        fl = em.dim(signal, 1, keepdims=True)
    g = dy[0]
    if attr(node, "onesided", 1):
        g = _fit(em, g, 2, 4, _half_bins(em, fl), fl)
    h = _real(em, _times(em, em.dft(g, 2, inverse=True), fl, signal), channels)  # (B, F, fl, c)
    idx = _frame_indices(em, em.dim(y, 1, keepdims=True), fl, step)
    d_frames = h if window is None else em.Mul(h, em.Reshape(window, em.ints([-1, 1])))
    flat = em.Reshape(d_frames, em.ints([0, -1, channels]))
    where = em.Expand(em.Reshape(idx, em.ints([1, -1, 1])), em.Shape(flat))
    d_signal = em.ScatterElements(em.zeros_like(signal), where, flat, axis=1, reduction="add")
    d_window = None
    if window is not None:
        d_window = em.ReduceSum(em.Mul(h, em.Gather(signal, idx, axis=1)), em.ints([0, 1, 3]), keepdims=0)
    return [d_signal, None, d_window][: len(node.inputs)]


def _frame_indices(em: Emitter, frames: Dim, fl: Dim, step: ir.Value) -> ir.Value:
    """(frames, fl) int64: the signal position f * step + j of lane j of frame f."""
    s = em.constant_value(step)
    if isinstance(frames, int) and isinstance(fl, int) and s is not None:
        return em.const(np.arange(frames)[:, None] * int(s) + np.arange(fl)[None, :], dtype=_I64)
    zero, one = em.const(0, dtype=_I64), em.const(1, dtype=_I64)
    starts = em.Mul(em.Range(zero, em.Squeeze(_tensor(em, frames)), one), em.Cast(step, to=_I64))
    lanes = em.Range(zero, em.Squeeze(_tensor(em, fl)), one)
    return em.Add(em.Unsqueeze(starts, em.ints([1])), lanes)
