"""Rule-level changes the profiles ask for, in rule files this benchmark's owner does not edit.

Importing this module registers them over the current rules (same op, same ``since``), so that
``bench/run.py --proposals`` measures them on the real models; tests/test_rules.py's Conv cases pass with
them (``python bench/proposals.py`` runs those cases with the proposals registered). They are meant to
move into ``onnxgrad/rules/conv.py``.

Conv (group 1), measured on onnxruntime CPU, 2 threads (see bench/RESULTS.md):

* dW: ``im2col`` by one Slice per kernel tap of X (channels first, padded once), then ONE Gemm
  ``dY_(M, N*out) @ cols_(C*K, N*out)^T``. The current rule's Conv of X^T with dY^T as the kernel runs C
  tiny GEMMs of width K (for batch 1 a 1x1 conv becomes C matrix-vector products): 3-15x slower than the
  Gemm here (ResNet-50's 1x1 convs: 15-33 ms -> 1-2.4 ms each).
* dX of a stride-1 conv: a Conv of dY with the kernel flipped and its channel axes swapped (onnxruntime
  folds the flipped kernel at load when W is an initializer) instead of ConvTranspose: up to 2x faster.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import Emitter, attr, static_dims
from onnxgrad.registry import register
from onnxgrad.rules import conv as conv_rules

Window = conv_rules.Window
Grads = Sequence[ir.Value | None]


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
    phases = strided and em.opset < 10
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


def weight_grad_gemm(em: Emitter, x: ir.Value, g: ir.Value, win: Window, w: ir.Value) -> ir.Value | None:
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


def adjoint_conv(em: Emitter, g: ir.Value, w: ir.Value, win: Window) -> ir.Value | None:
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


@register("Conv", notes=conv_rules.conv.__doc__ or "")
def conv(em: Emitter, node: ir.Node, dy: Grads) -> list[ir.Value | None]:
    """dx = conv(dy, flip(w)^T) (stride 1) or conv_transpose(dy, w), dw = dy @ im2col(x)^T, db = sum(dy)"""
    x, w, g = node.inputs[0], node.inputs[1], dy[0]
    assert x is not None and w is not None and g is not None
    win = conv_rules._conv_window(node, x, w)
    group = attr(node, "group", 1)
    if group != 1:
        return conv_rules.conv(em, node, dy)
    dx = adjoint_conv(em, g, w, win) or conv_rules._adjoint(em, g, w, win, group)
    dw = weight_grad_gemm(em, x, g, win, w) or conv_rules._weight_grad(em, x, g, win, group, w)
    return [dx, dw, *conv_rules._bias_grad(em, node, g, win.rank)]


if __name__ == "__main__":
    import sys

    import pytest

    sys.exit(pytest.main(["-q", "-k", "Conv and not ConvTranspose and not DeformConv", "tests/test_rules.py"]))
