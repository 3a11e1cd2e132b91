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

from onnxgrad import registry
from onnxgrad.backprop import Request, backprop
from onnxgrad.emitter import Emitter
from onnxgrad.registry import register
from onnxgrad.schemas import function_body, schema
from onnxgrad.shapes import infer_function_body, infer_node

NOTES = "gradient of the schema's function body"

Env = dict[str, "ir.Value | None"]
Grad = "ir.Value | registry.Undefined | None"


@registry.register_fallback
def function_rule(domain: str, op_type: str, opset: int) -> registry.Rule | None:
    """A rule for an op without a registered one whose ai.onnx schema has a function body, else None."""
    found = schema(domain, op_type, opset)
    if found is None or not (found.has_function or found.has_context_dependent_function):
        return None
    return registry.Rule(op_type, "", found.since_version, function_body_gradient, notes=NOTES)


# ------------------------------------------------------------------------------------------- shapes
def _sharpness(shape: ir.Shape) -> int:
    return sum(isinstance(d, int) for d in shape) * 2 + sum(isinstance(d, ir.SymbolicDim) and d.value is not None
                                                             for d in shape)


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
        found = schema(node.domain, node.op_type, em.opset)
        self.defaults = {} if found is None else {
            k: a.default_value for k, a in found.attributes.items() if a.default_value.name
        }

    def _new_nodes(self, before: int) -> None:
        """Record the nodes emitted since ``before`` and give their outputs types and shapes."""
        for m in self.em.nodes[before:]:
            self.mine.add(id(m))
            infer_node(m, self.em.opset)

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
def function_body_gradient(em: Emitter, node: ir.Node, grads: Sequence[ir.Value | None]) -> list[Grad]:
    """d(inputs) = the one reverse walk over the schema's function body, re-emitted (Scan loops unrolled)"""
    body = function_body(node, em.opset)
    expansion = _Expansion(em, node, infer_function_body(body, node))
    env: Env = {name: (node.inputs[i] if i < len(node.inputs) else None) for i, name in enumerate(body.input)}
    with em.own_nodes():  # the walk below goes over the body's nodes: none may be another expansion's
        expansion.nodes(body.node, env)
    outs = [env.get(name) if name else None for name in body.output[:len(grads)]]
    seeded = [(o, g) for o, g in zip(outs, grads, strict=True) if o is not None and g is not None]
    inputs = list(dict.fromkeys(v for v in node.inputs if v is not None))
    body_nodes = [n for n in em.nodes if id(n) in expansion.mine]
    where = f" in the function body of {node.op_type} '{node.name}'"
    found, _ = backprop(em, body_nodes, Request([o for o, _ in seeded], inputs, [g for _, g in seeded]),
                        {"": em.opset}, where)
    totals = dict(zip(inputs, found, strict=True))
    # an input read twice gets its total once: the outer walk adds one contribution per input slot
    return [None if v is None or v in node.inputs[:i] else totals[v] for i, v in enumerate(node.inputs)]


register("LinearAttention", since=27, notes=NOTES)(function_body_gradient)
register("CausalConvWithState", since=27, notes=NOTES)(function_body_gradient)
