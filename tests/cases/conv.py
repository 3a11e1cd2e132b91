"""Rule cases: convolution and pooling.

onnxruntime's CPU Conv, ConvTranspose, AveragePool, LpPool, the global pools and LRN have no float64
kernels (and every pool's gradient runs a ConvTranspose), so all cases are float32 and use the checker's
float32 defaults (eps 1e-3, rtol 1e-2).
"""

from __future__ import annotations

import numpy as np

from tests.gradcheck import Case, Const
from tests.gradcheck import rng_array as _r

F32 = np.float32


def r(*shape: int, seed: int = 0) -> np.ndarray:
    """Standard-normal float32 data."""
    return _r(*shape, seed=seed, dtype=F32)


def distinct(*shape: int, seed: int = 0) -> np.ndarray:
    """Values at least 0.05 apart (no near ties for max pooling's central differences)."""
    rng = np.random.default_rng(seed)
    n = int(np.prod(shape))
    return ((rng.permutation(n) - n / 2) * 0.05).reshape(shape).astype(F32)


def away(*shape: int, seed: int = 0) -> np.ndarray:
    """|x| in [0.3, 1.5] with random signs (away from the kink of |x|^p at 0)."""
    rng = np.random.default_rng(seed)
    return (rng.uniform(0.3, 1.5, shape) * rng.choice([-1.0, 1.0], shape)).astype(F32)


def offsets(*shape: int, seed: int = 0) -> np.ndarray:
    """DeformConv offsets: integers in [-2, 2] plus a fraction in [0.2, 0.8], so sampling coordinates stay
    away from the integers where bilinear interpolation has kinks (and some fall outside the image)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(-2, 3, shape) + rng.uniform(0.2, 0.8, shape)).astype(F32)


CASES: list[Case] = [
    # ------------------------------------------------------------------ Conv
    Case("Conv", [r(2, 3, 5, 5, seed=1), r(4, 3, 3, 3, seed=2), r(4, seed=3)], opset=7, id="bias"),
    Case("Conv", [r(2, 2, 8, seed=1), r(3, 2, 3, seed=2)], attrs={"strides": [3], "pads": [1, 0]}, opset=11,
         id="1d-stride-leftover"),
    Case("Conv", [r(1, 1, 7, seed=1), r(1, 1, 2, seed=2)], attrs={"strides": [3]}, id="stride-gt-kernel"),
    Case("Conv", [r(2, 4, 7, 6, seed=1), r(6, 2, 2, 3, seed=2), r(6, seed=3)],
         attrs={"strides": [2, 2], "dilations": [2, 1], "pads": [1, 0, 0, 2], "group": 2}, opset=22,
         id="group-dilate"),
    Case("Conv", [r(2, 3, 6, 6, seed=1), r(3, 1, 3, 3, seed=2)],
         attrs={"group": 3, "strides": [2, 2], "pads": [1, 1, 0, 0], "kernel_shape": [3, 3]}, opset=13,
         id="depthwise"),
    # stride 1: dX is the grouped Conv of dY with W flipped (plans.conv.input_grad_flipped)
    Case("Conv", [r(2, 4, 9, 8, seed=1), r(4, 1, 7, 7, seed=2), r(4, seed=3)],
         attrs={"group": 4, "pads": [3, 3, 3, 3]}, opset=11, id="depthwise-7x7"),
    Case("Conv", [r(2, 4, 6, 5, seed=1), r(6, 2, 3, 3, seed=2)], attrs={"group": 2, "pads": [1, 0, 1, 2]}, opset=13,
         id="group-unstrided"),
    Case("Conv", [r(1, 3, 5, 6, seed=1), r(6, 1, 3, 2, seed=2)], attrs={"group": 3, "dilations": [2, 1]}, opset=17,
         id="depthwise-multiplier-dilated"),
    Case("Conv", [r(1, 2, 5, 6, seed=1), r(3, 2, 3, 3, seed=2)], attrs={"auto_pad": "SAME_UPPER", "strides": [2, 2]},
         opset=11, id="same-upper"),
    Case("Conv", [r(2, 2, 6, 5, seed=1), r(2, 2, 2, 3, seed=2)], attrs={"auto_pad": "SAME_LOWER", "strides": [2, 1]},
         id="same-lower"),
    Case("Conv", [r(2, 2, 4, 5, 4, seed=1), r(2, 2, 2, 2, 3, seed=2), r(2, seed=3)],
         attrs={"auto_pad": "VALID", "strides": [2, 1, 2]}, opset=19, id="3d-valid"),
    # dW plans (see tests/test_conv_plans.py): the group-1 undilated cases above take the interleaved Conv (the
    # grouped ones the grouped Conv of X^T); these take im2col + Gemm
    Case("Conv", [r(1, 3, 4, 4, seed=1), r(6, 3, 3, 3, seed=2)], id="wide-weight-gemm"),
    Case("Conv", [r(2, 3, 7, 7, seed=1), r(4, 3, 3, 3, seed=2)],
         attrs={"strides": [2, 2], "dilations": [2, 1], "pads": [2, 1, 1, 0]}, opset=9, id="dilated-phases-gemm"),
    Case("Conv", [r(2, 4, 3, 3, seed=1), r(5, 4, 1, 1, seed=2)], id="1x1-gemm"),
    Case("Conv", [r(2, 3, 7, 6, seed=1), r(4, 3, 3, 2, seed=2)], attrs={"strides": [2, 3], "pads": [1, 0, 0, 1]},
         opset=9, id="strided-opset9"),
    # --------------------------------------------------------- ConvTranspose
    Case("ConvTranspose", [r(2, 3, 3, 3, seed=1), r(3, 2, 3, 3, seed=2), r(2, seed=3)], opset=7, id="bias"),
    Case("ConvTranspose", [r(2, 2, 3, 4, seed=1), r(2, 3, 3, 3, seed=2)],
         attrs={"strides": [2, 2], "pads": [1, 0, 1, 1], "output_padding": [1, 0]}, opset=11, id="output-padding"),
    Case("ConvTranspose", [r(1, 2, 3, 3, seed=1), r(2, 2, 3, 3, seed=2)],
         attrs={"strides": [2, 2], "output_shape": [6, 5], "auto_pad": "SAME_UPPER"}, id="output-shape-upper"),
    Case("ConvTranspose", [r(2, 2, 4, seed=1), r(2, 3, 3, seed=2)], attrs={"strides": [2], "output_shape": [8]},
         id="output-shape"),
    Case("ConvTranspose", [r(2, 4, 3, 3, seed=1), r(4, 1, 2, 3, seed=2)],
         attrs={"group": 2, "strides": [2, 2], "dilations": [1, 2], "auto_pad": "SAME_LOWER"}, opset=13,
         id="group-same-lower"),
    Case("ConvTranspose", [r(2, 2, 4, seed=1), r(2, 2, 3, seed=2)],
         attrs={"strides": [2], "dilations": [2], "output_padding": [1]}, opset=19, id="dilated-output-padding"),
    Case("ConvTranspose", [r(1, 2, 2, 2, 3, seed=1), r(2, 2, 2, 2, 2, seed=2), r(2, seed=3)],
         attrs={"strides": [2, 2, 1]}, opset=22, id="3d"),
    # ----------------------------------------------------------- AveragePool
    Case("AveragePool", [r(2, 3, 4, 4)], attrs={"kernel_shape": [2, 2], "strides": [2, 2]}, opset=7),
    Case("AveragePool", [r(2, 2, 5, 5)], attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
         opset=7, id="pads-exclude"),
    Case("AveragePool", [r(2, 2, 5, 5)], attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 0, 2, 1],
         "count_include_pad": 1}, opset=11, id="pads-include"),
    Case("AveragePool", [r(2, 2, 5, 5)], attrs={"kernel_shape": [2, 2], "strides": [2, 2], "ceil_mode": 1},
         opset=10, id="ceil"),
    Case("AveragePool", [r(2, 2, 7, 6)], attrs={"kernel_shape": [2, 3], "strides": [2, 2], "dilations": [2, 1],
         "pads": [1, 1, 1, 0], "ceil_mode": 1, "count_include_pad": 1}, opset=19, id="ceil-dilate-include"),
    # (a ceil_mode window that would start in the end pad is dropped by onnxruntime and by the rule, but onnx
    # shape inference still counts it, so the harness cannot feed dY of the right shape: no case for it)
    Case("AveragePool", [r(1, 2, 5, 5)], attrs={"kernel_shape": [3, 3], "strides": [2, 2], "auto_pad": "SAME_UPPER"},
         opset=11, id="same-upper"),
    Case("AveragePool", [r(2, 3, 9)], attrs={"kernel_shape": [3], "strides": [2]}, opset=22, id="1d"),
    Case("AveragePool", [r(2, 3, 5, 5)], attrs={"kernel_shape": [5, 5]}, opset=9, id="one-window"),
    Case("AveragePool", [r(1, 2, 4, 4, 4)], attrs={"kernel_shape": [2, 2, 2], "strides": [2, 2, 2]}, opset=19,
         id="3d"),
    # --------------------------------------------------------------- MaxPool
    Case("MaxPool", [distinct(2, 2, 4, 4)], attrs={"kernel_shape": [2, 2], "strides": [2, 2]}, opset=7),
    Case("MaxPool", [distinct(2, 2, 5, 5)], attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1]},
         opset=8, n_outputs=2, id="pads-indices"),
    Case("MaxPool", [distinct(2, 2, 7, 7)], attrs={"kernel_shape": [2, 2], "strides": [2, 2], "dilations": [2, 2],
         "ceil_mode": 1}, opset=10, id="ceil-dilate"),
    Case("MaxPool", [distinct(1, 3, 5, 6)], attrs={"kernel_shape": [3, 3], "strides": [2, 2],
         "auto_pad": "SAME_LOWER"}, opset=11, id="same-lower"),
    Case("MaxPool", [distinct(2, 2, 5, 4)], attrs={"kernel_shape": [2, 3], "strides": [1, 2], "pads": [0, 1, 1, 0],
         "storage_order": 1}, opset=12, n_outputs=2, id="storage-order"),
    Case("MaxPool", [distinct(2, 2, 3, 4)], attrs={"kernel_shape": [3, 2], "strides": [1, 2]}, opset=11,
         id="tiling-one-row"),
    Case("MaxPool", [distinct(2, 2, 7, 7)], attrs={"kernel_shape": [3, 3], "strides": [2, 2], "dilations": [1, 2],
         "pads": [1, 1, 0, 0], "ceil_mode": 1}, opset=19, id="scatter-add-ceil-dilate"),
    Case("MaxPool", [distinct(2, 2, 4, 6)], attrs={"kernel_shape": [2, 2], "strides": [2, 2]}, opset=9,
         id="tiling-opset9"),
    Case("MaxPool", [distinct(2, 3, 5, 6)], attrs={"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 0, 0, 0]},
         opset=12, id="scatter-tiling-pads"),
    Case("MaxPool", [distinct(2, 2, 5, 4)], attrs={"kernel_shape": [2, 2], "strides": [2, 2]}, opset=18,
         n_outputs=2, id="scatter-own-indices"),
    Case("MaxPool", [distinct(2, 3, 9)], attrs={"kernel_shape": [3], "strides": [2], "pads": [1, 1]}, opset=22,
         id="1d"),
    Case("MaxPool", [distinct(1, 2, 4, 4, 4)], attrs={"kernel_shape": [2, 2, 2], "strides": [2, 2, 2]}, opset=22,
         id="3d"),
    # ---------------------------------------------------------------- LpPool
    Case("LpPool", [away(2, 2, 4, 4)], attrs={"kernel_shape": [2, 2], "strides": [2, 2]}, opset=7),
    Case("LpPool", [away(2, 2, 5, 5)], attrs={"kernel_shape": [3, 3], "strides": [2, 2], "pads": [1, 1, 1, 1],
         "p": 3}, opset=11, id="p3-pads"),
    Case("LpPool", [away(2, 2, 7, 6)], attrs={"kernel_shape": [2, 2], "strides": [2, 2], "dilations": [2, 1],
         "ceil_mode": 1, "p": 1}, opset=18, id="p1-ceil-dilate"),
    Case("LpPool", [away(2, 3, 8)], attrs={"kernel_shape": [3], "strides": [2], "auto_pad": "SAME_UPPER"}, opset=22,
         id="1d-same"),
    # ---------------------------------------------------------- Global pools
    Case("GlobalAveragePool", [r(2, 3, 4, 5)], opset=7),
    Case("GlobalAveragePool", [r(2, 3, 4)], opset=22, id="1d"),
    Case("GlobalMaxPool", [distinct(2, 3, 4, 5)], opset=7),
    Case("GlobalMaxPool", [distinct(2, 2, 3, 3, 3)], opset=22, id="3d"),
    Case("GlobalLpPool", [away(2, 3, 4, 4)], opset=7),
    # onnxruntime has no GlobalLpPool-22 kernel: opset 21 is the newest that runs.
    Case("GlobalLpPool", [away(2, 3, 5)], attrs={"p": 3}, opset=21, id="p3"),
    Case("GlobalLpPool", [away(2, 2, 3, 3)], attrs={"p": 1}, opset=11, id="p1"),
    # ------------------------------------------------------------------- LRN
    Case("LRN", [r(2, 5, 3, 3)], attrs={"size": 3}, opset=7),
    # (onnxruntime accepts only odd sizes, so the asymmetric window of an even size cannot run here)
    Case("LRN", [r(2, 6, 3, 2)], attrs={"size": 5, "alpha": 0.5, "beta": 0.6, "bias": 2.0}, opset=13, id="params"),
    # ---------------------------------------------------------------- Col2Im
    Case("Col2Im", [r(2, 8, 12), Const(np.array([4, 5])), Const(np.array([2, 2]))], opset=18),
    Case("Col2Im", [r(2, 12, 4), Const(np.array([4, 5])), Const(np.array([2, 3]))],
         attrs={"strides": [2, 1], "dilations": [1, 2], "pads": [1, 0, 0, 1]}, opset=18, id="stride-dilate-pads"),
    # ------------------------------------------------------------ DeformConv
    Case("DeformConv", [r(2, 4, 5, 5, seed=1), r(6, 2, 3, 3, seed=2), offsets(2, 36, 3, 3, seed=3), r(6, seed=4),
                        _r(2, 18, 3, 3, seed=5, low=0.2, high=1.0, dtype=F32)],
         attrs={"group": 2, "offset_group": 2}, opset=19, id="bias-mask-groups"),
    Case("DeformConv", [r(2, 2, 6, 6, seed=1), r(3, 2, 2, 2, seed=2), offsets(2, 8, 3, 3, seed=3)],
         attrs={"strides": [2, 2], "pads": [1, 1, 1, 1], "dilations": [2, 2]}, opset=22, id="stride-pad-dilate"),
    Case("DeformConv", [r(1, 2, 4, 5, seed=1), r(2, 2, 2, 3, seed=2), offsets(1, 12, 3, 4, seed=3), None,
                        _r(1, 6, 3, 4, seed=5, low=0.2, high=1.0, dtype=F32)],
         attrs={"pads": [0, 1, 0, 0]}, opset=19, id="mask-only"),
]
