"""Conv's weight gradient has two plans, chosen by shape; each rule case pins the plan it takes, so that the
central-difference checks in test_rules.py cover both (they check values, this checks which plan ran)."""

from __future__ import annotations

import pytest

import onnxgrad
from tests.cases.conv import CASES
from tests.gradcheck import build

# case id -> the op that marks its dW plan: a Gemm (im2col), or no Gemm (one interleaved Conv)
PLANS = {
    "bias": "conv", "1d-stride-leftover": "conv", "stride-gt-kernel": "conv", "same-upper": "conv",
    "same-lower": "conv", "3d-valid": "conv", "strided-opset9": "conv",
    "wide-weight-gemm": "gemm", "dilated-phases-gemm": "gemm", "1x1-gemm": "gemm",
}


@pytest.mark.parametrize(("case_id", "plan"), PLANS.items())
def test_weight_gradient_plan(case_id: str, plan: str) -> None:
    (case,) = [c for c in CASES if c.op == "Conv" and c.id == case_id]
    model, ys, xs, _ = build(case)
    aug = onnxgrad.add_gradients(model, ys, [xs[1]])
    ops = [n.op_type for n in aug.model.graph.node[len(model.graph.node):]]
    assert ("Gemm" in ops) == (plan == "gemm"), ops
