"""Rule cases: normalization.

BatchNormalization is checked in inference and in training form at opsets 7, 9 (training = five outputs),
14 and 15 (training_mode=1), every input differentiated, every float output seeded (at 7 and 9 only Y is
seeded: onnx infers no type for the other four outputs; their gradients were checked with typed outputs).
onnxruntime has no training-mode kernel for spatial=0.
onnxruntime's CPU InstanceNormalization and MeanVarianceNormalization are float-only, so those cases are
float32 (checker defaults: eps 1e-3, rtol 1e-2); MeanVarianceNormalization gets rank-4 inputs (the
default axes [0, 2, 3])."""

from __future__ import annotations

import numpy as np

from tests.cases.unary import away
from tests.gradcheck import Case
from tests.gradcheck import rng_array as r

F32 = np.float32


def bn_inputs(x: tuple[int, ...], c: tuple[int, ...]) -> list[np.ndarray]:
    """X, scale, B, mean, var (var positive)."""
    return [r(*x, seed=1), r(*c, seed=2), r(*c, seed=3), r(*c, seed=4), r(*c, seed=5, low=0.5, high=2.0)]


BN = bn_inputs((2, 3, 4), (3,))
TRAIN = {"momentum": 0.8, "epsilon": 1e-3}

CASES: list[Case] = [
    Case("BatchNormalization", BN, opset=7),
    Case("BatchNormalization", bn_inputs((2, 3, 4), (3, 4)), attrs={"spatial": 0}, opset=7, id="nonspatial"),
    Case("BatchNormalization", BN, attrs=TRAIN, opset=7, n_outputs=5, ys=[0], id="train"),
    Case("BatchNormalization", BN, opset=9),
    Case("BatchNormalization", bn_inputs((4, 3), (3,)), opset=9, id="rank2"),
    Case("BatchNormalization", BN, attrs=TRAIN, opset=9, n_outputs=5, ys=[0], id="train"),
    Case("BatchNormalization", BN, opset=14),
    Case("BatchNormalization", bn_inputs((2, 3, 2, 2), (3,)), attrs={"training_mode": 1, **TRAIN}, opset=14,
         n_outputs=3, id="train"),
    Case("BatchNormalization", BN, attrs={"epsilon": 1e-2}, opset=15),
    Case("BatchNormalization", BN, attrs={"training_mode": 1, **TRAIN}, opset=15, n_outputs=3, id="train"),
    Case("BatchNormalization", BN, attrs={"training_mode": 1, **TRAIN}, opset=15, n_outputs=3, ys=[1, 2],
         id="train-running"),
    Case("InstanceNormalization", [r(2, 3, 4, seed=1, dtype=F32), r(3, seed=2, dtype=F32), r(3, seed=3, dtype=F32)],
         opset=7),
    Case("InstanceNormalization", [r(2, 3, 2, 3, seed=1, dtype=F32), r(3, seed=2, dtype=F32),
                                   r(3, seed=3, dtype=F32)], attrs={"epsilon": 1e-3}, opset=22),
    Case("LayerNormalization", [r(2, 3, 4, seed=1), r(4, seed=2), r(4, seed=3)], opset=17),
    Case("LayerNormalization", [r(2, 3, 4, seed=1), r(3, 4, seed=2)], attrs={"axis": 1}, opset=17, id="axis1-noB"),
    # float32 X: xhat and inv come from one LayerNormalization kernel (plans/normalization.py "kernel")
    Case("LayerNormalization", [r(2, 3, 4, seed=1, dtype=F32), r(4, seed=2, dtype=F32), r(4, seed=3, dtype=F32)],
         opset=17, id="f32"),
    Case("LayerNormalization", [r(2, 3, 4, seed=1, dtype=F32), r(3, 4, seed=2, dtype=F32)], attrs={"axis": 1},
         opset=17, id="f32-axis1-noB"),
    # Mean and InvStdDev come out in stash_type (float32): float32 cases so the whole forward is float32.
    Case("LayerNormalization", [r(2, 3, 4, seed=1, dtype=F32), r(4, seed=2, dtype=F32), r(4, seed=3, dtype=F32)],
         opset=17, n_outputs=3, id="stats"),
    Case("LayerNormalization", [r(2, 3, 4, seed=1, dtype=F32), r(3, 4, seed=2, dtype=F32), r(3, 4, seed=3, dtype=F32)],
         attrs={"axis": -2, "epsilon": 1e-3}, opset=17, n_outputs=3, ys=[1, 2], id="stats-only"),
    # GroupNormalization: onnx infers no output type for it (the harness types it from a run), and its
    # checker rejects the opset-18 schema as deprecated (checker=False there).
    Case("GroupNormalization", [r(2, 4, 3, seed=1), r(2, seed=2), r(2, seed=3)], attrs={"num_groups": 2},
         opset=18, checker=False),
    Case("GroupNormalization", [r(2, 6, 2, 2, seed=1), r(3, seed=2), r(3, seed=3)],
         attrs={"num_groups": 3, "epsilon": 1e-3}, opset=18, id="4d", checker=False),
    # onnxruntime computes GroupNormalization-21 in stash_type (float32) even for double X: float32 cases.
    Case("GroupNormalization", [r(2, 4, 3, seed=1, dtype=F32), r(4, seed=2, dtype=F32), r(4, seed=3, dtype=F32)],
         attrs={"num_groups": 2}, opset=21),
    Case("GroupNormalization", [r(2, 6, 2, 2, seed=1, dtype=F32), r(6, seed=2, dtype=F32), r(6, seed=3, dtype=F32)],
         attrs={"num_groups": 3}, opset=21, id="4d"),
    Case("RMSNormalization", [r(2, 3, 4, seed=1), r(4, seed=2)], opset=23),
    Case("RMSNormalization", [r(2, 3, 4, seed=1), r(3, 4, seed=2)], attrs={"axis": 1, "epsilon": 1e-3}, opset=23,
         id="axis1"),
    Case("LpNormalization", [r(3, 4, seed=1)], opset=7),
    Case("LpNormalization", [away(r(3, 4, seed=1), 0.0)], attrs={"p": 1, "axis": 0}, opset=7, id="p1"),
    Case("LpNormalization", [r(2, 3, 4, seed=1)], attrs={"axis": 1}, opset=22),
    Case("LpNormalization", [away(r(2, 3, 4, seed=1), 0.0)], attrs={"p": 1}, opset=22, id="p1"),
    Case("MeanVarianceNormalization", [r(2, 3, 2, 2, seed=1, dtype=F32)], opset=9),
    Case("MeanVarianceNormalization", [r(2, 3, 2, 2, seed=1, dtype=F32)], attrs={"axes": [1, -1]}, opset=9,
         id="axes"),
    Case("MeanVarianceNormalization", [r(2, 3, 4, 2, seed=1, dtype=F32)], attrs={"axes": [2, 3]}, opset=13,
         id="axes"),
]
