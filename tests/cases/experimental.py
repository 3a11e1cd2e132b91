"""Rule cases: the experimental ops ONNX removed that onnxruntime still runs (float-only kernels: float32 cases,
checker defaults eps 1e-3, rtol 1e-2; onnx's checker warns about them and passes). Opset 8, as the early model zoo
has them; IR 3."""

from __future__ import annotations

import numpy as np

from tests.gradcheck import Case, Const
from tests.gradcheck import rng_array as r

F32 = np.float32
X = r(2, 3, 5, 6, dtype=F32)

CASES: list[Case] = [
    Case("ImageScaler", [X], attrs={"scale": 0.7, "bias": [0.1, -0.2, 0.3]}, opset=8, id="f32"),
    Case("Scale", [X], attrs={"scale": -1.5}, opset=8, id="f32"),
    Case("Affine", [X], attrs={"alpha": 2.5, "beta": -0.4}, opset=8, id="f32"),
    Case("ScaledTanh", [X], attrs={"alpha": 1.7, "beta": 0.6}, opset=8, id="f32"),
    Case("ParametricSoftplus", [X], attrs={"alpha": 0.8, "beta": 1.3}, opset=8, id="f32"),
    Case("Crop", [X], attrs={"border": [1, 2, 0, 1]}, opset=8, id="border-f32", dynamic=False),
    Case("Crop", [X], attrs={"border": [2, 1, 0, 0], "scale": [3, 2]}, opset=8, id="scale-f32", dynamic=False),
    Case("DynamicSlice", [X, Const(np.array([1, 0])), Const(np.array([3, -1])), Const(np.array([2, 3]))], opset=8,
         id="f32", dynamic=False),
]
