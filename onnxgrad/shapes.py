"""Types and shapes for the walk: onnx's shape inference, helped where it gives up. The one place for type
inference: the whole model (``infer_missing_types``), one emitted node (``infer_node``) and a function body
(``infer_function_body``).

Exporters often compute reshape targets from constants at run time (``Mod``, ``Div``, ``Concat`` of
``Unsqueeze``d scalars...) when constant folding was off; onnx's inference cannot see through those,
downstream values lose their rank, and rules that need ranks (MatMul, Gather...) cannot run. When values
still lack shapes after a first pass, the small constant-only subgraphs are evaluated (``optimize.fold``,
one node at a time: numpy or onnx's reference evaluator) and inference runs again on a copy where they are
initializers. The model itself only ever gains types and shapes."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
from onnx_ir.passes.common import _c_api_utils

from onnxgrad.optimize import fold

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
    if _lacks_shapes(model) and _experimental_shapes(model):
        _merge(model, _infer(model, data_prop, lambda proto: None))
    folded: dict[str, np.ndarray] = {}
    if _lacks_shapes(model):
        folded = _fold_small_constants(model)
        if folded:
            _merge(model, _infer(model, data_prop, lambda proto: _as_initializers(proto, folded)))
    for _ in range(4):  # each round may unlock the next reshape's target
        if not (_lacks_shapes(model) and _ranks_from_shape_operands(model, folded)):
            break
        _merge(model, _infer(model, data_prop, lambda proto: _as_initializers(proto, folded)))
    if _lacks_shapes(model) and any([outputs_from_bodies(n) for n in model.graph if _lacks_shape(n)]):  # (all)
        _merge(model, _infer(model, data_prop, lambda proto: _as_initializers(proto, folded)))


def _lacks_shape(n: ir.Node) -> bool:
    return any(o.shape is None for o in n.outputs)


def _taken_nodes(nodes: Iterable[ir.Node], folded: dict[str, np.ndarray]) -> Iterable[ir.Node]:
    """``nodes``, each If whose condition folded followed by the nodes of the branch it takes."""
    for node in nodes:
        yield node
        if node.op_type == "If" and not node.domain and node.inputs[0] is not None:
            branch = _taken_branch(node, folded.get(node.inputs[0].name or ""))
            if branch is not None:
                yield from _taken_nodes(branch, folded)


_SAME_AS_INPUT = frozenset({"ImageScaler", "Scale", "ScaledTanh", "ParametricSoftplus", "Affine"})


def _experimental_shapes(model: ir.Model) -> bool:
    """Types and shapes for the outputs of the experimental ops ONNX removed (onnx's inference has no schema for
    them, and tiny-YOLOv2 starts with an ImageScaler: nothing after it had a shape); True when something was
    learned."""
    learned = False
    for node in model.graph:
        x, out = (node.inputs[0] if node.inputs else None), (node.outputs[0] if node.outputs else None)
        if node.domain not in ("", "ai.onnx") or x is None or out is None or out.shape is not None or x.type is None:
            continue
        if node.op_type in _SAME_AS_INPUT:
            out.type, out.shape = x.type, x.shape
        elif node.op_type == "Crop" and x.shape is not None and x.shape.rank() == 4:
            left, top, right, bottom = [*node.attributes.get_ints("border", [0, 0, 0, 0]), 0, 0, 0, 0][:4]
            n, c, h, w = x.shape
            size = node.attributes.get_ints("scale", None)
            if size is not None:
                h, w = size[:2]
            else:
                h = h - top - bottom if isinstance(h, int) else None
                w = w - left - right if isinstance(w, int) else None
            out.type, out.shape = x.type, ir.Shape([n, c, h, w])
        elif node.op_type == "DynamicSlice" and x.shape is not None:
            out.type, out.shape = x.type, ir.Shape([None] * x.shape.rank())
        else:
            continue
        learned = True
    return learned


def _ranks_from_shape_operands(model: ir.Model, folded: dict[str, np.ndarray]) -> bool:
    """Give a rank to the outputs of Reshape/Expand/ConstantOfShape whose target is a run-time tensor of
    known length (onnx's inference gives them no shape at all), and to an If's outputs the shapes of its taken
    branch's (``folded``: the conditions known); True when something was learned."""
    learned = False
    for node in _taken_nodes(model.graph, folded):
        out = node.outputs[0] if node.outputs else None
        if out is None or out.shape is not None or node.domain:
            continue
        branch = _taken_branch(node, folded.get(node.inputs[0].name or "")) if node.op_type == "If" and \
            node.inputs[0] is not None else None
        if branch is not None:
            for o, b in zip(node.outputs, branch.outputs, strict=False):
                if o.shape is None and b.shape is not None:
                    o.shape, learned = b.shape, True
            continue
        learned = rank_from_shape_operand(node) or learned
    return learned


def rank_from_shape_operand(node: ir.Node) -> bool:
    """Give a rank to the output of a Reshape/Expand/ConstantOfShape whose target is a run-time tensor of known
    length (onnx's inference gives it no shape at all); True when it did."""
    out = node.outputs[0] if node.outputs else None
    target = {"Reshape": 1, "Expand": 1, "ConstantOfShape": 0}.get(node.op_type)
    if out is None or out.shape is not None or node.domain or target is None or len(node.inputs) <= target \
            or node.inputs[target] is None:
        return False
    tshape = node.inputs[target].shape  # type: ignore[union-attr]
    if tshape is None or tshape.rank() != 1 or not isinstance(tshape[0], int):
        return False
    rank = tshape[0]
    if node.op_type == "Expand":
        src = node.inputs[0].shape if node.inputs[0] is not None else None
        if src is None:
            return False
        rank = max(rank, src.rank())
    out.shape = ir.Shape([None] * rank)
    return True


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
    """Values of the top-level graph computed from constants alone (small ones), by name (``optimize.fold``),
    the taken branch of an If whose condition folds included."""
    known: dict[str, np.ndarray] = {}
    for name, v in model.graph.initializers.items():
        if v.const_value is not None and v.const_value.size <= _SMALL:
            known[name] = v.const_value.numpy()
    folded: dict[str, np.ndarray] = {}
    _fold_nodes(model.graph, known, folded, model.opset_imports.get("", 1))
    return folded


def _fold_nodes(nodes: Iterable[ir.Node], known: dict[str, np.ndarray], folded: dict[str, np.ndarray],
                opset: int) -> None:
    """Fold ``nodes`` in order into ``known`` (and the values they compute into ``folded``)."""
    for node in nodes:
        if node.domain:
            continue
        if node.op_type == "Constant":
            tensor = ir.convenience.get_const_tensor(node.outputs[0])
            if tensor is not None and tensor.size <= _SMALL:
                known[node.outputs[0].name or ""] = tensor.numpy()
            continue
        if node.op_type == "If":
            cond = known.get(node.inputs[0].name or "") if node.inputs[0] is not None else None
            branch = _taken_branch(node, cond)
            if branch is not None:
                _fold_nodes(branch, known, folded, opset)
            continue
        if node.op_type in ("Shape", "Size"):
            dims = _static_shape(node)
            if dims is not None:
                known[node.outputs[0].name or ""] = folded[node.outputs[0].name or ""] = dims
            continue
        if node.op_type not in _FOLDABLE:
            continue
        inputs = [v for v in node.inputs if v is not None]
        if not inputs or any(v.name not in known for v in inputs):
            continue
        arrays = [None if v is None else known[v.name or ""] for v in node.inputs]
        values = fold(node.op_type, arrays, dict(node.attributes), opset, len(node.outputs))
        if values is None:
            continue
        for out, value in zip(node.outputs, values, strict=False):
            array = np.asarray(value)
            if array.size <= _SMALL:
                known[out.name or ""] = array
                folded[out.name or ""] = array


def _taken_branch(node: ir.Node, cond: np.ndarray | None) -> ir.Graph | None:
    """The branch an If takes on the condition ``cond`` (None: not known)."""
    if cond is None or cond.size != 1 or node.op_type != "If":
        return None
    attr = node.attributes.get("then_branch" if bool(cond.reshape(())) else "else_branch")
    return attr.as_graph() if attr is not None else None


def _static_shape(node: ir.Node) -> np.ndarray | None:
    """The value of ``Shape(x)`` (its start and end applied) or ``Size(x)`` when x's shape is all numbers (a
    ``Shape``'s output has one: its rank, so ``Size(Shape(x))`` folds under symbolic dimensions too), else None."""
    x = node.inputs[0] if node.inputs else None
    if x is None or x.shape is None or not all(isinstance(d, int) for d in x.shape):
        return None
    dims = [int(d) for d in x.shape]
    if node.op_type == "Size":
        return np.array(int(np.prod(dims)), dtype=np.int64)
    start, end = node.attributes.get_int("start", 0), node.attributes.get_int("end", None)
    return np.array(dims[start:end], dtype=np.int64)


def _as_initializers(proto: onnx.ModelProto, folded: dict[str, np.ndarray]) -> None:
    """Make the folded values initializers of ``proto``, drop the nodes that computed them, and put the taken
    branch in place of each If whose condition folded (exporters test ranks at run time: TorchScript's ``tile``
    reshapes x in an If on ``Size(Shape(x)) < len(repeats)``, and inference gives no If output a rank)."""
    keep = [n for n in proto.graph.node if not (n.output and all(o in folded for o in n.output))]
    del proto.graph.node[:]
    proto.graph.node.extend(_inline_known_ifs(keep, folded))
    proto.graph.initializer.extend(onnx.numpy_helper.from_array(a, name) for name, a in folded.items())


def _inline_known_ifs(nodes: list[onnx.NodeProto], folded: dict[str, np.ndarray]) -> list[onnx.NodeProto]:
    """``nodes`` with each If whose condition is in ``folded`` replaced by its taken branch's nodes and an Identity
    per output (only where the branch's names are new to the graph: a copy for inference, never the model)."""
    taken = set()
    for n in nodes:
        taken.update(n.output)
    out: list[onnx.NodeProto] = []
    for n in nodes:
        cond = folded.get(n.input[0]) if n.op_type == "If" and n.domain in ("", "ai.onnx") else None
        if cond is None or cond.size != 1:
            out.append(n)
            continue
        branch = next(a.g for a in n.attribute if a.name == ("then_branch" if bool(cond.reshape(())) else
                                                            "else_branch"))
        names = {o for b in branch.node for o in b.output} | {i.name for i in branch.initializer}
        if names & taken or len(branch.output) != len(n.output):
            out.append(n)
            continue
        taken |= names
        out.extend(_inline_known_ifs([b for b in branch.node if not (b.output and all(o in folded for o in
                                                                                       b.output))], folded))
        out.extend(onnx.helper.make_node("Constant", [], [i.name], value=i) for i in branch.initializer)
        out.extend(onnx.helper.make_node("Identity", [b.name], [o]) for b, o in zip(branch.output, n.output,
                                                                                    strict=True) if o)
    return out


# ------------------------------------------------------------------------------- one node, function bodies
def type_proto(v: ir.Value | None) -> onnx.TypeProto:
    """v's tensor type (and shape, where known) as an onnx TypeProto; an empty one when its dtype is unknown."""
    if v is None or v.dtype is None:
        return onnx.TypeProto()
    dims: list[Any] | None = None
    if v.shape is not None:
        dims = [d if isinstance(d, int) else (d.value if isinstance(d, ir.SymbolicDim) else None) for d in v.shape]
    return onnx.helper.make_tensor_type_proto(int(v.dtype), dims)


def shape_from(t: onnx.TypeProto) -> ir.Shape | None:
    """The shape a tensor TypeProto holds (dimensions as ints, named symbols or None), or None."""
    if not t.HasField("tensor_type") or not t.tensor_type.HasField("shape"):
        return None
    dims: list[Any] = []
    for d in t.tensor_type.shape.dim:
        if d.HasField("dim_value"):
            dims.append(d.dim_value)
        else:
            dims.append(ir.SymbolicDim(d.dim_param) if d.dim_param else None)
    return ir.Shape(dims)


def infer_node(node: ir.Node, opset: int) -> None:
    """Fill in the output types and shapes of one node by onnx's per-node inference (constant inputs as data);
    a node that inference cannot type keeps what it has."""
    if all(o.shape is not None and o.dtype is not None for o in node.outputs):
        return
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, node.domain)
        types = {v.name: type_proto(v) for v in node.inputs if v is not None and v.name}
        data = {v.name: onnx.numpy_helper.from_array(t.numpy(), v.name) for v in node.inputs
                if v is not None and v.name and (t := ir.convenience.get_const_tensor(v)) is not None}
        inferred = onnx.shape_inference.infer_node_outputs(schema, ir.serde.serialize_node(node), types, data)
    except Exception:  # shapes help the rules: inference is never a requirement
        return
    for o in node.outputs:
        t = inferred.get(o.name or "")
        if t is None:
            continue
        if o.dtype is None and t.tensor_type.elem_type:
            o.dtype = ir.DataType(t.tensor_type.elem_type)
        if o.shape is None:
            o.shape = shape_from(t)


def infer_function_body(body: onnx.FunctionProto, node: ir.Node) -> dict[str, ir.Shape]:
    """Shapes of the values of a function body (its subgraphs' too), by name, from onnx shape inference on the
    types of the node that calls it."""
    inputs = [onnx.helper.make_value_info(name, type_proto(v))
              for name, v in zip(body.input, node.inputs, strict=False) if v is not None]
    outputs = [onnx.helper.make_value_info(name, onnx.TypeProto()) for name in body.output if name]
    graph = onnx.helper.make_graph(list(body.node), "body", inputs, outputs)
    model = onnx.helper.make_model(graph, opset_imports=list(body.opset_import), ir_version=10)
    shapes: dict[str, ir.Shape] = {}
    try:
        _collect_shapes(onnx.shape_inference.infer_shapes(model, data_prop=True).graph, shapes)
    except Exception:  # shapes help the rules: inference is never a requirement
        pass
    return shapes


def _collect_shapes(graph: onnx.GraphProto, out: dict[str, ir.Shape]) -> None:
    """The shapes of ``graph``'s inputs, outputs and value_info, and those of its subgraphs, by name."""
    for vi in [*graph.input, *graph.value_info, *graph.output]:
        shape = shape_from(vi.type)
        if shape is not None:
            out.setdefault(vi.name, shape)
    for n in graph.node:
        for a in n.attribute:
            if a.type == onnx.AttributeProto.GRAPH:
                _collect_shapes(a.g, out)
            for g in a.graphs:
                _collect_shapes(g, out)


def _merged(a: ir.Shape | None, b: ir.Shape | None) -> ir.Shape | None:
    """The dims two shapes agree on (None elsewhere), or None when the ranks differ or one is unknown."""
    if a is None or b is None or a.rank() != b.rank():
        return None
    return ir.Shape([d if isinstance(d, int) and d == e else None for d, e in zip(a, b, strict=True)])


def outputs_from_bodies(n: ir.Node) -> bool:
    """Fill in missing dtypes and shapes of an If, Loop or Scan node's outputs from its bodies' outputs (onnx's
    inference gives none when the bodies read outer values it was not shown, or a carried value changes size);
    True when it filled any."""
    if n.domain or n.op_type not in ("If", "Loop", "Scan"):
        return False
    body = [a.as_graph() for a in n.attributes.values() if a.type == ir.AttributeType.GRAPH]
    if n.op_type == "If":
        found = [(t.dtype, _merged(t.shape, e.shape)) for t, e in zip(*(b.outputs for b in body), strict=False)]
    elif n.op_type == "Loop":
        n_state = len(n.inputs) - 2
        outs = list(body[0].outputs)[1:]
        found = [(o.dtype, _merged(o.shape, n.inputs[2 + k].shape) if k < n_state else  # type: ignore[union-attr]
                  None if o.shape is None else ir.Shape([None, *o.shape])) for k, o in enumerate(outs)]
    else:
        n_state = len(n.inputs) - n.attributes["num_scan_inputs"].as_int()
        outs = list(body[0].outputs)
        given = n.attributes.get("scan_output_axes")
        axes = list(given.as_ints()) if given is not None else [0] * (len(outs) - n_state)
        found = []
        for k, o in enumerate(outs):
            shape = o.shape
            if k >= n_state and shape is not None:
                dims = list(shape)
                dims.insert(int(axes[k - n_state]) % (len(dims) + 1), None)
                shape = ir.Shape(dims)
            found.append((o.dtype, shape))
    filled = False
    for o, (dtype, shape) in zip(n.outputs, found, strict=False):
        if o.dtype is None and dtype is not None:
            o.dtype, filled = dtype, True
        if o.shape is None and shape is not None:
            o.shape, filled = shape, True
    return filled
