"""Every gradient rule against central differences (float64), static and dynamic shapes."""

from __future__ import annotations

import pytest

from onnxgrad import registry
from tests.cases import ALL
from tests.gradcheck import Case, assert_gradients_match


@pytest.mark.parametrize("case", ALL, ids=lambda c: c.name)
def test_rule_static(case: Case) -> None:
    assert_gradients_match(case)


@pytest.mark.parametrize("case", [c for c in ALL if c.dynamic], ids=lambda c: c.name)
def test_rule_dynamic_batch(case: Case) -> None:
    assert_gradients_match(case, dynamic=True)


def test_every_rule_has_a_case() -> None:
    covered = set()
    for c in ALL:
        rule = registry.lookup(c.domain, c.op, c.opset)
        assert rule is not None, f"{c.name}: no rule"
        covered.add((rule.domain, rule.op_type, rule.since))
    missing = [f"{r.domain or 'ai.onnx'}::{r.op_type} since {r.since}"
               for r in registry.all_rules() if r.differentiable and (r.domain, r.op_type, r.since) not in covered]
    assert not missing, "rules without a test case: " + ", ".join(missing)
