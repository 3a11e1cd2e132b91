"""Rule cases: data movement (reshapes, slicing, gathering, scattering, padding, tiling).

Index inputs given as ``Const`` are initializers (the rules see constants); index inputs given as plain
int arrays become graph inputs, so the rules must take the run-time path."""

from __future__ import annotations

import numpy as np

from tests.gradcheck import Case, Const
from tests.gradcheck import rng_array as r


def i64(*values: object) -> Const:
    return Const(np.array(values, dtype=np.int64))


def distinct(*shape: int, seed: int = 0) -> np.ndarray:
    """Values at least 0.1 apart (no ties for TopK, max/min scatter)."""
    rng = np.random.default_rng(seed)
    return rng.permutation(int(np.prod(shape))).reshape(shape).astype(np.float64) * 0.1 - 1.0


I_DUP = np.array([[0, 2], [2, 2]], dtype=np.int64)  # repeated indices: the gradient must accumulate

CASES: list[Case] = [
    # ------------------------------------------------------------------ reshapes and permutations
    Case("Flatten", [r(2, 3, 4)], attrs={"axis": 2}, opset=7),
    Case("Flatten", [r(2, 3, 4)], attrs={"axis": -1}, opset=13, id="neg-axis"),
    Case("Flatten", [r(2, 3, 4)], attrs={"axis": 0}, opset=21, id="axis0"),
    Case("Squeeze", [r(2, 1, 3, 1)], attrs={"axes": [1, 3]}, opset=7),
    Case("Squeeze", [r(2, 1, 3, 1)], attrs={"axes": [-1]}, opset=11, id="neg-attr"),
    Case("Squeeze", [r(2, 1, 3, 1), i64(1, -1)], opset=13, id="input"),
    Case("Squeeze", [r(2, 1, 3, 1)], opset=13, id="all", dynamic=False),
    Case("Unsqueeze", [r(2, 3)], attrs={"axes": [0, 3]}, opset=7),
    Case("Unsqueeze", [r(2, 3)], attrs={"axes": [-1]}, opset=11, id="neg-attr"),
    Case("Unsqueeze", [r(2, 3), i64(1, -1)], opset=13, id="input"),
    Case("Unsqueeze", [r(2, 3), i64(0)], opset=24, id="v24"),
    Case("DepthToSpace", [r(2, 8, 2, 3)], attrs={"blocksize": 2}, opset=7),
    Case("DepthToSpace", [r(2, 8, 2, 3)], attrs={"blocksize": 2, "mode": "CRD"}, opset=11, id="crd"),
    Case("DepthToSpace", [r(2, 8, 2, 3)], attrs={"blocksize": 2, "mode": "DCR"}, opset=13, id="dcr"),
    Case("SpaceToDepth", [r(2, 2, 4, 6)], attrs={"blocksize": 2}, opset=7),
    Case("SpaceToDepth", [r(2, 2, 4, 6)], attrs={"blocksize": 2}, opset=13, id="v13"),
    Case("Trilu", [r(2, 3, 4)], opset=14),
    Case("Trilu", [r(2, 3, 4), i64(1)], attrs={"upper": 0}, opset=14, id="lower-k"),
    Case("Trilu", [r(3, 4), Const(np.array(-1, dtype=np.int64))], attrs={"upper": 1}, opset=14, id="upper-k"),
    Case("ReverseSequence", [r(4, 3, 2), i64(4, 2, 1)], attrs={"batch_axis": 1, "time_axis": 0}, opset=10),
    Case("ReverseSequence", [r(3, 4, 2), i64(1, 4, 3)], attrs={"batch_axis": 0, "time_axis": 1}, opset=10,
         id="batch0"),
    Case("CastLike", [r(3, 4), Const(np.zeros(1))], opset=15),
    # the output is float64, but x is float32: float32-sized finite differences
    Case("CastLike", [r(3, 4, dtype=np.float32), Const(np.zeros(1))], opset=21, id="f32-f64", rtol=1e-2),
    # ----------------------------------------------------------------------- concatenate, split
    Case("Concat", [r(2, 3, seed=1), r(2, 1, seed=2), r(2, 2, seed=3)], attrs={"axis": 1}, opset=7),
    Case("Concat", [r(2, 3, seed=1), r(3, 3, seed=2)], attrs={"axis": 0}, opset=11, id="rows-v11"),
    Case("Concat", [r(2, 3, seed=1), r(3, 3, seed=2), r(1, 3, seed=3)], attrs={"axis": -2}, opset=13,
         id="rows-v13"),
    Case("Concat", [r(2, 3, seed=1)], attrs={"axis": 0}, opset=13, id="single"),
    Case("Split", [r(2, 3)], attrs={"axis": 1, "split": [1, 2]}, opset=7, n_outputs=2),
    Case("Split", [r(2, 4)], attrs={"axis": -1}, opset=11, n_outputs=2, ys=[1], id="one-used"),
    Case("Split", [r(2, 5), i64(2, 3)], attrs={"axis": 1}, opset=13, n_outputs=2, id="input"),
    Case("Split", [r(4, 7)], attrs={"axis": 1, "num_outputs": 3}, opset=18, n_outputs=3, ys=[0, 2],
         id="num-outputs"),
    # ------------------------------------------------------------------------------------ slice
    Case("Slice", [r(3, 4)], attrs={"starts": [1], "ends": [3], "axes": [1]}, opset=7),
    Case("Slice", [r(3, 4)], attrs={"starts": [-100, 1], "ends": [100, 1000]}, opset=9, id="clamped"),
    Case("Slice", [r(3, 5), i64(1), i64(5), i64(1), i64(2)], opset=10, id="step2"),
    Case("Slice", [r(3, 5), i64(0, 1), i64(2, 4)], opset=11, id="no-axes"),
    Case("Slice", [r(3, 5), i64(10), i64(-100), i64(1), i64(-2)], opset=13, id="neg-step2"),
    Case("Slice", [r(3, 5, 2), i64(-1, 3), i64(-1000, 0), i64(0, -2), i64(-1, -1)], opset=13,
         id="reverse"),
    Case("Slice", [r(3, 5), i64(1), i64(-1), i64(-1), i64(1)], opset=13, id="neg-end"),
    Case("Slice", [r(3, 5), np.array([1]), np.array([4]), np.array([1]), np.array([2])], opset=13,
         id="runtime"),
    # a center crop x[:, :, 1:-1, 2:-1]: before opset 9 the run-time form contracts with slices of an identity
    Case("Slice", [r(2, 2, 5, 6)], attrs={"starts": [1, 2], "ends": [-1, -1], "axes": [2, 3]}, opset=8, id="crop"),
    Case("Slice", [r(2, 2, 5, 6), i64(1, 2), i64(-1, -1), i64(2, 3)], opset=13, id="crop"),
    # bounds known only at run time (a center crop to another tensor's size), axes and steps constant: a zero Pad
    # of dY with pads from the clamped starts, Shape(x) and Shape(dY)
    Case("Slice", [r(2, 2, 5, 6), np.array([1, 2]), np.array([-1, 5]), i64(2, 3)], opset=11, id="runtime-bounds"),
    Case("Slice", [r(2, 2, 5, 6), np.array([1, 2], dtype=np.int32), np.array([4, -1], dtype=np.int32),
                   Const(np.array([2, 3], dtype=np.int32)), Const(np.array([1, 1], dtype=np.int32))], opset=13,
         id="runtime-bounds"),
    # negative and out-of-range starts, unsorted negative axes: starts + n, then clamped to [0, n]
    Case("Slice", [r(2, 2, 5, 6), np.array([-4, -100]), np.array([-1, 3]), i64(-1, 2), i64(1, 1)], opset=13,
         id="runtime-neg-start"),
    # step -1 (alone and beside +1): starts clamped to [0, n - 1]
    Case("Slice", [r(3, 5, 2), np.array([-1, 3]), np.array([-1000, 0]), i64(0, -2), i64(-1, -1)], opset=13,
         id="runtime-reverse"),
    Case("Slice", [r(3, 5, 2), np.array([100, 1]), np.array([0, 4]), i64(1, 0), i64(-1, 1)], opset=13,
         id="runtime-mixed"),
    Case("Compress", [r(3, 4), Const(np.array([True, False, True]))], attrs={"axis": 1}, opset=9),
    Case("Compress", [r(3, 4), Const(np.array([True, False, True, True]))], attrs={"axis": 1}, opset=11,
         id="v11"),
    Case("Compress", [r(3, 4), Const(np.array([False, True, True, False, True]))], opset=11, id="flat"),
    Case("Compress", [r(3, 4), Const(np.array([True, False, True, True]))], attrs={"axis": -1}, opset=11,
         id="neg-axis"),
    Case("CenterCropPad", [r(3, 5, 4), i64(3, 6)], attrs={"axes": [1, 2]}, opset=18),
    Case("CenterCropPad", [r(3, 5), i64(4, 2)], opset=18, id="all-axes"),
    # ---------------------------------------------------------------------------------- gather
    Case("Gather", [r(3, 4), Const(I_DUP)], attrs={"axis": 1}, opset=7),
    Case("Gather", [r(3, 4), Const(np.array([-1, 0, -1]))], attrs={"axis": 1}, opset=11, id="neg"),
    Case("Gather", [r(4, 3), Const(I_DUP)], opset=13, id="axis0"),
    Case("Gather", [r(4, 3), np.array([[3, -1], [0, 3]])], opset=13, id="runtime"),
    Case("Gather", [r(2, 4, 3), Const(I_DUP)], attrs={"axis": 1}, opset=16, id="scatternd"),
    Case("Gather", [r(2, 4, 3), Const(np.array(2))], attrs={"axis": 1}, opset=16, id="scalar"),
    Case("Gather", [r(4, 3), Const(np.array([0, 0, 3]))], opset=9, id="v9-axis0"),
    Case("GatherElements", [r(3, 3), Const(np.array([[0, 0, 2], [1, 2, 2], [0, 1, 0]]))],
         attrs={"axis": 1}, opset=11),
    Case("GatherElements", [r(3, 2), Const(np.array([[-1, 0], [2, 2]]))], opset=13, id="axis0-small"),
    Case("GatherElements", [r(3, 3), Const(np.array([[0, 0], [2, 2]]))], attrs={"axis": 1}, opset=13,
         id="small"),
    Case("GatherElements", [r(3, 3), Const(np.array([[0, 0, 2], [1, 2, 2], [0, 1, 0]]))],
         attrs={"axis": -1}, opset=16, id="add"),
    Case("GatherND", [r(3, 4, 2), Const(np.array([[0, 1], [2, 3], [0, 1]]))], opset=11),
    Case("GatherND", [r(2, 3, 4), Const(np.array([[[1], [1]], [[-1], [0]]]))], attrs={"batch_dims": 1},
         opset=12, id="batch"),
    Case("GatherND", [r(3, 4), Const(np.array([[-1], [0], [2]]))], opset=13, id="rows"),
    Case("GatherND", [r(2, 3, 4), Const(np.array([[1, 3], [1, 3]]))], attrs={"batch_dims": 1}, opset=16,
         id="batch-add"),
    Case("GatherND", [r(2, 3, 4), np.array([[0, 1, 2], [0, 1, 2]])], opset=18, id="runtime-elements"),
    Case("TopK", [distinct(3, 4)], attrs={"k": 2}, opset=7, n_outputs=2),
    Case("TopK", [distinct(3, 4), i64(2)], opset=10, n_outputs=2, id="v10"),
    Case("TopK", [distinct(4, 3), i64(3)], attrs={"axis": 0, "largest": 0}, opset=11, n_outputs=2,
         id="smallest"),
    Case("TopK", [distinct(3, 4), i64(2)], attrs={"sorted": 0}, opset=16, n_outputs=2, id="v16"),
    # -------------------------------------------------------------------------------- scatter
    Case("Scatter", [r(3, 4, seed=1), Const(np.array([[1, 3], [0, 2], [3, 0]])), r(3, 2, seed=2)],
         attrs={"axis": 1}, opset=9),
    Case("Scatter", [r(3, 4, seed=1), Const(np.array([[2, 0, 1, 2]])), r(1, 4, seed=2)], opset=10, id="v10"),
    Case("ScatterElements", [r(3, 4, seed=1), Const(np.array([[1, 3], [0, 2], [3, 0]])), r(3, 2, seed=2)],
         attrs={"axis": 1}, opset=11),
    Case("ScatterElements", [r(3, 4, seed=1), Const(np.array([[1, 1], [0, 2]])), r(2, 2, seed=2)],
         attrs={"axis": -1, "reduction": "add"}, opset=16, id="add"),
    Case("ScatterElements", [r(3, 4, seed=1), Const(np.array([[1, 1], [0, 2]])),
                             r(2, 2, seed=2, low=0.5, high=2.0)],
         attrs={"axis": 1, "reduction": "mul"}, opset=16, id="mul"),
    Case("ScatterElements", [distinct(3, 4, seed=1), Const(np.array([[1, 1], [0, 2]])),
                             distinct(2, 2, seed=2) + 0.05],
         attrs={"axis": 1, "reduction": "max"}, opset=18, id="max"),
    Case("ScatterElements", [distinct(3, 4, seed=1), Const(np.array([[1, 1], [0, 2]])),
                             distinct(2, 2, seed=2) + 0.05],
         attrs={"axis": 1, "reduction": "min"}, opset=18, id="min"),
    Case("ScatterND", [r(4, 3, seed=1), Const(np.array([[2], [0]])), r(2, 3, seed=2)], opset=11),
    Case("ScatterND", [r(4, 3, seed=1), Const(np.array([[2, 1], [0, 0], [2, 1]])), r(3, seed=2)],
         attrs={"reduction": "add"}, opset=16, id="add"),
    Case("ScatterND", [r(4, 3, seed=1), Const(np.array([[2, 1], [0, 0], [2, 1]])),
                       r(3, seed=2, low=0.5, high=2.0)],
         attrs={"reduction": "mul"}, opset=16, id="mul"),
    Case("ScatterND", [distinct(4, 3, seed=1), Const(np.array([[2, 1], [0, 0], [2, 1]])),
                       distinct(3, seed=2) + 0.05],
         attrs={"reduction": "max"}, opset=18, id="max"),
    Case("TensorScatter", [r(2, 5, 3, seed=1), r(2, 2, 3, seed=2), i64(1, 3)], attrs={"axis": 1}, opset=24),
    Case("TensorScatter", [r(2, 5, 3, seed=1), r(2, 3, 3, seed=2), i64(4, 1)],
         attrs={"axis": 1, "mode": "circular"}, opset=24, id="circular"),
    Case("TensorScatter", [r(2, 4, 3, seed=1), r(2, 2, 3, seed=2)], opset=24, id="no-indices"),
    # ---------------------------------------------------------------------- broadcast, tile
    Case("Expand", [r(3, 1), i64(2, 3, 4)], opset=8),
    Case("Expand", [r(2, 1, 4), i64(3, 1)], opset=13, id="bidirectional"),
    Case("Tile", [r(2, 3), i64(2, 3)], opset=7),
    Case("Tile", [r(2, 1, 3), np.array([1, 2, 2])], opset=13, id="runtime"),
    # ------------------------------------------------------------------------------------ pad
    Case("Pad", [r(2, 3)], attrs={"pads": [0, 2, 1, -1]}, opset=7),
    Case("Pad", [r(2, 4)], attrs={"pads": [0, 2, 0, 1], "mode": "reflect"}, opset=7, id="reflect"),
    Case("Pad", [r(2, 3)], attrs={"pads": [0, 2, 0, 3], "mode": "edge", "value": 2.0}, opset=10, id="edge"),
    Case("Pad", [r(2, 3), i64(1, 0, 0, 2), r(seed=5)], opset=11, id="value"),
    Case("Pad", [r(2, 3), np.array([0, -1, 2, 2]), r(seed=5)], opset=13, id="runtime"),
    Case("Pad", [r(2, 4, 3), i64(0, 2, 1, 0, 1, 2)], attrs={"mode": "reflect"}, opset=13, id="reflect3"),
    Case("Pad", [r(2, 3, 4), i64(0, -1, 1, 0, 1, 2), None], attrs={"mode": "edge"}, opset=13, id="edge-crop"),
    Case("Pad", [r(2, 3, 4), i64(1, 2, 1, 3), r(seed=5), i64(1, -1)], opset=18, id="axes"),
    Case("Pad", [r(2, 3, 4), i64(2, 3), None, i64(-1)], attrs={"mode": "reflect"}, opset=18, id="axes-reflect"),
    Case("Pad", [r(2, 3), i64(0, 4, 0, 5)], attrs={"mode": "wrap"}, opset=19, id="wrap"),
    # reflect/edge/wrap with pads known only at run time (PyTorch computes F.pad's pads with a Shape subgraph):
    # a scatter of dY by source position from opset 16, one 0/1 matrix per axis before
    Case("Pad", [r(2, 2, 4, 5), np.array([0, 0, 1, 2, 0, 0, 2, 1])], attrs={"mode": "reflect"}, opset=11,
         id="reflect-runtime"),
    Case("Pad", [r(2, 3, 4), np.array([0, 1, -1, 0, 2, 3])], attrs={"mode": "edge"}, opset=13, id="edge-runtime"),
    Case("Pad", [r(2, 2, 4, 5), np.array([0, 0, 3, 1, 0, 0, 1, 4])], attrs={"mode": "reflect"}, opset=17,
         id="reflect-runtime"),
    Case("Pad", [r(2, 3, 4), np.array([2, -1, 1, 3]), None, i64(1, 2)], attrs={"mode": "edge"}, opset=18,
         id="edge-runtime-axes"),
    Case("Pad", [r(2, 3), np.array([1, 4, 2, 5])], attrs={"mode": "wrap"}, opset=19, id="wrap-runtime"),
    # static pads on 4-D images, as a reflection-padded conv net has them
    Case("Pad", [r(2, 2, 4, 5), i64(0, 0, 1, 3, 0, 0, 3, 1)], attrs={"mode": "reflect"}, opset=11, id="reflect4d"),
    Case("Pad", [r(2, 2, 4, 5), i64(0, 0, 1, 3, 0, 0, 3, 1)], attrs={"mode": "edge"}, opset=17, id="edge4d"),
]
