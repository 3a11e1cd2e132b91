"""Which form a windowed op's gradient takes. Conv's (and ConvTranspose's) weight gradient has two plans,
chosen by shape; each rule case pins the plan it takes, so that the central-difference checks in
test_rules.py cover both (they check values, this checks which plan ran). MaxPool's routing trusts each
runtime's Indices: two runtimes must agree."""

from __future__ import annotations

import numpy as np
import pytest

import onnxgrad
from onnxgrad import runtime
from tests.cases.conv import CASES
from tests.gradcheck import Case, build

# (op, case id) -> the op that marks its dW plan: a Gemm (im2col), or no Gemm (one interleaved Conv)
PLANS = {
    ("Conv", "bias"): "conv", ("Conv", "1d-stride-leftover"): "conv", ("Conv", "stride-gt-kernel"): "conv",
    ("Conv", "same-upper"): "conv", ("Conv", "same-lower"): "conv", ("Conv", "3d-valid"): "conv",
    ("Conv", "strided-opset9"): "conv",
    ("Conv", "wide-weight-gemm"): "gemm", ("Conv", "dilated-phases-gemm"): "gemm", ("Conv", "1x1-gemm"): "gemm",
    ("ConvTranspose", "output-padding"): "conv", ("ConvTranspose", "3d"): "conv",
    ("ConvTranspose", "dilated-output-padding"): "gemm",
}


@pytest.mark.parametrize(("key", "plan"), PLANS.items(), ids=lambda v: "-".join(v) if isinstance(v, tuple) else v)
def test_weight_gradient_plan(key: tuple[str, str], plan: str) -> None:
    (case,) = [c for c in CASES if (c.op, c.id) == key]
    model, ys, xs, _ = build(case)
    aug = onnxgrad.add_gradients(model, ys, [xs[1]])
    ops = [n.op_type for n in aug.model.graph.node[len(model.graph.node):]]
    assert ("Gemm" in ops) == (plan == "gemm"), ops


@pytest.mark.parametrize("case", [c for c in CASES if c.op == "MaxPool"], ids=lambda c: c.name)
def test_max_pool_routing_agrees_across_runtimes(case: Case) -> None:
    """The scatter form trusts each runtime's MaxPool Indices (flat, row-major, first maximum): onnxruntime and
    onnx's reference evaluator must route dY to the same elements."""
    model, ys, xs, feeds = build(case)
    aug = onnxgrad.add_gradients(model, ys, xs)
    names = [n for n in aug.gradients.values() if n is not None]
    got = {p: runtime.run(aug.model, feeds, names, provider=p) for p in ("cpu", "reference")}
    for name in names:
        np.testing.assert_allclose(got["reference"][name], got["cpu"][name], rtol=1e-6, atol=1e-6)
