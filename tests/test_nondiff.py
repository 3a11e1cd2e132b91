"""Ops declared non-differentiable: the walk treats them as constants.

Each probe graph is ``y = x * w + t``, where ``t`` is computed from x through the declared op (named
``probe``) wherever the op can take a value derived from x. Since the op counts as constant, the gradient of
``sum(y)`` with respect to x is exactly ``w``, read off the graph, not from onnxgrad. Each test checks that
``add_gradients`` succeeds and its model passes the full checker, that the gradient, pruned to what it
needs, does not use the probe node and equals ``w`` in onnxruntime, and, where onnxruntime can run the
op, that the whole augmented model runs and gives the same gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh

from onnxgrad import add_gradients, registry
from onnxgrad.api import GradientNote
from onnxgrad.backprop import UndefinedGradient
from onnxgrad.runtime import run
from tests.gradcheck import IR_VERSION
from tests.graphs import only

SHAPE = (2, 3)


class Graph:
    """A tiny graph builder: nodes and initializers, names made up as it goes."""

    def __init__(self, dtype: type) -> None:
        self.dtype = np.dtype(dtype)
        self.elem = oh.np_dtype_to_tensor_dtype(self.dtype)
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self._n = 0

    def _name(self) -> str:
        self._n += 1
        return f"v{self._n}"

    def node(self, op: str, *inputs: str, n_out: int = 1, name: str = "", **attrs: Any) -> Any:
        outs = [self._name() for _ in range(n_out)]
        self.nodes.append(oh.make_node(op, list(inputs), outs, name=name or f"n{len(self.nodes)}", **attrs))
        return outs[0] if n_out == 1 else outs

    def probe(self, op: str, *inputs: str, n_out: int = 1, **attrs: Any) -> Any:
        """The node of the op under test."""
        return self.node(op, *inputs, n_out=n_out, name="probe", **attrs)

    def const(self, value: Any, dtype: Any = None) -> str:
        name = self._name()
        self.inits.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype or self.dtype), name))
        return name

    def ints(self, *values: int) -> str:
        return self.const(np.array(values), np.int64)

    def to_float(self, v: str) -> str:
        return self.node("Cast", v, to=self.elem)

    def total(self, v: str) -> str:
        """A float scalar summing v (any numeric dtype)."""
        return self.node("ReduceSum", self.to_float(v), keepdims=0)

    def scalar_of(self, x: str) -> str:
        """A float scalar that depends on x (and is 1.0 at finite x)."""
        return self.node("Add", self.node("Mul", self.node("ReduceSum", x, keepdims=0), self.const(0.0)),
                         self.const(1.0))

    def as_uint8(self, x: str) -> str:
        return self.node("Cast", self.node("Abs", x), to=TP.UINT8)

    def as_string(self, x: str) -> str:
        return self.node("Cast", x, to=TP.STRING)


Build = Callable[[Graph, str], str]


@dataclass
class Probe:
    op: str
    opset: int
    build: Build  # from x, the float term t added to y (shape (2, 3), broadcastable, or scalar)
    dtype: type = np.float64
    runs: bool = True  # whether onnxruntime can run the op itself on these inputs
    id: str = ""
    typed: bool = False  # record every value's type in the model (onnx shape inference) beforehand

    @property
    def name(self) -> str:
        return f"{self.op}-v{self.opset}" + (f"-{self.id}" if self.id else "")


def _cmp(op: str) -> Build:
    return lambda g, x: g.to_float(g.probe(op, x, g.const(np.full(SHAPE, 0.1))))


def _logic(op: str) -> Build:
    return lambda g, x: g.to_float(g.probe(op, g.node("Less", x, g.const(0.0)), g.node("Greater", x, g.const(-0.5))))


def _same(op: str, **attrs: Any) -> Build:
    return lambda g, x: g.probe(op, x, **attrs)


def _counted(op: str, **attrs: Any) -> Build:
    return lambda g, x: g.total(g.probe(op, x, **attrs))


def _bitwise(op: str) -> Build:
    def build(g: Graph, x: str) -> str:
        a = g.node("Cast", g.node("Mul", x, g.const(10.0)), to=TP.INT32)
        return g.to_float(g.probe(op, a) if op == "BitwiseNot" else g.probe(op, a, a))

    return build


def _window(op: str) -> Build:
    return lambda g, x: g.node("Reshape", g.probe(op, g.node("Size", x), output_datatype=g.elem), g.ints(*SHAPE))


def _random_like(op: str) -> Build:
    return lambda g, x: g.probe(op, x, seed=1.0)


def _bernoulli(g: Graph, x: str) -> str:
    return g.probe("Bernoulli", g.node("Sigmoid", x), seed=1.0)


def _random(op: str) -> Build:
    return lambda g, x: g.probe(op, shape=list(SHAPE), dtype=g.elem, seed=1.0)


def _multinomial(g: Graph, x: str) -> str:
    return g.total(g.probe("Multinomial", x, sample_size=2, seed=1.0))


def _nms(g: Graph, x: str) -> str:
    corners = [[0, 0, 1, 1], [0, 0, 1, 1.1], [2, 2, 3, 3], [5, 5, 6, 6], [0, 5, 1, 6], [9, 9, 10, 10]]
    boxes = g.const(np.array([corners]))
    scores = g.node("Reshape", x, g.ints(1, 1, 6))
    return g.total(g.probe("NonMaxSuppression", boxes, scores, g.ints(3)))


def _constant_of_shape(g: Graph, x: str) -> str:
    value = onnx.numpy_helper.from_array(np.array([0.5], dtype=g.dtype))
    return g.probe("ConstantOfShape", g.node("Shape", x), value=value)


def _constant(g: Graph, x: str) -> str:
    return g.probe("Constant", value=onnx.numpy_helper.from_array(np.full(SHAPE, 0.25, dtype=g.dtype)))


def _range(g: Graph, x: str) -> str:
    start = g.node("Sub", g.scalar_of(x), g.const(1.0))  # 0.0, computed from x
    return g.probe("Range", start, g.const(3.0), g.const(1.0))


def _scalar_ints(g: Graph, *values: int) -> list[str]:
    return [g.const(np.array(v), np.int64) for v in values]


def _mel_scalars(g: Graph, x: str) -> str:
    bins, length, rate = _scalar_ints(g, 2, 8, 8000)
    lower = g.node("Sub", g.scalar_of(x), g.const(1.0))
    return g.total(g.probe("MelWeightMatrix", bins, length, rate, lower, g.const(4000.0), output_datatype=g.elem))


def _one_hot(g: Graph, x: str) -> str:
    values = g.node("Slice", g.node("Reshape", x, g.ints(-1)), g.ints(0), g.ints(2))
    return g.probe("OneHot", g.ints(0, 2), g.const(np.array(3), np.int64), values)


def _quantize(g: Graph, x: str) -> str:
    q = g.probe("QuantizeLinear", x, g.const(0.05), g.const(np.array(128), np.uint8))
    return g.to_float(q)


def _dequantize(g: Graph, x: str) -> str:
    q = g.node("QuantizeLinear", x, g.const(0.05), g.const(np.array(128), np.uint8))
    return g.probe("DequantizeLinear", q, g.scalar_of(x), g.const(np.array(128), np.uint8))


def _dynamic_quantize(g: Graph, x: str) -> str:
    q, scale, zero = g.probe("DynamicQuantizeLinear", x, n_out=3)
    return g.node("Add", g.to_float(q), g.node("Add", scale, g.to_float(zero)))


def _conv_integer(g: Graph, x: str) -> str:
    image = g.node("Reshape", g.as_uint8(x), g.ints(1, 1, *SHAPE))
    return g.total(g.probe("ConvInteger", image, g.const(np.ones((1, 1, 1, 1)), np.uint8)))


def _matmul_integer(g: Graph, x: str) -> str:
    return g.total(g.probe("MatMulInteger", g.as_uint8(x), g.const(np.ones((3, 2)), np.uint8)))


def _qlinear(op: str) -> Build:
    def build(g: Graph, x: str) -> str:
        s, z = g.scalar_of(x), g.const(np.array(0), np.uint8)
        a = g.node("QuantizeLinear", x, s, z)
        if op == "QLinearMatMul":
            b = g.const(np.ones((3, 2)), np.uint8)
            return g.total(g.probe(op, a, s, z, b, g.const(1.0), z, g.const(1.0), z))
        image = g.node("Reshape", a, g.ints(1, 1, *SHAPE))
        w = g.const(np.ones((1, 1, 1, 1)), np.uint8)
        return g.total(g.probe(op, image, s, z, w, g.const(1.0), z, g.const(1.0), z))

    return build


def _bitcast(g: Graph, x: str) -> str:
    return g.total(g.probe("BitCast", x, to=TP.INT64))


def _strings(op: str) -> Build:
    def build(g: Graph, x: str) -> str:
        s = g.as_string(x)
        if op == "StringNormalizer":
            out = g.probe(op, g.node("Reshape", s, g.ints(-1)), case_change_action="LOWER")
            return g.node("Reshape", g.to_float(out), g.ints(*SHAPE))
        if op == "StringConcat":
            return g.total(g.node("Shape", g.probe(op, s, s)))
        if op == "StringSplit":
            return g.total(g.probe(op, s, delimiter=".", n_out=2)[1])
        return g.to_float(g.probe(op, s, pattern="-.*"))  # RegexFullMatch

    return build


def _tfidf(g: Graph, x: str) -> str:
    tokens = g.node("Cast", g.node("Abs", x), to=TP.INT64)
    out = g.probe("TfIdfVectorizer", tokens, mode="TF", min_gram_length=1, max_gram_length=1, max_skip_count=0,
                  ngram_counts=[0], ngram_indexes=[0, 1], pool_int64s=[0, 1])
    return g.total(out)


def _image_decoder(g: Graph, x: str) -> str:
    return g.total(g.probe("ImageDecoder", g.node("Reshape", g.as_uint8(x), g.ints(-1))))


def _optional_has_element(g: Graph, x: str) -> str:
    return g.to_float(g.probe("OptionalHasElement", g.node("Optional", x)))


def _sequence_length(g: Graph, x: str) -> str:
    return g.to_float(g.probe("SequenceLength", g.node("SequenceConstruct", x, x)))


def _sequence_empty(g: Graph, x: str) -> str:
    return g.to_float(g.node("SequenceLength", g.probe("SequenceEmpty", dtype=g.elem)))


PROBES = [
    Probe("Equal", 11, _cmp("Equal")),
    Probe("Less", 9, _cmp("Less")),
    Probe("Greater", 13, _cmp("Greater")),
    Probe("LessOrEqual", 12, _cmp("LessOrEqual")),
    Probe("GreaterOrEqual", 16, _cmp("GreaterOrEqual")),
    Probe("IsNaN", 13, lambda g, x: g.to_float(g.probe("IsNaN", x))),
    Probe("IsInf", 10, lambda g, x: g.to_float(g.probe("IsInf", x))),
    Probe("Not", 7, lambda g, x: g.to_float(g.probe("Not", g.node("Less", x, g.const(0.0)))), np.float32),
    Probe("And", 7, _logic("And"), np.float32),
    Probe("Or", 9, _logic("Or")),
    Probe("Xor", 13, _logic("Xor")),
    Probe("BitShift", 11, lambda g, x: g.to_float(g.probe("BitShift", g.node("Cast", g.node("Abs", x), to=TP.UINT32),
                                                           g.const(np.array([1]), np.uint32), direction="LEFT"))),
    Probe("BitwiseAnd", 18, _bitwise("BitwiseAnd")),
    Probe("BitwiseOr", 18, _bitwise("BitwiseOr")),
    Probe("BitwiseXor", 18, _bitwise("BitwiseXor")),
    Probe("BitwiseNot", 18, _bitwise("BitwiseNot")),
    Probe("Floor", 13, _same("Floor")),
    Probe("Ceil", 7, _same("Ceil")),
    Probe("Round", 11, _same("Round")),
    Probe("Sign", 9, _same("Sign")),
    Probe("Hardmax", 13, _same("Hardmax"), np.float32),  # no float64 kernel in onnxruntime
    Probe("Hardmax", 7, _same("Hardmax", axis=1), np.float32, id="v1-form"),
    Probe("ArgMax", 13, lambda g, x: g.to_float(g.probe("ArgMax", x, axis=1))),
    Probe("ArgMin", 11, lambda g, x: g.to_float(g.probe("ArgMin", x, axis=-1))),
    Probe("NonZero", 13, _counted("NonZero"), np.float32),
    Probe("NonMaxSuppression", 11, _nms, np.float32),
    Probe("Shape", 15, _counted("Shape", start=1)),
    Probe("Size", 13, _counted("Size")),
    Probe("EyeLike", 9, _same("EyeLike", k=1)),
    Probe("ConstantOfShape", 20, _constant_of_shape),
    Probe("Constant", 13, _constant),
    Probe("Range", 11, _range),
    Probe("BlackmanWindow", 17, _window("BlackmanWindow")),
    Probe("HammingWindow", 17, _window("HammingWindow")),
    Probe("HannWindow", 17, _window("HannWindow")),
    Probe("MelWeightMatrix", 17, _mel_scalars, np.float32),
    Probe("OneHot", 11, _one_hot, np.float32),
    Probe("RandomNormal", 7, _random("RandomNormal")),
    Probe("RandomUniform", 13, _random("RandomUniform")),
    Probe("RandomNormalLike", 7, _random_like("RandomNormalLike")),
    Probe("RandomUniformLike", 13, _random_like("RandomUniformLike")),
    Probe("Multinomial", 7, _multinomial, np.float32),
    Probe("Bernoulli", 15, _bernoulli),
    Probe("QuantizeLinear", 13, _quantize, np.float32),
    Probe("DequantizeLinear", 21, _dequantize, np.float32),
    Probe("DynamicQuantizeLinear", 11, _dynamic_quantize, np.float32),
    Probe("ConvInteger", 10, _conv_integer),
    Probe("MatMulInteger", 10, _matmul_integer),
    Probe("QLinearMatMul", 10, _qlinear("QLinearMatMul"), np.float32),
    Probe("QLinearConv", 10, _qlinear("QLinearConv"), np.float32),
    Probe("BitCast", 26, _bitcast),
    Probe("StringNormalizer", 10, _strings("StringNormalizer"), runs=False),  # needs the en_US locale
    Probe("StringConcat", 20, _strings("StringConcat")),
    Probe("StringSplit", 20, _strings("StringSplit")),
    Probe("RegexFullMatch", 20, _strings("RegexFullMatch")),
    Probe("TfIdfVectorizer", 9, _tfidf),
    Probe("ImageDecoder", 20, _image_decoder, runs=False),  # the bytes are no image
    Probe("OptionalHasElement", 18, _optional_has_element),
    Probe("SequenceLength", 11, _sequence_length),
    Probe("SequenceEmpty", 11, _sequence_empty),
    Probe("OptionalHasElement", 18, _optional_has_element, id="typed", typed=True),
    Probe("SequenceLength", 11, _sequence_length, id="typed", typed=True),
    Probe("SequenceEmpty", 11, _sequence_empty, id="typed", typed=True),
]

# onnx_ir's ShapeInferencePass (run by the API when some value lacks a dtype) copies only the dtype
# it infers, so a sequence or optional value without a recorded type comes out as a tensor: the model
# add_gradients returns then fails onnx's checker. Not a matter of these declarations.


def probe_model(p: Probe) -> tuple[onnx.ModelProto, np.ndarray, np.ndarray]:
    """(model of y = x * w + t, x, w)."""
    g = Graph(p.dtype)
    w_value = np.arange(1, 7, dtype=p.dtype).reshape(SHAPE) / 4
    w = g.const(w_value)
    t = p.build(g, "x")
    g.node("Add", g.node("Mul", "x", w), t)
    g.nodes[-1].output[0] = "y"
    graph = oh.make_graph(
        g.nodes, p.name, [oh.make_tensor_value_info("x", g.elem, SHAPE)],
        [oh.make_tensor_value_info("y", g.elem, SHAPE)], g.inits,
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", p.opset)], ir_version=IR_VERSION[p.opset])
    if model.ir_version < 4:
        model.graph.input.extend(oh.make_tensor_value_info(i.name, i.data_type, list(i.dims)) for i in g.inits)
    if p.typed:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    x = np.array([[0.3, -1.2, 2.1], [-0.45, 0.8, 1.7]], dtype=p.dtype)
    return model, x, w_value


def _param(p: Probe) -> Any:
    return pytest.param(p, id=p.name)


def _undefined(p: Probe) -> bool:
    rule = registry.lookup("", p.op, p.opset)
    return rule is not None and rule.undefined


@pytest.mark.parametrize("p", [_param(p) for p in PROBES])
def test_declared_constant(p: Probe) -> None:
    model, x, w = probe_model(p)
    onnx.checker.check_model(model, full_check=True)
    # an undefined declaration's float inputs do change its output: the walk is told to treat it as constant
    stop = [o for n in model.graph.node if n.name == "probe" for o in n.output if o] if _undefined(p) else None
    aug = add_gradients(model, ["y"], ["x"], stop_gradients=stop)
    onnx.checker.check_model(aug.model, full_check=True)
    grad = aug.gradients["x"]
    assert grad is not None
    pruned = only(aug.model, [grad])
    assert "probe" not in {n.name for n in pruned.graph.node}, "the gradient depends on the probed op"
    np.testing.assert_allclose(run(pruned, {"x": x})[grad], w, rtol=1e-6)
    if p.runs:
        np.testing.assert_allclose(run(aug.model, {"x": x})[grad], w, rtol=1e-6)


@pytest.mark.parametrize("p", [_param(p) for p in PROBES if _undefined(p)])
def test_undefined_declaration_is_never_zero(p: Probe) -> None:
    """Where x reaches y through the op's float input too, x's gradient is undefined: None with a note, and an
    error (not zeros, not the partial w) under 'zero'."""
    model, _, _ = probe_model(p)
    with pytest.warns(GradientNote, match=f"undefined: it reaches the ys through input .* of {p.op}"):
        assert add_gradients(model, ["y"], ["x"]).gradients["x"] is None
    with pytest.raises(UndefinedGradient, match="never given as zeros"):
        add_gradients(model, ["y"], ["x"], unconnected_gradients="zero")


def test_every_declaration_is_probed() -> None:
    declared = {r.op_type for r in registry.all_rules() if not r.differentiable and r.domain == ""}
    probed = {p.op for p in PROBES}
    assert declared <= probed, f"declared non-differentiable without a probe: {sorted(declared - probed)}"
    for p in PROBES:
        rule = registry.lookup("", p.op, p.opset)
        assert rule is not None and not rule.differentiable, f"{p.name}: not declared non-differentiable"


# Ops whose outputs are float: here the walk reaches the op and must find the declaration (the others'
# integer, bool or string outputs are pruned by dtype before any lookup).
FLOAT_OUTPUT = {"Floor", "Ceil", "Round", "Sign", "Hardmax", "EyeLike", "Range", "MelWeightMatrix", "OneHot",
                "RandomNormalLike", "RandomUniformLike", "Bernoulli", "DequantizeLinear", "DynamicQuantizeLinear"}


@pytest.mark.parametrize("p", [p for p in PROBES if p.op in FLOAT_OUTPUT], ids=lambda p: p.name)
def test_float_output_probe_uses_the_declaration(p: Probe, monkeypatch: pytest.MonkeyPatch) -> None:
    model, _, _ = probe_model(p)
    # without the declaration, ops with a schema function body (Bernoulli, DynamicQuantizeLinear) would be
    # differentiated through that body instead: switch the fallback off to see the walk consult the table
    monkeypatch.setattr(registry, "_FALLBACKS", [])
    saved = registry._RULES.pop(("", p.op))
    try:
        with pytest.raises(LookupError, match=p.op):
            add_gradients(model, ["y"], ["x"])
    finally:
        registry._RULES[("", p.op)] = saved
