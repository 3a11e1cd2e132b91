"""Gradient rules, one module per op family; importing this package registers them all."""

from onnxgrad.rules import activations, elementwise, linalg, markers, reductions, shape

__all__ = ["activations", "elementwise", "linalg", "markers", "reductions", "shape"]
