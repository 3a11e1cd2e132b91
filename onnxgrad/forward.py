"""Forward mode: ``jvp()`` adds to a model the directional derivative ``J(x) v`` of each y along tangents v.

One tangent walk, in graph order, over the nodes between the primals and the ys. A node gets its output
tangents from a forward rule (``FORWARD``: the ops where that is cheaper than the reverse), or else from the
transpose of its VJP rule (TensorFlow's approach): the VJP ``u -> g_i(u)`` is linear in the cotangent u, so with
a stand-in u shaped like the output, ``s(u) = sum_i <g_i(u), t_i>`` and ``ds/du`` is the output tangent; the
one reverse walk (``backprop``) takes that derivative, and every use of the stand-in is then read from the
output itself, so no stand-in survives. Tangent nodes are placed right after the primal node they belong to;
the forward part is untouched."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

import onnxgrad.rules  # noqa: F401  (registers every rule)
from onnxgrad import registry
from onnxgrad.api import GradientNote, GradInput, UnconnectedGradients, _unconnected
from onnxgrad.backprop import Request, UndefinedGradient, _backward_reach, _forward_reach, backprop, gc_paused
from onnxgrad.emitter import Emitter, attr, implicit_inputs, is_float, rank_of, same_dim, static_dims, subgraphs
from onnxgrad.plans.normalization import standardize
from onnxgrad.registry import UNDEFINED, Undefined, opset_of
from onnxgrad.rules.activations import _sum_over_softmax_axes
from onnxgrad.rules.normalization import _standardize_back
from onnxgrad.rules.reductions import kept, reduced_axes
from onnxgrad.shapes import infer_node, shape_from, type_proto
from onnxgrad.validate import check_graph, check_versions
from onnxgrad.values import as_list, ensure_types, resolve, restore_types, unique_scope, value_table

Tan = ir.Value | None
Tans = Sequence[Tan]
Out = list[Tan]
ForwardFn = Callable[[Emitter, ir.Node, Tans], "Out | None"]  # None: not applicable here, use the fallback
TangentSpec = None | str | ir.Value | np.ndarray | GradInput

FORWARD: dict[str, ForwardFn] = {}


def forward_rule(*op_types: str) -> Callable[[ForwardFn], ForwardFn]:
    """Register ``fn(em, node, tangents_in) -> tangents_out`` (None per output: zero) for ``op_types``."""

    def deco(fn: ForwardFn) -> ForwardFn:
        for op in op_types:
            FORWARD[op] = fn
        return fn

    return deco


def path_for(op_type: str, domain: str = "") -> str:
    """'forward rule', 'transposed VJP' or '-' (no gradient rule at all): how jvp differentiates an op."""
    if registry.normalize_domain(domain) == "" and op_type in FORWARD:
        return "forward rule"
    return "transposed VJP"


# ------------------------------------------------------------------------------------------ helpers
def _x(node: ir.Node, i: int = 0) -> ir.Value:
    v = node.inputs[i]
    assert v is not None
    return v


def _same_shape(a: ir.Value, b: ir.Value) -> bool:
    return (a.shape is not None and b.shape is not None and len(a.shape) == len(b.shape)
            and all(same_dim(d, e) for d, e in zip(a.shape, b.shape, strict=True)))


def _fit(em: Emitter, t: Tan, out: ir.Value, sources: Sequence[ir.Value | None] = ()) -> Tan:
    """t (shaped like the broadcast of ``sources``, the inputs it came from) broadcast to out's run-time shape:
    a tangent always has its value's shape. No Expand where a source already has out's shape."""
    if t is None or any(v is not None and _same_shape(v, out) for v in sources):
        return t
    return em.expand(t, out)


def _with_tangents(node: ir.Node, t: Tans) -> list[ir.Value | None]:
    return [v for v, tv in zip(node.inputs, t, strict=False) if tv is not None]


def _attrs(node: ir.Node) -> dict[str, Any]:
    return {k: attr(node, k) for k, a in node.attributes.items()
            if a.type not in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)}


def _scaled(em: Emitter, t: Tan, factor: ir.Value) -> Tan:
    return None if t is None else em.Mul(t, factor)


# ---------------------------------------------------------------------------------- forward rules
@forward_rule("Identity", "Neg", "Reshape", "Transpose", "Squeeze", "Unsqueeze", "Flatten", "Expand", "Slice",
              "Gather", "GatherElements", "GatherND", "Tile", "ReduceSum", "ReduceMean", "DepthToSpace",
              "SpaceToDepth", "Split", "Compress", "Trilu", "ReverseSequence", "CumSum")
def linear_in_first(em: Emitter, node: ir.Node, t: Tans) -> Out | None:
    """t_y = op(t_x, *data): the op is linear in its first input, the others being data"""
    if t[0] is None or any(v is not None for v in t[1:]):
        return None
    outs = em.op(node.op_type, t[0], *node.inputs[1:], _outputs=len(node.outputs), **_attrs(node))
    return list(outs) if len(node.outputs) > 1 else [outs]


@forward_rule("Pad")
def pad(em: Emitter, node: ir.Node, t: Tans) -> Out | None:
    """t_y = Pad(t_x) with zeros (any mode: reflect and edge copy tangents as they copy values)"""
    if t[0] is None or any(v is not None for v in t[1:]):
        return None
    attrs = _attrs(node)
    if "value" in attrs:  # before opset 11
        attrs["value"] = 0.0
    data = list(node.inputs[1:])
    if len(data) > 1:
        data[1] = None  # constant_value: the tangent pads with zeros
    return [em.Pad(t[0], *data, **attrs)]


@forward_rule("Cast")
def cast(em: Emitter, node: ir.Node, t: Tans) -> Out | None:
    """t_y = Cast(t_x) between float types"""
    if t[0] is None or not is_float(node.outputs[0]):
        return [None]
    return [em.Cast(t[0], to=attr(node, "to"))]


@forward_rule("Add", "Sum")
def add(em: Emitter, node: ir.Node, t: Tans) -> Out:
    """t_y = sum_i t_i"""
    return [_fit(em, em.add_all(*t), node.outputs[0], _with_tangents(node, t))]


@forward_rule("Mean")
def mean(em: Emitter, node: ir.Node, t: Tans) -> Out:
    """t_y = sum_i t_i / n"""
    total = em.add_all(*t)
    y = node.outputs[0]
    return [None if total is None else _fit(em, em.Div(total, em.const(float(len(node.inputs)), like=y)), y,
                                            _with_tangents(node, t))]


@forward_rule("Sub")
def sub(em: Emitter, node: ir.Node, t: Tans) -> Out:
    """t_y = t_a - t_b"""
    ta, tb = t
    y = node.outputs[0]
    if tb is None:
        return [_fit(em, ta, y, node.inputs[:1])]
    return [_fit(em, em.Neg(tb) if ta is None else em.Sub(ta, tb), y, _with_tangents(node, t))]


@forward_rule("Mul")
def mul(em: Emitter, node: ir.Node, t: Tans) -> Out:
    """t_y = t_a * b + a * t_b"""
    a, b = _x(node), _x(node, 1)
    return [em.add_all(_scaled(em, t[0], b), _scaled(em, t[1], a))]


@forward_rule("Div")
def div(em: Emitter, node: ir.Node, t: Tans) -> Out:
    """t_y = (t_a - y * t_b) / b"""
    b, y = _x(node, 1), node.outputs[0]
    num = em.add_all(t[0], None if t[1] is None else em.Neg(em.Mul(y, t[1])))
    return [None if num is None else _fit(em, em.Div(num, b), y, [b, *_with_tangents(node, t)])]


@forward_rule("MatMul")
def matmul(em: Emitter, node: ir.Node, t: Tans) -> Out:
    """t_y = t_a @ b + a @ t_b"""
    a, b = _x(node), _x(node, 1)
    return [em.add_all(None if t[0] is None else em.MatMul(t[0], b), None if t[1] is None else em.MatMul(a, t[1]))]


@forward_rule("Gemm")
def gemm(em: Emitter, node: ir.Node, t: Tans) -> Out:
    """t_y = alpha (op(t_a) op(b) + op(a) op(t_b)) + beta t_c"""
    a, b, y = _x(node), _x(node, 1), node.outputs[0]
    ta, tb = attr(node, "transA", 0), attr(node, "transB", 0)
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    tc = t[2] if len(t) > 2 else None
    products = [em.gemm(t[0], b, ta, tb, alpha) if t[0] is not None else None,
                em.gemm(a, t[1], ta, tb, alpha) if t[1] is not None else None]
    c_term = None if tc is None else (tc if beta == 1.0 else em.Mul(tc, em.const(beta, like=tc)))
    full = [y] if any(p is not None for p in products) else node.inputs[2:3]
    return [_fit(em, em.add_all(*products, c_term), y, full)]


@forward_rule("Conv")
def conv(em: Emitter, node: ir.Node, t: Tans) -> Out | None:
    """t_y = Conv(t_x, w) + Conv(x, t_w) + t_b (Conv is linear in each argument)"""
    x, w, y = _x(node), _x(node, 1), node.outputs[0]
    r = rank_of(y)
    tb = t[2] if len(t) > 2 else None
    if tb is not None and r is None:
        return None
    attrs = _attrs(node)
    bias = None if tb is None else em.Reshape(tb, em.ints([1, -1] + [1] * (r - 2)))  # type: ignore[operator]
    convs = [em.Conv(t[0], w, **attrs) if t[0] is not None else None,
             em.Conv(x, t[1], **attrs) if t[1] is not None else None]
    return [_fit(em, em.add_all(*convs, bias), y, [y] if any(c is not None for c in convs) else [])]


@forward_rule("Concat")
def concat(em: Emitter, node: ir.Node, t: Tans) -> Out:
    """t_y = Concat(t_i), zeros for the inputs without a tangent"""
    if all(v is None for v in t):
        return [None]
    parts = [em.zeros_like(_x(node, i)) if v is None else v for i, v in enumerate(t)]
    return [em.Concat(*parts, axis=attr(node, "axis"))]


@forward_rule("Where")
def where(em: Emitter, node: ir.Node, t: Tans) -> Out:
    """t_y = Where(c, t_a, t_b)"""
    if t[1] is None and t[2] is None:
        return [None]
    y = node.outputs[0]
    zero = em.const(0.0, like=y)
    return [_fit(em, em.where(_x(node), zero if t[1] is None else t[1], zero if t[2] is None else t[2]), y,
                 [node.inputs[0], *_with_tangents(node, [None, *t[1:]])])]


def _unary(derivative: Callable[[Emitter, ir.Value, ir.Value], ir.Value]) -> ForwardFn:
    def rule(em: Emitter, node: ir.Node, t: Tans) -> Out:
        return [None if t[0] is None else em.Mul(t[0], derivative(em, _x(node), node.outputs[0]))]

    return rule


def _one(em: Emitter, v: ir.Value) -> ir.Value:
    return em.const(1.0, like=v)


UNARY: dict[str, tuple[str, Callable[[Emitter, ir.Value, ir.Value], ir.Value]]] = {
    "Exp": ("y", lambda em, x, y: y),
    "Log": ("1 / x", lambda em, x, y: em.Reciprocal(x)),
    "Sqrt": ("0.5 / y", lambda em, x, y: em.Div(em.const(0.5, like=y), y)),
    "Reciprocal": ("-y^2", lambda em, x, y: em.Neg(em.Mul(y, y))),
    "Tanh": ("1 - y^2", lambda em, x, y: em.Sub(_one(em, y), em.Mul(y, y))),
    "Sigmoid": ("y (1 - y)", lambda em, x, y: em.Mul(y, em.Sub(_one(em, y), y))),
    "Relu": ("[x > 0]", lambda em, x, y: em.indicator(em.Greater(x, em.const(0.0, like=x)), x)),
    "Abs": ("sign(x)", lambda em, x, y: em.sign(x)),
    "Sin": ("cos(x)", lambda em, x, y: em.Cos(x)),
    "Cos": ("-sin(x)", lambda em, x, y: em.Neg(em.Sin(x))),
    "Softplus": ("sigmoid(x)", lambda em, x, y: em.Sigmoid(x)),
    "Erf": ("2/sqrt(pi) exp(-x^2)", lambda em, x, y: em.Mul(em.const(2.0 / np.sqrt(np.pi), like=x),
                                                           em.Exp(em.Neg(em.Mul(x, x))))),
}
for _op, (_math, _d) in UNARY.items():
    FORWARD[_op] = _unary(_d)
    FORWARD[_op].__doc__ = f"t_y = t_x * {_math}"


@forward_rule("Softmax")
def softmax(em: Emitter, node: ir.Node, t: Tans) -> Out:
    """t_y = y * (t_x - sum(y * t_x)) over the softmax axes (its Jacobian is symmetric)"""
    if t[0] is None:
        return [None]
    y = node.outputs[0]
    return [em.Mul(y, em.Sub(t[0], _sum_over_softmax_axes(em, node, em.Mul(y, t[0]), -1 if em.opset >= 13 else 1)))]


@forward_rule("LogSoftmax")
def log_softmax(em: Emitter, node: ir.Node, t: Tans) -> Out:
    """t_y = t_x - sum(exp(y) * t_x) over the softmax axes"""
    if t[0] is None:
        return [None]
    y = node.outputs[0]
    return [em.Sub(t[0], _sum_over_softmax_axes(em, node, em.Mul(em.Exp(y), t[0]), -1 if em.opset >= 13 else 1))]


@forward_rule("ReduceSumSquare")
def reduce_sum_square(em: Emitter, node: ir.Node, t: Tans) -> Out | None:
    """t_y = sum(2 x t_x)"""
    axes = reduced_axes(em, node)
    if t[0] is None or isinstance(axes, ir.Value):
        return None if t[0] is not None else [None]
    x, y = _x(node), node.outputs[0]
    s = em.reduce_sum(em.Mul(em.Mul(x, t[0]), em.const(2.0, like=x)), axes, keepdims=bool(attr(node, "keepdims", 1)))
    return [s if axes != [] else _fit(em, s, y, [x])]


@forward_rule("ReduceL2")
def reduce_l2(em: Emitter, node: ir.Node, t: Tans) -> Out | None:
    """t_y = sum(x t_x) / y"""
    axes = reduced_axes(em, node)
    if t[0] is None or isinstance(axes, ir.Value) or axes == []:
        return None if t[0] is not None else [None]
    x, y = _x(node), node.outputs[0]
    return [em.Div(em.reduce_sum(em.Mul(x, t[0]), axes, keepdims=bool(attr(node, "keepdims", 1))), y)]


@forward_rule("ReduceLogSumExp")
def reduce_log_sum_exp(em: Emitter, node: ir.Node, t: Tans) -> Out | None:
    """t_y = sum(exp(x - y) t_x)"""
    axes = reduced_axes(em, node)
    if t[0] is None or isinstance(axes, ir.Value) or axes == []:
        return None if t[0] is not None else [None]
    x, y = _x(node), node.outputs[0]
    p = em.Exp(em.Sub(x, kept(em, node, y)))
    return [em.reduce_sum(em.Mul(p, t[0]), axes, keepdims=bool(attr(node, "keepdims", 1)))]


def _reduce_tangent(em: Emitter, node: ir.Node, t: Tans, weight: Callable[[ir.Value, ir.Value], ir.Value]
                    ) -> Out | None:
    """sum(weight(x, kept y) * t_x) over the node's reduced axes, keepdims as the node has it."""
    axes = reduced_axes(em, node)
    if t[0] is None:
        return [None]
    if isinstance(axes, ir.Value) or axes == []:
        return None
    x, y = _x(node), node.outputs[0]
    return [em.reduce_sum(em.Mul(weight(x, kept(em, node, y)), t[0]), axes, keepdims=bool(attr(node, "keepdims", 1)))]


@forward_rule("ReduceL1")
def reduce_l1(em: Emitter, node: ir.Node, t: Tans) -> Out | None:
    """t_y = sum(sign(x) t_x)"""
    return _reduce_tangent(em, node, t, lambda x, y: em.sign(x))


@forward_rule("ReduceLogSum")
def reduce_log_sum(em: Emitter, node: ir.Node, t: Tans) -> Out | None:
    """t_y = sum(t_x) / exp(y)"""
    return _reduce_tangent(em, node, t, lambda x, y: em.Exp(em.Neg(y)))


def _extremum(em: Emitter, node: ir.Node, t: Tans, beyond: str) -> Out | None:
    """t_y = sum(hit t_x) / sum(hit), hit = (x == y): ties share evenly, as the VJP does"""
    axes = reduced_axes(em, node)
    if t[0] is None or isinstance(axes, ir.Value) or axes == []:
        return None if t[0] is not None else [None]
    x, y = _x(node), node.outputs[0]
    hit = em.indicator(em.Not(em.op(beyond, x, kept(em, node, y))), x)
    keep = bool(attr(node, "keepdims", 1))
    return [em.Div(em.reduce_sum(em.Mul(hit, t[0]), axes, keepdims=keep), em.reduce_sum(hit, axes, keepdims=keep))]


@forward_rule("ReduceMax")
def reduce_max(em: Emitter, node: ir.Node, t: Tans) -> Out | None:
    """t_y = sum([x == y] t_x) / #maxima"""
    return _extremum(em, node, t, "Less")


@forward_rule("ReduceMin")
def reduce_min(em: Emitter, node: ir.Node, t: Tans) -> Out | None:
    """t_y = sum([x == y] t_x) / #minima"""
    return _extremum(em, node, t, "Greater")


@forward_rule("LayerNormalization")
def layer_norm(em: Emitter, node: ir.Node, t: Tans) -> Out | None:
    """t_y = inv (t_x - mean(t_x) - xhat mean(xhat t_x)) scale + xhat t_scale + t_bias"""
    x, scale, y = _x(node), _x(node, 1), node.outputs[0]
    n = rank_of(x)
    if n is None or any(o.uses() or o.is_graph_output() for o in node.outputs[1:]) or x.dtype != scale.dtype:
        return None  # its statistics are read: the fallback differentiates them too
    axes = list(range(attr(node, "axis", -1) % n, n))
    xhat, inv = standardize(em, x, axes, attr(node, "epsilon", 1e-5))
    tb = t[2] if len(t) > 2 else None
    out = em.add_all(None if t[0] is None else em.Mul(_standardize_back(em, t[0], xhat, inv, axes), scale),
                     None if t[1] is None else em.Mul(xhat, t[1]), tb)
    full = [x] if t[0] is not None else _with_tangents(node, t)
    return [_fit(em, out, y, full), *([None] * (len(node.outputs) - 1))]


# -------------------------------------------------------------------------------------- fallback
def _sharpen(node: ir.Node, opset: int) -> None:
    """Fill in node's output shapes by onnx's inference where the emitter left them unknown or partly so."""
    vague = [o for o in node.outputs if o.shape is None or not all(isinstance(d, int) for d in o.shape)]
    if not vague:
        return
    kept_shapes = [o.shape for o in vague]
    for o in vague:
        o.shape = None
    infer_node(node, opset)
    for o, old in zip(vague, kept_shapes, strict=True):
        if o.shape is None or (old is not None and o.shape.rank() != old.rank()):
            o.shape = old
    target = node.inputs[1] if node.op_type == "Reshape" and len(node.inputs) > 1 else None
    out = node.outputs[0]
    if out.shape is None and target is not None and target.shape is not None and static_dims(target) is not None:
        out.shape = ir.Shape([None] * int(np.prod(static_dims(target))))  # older Reshape inference gives no rank


def _inferred_shapes(node: ir.Node, opset: int) -> dict[str, ir.Shape]:
    """node's output shapes by onnx's per-node inference, by name (the graph's own may be vaguer: a reduced
    symbolic dimension is 1, which whole-graph inference does not always see); nothing is changed."""
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        types = {v.name: type_proto(v) for v in node.inputs if v is not None and v.name}
        data = {v.name: onnx.numpy_helper.from_array(t.numpy(), v.name) for v in node.inputs
                if v is not None and v.name and (t := ir.convenience.get_const_tensor(v)) is not None}
        found = onnx.shape_inference.infer_node_outputs(schema, ir.serde.serialize_node(node), types, data)
    except Exception:  # shapes only sharpen the fallback
        return {}
    return {k: shape for k, t in found.items() if (shape := shape_from(t)) is not None}


def _sharper(known: ir.Shape | None, other: ir.Shape | None) -> ir.Shape | None:
    if other is None or (known is not None and known.rank() != other.rank()):
        return known
    if known is None:
        return other
    return ir.Shape([b if isinstance(b, int) and not isinstance(a, int) else a for a, b in zip(known, other,
                                                                                                strict=True)])


def _stand_in(em: Emitter, o: ir.Value, shape: ir.Shape | None = None) -> ir.Value:
    """A fresh value equal to o (an Identity the emitter may neither fold nor share), so that the VJP's own
    reads of o stay apart from the cotangent."""
    node = ir.Node("", "Identity", [o], num_outputs=1, name=em.fresh_name("stand_in"))
    u = node.outputs[0]
    u.name, u.dtype, u.shape = em.fresh_name("stand_in"), o.dtype, _sharper(o.shape, shape)
    em.nodes.append(node)
    return u


def transposed_vjp(em: Emitter, node: ir.Node, rule: registry.Rule, tangents: dict[ir.Value, ir.Value],
                   wanted: set[ir.Value]) -> list[ir.Value | Undefined | None]:
    """The output tangents of ``node`` as d/du sum_i <VJP_i(u), t_i>, u a stand-in cotangent per float output."""
    assert rule.fn is not None
    start = len(em.nodes)
    outs = list(node.outputs)
    shapes = _inferred_shapes(node, em.opset) if any(static_dims(o) is None for o in outs) else {}
    stand = [_stand_in(em, o, shapes.get(o.name or "")) if o in wanted or (rule.dense and is_float(o)) else None
             for o in outs]
    grads_out = [u if u is not None else (em.zeros_like(o) if rule.dense else None) for u, o in zip(stand, outs,
                                                                                                       strict=True)]
    grads = list(rule.fn(em, node, grads_out))
    arity = rule.arity(node)
    inputs: list[ir.Value | None] = [*node.inputs[:arity], *(implicit_inputs(node) if rule.captures else [])]
    grads += [None] * (len(inputs) - len(grads))
    terms = []
    undefined = False
    for i, (inp, g) in enumerate(zip(inputs, grads, strict=True)):
        t = None if inp is None else tangents.get(inp)
        if t is None or g is None:
            continue
        if g is UNDEFINED:
            undefined = True
            continue
        assert isinstance(g, ir.Value)
        if i < arity and rule.unbroadcast_input(i):
            if g.shape is None:
                g.shape = outs[0].shape
            g = em.unbroadcast(g, inp)  # type: ignore[arg-type]
        prod = em.Mul(g, t)
        if prod.shape is None:
            prod.shape = inp.shape  # type: ignore[union-attr]
        term = em.reduce_sum(prod, None, keepdims=False)
        term.dtype, term.shape = prod.dtype or t.dtype, ir.Shape([])
        terms.append(term)
    if undefined:
        return [UNDEFINED if u is not None else None for u in stand]
    live = [(u, o) for u, o in zip(stand, outs, strict=True) if u is not None and o in wanted]
    if not terms or not live:
        return [None] * len(outs)
    for n in em.nodes[start:]:  # the reverse walk over the VJP needs its ranks and shapes
        _sharpen(n, em.opset)
    s = em.add_n(terms)
    s.dtype, s.shape = terms[0].dtype, ir.Shape([])
    one = em.const(1.0, like=s)
    found, _ = backprop(em, em.nodes[start:], Request([s], [u for u, _ in live], [one]), {"": em.opset})
    for u in stand:  # d s / d u does not depend on u's value: read y itself wherever the result reads u
        if u is not None:
            u.replace_all_uses_with(_x(u.producer()))  # type: ignore[arg-type]
    by_u = dict(zip([u for u, _ in live], found, strict=True))
    return [by_u.get(u) if u is not None else None for u in stand]  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------- walk
def tangent_walk(em: Emitter, nodes: Sequence[ir.Node], xs: Sequence[ir.Value], tangents: Sequence[ir.Value],
                 ys: Sequence[ir.Value], stop: set[ir.Value], opsets: dict[str, int]
                 ) -> tuple[dict[ir.Value, ir.Value | Undefined], dict[int, ir.Node]]:
    """Push the tangents of xs through ``nodes`` (topological order) towards ys.

    Returns the tangent of every value reached (UNDEFINED where some node on the way has no rule for it) and,
    per emitted node (by id), the primal node it belongs to."""
    order = {id(n): i for i, n in enumerate(nodes)}
    wanted = _forward_reach(nodes, xs, stop, order) & _backward_reach(list(ys), stop)
    tan: dict[ir.Value, ir.Value | Undefined] = {}
    for x, t in zip(xs, tangents, strict=True):
        if x in wanted:
            prev = tan.get(x)
            tan[x] = t if prev is None else em.Add(prev, t)  # type: ignore[arg-type]
    owner: dict[int, ir.Node] = {}
    rules: dict[tuple[str, str], registry.Rule | None] = {}
    for node in nodes:
        if not any(o in wanted for o in node.outputs):
            continue
        inputs = [*node.inputs, *implicit_inputs(node)]
        if not any(i is not None and i in tan and i not in stop for i in inputs):
            continue
        before = len(em.nodes)
        for v in inputs:  # a Shape of a primal value made earlier (shape_of shares them) may still be vague
            if v is not None and (p := v.producer()) is not None and id(p) in owner:
                _sharpen(p, em.opset)
        outs = _node_tangents(em, node, tan, stop, wanted, opsets, rules)
        for o, t in zip(node.outputs, outs, strict=True):
            if t is None or o not in wanted or o in stop:
                continue
            if isinstance(t, ir.Value):
                t.dtype = t.dtype or o.dtype
                if t.shape is None and o.shape is not None:
                    t.shape = o.shape
            tan[o] = t if o not in tan else em.Add(tan[o], t)  # type: ignore[arg-type]  (an x reached again)
        for n in em.nodes[before:]:
            owner.setdefault(id(n), node)
            _sharpen(n, em.opset)
    return tan, owner


def _node_tangents(em: Emitter, node: ir.Node, tan: dict[ir.Value, ir.Value | Undefined], stop: set[ir.Value],
                   wanted: set[ir.Value], opsets: dict[str, int],
                   rules: dict[tuple[str, str], registry.Rule | None]) -> list[ir.Value | Undefined | None]:
    def tangent_of(v: ir.Value | None) -> ir.Value | Undefined | None:
        return None if v is None or v in stop else tan.get(v)

    if any(isinstance(v.type, ir.SequenceType | ir.OptionalType) for v in [*node.inputs, *node.outputs]
           if v is not None and v in wanted):
        raise NotImplementedError(
            f"forward mode: node {node.name!r} ({node.op_type}) passes a sequence or optional value between the "
            "primals and the ys, which jvp() does not carry tangents through; use gradients() (reverse mode)")
    ins = [tangent_of(v) for v in node.inputs]
    captured = [tangent_of(v) for v in implicit_inputs(node)]
    if any(t is UNDEFINED for t in [*ins, *captured]):
        return [UNDEFINED if is_float(o) else None for o in node.outputs]
    fwd = FORWARD.get(node.op_type) if registry.normalize_domain(node.domain) == "" else None
    if fwd is not None and not subgraphs(node) and not any(captured):
        found = fwd(em, node, ins)  # type: ignore[arg-type]
        if found is not None:
            return list(found)
    key = (node.domain, node.op_type)
    if key not in rules:
        rules[key] = registry.rule_for(node.domain, node.op_type, opset_of(opsets, node.domain))
    rule = rules[key]
    if rule is None:
        from onnxgrad.backprop import no_rule_error

        raise no_rule_error(node, opset_of(opsets, node.domain), " (forward mode)")
    if rule.fn is None:
        return [UNDEFINED if rule.undefined and is_float(o) else None for o in node.outputs]
    known = {v: t for v, t in zip([*node.inputs, *implicit_inputs(node)], [*ins, *captured], strict=True)
             if v is not None and isinstance(t, ir.Value)}
    return transposed_vjp(em, node, rule, known, wanted)


def _place(graph: ir.Graph, live: list[ir.Node], owner: dict[int, ir.Node]) -> None:
    """Move each tangent node to just after the primal node it belongs to (emission order kept)."""
    groups: dict[int, list[ir.Node]] = {}
    primal: dict[int, ir.Node] = {}
    for n in live:
        p = owner.get(id(n))
        if p is not None and p.graph is graph:
            groups.setdefault(id(p), []).append(n)
            primal[id(p)] = p
    if not groups:
        return
    moved = [n for g in groups.values() for n in g]
    graph.remove(moved)
    for key, group in groups.items():
        graph.insert_after(primal[key], group)


# -------------------------------------------------------------------------------------------- API
@gc_paused
def jvp(
    model: ir.Model,
    primals: str | ir.Value | Sequence[str | ir.Value],
    tangents: TangentSpec | Sequence[TangentSpec] = None,
    ys: str | ir.Value | Sequence[str | ir.Value] | None = None,
    name: str = "jvp",
    stop_gradients: str | ir.Value | Sequence[str | ir.Value] | None = None,
    unconnected_gradients: str | UnconnectedGradients = "none",
    result_names: Sequence[str] | None = None,
) -> tuple[list[str], list[str | None]]:
    """Add to ``model`` the directional derivative of each y along the tangents of the primals.

    ``tangents`` per primal: None or a ``GradInput`` (a new graph input, ``<scope>/<x>_tangent`` by default), a
    value name, or an array (an initializer). ``ys`` defaults to the graph outputs. Returns (the tangent value
    per primal, the JVP value per y: ``<scope>/<y>_jvp``, or None where no primal reaches y and
    ``unconnected_gradients`` is 'none'). ``result_names``: other names for the results, per y, under the scope."""
    if not isinstance(model, ir.Model):
        raise TypeError(f"jvp() works on an onnx_ir.Model, got {type(model).__name__}")
    unconnected = _unconnected(unconnected_gradients)
    check_versions(model)
    graph = model.graph
    check_graph(graph)
    table = value_table(graph)
    x_vals = [resolve(table, x, "primals") for x in as_list(primals)]
    if not x_vals:
        raise ValueError("primals is empty: name at least one value to differentiate with respect to")
    y_vals = list(graph.outputs) if ys is None else [resolve(table, y, "ys") for y in as_list(ys)]
    specs: list[TangentSpec] = (list(tangents) if isinstance(tangents, list | tuple) else [tangents] * len(x_vals))
    if len(specs) != len(x_vals):
        raise ValueError(f"Length mismatch. Passed {len(specs)} tangents for {len(x_vals)} primals")
    stop = {resolve(table, s, "stop_gradients") for s in as_list(stop_gradients)}
    inferred = ensure_types(model)
    opset = opset_of(model.opset_imports)
    em = Emitter(graph, opset, unique_scope(graph, name), model.ir_version or 8)
    new_inputs: list[ir.Value] = []
    try:
        t_vals = [_tangent(em, table, x, s, new_inputs) for x, s in zip(x_vals, specs, strict=True)]
        floats = [(x, t) for x, t in zip(x_vals, t_vals, strict=True) if is_float(x)]
        tan, owner = tangent_walk(em, list(graph), [x for x, _ in floats], [t for _, t in floats], y_vals, stop,
                                  dict(graph.opset_imports))
        if result_names is not None and len(result_names) != len(y_vals):
            raise ValueError(f"Length mismatch. Passed {len(result_names)} result_names for {len(y_vals)} ys")
        names = [f"{em.scope}/{r}" for r in result_names] if result_names is not None else [
            f"{em.scope}/{y.name}_jvp" for y in y_vals]
        finals = _finalize(em, y_vals, names, tan, unconnected,
                           {*t_vals, *graph.inputs, *graph.initializers.values()})
    except BaseException:
        em.rollback()
        restore_types(inferred)
        raise
    live = em.commit([v for v in finals if v is not None])
    _place(graph, live, owner)
    graph.inputs.extend(new_inputs)
    return [str(t.name) for t in t_vals], [None if v is None else v.name for v in finals]


def _tangent(em: Emitter, table: dict[str, ir.Value], x: ir.Value, spec: TangentSpec,
             new_inputs: list[ir.Value]) -> ir.Value:
    if spec is None or isinstance(spec, GradInput):
        wanted = spec.name if isinstance(spec, GradInput) and spec.name else f"{em.scope}/{x.name}_tangent"
        if wanted in table or any(v.name == wanted for v in new_inputs):
            raise ValueError(f"tangents: a value named {wanted!r} already exists")
        v = ir.Value(name=wanted, type=ir.TensorType(x.dtype) if x.dtype is not None else None, shape=x.shape)
        new_inputs.append(v)
        return v
    if isinstance(spec, str | ir.Value):
        return resolve(table, spec, "tangents")
    array = np.asarray(spec)
    assert x.dtype is not None
    init = ir.Value(name=f"{em.scope}/{x.name}_tangent", type=ir.TensorType(x.dtype), shape=ir.Shape(array.shape),
                    const_value=ir.tensor(array.astype(x.dtype.numpy()), dtype=x.dtype))
    em.initializers.append(init)
    return init


def _finalize(em: Emitter, ys: list[ir.Value], names: list[str], tan: dict[ir.Value, ir.Value | Undefined],
              unconnected: UnconnectedGradients, foreign: set[ir.Value]) -> list[ir.Value | None]:
    finals: list[ir.Value | None] = []
    named: dict[ir.Value, ir.Value] = {}
    for y, result in zip(ys, names, strict=True):
        if y in named:
            finals.append(named[y])
            continue
        t = tan.get(y)
        if t is UNDEFINED:
            message = f"the JVP of {y.name!r} is undefined: some node on the way has no derivative"
            if unconnected is UnconnectedGradients.ZERO:
                raise UndefinedGradient(message + " (an undefined derivative is never given as zeros)")
            warnings.warn(GradientNote(message + ": None"), stacklevel=4)
            finals.append(None)
            continue
        if t is None and unconnected is UnconnectedGradients.ZERO and is_float(y):
            t = em.zeros_like(y)
        if t is None:
            finals.append(None)
            continue
        assert isinstance(t, ir.Value)
        if t in foreign or t in named.values() or t.producer() is None or t.producer().op_type == "Constant":
            t = em.Identity(t)
        t.name = result
        t.dtype, t.shape = y.dtype, y.shape
        named[y] = t
        finals.append(t)
    return finals
