"""Conv's (and ConvTranspose's) weight gradient has two plans, chosen by shape; each rule case pins the plan
it takes, so that the central-difference checks in test_rules.py cover both (they check values, this checks
which plan ran)."""

from __future__ import annotations

import pytest

import onnxgrad
from tests.cases.conv import CASES
from tests.gradcheck import build

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
