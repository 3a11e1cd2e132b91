"""``stop_gradient``: a marker after a value that the walk treats as a constant. The marker is a model-local
function whose body is Identity, so any runtime runs it and the model stays standard ONNX."""

from __future__ import annotations

import onnx_ir as ir

from onnxgrad.registry import opset_of
from onnxgrad.rules.markers import MARKER_DOMAIN
from onnxgrad.values import ensure_types, resolve, unique_scope, value_table


def _marker_function(opset: int) -> ir.Function:
    x = ir.Value(name="x")
    node = ir.Node("", "Identity", [x], num_outputs=1, name="identity")
    node.outputs[0].name = "y"
    body = ir.Graph([x], [node.outputs[0]], nodes=[node], opset_imports={"": opset}, name="StopGradient")
    return ir.Function(MARKER_DOMAIN, "StopGradient", graph=body, attributes=[])


def stop_gradient(model: ir.Model, value: str) -> str:
    """Insert a StopGradient marker after ``value`` and route every consumer through it.

    The marker is a model-local function whose body is Identity, so stock runtimes run it; the
    walk treats its output as a constant. Returns the marker's output name."""
    graph = model.graph
    v = resolve(value_table(graph), value, "stop_gradient")
    if v.dtype is None:  # a model loaded without value_info: type it first, or it cannot be serialized
        ensure_types(model)
    opset = opset_of(model.opset_imports)
    key = (MARKER_DOMAIN, "StopGradient", "")
    if key not in model.functions:
        model.functions[key] = _marker_function(opset)
    model.opset_imports.setdefault(MARKER_DOMAIN, 1)
    scope = unique_scope(graph, f"{v.name}/stop_gradient")
    uses = list(v.uses())  # before the marker becomes a use of v itself
    node = ir.Node(MARKER_DOMAIN, "StopGradient", [v], num_outputs=1, name=scope)
    out = node.outputs[0]
    out.name, out.shape = scope, v.shape
    if v.dtype is not None:
        out.dtype = v.dtype
    for use in uses:
        use.node.replace_input_with(use.idx, out)
    producer = v.producer()
    if producer is None:
        graph.insert_before(next(iter(graph)), node) if len(graph) else graph.append(node)
    else:
        graph.insert_after(producer, node)
    return scope
