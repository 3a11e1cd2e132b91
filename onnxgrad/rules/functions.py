"""Gradients of ops that their ai.onnx schema defines by a function body (LinearAttention, CausalConvWithState).

The body (static, or built for the node by the schema's context-dependent builder) is re-emitted in the gradient
part, its inputs mapped to the node's inputs and attribute references resolved, with every Scan unrolled over its
(static) trip count; a small reverse walk then differentiates the re-emitted nodes with their own rules. The
forward node is untouched: the re-emitted body recomputes the forward values the gradient needs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx.defs
import onnx_ir as ir
from onnx import helper as oh

from onnxgrad import registry
from onnxgrad.emitter import Emitter, is_float
from onnxgrad.registry import register

NOTES = "gradient of the schema's function body"

Env = dict[str, "ir.Value | None"]


def _schema(domain: str, op_type: str, opset: int) -> onnx.defs.OpSchema | None:
    if registry.normalize_domain(domain) != "":
        return None
    try:
        return onnx.defs.get_schema(op_type, max_inclusive_version=opset, domain="")
    except onnx.defs.SchemaError:
        return None


def function_rule(domain: str, op_type: str, opset: int) -> registry.Rule | None:
    """A rule for an op without a registered one whose ai.onnx schema has a function body, else None."""
    schema = _schema(domain, op_type, opset)
    if schema is None or not (schema.has_function or schema.has_context_dependent_function):
        return None
    return registry.Rule(op_type, "", schema.since_version, function_body_gradient, notes=NOTES)


def _type_proto(v: ir.Value | None) -> onnx.TypeProto:
    if v is None or v.dtype is None:
        return onnx.TypeProto()
    dims: list[Any] | None = None
    if v.shape is not None:
        dims = [d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None) for d in v.shape]
    return oh.make_tensor_type_proto(int(v.dtype), dims)


def function_body(node: ir.Node, opset: int) -> onnx.FunctionProto:
    """The schema's function body for ``node`` at ``opset`` (context-dependent bodies built for this node)."""
    schema = _schema(node.domain, node.op_type, opset)
    if schema is None:
        raise LookupError(f"{node.op_type}: no ai.onnx schema at opset {opset}")
    if schema.has_context_dependent_function:
        version = max(v for v in schema.context_dependent_function_opset_versions if v <= opset)
        proto = ir.serde.serialize_node(node)
        types = [_type_proto(v).SerializeToString() for v in node.inputs]
        data = schema.get_context_dependent_function_with_opset_version(version, proto.SerializeToString(), types)
    elif schema.has_function:
        version = max(v for v in schema.function_opset_versions if v <= opset)
        data = schema.get_function_with_opset_version(version)  # serialized FunctionProto (bytes) in onnx 1.23
    else:
        raise LookupError(f"{node.op_type}: the schema at opset {opset} has no function body")
    body = onnx.FunctionProto()
    body.ParseFromString(data)
    return body


# ------------------------------------------------------------------------------------------- shapes
def _shape_from(t: onnx.TypeProto) -> ir.Shape | None:
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims: list[Any] = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        else:
            dims.append(ir.SymbolicDim(d.dim_param) if d.dim_param else None)
    return ir.Shape(dims)


def _sharpness(shape: ir.Shape) -> int:
    return sum(isinstance(d, int) for d in shape) * 2 + sum(isinstance(d, ir.SymbolicDim) and d.value is not None
                                                             for d in shape)


def _collect(graph: onnx.GraphProto, out: dict[str, ir.Shape]) -> None:
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        shape = _shape_from(vi.type)
        if shape is not None:
            out.setdefault(vi.name, shape)
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _collect(a.g, out)
            for g in a.graphs:
                _collect(g, out)


def _body_shapes(body: onnx.FunctionProto, node: ir.Node) -> dict[str, ir.Shape]:
    """Shapes of the body's values (Scan bodies included) by onnx shape inference on the node's input types."""
    inputs = [oh.make_value_info(name, _type_proto(v))
              for name, v in zip(body.input, node.inputs, strict=False) if v is not None]
    outputs = [oh.make_value_info(name, onnx.TypeProto()) for name in body.output if name]
    graph = oh.make_graph(list(body.node), "body", inputs, outputs)
    model = oh.make_model(graph, opset_imports=list(body.opset_import), ir_version=10)
    shapes: dict[str, ir.Shape] = {}
    try:
        _collect(onnx.shape_inference.infer_shapes(model, data_prop=True).graph, shapes)
    except Exception:  # shapes are a help for the rules, not a requirement
        pass
    return shapes


def _infer_node(node: ir.Node, opset: int) -> None:
    """Output types and shapes of one emitted node by onnx's per-node inference (constant inputs as data)."""
    if all(o.shape is not None and o.dtype is not None for o in node.outputs):
        return
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        types = {v.name: _type_proto(v) for v in node.inputs if v is not None and v.name}
        data = {v.name: onnx.numpy_helper.from_array(a, v.name) for v in node.inputs
                if v is not None and v.name and (a := Emitter.constant_value(v)) is not None}
        inferred = onnx.shape_inference.infer_node_outputs(schema, ir.serde.serialize_node(node), types, data)
    except Exception:  # shapes help the rules: a node that inference cannot type keeps what it has
        return
    for o in node.outputs:
        t = inferred.get(o.name or "")
        if t is None:
            continue
        if o.dtype is None and t.tensor_type.elem_type:
            o.dtype = ir.DataType(t.tensor_type.elem_type)
        if o.shape is None:
            o.shape = _shape_from(t)


# ------------------------------------------------------------------------------------ re-emission
def _attrs(n: onnx.NodeProto, node: ir.Node, defaults: dict[str, onnx.AttributeProto]) -> dict[str, Any]:
    """The body node's attributes as Python values, references resolved against the function node."""
    out: dict[str, Any] = {}
    for p in n.attribute:
        if p.ref_attr_name:
            a = node.attributes.get(p.ref_attr_name)
            if a is None and p.ref_attr_name in defaults:  # the schema's default for the function's attribute
                a = ir.serde.deserialize_attribute(defaults[p.ref_attr_name])
            if a is None:
                continue  # no value at all: the body op's own default applies
            a = ir.Attr(p.name, a.type, a.value)
        else:
            a = ir.serde.deserialize_attribute(p)
        value = a.value
        out[p.name] = list(value) if isinstance(value, tuple) else value
    return out


class _Expansion:
    """Re-emits a function body through the emitter, with the shapes inference found."""

    def __init__(self, em: Emitter, node: ir.Node, shapes: dict[str, ir.Shape]) -> None:
        self.em, self.node, self.shapes = em, node, shapes
        self.mine: set[int] = set()
        schema = _schema(node.domain, node.op_type, em.opset)
        self.defaults = {} if schema is None else {
            k: a.default_value for k, a in schema.attributes.items() if a.default_value.name
        }

    def _new_nodes(self, before: int) -> None:
        """Record the nodes emitted since ``before`` and give their outputs types and shapes."""
        for m in self.em.nodes[before:]:
            self.mine.add(id(m))
            _infer_node(m, self.em.opset)

    def _emitted(self, value: ir.Value, name: str) -> None:
        producer = value.producer()
        known = self.shapes.get(name)
        if producer is None or id(producer) not in self.mine or known is None:
            return
        if value.shape is None or (value.shape.rank() == known.rank() and _sharpness(known) > _sharpness(value.shape)):
            value.shape = known

    def nodes(self, nodes: Sequence[onnx.NodeProto], env: Env) -> None:
        for n in nodes:
            if n.op_type == "Scan" and n.domain in ("", "ai.onnx"):
                self.scan(n, env)
                continue
            inputs = [env[name] if name else None for name in n.input]
            before = len(self.em.nodes)
            outs = self.em.op(n.op_type, *inputs, _outputs=len(n.output), _domain=n.domain,
                              **_attrs(n, self.node, self.defaults))
            self._new_nodes(before)
            outs = (outs,) if len(n.output) == 1 else outs
            for name, v in zip(n.output, outs, strict=True):
                if name:
                    env[name] = v
                    self._emitted(v, name)

    def scan(self, n: onnx.NodeProto, env: Env) -> None:
        """Scan unrolled: each step's body re-emitted on Gather'd slices, scan outputs stacked by Concat."""
        attrs = {a.name: a for a in n.attribute}
        body = attrs["body"].g
        n_scan = attrs["num_scan_inputs"].i
        n_state = len(n.input) - n_scan
        in_axes = list(attrs["scan_input_axes"].ints) if "scan_input_axes" in attrs else [0] * n_scan
        in_dirs = list(attrs["scan_input_directions"].ints) if "scan_input_directions" in attrs else [0] * n_scan
        n_out = len(body.output) - n_state
        out_axes = list(attrs["scan_output_axes"].ints) if "scan_output_axes" in attrs else [0] * n_out
        out_dirs = list(attrs["scan_output_directions"].ints) if "scan_output_directions" in attrs else [0] * n_out
        xs = [env[name] for name in n.input[n_state:]]
        trips = set()
        for name, x, axis in zip(n.input[n_state:], xs, in_axes, strict=True):
            shape = (x.shape if x is not None and x.shape is not None else None) or self.shapes.get(name)
            dim = None if shape is None else shape[axis % shape.rank()]
            trips.add(dim if isinstance(dim, int) else None)
        if len(trips) != 1 or None in trips:
            raise ValueError(f"{self.node.op_type}: its function body's Scan needs a static sequence length to be "
                             f"unrolled for differentiation (found {sorted(map(str, trips))})")
        steps = trips.pop()
        em = self.em
        state = [env[name] for name in n.input[:n_state]]
        stacked: list[list[ir.Value]] = [[] for _ in range(n_out)]
        for t in range(steps):
            inner: Env = dict(env)
            for name, v in zip((i.name for i in body.input[:n_state]), state, strict=True):
                inner[name] = v
            for k, (name, x) in enumerate(zip((i.name for i in body.input[n_state:]), xs, strict=True)):
                index = em.const(np.array(steps - 1 - t if in_dirs[k] else t), dtype=ir.DataType.INT64)
                before = len(em.nodes)
                inner[name] = em.Gather(x, index, axis=in_axes[k])
                self._new_nodes(before)
                self._emitted(inner[name], name)
            self.nodes(body.node, inner)
            state = [inner[o.name] for o in body.output[:n_state]]
            for k, o in enumerate(body.output[n_state:]):
                stacked[k].append(inner[o.name])
        for name, v in zip(n.output[:n_state], state, strict=True):
            if name:
                env[name] = v
        for k, name in enumerate(n.output[n_state:]):
            if not name:
                continue
            before = len(em.nodes)
            parts = [em.unsqueeze(v, [out_axes[k]]) for v in stacked[k]]
            if out_dirs[k]:
                parts.reverse()
            env[name] = parts[0] if len(parts) == 1 else em.Concat(*parts, axis=out_axes[k])
            self._new_nodes(before)
            self._emitted(env[name], name)


# ----------------------------------------------------------------------------------- reverse walk
def _walk(em: Emitter, outs: Sequence[ir.Value | None], grads_out: Sequence[ir.Value | None],
          inputs: Sequence[ir.Value | None], mine: set[int], where: ir.Node) -> list[ir.Value | None]:
    """Gradients of the inputs from the gradients of the re-emitted outputs, rule by rule."""
    sources = {v for v in inputs if v is not None}
    index = {id(n): i for i, n in enumerate(em.nodes) if id(n) in mine}
    found: dict[int, ir.Node] = {}
    stack, seen = [o for o in outs if o is not None], set()
    while stack:
        v = stack.pop()
        if v in sources or v in seen:
            continue
        seen.add(v)
        p = v.producer()
        if p is not None and id(p) in index and id(p) not in found:
            found[id(p)] = p
            stack.extend(i for i in p.inputs if i is not None)
    order = sorted(found.values(), key=lambda n: index[id(n)])
    reach = {v for v in sources if is_float(v)}
    for n in order:
        if any(i in reach for i in n.inputs if i is not None):
            reach.update(o for o in n.outputs if is_float(o))
    contribs: dict[ir.Value, list[ir.Value]] = {}
    for o, g in zip(outs, grads_out, strict=True):
        if o is not None and g is not None and o in reach:
            contribs.setdefault(o, []).append(g)

    def total(v: ir.Value) -> ir.Value | None:
        terms = contribs.pop(v, None)
        if not terms:
            return None
        g = em.add_n(terms, "add_n")
        contribs[v] = [g]
        return g

    for n in reversed(order):
        if not any(i in reach for i in n.inputs if i is not None):
            continue
        g_out = [total(o) for o in n.outputs]
        if all(g is None for g in g_out):
            continue
        rule = registry.lookup(n.domain, n.op_type, em.opset) or function_rule(n.domain, n.op_type, em.opset)
        if rule is None:
            raise LookupError(f"no gradient rule for '{n.op_type}' (domain '{n.domain or 'ai.onnx'}', opset "
                              f"{em.opset}) in the function body of {where.op_type} '{where.name}': register one "
                              f"with @onnxgrad.register_gradient('{n.op_type}')")
        if rule.fn is None:
            continue
        if rule.dense:
            g_out = [em.zeros_like(o) if g is None else g for g, o in zip(g_out, n.outputs, strict=True)]
        for i, (inp, g) in enumerate(zip(n.inputs, rule.fn(em, n, g_out), strict=False)):
            if g is None or inp is None or inp not in reach:
                continue
            if rule.unbroadcast_input(i):
                if g.shape is None:
                    g.shape = n.outputs[0].shape
                g = em.unbroadcast(g, inp)
            if g.dtype is None:
                g.dtype = inp.dtype
            if g.shape is None and inp.shape is not None:
                g.shape = inp.shape
            contribs.setdefault(inp, []).append(g)

    result: list[ir.Value | None] = []
    done: set[ir.Value] = set()
    for v in inputs:  # an input used twice gets its total once: the outer walk adds per input slot
        result.append(None if v is None or v in done else total(v))
        if v is not None:
            done.add(v)
    return result


def function_body_gradient(em: Emitter, node: ir.Node, grads: Sequence[ir.Value | None]) -> list[ir.Value | None]:
    """d(inputs) = the reverse walk over the schema's function body, re-emitted (Scan loops unrolled)"""
    body = function_body(node, em.opset)
    expansion = _Expansion(em, node, _body_shapes(body, node))
    env: Env = {name: (node.inputs[i] if i < len(node.inputs) else None) for i, name in enumerate(body.input)}
    expansion.nodes(body.node, env)
    outs = [env.get(name) if name else None for name in body.output[:len(grads)]]
    return _walk(em, outs, list(grads), list(node.inputs), expansion.mine, node)


register("LinearAttention", since=27, notes=NOTES)(function_body_gradient)
register("CausalConvWithState", since=27, notes=NOTES)(function_body_gradient)
