"""Standardization forms on onnxruntime's CPU kernels: xhat = (x - mean(x)) * inv and inv = 1/sqrt(var(x) + eps)
over ``axes`` (keepdims), which every normalization gradient reads (measured with onnxruntime 1.31,
``bench/run.py --model transformer``).

Two forms, tried in this order:

- ``kernel``: d = x - mean(x), then ONE LayerNormalization of d with unit scale, whose InvStdDev output is inv.
  Its one-pass variance mean(d^2) - mean(d)^2 on the centered d is the composed form's corrected two-pass
  algorithm, so the accuracy is the same; it is 3 nodes instead of 11 (the transformer's 8 LayerNorm
  gradients: 17 ms of kernels fewer per run). Trailing axes only, float32 and float16 (onnxruntime computes
  the kernel in float32, so a double x keeps the composed form), opset 17;
- ``composed``: the corrected two-pass algorithm in ReduceMean, Sub, Mul, Sqrt and Reciprocal (always applies).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import Emitter
from onnxgrad.plans.base import NotApplicable, choose

Standardized = tuple[ir.Value, ir.Value]  # (xhat, inv)


def mean_over(em: Emitter, v: ir.Value, axes: Sequence[int]) -> ir.Value:
    """mean(v) over ``axes``, kept as size-1 axes."""
    return em.reduce("ReduceMean", v, axes, keepdims=True)


def standardize_kernel(em: Emitter, x: ir.Value, axes: Sequence[int], eps: float) -> Standardized | NotApplicable:
    """(xhat, inv) by LayerNormalization of d = x - mean(x) with unit scale: xhat is its output, inv its
    InvStdDev."""
    if em.opset < 17:
        return NotApplicable("LayerNormalization needs opset 17")
    if x.dtype not in (ir.DataType.FLOAT, ir.DataType.FLOAT16):
        return NotApplicable(f"onnxruntime's LayerNormalization computes in float32, X is {x.dtype}")
    n = None if x.shape is None else x.shape.rank()
    if n is None or not axes or list(axes) != list(range(axes[0], n)):
        return NotApplicable("not the trailing axes (or X's rank is not known)")
    first = axes[0]
    d = em.Sub(x, mean_over(em, x, axes))
    trailing = list(x.shape)[first:]
    if all(isinstance(size, int) for size in trailing):
        ones = em.const(np.ones(trailing), like=x)
    else:
        ones = em.ConstantOfShape(em.Shape(x, start=first), value=ir.tensor(np.ones(1, x.dtype.numpy())))
        ones.dtype = x.dtype
    xhat, _, inv = em.op("LayerNormalization", d, ones, _outputs=3, axis=first, epsilon=float(eps))
    xhat.dtype, xhat.shape = x.dtype, x.shape
    inv.dtype = ir.DataType.FLOAT  # stash_type 1: the statistics come out in float32
    if x.shape is not None:
        inv.shape = ir.Shape([*list(x.shape)[:first], *[1] * (n - first)])
    return xhat, inv if x.dtype == ir.DataType.FLOAT else em.Cast(inv, to=x.dtype)


def standardize_composed(em: Emitter, x: ir.Value, axes: Sequence[int], eps: float) -> Standardized:
    """(xhat, inv) by the corrected two-pass algorithm: d = x - mean(x) and c = mean(d), which is 0 but for the
    rounding of the first mean; var = mean(d^2) - c^2, xhat = (d - c) * inv.

    Measured (bench/accuracy.py, 50k-element statistics of inputs whose mean is 30x their spread): the float32
    mean onnxruntime computes is off by 7e-6 of the spread and shifts every xhat alike, which sum(dY * xhat)
    (dscale) amplifies to 4-12x PyTorch's error (its CPU kernels accumulate in float64); c removes it."""
    d = em.Sub(x, mean_over(em, x, axes))
    c = mean_over(em, d, axes)
    var = em.Sub(mean_over(em, em.Mul(d, d), axes), em.Mul(c, c))
    inv = em.Reciprocal(em.Sqrt(em.Add(var, em.const(eps, like=x))))
    return em.Mul(em.Sub(d, c), inv), inv


STANDARDIZE = {"kernel": standardize_kernel, "composed": standardize_composed}


def standardize(em: Emitter, x: ir.Value, axes: Sequence[int], eps: float) -> Standardized:
    """(xhat, inv) of x over ``axes`` by the first plan of ``STANDARDIZE`` that applies."""
    return choose(STANDARDIZE, em, x, axes, eps)[1]  # type: ignore[return-value]
