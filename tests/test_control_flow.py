"""Gradients through If, Loop and Scan: hand-built graphs (zero trips, early exit, a while loop, nesting, captured
weights, a sequence and an optional read twice) by central differences in float64; torch.cond and a scripted loop
against PyTorch autograd; tf.cond, tf.while_loop and tf.scan through tf2onnx against TensorFlow; second order and an
HVP through a Loop. The one-node rule cases (tests/cases/control_flow.py) run in test_rules and test_closure."""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh

from onnxgrad import NEW_INPUT, add_gradients, gradients, hessian_vector_product, registry
from onnxgrad.check import check_gradients, check_model
from onnxgrad.emitter import implicit_inputs
from onnxgrad.runtime import run
from tests.cases.control_flow import ELSE, LOOP_BODY, SCAN_BODY, THEN, body, vi

D = TP.DOUBLE


@dataclass
class Model:
    """A hand-built model: top-level nodes, float64 inputs (differentiated) and other feeds."""

    id: str
    nodes: list[onnx.NodeProto]
    inputs: dict[str, np.ndarray]
    outputs: list[str]
    opset: int = 17
    xs: list[str] | None = None  # default: every float input
    data: dict[str, np.ndarray] = field(default_factory=dict)  # fed, not differentiated

    def proto(self) -> onnx.ModelProto:
        feeds = {**self.inputs, **self.data}
        ins = [oh.make_tensor_value_info(k, oh.np_dtype_to_tensor_dtype(v.dtype), list(v.shape))
               for k, v in feeds.items()]
        graph = oh.make_graph(self.nodes, self.id, ins, [oh.make_value_info(o, onnx.TypeProto()) for o in self.outputs])
        model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", self.opset)], ir_version=8)
        found = run(model, feeds, self.outputs)  # the outputs' types, from a run (inference skips Loop outputs)
        del model.graph.output[:]
        model.graph.output.extend(oh.make_tensor_value_info(o, oh.np_dtype_to_tensor_dtype(found[o].dtype),
                                                            list(found[o].shape)) for o in self.outputs)
        return onnx.shape_inference.infer_shapes(model)

    @property
    def feeds(self) -> dict[str, np.ndarray]:
        return {**self.inputs, **self.data}

    @property
    def x_names(self) -> list[str]:
        return self.xs if self.xs is not None else list(self.inputs)


def rnd(*shape: int, seed: int = 0, scale: float = 1.0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape) * scale


def loop(m: str, cond: str, v0: str, outs: list[str], g: onnx.GraphProto = LOOP_BODY) -> onnx.NodeProto:
    return oh.make_node("Loop", [m, cond, v0], outs, body=g)


def const(name: str, value: Any) -> onnx.NodeProto:
    return oh.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(np.asarray(value), name))


W3, X3 = rnd(3, seed=2), np.abs(rnd(3, seed=3)) * 0.3 + 0.2

# while loop (no trip count): h' = 0.9 h + 0.2 until sum(h) >= 3; the count depends on the data
WHILE_BODY = body([("h2", "Mul", ["h", "w"], {}), ("h3", "Add", ["h2", "x"], {}), ("s", "ReduceSum", ["h3"],
                   {"keepdims": 0}), ("go", "Less", ["s", "limit"], {})],
                  [vi("i", [], TP.INT64), vi("c", [], TP.BOOL), vi("h", [3])], [vi("go", [], TP.BOOL), vi("h3", [3])])

# If inside a Loop body: h' = if sum(h) > 0 then sin(h * w) else tanh(h) + x
IF_IN_LOOP = body([("s", "ReduceSum", ["h"], {"keepdims": 0}), ("pos", "Greater", ["s", "zero"], {}),
                   ("c2", "Identity", ["c"], {})], [vi("i", [], TP.INT64), vi("c", [], TP.BOOL), vi("h", [3])],
                  [vi("c2", [], TP.BOOL), vi("hn", [3])])
IF_IN_LOOP.node.append(oh.make_node("If", ["pos"], ["hn"], then_branch=body(
    [("a", "Mul", ["h", "w"], {}), ("b", "Sin", ["a"], {})], [], [vi("b", [3])], "t"), else_branch=body(
    [("a2", "Tanh", ["h"], {}), ("b2", "Add", ["a2", "x"], {})], [], [vi("b2", [3])], "e")))
IF_IN_LOOP.node.insert(0, const("zero", 0.0))

# a Loop inside a Loop body: the inner loop runs i + 1 times h' = tanh(h * w + x), outer adds x each time
INNER = body([("a", "Mul", ["g", "w"], {}), ("b", "Add", ["a", "x"], {}), ("gn", "Tanh", ["b"], {}),
              ("k2", "Identity", ["k"], {})], [vi("j", [], TP.INT64), vi("k", [], TP.BOOL), vi("g", [3])],
             [vi("k2", [], TP.BOOL), vi("gn", [3])])
LOOP_IN_LOOP = body([("one", "Constant", [], {"value": onnx.numpy_helper.from_array(np.array(1, np.int64))}),
                     ("n", "Add", ["i", "one"], {})], [vi("i", [], TP.INT64), vi("c", [], TP.BOOL), vi("h", [3])],
                    [vi("c", [], TP.BOOL), vi("hn", [3])])
LOOP_IN_LOOP.node.append(oh.make_node("Loop", ["n", "", "h"], ["hi"], body=INNER))
LOOP_IN_LOOP.node.append(oh.make_node("Add", ["hi", "x"], ["hn"]))
LOOP_IN_LOOP.output[0].name = "c"

# a Scan inside an If branch
SCAN_IN_IF = body([], [], [vi("hT", [2, 3])], "then")
SCAN_IN_IF.node.append(oh.make_node("Scan", ["h0", "xs", "zs"], ["hT", "ys"], body=SCAN_BODY, num_scan_inputs=2))

# a loop that walks through xs (x_t = xs[i]): the slice gradients come out per iteration, padded past the last trip
STEP_BODY = body([("xt", "Gather", ["xs", "i"], {"axis": 0}), ("hw", "Mul", ["h", "w"], {}),
                  ("pre", "Add", ["hw", "xt"], {}), ("h2", "Tanh", ["pre"], {}), ("c2", "Identity", ["c"], {})],
                 [vi("i", [], TP.INT64), vi("c", [], TP.BOOL), vi("h", [3])], [vi("c2", [], TP.BOOL), vi("h2", [3])])

MODELS = [
    Model("loop-walks-a-sequence", [loop("M", "", "h0", ["hT"], STEP_BODY)],
          {"h0": rnd(3, seed=4), "w": W3, "xs": rnd(5, 3, seed=7)}, ["hT"], data={"M": np.array(3)}, opset=11),
    Model("loop-runtime-trips", [loop("M", "", "h0", ["hT", "ys"])], {"h0": rnd(3, seed=4), "w": W3, "x": X3},
          ["hT", "ys"], data={"M": np.array(4), "limit": np.array(100.0)}),
    Model("loop-zero-trips-scan-output", [loop("M", "", "h0", ["hT", "ys"])],
          {"h0": rnd(3, seed=4), "w": W3, "x": X3}, ["hT", "ys"], data={"M": np.array(0), "limit": np.array(100.0)},
          opset=11),
    Model("loop-early-exit", [loop("M", "go0", "h0", ["hT", "ys"])], {"h0": rnd(3, seed=4), "w": W3, "x": X3},
          ["hT", "ys"], data={"M": np.array(50), "go0": np.array(True), "limit": np.array(1.2)}, opset=13),
    Model("loop-cond-false-at-start", [loop("M", "go0", "h0", ["hT", "ys"])], {"h0": rnd(3, seed=4), "w": W3,
          "x": X3}, ["hT"], data={"M": np.array(5), "go0": np.array(False), "limit": np.array(1.2)}, opset=16),
    Model("while-loop", [oh.make_node("Loop", ["", "go0", "h0"], ["hT"], body=WHILE_BODY)],
          {"h0": np.full(3, 0.1), "w": np.full(3, 0.9), "x": np.full(3, 0.2)}, ["hT"],
          data={"go0": np.array(True), "limit": np.array(3.0)}, opset=14),
    Model("if-in-loop", [loop("M", "", "h0", ["hT"], IF_IN_LOOP)], {"h0": rnd(3, seed=6), "w": W3, "x": X3 - 0.4},
          ["hT"], data={"M": np.array(5)}),
    Model("loop-in-loop", [loop("M", "", "h0", ["hT"], LOOP_IN_LOOP)], {"h0": rnd(3, seed=6), "w": W3 * 0.5,
          "x": X3}, ["hT"], data={"M": np.array(3)}, opset=13),
    Model("scan-in-if", [oh.make_node("If", ["c"], ["out"], then_branch=SCAN_IN_IF, else_branch=body(
          [("o", "Tanh", ["h0"], {})], [], [vi("o", [2, 3])], "else"))],
          {"h0": rnd(2, 3, seed=1), "xs": rnd(4, 2, 3, seed=2), "zs": rnd(4, 2, 3, seed=3), "w": rnd(3, 3, seed=5)},
          ["out"], data={"c": np.array(True)}),
    Model("sequence-read-twice", [oh.make_node("SplitToSequence", ["x"], ["s"], axis=0, keepdims=0), const("p0", 0),
                                  const("p1", -1), oh.make_node("SequenceAt", ["s", "p0"], ["a"]),
                                  oh.make_node("SequenceAt", ["s", "p1"], ["b"]),
                                  oh.make_node("Mul", ["a", "b"], ["c"]), oh.make_node("Tanh", ["c"], ["y"])],
          {"x": rnd(3, 4, seed=1)}, ["y"], opset=13),
    Model("optional-read-twice", [oh.make_node("Optional", ["x"], ["o"]),
                                  oh.make_node("OptionalGetElement", ["o"], ["a"]),
                                  oh.make_node("OptionalGetElement", ["o"], ["b"]), oh.make_node("Sin", ["a"], ["c"]),
                                  oh.make_node("Mul", ["b", "c"], ["y"])], {"x": rnd(2, 3, seed=1)}, ["y"], opset=15),
    Model("if-shared-value", [oh.make_node("If", ["c"], ["y"], then_branch=THEN, else_branch=ELSE),
                              oh.make_node("Mul", ["y", "x"], ["z"])],
          {"x": rnd(2, 3, seed=1), "w": rnd(2, 3, seed=2), "b": rnd(3, seed=3)}, ["z"], data={"c": np.array(False)}),
]


@pytest.mark.parametrize("model", MODELS, ids=lambda m: m.id)
def test_hand_built_graphs_by_central_differences(model: Model) -> None:
    proto = model.proto()
    onnx.checker.check_model(add_gradients(proto, model.outputs, model.x_names).model, full_check=True)
    rows = check_gradients(proto, model.outputs, model.x_names, model.feeds)
    bad = [r for r in rows if not r.ok]
    assert not bad, "; ".join(f"{r.x}: {r.analytic:.8g} vs {r.numeric:.8g}" for r in bad)


SECOND_ORDER = ("loop-runtime-trips", "loop-early-exit", "loop-walks-a-sequence", "if-in-loop", "scan-in-if",
                "sequence-read-twice")


@pytest.mark.parametrize("model", [m for m in MODELS if m.id in SECOND_ORDER], ids=lambda m: m.id)
def test_second_order_by_central_differences(model: Model) -> None:
    """The gradient graph is differentiable again: its gradients (seeded by a fed vector) checked numerically."""
    proto = model.proto()
    aug = add_gradients(proto, model.outputs, model.x_names, [NEW_INPUT] * len(model.outputs))
    first = run(proto, model.feeds, model.outputs)
    rng = np.random.default_rng(1)
    seeds = {s: rng.standard_normal(np.shape(first[y])) for s, y in zip(aug.new_inputs, model.outputs, strict=True)}
    grads = [g for g in aug.gradients.values() if g is not None]
    rows = check_gradients(aug.model, grads, model.x_names, {**model.feeds, **seeds})
    bad = [r for r in rows if not r.ok]
    assert not bad, "; ".join(f"{r.x}: {r.analytic:.8g} vs {r.numeric:.8g}" for r in bad)


def test_hessian_vector_product_through_a_loop() -> None:
    """H v through a Loop (onnxgrad.hessian_vector_product) against central differences of the gradient along v."""
    model = next(m for m in MODELS if m.id == "loop-runtime-trips")
    proto = model.proto()
    xs = ["h0", "w"]
    rng = np.random.default_rng(2)
    v = {x: rng.standard_normal(3) for x in xs}
    m = ir.serde.deserialize_model(proto)
    hvp = hessian_vector_product(m, "hT", xs, [v[x] for x in xs])
    grads = gradients(m, "hT", xs, name="plain")
    m.graph.outputs.extend(_value(m, n) for n in [*hvp, *grads])
    both = ir.serde.serialize_model(m)
    got = run(both, model.feeds)
    h = 1e-5
    plus = run(both, {**model.feeds, **{x: model.feeds[x] + h * v[x] for x in xs}})
    minus = run(both, {**model.feeds, **{x: model.feeds[x] - h * v[x] for x in xs}})
    for out, g in zip(hvp, grads, strict=True):
        assert out is not None and g is not None
        np.testing.assert_allclose(got[out], (plus[g] - minus[g]) / (2 * h), rtol=1e-6, atol=1e-9)


def _value(model: ir.Model, name: str) -> ir.Value:
    return next(v for n in model.graph for v in n.outputs if v.name == name)


def test_a_constant_condition_is_inlined() -> None:
    model = Model("const-if", [const("c", True), oh.make_node("If", ["c"], ["y"], then_branch=THEN, else_branch=ELSE)],
                  {"x": rnd(2, 3, seed=1), "w": rnd(2, 3, seed=2), "b": rnd(3, seed=3)}, ["y"])
    proto = model.proto()
    aug = add_gradients(proto, ["y"], ["x", "w", "b"])
    assert [n.op_type for n in aug.model.graph.node].count("If") == 1  # the forward one only
    assert aug.gradients["b"] is None  # the else branch never runs
    rows = check_gradients(proto, ["y"], ["x", "w"], model.feeds)
    assert all(r.ok for r in rows), rows


def _list_loop(insert_at: int | None) -> Model:
    """h -> Loop(M) { h = tanh(h); s = SequenceInsert(s, h[, insert_at]) } -> stack(s): a scripted list append."""
    at = [] if insert_at is None else [("p", "Constant", [], {"value": oh.make_tensor("p", TP.INT64, [], [insert_at])})]
    seq_body = body([("h2", "Tanh", ["h"], {}), *at, ("s2", "SequenceInsert", ["s", "h2", *(["p"] if at else [])], {}),
                     ("c2", "Identity", ["c"], {})],
                    [vi("i", [], TP.INT64), vi("c", [], TP.BOOL), vi("h", [3])], [vi("c2", [], TP.BOOL), vi("h2", [3])])
    seq_body.input.append(oh.make_tensor_sequence_value_info("s", D, [3]))
    seq_body.output.append(oh.make_tensor_sequence_value_info("s2", D, [3]))
    return Model("loop-with-list", [oh.make_node("SequenceEmpty", [], ["s0"], dtype=D),
                                    oh.make_node("Loop", ["M", "", "h0", "s0"], ["hT", "sT"], body=seq_body),
                                    oh.make_node("ConcatFromSequence", ["sT"], ["y"], axis=0, new_axis=1)],
                 {"h0": rnd(3, seed=1)}, ["y"], data={"M": np.array(2)})


def test_a_loop_appending_to_a_sequence_by_central_differences() -> None:
    """A carried sequence that starts empty and grows at its end: not saved, its gradient read element by element."""
    model = _list_loop(None)
    rows = check_gradients(model.proto(), ["y"], ["h0"], model.feeds)
    assert all(r.ok for r in rows), [(r.x, r.analytic, r.numeric) for r in rows]


def test_a_loop_carrying_a_sequence_otherwise_says_why_it_stops() -> None:
    """The saving Loop stacks loop-carried tensors; a carried sequence that grows elsewhere than at its end (or
    starts full) cannot be stacked."""
    with pytest.raises(ValueError, match=r"sequences or optionals, .* only grows by one SequenceInsert at its end"):
        add_gradients(_list_loop(0).proto(), ["y"], ["h0"])


def test_implicit_inputs_are_the_outer_values_in_first_use_order() -> None:
    m = ir.serde.deserialize_model(next(x for x in MODELS if x.id == "scan-in-if").proto())
    node = next(n for n in m.graph if n.op_type == "If")
    assert [v.name for v in implicit_inputs(node)] == ["h0", "xs", "zs", "w"]
    assert registry.lookup("", "If", 17).captures  # type: ignore[union-attr]


# ------------------------------------------------------------------------------------------ PyTorch
torch = pytest.importorskip("torch")


def _torch_grads(module: Any, args: tuple[Any, ...], u: np.ndarray) -> dict[str, np.ndarray]:
    x = args[0].clone().requires_grad_(True)
    out = module(x, *args[1:])
    (out * torch.from_numpy(u)).sum().backward()
    grads = {"x": x.grad.numpy()}
    grads.update({k: np.zeros(p.shape) if p.grad is None else p.grad.numpy() for k, p in module.named_parameters()})
    return grads


def _compare(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], expect: dict[str, np.ndarray],
             u: np.ndarray, names: dict[str, str]) -> None:
    """onnxgrad's gradients of sum(u * output) against ``expect`` (torch names mapped to graph names)."""
    y = proto.graph.output[0].name
    aug = add_gradients(proto, [y], list(names.values()), grad_ys=[u])
    got = run(aug.model, feeds)
    for torch_name, graph_name in names.items():
        np.testing.assert_allclose(got[aug.gradients[graph_name]], expect[torch_name], rtol=1e-9, atol=1e-11,
                                   err_msg=torch_name)


def _param_names(proto: onnx.ModelProto, module: Any) -> dict[str, str]:
    """torch parameter name -> the initializer holding it (matched by value)."""
    found: dict[str, str] = {}
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    for k, p in module.named_parameters():
        value = p.detach().numpy()
        match = [n for n, a in inits.items() if a.shape == value.shape and np.array_equal(a, value)]
        assert len(match) == 1, f"{k}: {match}"
        found[k] = match[0]
    return found


class _Cond(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()
        self.scale = torch.nn.Parameter(torch.tensor([0.5, -1.0, 2.0], dtype=torch.float64))

    def forward(self, x: Any) -> Any:
        return torch.cond(x.sum() > 0, lambda x: torch.sin(self.lin(x)), lambda x: torch.tanh(x) * self.scale, (x,))


class _Loop(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        h = x
        for _ in range(n):
            h = torch.tanh(self.lin(h)) + x
        return h


@pytest.mark.parametrize("opset", [11, 14, 17])
def test_torch_cond_against_autograd(opset: int) -> None:
    """The default (dynamo) exporter: it turns torch.cond into an If (at opset 18 when 11 or 14 is asked: onnx's
    version converter has no If adapter below 16); both branches taken."""
    pytest.importorskip("onnxscript")
    torch.manual_seed(0)
    module = _Cond()
    x = torch.randn(2, 3, dtype=torch.float64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(module, (x,), dynamo=True, opset_version=opset, verbose=False).model_proto
    assert "If" in [n.op_type for n in proto.graph.node]
    names = {"x": proto.graph.input[0].name, **_param_names(proto, module)}
    u = np.random.default_rng(0).standard_normal((2, 3))
    for sign in (1.0, -1.0):
        xv = np.abs(x.numpy()) * sign
        module.zero_grad()
        expect = _torch_grads(module, (torch.from_numpy(xv),), u)
        _compare(proto, {names["x"]: xv}, expect, u, names)


def _export_scripted(module: Any, x: Any, opset: int) -> onnx.ModelProto:
    """The TorchScript export of ``torch.jit.script(module)`` called as module(x, n): its loop count a graph input."""
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(torch.jit.script(module), (x, 3), f, dynamo=False, opset_version=opset,
                          input_names=["x", "n"], output_names=["y"])
    return onnx.load_from_string(f.getvalue())


@pytest.mark.parametrize("opset", [11, 14, 17])
@pytest.mark.parametrize("trips", [0, 1, 4])
def test_scripted_loop_against_autograd(opset: int, trips: int) -> None:
    """A TorchScript-scripted loop (exported as a Loop whose trip count is a graph input), fed several counts."""
    torch.manual_seed(1)
    module = _Loop()
    x = torch.randn(2, 3, dtype=torch.float64)
    proto = _export_scripted(module, x, opset)
    assert "Loop" in [n.op_type for n in proto.graph.node]
    names = {"x": "x", **_param_names(proto, module)}
    u = np.random.default_rng(0).standard_normal((2, 3))
    expect = _torch_grads(module, (x, trips), u)
    _compare(proto, {"x": x.numpy(), "n": np.array(trips)}, expect, u, names)


class _ListLoop(torch.nn.Module):
    """A scripted loop that appends to a list and stacks it: a sequence carried by the Loop, SequenceInsert at its
    end each iteration, ConcatFromSequence after."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        outs: list[torch.Tensor] = []
        h = x
        for _ in range(n):
            h = torch.tanh(self.lin(h))
            outs.append(h * x)
        return torch.stack(outs, 0)


@pytest.mark.parametrize("opset", [13, 17])  # at 11 the exporter writes the list as a scan output
@pytest.mark.parametrize("trips", [1, 4])
def test_scripted_loop_appending_to_a_list_against_autograd(opset: int, trips: int) -> None:
    """A loop-carried sequence that starts empty and only grows at its end: its element t is the gradient's element t
    in the reverse Loop ("the saving Loop cannot stack" sequences before)."""
    torch.manual_seed(2)
    module = _ListLoop()
    x = torch.randn(2, 3, dtype=torch.float64)
    proto = _export_scripted(module, x, opset)
    ops = {n.op_type for n in proto.graph.node} | {b.op_type for n in proto.graph.node for a in n.attribute
                                                   if a.type == onnx.AttributeProto.GRAPH for b in a.g.node}
    assert {"Loop", "SequenceInsert", "ConcatFromSequence"} <= ops
    names = {"x": "x", **_param_names(proto, module)}
    u = np.random.default_rng(0).standard_normal((trips, 2, 3))
    _compare(proto, {"x": x.numpy(), "n": np.array(trips)}, _torch_grads(module, (x, trips), u), u, names)


class _CatLoop(torch.nn.Module):
    """A scripted loop that grows a tensor by concatenation (torchvision's pasted masks from an empty start; here
    also from x): a carried tensor whose size changes each iteration, which the saving Loop cannot stack."""

    def __init__(self, empty: bool) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(3, 3).double()
        self.empty = empty

    def forward(self, x: torch.Tensor, n: int) -> torch.Tensor:
        res = torch.zeros(0, 3, dtype=x.dtype) if self.empty else torch.sin(x)
        h = x
        for _ in range(n):
            h = torch.tanh(self.lin(h))
            res = torch.cat((res, h * x), 0)
        return res


@pytest.mark.parametrize("opset", [11, 17])
@pytest.mark.parametrize("trips", [1, 4])
@pytest.mark.parametrize("start", ["empty", "sin(x)"])
def test_scripted_loop_concatenating_onto_a_tensor_against_autograd(opset: int, trips: int, start: str) -> None:
    """A loop-carried tensor that only grows by a Concat at its end: its piece t gets the slice of the gradient before
    the later pieces', its start what is left (onnxruntime refused the saving Loop before: its scan output changed
    shape from one iteration to the next)."""
    torch.manual_seed(3)
    module = _CatLoop(start == "empty")
    x = torch.randn(2, 3, dtype=torch.float64)
    proto = _export_scripted(module, x, opset)
    body = next(a.g for n in proto.graph.node if n.op_type == "Loop" for a in n.attribute if a.name == "body")
    assert "Concat" in {n.op_type for n in body.node}
    names = {"x": "x", **_param_names(proto, module)}
    u = np.random.default_rng(0).standard_normal((2 * trips + 2 * (start != "empty"), 3))
    _compare(proto, {"x": x.numpy(), "n": np.array(trips)}, _torch_grads(module, (x, trips), u), u, names)
    aug = add_gradients(proto, ["y"], ["x"])  # no trip: the start alone reaches x
    want = np.zeros((2, 3)) if start == "empty" else np.cos(x.numpy())
    np.testing.assert_allclose(run(aug.model, {"x": x.numpy(), "n": np.array(0)})[aug.gradients["x"]], want)


def test_second_derivative_through_a_loop_appending_to_a_list() -> None:
    """The gradient graph of the list-appending loop reads its gradient sequence inside the reverse Loop; its own
    gradient (order 2, by central differences) treats that sequence as the constant it is (an invalid model
    before: Shape of a sequence)."""
    torch.manual_seed(2)
    proto = _export_scripted(_ListLoop().float(), torch.randn(2, 3), 17)
    weights = [t.name for t in proto.graph.initializer if t.data_type == TP.FLOAT]
    aug = add_gradients(proto, ["y"], ["x"])
    x = np.random.default_rng(1).standard_normal((2, 3)).astype(np.float32)
    report = check_model(aug.model, [aug.gradients["x"]], ["x", *weights], {"x": x, "n": np.array(3)})
    assert report.ok and all(r.status == "ok" for r in report.rows), [(r.x, r.status) for r in report.rows]


@pytest.mark.parametrize("mode", ["sum", "mean", "max"])
def test_embedding_bag_from_the_default_exporter_against_autograd(mode: str) -> None:
    """torch.onnx.export's default (dynamo) writes EmbeddingBag as a Loop appending each bag's row to a sequence
    (an empty bag too); the table's gradient against autograd."""
    pytest.importorskip("onnxscript")

    class Bag(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.bag, self.lin = torch.nn.EmbeddingBag(10, 5, mode=mode), torch.nn.Linear(5, 5)

        def forward(self, x: Any, ids: Any, offsets: Any) -> Any:
            return self.bag(ids, offsets) * self.lin(x)

    torch.manual_seed(0)
    module = Bag().eval()
    x, ids, offsets = torch.randn(3, 5), torch.tensor([1, 2, 3, 4, 4, 9, 0]), torch.tensor([0, 3, 3])
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        proto = torch.onnx.export(module, (x, ids, offsets), dynamo=True, opset_version=18, verbose=False,
                                  input_names=["x", "ids", "offsets"], output_names=["y"]).model_proto
    assert "Loop" in {n.op_type for n in proto.graph.node}
    names = {"x": "x", **_param_names(proto, module)}
    u = np.random.default_rng(0).standard_normal((3, 5)).astype(np.float32)
    aug = add_gradients(proto, ["y"], list(names.values()), grad_ys=[u])
    got = run(aug.model, {"x": x.numpy(), "ids": ids.numpy(), "offsets": offsets.numpy()})
    xt = x.clone().requires_grad_()
    (module(xt, ids, offsets) * torch.from_numpy(u)).sum().backward()
    want = {"x": xt.grad, **{k: p.grad for k, p in module.named_parameters()}}
    for k, graph_name in names.items():
        np.testing.assert_allclose(got[aug.gradients[graph_name]], want[k].numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


# ------------------------------------------------------------------------------------------ TensorFlow
def _tf_model(fn: Callable[..., Any], spec: tuple[Any, ...], opset: int) -> onnx.ModelProto:
    tf2onnx = pytest.importorskip("tf2onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, _ = tf2onnx.convert.from_function(fn, input_signature=spec, opset=opset)
    return model


@pytest.mark.parametrize("opset", [11, 13, 17])
def test_tf_crop_and_resize_against_tensorflow(opset: int) -> None:
    """tf.image.crop_and_resize through tf2onnx: a Loop over the boxes whose body reads its iteration number as a
    [1] tensor (a Slice bound: the reverse Loop fed it a scalar, which onnxruntime refused) and crops with a Resize
    in tf_crop_and_resize mode, each box its run-time roi. The images' and the boxes' gradients (TensorFlow
    differentiates the boxes: the samples move with them) against tf.GradientTape."""
    tf = pytest.importorskip("tensorflow")

    def crop(images: Any, boxes: Any, index: Any) -> Any:
        return tf.image.crop_and_resize(images, boxes, index, (3, 4))

    spec = (tf.TensorSpec([2, 6, 7, 2], tf.float32, name="images"), tf.TensorSpec([None, 4], tf.float32, name="boxes"),
            tf.TensorSpec([None], tf.int32, name="index"))
    proto = _tf_model(tf.function(crop, input_signature=spec), spec, opset)
    assert "Loop" in {n.op_type for n in proto.graph.node}
    rng = np.random.default_rng(4)
    images = rng.standard_normal((2, 6, 7, 2)).astype(np.float32)
    boxes = np.array([[0.1, 0.2, 0.8, 0.7], [0.3, 0.05, 0.9, 0.55], [0.02, 0.3, 0.45, 0.93]], np.float32)
    index = np.array([1, 0, 1], np.int32)
    u = rng.standard_normal((3, 3, 4, 2)).astype(np.float32)
    a, b = tf.constant(images), tf.constant(boxes)
    with tf.GradientTape() as tape:
        tape.watch([a, b])
        loss = tf.reduce_sum(crop(a, b, tf.constant(index)) * u)
    want = [g.numpy() for g in tape.gradient(loss, [a, b])]
    aug = add_gradients(proto, [proto.graph.output[0].name], ["images", "boxes"], grad_ys=[u])
    got = run(aug.model, {"images": images, "boxes": boxes, "index": index})
    for name, expect in zip(["images", "boxes"], want, strict=True):
        np.testing.assert_allclose(got[aug.gradients[name]], expect, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("opset", [13, 17])
def test_tf_cond_while_loop_and_scan_against_tensorflow(opset: int) -> None:
    """tf.cond, tf.while_loop with a run-time trip count and tf.scan, converted by tf2onnx, against tf.GradientTape."""
    tf = pytest.importorskip("tensorflow")
    rng = np.random.default_rng(0)
    w = tf.Variable(rng.standard_normal((3, 3)) * 0.5)

    def forward(x: Any, n: Any) -> Any:
        c = tf.cond(tf.reduce_sum(x) > 0, lambda: tf.sin(x @ w), lambda: tf.tanh(x) * 2.0)
        _, h = tf.while_loop(lambda i, h: i < n, lambda i, h: (i + 1, tf.tanh(h @ w) + x), (tf.constant(0), c))
        s = tf.scan(lambda a, e: tf.tanh(a * e + a), h, initializer=tf.ones([3], tf.float64))
        return h + s

    spec = (tf.TensorSpec([2, 3], tf.float64, name="x"), tf.TensorSpec([], tf.int32, name="n"))
    proto = _tf_model(tf.function(forward, input_signature=spec), spec, opset)
    ops = {n.op_type for n in proto.graph.node}
    assert {"If", "Loop"} <= ops, ops
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in proto.graph.initializer}
    (w_name,) = [k for k, a in inits.items() if a.shape == (3, 3) and np.array_equal(a, w.numpy())]
    u = rng.standard_normal((2, 3))
    for sign, trips in [(1.0, 3), (-1.0, 2), (1.0, 0)]:
        xv = np.abs(rng.standard_normal((2, 3))) * sign
        xt = tf.constant(xv)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            loss = tf.reduce_sum(forward(xt, tf.constant(trips)) * u)
        gx, gw = tape.gradient(loss, [xt, w])
        y = proto.graph.output[0].name
        aug = add_gradients(proto, [y], ["x", w_name], grad_ys=[u])
        got = run(aug.model, {"x": xv, "n": np.array(trips, np.int32)})
        np.testing.assert_allclose(got[aug.gradients["x"]], gx.numpy(), rtol=1e-9, atol=1e-11)
        np.testing.assert_allclose(got[aug.gradients[w_name]], gw.numpy(), rtol=1e-9, atol=1e-11)
