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


# the experimental ops ONNX removed (onnx 1.23 has no schema for them) that onnx's checker still names, and
# onnxruntime still runs in part: the early model zoo carries them (rules/experimental.py)
REMOVED_EXPERIMENTAL = frozenset({"ATen", "Affine", "ConstantFill", "Crop", "DynamicSlice", "GRUUnit",
                                  "GivenTensorFill", "ImageScaler", "ParametricSoftplus", "Scale", "ScaledTanh"})


def unknown_op(domain: str, op_type: str) -> str | None:
    """Why an ai.onnx op has no schema at any opset (a removed experimental op, or no ONNX op at all), or None."""
    if normalize_domain(domain) != "" or onnx.defs.has(op_type):
        return None
    if op_type in REMOVED_EXPERIMENTAL:
        return f"'{op_type}' is an experimental op ONNX has removed (onnxruntime still runs some)"
    return f"'{op_type}' is no operator of ONNX at any opset: no runtime runs this model as it is"


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
