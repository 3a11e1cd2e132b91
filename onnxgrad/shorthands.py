"""The ``@weights`` and ``@inputs`` shorthands for ``xs``: every float initializer, every float graph input that
is not an initializer. They read names and types only, never a tensor's data."""

from __future__ import annotations

from collections.abc import Iterable

import onnx
import onnx_ir as ir

from onnxgrad.emitter import FLOAT_TYPES

WEIGHTS = "@weights"
INPUTS = "@inputs"
SHORTHANDS = {WEIGHTS: "every float initializer", INPUTS: "every float graph input that is not an initializer"}

ModelLike = onnx.ModelProto | ir.Model


def dtype_of(v: ir.Value) -> ir.DataType | None:
    """A value's dtype, or its initializer tensor's when the value has none."""
    if v.dtype is not None:
        return v.dtype
    return v.const_value.dtype if v.const_value is not None else None


def float_weights(model: ModelLike) -> list[str]:
    """Names of the float initializers of the main graph, in file order."""
    if isinstance(model, onnx.ModelProto):
        floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
        return [t.name for t in model.graph.initializer if t.data_type in floats]
    return [name for name, v in model.graph.initializers.items() if dtype_of(v) in FLOAT_TYPES]


def float_inputs(model: ModelLike) -> list[str]:
    """Names of the float graph inputs that are not initializers (what a caller feeds)."""
    if isinstance(model, onnx.ModelProto):
        init = {t.name for t in model.graph.initializer}
        floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
        return [i.name for i in model.graph.input
                if i.name not in init and i.type.tensor_type.elem_type in floats]
    return [v.name or "" for v in model.graph.inputs if not v.is_initializer() and dtype_of(v) in FLOAT_TYPES]


def expand_xs(model_proto: ModelLike, names: Iterable[str]) -> list[str]:
    """``names`` with ``@weights`` (every float initializer) and ``@inputs`` (every float graph input
    that is not an initializer) replaced by the names they stand for; duplicates dropped, order kept.

    Other names pass through unchanged (``gradients`` checks them). A shorthand that stands for nothing,
    or an unknown ``@word``, is a ``ValueError``."""
    out: list[str] = []
    for name in names:
        if name == WEIGHTS:
            found = float_weights(model_proto)
        elif name == INPUTS:
            found = float_inputs(model_proto)
        elif name.startswith("@"):
            known = ", ".join(f"{k} ({v})" for k, v in SHORTHANDS.items())
            raise ValueError(f"unknown shorthand {name!r} in xs; known: {known}")
        else:
            found = [name]
        if not found:
            what = "float initializers (weights)" if name == WEIGHTS else "float graph inputs"
            raise ValueError(f"{name}: the model has no {what}")
        out.extend(found)
    return list(dict.fromkeys(out))
