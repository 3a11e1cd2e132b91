"""Every gradient rule against central differences (float64), static and dynamic shapes; training-mode
Dropout against its own run's mask."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper as oh

import onnxgrad
from onnxgrad import registry
from onnxgrad.runtime import run
from tests.cases import ALL
from tests.gradcheck import Case, assert_gradients_match


@pytest.mark.parametrize("case", ALL, ids=lambda c: c.name)
def test_rule_static(case: Case) -> None:
    assert_gradients_match(case)


@pytest.mark.parametrize("case", [c for c in ALL if c.dynamic], ids=lambda c: c.name)
def test_rule_dynamic_batch(case: Case) -> None:
    assert_gradients_match(case, dynamic=True)


# ops whose gradient depends on the spatial sizes: each case also runs with them known only at run time
SPATIAL_OPS = {
    "Conv", "ConvTranspose", "DeformConv", "Col2Im", "AveragePool", "MaxPool", "LpPool", "GlobalAveragePool",
    "GlobalMaxPool", "GlobalLpPool", "MaxUnpool", "MaxRoiPool", "RoiAlign", "Resize", "Upsample", "GridSample",
    "AffineGrid", "DepthToSpace", "SpaceToDepth", "Pad", "Slice",
}


@pytest.mark.parametrize("case", [c for c in ALL if c.op in SPATIAL_OPS], ids=lambda c: c.name)
def test_rule_dynamic_spatial(case: Case) -> None:
    assert_gradients_match(case, dynamic="spatial")


def test_every_rule_has_a_case() -> None:
    covered = set()
    for c in ALL:
        rule = registry.lookup(c.domain, c.op, c.opset)
        assert rule is not None, f"{c.name}: no rule"
        covered.add((rule.domain, rule.op_type, rule.since))
    missing = [f"{r.domain or 'ai.onnx'}::{r.op_type} since {r.since}"
               for r in registry.all_rules() if r.differentiable and (r.domain, r.op_type, r.since) not in covered]
    assert not missing, "rules without a test case: " + ", ".join(missing)


@pytest.mark.parametrize("mask_output", [True, False], ids=["mask-output", "no-mask-output"])
def test_dropout_training_routes_through_the_run_s_own_mask(mask_output: bool) -> None:
    """Training-mode Dropout draws a new mask per run, so central differences cannot see it: the gradient
    of one run must be seed * mask / (1 - ratio) with that run's mask (its Mask output, or y != 0)."""
    outs = ["y", "mask"] if mask_output else ["y"]
    node = oh.make_node("Dropout", ["x", "ratio", "training"], outs, seed=3)
    graph = oh.make_graph(
        [node], "dropout", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [40, 25])],
        [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [40, 25])],
        [onnx.numpy_helper.from_array(np.array(0.4, np.float32), "ratio"),
         onnx.numpy_helper.from_array(np.array(True), "training")],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=8)
    if mask_output:
        model.graph.output.append(oh.make_tensor_value_info("mask", onnx.TensorProto.BOOL, [40, 25]))
    rng = np.random.default_rng(0)
    x = rng.uniform(0.5, 1.5, (40, 25)).astype(np.float32)  # no zeros: y != 0 exactly where kept
    seed = rng.standard_normal((40, 25)).astype(np.float32)
    aug = onnxgrad.add_gradients(model, ["y"], ["x"], grad_ys=[seed])
    got = run(aug.model, {"x": x})
    keep = got["mask"] if mask_output else got["y"] != 0
    assert 0.5 < keep.mean() < 0.7  # ratio 0.4 applied, not a mask of ones
    np.testing.assert_allclose(got["y"], x * keep / 0.6, rtol=1e-6)
    np.testing.assert_allclose(got[aug.gradients["x"]], seed * keep / 0.6, rtol=1e-6)


@pytest.mark.parametrize("first", ["ImageScaler", "Crop"])
def test_shapes_flow_through_an_experimental_op_onnx_removed(first: str) -> None:
    """tiny-YOLOv2 (model zoo, opset 8) starts with an ImageScaler, for which onnx's inference has no schema: no
    value after it had a shape, and MaxPool's rule stopped ("needs the rank of its input"). Its outputs now take
    their shapes from the op's own semantics, and the whole model checks by central differences."""
    rng = np.random.default_rng(0)
    inits = [onnx.numpy_helper.from_array(rng.standard_normal((4, 3, 3, 3)).astype(np.float32) * 0.3, "w"),
             onnx.numpy_helper.from_array(np.full(4, 0.1, np.float32), "b")]
    head = {"ImageScaler": oh.make_node("ImageScaler", ["x"], ["s"], scale=1 / 255.0, bias=[0.1, 0.2, 0.3]),
            "Crop": oh.make_node("Crop", ["x"], ["s"], border=[1, 1, 1, 1])}[first]
    nodes = [head, oh.make_node("Conv", ["s", "w", "b"], ["c"], pads=[1, 1, 1, 1]),
             oh.make_node("LeakyRelu", ["c"], ["l"], alpha=0.1),
             oh.make_node("MaxPool", ["l"], ["y"], kernel_shape=[2, 2], strides=[2, 2])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 3, 10, 10])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 8)], ir_version=3)
    model.graph.input.extend(oh.make_tensor_value_info(t.name, onnx.TensorProto.FLOAT, list(t.dims)) for t in inits)
    from onnxgrad.check import check_model

    report = check_model(model, ["y"], ["x", "w", "b"], {"x": rng.uniform(0, 255, (1, 3, 10, 10)).astype(np.float32)})
    assert report.ok and all(r.status == "ok" for r in report.rows), [(r.x, r.status) for r in report.rows]


@pytest.mark.parametrize(("op", "opset"), [("Gather", 17), ("GatherND", 17)])
def test_repeated_rows_accumulate_at_every_thread_count(op: str, opset: int) -> None:
    """An embedding's gradient adds the rows of every repeated token: onnxruntime's ScatterND with reduction 'add'
    races on repeated indices at 2 threads (1,024 rows into row 0 of a (2, 256) table: 70% off, differently each
    run), so onnxgrad scatters run-time indices with ScatterElements (workarounds.py)."""
    import onnxruntime as ort

    rng = np.random.default_rng(3)
    table = rng.standard_normal((2, 256)).astype(np.float32)
    ids = np.zeros((8, 128) if op == "Gather" else (8, 128, 1), np.int64)
    ids[0, :3] = 1
    node = oh.make_node(op, ["table", "ids"], ["y"])
    graph = oh.make_graph([node], "g", [oh.make_tensor_value_info("ids", onnx.TensorProto.INT64, list(ids.shape))],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [8, 128, 256])],
                          initializer=[onnx.numpy_helper.from_array(table, "table")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=8)
    aug = onnxgrad.add_gradients(model, ["y"], ["table"], grad_ys=[onnxgrad.NEW_INPUT])
    seed = rng.standard_normal((8, 128, 256)).astype(np.float32)
    want = np.zeros((2, 256))
    np.add.at(want, ids.reshape(-1), seed.reshape(-1, 256).astype(np.float64))
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(aug.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    for _ in range(5):
        (got,) = sess.run([aug.gradients["table"]], {"ids": ids, aug.new_inputs[0]: seed})
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-3)
