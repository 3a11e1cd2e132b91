"""Rule cases: activations.

onnxruntime's CPU kernels for LeakyRelu/PRelu (before 16), Elu, Selu, Celu, Gelu, HardSigmoid, HardSwish,
Mish (22), Softplus, Softsign, ThresholdedRelu and Clip (before 12) are float-only, so those cases are
float32 (checker defaults: eps 1e-3, rtol 1e-2). Inputs keep clear of each op's kinks."""

from __future__ import annotations

import numpy as np

from tests.cases.unary import away
from tests.gradcheck import Case
from tests.gradcheck import rng_array as r

F32 = np.float32


def f32(a: np.ndarray) -> np.ndarray:
    return np.asarray(a, dtype=F32)


X = away(r(3, 4, seed=1), 0.0)  # away from the kink at 0
X32 = f32(X)

CASES: list[Case] = [
    Case("LeakyRelu", [X32], attrs={"alpha": 0.1}, opset=7, id="f32"),
    Case("LeakyRelu", [X], opset=16),
    Case("PRelu", [f32(away(r(2, 3, 4), 0.0)), r(3, 1, seed=2, dtype=F32)], opset=7, id="f32"),
    Case("PRelu", [f32(away(r(2, 3, 4), 0.0)), r(4, seed=2, dtype=F32)], opset=9, id="f32"),
    Case("PRelu", [away(r(2, 3, 4), 0.0), r(3, 1, seed=2)], opset=16),
    Case("PRelu", [away(r(2, 3, 4), 0.0), r(2, 3, 4, seed=2)], opset=16, id="same"),
    Case("Elu", [X32], attrs={"alpha": 0.7}, opset=7, id="f32"),
    Case("Elu", [X32], opset=22, id="f32"),
    Case("Selu", [X32], opset=7, id="f32"),
    Case("Selu", [X32], attrs={"alpha": 1.3, "gamma": 0.8}, opset=22, id="f32"),
    Case("Celu", [X32], attrs={"alpha": 1.5}, opset=12, id="f32"),
    Case("Gelu", [r(3, 4, dtype=F32)], opset=20, id="f32"),
    Case("Gelu", [r(3, 4, dtype=F32)], attrs={"approximate": "tanh"}, opset=20, id="tanh-f32"),
    Case("HardSigmoid", [f32(away(r(3, 4, low=-3, high=3), -1.2, 0.8))], attrs={"alpha": 0.5, "beta": 0.6},
         opset=7, id="f32"),
    Case("HardSigmoid", [f32(away(r(3, 4, low=-4, high=4), -2.5, 2.5))], opset=22, id="f32"),
    Case("HardSwish", [f32(away(r(3, 4, low=-5, high=5), -3.0, 3.0))], opset=14, id="f32"),
    Case("HardSwish", [f32(away(r(3, 4, low=-5, high=5), -3.0, 3.0))], opset=22, id="f32"),
    Case("Mish", [r(3, 4)], opset=18),
    Case("Mish", [r(3, 4, dtype=F32)], opset=22, id="f32"),
    Case("Softplus", [r(3, 4, dtype=F32)], opset=7, id="f32"),
    Case("Softplus", [r(3, 4, dtype=F32)], opset=22, id="f32"),
    Case("Softsign", [r(3, 4, dtype=F32)], opset=7, id="f32"),
    Case("Softsign", [r(3, 4, dtype=F32)], opset=22, id="f32"),
    Case("ThresholdedRelu", [f32(away(r(3, 4), 0.3))], attrs={"alpha": 0.3}, opset=10, id="f32"),
    Case("ThresholdedRelu", [f32(away(r(3, 4, low=-2, high=3), 1.0))], opset=22, id="f32"),
    # onnxruntime's float64 Shrink computes through float32 (errors ~1e-8): a larger step (exact, Shrink is
    # piecewise linear and the inputs keep 0.15 from the kinks) and rtol 1e-4.
    Case("Shrink", [away(r(3, 4), -0.4, 0.4)], attrs={"lambd": 0.4, "bias": 0.2}, opset=9, eps=1e-3, rtol=1e-4),
    Case("Shrink", [away(r(3, 4), -0.5, 0.5)], opset=9, id="default", eps=1e-3, rtol=1e-4),
    Case("Swish", [r(3, 4)], opset=24),
    Case("Swish", [r(3, 4)], attrs={"alpha": 1.3}, opset=24, id="alpha"),
    # Clip: attributes before opset 11, optional scalar inputs from 11 (differentiated when fed as inputs).
    Case("Clip", [f32(away(r(3, 4), -0.5, 0.8))], attrs={"min": -0.5, "max": 0.8}, opset=7, id="f32"),
    Case("Clip", [f32(away(r(3, 4), 0.2))], attrs={"min": 0.2}, opset=7, id="min-f32"),
    Case("Clip", [f32(away(r(3, 4), -0.5, 0.8)), np.array(-0.5, F32), np.array(0.8, F32)], opset=11, id="f32"),
    Case("Clip", [away(r(3, 4), 0.3), None, np.array(0.3)], opset=12, id="max"),
    Case("Clip", [away(r(3, 4), -0.5, 0.8), np.array(-0.5), np.array(0.8)], opset=13),
    Case("Clip", [away(r(3, 4), -0.2), np.array(-0.2)], opset=13, id="min"),
    Case("Clip", [r(3, 4)], opset=13, id="none"),
    Case("Clip", [r(3, 4), np.array(0.5), np.array(-0.2)], opset=13, id="min-gt-max"),
]

# SwiGLU exists from opset 28, beyond onnxruntime 1.31: checked on onnx's reference evaluator.
CASES += [
    Case("SwiGLU", [r(2, 3, seed=1), r(2, 3, seed=2)], opset=28, dynamic=False),
    Case("SwiGLU", [r(2, 3, seed=1), r(2, 3, seed=2)], attrs={"alpha": 1.702}, opset=28, id="alpha", dynamic=False),
]
