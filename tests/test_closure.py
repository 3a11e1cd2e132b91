"""Closure: every op that a rule emits has a rule itself, so gradient graphs differentiate again,
to any order. Each rule case's first-order gradient graph is differentiated and checked numerically."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxgrad import NEW_INPUT, add_gradients, registry
from onnxgrad.check import check_gradients
from tests.cases import ALL
from tests.gradcheck import Case, build, provider_for


def _first_order(case: Case) -> tuple[onnx.ModelProto, list[str], list[str], dict[str, np.ndarray]]:
    model, ys, xs, feeds = build(case)
    aug = add_gradients(model, ys, xs, [NEW_INPUT] * len(ys))
    rng = np.random.default_rng(case.seed + 1)
    shapes = {o.name: o for o in onnx.shape_inference.infer_shapes(model).graph.output}
    for seed, y in zip(aug.new_inputs, ys, strict=True):
        t = shapes[y].type.tensor_type
        dims = [d.dim_value for d in t.shape.dim]
        feeds[seed] = np.asarray(rng.standard_normal(dims), dtype=onnx.helper.tensor_dtype_to_np_dtype(t.elem_type))
    grads = [g for g in aug.gradients.values() if g is not None]
    return aug.model, grads, xs, feeds


@pytest.mark.parametrize("case", ALL, ids=lambda c: c.name)
def test_emitted_ops_have_rules(case: Case) -> None:
    model, _, _, _ = build(case)
    before = {n.name for n in model.graph.node}
    aug = add_gradients(model, [o.name for o in model.graph.output], [i.name for i in model.graph.input
                        if i.type.tensor_type.elem_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)])
    orphans = {(n.domain, n.op_type) for n in aug.model.graph.node
               if n.name not in before and registry.lookup(n.domain, n.op_type, case.opset) is None}
    assert not orphans, f"{case.name}: emitted ops without a rule: {sorted(orphans)}"


@pytest.mark.parametrize("case", [c for c in ALL if c.rtol is None and c.second_order], ids=lambda c: c.name)
def test_second_order_by_central_differences(case: Case) -> None:
    model, ys, xs, feeds = _first_order(case)
    rows = check_gradients(model, ys, xs, feeds, seed=case.seed + 2, provider=provider_for(case))
    bad = [r for r in rows if not r.ok]
    assert not bad, "; ".join(f"{r.x}: {r.analytic:.8g} vs {r.numeric:.8g}" for r in bad)
