"""onnxgrad.gradients against tf.gradients itself (TensorFlow 2.21, v1 graph mode).

Every row is one small computation, built once as an ONNX graph (run through onnxgrad and
onnxruntime) and once as a TensorFlow graph (run through ``tf.compat.v1.gradients``). The two must give
the same gradients (values, shapes, dtypes and None-ness) and put the new ops under the same name scope.
Rows marked ``diverges`` are SEMANTICS.md's documented differences: there onnxgrad must agree with the TF
graph that has the stated change instead, and must differ from plain TF."""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxgrad
from tests.graphs import Graph, N, build, new_names, run, with_outputs

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
tf = importlib.import_module("tensorflow")  # after the log level is set; a missing TF is a failure, not a skip

DOUBLE, INT64, INT32 = onnx.TensorProto.DOUBLE, onnx.TensorProto.INT64, onnx.TensorProto.INT32


def arr(*shape: int, seed: int = 0, low: float = -1.5, high: float = 1.5) -> np.ndarray:
    """Reproducible float64 test data."""
    return np.random.default_rng(seed).uniform(low, high, shape)


@dataclass(frozen=True)
class Fed:
    """A grad_ys entry fed at run time: a new ONNX graph input, a TF placeholder."""

    value: np.ndarray


GradYs = Sequence[str | np.ndarray | Fed | None] | None


@dataclass
class Call:
    """One gradients() call; grad_ys entries: None (ones), an array, a value name, or Fed(array)."""

    ys: list[str]
    xs: list[str]
    grad_ys: GradYs = None
    stop_gradients: list[str] = field(default_factory=list)
    unconnected_gradients: str = "none"
    aggregation_method: str | None = None
    name: str = "gradients"


@dataclass
class Row:
    """A scenario: a graph, one or more calls, and (optionally) values routed through a stop-gradient
    marker (``onnxgrad.stop_gradient`` / ``tf.stop_gradient``)."""

    id: str
    graph: Graph
    calls: list[Call]
    markers: tuple[str, ...] = ()
    diverges: str = ""  # why onnxgrad differs from plain TF (documented); see tf_variant


# ---------------------------------------------------------------------------- the TensorFlow side
def _tf_dtype(onnx_type: int) -> Any:
    return tf.as_dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx_type))


def _reduce_sum(ins: list[Any], attrs: dict[str, Any], name: str) -> Any:
    axis = ins[1] if len(ins) > 1 else attrs.get("axes")  # an input from opset 13, an attribute before
    # int32 axes: TF cannot differentiate a reduction with int64 axes over a dynamic shape (DynamicStitch)
    axis = None if axis is None else tf.cast(axis, tf.int32)
    return tf.reduce_sum(ins[0], axis=axis, keepdims=bool(attrs.get("keepdims", 1)), name=name)


def _split(ins: list[Any], attrs: dict[str, Any], name: str) -> Any:
    return tf.split(ins[0], ins[1], axis=attrs.get("axis", 0), name=name)


def _top_k(ins: list[Any], attrs: dict[str, Any], name: str) -> Any:
    assert attrs.get("axis", -1) == -1 and attrs.get("largest", 1) == 1
    values, indices = tf.math.top_k(ins[0], k=tf.cast(ins[1][0], tf.int32), name=name)
    return values, tf.cast(indices, tf.int64)


TF_OPS: dict[str, Callable[[list[Any], dict[str, Any], str], Any]] = {
    "Add": lambda i, a, n: tf.add(*i, name=n),
    "Sub": lambda i, a, n: tf.subtract(*i, name=n),
    "Mul": lambda i, a, n: tf.multiply(*i, name=n),
    "Div": lambda i, a, n: tf.divide(*i, name=n),
    "Sum": lambda i, a, n: tf.add_n(i, name=n),
    "Neg": lambda i, a, n: tf.negative(*i, name=n),
    "Exp": lambda i, a, n: tf.exp(*i, name=n),
    "Tanh": lambda i, a, n: tf.tanh(*i, name=n),
    "Identity": lambda i, a, n: tf.identity(*i, name=n),
    "Cast": lambda i, a, n: tf.cast(i[0], _tf_dtype(a["to"]), name=n),
    "MatMul": lambda i, a, n: tf.matmul(*i, name=n),
    "ReduceSum": _reduce_sum,
    "Split": _split,
    "TopK": _top_k,
    "Floor": lambda i, a, n: tf.floor(*i, name=n),
    "Relu": lambda i, a, n: tf.nn.relu(*i, name=n),
    "Greater": lambda i, a, n: tf.greater(*i, name=n),
    "Where": lambda i, a, n: tf.where(*i, name=n),
    "Gather": lambda i, a, n: tf.gather(*i, axis=a.get("axis", 0), name=n),
    "Concat": lambda i, a, n: tf.concat(i, axis=a["axis"], name=n),
    "Transpose": lambda i, a, n: tf.transpose(i[0], perm=a["perm"], name=n),
}


def _placeholder(name: str, value: np.ndarray, dynamic: bool) -> Any:
    shape: list[int | None] = list(value.shape)
    if dynamic and shape:
        shape[0] = None
    return tf.compat.v1.placeholder(tf.as_dtype(value.dtype), shape, name=name)


def tf_gradients(row: Row) -> tuple[list[list[np.ndarray | None]], list[set[str]]]:
    """Per call: the gradients TF computes, and the top-level name scopes of the ops it added."""
    g, graph = tf.Graph(), row.graph
    with g.as_default():
        feed: dict[Any, np.ndarray] = {}
        raw: dict[str, Any] = {}  # value name -> tensor
        for name, value in graph.inputs.items():
            raw[name] = _placeholder(name, np.asarray(value), graph.dynamic)
            feed[raw[name]] = np.asarray(value)
        for name, value in {**graph.inits, **graph.consts}.items():
            raw[name] = tf.constant(value, name=name)
        use = dict(raw)  # what consumers read: stop_gradient(v) for marked values
        for n in graph.nodes:
            out = TF_OPS[n.op]([use[i] for i in n.inputs], n.attrs, n.output_names[0])
            outs = out if isinstance(out, list | tuple) else [out]
            for name, t in zip(n.output_names, outs, strict=True):
                raw[name] = t
                use[name] = tf.stop_gradient(t) if name in row.markers else t
        fetched: list[list[Any]] = []
        scopes: list[set[str]] = []
        for c in row.calls:
            grad_ys = None
            if c.grad_ys is not None:
                grad_ys = []
                for y, spec in zip(c.ys, c.grad_ys, strict=True):
                    if isinstance(spec, Fed):
                        grad_ys.append(_placeholder(f"{y}_seed", spec.value, graph.dynamic))
                        feed[grad_ys[-1]] = spec.value
                    elif isinstance(spec, str):
                        grad_ys.append(raw[spec])
                    else:
                        grad_ys.append(None if spec is None else tf.constant(spec))
            before = {op.name for op in g.get_operations()}
            method = c.aggregation_method and getattr(tf.AggregationMethod, c.aggregation_method.upper())
            out = tf.compat.v1.gradients(
                [raw[y] for y in c.ys], [raw[x] for x in c.xs], grad_ys=grad_ys, name=c.name,
                stop_gradients=[raw[s] for s in c.stop_gradients], aggregation_method=method,
                unconnected_gradients=c.unconnected_gradients,
            )
            # TF builds 'zero' results outside its scope (top-level zeros_like ops); onnxgrad keeps them inside
            scopes.append({
                op.name.split("/")[0] for op in g.get_operations()
                if op.name not in before and not op.name.startswith("zeros_like")
            })
            fetched.append([t if t is None else tf.convert_to_tensor(t) for t in out])  # IndexedSlices
        with tf.compat.v1.Session(graph=g) as sess:
            flat = [t for ts in fetched for t in ts if t is not None]
            values = iter(sess.run(flat, feed_dict=feed))
    return [[None if t is None else np.asarray(next(values)) for t in ts] for ts in fetched], scopes


# ---------------------------------------------------------------------------- the onnxgrad side
def _seed_spec(spec: str | np.ndarray | Fed | None) -> Any:
    return onnxgrad.NEW_INPUT if isinstance(spec, Fed) else spec


def onnx_gradients(row: Row) -> tuple[list[list[np.ndarray | None]], list[set[str]]]:
    """Per call: the gradients onnxgrad + onnxruntime compute, and the top-level scopes of what it added."""
    model = ir.serde.deserialize_model(build(row.graph))
    for v in row.markers:
        onnxgrad.stop_gradient(model, v)
    feeds = row.graph.feeds
    names: list[list[str | None]] = []
    scopes: list[set[str]] = []
    for c in row.calls:
        before = ir.serde.serialize_model(model)
        inputs_before = {v.name for v in model.graph.inputs}
        grad_ys = None if c.grad_ys is None else [_seed_spec(s) for s in c.grad_ys]
        got = onnxgrad.gradients(
            model, c.ys, c.xs, grad_ys=grad_ys, name=c.name, stop_gradients=c.stop_gradients,
            aggregation_method=c.aggregation_method, unconnected_gradients=c.unconnected_gradients,
        )
        assert len(got) == len(c.xs)
        seeds = [v.name for v in model.graph.inputs if v.name not in inputs_before]
        fed = [s.value for s in c.grad_ys or [] if isinstance(s, Fed)]
        assert len(seeds) == len(fed), f"{len(fed)} seeds asked as new inputs, {len(seeds)} added: {seeds}"
        feeds.update(zip(seeds, fed, strict=True))
        nodes, values = new_names(before, ir.serde.serialize_model(model))
        scopes.append({n.split("/")[0] for n in nodes | values})
        names.append(got)
    proto = with_outputs(model, [n for ns in names for n in ns])
    onnx.checker.check_model(proto, full_check=True)
    node_names = [n.name for n in proto.graph.node]
    assert len(node_names) == len(set(node_names)), "node names collide"
    results = run(proto, feeds)
    return [[None if n is None else results[n] for n in ns] for ns in names], scopes


def tf_variant(row: Row) -> Row:
    """The TF graph onnxgrad must match on a ``diverges`` row: stop_gradients become per-value markers."""
    stops = tuple(s for c in row.calls for s in c.stop_gradients)
    calls = [Call(**{**c.__dict__, "stop_gradients": []}) for c in row.calls]
    return Row(row.id, row.graph, calls, (*row.markers, *stops))


# ---------------------------------------------------------------------------- the scenarios
X, W, V = arr(2, 3, seed=1), arr(3, seed=2), arr(2, 3, seed=3)
S, C = arr(2, 1, seed=4), np.float64(0.75)
G23, G23b = arr(2, 3, seed=5), arr(2, 3, seed=6)

# y = tanh(x * w) + x          (x: 2x3, w: 3, broadcast)
TANH = Graph([N("h", "Mul", "x", "w"), N("t", "Tanh", "h"), N("y", "Add", "t", "x")], inputs={"x": X, "w": W})
# y1 = x * w ; y2 = exp(y1) * v   (y1 feeds y2)
CHAIN = Graph([N("y1", "Mul", "x", "w"), N("e", "Exp", "y1"), N("y2", "Mul", "e", "v")],
              inputs={"x": X, "w": W, "v": V}, outputs=["y1", "y2"])
# the documentation's example in float64 with fed inputs: b = 2a ; s = a + b
DOC = Graph([N("b", "Mul", "two", "a"), N("s", "Add", "a", "b")], inputs={"a": np.float64(0.5)},
            inits={"two": np.float64(2.0)})
# h = x * w, consumed four times: y = h*h + exp(h) + tanh(h) + h
FANOUT = Graph(
    [N("h", "Mul", "x", "w"), N("hh", "Mul", "h", "h"), N("eh", "Exp", "h"), N("th", "Tanh", "h"),
     N("y", "Sum", "hh", "eh", "th", "h")],
    inputs={"x": X, "w": W},
)
# y = x * w + cast(cast(x, int), double) * v : the integer path contributes nothing
INTPATH = Graph(
    [N("xw", "Mul", "x", "w"), N("xi", "Cast", "x", to=INT64), N("xf", "Cast", "xi", to=DOUBLE),
     N("xv", "Mul", "xf", "v"), N("y", "Add", "xw", "xv")],
    inputs={"x": 3 * X, "w": W, "v": V},
)
# only an integer path: z = cast(cast(x, int32), double) * w
INTONLY = Graph([N("xi", "Cast", "x", to=INT32), N("xf", "Cast", "xi", to=DOUBLE), N("z", "Mul", "xf", "w")],
                inputs={"x": 3 * X, "w": W})
# broadcasting: y = ((x + w) * s) * c * m  with x 2x3, w 3, s 2x1, c scalar, m 4x1x1
BCAST = Graph(
    [N("a", "Add", "x", "w"), N("b", "Mul", "a", "s"), N("c2", "Mul", "b", "c"), N("y", "Mul", "c2", "m")],
    inputs={"x": X, "w": W, "s": S, "c": C, "m": arr(4, 1, 1, seed=7)},
)
# total derivative through intermediates: h = x * w ; y = h * x + tanh(h)
INTER = Graph([N("h", "Mul", "x", "w"), N("hx", "Mul", "h", "x"), N("th", "Tanh", "h"), N("y", "Add", "hx", "th")],
              inputs={"x": X, "w": W})
# a small layer: y = sum(tanh(x @ W1) @ W2, axis=1)
MLP = Graph(
    [N("z", "MatMul", "x", "W1"), N("a", "Tanh", "z"), N("o", "MatMul", "a", "W2"),
     N("y", "ReduceSum", "o", "axis1", keepdims=0)],
    inputs={"x": arr(5, 3, seed=8)}, inits={"W1": arr(3, 4, seed=9), "W2": arr(4, 2, seed=10),
                                             "axis1": np.array([1], dtype=np.int64)},
)
MLP11 = Graph(
    [N("z", "MatMul", "x", "W1"), N("a", "Tanh", "z"), N("o", "MatMul", "a", "W2"),
     N("y", "ReduceSum", "o", axes=[1], keepdims=0)],
    inputs=MLP.inputs, inits={"W1": MLP.inits["W1"], "W2": MLP.inits["W2"]}, opset=11,
)
# a value named like the default scope: the gradients go under gradients_1
TAKEN = Graph([N("gradients", "Mul", "x", "w"), N("y", "Exp", "gradients")], inputs={"x": X, "w": W})
# a multi-output op: p, q = split(x * w) ; y = 2p + 3q
SPLIT = Graph(
    [N("h", "Mul", "x", "w"), N(("p", "q"), "Split", "h", "sizes", axis=0), N("p2", "Mul", "p", "two"),
     N("q3", "Mul", "q", "three"), N("y", "Add", "p2", "q3")],
    inputs={"x": X, "w": W},
    inits={"sizes": np.array([1, 1], dtype=np.int64), "two": np.float64(2.0), "three": np.float64(3.0)},
)

# ops with integer or bool inputs and outputs on the path
FLOOR = Graph([N("f", "Floor", "x"), N("fw", "Mul", "f", "w"), N("xw", "Mul", "x", "w"), N("y", "Add", "fw", "xw")],
              inputs={"x": 3 * X, "w": W})
WHERE = Graph(
    [N("c", "Greater", "x", "zero"), N("xw", "Mul", "x", "w"), N("e", "Exp", "x"), N("y", "Where", "c", "xw", "e")],
    inputs={"x": X, "w": W}, inits={"zero": np.float64(0.0)},
)
GATHER = Graph([N("h", "Mul", "x", "w"), N("y", "Gather", "h", "idx", axis=1), N("z", "Gather", "h", "rows", axis=0)],
               inputs={"x": X, "w": W},
               inits={"idx": np.array([2, 0, 2, 2], dtype=np.int64), "rows": np.array([1, 1, 0], dtype=np.int64)},
               outputs=["y", "z"])
CONCAT = Graph([N("h", "Mul", "x", "w"), N("c", "Concat", "h", "v", "x", axis=1), N("y", "Tanh", "c")],
               inputs={"x": X, "w": W, "v": V})
TOPK = Graph([N("h", "Mul", "x", "w"), N(("vals", "idx"), "TopK", "h", "k"), N("y", "Mul", "vals", "vals")],
             inputs={"x": X, "w": W}, inits={"k": np.array([2], dtype=np.int64)})
RELU = Graph([N("h", "Mul", "x", "w"), N("r", "Relu", "h"), N("y", "Transpose", "r", perm=[1, 0])],
             inputs={"x": X, "w": W})


def at_opset(g: Graph, opset: int) -> Graph:
    return Graph(g.nodes, g.inputs, g.inits, g.consts, g.outputs, opset, g.dynamic)


def dyn(g: Graph) -> Graph:
    """The same graph with the leading dimension of every input symbolic (TF: None)."""
    return Graph(g.nodes, g.inputs, g.inits, g.consts, g.outputs, g.opset, dynamic=True)


ROWS = [
    # grad_ys
    Row("grad-ys-default-ones", TANH, [Call(["y"], ["x", "w"])]),
    Row("grad-ys-array", TANH, [Call(["y"], ["x", "w"], grad_ys=[G23])]),
    Row("grad-ys-fed-at-run-time", TANH, [Call(["y"], ["x", "w"], grad_ys=[Fed(G23)])]),
    Row("grad-ys-value-of-graph", Graph(TANH.nodes, {**TANH.inputs, "g": G23}),
        [Call(["y"], ["x", "w"], grad_ys=["g"])]),
    Row("grad-ys-mixed-none-and-array", CHAIN, [Call(["y1", "y2"], ["x", "w"], grad_ys=[None, G23])]),
    Row("grad-ys-default-dynamic-batch", dyn(TANH), [Call(["y"], ["x", "w"])]),
    Row("grad-ys-fed-dynamic-batch", dyn(TANH), [Call(["y"], ["x", "w"], grad_ys=[Fed(G23)])]),
    # several ys, dependent ys
    Row("several-ys", CHAIN, [Call(["y2", "e"], ["x", "w", "v"])]),
    Row("dependent-ys", CHAIN, [Call(["y1", "y2"], ["x", "w", "v"])]),
    Row("dependent-ys-reversed", CHAIN, [Call(["y2", "y1"], ["x", "w"], grad_ys=[G23b, G23])]),
    Row("dependent-ys-wrt-intermediate", CHAIN, [Call(["y1", "y2"], ["y1", "e"])]),
    # stop_gradients
    Row("stop-intermediate", INTER, [Call(["y"], ["x", "w"], stop_gradients=["h"])]),
    Row("stop-intermediate-and-xs-below", INTER, [Call(["y"], ["x", "w", "h"], stop_gradients=["h"])]),
    Row("stop-all-xs-partial-derivative", DOC, [Call(["s"], ["a", "b"], stop_gradients=["a", "b"])]),
    Row("stop-on-graph-input-x", DOC, [Call(["s"], ["a", "b"], stop_gradients=["a"])]),
    Row("stop-on-intermediate-x", DOC, [Call(["s"], ["a", "b"], stop_gradients=["b"])]),
    Row("stop-on-y", CHAIN, [Call(["y1", "y2"], ["x", "y1", "e"], stop_gradients=["y2"])]),
    Row("stop-cuts-everything-none", INTER, [Call(["th"], ["x", "w"], stop_gradients=["h"])]),
    Row("stop-cuts-everything-zero", INTER,
        [Call(["th"], ["x", "w"], stop_gradients=["h"], unconnected_gradients="zero")]),
    Row("stop-marker-in-graph", INTER, [Call(["y"], ["x", "w"])], markers=("h",)),
    Row("stop-marker-and-stop-gradients", CHAIN, [Call(["y2"], ["x", "w", "v"], stop_gradients=["e"])],
        markers=("y1",)),
    # integer pruning
    Row("integer-path-contributes-nothing", INTPATH, [Call(["y"], ["x", "w", "v"])]),
    Row("integer-path-only-none", INTONLY, [Call(["z"], ["x", "w"])]),
    Row("integer-path-only-zero", INTONLY, [Call(["z"], ["x", "w"], unconnected_gradients="zero")]),
    Row("integer-y", INTONLY, [Call(["xi"], ["x"])]),
    Row("integer-bool-where-condition", WHERE, [Call(["y"], ["x", "w"])]),
    Row("integer-gather-indices", GATHER, [Call(["y", "z"], ["x", "w", "h"])]),
    Row("integer-topk-indices", TOPK, [Call(["y"], ["x", "w"])]),
    Row("floor-contributes-nothing", FLOOR, [Call(["y"], ["x", "w"])]),
    Row("floor-only-none", FLOOR, [Call(["fw"], ["x", "w"])]),
    Row("floor-only-zero", FLOOR, [Call(["fw"], ["x", "w"], unconnected_gradients="zero")]),
    Row("concat-several-inputs", CONCAT, [Call(["y"], ["x", "w", "v"])]),
    Row("relu-transpose", RELU, [Call(["y"], ["x", "w"], grad_ys=[G23.T])]),
    # unconnected
    Row("unconnected-none", CHAIN, [Call(["y1"], ["x", "v", "w"])]),
    Row("unconnected-zero", CHAIN, [Call(["y1"], ["x", "v", "w"], unconnected_gradients="zero")]),
    Row("unconnected-downstream-x-none", CHAIN, [Call(["y1"], ["e", "y2"])]),
    Row("unconnected-downstream-x-zero", CHAIN, [Call(["y1"], ["e", "y2"], unconnected_gradients="zero")]),
    Row("unconnected-zero-dynamic-batch", dyn(CHAIN), [Call(["y1"], ["v"], unconnected_gradients="zero")]),
    # aggregation methods (values agree)
    *(Row(f"aggregation-{m}", FANOUT, [Call(["y"], ["x", "w", "h"], aggregation_method=m)])
      for m in ("add_n", "default", "experimental_tree", "experimental_accumulate_n")),
    Row("aggregation-tree-duplicate-ys", FANOUT,
        [Call(["y", "y", "h"], ["x"], aggregation_method="experimental_tree")]),
    # an x that is also a y
    Row("x-is-y", TANH, [Call(["y"], ["y"])]),
    Row("x-is-y-with-grad-ys", TANH, [Call(["y"], ["y", "x"], grad_ys=[G23])]),
    Row("x-is-y-and-feeds-another-y", CHAIN, [Call(["y1", "y2"], ["y1"], grad_ys=[G23, G23b])]),
    Row("x-is-graph-input-and-y", TANH, [Call(["x", "y"], ["x"])]),
    Row("x-is-y-and-stopped", TANH, [Call(["y"], ["y", "x"], stop_gradients=["y"])]),
    Row("y-is-graph-input-not-x", TANH, [Call(["x"], ["w", "x"])]),
    # duplicates
    Row("duplicate-xs", TANH, [Call(["y"], ["x", "w", "x"])]),
    Row("duplicate-ys", TANH, [Call(["y", "y"], ["x", "w"])]),
    Row("duplicate-ys-with-grad-ys", TANH, [Call(["y", "y"], ["x", "w"], grad_ys=[G23, G23b])]),
    Row("duplicate-ys-fed-seeds", TANH, [Call(["y", "y"], ["x"], grad_ys=[Fed(G23), Fed(G23b)])]),
    Row("duplicate-ys-array-seeds", TANH, [Call(["y", "y"], ["x"], grad_ys=[G23, G23b])]),
    # broadcasting
    Row("broadcast-add-mul", BCAST, [Call(["y"], ["x", "w", "s", "c", "m"])]),
    Row("broadcast-add-mul-dynamic-batch", dyn(TANH), [Call(["y"], ["w"])]),
    Row("broadcast-intermediates", BCAST, [Call(["y"], ["a", "b", "c2"])]),
    # xs that are intermediates: the total derivative
    Row("intermediate-xs-total-derivative", INTER, [Call(["y"], ["x", "h", "w"])]),
    Row("doc-total-derivative-fed-a", DOC, [Call(["s"], ["a", "b"])]),
    Row("identity-of-x-total-derivative", Graph([N("i", "Identity", "x"), N("y", "Mul", "i", "x")], {"x": X}),
        [Call(["y"], ["x", "i"])]),
    Row("small-layer", MLP, [Call(["y"], ["x", "W1", "W2", "z", "a"])]),
    Row("small-layer-dynamic-batch", dyn(MLP), [Call(["y"], ["W1", "W2", "a"])]),
    # older opsets (axes as attributes, no ConstantOfShape before 9, no Expand before 8)
    Row("opset-11-small-layer", MLP11, [Call(["y"], ["x", "W1", "W2", "a"])]),
    Row("opset-11-small-layer-dynamic-batch", dyn(MLP11), [Call(["y"], ["W1", "W2", "a"])]),
    Row("opset-8-zero-dynamic-batch", at_opset(dyn(CHAIN), 8),
        [Call(["y1"], ["x", "v", "w"], unconnected_gradients="zero")]),
    Row("opset-7-broadcast-grad-ys-fed", at_opset(dyn(TANH), 7), [Call(["y"], ["x", "w"], grad_ys=[Fed(G23)])]),
    Row("opset-13-aggregation-tree", at_opset(FANOUT, 13),
        [Call(["y"], ["x", "w"], aggregation_method="experimental_tree")]),
    # name scopes
    Row("name-default", TANH, [Call(["y"], ["x"])]),
    Row("name-second-call", TANH, [Call(["y"], ["x"]), Call(["y"], ["x", "w"])]),
    Row("name-third-call-custom-then-default", TANH,
        [Call(["y"], ["x"], name="grads"), Call(["y"], ["w"], name="grads"), Call(["y"], ["x"])]),
    Row("name-taken-by-a-value", TAKEN, [Call(["y"], ["x", "w"])]),
    # documented difference: stop_gradients stops a value, TF stops its whole producing op
    Row("stop-one-output-of-multi-output-op", SPLIT, [Call(["y"], ["x", "w"], stop_gradients=["p"])],
        diverges="stop_gradients is per value; TF stops the whole producing op (Split)"),
]


def _compare(row: Row, got: list[list[np.ndarray | None]], want: list[list[np.ndarray | None]]) -> None:
    for k, (gs, ws) in enumerate(zip(got, want, strict=True)):
        for x, g, w in zip(row.calls[k].xs, gs, ws, strict=True):
            where = f"{row.id}: call {k}, d/d{x}"
            assert (g is None) == (w is None), f"{where}: onnxgrad {'None' if g is None else 'a value'}, TF {w}"
            if g is None or w is None:
                continue
            assert g.dtype == w.dtype, f"{where}: dtype {g.dtype} vs TF {w.dtype}"
            assert g.shape == w.shape, f"{where}: shape {g.shape} vs TF {w.shape}"
            np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-12, err_msg=where)


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_matches_tensorflow(row: Row) -> None:
    got, got_scopes = onnx_gradients(row)
    want, want_scopes = tf_gradients(tf_variant(row) if row.diverges else row)
    _compare(row, got, want)
    for k, (a, b) in enumerate(zip(got_scopes, want_scopes, strict=True)):
        # TF may add nothing where onnxgrad adds a zeros Constant, or the reverse; never another scope
        assert a == b or not a or not b, f"{row.id}: call {k} added under {sorted(a)}, TF under {sorted(b)}"
        assert len(a) <= 1, f"{row.id}: call {k} added values under several scopes {sorted(a)}"
    if row.diverges:
        plain, _ = tf_gradients(row)
        with pytest.raises(AssertionError):
            _compare(row, got, plain)


def test_scope_names_follow_tensorflow() -> None:
    """The scope of each call, explicitly: gradients, gradients_1, grads, grads_1, gradients_2."""
    row = Row("scopes", TANH, [Call(["y"], ["x"]), Call(["y"], ["x"]), Call(["y"], ["x"], name="grads"),
                               Call(["y"], ["x"], name="grads"), Call(["y"], ["w"])])
    _, got = onnx_gradients(row)
    _, want = tf_gradients(row)
    expected = [{"gradients"}, {"gradients_1"}, {"grads"}, {"grads_1"}, {"gradients_2"}]
    assert got == expected
    assert want == expected
