"""Small ONNX graphs for the API, documentation and TensorFlow conformance tests.

A graph is written as a list of ``N(outputs, op, *inputs, **attrs)`` rows over named values; ``build``
turns it into an ``onnx.ModelProto`` (graph inputs, initializers, Constant nodes), and ``run`` evaluates
a model in onnxruntime."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common
from onnx import helper as oh

from onnxgrad.runtime import run as ort_run

IR_VERSION = 8  # onnxruntime 1.31 reads IR <= 13; 8 is what opset 17 shipped with


@dataclass(frozen=True)
class N:
    """One node: ``outputs`` (a name or a tuple of names) = ``op(*inputs, **attrs)``."""

    outputs: str | tuple[str, ...]
    op: str
    inputs: tuple[str, ...]
    attrs: dict[str, Any]

    def __init__(self, outputs: str | tuple[str, ...], op: str, *inputs: str, **attrs: Any) -> None:
        object.__setattr__(self, "outputs", outputs)
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "inputs", inputs)
        object.__setattr__(self, "attrs", attrs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return (self.outputs,) if isinstance(self.outputs, str) else self.outputs


@dataclass(frozen=True)
class Graph:
    """A small computation: graph inputs (fed), initializers, Constant nodes and ops.

    ``inputs`` are fed at run time (their arrays are the feeds); ``inits`` become initializers;
    ``consts`` become Constant nodes. ``dynamic`` makes the leading dimension of every graph input
    of rank >= 1 symbolic (``batch``)."""

    nodes: Sequence[N]
    inputs: Mapping[str, np.ndarray] = field(default_factory=dict)
    inits: Mapping[str, np.ndarray] = field(default_factory=dict)
    consts: Mapping[str, np.ndarray] = field(default_factory=dict)
    outputs: Sequence[str] = ()
    opset: int = 17
    dynamic: bool = False

    @property
    def feeds(self) -> dict[str, np.ndarray]:
        return {k: np.asarray(v) for k, v in self.inputs.items()}


def _info(name: str, array: np.ndarray, dynamic: bool) -> onnx.ValueInfoProto:
    shape: list[Any] = list(array.shape)
    if dynamic and shape:
        shape[0] = "batch"
    return oh.make_tensor_value_info(name, oh.np_dtype_to_tensor_dtype(array.dtype), shape)


def build(g: Graph) -> onnx.ModelProto:
    """The ModelProto of ``g``, shape-inferred; outputs are ``g.outputs`` (default: the last node's)."""
    nodes = [
        oh.make_node("Constant", [], [name], name=name, value=onnx.numpy_helper.from_array(np.asarray(v), name))
        for name, v in g.consts.items()
    ]
    for k, n in enumerate(g.nodes):
        nodes.append(oh.make_node(n.op, list(n.inputs), list(n.output_names), name=f"{n.op}_{k}", **n.attrs))
    inputs = [_info(name, np.asarray(v), g.dynamic) for name, v in g.inputs.items()]
    inits = [onnx.numpy_helper.from_array(np.asarray(v), name) for name, v in g.inits.items()]
    out_names = list(g.outputs) or list(g.nodes[-1].output_names if g.nodes else list(g.consts)[-1:])
    graph = oh.make_graph(nodes, "g", inputs, [], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", g.opset)], ir_version=IR_VERSION)
    model = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    known = {v.name: v for v in [*model.graph.value_info, *model.graph.input]}
    known.update({t.name: oh.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits})
    model.graph.output.extend(known[o] for o in out_names)
    onnx.checker.check_model(model, full_check=True)
    return model


def ir_model(g: Graph) -> ir.Model:
    return ir.serde.deserialize_model(build(g))


def with_outputs(model: ir.Model, names: Sequence[str | None]) -> onnx.ModelProto:
    """``model`` serialized, with the values ``names`` (None skipped) appended as graph outputs."""
    graph = model.graph
    table = {v.name: v for v in [*graph.inputs, *graph.initializers.values()]}
    table.update({v.name: v for node in graph for v in node.outputs})
    have = {v.name for v in graph.outputs}
    for name in names:
        if name is not None and name not in have:
            graph.outputs.append(table[name])
            have.add(name)
    return ir.serde.serialize_model(model)


def run(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], outputs: Sequence[str] | None = None
        ) -> dict[str, np.ndarray]:
    """Evaluate ``model`` in onnxruntime (CPU)."""
    return ort_run(model, feeds, outputs)


def new_names(before: onnx.ModelProto, after: onnx.ModelProto) -> tuple[set[str], set[str]]:
    """(node names, value names) that ``after`` has and ``before`` has not."""

    def names(m: onnx.ModelProto) -> tuple[set[str], set[str]]:
        g = m.graph
        values = {v for n in g.node for v in n.output} | {i.name for i in g.input} | {t.name for t in g.initializer}
        return {n.name for n in g.node}, values

    (n0, v0), (n1, v1) = names(before), names(after)
    return n1 - n0, v1 - v0


def only(model: onnx.ModelProto, outputs: list[str]) -> onnx.ModelProto:
    """The model pruned to what ``outputs`` need."""
    m = ir.serde.deserialize_model(model)
    keep = [v for v in m.graph.outputs if v.name in outputs]
    m.graph.outputs.clear()
    m.graph.outputs.extend(keep)
    onnx_ir.passes.common.RemoveUnusedNodesPass()(m)
    return ir.serde.serialize_model(m)
