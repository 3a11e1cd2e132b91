"""Rule cases: resampling (Resize, Upsample, GridSample, AffineGrid), ROI pooling and unpooling.

onnxruntime's CPU kernels for Resize, Upsample, MaxUnpool, MaxRoiPool and GridSample-16 are float32 only,
so those cases use float32 inputs (the default float32 tolerances of the checker suffice: the maps are
linear in X, and the coordinates fed to grid-based ops stay away from integer kinks)."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from tests.gradcheck import Case, Const
from tests.gradcheck import rng_array as r

F32 = np.float32


def _x(*shape: int, seed: int = 0) -> np.ndarray:
    return r(*shape, seed=seed, dtype=F32)


def _f(*values: float) -> Const:
    return Const(np.array(values, dtype=F32))


def _i(*values: int) -> Const:
    return Const(np.array(values, dtype=np.int64))


X4 = _x(2, 2, 3, 4)

CASES: list[Case] = [
    # Upsample: scales as attribute (7) or input (9); asymmetric coordinates
    Case("Upsample", [X4], {"mode": "nearest", "scales": [1.0, 1.0, 2.0, 3.0]}, opset=7, id="nearest"),
    Case("Upsample", [X4], {"mode": "linear", "scales": [1.0, 1.0, 2.0, 1.5]}, opset=8, id="linear"),
    Case("Upsample", [X4, _f(1, 1, 2, 3)], {"mode": "nearest"}, opset=9, id="nearest"),
    Case("Upsample", [X4, _f(1, 1, 1.5, 2.5)], {"mode": "linear"}, opset=9, id="linear"),
    # Resize-10: (X, scales)
    Case("Resize", [X4, _f(1, 1, 2, 1.5)], {"mode": "linear"}, opset=10, id="linear"),
    Case("Resize", [X4, _f(1, 1, 0.7, 2)], {"mode": "nearest"}, opset=10, id="nearest"),
    Case("Resize", [_x(3, 4), _f(2, 0.75)], {"mode": "linear"}, opset=10, id="rank2-leading"),
    # Resize-11: roi, coordinate modes, cubic, sizes
    Case("Resize", [X4, _f(), _f(1, 1, 2, 1.5)], {"mode": "linear", "coordinate_transformation_mode": "half_pixel"},
         opset=11, id="linear-half-pixel"),
    Case("Resize", [X4, _f(), _f(1, 1, 2, 1.5)],
         {"mode": "linear", "coordinate_transformation_mode": "align_corners"}, opset=11, id="linear-align"),
    Case("Resize", [X4, _f(), _f(1, 1, 1.7, 2)],
         {"mode": "cubic", "coordinate_transformation_mode": "pytorch_half_pixel"}, opset=11, id="cubic"),
    Case("Resize", [X4, _f(), _f(1, 1, 2, 1.5)],
         {"mode": "nearest", "coordinate_transformation_mode": "tf_half_pixel_for_nn"}, opset=11, id="nearest-tf"),
    Case("Resize", [X4, _f(0, 0, 0.1, 0.2, 1, 1, 0.9, 0.7), _f(), _i(2, 2, 4, 5)],
         {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize", "extrapolation_value": 2.0},
         opset=11, id="crop-sizes"),
    # the crop box differentiated too (Resize-18's axes: a box for H and W alone), its samples off pixel centres
    *(Case("Resize", [X4, np.array([0.13, 0.21, 0.88, 0.74], dtype=F32), None, _i(4, 5)],
           {"mode": "linear", "coordinate_transformation_mode": "tf_crop_and_resize", "axes": [2, 3],
            "extrapolation_value": 2.0}, opset=o, id="crop-box") for o in (18, 19)),
    # Resize-13: roi and scales optional
    Case("Resize", [X4, None, _f(1, 1, 2.5, 0.5)],
         {"mode": "nearest", "coordinate_transformation_mode": "half_pixel", "nearest_mode": "round_prefer_ceil"},
         opset=13, id="nearest-ceil"),
    Case("Resize", [X4, None, None, _i(2, 2, 5, 7)],
         {"mode": "cubic", "cubic_coeff_a": -0.5, "exclude_outside": 1}, opset=13, id="cubic-sizes"),
    Case("Resize", [X4, None, _f(1, 1, 2, 2)], {"mode": "linear", "coordinate_transformation_mode": "asymmetric"},
         opset=13, id="linear-asym"),
    # Resize-18: antialias, axes, keep_aspect_ratio_policy
    Case("Resize", [_x(2, 1, 6, 7), None, _f(0.5, 0.6)], {"mode": "linear", "antialias": 1, "axes": [2, 3]},
         opset=18, id="antialias-linear"),
    Case("Resize", [_x(2, 1, 6, 7), None, _f(0.6, 0.45)], {"mode": "cubic", "antialias": 1, "axes": [2, 3]},
         opset=18, id="antialias-cubic"),
    Case("Resize", [X4, None, None, _i(7, 6)],
         {"mode": "linear", "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"}, opset=18, id="not-larger"),
    Case("Resize", [_x(2, 1, 5, 4), None, None, _i(7, 7)],
         {"mode": "cubic", "axes": [2, 3], "keep_aspect_ratio_policy": "not_smaller"}, opset=18, id="not-smaller"),
    # (onnxruntime 1.31 ignores negative axes when keep_aspect_ratio_policy is not 'stretch': positive above)
    Case("Resize", [_x(2, 3, 5), None, _f(1.6)], {"mode": "nearest", "axes": [-1], "nearest_mode": "floor"},
         opset=18, id="rank3-axis"),
    # Resize-19: half_pixel_symmetric
    Case("Resize", [X4, None, _f(1, 1, 1.5, 0.8)],
         {"mode": "linear", "coordinate_transformation_mode": "half_pixel_symmetric"}, opset=19, id="symmetric"),
    Case("Resize", [X4, None, None, _i(2, 2, 4, 6)],
         {"mode": "cubic", "coordinate_transformation_mode": "half_pixel_symmetric"}, opset=19, id="cubic"),
]


# what segmentation nets export: F.interpolate(scale_factor=2) as bilinear (half_pixel: align_corners=False;
# align_corners) or nearest (asymmetric, floor) at opsets 11 and 17, on odd sizes; and to a size computed at run time
# (sizes a graph input here, as a Shape subgraph is to the rule). tests/test_resample_exports.py has the exports.
XS = _x(2, 3, 5, 7, seed=3)
_BILINEAR = {"mode": "linear", "coordinate_transformation_mode": "half_pixel"}
_ALIGNED = {"mode": "linear", "coordinate_transformation_mode": "align_corners"}
_NEAREST = {"mode": "nearest", "coordinate_transformation_mode": "asymmetric", "nearest_mode": "floor"}
CASES += [
    Case("Resize", [XS, _f(), _f(1, 1, 2, 2)], _BILINEAR, opset=11, id="bilinear-x2"),
    Case("Resize", [XS, _f(), _f(1, 1, 2, 2)], _ALIGNED, opset=11, id="bilinear-x2-align"),
    Case("Resize", [XS, _f(), _f(1, 1, 2, 2)], _NEAREST, opset=11, id="nearest-x2"),
    Case("Resize", [XS, None, _f(1, 1, 2, 2)], _BILINEAR, opset=17, id="bilinear-x2"),
    Case("Resize", [XS, None, _f(1, 1, 2, 2)], _ALIGNED, opset=17, id="bilinear-x2-align"),
    Case("Resize", [XS, _f(), _f(), np.array([2, 3, 9, 12], dtype=np.int64)], _BILINEAR, opset=11,
         id="bilinear-runtime-sizes", dynamic=False, second_order=False),  # output shape known only at run time
    Case("Resize", [XS, None, None, np.array([2, 3, 11, 13], dtype=np.int64)], _ALIGNED, opset=17,
         id="align-runtime-sizes", dynamic=False, second_order=False),
    Case("Resize", [X4, None, None, np.array([7, 6], dtype=np.int64)],
         {"mode": "linear", "axes": [2, 3], "keep_aspect_ratio_policy": "not_larger"}, opset=18,
         id="not-larger-runtime-sizes", dynamic=False, second_order=False),
]


def _unpool_indices(pooled: tuple[int, ...], out: tuple[int, ...], seed: int) -> Const:
    """Distinct flat indices into a tensor of shape ``out``, one per element of the pooled input, each
    inside its own (n, c) plane as MaxPool's indices are."""
    rng = np.random.default_rng(seed)
    n, c, h, w = pooled
    plane = out[2] * out[3]
    picks = [rng.permutation(plane)[: h * w] + k * plane for k in range(n * c)]
    return Const(np.stack(picks).reshape(pooled).astype(np.int64))


CASES += [
    Case("MaxUnpool", [_x(2, 2, 2, 3), _unpool_indices((2, 2, 2, 3), (2, 2, 4, 6), 1)],
         {"kernel_shape": [2, 2], "strides": [2, 2]}, opset=9),
    # (with an output_shape input, onnx shape inference leaves the output untyped, which the table's
    # one-node models cannot take: pads exercise the same rule)
    Case("MaxUnpool", [_x(2, 2, 2, 2), _unpool_indices((2, 2, 2, 2), (2, 2, 3, 3), 2)],
         {"kernel_shape": [2, 2], "strides": [2, 2], "pads": [0, 0, 1, 1]}, opset=11, id="pads"),
    Case("AffineGrid", [r(2, 2, 3), _i(2, 3, 4, 5)], opset=20),
    Case("AffineGrid", [r(2, 2, 3), _i(2, 1, 3, 1)], {"align_corners": 1}, opset=20, id="align"),
    Case("AffineGrid", [r(2, 3, 4), _i(2, 1, 2, 3, 4)], {"align_corners": 1}, opset=20, id="3d"),
    Case("Resize", [X4, None, None, np.array([2, 2, 5, 6], dtype=np.int64)], {"mode": "linear"}, opset=13,
         id="runtime-sizes", dynamic=False, second_order=False),  # output shape known only at run time
]


def _grid(n: int, out: tuple[int, ...], size: tuple[int, ...], align: int, seed: int, spread: float = 1.5,
          dtype: type = np.float64) -> np.ndarray:
    """A GridSample grid (x first) whose pixel coordinates lie in [-spread, size - 1 + spread] and keep
    their fractional parts in [0.15, 0.35] or [0.65, 0.85]: away from the integer kinks of linear and cubic
    sampling and from the rounding ties of nearest."""
    rng = np.random.default_rng(seed)
    comps = []
    for length in reversed(size):  # x indexes the last axis
        whole = rng.integers(int(np.floor(-spread)), int(np.ceil(length - 1 + spread)), (n, *out))
        frac = rng.uniform(0.15, 0.35, (n, *out)) + 0.5 * rng.integers(0, 2, (n, *out))
        u = whole + frac
        comps.append(2 * u / (length - 1) - 1 if align else (2 * u + 1) / length - 1)
    return np.stack(comps, axis=-1).astype(dtype)


def _gs(opset: int, mode: str, padding: str, align: int, x: np.ndarray, out: tuple[int, ...], seed: int,
        spread: float = 1.5) -> Case:
    grid = _grid(x.shape[0], out, x.shape[2:], align, seed, spread, x.dtype.type)
    return Case("GridSample", [x, grid], {"mode": mode, "padding_mode": padding, "align_corners": align},
                opset=opset, id=f"{mode}-{padding}-{align}" + ("-3d" if x.ndim == 5 else ""), seed=seed)


X64 = r(2, 2, 3, 4, seed=5)
CASES += [
    _gs(16, "bilinear", "zeros", 0, X4, (2, 3), 1),
    _gs(16, "bilinear", "border", 1, X4, (2, 3), 2),
    _gs(16, "bilinear", "reflection", 0, X4, (3, 3), 3, spread=5.0),
    _gs(16, "nearest", "zeros", 1, X4, (2, 3), 4),
    _gs(16, "nearest", "reflection", 1, X4, (2, 3), 5, spread=4.0),
    _gs(16, "bicubic", "zeros", 0, X4, (2, 2), 6),
    _gs(16, "bicubic", "border", 1, X4, (2, 2), 7),
    _gs(20, "linear", "reflection", 1, X64, (2, 3), 8, spread=5.0),
    _gs(20, "cubic", "reflection", 0, X64, (2, 2), 9, spread=3.0),
    _gs(20, "nearest", "border", 0, X64, (3, 2), 10),
    _gs(20, "linear", "zeros", 1, r(2, 1, 2, 3, 3, seed=6), (2, 2, 2), 11),
    _gs(20, "nearest", "reflection", 0, r(2, 1, 2, 3, 3, seed=7), (2, 2, 2), 12, spread=3.0),
    _gs(22, "linear", "border", 0, r(2, 1, 3, 2, 3, seed=8), (2, 1, 2), 13),
    _gs(22, "cubic", "zeros", 1, X64, (2, 3), 14),
    _gs(22, "linear", "zeros", 0, X64, (2, 3), 15),
    # F.grid_sample as segmentation and flow nets call it: bilinear, zeros or border, on odd sizes
    *(replace(c, id=f"{c.id}-odd") for c in (
        _gs(16, "bilinear", "zeros", 0, XS, (4, 6), 16),
        _gs(16, "bilinear", "border", 0, XS, (3, 5), 17),
        _gs(20, "linear", "border", 0, r(2, 3, 5, 7, seed=9), (4, 3), 18),
    )),
]


RX = r(2, 2, 6, 7, seed=21)
BOXES = Const(np.array([[0.6, 0.3, 5.2, 4.9], [1.3, 2.2, 3.1, 3.6], [-1.7, -2.4, 2.9, 6.8]]))  # x1, y1, x2, y2
BATCH = _i(0, 1, 1)


def _ra(opset: int, case_id: str, **attrs: object) -> Case:
    attrs = {"output_height": 2, "output_width": 3, **attrs}
    return Case("RoiAlign", [RX, BOXES, BATCH], attrs, opset=opset, id=case_id)


CASES += [
    _ra(10, "avg", sampling_ratio=2),
    _ra(10, "avg-adaptive", spatial_scale=0.8),
    _ra(10, "max", mode="max", sampling_ratio=2),
    _ra(16, "avg-half-pixel"),
    _ra(16, "avg-output-half-pixel", coordinate_transformation_mode="output_half_pixel", sampling_ratio=1),
    _ra(16, "max-adaptive", mode="max", spatial_scale=1.3),
    _ra(16, "max-half-pixel", mode="max", sampling_ratio=3, output_height=3, output_width=2),
]
# the boxes differentiated too (avg mode): inside, crossing the border, smaller than a pixel (forced to 1 x 1 before
# half_pixel); no sample point on a pixel centre, no box whose adaptive sample count is about to change
MOVING = np.array([[0.6, 0.3, 5.2, 4.9], [1.3, 2.2, 3.1, 3.6], [-1.7, -2.4, 2.9, 6.85], [2.3, 1.45, 2.75, 1.85]])
CASES += [
    Case("RoiAlign", [RX, MOVING, _i(0, 1, 1, 0)], {"output_height": 2, "output_width": 3, **attrs}, opset=opset,
         id=f"{case_id}-boxes")
    for opset, case_id, attrs in (
        (10, "avg", {"sampling_ratio": 2}),
        (10, "avg-adaptive", {"spatial_scale": 0.8}),
        (16, "avg-half-pixel", {}),
        (16, "avg-output-half-pixel", {"coordinate_transformation_mode": "output_half_pixel", "sampling_ratio": 1}),
    )
]

POOL_BOXES = Const(np.array([[0, 0.6, 0.3, 5.2, 4.9], [1, 1.3, 2.2, 3.1, 3.6], [1, -1.7, -2.4, 2.9, 6.8]], dtype=F32))
CASES += [
    # before opset 9 a run-time batch size cannot be turned into an identity matrix: static shapes only
    Case("MaxRoiPool", [_x(2, 2, 6, 7, seed=22), POOL_BOXES], {"pooled_shape": [2, 3]}, opset=7, dynamic=False),
    Case("MaxRoiPool", [_x(2, 2, 6, 7, seed=23), POOL_BOXES], {"pooled_shape": [3, 2], "spatial_scale": 0.7},
         opset=16, id="scaled"),
]
CASES.append(
    # products landing on .5 (constants: no finite differences cross them) check C's round-half-away-from-zero
    Case("MaxRoiPool", [_x(2, 2, 6, 7, seed=24), Const(np.array([[1, 1, 3, 5, 9], [0, 5, 1, 11, 7]], dtype=F32))],
         {"pooled_shape": [2, 2], "spatial_scale": 0.5}, opset=11, id="half-ties"),
)
