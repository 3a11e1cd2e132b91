"""Rule cases: unary math, Mod, Max/Min/Mean and Where.

onnxruntime's CPU kernels for Acos Acosh Asin Asinh Atan Atanh Cosh Sinh Tan Erf (every opset) and for
Max/Min (opset 7) and Mean (every opset) are float-only, so those cases are float32 (checker defaults:
eps 1e-3, rtol 1e-2)."""

from __future__ import annotations

import numpy as np

from tests.gradcheck import Case
from tests.gradcheck import rng_array as r

F32 = np.float32


def away(a: np.ndarray, *points: float, gap: float = 0.15) -> np.ndarray:
    """``a`` with every entry within ``gap`` of a kink ``point`` pushed ``gap`` further out."""
    out = np.asarray(a, dtype=np.float64)
    for p in points:
        d = out - p
        out = np.where(np.abs(d) < gap, out + np.where(d < 0, -gap, gap), out)
    return out.astype(np.asarray(a).dtype)


def signed(*shape: int, seed: int = 0, low: float = 0.5, high: float = 2.0, dtype: type = np.float64) -> np.ndarray:
    """Magnitudes in [low, high) with random signs."""
    mag = r(*shape, seed=seed, low=low, high=high, dtype=dtype)
    return (mag * np.where(r(*shape, seed=seed + 100) < 0, -1, 1)).astype(dtype)


CASES: list[Case] = [
    Case("Abs", [away(r(3, 4), 0.0)], opset=7, id="v7-nosign"),
    Case("Abs", [away(r(3, 4), 0.0)], opset=13),
    Case("Reciprocal", [signed(3, 4)], opset=7, id="v7"),
    Case("Reciprocal", [signed(3, 4)], opset=13),
    Case("Sin", [r(3, 4)], opset=7, id="v7"),
    Case("Sin", [r(3, 4)], opset=22),
    Case("Cos", [r(3, 4)], opset=7, id="v7"),
    Case("Cos", [r(3, 4)], opset=22),
]
for op, opsets, data in [
    ("Tan", (7, 22), r(3, 4, low=-1.2, high=1.2, dtype=F32)),
    ("Asin", (7, 22), r(3, 4, low=-0.9, high=0.9, dtype=F32)),
    ("Acos", (7, 22), r(3, 4, low=-0.9, high=0.9, dtype=F32)),
    ("Atan", (7, 22), r(3, 4, dtype=F32)),
    ("Sinh", (9, 22), r(3, 4, dtype=F32)),
    ("Cosh", (9, 22), r(3, 4, dtype=F32)),
    ("Asinh", (9, 22), r(3, 4, dtype=F32)),
    ("Acosh", (9, 22), r(3, 4, low=1.2, high=3.0, dtype=F32)),
    ("Atanh", (9, 22), r(3, 4, low=-0.9, high=0.9, dtype=F32)),
    ("Erf", (9, 13), r(3, 4, dtype=F32)),
]:
    CASES += [Case(op, [data], opset=v, id="f32") for v in opsets]

# Mod: only fmod=1 runs on floats in onnxruntime (fmod=0 floats are valid from opset 28, which it cannot load).
CASES += [
    Case("Mod", [3 * r(3, 4, seed=1), signed(4, seed=2)], attrs={"fmod": 1}, opset=10, id="fmod-bc"),
    Case("Mod", [3 * r(3, 4, seed=1), signed(3, 4, seed=2)], attrs={"fmod": 1}, opset=13, id="fmod"),
    Case("Mod", [3 * r(2, 1, 4, seed=1), signed(3, 1, seed=2)], attrs={"fmod": 1}, opset=13, id="fmod-bc2"),
]

# Max / Min: ties split the gradient (see the rule's notes).
for op in ["Max", "Min"]:
    CASES += [
        Case(op, [r(3, 4, seed=1, dtype=F32), r(3, 4, seed=2, dtype=F32)], opset=7, id="v7-f32"),
        # in2 draws the same numbers as in0's first row: exact ties, where the split gradient is right but
        # its own derivative jumps (no second-order check)
        Case(op, [r(3, 4, seed=1), r(4, seed=2), r(1, 4, seed=3)], opset=8, id="bc3-ties", second_order=False),
        Case(op, [r(2, 1, 4, seed=1), r(3, 1, seed=2)], opset=12, id="bc"),
        Case(op, [r(3, 4, seed=1), r(4, seed=2), r(3, 1, seed=3)], opset=13, id="bc3"),
        Case(op, [r(3, 4, seed=1)], opset=13, id="single"),
    ]
CASES += [
    Case("Mean", [r(3, 4, seed=1, dtype=F32), r(3, 4, seed=2, dtype=F32)], opset=7, id="v7-f32"),
    Case("Mean", [r(3, 4, seed=1, dtype=F32), r(4, seed=2, dtype=F32), r(1, 4, seed=3, dtype=F32)], opset=8,
         id="bc3-f32"),
    Case("Mean", [r(2, 1, 4, seed=1, dtype=F32), r(3, 1, seed=2, dtype=F32)], opset=13, id="bc-f32"),
    Case("Where", [r(2, 3, 1, seed=5) > 0, r(3, 4, seed=1), r(4, seed=2)], opset=9, id="bc"),
    Case("Where", [r(3, 4, seed=5) > 0, r(1, 4, seed=1), r(3, 1, seed=2)], opset=16, id="bc"),
    Case("Where", [r(3, 4, seed=5) > 0, r(3, 4, seed=1), r(3, 4, seed=2)], opset=16),
]
