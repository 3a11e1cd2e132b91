"""The input graph survives: for every model of the rule table and the example models, the augmented model holds
the original nodes unchanged, and its original outputs are bit-identical to the original model's on random inputs.

Bit-identity is checked with onnxruntime's graph optimizations off (the graph's own arithmetic): with them on,
forward-only runs fuse Conv+BatchNormalization(+Relu), which a graph that also reads the conv output for its
gradient cannot, and the fused kernel rounds differently (about 1 ulp)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxgrad import add_gradients
from onnxgrad.runtime import ReferenceSession, random_feeds, run, session
from onnxgrad.shorthands import expand_xs
from tests.cases import ALL
from tests.gradcheck import Case, build, provider_for

MODELS = Path(__file__).resolve().parents[1] / "models"


def _plain(model: onnx.ModelProto, provider: str) -> ort.InferenceSession | ReferenceSession:
    if provider != "cpu":
        return session(model, provider)
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _node(n: onnx.NodeProto) -> tuple[object, ...]:
    """A node's meaning (an empty domain may be stored or left out)."""
    attrs = sorted(a.SerializeToString() for a in n.attribute)
    return n.op_type, n.domain or "", list(n.input), list(n.output), attrs


def _same(original: onnx.ModelProto, augmented: onnx.ModelProto, feeds: dict[str, np.ndarray], provider: str) -> None:
    kept = [_node(n) for n in augmented.graph.node[: len(original.graph.node)]]
    assert kept == [_node(n) for n in original.graph.node], "a forward node changed"
    names = [o.name for o in original.graph.output]
    before = run(_plain(original, provider), feeds, names)
    after = run(_plain(augmented, provider), feeds, names)
    for name in names:
        assert before[name].tobytes() == after[name].tobytes(), f"output {name!r} changed"


@pytest.mark.parametrize("case", ALL, ids=lambda c: c.name)
def test_rule_models_keep_their_outputs(case: Case) -> None:
    model, ys, xs, feeds = build(case)
    aug = add_gradients(model, ys, xs)
    assert [o.name for o in aug.model.graph.output][: len(model.graph.output)] == [o.name for o in model.graph.output]
    _same(model, aug.model, feeds, provider_for(case))


@pytest.mark.parametrize("path", sorted(MODELS.glob("*.onnx")), ids=lambda p: p.name)
def test_example_models_keep_their_outputs(path: Path) -> None:
    model = onnx.load(path)
    ys = [o.name for o in model.graph.output if o.type.tensor_type.elem_type == onnx.TensorProto.FLOAT]
    aug = add_gradients(model, ys[:1], expand_xs(model, ["@weights", "@inputs"]))
    feeds = random_feeds(model, np.random.default_rng(0), dims=3)
    _same(model, aug.model, feeds, "cpu")
