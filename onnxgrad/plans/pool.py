"""The pools' gradient forms on onnxruntime's CPU kernels.

A window sum's adjoint (AveragePool, LpPool): ``broadcast`` (one window over the whole input: one broadcast Mul,
10x faster than onnxruntime's ConvTranspose) or ``transpose`` (a ConvTranspose with a ones kernel; a 5-D
broadcast that tiles the input is 7x slower than it). MaxPool's routing of dY to each window's first maximum:
``scatter`` (ONE ScatterElements through the Indices), ``gather`` (the windows gathered with a static index
table, the ArgMax routed back by a ConvTranspose with a one-hot kernel; valid at every opset) or, over spatial
sizes known only at run time before ScatterElements, ``windows`` (the taps read by a Conv with that one-hot
kernel).
"""

from __future__ import annotations

import math

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import Emitter, attr
from onnxgrad.geometry import Window, adjoint, crop_to, ones_over, padded
from onnxgrad.plans.base import NotApplicable, Plan, choose


# ------------------------------------------------------------------ window sums
def spread_broadcast(em: Emitter, g: ir.Value, win: Window, scale: float) -> ir.Value | NotApplicable:
    """One window over the whole input: each dY times ``scale`` broadcast over it, one Mul."""
    if not win.one_window:
        return NotApplicable("more than one window, or pads or dilations")
    return em.Mul(g, em.const(np.full((1, 1, *win.kernel), scale), like=g))


def spread_transpose(em: Emitter, g: ir.Value, win: Window, scale: float) -> ir.Value:
    """A ConvTranspose of dY * ``scale`` with a ones kernel."""
    if scale != 1.0:
        g = em.Mul(g, em.const(scale, like=g))
    return adjoint(em, g, em.const(np.ones((1, 1, *win.kernel)), like=g), win)


SPREAD: dict[str, Plan] = {"broadcast": spread_broadcast, "transpose": spread_transpose}


def spread(em: Emitter, g: ir.Value, win: Window, scale: float) -> ir.Value:
    """The adjoint of a ones-kernel window sum, times ``scale``: each window's dY copied over its window, as
    (NC, 1, *size_in) from g = (NC, 1, *size_out), by the first plan of ``SPREAD`` that applies."""
    return choose(SPREAD, em, g, win, scale)[1]


# ------------------------------------------------------------------ MaxPool
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


def max_pool_scatter(em: Emitter, node: ir.Node, x: ir.Value, g: ir.Value, win: Window) -> ir.Value | NotApplicable:
    """dX by ONE ScatterElements of dY through the Indices output (flat positions in X); overlapping windows
    may pick one element twice: reduction="add" then."""
    overlap = win.overlapping
    if not em.can_scatter("add" if overlap else None):
        return NotApplicable("no ScatterElements" + (" with reduction='add' (overlapping windows)" if overlap else "")
                             + " at this opset")
    assert x.dtype is not None
    flat = em.ints([-1])
    zeros = em.ConstantOfShape(em.Shape(em.Reshape(x, flat)),
                               value=ir.tensor(np.zeros(1, x.dtype.numpy()), dtype=x.dtype))
    zeros.dtype = x.dtype
    dx = em.scatter_elements(zeros, em.Reshape(_indices(em, node, x), flat), em.Reshape(g, flat), axis=0,
                             reduction="add" if overlap else None)
    return em.reshape_like(dx, x)


def max_pool_gather(em: Emitter, node: ir.Node, x: ir.Value, g: ir.Value, win: Window) -> ir.Value | NotApplicable:
    """dX: the windows gathered exactly with a static index table, dY routed to each one's ArgMax tap and back
    to X by a ConvTranspose with a one-hot kernel."""
    if not win.static:
        return NotApplicable("spatial sizes known only at run time: no static index table")
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
    return em.reshape_like(adjoint(em, routed, one_hot, win), x)


def max_pool_windows(em: Emitter, node: ir.Node, x: ir.Value, g: ir.Value, win: Window) -> ir.Value:
    """dX over any sizes: each window's taps read by a Conv with a one-hot kernel (and which of them lie in the
    input, by the same Conv over ones), dY routed to the first tap equal to the window's maximum Y and back to
    X by the adjoint ConvTranspose with that kernel."""
    taps, n = math.prod(win.kernel), win.rank
    per_channel = em.ints([-1, 1, *[0] * n])  # (N*C, 1, *sizes): Reshape's 0 keeps each spatial size
    one_hot = em.const(np.eye(taps).reshape(taps, 1, *win.kernel), like=x)
    geometry = {"strides": list(win.strides), "dilations": list(win.dilations), "pads": win.pads}
    values = em.Conv(padded(em, em.Reshape(x, per_channel), win), one_hot, **geometry)  # (N*C, taps, *out)
    inside = em.Conv(padded(em, ones_over(em, win, x), win), one_hot, **geometry)  # (1, taps, *out)
    y = em.Reshape(node.outputs[0], per_channel)
    if attr(node, "ceil_mode", 0) and win.may_drop:  # the end pads may hold one window more than the pool
        values = crop_to(em, values, y, list(range(n)))
        inside = crop_to(em, inside, y, list(range(n)))
    half = em.const(0.5, like=x)
    hit = em.And(em.Not(em.Or(em.Less(values, y), em.Greater(values, y))), em.Greater(inside, half))
    first = em.ArgMax(em.indicator(hit, x), axis=1, keepdims=1)  # (N*C, 1, *out)
    tap = em.const(np.arange(taps).reshape(1, taps, *[1] * n), dtype=ir.DataType.INT64)
    routed = em.where(em.Equal(first, tap), em.Reshape(g, per_channel), em.const(0.0, like=x))
    return em.reshape_like(adjoint(em, routed, one_hot, win), x)


MAX_POOL: dict[str, Plan] = {"scatter": max_pool_scatter, "gather": max_pool_gather, "windows": max_pool_windows}


def max_pool_input_grad(em: Emitter, node: ir.Node, x: ir.Value, g: ir.Value, win: Window) -> ir.Value:
    """dX of MaxPool ``node`` given g = dY: each dY to its window's first maximum, by the first plan of
    ``MAX_POOL`` that applies."""
    return choose(MAX_POOL, em, node, x, g, win)[1]
