"""Types and shapes for the walk: onnx's shape inference, helped where it gives up.

Exporters often compute reshape targets from constants at run time (``Mod``, ``Div``, ``Concat`` of
``Unsqueeze``d scalars...) when constant folding was off; onnx's inference cannot see through those,
downstream values lose their rank, and rules that need ranks (MatMul, Gather...) cannot run. When values
still lack shapes after a first pass, the small constant-only subgraphs are evaluated (onnx's reference
evaluator, one node at a time) and inference runs again on a copy where they are initializers. The
model itself only ever gains types and shapes."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

# ops worth evaluating on constants: the shape arithmetic exporters emit
_FOLDABLE = frozenset({
    "Add", "Sub", "Mul", "Div", "Mod", "Neg", "Abs", "Floor", "Ceil", "Sqrt", "Pow", "Max", "Min",
    "Concat", "Unsqueeze", "Squeeze", "Gather", "Slice", "Cast", "Reshape", "Range", "Expand", "Tile",
    "Identity", "Transpose", "Flatten", "Equal", "Less", "Greater", "Not", "And", "Or", "Where",
    "ConstantOfShape", "ReduceProd", "ReduceSum", "ReduceMax", "ReduceMin", "Size",
})
_SMALL = 4096  # elements: only shape-sized tensors are folded
_ONE_D_DATA_PROP_LIMIT = 1_000_000  # data propagation allocates per element of 1-D tensors


def _lacks_shapes(model: ir.Model) -> bool:
    return any(v.dtype is None or v.shape is None for n in model.graph for v in n.outputs)


def infer_missing_types(model: ir.Model) -> None:
    """Fill in the types and shapes of values that lack them (whole types, so sequences stay sequences)."""
    data_prop = not any(
        v.const_value is not None and len(v.const_value.shape) == 1 and v.const_value.shape[0] > _ONE_D_DATA_PROP_LIMIT
        for v in model.graph.initializers.values()
    )
    _merge(model, _infer(model, data_prop, lambda proto: None))
    if _lacks_shapes(model):
        folded = _fold_small_constants(model)
        if folded:
            _merge(model, _infer(model, data_prop, lambda proto: _as_initializers(proto, folded)))
    for _ in range(4):  # each round may unlock the next reshape's target
        if not (_lacks_shapes(model) and _ranks_from_shape_operands(model)):
            break
        _merge(model, _infer(model, data_prop, lambda proto: None))


def _ranks_from_shape_operands(model: ir.Model) -> bool:
    """Give a rank to the outputs of Reshape/Expand/ConstantOfShape whose target is a run-time tensor of
    known length (onnx's inference gives them no shape at all); True when something was learned."""
    learned = False
    for node in model.graph:
        out = node.outputs[0] if node.outputs else None
        if out is None or out.shape is not None or node.domain:
            continue
        target = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0}.get(node.op_type)
        if target is None or len(node.inputs) <= target or node.inputs[target] is None:
            continue
        tshape = node.inputs[target].shape
        if tshape is None or tshape.rank() != 1 or not isinstance(tshape[0], int):
            continue
        rank = tshape[0]
        if node.op_type == "Expand":
            src = node.inputs[0].shape if node.inputs[0] is not None else None
            if src is None:
                continue
            rank = max(rank, src.rank())
        out.shape = ir.Shape([None] * rank)
        learned = True
    return learned


def _infer(model: ir.Model, data_prop: bool, edit: Callable[[onnx.ModelProto], None]) -> ir.Model | None:
    def call(proto: onnx.ModelProto) -> onnx.ModelProto:
        edit(proto)
        return onnx.shape_inference.infer_shapes(proto, strict_mode=False, data_prop=data_prop)

    try:
        return ir.serde.deserialize_model(_c_api_utils.call_onnx_api(call, model))
    except Exception:  # inference is a help, never a requirement
        return None


def _merge(model: ir.Model, inferred: ir.Model | None) -> None:
    if inferred is None:
        return
    for mine, theirs in zip(model.graphs(), inferred.graphs(), strict=False):
        found = ir.convenience.create_value_mapping(theirs)
        for name, v in ir.convenience.create_value_mapping(mine).items():
            w = found.get(name)
            if w is None:
                continue
            if v.type is None and w.type is not None:
                v.type = w.type
            if w.shape is not None and (v.shape is None or _sharper(w.shape, v.shape)):
                v.shape = w.shape


def _sharper(new: ir.Shape, old: ir.Shape) -> bool:
    """True when ``new`` has ``old``'s rank and turns some of its anonymous dimensions into numbers."""
    if new.rank() != old.rank():
        return False
    better = False
    for a, b in zip(new, old, strict=True):
        if isinstance(b, int):
            if a != b:
                return False
        elif isinstance(a, int) and (b.value is None or str(b.value).startswith("unk__")):
            better = True
    return better


def _fold_small_constants(model: ir.Model) -> dict[str, np.ndarray]:
    """Values of the top-level graph computed from constants alone (small ones), by name."""
    from onnx.reference import ReferenceEvaluator

    known: dict[str, np.ndarray] = {}
    for name, v in model.graph.initializers.items():
        if v.const_value is not None and v.const_value.size <= _SMALL:
            known[name] = v.const_value.numpy()
    folded: dict[str, np.ndarray] = {}
    for node in model.graph:
        if node.op_type == "Constant" and not node.domain:
            tensor = ir.convenience.get_const_tensor(node.outputs[0])
            if tensor is not None and tensor.size <= _SMALL:
                known[node.outputs[0].name or ""] = tensor.numpy()
            continue
        if node.domain or node.op_type not in _FOLDABLE:
            continue
        inputs = [v for v in node.inputs if v is not None]
        if not inputs or any(v.name not in known for v in inputs):
            continue
        try:
            proto = ir.serde.serialize_node(node)
            graph = onnx.helper.make_graph(
                [proto], "fold",
                [onnx.helper.make_tensor_value_info(v.name, onnx.helper.np_dtype_to_tensor_dtype(known[v.name].dtype),
                                                    known[v.name].shape) for v in inputs],
                [onnx.helper.make_value_info(o.name, onnx.TypeProto()) for o in node.outputs])
            opset = model.opset_imports.get("", 1)
            single = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
            values = ReferenceEvaluator(single).run(None, {v.name: known[v.name] for v in inputs})
        except Exception:
            continue
        for out, value in zip(node.outputs, values, strict=False):
            array = np.asarray(value)
            if array.size <= _SMALL:
                known[out.name or ""] = array
                folded[out.name or ""] = array
    return folded


def _as_initializers(proto: onnx.ModelProto, folded: dict[str, np.ndarray]) -> None:
    """Make the folded values initializers of ``proto`` and drop the nodes that computed them."""
    keep = [n for n in proto.graph.node if not (n.output and all(o in folded for o in n.output))]
    del proto.graph.node[:]
    proto.graph.node.extend(keep)
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a, name) for name, a in folded.items())
