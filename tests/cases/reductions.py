"""Rule cases: reductions (ReduceSum and ReduceMean are in core) and cumulative sums/products.

Axes are an attribute before opset 18 (13 for ReduceSum) and an optional input from 18 on; each op is
checked in both forms, with keepdims=0, negative axes, all axes and noop_with_empty_axes. ReduceMax/Min
inputs have no ties (a tie is a kink); ReduceProd is checked with one and with two zeros (a polynomial,
so central differences are exact there).

Axes fed at run time (a graph input) are not in the table: shape inference leaves the forward output
untyped, which check_model(full_check=True) rejects before any gradient is looked at."""

from __future__ import annotations

import numpy as np

from tests.cases.unary import away, signed
from tests.gradcheck import Case, Const
from tests.gradcheck import rng_array as r

NONE = np.array([], dtype=np.int64)
X = away(r(2, 3, 4, seed=1), 0.0)  # away from |x|'s kink
POS = r(2, 3, 4, seed=2, low=0.5, high=2.0)  # for the logs and the L2 norm


def with_zeros(count: int) -> np.ndarray:
    """Magnitudes in [0.5, 2) with ``count`` zeros in the slice [0, :, 1]."""
    a = signed(2, 3, 4, seed=3)
    a[0, :count, 1] = 0.0
    return a


CASES: list[Case] = []
for op, x in [("ReduceL1", X), ("ReduceL2", POS), ("ReduceLogSum", POS), ("ReduceLogSumExp", X),
              ("ReduceMax", X), ("ReduceMin", X), ("ReduceProd", signed(2, 3, 4, seed=4)),
              ("ReduceSumSquare", X)]:
    CASES += [
        Case(op, [x], attrs={"axes": [1], "keepdims": 0}, opset=7, id="v7"),
        Case(op, [x], attrs={"axes": [0, -1]}, opset=11, id="neg"),
        Case(op, [x], opset=13, id="all"),
        Case(op, [x], attrs={"axes": [-2], "keepdims": 0}, opset=13),
        Case(op, [x, Const(np.array([0, 2]))], attrs={"keepdims": 0}, opset=18),
        Case(op, [x, Const(np.array([-1]))], opset=18, id="keep"),
        Case(op, [x], attrs={"keepdims": 0}, opset=18, id="all"),
        Case(op, [x, Const(NONE)], attrs={"noop_with_empty_axes": 1}, opset=18, id="noop"),
    ]
CASES += [
    Case("ReduceMax", [X, Const(np.array([1]))], attrs={"keepdims": 0}, opset=20),
    Case("ReduceMin", [X], attrs={"keepdims": 0}, opset=20, id="all"),
    # second_order=False: at a zero the gradient's value is exact, but the gradient graph holds its zero masks
    # constant, so its own derivative there is not (exact away from zeros).
    Case("ReduceProd", [with_zeros(1)], attrs={"axes": [1]}, opset=13, id="one-zero", second_order=False),
    Case("ReduceProd", [with_zeros(2)], attrs={"axes": [1]}, opset=13, id="two-zeros", second_order=False),
    Case("ReduceProd", [with_zeros(2), Const(np.array([0, 1]))], opset=18, id="zeros", second_order=False),
    Case("ReduceProd", [with_zeros(1)], attrs={"axes": [1]}, opset=7, id="v7-zero", second_order=False),
    Case("ReduceLogSum", [POS, Const(np.array([1]))], attrs={"keepdims": 0}, opset=28),
    Case("ReduceLogSumExp", [X, Const(np.array([0, -1]))], opset=28),
    Case("CumSum", [r(3, 4, seed=1), Const(np.array(1))], opset=11),
    Case("CumSum", [r(3, 4, seed=1), Const(np.array(0, dtype=np.int32))], attrs={"exclusive": 1}, opset=11,
         id="exclusive"),
    Case("CumSum", [r(2, 3, 4, seed=1), Const(np.array(-1))], attrs={"reverse": 1}, opset=14, id="reverse"),
    Case("CumSum", [r(2, 3, 4, seed=1), Const(np.array(1))], attrs={"reverse": 1, "exclusive": 1}, opset=14,
         id="rev-exc"),
    Case("CumProd", [signed(3, 4, seed=1), Const(np.array(1))], opset=26),
    Case("CumProd", [signed(3, 4, seed=1), Const(np.array(0))], attrs={"exclusive": 1}, opset=26, id="exclusive"),
    Case("CumProd", [signed(2, 3, 4, seed=1), Const(np.array(-1))], attrs={"reverse": 1}, opset=26, id="reverse"),
    Case("CumProd", [signed(2, 3, 4, seed=1), Const(np.array(1))], attrs={"reverse": 1, "exclusive": 1},
         opset=26, id="rev-exc"),
]
