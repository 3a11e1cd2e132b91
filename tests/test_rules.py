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
