"""The one reverse walk: exact arity of rules, integer xs, undefined apart from unconnected, the registry's
function-body fallback, and the same walk over function bodies (aggregation honoured there too)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxgrad
from onnxgrad import registry
from onnxgrad.api import GradientNote
from onnxgrad.backprop import UndefinedGradient
from onnxgrad.rules.functions import function_body_gradient
from tests.cases import ALL
from tests.gradcheck import build as build_case
from tests.graphs import Graph, N, build, ir_model, run, with_outputs

X = np.random.default_rng(3).uniform(-1, 1, (2, 3))
W = np.random.default_rng(4).uniform(0.5, 1.5, (2, 3))

# y = x * w + cast(k) * x, where k = cast(x, int64): an integer value on the side
INT_SIDE = Graph([N("k", "Cast", "x", to=onnx.TensorProto.INT64), N("kf", "Cast", "k", to=onnx.TensorProto.DOUBLE),
                  N("xw", "Mul", "x", "w"), N("y", "Add", "xw", "kf")],
                 inputs={"x": X, "w": W}, outputs=["y"])

# y = x * w + sum(onehot(idx, 3, values = x[0, :2])): x also reaches y through OneHot's values (undefined)
ONE_HOT = Graph([N("v", "Slice", "x", "starts", "ends", "axes"), N("v1", "Reshape", "v", "flat"),
                 N("oh", "OneHot", "idx", "depth", "v1"), N("s", "ReduceSum", "oh", keepdims=0),
                 N("xw", "Mul", "x", "w"), N("y", "Add", "xw", "s")],
                inputs={"x": X.astype(np.float32), "w": W.astype(np.float32)},
                consts={"starts": np.array([0, 0]), "ends": np.array([1, 2]), "axes": np.array([0, 1]),
                        "flat": np.array([2]), "idx": np.array([0, 2, 1]), "depth": np.array(3)},
                outputs=["y"])


@pytest.fixture
def short_rule() -> Iterator[None]:
    """A user rule for Tanh that forgets to return anything."""
    saved = registry._RULES.pop(("", "Tanh"))
    registry.register("Tanh")(lambda em, node, dy: [])
    try:
        yield
    finally:
        registry._RULES[("", "Tanh")] = saved


def test_a_rule_returning_too_few_gradients_is_refused(short_rule: None) -> None:
    model = ir_model(Graph([N("y", "Tanh", "x")], inputs={"x": X}, outputs=["y"]))
    before = ir.serde.serialize_model(model).SerializeToString()
    with pytest.raises(RuntimeError, match=r"rule for Tanh .* returned 0 gradients, not 1"):
        onnxgrad.gradients(model, "y", "x")
    assert ir.serde.serialize_model(model).SerializeToString() == before  # nothing half-built


def test_a_rule_returning_too_many_gradients_is_refused() -> None:
    saved = registry._RULES.pop(("", "Tanh"))
    registry.register("Tanh")(lambda em, node, dy: [dy[0], dy[0]])
    try:
        with pytest.raises(RuntimeError, match="returned 2 gradients, not 1"):
            onnxgrad.gradients(ir_model(Graph([N("y", "Tanh", "x")], inputs={"x": X}, outputs=["y"])), "y", "x")
    finally:
        registry._RULES[("", "Tanh")] = saved


def _bare(g: Graph) -> ir.Model:
    """The model without value_info: the integer x has no dtype until gradients() infers it."""
    proto = build(g)
    del proto.graph.value_info[:]
    return ir.serde.deserialize_model(proto)


@pytest.mark.parametrize("policy", ["none", "zero"])
@pytest.mark.parametrize("bare", [False, True], ids=["typed", "bare"])
def test_an_integer_x_is_unconnected_with_a_note(policy: str, bare: bool) -> None:
    model = _bare(INT_SIDE) if bare else ir_model(INT_SIDE)
    with pytest.warns(GradientNote, match=r"'k' is INT64 .*unconnected"):
        names = onnxgrad.gradients(model, "y", ["k", "x"], unconnected_gradients=policy)
    got = run(with_outputs(model, names), INT_SIDE.feeds)
    np.testing.assert_allclose(got[names[1]], W)  # the float x is unaffected
    if policy == "none":
        assert names[0] is None
    else:
        assert got[names[0]].dtype == np.int64 and got[names[0]].shape == X.shape and not got[names[0]].any()


def test_add_gradients_gives_an_integer_x_none() -> None:
    with pytest.warns(GradientNote):
        aug = onnxgrad.add_gradients(build(INT_SIDE), "y", ["x", "k"])
    assert aug.gradients["k"] is None and aug.gradients["x"] is not None


def test_an_undefined_gradient_is_none_with_a_note() -> None:
    model = ir_model(ONE_HOT)
    with pytest.warns(GradientNote, match=r"undefined: it reaches the ys through input 2 \('v1'\) of OneHot"):
        names = onnxgrad.gradients(model, "y", ["x", "w"])
    assert names[0] is None  # never the partial sum w (the OneHot path has no gradient)
    got = run(with_outputs(model, names), ONE_HOT.feeds)
    np.testing.assert_allclose(got[names[1]], X, rtol=1e-6)  # w does not pass through the OneHot: defined


def test_an_undefined_gradient_is_never_silently_zero() -> None:
    model = ir_model(ONE_HOT)
    before = ir.serde.serialize_model(model).SerializeToString()
    with pytest.raises(UndefinedGradient, match="never given as zeros"):
        onnxgrad.gradients(model, "y", ["x", "w"], unconnected_gradients="zero")
    assert ir.serde.serialize_model(model).SerializeToString() == before


def test_stopping_the_undefined_input_gives_the_rest() -> None:
    model = ir_model(ONE_HOT)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no note: nothing undefined is left on the path
        names = onnxgrad.gradients(model, "y", "x", stop_gradients=["v1"], unconnected_gradients="zero")
    np.testing.assert_allclose(run(with_outputs(model, names), ONE_HOT.feeds)[names[0]], W, rtol=1e-6)


def test_the_registry_decides_the_function_body_fallback() -> None:
    """Without its registration, LinearAttention still gets the function-body rule, from the registry."""
    saved = registry._RULES.pop(("", "LinearAttention"))
    try:
        assert registry.lookup("", "LinearAttention", 27) is None
        rule = registry.rule_for("", "LinearAttention", 27)
        assert rule is not None and rule.fn is function_body_gradient
        fallbacks = registry._FALLBACKS[:]
        registry._FALLBACKS.clear()
        try:
            assert registry.rule_for("", "LinearAttention", 27) is None
        finally:
            registry._FALLBACKS[:] = fallbacks
    finally:
        registry._RULES[("", "LinearAttention")] = saved


@pytest.mark.parametrize("method, op", [("add_n", "Sum"), ("experimental_tree", "Add")])
def test_a_function_body_is_walked_with_the_callers_aggregation(method: str, op: str) -> None:
    """CausalConvWithState is differentiated through its schema's body by the same walk, which adds the
    contributions of a value read twice as the caller asked (the old body walk always used one Sum)."""
    case = next(c for c in ALL if c.name == "CausalConvWithState-v27-past-silu")
    model, ys, xs, _ = build_case(case)
    aug = onnxgrad.add_gradients(model, ys, xs, aggregation_method=method)
    added = [n.op_type for n in aug.model.graph.node if n.name.startswith("gradients/")]
    assert added.count(op) >= 2 and added.count("Sum" if op == "Add" else "Add") == 0


def test_info_asks_the_registry_as_the_walk_does() -> None:
    """An op whose only rule is the function-body fallback is not reported as blocking by ``info``."""
    from onnxgrad.info import describe

    case = next(c for c in ALL if c.name == "CausalConvWithState-v27-plain")
    model, _, _, _ = build_case(case)
    saved = registry._RULES.pop(("", "CausalConvWithState"))
    try:
        assert not describe(model)["differentiable"]["missing_rules"]
        fallbacks = registry._FALLBACKS[:]
        registry._FALLBACKS.clear()
        try:  # with neither a rule nor the fallback, info names the op
            assert "CausalConvWithState" in str(describe(model)["differentiable"]["missing_rules"])
        finally:
            registry._FALLBACKS[:] = fallbacks
    finally:
        registry._RULES[("", "CausalConvWithState")] = saved
