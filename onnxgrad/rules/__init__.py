"""Gradient rules, one module per op family; importing this package registers them all."""

from onnxgrad.rules import (
    activations,
    attention,
    conv,
    elementwise,
    functions,
    linalg,
    losses,
    markers,
    nondiff,
    normalization,
    reductions,
    sampling,
    shape,
    spectral,
)

__all__ = [
    "activations",
    "attention",
    "conv",
    "elementwise",
    "functions",
    "linalg",
    "losses",
    "markers",
    "nondiff",
    "normalization",
    "reductions",
    "sampling",
    "shape",
    "spectral",
]
