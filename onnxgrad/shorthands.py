"""The ``@weights`` and ``@inputs`` shorthands for ``xs``: the trainable weights, and every float graph input that
is not an initializer.

``@weights`` is a float initializer of the main graph that some node reads as a weight: a weight input of a layer
(the filter and bias of Conv / ConvTranspose, every operand of Gemm / MatMul / Einsum, the scale and bias of a
normalization, PRelu's slope, the W / R / B / P of LSTM / GRU / RNN), the table of an embedding (Gather's data), or
an operand of any other op (a bias added, a gain multiplied, a token concatenated, the sigma of a potential) that
holds no mask-like value. Reads through Identity, Cast, Transpose, Reshape, Flatten, (Un)Squeeze, Expand, Tile and
Slice count as the reads they feed. Left out, with the reason (``onnxgrad info`` lists them): the running statistics
of BatchNormalization, exponents (Pow), bounds (Clip), pad values, quantization scales, resize scales, dropout
ratios, the initial states of recurrent layers, tensors read only for their shape (tf2onnx's kernel copies), masks
(values of -inf, NaN or at least 1e8 in magnitude) and initializers no node reads. Only the tensors whose role is
ambiguous (an operand of an elementwise op) are read, to look for mask values (its first ``MASK_PROBE`` values
only); every other decision reads names, types and shapes."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir

from onnxgrad.api import GradientNote
from onnxgrad.emitter import FLOAT_TYPES

WEIGHTS = "@weights"
INPUTS = "@inputs"
SHORTHANDS = {WEIGHTS: "every trainable float weight", INPUTS: "every float graph input that is not an initializer"}

ModelLike = onnx.ModelProto | ir.Model

ALL = -1  # every input position
# the inputs that are a layer's weights, by position
WEIGHT_INPUTS: dict[str, frozenset[int]] = {
    "Conv": frozenset({1, 2}), "ConvTranspose": frozenset({1, 2}), "Gemm": frozenset({0, 1, 2}),
    "MatMul": frozenset({0, 1}), "Einsum": frozenset({ALL}), "BatchNormalization": frozenset({1, 2}),
    "InstanceNormalization": frozenset({1, 2}), "LayerNormalization": frozenset({1, 2}),
    "GroupNormalization": frozenset({1, 2}), "RMSNormalization": frozenset({1}), "PRelu": frozenset({1}),
    "LSTM": frozenset({1, 2, 3, 7}), "GRU": frozenset({1, 2, 3}), "RNN": frozenset({1, 2, 3}),
    "Gather": frozenset({0}), "GatherElements": frozenset({0}), "GatherND": frozenset({0}),
}
# inputs that hold a constant of the computation, not a weight, and what each is
CONSTANT_INPUTS: dict[str, dict[int, str]] = {
    "BatchNormalization": {3: "running mean of BatchNormalization (a statistic, not trained)",
                           4: "running variance of BatchNormalization (a statistic, not trained)"},
    "Pow": {1: "exponent of Pow"},
    "Clip": {1: "lower bound of Clip", 2: "upper bound of Clip"},
    "Pad": {2: "pad value of Pad"},
    "Resize": {1: "roi of Resize", 2: "scales of Resize"},
    "Upsample": {1: "scales of Upsample"},
    "Dropout": {1: "ratio of Dropout"},
    "DequantizeLinear": {1: "quantization scale"}, "QuantizeLinear": {1: "quantization scale"},
    "LSTM": {5: "initial state of LSTM", 6: "initial state of LSTM"},
    "GRU": {5: "initial state of GRU"}, "RNN": {5: "initial state of RNN"},
    "Shape": {0: "read only for its shape (Shape)"}, "Size": {0: "read only for its size (Size)"},
}
# ops that pass a tensor on (their data input) without making it something else: the reads after them count
PASS_THROUGH = frozenset({"Identity", "Cast", "Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Expand",
                          "Tile", "Slice"})
MASK_MAGNITUDE = 1e8  # no trained weight is this large; masks use -inf, finfo.min or -1e9
MASK_PROBE = 2**16  # values read from the start of an ambiguous initializer to look for mask values


@dataclass(frozen=True)
class LeftOut:
    """A float initializer that ``@weights`` does not stand for, and why."""

    name: str
    reason: str


def dtype_of(v: ir.Value) -> ir.DataType | None:
    """A value's dtype, or its initializer tensor's when the value has none."""
    if v.dtype is not None:
        return v.dtype
    return v.const_value.dtype if v.const_value is not None else None


def _as_ir(model: ModelLike) -> ir.Model:
    return ir.serde.deserialize_model(model) if isinstance(model, onnx.ModelProto) else model


def _mask_like(v: ir.Value) -> bool:
    """Whether the initializer holds a NaN, an infinity or a value of magnitude ``MASK_MAGNITUDE`` or more among its
    first ``MASK_PROBE`` values (a causal mask has them in its first row; a weight in external data is memory-mapped
    and only those pages are read)."""
    t = v.const_value
    if t is None:
        return False
    try:
        head = np.asarray(t.numpy().reshape(-1)[:MASK_PROBE], dtype=np.float64)
    except Exception:  # a dtype numpy cannot widen (float8): not a mask format exporters use
        return False
    return bool(head.size) and not bool(np.all(np.abs(head) < MASK_MAGNITUDE))


def _roles(v: ir.Value, depth: int = 0) -> Iterable[tuple[str, int]]:
    """(op_type, input position) of every read of ``v``, looking through pass-through ops."""
    for use in v.uses():
        node, k = use.node, use.idx
        if node.domain in ("", "ai.onnx") and node.op_type in PASS_THROUGH and k == 0 and depth < 8:
            for out in node.outputs:
                yield from _roles(out, depth + 1)
            continue
        yield node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}::{node.op_type}", k


def weight_role(v: ir.Value) -> str | None:
    """None when the float initializer ``v`` is a trainable weight, else the reason it is left out."""
    roles = list(_roles(v))
    if not roles:
        return "read by no node"
    reasons: list[str] = []
    for op, k in roles:
        positions = WEIGHT_INPUTS.get(op, frozenset())
        if k in positions or ALL in positions:
            return None
        if k in CONSTANT_INPUTS.get(op, {}):
            reasons.append(CONSTANT_INPUTS[op][k])
            continue
        if op in WEIGHT_INPUTS:  # a layer's other input: its data or a setting
            reasons.append(f"input {k} of {op}, not a weight input")
            continue
        if _mask_like(v):
            reasons.append(f"a mask (holds -inf, NaN or values of magnitude {MASK_MAGNITUDE:.0e} or more) read by {op}")
            continue
        return None
    return reasons[0]


def select_weights(model: ModelLike) -> tuple[list[str], list[LeftOut]]:
    """The trainable float weights of the main graph in file order, and the float initializers left out with why."""
    m = _as_ir(model)
    chosen: list[str] = []
    left: list[LeftOut] = []
    for name, v in m.graph.initializers.items():
        if dtype_of(v) not in FLOAT_TYPES:
            continue
        why = weight_role(v)
        if why is None:
            chosen.append(name)
        else:
            left.append(LeftOut(name, why))
    return chosen, left


def float_weights(model: ModelLike) -> list[str]:
    """Names of the trainable float weights (``@weights``), in file order."""
    return select_weights(model)[0]


def float_inputs(model: ModelLike) -> list[str]:
    """Names of the float graph inputs that are not initializers (what a caller feeds)."""
    if isinstance(model, onnx.ModelProto):
        init = {t.name for t in model.graph.initializer}
        floats = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
        return [i.name for i in model.graph.input
                if i.name not in init and i.type.tensor_type.elem_type in floats]
    return [v.name or "" for v in model.graph.inputs if not v.is_initializer() and dtype_of(v) in FLOAT_TYPES]


def expand_xs(model_proto: ModelLike, names: Iterable[str]) -> list[str]:
    """``names`` with ``@weights`` (the trainable float weights) and ``@inputs`` (every float graph input that is
    not an initializer) replaced by the names they stand for; duplicates dropped, order kept.

    Other names pass through unchanged (``gradients`` checks them). An unknown ``@word`` is a ``ValueError``; so is
    a shorthand that stands for nothing when nothing else is left; when other names remain it is a
    ``GradientNote``."""
    out: list[str] = []
    empty: list[str] = []
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
            empty.append(name)
        out.extend(found)
    for name in empty:
        what = "trainable float weights" if name == WEIGHTS else "float graph inputs"
        if not out:
            raise ValueError(f"{name}: the model has no {what}")
        warnings.warn(f"{name} stands for nothing: the model has no {what}", GradientNote, stacklevel=2)
    return list(dict.fromkeys(out))
