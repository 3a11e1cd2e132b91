"""Models older than opset 7, brought up to it: opsets 1-6 broadcast only on request (``broadcast=1``, ``axis``),
a form with no gradient-friendly equivalent, so onnx's version converter rewrites them first."""

from __future__ import annotations

import onnx
import onnx.shape_inference
import onnx.version_converter

from onnxgrad.registry import opset_of
from onnxgrad.validate import MIN_OPSET


def ai_onnx_opset(model: onnx.ModelProto) -> int | None:
    """The ai.onnx opset the model imports; None when it imports none (``check_versions`` says so later)."""
    imports = {o.domain: o.version for o in model.opset_import}
    return opset_of(imports) if "" in imports or "ai.onnx" in imports else None


def upgrade(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model itself, or converted to opset 7 when older.

    Opsets 1-6 broadcast only on request (broadcast=1, axis); onnx's version converter rewrites those
    nodes into opset 7's numpy broadcasting without changing any value."""
    opset = ai_onnx_opset(model)
    if opset is None or opset >= MIN_OPSET:
        return model
    try:
        converted = onnx.version_converter.convert_version(model, MIN_OPSET)
    except Exception as e:  # onnx's ConvertError and the checker's errors alike
        raise ValueError(f"the model imports ai.onnx opset {opset}; onnx's version converter could not bring it "
                         f"to opset {MIN_OPSET}, the oldest onnxgrad differentiates: {e}") from e
    return _channel_slopes(converted)


def _channel_slopes(model: onnx.ModelProto) -> onnx.ModelProto:
    """PRelu before opset 7 applied a 1-D slope per channel (axis 1); from 7 it broadcasts from the right.
    The converter leaves the slope as it was, so give it trailing unit axes to keep its meaning."""
    prelus = [n for n in model.graph.node if n.op_type == "PRelu"]
    if not prelus:
        return model
    typed = onnx.shape_inference.infer_shapes(model)
    ranks = {v.name: len(v.type.tensor_type.shape.dim) for v in [*typed.graph.input, *typed.graph.value_info]
             if v.type.tensor_type.HasField("shape")}
    ranks |= {t.name: len(t.dims) for t in model.graph.initializer}
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.node[:]
    for node in model.graph.node:
        x_rank, s_rank = ranks.get(node.input[0]), ranks.get(node.input[1]) if len(node.input) > 1 else None
        if node.op_type == "PRelu" and x_rank is not None and x_rank >= 3 and s_rank == 1:
            slope = f"{node.input[1]}__per_channel_{len(out.graph.node)}"
            out.graph.node.append(onnx.helper.make_node(
                "Unsqueeze", [node.input[1]], [slope], axes=list(range(1, x_rank - 1))))
            node = onnx.helper.make_node("PRelu", [node.input[0], slope], list(node.output), name=node.name)
        out.graph.node.append(node)
    return out
