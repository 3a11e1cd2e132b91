"""Cases for the first rule set: arithmetic, matrix products, activations, reductions, reshapes."""

from __future__ import annotations

import numpy as np

from tests.gradcheck import Case, Const
from tests.gradcheck import rng_array as r

BINARY_SHAPES = [((3, 4), (3, 4)), ((3, 4), (4,)), ((2, 1, 4), (3, 1)), ((), (2, 3)), ((1, 4), (3, 1))]

CASES: list[Case] = []
for op in ["Add", "Sub", "Mul", "Div"]:
    for k, (sa, sb) in enumerate(BINARY_SHAPES):
        b = r(*sb, seed=2) if op != "Div" else r(*sb, seed=2, low=0.5, high=2.0)
        CASES.append(Case(op, [r(*sa, seed=1), b], id=f"bc{k}"))
    CASES.append(Case(op, [r(3, 4, seed=1), r(3, 4, seed=2, low=0.5, high=2)], opset=7, id="v7"))
CASES += [
    Case("Identity", [r(2, 3)]),
    Case("Neg", [r(2, 3)]),
    Case("Sum", [r(3, 4, seed=1), r(4, seed=2), r(1, 4, seed=3)], opset=8),
    Case("Sum", [r(3, 4, seed=1), r(3, 4, seed=2)], opset=7, id="v7"),
    Case("Exp", [r(2, 3)]),
    Case("Log", [r(2, 3, low=0.5, high=3.0)]),
    Case("Sqrt", [r(2, 3, low=0.5, high=3.0)]),
    Case("Pow", [r(2, 3, low=0.5, high=2.0), r(3, seed=3)], id="bc"),
    Case("Pow", [r(2, 3, low=0.5, high=2.0), Const(np.array(3.0))], id="const-exp"),
    Case("Pow", [r(2, 3, low=0.5, high=2.0), r(2, 3, seed=3)], opset=7, id="v7"),
    Case("Relu", [r(3, 4)]),
    Case("Tanh", [r(3, 4)]),
    Case("Sigmoid", [r(3, 4)]),
    Case("Cast", [r(3, 4)], attrs={"to": 11}),
    Case("Cast", [r(3, 4, dtype=np.float32)], attrs={"to": 11}, id="f32-f64", rtol=1e-2),
    Case("MatMul", [r(3, 4, seed=1), r(4, 5, seed=2)]),
    Case("MatMul", [r(2, 3, 4, seed=1), r(4, 5, seed=2)], id="batch-2d"),
    Case("MatMul", [r(2, 3, 2, 4, seed=1), r(4, 5, seed=2)], opset=9, id="batch4-2d"),
    Case("MatMul", [r(2, 1, 3, 4, seed=1), r(3, 4, 2, seed=2)], id="batch-bc"),
    Case("MatMul", [r(4, seed=1), r(2, 4, 5, seed=2)], id="vec-left"),
    Case("MatMul", [r(2, 3, 4, seed=1), r(4, seed=2)], id="vec-right"),
    Case("MatMul", [r(4, seed=1), r(4, seed=2)], id="dot", dynamic=False),
    Case("MatMul", [r(3, 4, seed=1), r(4, 5, seed=2)], opset=7, id="v7"),
    Case("Gemm", [r(3, 4, seed=1), r(4, 5, seed=2), r(5, seed=3)]),
    Case("Gemm", [r(4, 3, seed=1), r(5, 4, seed=2), r(3, 1, seed=3)], attrs={"transA": 1, "transB": 1,
         "alpha": 0.7, "beta": 1.3}, id="tt"),
    Case("Gemm", [r(4, 3, seed=1), r(4, 5, seed=2)], attrs={"transA": 1, "alpha": 2.0}, id="noC"),
    Case("Gemm", [r(3, 4, seed=1), r(5, 4, seed=2), r(3, 5, seed=3)], attrs={"transB": 1, "beta": 0.5},
         opset=7, id="v7"),
    Case("Gemm", [r(3, 4, seed=1), r(4, 5, seed=2), r(1, 5, seed=3)], opset=9, id="v9"),
    Case("ReduceSum", [r(2, 3, 4)], attrs={"axes": [1], "keepdims": 0}, opset=11, id="attr"),
    Case("ReduceSum", [r(2, 3, 4)], opset=11, id="all"),
    Case("ReduceSum", [r(2, 3, 4), Const(np.array([0, -1]))], attrs={"keepdims": 0}),
    Case("ReduceSum", [r(2, 3, 4), Const(np.array([], dtype=np.int64))], attrs={"noop_with_empty_axes": 1},
         id="noop"),
    Case("ReduceSum", [r(2, 3, 4)], attrs={"keepdims": 1}, id="all-keep"),
    Case("ReduceMean", [r(2, 3, 4)], attrs={"axes": [0, 2]}, opset=11),
    Case("ReduceMean", [r(2, 3, 4)], attrs={"axes": [-1], "keepdims": 0}, opset=13),
    Case("ReduceMean", [r(2, 3, 4), Const(np.array([1]))], attrs={"keepdims": 0}, opset=18),
    Case("ReduceMean", [r(2, 3, 4)], opset=18, id="all"),
    Case("Reshape", [r(2, 3, 4), Const(np.array([4, -1]))]),
    Case("Reshape", [r(2, 3, 4), Const(np.array([0, 12]))], opset=7, id="v7"),
    Case("Transpose", [r(2, 3, 4)], attrs={"perm": [2, 0, 1]}),
    Case("Transpose", [r(2, 3, 4)], id="default"),
    Case("Softmax", [r(2, 3, 4)], attrs={"axis": 1}, opset=11, id="flatten"),
    Case("Softmax", [r(2, 3, 4)], opset=11, id="default"),
    Case("Softmax", [r(2, 3, 4)], attrs={"axis": 1}),
    Case("Softmax", [r(2, 3, 4)], id="last"),
    Case("LogSoftmax", [r(2, 3, 4)], attrs={"axis": 2}, opset=11, id="v11"),
    Case("LogSoftmax", [r(2, 3, 4)], attrs={"axis": 0}, opset=7, id="flatten0"),
    Case("LogSoftmax", [r(2, 3, 4)], attrs={"axis": -2}),
]
