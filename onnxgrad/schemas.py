"""What onnx's operator schemas say about an op at a model's opset: the schema in force, its function body."""

from __future__ import annotations

import onnx
import onnx.defs
import onnx_ir as ir

from onnxgrad.registry import normalize_domain
from onnxgrad.shapes import type_proto


def schema(domain: str, op_type: str, opset: int) -> onnx.defs.OpSchema | None:
    """The ai.onnx schema of ``op_type`` in force at ``opset``; None for other domains and unknown ops."""
    if normalize_domain(domain) != "":
        return None
    try:
        return onnx.defs.get_schema(op_type, max_inclusive_version=opset, domain="")
    except onnx.defs.SchemaError:
        return None


def _newest(versions: list[int], opset: int) -> int:
    """The newest of ``versions`` in force at ``opset``."""
    return max(v for v in versions if v <= opset)


def function_body(node: ir.Node, opset: int) -> onnx.FunctionProto:
    """The schema's function body for ``node`` at ``opset`` (context-dependent bodies built for this node)."""
    found = schema(node.domain, node.op_type, opset)
    if found is None:
        raise LookupError(f"{node.op_type}: no ai.onnx schema at opset {opset}")
    if found.has_context_dependent_function:
        version = _newest(found.context_dependent_function_opset_versions, opset)
        proto = ir.serde.serialize_node(node)
        types = [type_proto(v).SerializeToString() for v in node.inputs]
        data = found.get_context_dependent_function_with_opset_version(version, proto.SerializeToString(), types)
    elif found.has_function:
        version = _newest(found.function_opset_versions, opset)
        data = found.get_function_with_opset_version(version)  # serialized FunctionProto (bytes) in onnx 1.23
    else:
        raise LookupError(f"{node.op_type}: the schema at opset {opset} has no function body")
    body = onnx.FunctionProto()
    body.ParseFromString(data)
    return body
