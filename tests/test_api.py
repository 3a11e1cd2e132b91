"""The Python API's contract: SEMANTICS.md's error table (and that nothing is half-built), the
stop_gradient marker, the enums, gate_gradients, the untouched forward part, grad_ys as a new input,
and 'zero' at run-time shapes."""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import helper as oh

import onnxgrad
from onnxgrad import AggregationMethod, GradInput, UnconnectedGradients
from onnxgrad import registry as registry_module
from tests.graphs import Graph, N, build, run, with_outputs

X, W = np.random.default_rng(1).uniform(-1, 1, (2, 3)), np.random.default_rng(2).uniform(-1, 1, 3)
X32 = X.astype(np.float32)

# y = tanh(x * w) + x ; z = exp(y) ; k = cast(x, int64) (an integer side branch)
TANH = Graph([N("h", "Mul", "x", "w"), N("t", "Tanh", "h"), N("y", "Add", "t", "x"), N("z", "Exp", "y"),
              N("k", "Cast", "x", to=onnx.TensorProto.INT64)],
             inputs={"x": X, "w": W}, outputs=["y", "z", "k"])
DYN = Graph(TANH.nodes, TANH.inputs, outputs=["y", "z"], dynamic=True)
F32 = Graph([N("y", "Mul", "x", "x")], inputs={"x": X32, "g32": X32})


def bare(g: Graph) -> onnx.ModelProto:
    """The model without value_info: intermediate values have no dtype until gradients() infers them."""
    proto = build(g)
    del proto.graph.value_info[:]
    return proto


def as_bytes(model: ir.Model) -> bytes:
    return ir.serde.serialize_model(model).SerializeToString(deterministic=True)


# ---------------------------------------------------------------------------- errors
@dataclass
class Err:
    """One row of the error table: gradients(model, **kwargs) raises ``error`` matching ``match``."""

    id: str
    kwargs: dict[str, Any]
    error: type[BaseException]
    match: str
    graph: Graph = TANH
    hide: str = ""  # an op whose rule is hidden for this row (an op without a rule on the path)
    bare: bool = False  # start from a model without value_info
    extra: list[str] = field(default_factory=list)  # more substrings the message must contain


ERRORS = [
    Err("no-rule-on-path", {"ys": "z", "xs": "x"}, LookupError, r"no gradient rule for node 'Tanh_1'",
        hide="Tanh", extra=["'Tanh'", "'ai.onnx'", "opset 17", "register_gradient", "stop_gradients"]),
    Err("no-rule-on-path-bare-model", {"ys": "z", "xs": "x"}, LookupError, "Tanh_1", hide="Tanh", bare=True),
    Err("grad-ys-length", {"ys": "y", "xs": "x", "grad_ys": [None, None]}, ValueError,
        re.escape("Length mismatch. Passed 2 grad_ys for 1 ys")),
    Err("grad-ys-length-two-ys", {"ys": ["y", "z"], "xs": "x", "grad_ys": [X]}, ValueError,
        re.escape("Length mismatch. Passed 1 grad_ys for 2 ys")),
    Err("grad-ys-dict", {"ys": "y", "xs": "x", "grad_ys": {"y": X}}, TypeError, "not a dict",
        extra=["[grad_ys[y] for y in ys]"]),
    Err("unconnected-unknown", {"ys": "y", "xs": "x", "unconnected_gradients": "zeros"}, ValueError,
        "unconnected_gradients", extra=["'zeros'", "'none'", "'zero'"]),
    Err("aggregation-unknown-name", {"ys": "y", "xs": "x", "aggregation_method": "tree"}, ValueError,
        "aggregation_method", extra=["'tree'", "'add_n'", "'default'", "'experimental_tree'",
                                     "'experimental_accumulate_n'", "0, 1, 2"]),
    Err("aggregation-unknown-int", {"ys": "y", "xs": "x", "aggregation_method": 3}, ValueError,
        "aggregation_method", extra=["3", "'add_n'"]),
    Err("aggregation-bool", {"ys": "y", "xs": "x", "aggregation_method": True}, ValueError, "aggregation_method"),
    Err("unknown-ys", {"ys": "yy", "xs": "x"}, ValueError, r"ys: no value named 'yy'", extra=["did you mean", "'y'"]),
    Err("unknown-xs", {"ys": "y", "xs": ["x", "ww"]}, ValueError, r"xs: no value named 'ww'", extra=["'w'"]),
    Err("unknown-stop", {"ys": "y", "xs": "x", "stop_gradients": ["hh"]}, ValueError,
        r"stop_gradients: no value named 'hh'", extra=["'h'"]),
    Err("unknown-grad-ys-name", {"ys": "y", "xs": "x", "grad_ys": ["gg"]}, ValueError, r"no value named 'gg'"),
    Err("unknown-far-from-everything", {"ys": "y", "xs": "qqqqqqqq"}, ValueError, r"no value named 'qqqqqqqq'"),
    Err("grad-ys-int-array", {"ys": "y", "xs": "x", "grad_ys": [np.ones((2, 3), np.int64)]}, TypeError,
        "float", extra=["int64", "'y'"]),
    Err("grad-ys-bool-array", {"ys": "y", "xs": "x", "grad_ys": [np.ones((2, 3), bool)]}, TypeError, "float"),
    Err("grad-ys-string-array", {"ys": "y", "xs": "x", "grad_ys": [np.array(["a"])]}, TypeError, "float"),
    Err("grad-ys-wrong-shape-array", {"ys": "y", "xs": "x", "grad_ys": [np.ones((2, 4))]}, ValueError,
        r"shape \(2, 4\)", extra=["(2, 3)"]),
    Err("grad-ys-wrong-rank-array", {"ys": "y", "xs": "x", "grad_ys": [np.ones(3)]}, ValueError, "shape"),
    Err("grad-ys-value-other-dtype", {"ys": "y", "xs": "x", "grad_ys": ["g32"]}, TypeError, "FLOAT",
        graph=Graph(F32.nodes, {"x": X, "g32": X32}), extra=["'g32'", "DOUBLE"]),
    Err("grad-ys-value-int", {"ys": "y", "xs": "x", "grad_ys": ["k"]}, TypeError, "INT64", extra=["'k'"]),
    Err("grad-ys-value-wrong-shape", {"ys": "y", "xs": "x", "grad_ys": ["w"]}, ValueError, "shape"),
    Err("grad-ys-new-input-name-taken", {"ys": "y", "xs": "x", "grad_ys": [GradInput("w")]}, ValueError, "'w'"),
    Err("grad-ys-two-new-inputs-same-name", {"ys": ["y", "y"], "xs": "x", "grad_ys": [GradInput("s"), GradInput("s")]},
        ValueError, "'s'"),
    Err("grad-ys-value-int-bare-model", {"ys": "y", "xs": "x", "grad_ys": ["k"]}, TypeError, "INT64", bare=True),
    Err("grad-ys-wrong-shape-bare-model", {"ys": "y", "xs": "x", "grad_ys": [np.ones((2, 4))]}, ValueError,
        r"shape \(2, 4\)", bare=True),
    Err("empty-xs", {"ys": "y", "xs": []}, ValueError, "xs"),
]


@pytest.mark.parametrize("row", ERRORS, ids=lambda r: r.id)
def test_error_and_model_unchanged(row: Err, monkeypatch: pytest.MonkeyPatch) -> None:
    if row.hide:
        real = registry_module.lookup
        monkeypatch.setattr(registry_module, "lookup",
                            lambda d, op, opset: None if op == row.hide else real(d, op, opset))
    model = ir.serde.deserialize_model(bare(row.graph) if row.bare else build(row.graph))
    before = as_bytes(model)
    names_before = [n.name for n in model.graph]
    with pytest.raises(row.error, match=row.match) as info:
        onnxgrad.gradients(model, **row.kwargs)
    for piece in row.extra:
        assert piece in str(info.value), f"{piece!r} not in {info.value}"
    assert as_bytes(model) == before, "the model changed although gradients() failed"
    assert [n.name for n in model.graph] == names_before
    # the same call on a ModelProto through add_gradients: same error, proto untouched
    proto = bare(row.graph) if row.bare else build(row.graph)
    proto_bytes = proto.SerializeToString(deterministic=True)
    with pytest.raises(row.error, match=row.match):
        onnxgrad.add_gradients(proto, **row.kwargs)
    assert proto.SerializeToString(deterministic=True) == proto_bytes


def test_no_rule_off_the_path_is_fine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Tanh without a rule: y = tanh(x*w) + x differentiated w.r.t. x with h stopped never needs it,
    nor does a y that does not depend on the Tanh."""
    real = registry_module.lookup
    monkeypatch.setattr(registry_module, "lookup", lambda d, op, opset: None if op == "Tanh" else real(d, op, opset))
    for kwargs in ({"ys": "y", "xs": "x", "stop_gradients": ["h"]}, {"ys": "h", "xs": ["x", "w"]},
                   {"ys": "y", "xs": "x", "stop_gradients": ["t"]}):
        aug = onnxgrad.add_gradients(build(TANH), **kwargs)
        onnx.checker.check_model(aug.model, full_check=True)


def test_custom_op_without_rule_names_its_domain() -> None:
    """A node of a user's domain (a model-local function, so onnxruntime runs it) with no rule."""
    proto = build(Graph([N("h", "Mul", "x", "w"), N("y", "Exp", "h")], inputs={"x": X, "w": W}))
    node = proto.graph.node[0]
    node.op_type, node.domain, node.name = "Twice", "my.ops", "twice_0"
    del node.input[1]
    body = [onnx.helper.make_node("Add", ["a", "a"], ["b"])]
    proto.functions.append(onnx.helper.make_function("my.ops", "Twice", ["a"], ["b"], body,
                                                     [onnx.helper.make_opsetid("", 17)]))
    proto.opset_import.append(onnx.helper.make_opsetid("my.ops", 3))
    del proto.graph.value_info[:]
    run(proto, {"x": X, "w": W})  # it runs
    before = proto.SerializeToString(deterministic=True)
    with pytest.raises(LookupError) as info:
        onnxgrad.add_gradients(proto, "y", "x")
    for piece in ("'twice_0'", "'Twice'", "'my.ops'", "opset 3", "register_gradient"):
        assert piece in str(info.value)
    assert proto.SerializeToString(deterministic=True) == before
    # off the path: differentiating w.r.t. h's consumers only never meets Twice
    assert onnxgrad.add_gradients(proto, "y", "h").gradients == {"h": "gradients/h_grad"}


def test_an_op_without_rule_is_named_when_a_rule_downstream_fails_for_want_of_shapes() -> None:
    """An op no schema or function describes (tf2onnx leaves e.g. Erfc so), feeding a MatMul: shape inference
    stops there, so the MatMul's rule, reached first, fails for want of ranks; the walk names the op without a rule
    instead (as tf.gradients, it still needs a rule only where a gradient reaches it)."""
    proto = build(Graph([N("h", "Mul", "x", "w"), N("m", "MatMul", "h", "v"), N("y", "Exp", "m")],
                        inputs={"x": X, "w": W}, inits={"v": np.ones((3, 2))}))
    node = proto.graph.node[0]
    node.op_type, node.domain, node.name = "Unknown", "my.ops", "unknown_0"
    proto.opset_import.append(onnx.helper.make_opsetid("my.ops", 1))
    del proto.graph.value_info[:]
    with pytest.raises(LookupError, match=re.escape("no gradient rule for node 'unknown_0' (op_type 'Unknown', "
                                                    "domain 'my.ops', opset 1)")):
        onnxgrad.add_gradients(proto, "y", "x")


@pytest.mark.parametrize("not_a_model", [np.zeros(3), "y", onnx.TensorProto(), None], ids=lambda v: type(v).__name__)
def test_not_a_graph_is_a_clear_error(not_a_model: Any) -> None:
    with pytest.raises(TypeError, match=r"onnx_ir\.Model"):
        onnxgrad.gradients(not_a_model, "y", "x")


def test_model_proto_to_gradients_points_to_add_gradients() -> None:
    with pytest.raises(TypeError, match="add_gradients"):
        onnxgrad.gradients(build(TANH), "y", "x")  # type: ignore[arg-type]


@pytest.mark.parametrize("not_a_model", [np.zeros(3), 3.0, None], ids=lambda v: type(v).__name__)
def test_add_gradients_rejects_non_models(not_a_model: Any) -> None:
    with pytest.raises(TypeError, match=f"ModelProto.*got {type(not_a_model).__module__}"):
        onnxgrad.add_gradients(not_a_model, "y", "x")


# ---------------------------------------------------------------------------- stop_gradient marker
def test_stop_gradient_marker_runs_and_stops_the_walk() -> None:
    model = ir.serde.deserialize_model(build(TANH))
    out = onnxgrad.stop_gradient(model, "h")
    assert out == "h/stop_gradient"
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    plain, marked = run(build(TANH), TANH.feeds), run(proto, TANH.feeds)
    for k in plain:
        assert plain[k].tobytes() == marked[k].tobytes(), f"{k} changed by the marker"
    names = onnxgrad.gradients(model, "y", ["x", "w", "h", "h/stop_gradient"])
    assert names[1] is None, "w reaches y only through the marker"
    results = run(with_outputs(model, names), TANH.feeds)
    np.testing.assert_array_equal(results[names[0]], np.ones_like(X))  # dy/dx only through the "+ x"
    assert names[2] is None, "h's only consumer is the marker"
    np.testing.assert_allclose(results[names[3]], 1 - np.tanh(X * W) ** 2, rtol=1e-12)


def test_stop_gradient_marker_on_graph_input_and_twice() -> None:
    model = ir.serde.deserialize_model(build(TANH))
    first = onnxgrad.stop_gradient(model, "x")
    second = onnxgrad.stop_gradient(model, "x")
    assert first != second
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    np.testing.assert_array_equal(run(proto, TANH.feeds)["y"], run(build(TANH), TANH.feeds)["y"])
    assert onnxgrad.gradients(model, "y", ["x", "w"]) == [None, "gradients/w_grad"]


# ---------------------------------------------------------------------------- enums and options
def test_enums_have_tensorflow_values() -> None:
    assert AggregationMethod.ADD_N == 0 and AggregationMethod.DEFAULT == 0
    assert AggregationMethod.EXPERIMENTAL_TREE == 1
    assert AggregationMethod.EXPERIMENTAL_ACCUMULATE_N == 2
    assert UnconnectedGradients.NONE.value == "none" and UnconnectedGradients.ZERO.value == "zero"
    assert UnconnectedGradients("zero") is UnconnectedGradients.ZERO


def _graph_ops(model: onnx.ModelProto, scope: str = "gradients") -> list[str]:
    return [n.op_type for n in model.graph.node if n.name.startswith(scope + "/")]


FANOUT = Graph(
    [N("h", "Mul", "x", "w"), N("a", "Exp", "h"), N("b", "Tanh", "h"), N("c", "Neg", "h"), N("d", "Mul", "h", "h"),
     N("y", "Sum", "a", "b", "c", "d")],
    inputs={"x": X, "w": W},
)
AGGREGATIONS: list[tuple[Any, str]] = [
    (None, "add_n"), ("add_n", "add_n"), ("default", "add_n"), ("ADD_N", "add_n"), (0, "add_n"),
    (AggregationMethod.ADD_N, "add_n"), (AggregationMethod.DEFAULT, "add_n"),
    ("experimental_tree", "tree"), (1, "tree"), (AggregationMethod.EXPERIMENTAL_TREE, "tree"),
    ("experimental_accumulate_n", "accumulate"), (2, "accumulate"),
    (AggregationMethod.EXPERIMENTAL_ACCUMULATE_N, "accumulate"),
]


@pytest.mark.parametrize(("method", "form"), AGGREGATIONS, ids=lambda v: repr(v))
def test_aggregation_method_accepts_tensorflow_spellings(method: Any, form: str) -> None:
    aug = onnxgrad.add_gradients(build(FANOUT), "y", ["x", "w"], aggregation_method=method)
    ops = _graph_ops(aug.model)
    # h has five terms (d = h*h counts twice): one Sum of 5, or four 2-input Adds
    sums = [n for n in aug.model.graph.node if n.op_type == "Sum" and n.name.startswith("gradients/")]
    if form == "add_n":
        assert len(sums) == 1 and len(sums[0].input) == 5 and "Add" not in ops
    else:
        assert not sums and ops.count("Add") == 4
    reference = onnxgrad.add_gradients(build(FANOUT), "y", ["x", "w"])
    want, got = run(reference.model, FANOUT.feeds), run(aug.model, FANOUT.feeds)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-12)


def test_tree_is_balanced_and_accumulate_is_a_chain() -> None:
    depth = {}
    for method in ("experimental_tree", "experimental_accumulate_n"):
        m = onnxgrad.add_gradients(build(FANOUT), "y", ["x"], aggregation_method=method).model
        adds = {n.output[0]: n for n in m.graph.node if n.op_type == "Add" and n.name.startswith("gradients/")}

        def level(v: str, adds: dict[str, onnx.NodeProto] = adds) -> int:
            return 1 + max(level(i) for i in adds[v].input) if v in adds else 0

        depth[method] = max(level(v) for v in adds)
    assert depth == {"experimental_tree": 3, "experimental_accumulate_n": 4}


@pytest.mark.parametrize("value", ["none", UnconnectedGradients.NONE, "zero", UnconnectedGradients.ZERO])
def test_unconnected_gradients_accepts_strings_and_enum(value: Any) -> None:
    aug = onnxgrad.add_gradients(build(TANH), "h", ["x", "t"], unconnected_gradients=value)
    zero = value in ("zero", UnconnectedGradients.ZERO)
    assert (aug.gradients["t"] is not None) == zero
    if zero:
        np.testing.assert_array_equal(run(aug.model, TANH.feeds)[aug.gradients["t"]], np.zeros((2, 3)))


def test_gate_gradients_changes_nothing() -> None:
    a = onnxgrad.add_gradients(build(TANH), ["y", "z"], ["x", "w"], gate_gradients=False).model
    b = onnxgrad.add_gradients(build(TANH), ["y", "z"], ["x", "w"], gate_gradients=True).model
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


def test_output_is_deterministic() -> None:
    kwargs: dict[str, Any] = {"grad_ys": [onnxgrad.NEW_INPUT, None], "aggregation_method": "experimental_tree"}
    a = onnxgrad.add_gradients(build(DYN), ["y", "z"], ["x", "w", "h"], **kwargs).model
    b = onnxgrad.add_gradients(build(DYN), ["y", "z"], ["x", "w", "h"], **kwargs).model
    assert a.SerializeToString(deterministic=True) == b.SerializeToString(deterministic=True)


# ---------------------------------------------------------------------------- the forward part
@pytest.mark.parametrize("graph", [TANH, DYN], ids=["static", "dynamic"])
def test_original_outputs_are_bitwise_identical(graph: Graph) -> None:
    original = build(graph)
    aug = onnxgrad.add_gradients(original, ["y", "z"], ["x", "w", "h"], grad_ys=[onnxgrad.NEW_INPUT, None])
    onnx.checker.check_model(aug.model, full_check=True)
    n = len(original.graph.output)
    assert [o.SerializeToString() for o in aug.model.graph.output[:n]] == [
        o.SerializeToString() for o in original.graph.output]
    assert [o.name for o in aug.model.graph.output[n:]] == ["gradients/x_grad", "gradients/w_grad", "gradients/h_grad"]
    rng = np.random.default_rng(0)
    for batch in (2, 5):
        feeds = {"x": rng.standard_normal((batch, 3)) if graph.dynamic else X, "w": rng.standard_normal(3)}
        want = run(original, feeds)
        got = run(aug.model, {**feeds, aug.new_inputs[0]: rng.standard_normal(want["y"].shape)})
        for k, v in want.items():
            assert got[k].dtype == v.dtype and got[k].tobytes() == v.tobytes(), f"output {k} changed"
        if not graph.dynamic:
            break


# ---------------------------------------------------------------------------- grad_ys as a new input
@pytest.mark.parametrize("spec", [onnxgrad.NEW_INPUT, GradInput(), GradInput("dy")],
                         ids=["NEW_INPUT", "default", "named"])
def test_grad_ys_new_input(spec: GradInput) -> None:
    aug = onnxgrad.add_gradients(build(DYN), "y", ["x", "w"], grad_ys=[spec])
    name = spec.name or "gradients/y_seed"
    assert aug.new_inputs == [name]
    seed = next(i for i in aug.model.graph.input if i.name == name)
    y = next(o for o in aug.model.graph.output if o.name == "y")
    assert seed.type == y.type, "the seed input has y's dtype and (symbolic) shape"
    rng = np.random.default_rng(3)
    for batch in (1, 4):
        x = rng.standard_normal((batch, 3))
        g = rng.standard_normal((batch, 3))
        out = run(aug.model, {"x": x, "w": W, name: g})
        dt = 1 - np.tanh(x * W) ** 2
        np.testing.assert_allclose(out["gradients/x_grad"], g * (dt * W + 1), rtol=1e-12)
        np.testing.assert_allclose(out["gradients/w_grad"], (g * dt * x).sum(0), rtol=1e-12)


def test_grad_ys_new_inputs_for_duplicate_ys_get_distinct_names() -> None:
    aug = onnxgrad.add_gradients(build(TANH), ["y", "y"], "x", grad_ys=[onnxgrad.NEW_INPUT, onnxgrad.NEW_INPUT])
    assert len(set(aug.new_inputs)) == 2 and all(n.startswith("gradients/") for n in aug.new_inputs)
    onnx.checker.check_model(aug.model, full_check=True)
    g1, g2 = np.full((2, 3), 2.0), np.full((2, 3), 3.0)
    once = onnxgrad.add_gradients(build(TANH), "y", "x", grad_ys=[g1 + g2])
    want = run(once.model, TANH.feeds)["gradients/x_grad"]
    got = run(aug.model, {**TANH.feeds, **dict(zip(aug.new_inputs, (g1, g2), strict=True))})["gradients/x_grad"]
    np.testing.assert_allclose(got, want, rtol=1e-12)


# ---------------------------------------------------------------------------- 'zero' at run time
def test_zero_takes_the_run_time_shape() -> None:
    aug = onnxgrad.add_gradients(build(DYN), "h", ["x", "y", "z"], unconnected_gradients="zero")
    onnx.checker.check_model(aug.model, full_check=True)
    for batch in (1, 2, 7):
        feeds = {"x": np.ones((batch, 3)), "w": W}
        out = run(aug.model, feeds)
        for x in ("y", "z"):
            got = out[aug.gradients[x]]
            assert got.shape == (batch, 3) and got.dtype == np.float64
            assert not got.any()


def test_zero_for_float32_matches_dtype() -> None:
    g = Graph([N("y", "Mul", "x", "x"), N("u", "Neg", "v")], inputs={"x": X32, "v": X32}, dynamic=True,
              outputs=["y", "u"])
    aug = onnxgrad.add_gradients(build(g), "y", ["v", "x"], unconnected_gradients=UnconnectedGradients.ZERO)
    out = run(aug.model, {"x": np.ones((4, 3), np.float32), "v": np.ones((4, 3), np.float32)})
    assert out[aug.gradients["v"]].dtype == np.float32 and out[aug.gradients["v"]].shape == (4, 3)


# ---------------------------------------------------------------------------- returns and names
def test_returns_one_entry_per_x() -> None:
    model = ir.serde.deserialize_model(build(TANH))
    got = onnxgrad.gradients(model, "y", ["x", "w", "x", "z"])
    assert got == ["gradients/x_grad", "gradients/w_grad", "gradients/x_grad", None]


def test_scopes_are_uniquified_and_everything_lies_under_them() -> None:
    model = ir.serde.deserialize_model(build(TANH))
    old_nodes = {n.name for n in model.graph}
    old_values = {v.name for n in model.graph for v in n.outputs} | {v.name for v in model.graph.inputs}
    scopes = []
    for _ in range(3):
        names = onnxgrad.gradients(model, ["y", "z"], ["x", "w"], grad_ys=[np.ones((2, 3)), onnxgrad.NEW_INPUT])
        scopes.append(names[0].split("/")[0])
    assert scopes == ["gradients", "gradients_1", "gradients_2"]
    proto = with_outputs(model, [])
    onnx.checker.check_model(proto, full_check=True)
    new_nodes = [n.name for n in proto.graph.node if n.name not in old_nodes]
    new_values = [v for n in proto.graph.node for v in n.output if v not in old_values]
    new_values += [i.name for i in proto.graph.input if i.name not in old_values]
    new_values += [t.name for t in proto.graph.initializer]
    assert len(set(new_nodes)) == len(new_nodes)
    for name in new_nodes + new_values:
        assert re.match(r"gradients(_[12])?/", name), f"{name!r} is outside the scopes"



# ---------------------------------------------------------------------------- expose
@pytest.mark.parametrize(
    ("names", "returned"),
    [
        (["G"], ["G"]),
        ("G", ["G"]),  # one name
        ([None, "G", None], ["G"]),  # unconnected gradients skipped
        (["G", "G"], ["G", "G"]),  # twice: one output
        (["z", "G"], ["z", "G"]),  # z is an output already: not added again
        (["t", "G"], ["t", "G"]),  # an intermediate forward value too
        ([], []),
        (None, []),
    ],
    ids=["list", "one-name", "nones", "twice", "output-already", "intermediate", "empty", "none"],
)
def test_expose_appends_outputs_once(names: Any, returned: list[str]) -> None:
    """``G`` stands for the name gradients() returns."""
    m = ir.serde.deserialize_model(build(TANH))
    (g,) = onnxgrad.gradients(m, "y", "x")

    def real(n: Any) -> Any:
        return g if n == "G" else n

    arg = real(names) if isinstance(names, str) else None if names is None else [real(n) for n in names]
    before = [v.name for v in m.graph.outputs]
    want = [real(n) for n in returned]
    assert onnxgrad.expose(m, arg) == want
    outputs = [v.name for v in m.graph.outputs]
    assert outputs == before + [n for n in dict.fromkeys(want) if n not in before]
    assert onnxgrad.expose(m, arg) == want  # idempotent
    assert [v.name for v in m.graph.outputs] == outputs
    results = run(ir.serde.serialize_model(m), TANH.feeds)
    assert list(results) == outputs
    if g in outputs:  # y = tanh(x w) + x
        np.testing.assert_allclose(results[g], (1 - np.tanh(X * W) ** 2) * W + 1, rtol=1e-12)


def test_expose_unknown_name_adds_nothing() -> None:
    m = ir.serde.deserialize_model(build(TANH))
    (g,) = onnxgrad.gradients(m, "y", "x")
    before = [v.name for v in m.graph.outputs]
    with pytest.raises(ValueError, match=r"expose: no value named 'gradients/x_gard' in the graph; did you mean"):
        onnxgrad.expose(m, [g, "gradients/x_gard"])
    assert [v.name for v in m.graph.outputs] == before
    with pytest.raises(TypeError, match=r"onnx_ir\.Model"):
        onnxgrad.expose(build(TANH), ["y"])  # type: ignore[arg-type]


def test_note_for_batchnorm_statistics_tied_to_an_x() -> None:
    """A fresh PyTorch model exported with TrainingMode.PRESERVE reads its BatchNorm's running mean and variance
    as Identities of the bias and scale (equal values merged): the gradient of the bias then includes the running
    mean's path, and a note says so (one per statistic); an x that no statistic reads gets none."""
    import warnings

    from onnx import TensorProto
    from onnx import helper as oh

    c = 3
    inits = [onnx.numpy_helper.from_array(np.ones(c, np.float32), "bn.weight"),
             onnx.numpy_helper.from_array(np.zeros(c, np.float32), "bn.bias"),
             onnx.numpy_helper.from_array(np.ones((c, c, 1, 1), np.float32), "conv.weight")]
    nodes = [oh.make_node("Identity", ["bn.bias"], ["bn.running_mean"]),
             oh.make_node("Identity", ["bn.weight"], ["bn.running_var"]),
             oh.make_node("Conv", ["x", "conv.weight"], ["h"]),
             oh.make_node("BatchNormalization", ["h", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"],
                          ["y"], name="bn")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, c, 4, 4])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, c, 4, 4])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        onnxgrad.add_gradients(model, ["y"], ["bn.bias", "bn.weight", "conv.weight"])
    notes = [str(w.message) for w in caught if issubclass(w.category, onnxgrad.GradientNote)]
    assert sum("'bn.bias' is also BatchNormalization node 'bn''s running mean" in n for n in notes) == 1, notes
    assert sum("'bn.weight' is also BatchNormalization node 'bn''s running variance" in n for n in notes) == 1, notes
    assert not any("conv.weight" in n for n in notes), notes


def _crossing_model(middle: list[onnx.NodeProto]) -> onnx.ModelProto:
    """x -> ``middle`` (ending in 'h') -> h + b -> y, with b a float initializer."""
    inits = [onnx.numpy_helper.from_array(np.array(0.05, np.float32), "s"),
             onnx.numpy_helper.from_array(np.array(0, np.int8), "zp"),
             onnx.numpy_helper.from_array(np.ones((2, 4), np.float32), "b")]
    graph = oh.make_graph([*middle, oh.make_node("Add", ["h", "b"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 4])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 4])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


CROSSINGS = {
    # a quantized model (QDQ): x is fake-quantized before use
    "qdq": ([oh.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"], "quant"),
             oh.make_node("DequantizeLinear", ["q", "s", "zp"], ["h"])],
            "only through values that are not float (from QuantizeLinear 'quant'), which carry no gradient: "
            "unconnected, so None; straight_through=True (grad --straight-through) passes it through"),
    "argmax": ([oh.make_node("ArgMax", ["x"], ["i"], "pick", keepdims=1), oh.make_node("Cast", ["i"], ["h"], to=1)],
               "only through values that are not float (from ArgMax 'pick'), which carry no gradient: unconnected, "
               "so None"),
    "shape-only": ([oh.make_node("Shape", ["x"], ["n"]), oh.make_node("ConstantOfShape", ["n"], ["h"])], None),
}


@pytest.mark.parametrize("case", list(CROSSINGS))
def test_an_x_the_ys_reach_only_through_integers_gets_a_note(case: str) -> None:
    """x's paths to y leave the floats (float -> int -> float contributes nothing, as in tf.gradients): its gradient
    is None, and a note now says why (``grad`` said "no y depends on it"), with the straight-through estimator for
    a quantized model. A value read for its shape alone is no dependence: no note."""
    middle, note = CROSSINGS[case]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        aug = onnxgrad.add_gradients(_crossing_model(middle), ["y"], ["x", "b"])
    notes = [str(w.message) for w in caught if issubclass(w.category, onnxgrad.GradientNote)]
    assert aug.gradients["x"] is None and aug.gradients["b"] is not None
    if note is None:
        assert not notes, notes
    else:
        assert len(notes) == 1 and f"xs: the ys depend on 'x' {note}" in notes[0], notes
        assert ("straight-through" in notes[0]) == (case == "qdq")
