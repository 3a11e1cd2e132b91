"""A generator of random valid ONNX graphs for differential testing, and its two oracles.

A graph is a plain ``GraphSpec`` (so failures shrink and can be kept as regression rows): inputs with
shapes that broadcast, a DAG of ops drawn from a pool that has float64 kernels in onnxruntime, fan-out,
integer side paths (float -> int -> float, comparisons feeding Where), stop-gradient sets and unconnected
xs. Every spec is checked against central differences (float64) and against PyTorch autograd, which
interprets the same spec independently of onnxgrad."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import torch
from hypothesis import strategies as st
from onnx import TensorProto as TP
from onnx import helper as oh

from onnxgrad import add_gradients
from onnxgrad.check import cut_at
from onnxgrad.runtime import run, session

Shape = tuple[int, ...]
UNARY = ["Tanh", "Sigmoid", "Neg", "Relu", "Abs", "Sin", "Cos", "Identity", "ExpT", "LogP", "SqrtP", "IntPath"]
BINARY = ["Add", "Sub", "Mul", "Max", "Min", "DivP", "WhereGt"]
OTHER = ["MatMul", "ReduceSum", "ReduceMean", "Softmax", "Transpose", "Reshape", "Concat", "HalfSwap", "GatherSplit"]
# HalfSwap: Concat(-x[h:], x[:h]) along an axis of even size (rotary embeddings' rotate_half: its gradient sums
# zero-padded halves); GatherSplit: x[..., 0, ...] * x[..., 1, ...] + x[..., 2, ...] by Gathers of constant indices
# along an axis (a fused q/k/v split: scattered pieces, transposed back where the axis is not the first)
# If: sin(a * b) or tanh(a) + b; Loop: k trips of tanh(h * b); LoopList: the same, each h appended to a sequence
# (SequenceEmpty, SequenceInsert; opset 13+), stacked and summed after; LoopCat: the same, each h concatenated onto a
# tensor that starts as a (a carry that grows: torch.cat in a scripted loop), summed after; Scan over axis 0
CONTROL = ["If", "Loop", "LoopList", "LoopCat", "Scan"]
OPSETS = [11, 13, 17, 18]
KINKS = {"Relu", "Abs", "Max", "Min", "WhereGt", "IntPath"}


@dataclass
class GraphSpec:
    """Values are numbered: inputs first, then one output per node, in order."""

    opset: int
    inputs: list[Shape]
    nodes: list[tuple[str, tuple[int, ...], dict[str, Any]]] = field(default_factory=list)
    ys: list[int] = field(default_factory=list)
    xs: list[int] = field(default_factory=list)
    stop: list[int] = field(default_factory=list)
    seed: int = 0


def broadcast(a: Shape, b: Shape) -> Shape | None:
    try:
        return tuple(np.broadcast_shapes(a, b))
    except ValueError:
        return None


@st.composite
def graph_specs(draw: st.DrawFn, max_nodes: int = 8) -> GraphSpec:
    """A random valid graph spec."""
    opset = draw(st.sampled_from(OPSETS))
    base = draw(st.lists(st.integers(1, 3), min_size=0, max_size=3).map(tuple))
    n_inputs = draw(st.integers(1, 3))
    inputs: list[Shape] = []
    for _ in range(n_inputs):
        # a suffix of the base shape with some dims set to 1: broadcasts against base
        k = draw(st.integers(0, len(base)))
        shape = tuple(1 if draw(st.booleans()) and draw(st.booleans()) else d for d in base[len(base) - k:])
        inputs.append(shape)
    shapes: list[Shape] = list(inputs)
    spec = GraphSpec(opset, inputs, seed=draw(st.integers(0, 2**16)))
    for _ in range(draw(st.integers(1, max_nodes))):
        kind = draw(st.sampled_from(["u", "u", "b", "b", "o", "c"]))
        a = draw(st.integers(0, len(shapes) - 1))
        sa = shapes[a]
        if kind == "u":
            op = draw(st.sampled_from(UNARY))
            spec.nodes.append((op, (a,), {}))
            shapes.append(sa)
            continue
        if kind == "b":
            op = draw(st.sampled_from(BINARY))
            partners = [i for i, s in enumerate(shapes) if broadcast(sa, s) is not None]
            b = draw(st.sampled_from(partners))
            spec.nodes.append((op, (a, b), {}))
            shapes.append(broadcast(sa, shapes[b]))  # type: ignore[arg-type]
            continue
        if kind == "c":
            op = draw(st.sampled_from(CONTROL))
            if op == "LoopList" and spec.opset < 13:  # Loop carries sequences from opset 13
                op = "Loop"
            if op == "Scan":
                if not sa or sa[0] < 1:
                    continue
                spec.nodes.append(("Scan", (a,), {"reverse": draw(st.integers(0, 1)), "shape": list(sa)}))
                shapes.append(sa)
                continue
            partners = [i for i, s in enumerate(shapes) if broadcast(sa, s) == sa]  # b read inside the body
            b = draw(st.sampled_from(partners))
            attrs: dict[str, Any] = {"shape": list(sa)}
            if op in ("Loop", "LoopCat"):
                attrs["trips"] = draw(st.integers(0, 3))
            elif op == "LoopList":  # at least one element: ConcatFromSequence refuses an empty sequence
                attrs["trips"] = draw(st.integers(1, 3))
            spec.nodes.append((op, (a, b), attrs))
            shapes.append(sa)
            continue
        op = draw(st.sampled_from(OTHER))
        rank = len(sa)
        if op == "MatMul":
            if rank < 1:
                continue
            n = draw(st.integers(1, 3))
            w = len(shapes)
            spec.inputs.append((sa[-1], n))
            # inputs must stay first: renumbering is avoided by adding weights as constants-as-inputs later
            spec.nodes.append(("MatMulW", (a,), {"n": n, "k": sa[-1], "w": w}))
            shapes.append((*sa[:-1], n) if rank >= 2 else (n,))
            spec.inputs.pop()
            continue
        if op in ("ReduceSum", "ReduceMean"):
            axes = sorted(set(draw(st.lists(st.integers(0, max(rank - 1, 0)), max_size=rank)))) if rank else []
            keep = draw(st.integers(0, 1))
            if not axes:
                out = tuple(1 for _ in sa) if keep else ()
                axes_attr: list[int] = []
            else:
                out = tuple(1 if i in axes else d for i, d in enumerate(sa)) if keep else tuple(
                    d for i, d in enumerate(sa) if i not in axes)
                axes_attr = axes
            spec.nodes.append((op, (a,), {"axes": axes_attr, "keepdims": keep}))
            shapes.append(out)
            continue
        if op == "Softmax":
            if rank < 1:
                continue
            spec.nodes.append((op, (a,), {"axis": draw(st.integers(-rank, rank - 1))}))
            shapes.append(sa)
            continue
        if op == "Transpose":
            if rank < 1:
                continue
            perm = draw(st.permutations(list(range(rank))))
            spec.nodes.append((op, (a,), {"perm": list(perm)}))
            shapes.append(tuple(sa[p] for p in perm))
            continue
        if op == "Reshape":
            spec.nodes.append((op, (a,), {"shape": [-1]}))
            shapes.append((int(np.prod(sa)),))
            continue
        if op == "HalfSwap":
            even = [i for i, d in enumerate(sa) if d % 2 == 0]
            if not even:
                continue
            spec.nodes.append((op, (a,), {"axis": draw(st.sampled_from(even)), "half": 0}))
            spec.nodes[-1][2]["half"] = sa[spec.nodes[-1][2]["axis"]] // 2
            shapes.append(sa)
            continue
        if op == "GatherSplit":
            wide = [i for i, d in enumerate(sa) if d >= 2]
            if not wide:
                continue
            axis = draw(st.sampled_from(wide))
            spec.nodes.append((op, (a,), {"axis": axis, "pieces": min(sa[axis], 3)}))
            shapes.append(tuple(d for i, d in enumerate(sa) if i != axis))
            continue
        if op == "Concat":
            if rank < 1:
                continue
            same = [i for i, s in enumerate(shapes) if len(s) == rank and all(
                x == y for j, (x, y) in enumerate(zip(s, sa, strict=True)) if j != 0)]
            b = draw(st.sampled_from(same))
            spec.nodes.append((op, (a, b), {"axis": 0}))
            shapes.append((sa[0] + shapes[b][0], *sa[1:]))
    n_values = len(shapes)
    if n_values == len(spec.inputs):
        spec.nodes.append(("Tanh", (0,), {}))
        n_values += 1
    outs = list(range(len(spec.inputs), n_values))
    spec.ys = sorted(set(draw(st.lists(st.sampled_from(outs), min_size=1, max_size=2))))
    candidates = list(range(n_values))
    spec.xs = draw(st.lists(st.sampled_from(candidates), min_size=1, max_size=3))
    spec.stop = sorted(set(draw(st.lists(st.sampled_from(candidates), max_size=1))))
    return spec


def value_name(i: int) -> str:
    return f"v{i}"


def to_onnx(spec: GraphSpec) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    """The spec as an ONNX model (float64) and random feeds for its inputs."""
    rng = np.random.default_rng(spec.seed)
    nodes: list[onnx.NodeProto] = []
    inits: list[onnx.TensorProto] = []
    k = len(spec.inputs)
    aux = 0

    def tmp() -> str:
        nonlocal aux
        aux += 1
        return f"t{aux}"

    def const(value: Any, dtype: Any = np.float64) -> str:
        name = tmp()
        inits.append(onnx.numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    for idx, (op, args, attrs) in enumerate(spec.nodes):
        out = value_name(k + idx)
        ins = [value_name(a) for a in args]
        if op in ("Tanh", "Sigmoid", "Neg", "Relu", "Abs", "Sin", "Cos", "Identity", "Add", "Sub", "Mul", "Max",
                  "Min"):
            nodes.append(oh.make_node(op, ins, [out]))
        elif op == "ExpT":
            t = tmp()
            nodes += [oh.make_node("Tanh", ins, [t]), oh.make_node("Exp", [t], [out])]
        elif op in ("LogP", "SqrtP"):
            t, u = tmp(), tmp()
            nodes += [oh.make_node("Mul", [ins[0], ins[0]], [t]), oh.make_node("Add", [t, const(1.0)], [u]),
                      oh.make_node("Log" if op == "LogP" else "Sqrt", [u], [out])]
        elif op == "DivP":
            t, u = tmp(), tmp()
            nodes += [oh.make_node("Mul", [ins[1], ins[1]], [t]), oh.make_node("Add", [t, const(1.0)], [u]),
                      oh.make_node("Div", [ins[0], u], [out])]
        elif op == "WhereGt":
            c = tmp()
            nodes += [oh.make_node("Greater", ins, [c]), oh.make_node("Where", [c, ins[0], ins[1]], [out])]
        elif op == "IntPath":
            # float -> int -> float: contributes nothing to any gradient
            i, f = tmp(), tmp()
            nodes += [oh.make_node("Cast", ins, [i], to=TP.INT64), oh.make_node("Cast", [i], [f], to=TP.DOUBLE),
                      oh.make_node("Add", [ins[0], f], [out])]
        elif op == "MatMulW":
            w = const(rng.standard_normal((attrs["k"], attrs["n"])))
            nodes.append(oh.make_node("MatMul", [ins[0], w], [out]))
        elif op in ("ReduceSum", "ReduceMean"):
            axes = attrs["axes"]
            as_input = spec.opset >= (13 if op == "ReduceSum" else 18)
            if as_input:
                node_ins = [ins[0], const(axes, np.int64)] if axes else [ins[0]]
                nodes.append(oh.make_node(op, node_ins, [out], keepdims=attrs["keepdims"]))
            elif axes:
                nodes.append(oh.make_node(op, ins, [out], axes=axes, keepdims=attrs["keepdims"]))
            else:
                nodes.append(oh.make_node(op, ins, [out], keepdims=attrs["keepdims"]))
        elif op == "Softmax":
            nodes.append(oh.make_node(op, ins, [out], axis=attrs["axis"]))
        elif op == "Transpose":
            nodes.append(oh.make_node(op, ins, [out], perm=attrs["perm"]))
        elif op == "Reshape":
            nodes.append(oh.make_node(op, [ins[0], const(attrs["shape"], np.int64)], [out]))
        elif op == "Concat":
            nodes.append(oh.make_node(op, ins, [out], axis=attrs["axis"]))
        elif op == "HalfSwap":
            ax, h = attrs["axis"], attrs["half"]
            first, second, neg = tmp(), tmp(), tmp()
            for part, (b, e) in ((first, (0, h)), (second, (h, 2 * h))):
                if spec.opset >= 10:
                    nodes.append(oh.make_node("Slice", [ins[0], const([b], np.int64), const([e], np.int64),
                                                        const([ax], np.int64)], [part]))
                else:  # pragma: no cover (the fuzz opsets start at 11)
                    nodes.append(oh.make_node("Slice", ins, [part], starts=[b], ends=[e], axes=[ax]))
            nodes += [oh.make_node("Neg", [second], [neg]), oh.make_node("Concat", [neg, first], [out], axis=ax)]
        elif op == "GatherSplit":
            ax, n = attrs["axis"], attrs["pieces"]
            pieces = [tmp() for _ in range(n)]
            for i, piece in enumerate(pieces):
                nodes.append(oh.make_node("Gather", [ins[0], const(i, np.int64)], [piece], axis=ax))
            if n == 2:
                nodes.append(oh.make_node("Mul", pieces, [out]))
            else:
                prod = tmp()
                nodes += [oh.make_node("Mul", pieces[:2], [prod]), oh.make_node("Add", [prod, pieces[2]], [out])]
        elif op in CONTROL:
            nodes += _control_nodes(op, ins, out, {**attrs, "opset": spec.opset}, const)
        else:  # pragma: no cover
            raise AssertionError(op)
    # onnx's inference gives Loop outputs no shape (as exporters do, the model states them)
    control = {k + i: attrs["shape"] for i, (op, _, attrs) in enumerate(spec.nodes) if op in CONTROL}
    graph = oh.make_graph(
        nodes, "fuzz", [oh.make_tensor_value_info(value_name(i), TP.DOUBLE, list(s)) for i, s in
                        enumerate(spec.inputs)],
        [oh.make_value_info(value_name(y), onnx.TypeProto()) if y not in control else
         oh.make_tensor_value_info(value_name(y), TP.DOUBLE, control[y]) for y in spec.ys], inits,
        value_info=[oh.make_tensor_value_info(value_name(v), TP.DOUBLE, d) for v, d in control.items()
                    if v not in spec.ys] + [vi for i, (op, _, attrs) in enumerate(spec.nodes)
                                            if op in ("LoopList", "LoopCat")
                                            for vi in _list_loop_types(value_name(k + i), attrs, op)])
    model = onnx.shape_inference.infer_shapes(
        oh.make_model(graph, opset_imports=[oh.make_opsetid("", spec.opset)], ir_version=8), strict_mode=True)
    feeds = {value_name(i): rng.standard_normal(s) for i, s in enumerate(spec.inputs)}
    return model, feeds


def _list_loop_types(out: str, attrs: dict[str, Any], op: str) -> list[onnx.ValueInfoProto]:
    """The types of a LoopList's or LoopCat's inner values, which onnx's inference leaves without one."""
    shape, p = list(attrs["shape"]), f"{out}_"
    stacked = p + ("st" if op == "LoopList" else "rT")
    return [oh.make_tensor_value_info(p + "hT", TP.DOUBLE, shape),
            oh.make_tensor_value_info(stacked, TP.DOUBLE, [attrs["trips"] + (op == "LoopCat"), *shape])]


def _control_nodes(op: str, ins: list[str], out: str, attrs: dict[str, Any], const: Any) -> list[onnx.NodeProto]:
    """An If, Loop or Scan node (and what feeds it) whose bodies read outer values; ``shape``: the first input's."""
    shape = list(attrs["shape"])
    typed = lambda name, dims: oh.make_tensor_value_info(name, TP.DOUBLE, dims)  # noqa: E731
    p = f"{out}_"
    if op == "If":
        s, c = p + "s", p + "c"
        then = oh.make_graph([oh.make_node("Mul", ins, [p + "m"]), oh.make_node("Sin", [p + "m"], [p + "t"])],
                             p + "then", [], [typed(p + "t", shape)])
        other = oh.make_graph([oh.make_node("Tanh", [ins[0]], [p + "e"]), oh.make_node("Add", [p + "e", ins[1]],
                               [p + "f"])], p + "else", [], [typed(p + "f", shape)])
        return [oh.make_node("ReduceSum", [ins[0]], [s], keepdims=0), oh.make_node("Greater", [s, const(0.0)], [c]),
                oh.make_node("If", [c], [out], then_branch=then, else_branch=other)]
    if op == "Loop":
        body = oh.make_graph([oh.make_node("Mul", [p + "h", ins[1]], [p + "m"]),
                              oh.make_node("Tanh", [p + "m"], [p + "hn"]),
                              oh.make_node("Identity", [p + "c"], [p + "co"])], p + "body",
                             [oh.make_tensor_value_info(p + "i", TP.INT64, []),
                              oh.make_tensor_value_info(p + "c", TP.BOOL, []), typed(p + "h", shape)],
                             [oh.make_tensor_value_info(p + "co", TP.BOOL, []), typed(p + "hn", shape)])
        return [oh.make_node("Loop", [const(attrs["trips"], np.int64), "", ins[0]], [out], body=body)]
    if op == "LoopList":
        seq = lambda name: oh.make_tensor_sequence_value_info(name, TP.DOUBLE, shape)  # noqa: E731
        body = oh.make_graph([oh.make_node("Mul", [p + "h", ins[1]], [p + "m"]),
                              oh.make_node("Tanh", [p + "m"], [p + "hn"]),
                              oh.make_node("SequenceInsert", [p + "s", p + "hn"], [p + "sn"]),
                              oh.make_node("Identity", [p + "c"], [p + "co"])], p + "body",
                             [oh.make_tensor_value_info(p + "i", TP.INT64, []),
                              oh.make_tensor_value_info(p + "c", TP.BOOL, []), typed(p + "h", shape), seq(p + "s")],
                             [oh.make_tensor_value_info(p + "co", TP.BOOL, []), typed(p + "hn", shape),
                              seq(p + "sn")])
        summed = oh.make_node("ReduceSum", [p + "st", const([0], np.int64)], [out], keepdims=0) \
            if attrs["opset"] >= 13 else oh.make_node("ReduceSum", [p + "st"], [out], axes=[0], keepdims=0)
        return [oh.make_node("SequenceEmpty", [], [p + "s0"], dtype=TP.DOUBLE),
                oh.make_node("Loop", [const(attrs["trips"], np.int64), "", ins[0], p + "s0"], [p + "hT", p + "sT"],
                             body=body),
                oh.make_node("ConcatFromSequence", [p + "sT"], [p + "st"], axis=0, new_axis=1), summed]
    if op == "LoopCat":
        def unsqueezed(x: str, y: str) -> onnx.NodeProto:
            if attrs["opset"] >= 13:
                return oh.make_node("Unsqueeze", [x, const([0], np.int64)], [y])
            return oh.make_node("Unsqueeze", [x], [y], axes=[0])
        body = oh.make_graph([oh.make_node("Mul", [p + "h", ins[1]], [p + "m"]),
                              oh.make_node("Tanh", [p + "m"], [p + "hn"]), unsqueezed(p + "hn", p + "u"),
                              oh.make_node("Concat", [p + "r", p + "u"], [p + "rn"], axis=0),
                              oh.make_node("Identity", [p + "c"], [p + "co"])], p + "body",
                             [oh.make_tensor_value_info(p + "i", TP.INT64, []),
                              oh.make_tensor_value_info(p + "c", TP.BOOL, []), typed(p + "h", shape),
                              typed(p + "r", [None, *shape])],
                             [oh.make_tensor_value_info(p + "co", TP.BOOL, []), typed(p + "hn", shape),
                              typed(p + "rn", [None, *shape])])
        summed = oh.make_node("ReduceSum", [p + "rT", const([0], np.int64)], [out], keepdims=0) \
            if attrs["opset"] >= 13 else oh.make_node("ReduceSum", [p + "rT"], [out], axes=[0], keepdims=0)
        return [unsqueezed(ins[0], p + "r0"),
                oh.make_node("Loop", [const(attrs["trips"], np.int64), "", ins[0], p + "r0"], [p + "hT", p + "rT"],
                             body=body), summed]
    body = oh.make_graph([oh.make_node("Mul", [p + "s", p + "x"], [p + "m"]), oh.make_node("Add", [p + "m", p + "x"],
                          [p + "a"]), oh.make_node("Tanh", [p + "a"], [p + "sn"]),
                          oh.make_node("Identity", [p + "sn"], [p + "y"])], p + "body",
                         [typed(p + "s", shape[1:]), typed(p + "x", shape[1:])],
                         [typed(p + "sn", shape[1:]), typed(p + "y", shape[1:])])
    return [oh.make_node("Scan", [const(np.ones(shape[1:])), ins[0]], [p + "last", out], body=body,
                         num_scan_inputs=1, scan_input_directions=[attrs["reverse"]])]


def _torch_control(op: str, xs: list[torch.Tensor], attrs: dict[str, Any]) -> torch.Tensor:
    if op == "If":
        return torch.sin(xs[0] * xs[1]) if float(xs[0].detach().sum()) > 0 else torch.tanh(xs[0]) + xs[1]
    if op == "Loop":
        h = xs[0]
        for _ in range(attrs["trips"]):
            h = torch.tanh(h * xs[1])
        return h * 1
    if op == "LoopList":
        h, outs = xs[0], []
        for _ in range(attrs["trips"]):
            h = torch.tanh(h * xs[1])
            outs.append(h)
        return torch.stack(outs).sum(0)
    if op == "LoopCat":
        h, grown = xs[0], xs[0][None]
        for _ in range(attrs["trips"]):
            h = torch.tanh(h * xs[1])
            grown = torch.cat((grown, h[None]), 0)
        return grown.sum(0)
    s = torch.ones(xs[0].shape[1:], dtype=xs[0].dtype)
    steps = range(xs[0].shape[0] - 1, -1, -1) if attrs["reverse"] else range(xs[0].shape[0])
    outs = []
    for t in steps:
        s = torch.tanh(s * xs[0][t] + xs[0][t])
        outs.append(s)
    return torch.stack(outs)


def torch_eval(spec: GraphSpec, feeds: dict[str, np.ndarray], weights: list[np.ndarray]) -> list[torch.Tensor]:
    """Evaluate the spec in PyTorch; stopped values are detached (and become leaves of their own)."""
    vals: list[torch.Tensor] = []
    wi = iter(weights)

    def put(i: int, t: torch.Tensor) -> None:
        if i in spec.stop:
            t = t.detach().requires_grad_(True)
        vals.append(t)

    for i in range(len(spec.inputs)):
        put(i, torch.tensor(feeds[value_name(i)], requires_grad=True))
    unary = {"Tanh": torch.tanh, "Sigmoid": torch.sigmoid, "Neg": torch.neg, "Relu": torch.relu, "Abs": torch.abs,
             "Sin": torch.sin, "Cos": torch.cos, "Identity": torch.clone, "ExpT": lambda t: torch.exp(torch.tanh(t)),
             "LogP": lambda t: torch.log(t * t + 1), "SqrtP": lambda t: torch.sqrt(t * t + 1),
             "IntPath": lambda t: t + torch.trunc(t).detach()}
    binary = {"Add": torch.add, "Sub": torch.sub, "Mul": torch.mul, "DivP": lambda a, b: a / (b * b + 1),
              "Max": _split_max, "Min": lambda a, b: -_split_max(-a, -b),
              "WhereGt": lambda a, b: torch.where(a > b, a, b)}
    for idx, (op, args, attrs) in enumerate(spec.nodes):
        xs = [vals[a] for a in args]
        if op in unary:
            out = unary[op](xs[0])
        elif op in binary:
            out = binary[op](xs[0], xs[1])
        elif op == "MatMulW":
            out = xs[0] @ torch.tensor(next(wi))
        elif op in ("ReduceSum", "ReduceMean"):
            axes = attrs["axes"] or list(range(xs[0].dim()))
            f = torch.sum if op == "ReduceSum" else torch.mean
            out = f(xs[0], dim=axes, keepdim=bool(attrs["keepdims"])) if axes else xs[0] * 1
            if not attrs["axes"] and xs[0].dim() == 0:
                out = xs[0] * 1
        elif op == "Softmax":
            out = torch.softmax(xs[0], dim=attrs["axis"]) if spec.opset >= 13 else _softmax_flat(xs[0], attrs["axis"])
        elif op == "Transpose":
            out = xs[0].permute(*attrs["perm"]) if attrs["perm"] else xs[0] * 1
        elif op == "Reshape":
            out = xs[0].reshape(-1)
        elif op == "Concat":
            out = torch.cat([xs[0], xs[1]], dim=0)
        elif op == "HalfSwap":
            first, second = torch.split(xs[0], attrs["half"], dim=attrs["axis"])
            out = torch.cat([-second, first], dim=attrs["axis"])
        elif op == "GatherSplit":
            pieces = [torch.select(xs[0], attrs["axis"], i) for i in range(attrs["pieces"])]
            out = pieces[0] * pieces[1] + (pieces[2] if len(pieces) == 3 else 0)
        elif op in CONTROL:
            out = _torch_control(op, xs, attrs)
        else:  # pragma: no cover
            raise AssertionError(op)
        put(len(spec.inputs) + idx, out)
    return vals


def _split_max(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.maximum(a, b)


def _softmax_flat(t: torch.Tensor, axis: int) -> torch.Tensor:
    axis = axis % t.dim()
    lead = t.shape[:axis]
    flat = t.reshape(*lead, -1) if axis else t.reshape(1, -1)
    return torch.softmax(flat, dim=-1).reshape(t.shape)


def check_spec(spec: GraphSpec) -> None:
    """onnxgrad's gradients agree with PyTorch autograd and with central differences."""
    model, feeds = to_onnx(spec)
    ys = [value_name(y) for y in spec.ys]
    xs = [value_name(x) for x in spec.xs]
    stop = [value_name(s) for s in spec.stop]
    aug = add_gradients(model, ys, xs, stop_gradients=stop or None, unconnected_gradients="zero")
    onnx.checker.check_model(aug.model, full_check=True)
    base = run(_with_outputs(model, [*xs, *ys]), feeds)
    got = run(aug.model, feeds)

    # PyTorch: the gradient of sum(ys) with respect to each x's tensor (the total derivative)
    vals = torch_eval(spec, feeds, _matmul_weights(model))
    loss = sum(vals[y].sum() for y in spec.ys)
    distinct = list(dict.fromkeys(spec.xs))
    tgrads = torch.autograd.grad(loss, [vals[x] for x in distinct], allow_unused=True)
    by_x = dict(zip(distinct, tgrads, strict=True))
    for x in spec.xs:
        want = by_x[x]
        want_np = np.zeros(np.shape(base[value_name(x)])) if want is None else want.numpy()
        have = got[aug.gradients[value_name(x)]]  # type: ignore[index]
        np.testing.assert_allclose(have, want_np, rtol=1e-9, atol=1e-9, err_msg=f"torch vs onnxgrad, x={x}")

    if any(op in KINKS for op, _, _ in spec.nodes):
        return  # central differences are meaningless across kinks; PyTorch's subgradients agree with ours
    if any(op == "If" and abs(float(vals[ins[0]].detach().sum())) < 1e-3 for op, ins, _ in spec.nodes):
        return  # an If's condition sum(a) > 0 at its boundary (a = x - x, say): the step would switch branches
    # central differences along a random direction, stopped values held at their base values
    rng = np.random.default_rng(spec.seed + 1)
    for x in dict.fromkeys(xs):
        cut = cut_at(model, [x, *[s for s in stop if s != x]])
        sess = session(cut)
        names = {i.name for i in sess.get_inputs()}
        stop_vals = run(_with_outputs(model, stop), feeds, stop) if stop else {}
        x0 = np.asarray(base[x])
        v = rng.standard_normal(x0.shape)
        h = 1e-6

        def loss_at(point: np.ndarray, sess: Any = sess, names: set[str] = names, x: str = x,
                    stop_vals: dict[str, np.ndarray] = stop_vals) -> float:
            f = {k: np.asarray(val) for k, val in {**feeds, **stop_vals, x: point}.items() if k in names}
            outs = run(sess, f, ys)
            return float(sum(np.sum(outs[y]) for y in ys))

        numeric = (loss_at(x0 + h * v) - loss_at(x0 - h * v)) / (2 * h)
        analytic = float(np.sum(got[aug.gradients[x]] * v))  # type: ignore[index]
        assert abs(numeric - analytic) <= 1e-5 * max(1.0, abs(numeric)), (
            f"central differences vs onnxgrad, x={x}: {numeric} vs {analytic}")


def _matmul_weights(model: onnx.ModelProto) -> list[np.ndarray]:
    init = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return [init[n.input[1]] for n in model.graph.node if n.op_type == "MatMul" and n.input[1] in init]


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output}
    inputs = {i.name: i for i in m.graph.input}
    for n in dict.fromkeys(names):
        if n not in have:
            m.graph.output.append(inputs[n] if n in inputs else oh.make_value_info(n, onnx.TypeProto()))
            have.add(n)
    return m
