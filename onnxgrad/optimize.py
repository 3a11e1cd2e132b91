"""Clean-up of the gradient graph, on the new nodes only (the forward part is never touched).

It happens as the graph is built: the emitter asks ``simplify`` before it creates a node, and takes the
value it returns instead of the node. Together with what the emitter already does (identical ops shared,
nodes no gradient needs dropped at commit), that covers the usual clean-up passes in one linear sweep:

* constant folding: an op whose inputs are all constants (Constant nodes, small initializers) and whose
  result is small becomes a Constant (``ReduceSum`` of a ones seed, index arithmetic on constants...).
  ``fold`` is onnxgrad's one constant folder: shapes.py folds the forward graph's shape arithmetic with it;
* identities with fills: ``x * 1``, ``x / 1``, ``x + 0``, ``x - 0``, ``x ^ 1`` are ``x``; ``1 * w`` with ``w``
  broadcast to a larger shape is ``Expand(w)`` (so a large ones seed does not stay in the model); ``x ^ 2`` is
  ``x * x`` and ``x ^ -1`` is ``Reciprocal(x)`` (onnxruntime's Pow is slow for any other exponent than 2);
* shape no-ops: ``Reshape`` to a value's own static shape, ``Reshape`` of a ``Reshape``, ``Transpose``
  by the identity or of a ``Transpose``, ``Squeeze`` of an ``Unsqueeze`` on the same axes (and back),
  ``Cast`` to a value's own dtype, ``Neg`` of a ``Neg``;
* a ``Reshape`` target's -1 written out where x's dims fix it, and ``[0, -1]`` as ``Flatten(x, 1)`` where they
  do not: beside a run-time size 0 (a detector's empty batch of boxes) a -1 is ambiguous, and onnxruntime refuses;
* ``Squeeze(ReduceSum(x, axes, keepdims=1), axes)`` is one ``ReduceSum(x, axes, keepdims=0)``;
* ``Transpose`` of a ``Concat`` (or of a ``Reshape`` splitting a Concat's first axis) whose pieces it moves only
  along size-1 axes is a ``Concat`` of the reshaped pieces along the moved axis: one copy instead of two;
* ``Transpose`` of a float32 ``MatMul``'s last two axes is the ``MatMul`` of its inputs transposed, swapped
  (onnxruntime folds input transposes into its FusedMatMul);
* the ``Sum`` of ``ScatterND`` into zeros at disjoint constant rows that cover the first axis (a tensor
  split with Gathers, e.g. the q/k/v of PyTorch's attention) is a ``Concat`` of the updates;
* shape arithmetic: ``Shape(u)`` (and ``Gather`` of constant indices from it) of known static dims is a
  constant; ``shape_dims`` reads the dims (ints, or named symbols such as a dynamic batch) that a shape value
  built from ``Shape``/``Gather``/``Concat`` holds, so that a run-time seed or zeros (``ConstantOfShape``) of a
  symbolic shape is known for what it is (``x * ones`` -> ``x``, the ScatterND sum above), ``Reshape`` to
  ``Shape(u)`` becomes a constant target (0 for a matching symbol, one -1), and ``ConstantOfShape``,
  ``Expand`` and ``MatMul`` outputs get shapes (so the walk's unbroadcast needs no run-time form).

A rewrite only ever returns a value made by the same ``gradients()`` call (never a forward value: the
caller may name or shape what it gets back).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import onnx
import onnx_ir as ir

if TYPE_CHECKING:
    from onnxgrad.emitter import Emitter

FOLD_LIMIT = 1 << 16  # largest constant (elements) that folding may create
READ_LIMIT = 1 << 22  # largest initializer folding may read (weights are left to the runtime)

Inputs = Sequence[ir.Value | None]
Rewrite = Callable[["Emitter", Inputs, dict[str, Any]], "ir.Value | None"]


# ---------------------------------------------------------------------------------------------- probes
def is_new(v: ir.Value | None) -> bool:
    """True for a value made by the gradients() call in progress (its node is not in a graph yet)."""
    if v is None:
        return False
    node = v.producer()
    return node is not None and node.graph is None


def const_array(v: ir.Value | None) -> np.ndarray | None:
    """The value of a Constant node's output, or of an integer initializer (shapes, indices).

    Float initializers are weights: callers differentiate with respect to them and move them (a checker
    turns them into inputs), so nothing computed from them is ever folded."""
    if v is None:
        return None
    node = v.producer()
    if node is not None:
        if node.op_type != "Constant" or node.domain != "":
            return None
        held = node.attributes.get("value")  # the emitter's own constants: read directly (the general look-up
        if held is not None and isinstance(held.value, ir.Tensor):  # below checks protocols, 30% of a build)
            return None if held.value.dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED) else held.value.numpy()
    elif v.const_value is None or v.is_graph_input() or v.dtype is None or v.dtype.is_floating_point() \
            or getattr(v.const_value, "size", READ_LIMIT + 1) > READ_LIMIT:
        return None
    try:
        tensor = ir.convenience.get_const_tensor(v)
    except ValueError:
        return None
    if tensor is None or tensor.dtype in (ir.DataType.STRING, ir.DataType.UNDEFINED):
        return None
    return tensor.numpy()


def fill_value(v: ir.Value | None) -> tuple[float, tuple[int, ...]] | None:
    """(value, shape) when v is a tensor filled with one number: a uniform Constant or a ConstantOfShape
    of a constant shape."""
    if v is None:
        return None
    node = v.producer()
    if node is None:
        return None
    if node.op_type == "Constant":
        array = const_array(v)
        if array is None or array.size == 0 or array.dtype.kind not in "fiu":
            return None
        first = array.flat[0]
        if array.size > 1 and not np.all(array == first):
            return None
        return float(first), tuple(array.shape)
    if node.op_type == "ConstantOfShape" and node.domain == "":
        shape = const_array(node.inputs[0])
        if shape is None:
            return None
        attr = node.attributes.get("value")
        fill = 0.0 if attr is None else float(np.asarray(attr.as_tensor().numpy()).reshape(-1)[0])
        return fill, tuple(int(d) for d in shape.reshape(-1))
    return None


def _dims(v: ir.Value) -> list[Any] | None:
    return None if v.shape is None else list(v.shape)


def _static(v: ir.Value) -> tuple[int, ...] | None:
    dims = _dims(v)
    if dims is None or not all(isinstance(d, int) for d in dims):
        return None
    return tuple(dims)


def _keeps_shape(a: ir.Value, fill_shape: tuple[int, ...]) -> bool:
    """True when broadcasting a against a tensor of ``fill_shape`` gives a's own shape."""
    if not fill_shape:
        return True
    dims = _dims(a)
    if dims is None or len(fill_shape) > len(dims):
        return False
    tail = dims[len(dims) - len(fill_shape):]
    return all((type(f) is int and f == 1) or _same_dim(d, f) for d, f in zip(tail, fill_shape, strict=True))


def _same_dim(a: Any, b: Any) -> bool:
    """True when two dimensions are known to be equal (ints, or symbols with the same name)."""
    if type(a) is int or type(b) is int:
        return type(a) is int and type(b) is int and a == b
    return a is not None and b is not None and a.value is not None and a.value == b.value


def _dims_of(u: ir.Value | None, start: int = 0, end: int | None = None) -> list[Any] | None:
    """What ``Shape(u, start, end)`` holds, ints or named symbols, when u's dims are known (or u is a Reshape of a
    static value to a constant target with a -1 or 0 in it)."""
    dims = _reshaped_dims(u) if u is not None and (u.shape is None or not _known(u.shape.dims)) else None
    if dims is None and (u is None or u.shape is None or not _known(u.shape.dims)):
        return None
    dims = list(u.shape.dims) if dims is None else dims  # type: ignore[union-attr]
    rank = len(dims)

    def clamp(i: int) -> int:
        return max(0, min(rank, i + rank if i < 0 else i))

    return dims[clamp(int(start)):rank if end is None else clamp(int(end))]


def _reshaped_dims(v: ir.Value) -> list[Any] | None:
    """v's dims when v = Reshape(x, constant target) with x static (the -1 and 0 of the target resolved)."""
    node = v.producer()
    if node is None or node.op_type != "Reshape" or node.domain != "" or len(node.inputs) < 2 \
            or node.inputs[0] is None:
        return None
    source, target = _static(node.inputs[0]), const_array(node.inputs[1])
    if source is None or target is None:
        return None
    out = _reshape_target(source, target.reshape(-1).tolist(), bool(_node_attr(node, "allowzero", 0)))
    return None if out is None else list(out)


def shape_dims(v: ir.Value | None) -> list[Any] | None:
    """The dims a 1-D int64 shape value holds, ints or named symbols, when the graph knows them: a constant,
    ``Shape(u)`` of a u of known dims, ``Gather`` of constant indices from one, a ``Concat`` of them."""
    if v is None:
        return None
    array = const_array(v)
    if array is not None:
        return [int(d) for d in array.reshape(-1)] if array.ndim == 1 and array.dtype.kind in "iu" else None
    node = v.producer()
    if node is None or node.domain != "":
        return None
    if node.op_type == "Shape":
        return _dims_of(node.inputs[0], _node_attr(node, "start", 0), _node_attr(node, "end"))
    if node.op_type == "Gather" and int(_node_attr(node, "axis", 0)) == 0:
        data, idx = shape_dims(node.inputs[0]), const_array(node.inputs[1])
        if data is None or idx is None or idx.ndim != 1 or not np.all((idx >= -len(data)) & (idx < len(data))):
            return None
        return [data[int(i)] for i in idx]
    if node.op_type == "Concat":
        parts = [shape_dims(p) for p in node.inputs]
        return None if any(p is None for p in parts) else [d for p in parts for d in p]  # type: ignore[union-attr]
    return None


def run_time_fill(v: ir.Value | None) -> tuple[float, tuple[Any, ...]] | None:
    """(value, dims) when v is ``ConstantOfShape(s)`` of a shape value s whose dims are known (``shape_dims``): ints
    or named symbols (a seed or zeros of a value's run-time shape under a symbolic batch)."""
    node = None if v is None else v.producer()
    if node is None or node.op_type != "ConstantOfShape" or node.domain != "":
        return None
    dims = shape_dims(node.inputs[0])
    if dims is None:
        return None
    attr = node.attributes.get("value")
    fill = 0.0 if attr is None else float(np.asarray(attr.as_tensor().numpy()).reshape(-1)[0])
    return fill, tuple(dims)


def _attr(attrs: dict[str, Any], name: str, default: Any = None) -> Any:
    value = attrs.get(name, default)
    return default if value is None else value


def _axes(em: Emitter, inputs: Inputs, attrs: dict[str, Any], index: int = 1) -> list[int] | None:
    """Axes given as attribute (older opsets) or as a constant input; None when not known."""
    if len(inputs) > index and inputs[index] is not None:
        array = const_array(inputs[index])
        return None if array is None else [int(a) for a in array.reshape(-1)]
    axes = attrs.get("axes")
    return None if axes is None else [int(a) for a in axes]


# --------------------------------------------------------------------------------------------- shapes
_UNARY = frozenset({
    "Abs", "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "Cast", "Ceil", "Celu", "Cos", "Cosh", "Elu", "Erf",
    "Exp", "Floor", "HardSigmoid", "HardSwish", "Identity", "IsInf", "IsNaN", "LeakyRelu", "Log", "LogSoftmax",
    "Mish", "Neg", "Not", "Reciprocal", "Relu", "Round", "Selu", "Sigmoid", "Sign", "Sin", "Sinh", "Softmax",
    "Softplus", "Softsign", "Sqrt", "Tan", "Tanh", "ThresholdedRelu",
})
_BROADCAST = frozenset({
    "Add", "And", "BitShift", "Div", "Equal", "Greater", "GreaterOrEqual", "Less", "LessOrEqual", "Max", "Mean",
    "Min", "Mod", "Mul", "Or", "Pow", "PRelu", "Sub", "Sum", "Where", "Xor",
})


def _known(dims: tuple[Any, ...]) -> bool:
    """Every dim an int or a named symbol."""
    for d in dims:
        if type(d) is not int and d.value is None:
            return False
    return True


def elementwise_shape(op: str, inputs: Inputs) -> ir.Shape | None:
    """The output shape of an elementwise op (or a MatMul, ConstantOfShape, Expand) from its inputs' shapes, or
    None unless every dim is known (an int, or a named symbol that the broadcast does not have to reconcile with
    another)."""
    if op in _UNARY:
        shape = inputs[0].shape if inputs and inputs[0] is not None else None
        return shape if shape is not None and _known(shape.dims) else None
    if op == "MatMul":
        return _matmul_shape(inputs)
    if op in ("ConstantOfShape", "Expand") and inputs and inputs[-1] is not None:
        dims = shape_dims(inputs[-1])
        if dims is None or not _known(tuple(dims)):
            return None
        if op == "ConstantOfShape":
            return ir.Shape(dims)
        return elementwise_shape("Add", [inputs[0], ir.Value(shape=ir.Shape(dims))])
    if op not in _BROADCAST:
        return None
    shapes = [v.shape for v in inputs if v is not None]
    if not shapes or any(s is None for s in shapes):  # not ``None in``: that calls Shape.__eq__
        return None
    shared = shapes[0]
    if all(s is shared for s in shapes):  # one shape object, as rules share them (``out.shape = x.shape``)
        return shared if _known(shared.dims) else None
    all_dims = [s.dims for s in shapes]  # type: ignore[union-attr]
    for dims in all_dims:
        if not _known(dims):
            return None
    first = all_dims[0]
    if all(d == first for d in all_dims[1:]):
        return shared
    rank = max(len(d) for d in all_dims)
    out: list[Any] = []
    for axis in range(rank):
        dim: Any = 1
        for dims in all_dims:
            k = axis - (rank - len(dims))
            if k < 0:
                continue
            d = dims[k]
            if dim == 1 and type(dim) is int:
                dim = d
            elif (type(d) is int and d == 1) or d == dim:
                continue
            elif type(d) is int and type(dim) is not int:
                dim = d  # a symbol broadcast against a size: the size (or a run-time error)
            elif type(dim) is int and type(d) is not int:
                continue
            else:
                return None
        out.append(dim)
    return ir.Shape(out)


def _matmul_shape(inputs: Inputs) -> ir.Shape | None:
    """MatMul's output shape (operands of rank >= 2): the batch axes broadcast, then (rows of a, columns of b)."""
    if len(inputs) != 2 or inputs[0] is None or inputs[1] is None:
        return None
    a, b = inputs[0].shape, inputs[1].shape
    if a is None or b is None or a.rank() < 2 or b.rank() < 2:
        return None
    batch = elementwise_shape("Add", [ir.Value(shape=ir.Shape(list(a.dims[:-2]))),
                                      ir.Value(shape=ir.Shape(list(b.dims[:-2])))])
    if batch is None or not _known((a.dims[-2], b.dims[-1])):
        return None
    return ir.Shape([*batch.dims, a.dims[-2], b.dims[-1]])


# -------------------------------------------------------------------------------------------- folding
def _reshape_target(shape: Sequence[int], target: Sequence[int], allowzero: bool) -> list[int] | None:
    out = [int(d) for d in target]
    if not allowzero:
        for i, d in enumerate(out):
            if d == 0:
                if i >= len(shape):
                    return None
                out[i] = int(shape[i])
    if out.count(-1) > 1:
        return None
    if -1 in out:
        known = int(np.prod([d for d in out if d != -1]))
        total = int(np.prod(shape))
        if known == 0 or total % known:
            return None
        out[out.index(-1)] = total // known
    return out if int(np.prod(out)) == int(np.prod(shape)) else None


def fold(
    op: str, arrays: Sequence[np.ndarray | None], attrs: Mapping[str, Any], opset: int | None = None,
    outputs: int = 1,
) -> list[np.ndarray] | None:
    """The outputs of the ai.onnx op ``op`` applied to constant inputs (None for an absent optional input), or None.

    numpy computes the few ops that index, shape and seed arithmetic uses (``NUMPY_FOLDABLE``); given the
    ``opset``, onnx's reference evaluator computes any other op (and what numpy leaves). Attribute values are
    Python values or ``ir.Attr``. Malformed inputs give None: the runtime reports them in its own words."""
    plain = {k: _attr_value(v) for k, v in attrs.items()}
    if op in NUMPY_FOLDABLE and arrays and arrays[0] is not None:
        try:
            with np.errstate(all="ignore"):
                out = _numpy_fold(op, list(arrays), plain)
        except (ValueError, IndexError, TypeError, KeyError):
            out = None
        if out is not None:
            return [np.asarray(out)]
    return None if opset is None else _reference_fold(op, arrays, attrs, opset, outputs)


def _attr_value(value: Any) -> Any:
    """An attribute's Python value (an ``ir.Attr`` unwrapped; sequences as lists)."""
    if isinstance(value, ir.Attr):
        value = value.value
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    return value


def _reference_fold(
    op: str, arrays: Sequence[np.ndarray | None], attrs: Mapping[str, Any], opset: int, outputs: int
) -> list[np.ndarray] | None:
    """``fold`` by onnx's reference evaluator: the op alone in a model of ``opset``."""
    from onnx.reference import ReferenceEvaluator

    names = [f"in{i}" if a is not None else "" for i, a in enumerate(arrays)]
    outs = [f"out{i}" for i in range(outputs)]
    try:
        node = ir.Node("", op, [None if not n else ir.Value(name=n) for n in names],
                       attributes=ir.convenience.convert_attributes(dict(attrs)), num_outputs=outputs)
        for v, n in zip(node.outputs, outs, strict=True):
            v.name = n
        graph = onnx.helper.make_graph(
            [ir.serde.serialize_node(node)], "fold",
            [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(a.dtype), a.shape)
             for n, a in zip(names, arrays, strict=True) if a is not None],
            [onnx.helper.make_value_info(n, onnx.TypeProto()) for n in outs])
        model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)])
        feeds = {n: a for n, a in zip(names, arrays, strict=True) if a is not None}
        return [np.asarray(v) for v in ReferenceEvaluator(model).run(None, feeds)]
    except Exception:  # an op the evaluator cannot run on these inputs: not folded
        return None


def _numpy_fold(op: str, arrays: list[np.ndarray | None], attrs: dict[str, Any]) -> np.ndarray | None:
    """numpy for the ops in ``NUMPY_FOLDABLE``; None where a dtype or form is not handled."""
    a = arrays[0]
    assert a is not None
    if op in ("Add", "Sub", "Mul"):
        b = arrays[1]
        assert b is not None
        return {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply}[op](a, b).astype(a.dtype)
    if op == "Div" and a.dtype.kind == "f":
        return (a / arrays[1]).astype(a.dtype)
    if op == "Neg":
        return -a
    if op in ("Sqrt", "Reciprocal") and a.dtype.kind == "f":
        return (np.sqrt(a) if op == "Sqrt" else 1.0 / a).astype(a.dtype)
    if op == "Cast":
        to = ir.DataType(int(attrs["to"]))
        if to in (ir.DataType.STRING, ir.DataType.BFLOAT16) or a.dtype.kind not in "fiub":
            return None
        return a.astype(to.numpy())
    if op == "Reshape":
        shape = _reshape_target(a.shape, arrays[1].reshape(-1).tolist(), bool(_attr(attrs, "allowzero", 0)))
        return None if shape is None else a.reshape(shape)
    if op in ("Squeeze", "Unsqueeze"):
        axes = arrays[1].reshape(-1).tolist() if len(arrays) > 1 else attrs.get("axes")
        if op == "Squeeze":
            if axes is None:
                return np.squeeze(a)
            return np.squeeze(a, tuple(int(x) % a.ndim for x in axes))
        rank = a.ndim + len(axes)
        return np.expand_dims(a, tuple(sorted(int(x) % rank for x in axes)))
    if op == "Transpose":
        perm = attrs.get("perm")
        return np.transpose(a, None if perm is None else list(perm))
    if op == "Concat":
        parts = [p for p in arrays if p is not None]
        return np.concatenate(parts, axis=int(attrs["axis"]))
    if op == "ReduceSum":
        axes = arrays[1].reshape(-1).tolist() if len(arrays) > 1 and arrays[1] is not None else attrs.get("axes")
        keep = bool(_attr(attrs, "keepdims", 1))
        if not axes:
            if _attr(attrs, "noop_with_empty_axes", 0):
                return a
            axes = list(range(a.ndim))
        return np.sum(a, axis=tuple(int(x) % a.ndim for x in axes), keepdims=keep).astype(a.dtype)
    if op == "Gather":
        idx = arrays[1]
        assert idx is not None
        axis = int(_attr(attrs, "axis", 0)) % a.ndim
        return np.take(a, np.where(idx < 0, idx + a.shape[axis], idx), axis=axis)
    return None


NUMPY_FOLDABLE = frozenset({"Add", "Sub", "Mul", "Div", "Neg", "Sqrt", "Reciprocal", "Cast", "Reshape", "Squeeze",
                            "Unsqueeze", "Transpose", "Concat", "ReduceSum", "Gather"})


def _try_fold(em: Emitter, op: str, inputs: Inputs, attrs: dict[str, Any]) -> ir.Value | None:
    arrays = [None if v is None else const_array(v) for v in inputs]
    if not arrays or any(a is None for a, v in zip(arrays, inputs, strict=True) if v is not None):
        return None
    if arrays[0] is None:
        return None
    found = fold(op, arrays, attrs)  # numpy only: emission stays fast
    if found is None or found[0].size > FOLD_LIMIT:
        return None
    out = found[0]
    dtype = inputs[0].dtype if op != "Cast" else ir.DataType(int(attrs["to"]))  # type: ignore[union-attr]
    if dtype is None:
        return None
    return em.const(np.asarray(out), dtype=dtype)


# ------------------------------------------------------------------------------------------- rewrites
def _mul(em: Emitter, inputs: Inputs, attrs: dict[str, Any]) -> ir.Value | None:
    """x * 1 -> x; 1 * w -> Expand(w) (w broadcast to the ones' larger shape)."""
    a, b = inputs[0], inputs[1]
    assert a is not None and b is not None
    for x, one in ((a, b), (b, a)):
        fill = fill_value(one) or run_time_fill(one)
        if fill is None or fill[0] != 1.0:
            continue
        if _keeps_shape(x, fill[1]):  # a forward value is passed on through an Identity (free at run time)
            return x if is_new(x) else em.Identity(x)
        xs = _static(x)
        if xs is None or em.opset < 8 or not all(type(d) is int for d in fill[1]):
            continue
        try:
            out_shape = np.broadcast_shapes(xs, fill[1])
        except ValueError:
            return None
        out = em.Expand(x, em.ints(out_shape))
        out.shape = ir.Shape(list(out_shape))
        return out
    return None


def _pow(em: Emitter, inputs: Inputs, attrs: dict[str, Any]) -> ir.Value | None:
    """x^1 -> x; x^2 -> x * x; x^-1 -> 1 / x (exponent a constant fill that leaves x's shape): the same numbers
    (1 / x correctly rounded, std::pow within an ulp of it), and onnxruntime's Pow runs std::pow per element for any
    exponent but 2 (x^1 of a [8, 128, 256] float32: 1.2 ms against 0.1 for a Mul; the power rule writes x^(e-1),
    so each RMSNorm's square, x^2, gets an x^1 in its gradient)."""
    x, e = inputs[0], inputs[1]
    fill = fill_value(e)
    if x is None or fill is None or not _keeps_shape(x, fill[1]) or x.dtype is None \
            or not x.dtype.is_floating_point():
        return None
    if fill[0] == 1.0:
        return x if is_new(x) else em.Identity(x)
    if fill[0] == 2.0:
        return em.Mul(x, x)
    if fill[0] == -1.0:
        return em.Reciprocal(x)
    return None


def _drop_neutral(x: ir.Value | None, c: ir.Value | None, neutral: float) -> ir.Value | None:
    """x, when ``c`` is filled with ``neutral`` and broadcasting it leaves x's shape alone."""
    fill = fill_value(c) or run_time_fill(c)
    if x is not None and fill is not None and fill[0] == neutral and _keeps_shape(x, fill[1]) and is_new(x):
        return x
    return None


def _div(em: Emitter, inputs: Inputs, attrs: dict[str, Any]) -> ir.Value | None:
    """x / 1 -> x"""
    return _drop_neutral(inputs[0], inputs[1], 1.0)


def _add(em: Emitter, inputs: Inputs, attrs: dict[str, Any]) -> ir.Value | None:
    """x + 0 -> x (either side)"""
    return _drop_neutral(inputs[0], inputs[1], 0.0) or _drop_neutral(inputs[1], inputs[0], 0.0)


def _sub(em: Emitter, inputs: Inputs, attrs: dict[str, Any]) -> ir.Value | None:
    """x - 0 -> x"""
    return _drop_neutral(inputs[0], inputs[1], 0.0)


def _producer(v: ir.Value | None, op: str) -> ir.Node | None:
    """v's producer when it is a new (this call's) ``op`` node of the default domain."""
    if v is None or not is_new(v):
        return None
    node = v.producer()
    return node if node is not None and node.op_type == op and node.domain == "" else None


def _neg(em: Emitter, inputs: Inputs, attrs: dict[str, Any]) -> ir.Value | None:
    """-(-x) -> x"""
    inner = _producer(inputs[0], "Neg")
    x = None if inner is None else inner.inputs[0]
    return x if is_new(x) else None


def _cast(em: Emitter, inputs: Inputs, attrs: dict[str, Any]) -> ir.Value | None:
    """Cast(x, dtype(x)) -> x"""
    x = inputs[0]
    if x is not None and x.dtype is not None and int(x.dtype) == int(attrs["to"]) and is_new(x):
        return x
    return None


def _reshape(em: Emitter, inputs: Inputs, attrs: dict[str, Any]) -> ir.Value | None:
    """Reshape(x, shape(x)) -> x; Reshape(Reshape(x, s1), s2) -> Reshape(x, s2); Reshape(x, Shape(u)) -> constant"""
    x, target = inputs[0], inputs[1]
    assert x is not None and target is not None
    allowzero = bool(_attr(attrs, "allowzero", 0))
    shape = const_array(target)
    if shape is None:
        return _reshape_to_known_dims(em, x, target, allowzero)
    shape = shape.reshape(-1)
    dims = _static(x)
    if dims is not None and is_new(x):
        out = _reshape_target(dims, shape.tolist(), allowzero)
        if out is not None and tuple(out) == dims:
            return x
    inner = _producer(x, "Reshape")
    if inner is not None and inner.inputs[0] is not None and (allowzero or not np.any(shape == 0)):
        source = inner.inputs[0]
        source_dims = _static(source)
        if source_dims is not None and is_new(source):
            out = _reshape_target(source_dims, shape.tolist(), allowzero)
            if out is not None and tuple(out) == source_dims:
                return source
        return em.Reshape(source, target, allowzero=attrs.get("allowzero"))
    explicit = None if allowzero else _explicit_target(_dims(x), shape.tolist())
    if explicit is not None:
        return em.Reshape(x, em.ints(explicit))
    if shape.tolist() == [0, -1] and not allowzero:  # the same rows, also where there are none
        return em.Flatten(x, axis=1)
    return None


def _explicit_target(xdims: Sequence[Any] | None, target: list[int]) -> list[int] | None:
    """target with its -1 written out where x's dims fix it (the dims a 0 copies cancel, the rest are ints), else
    None: a -1 beside a run-time size 0 ([0, -1] of x (0, 256, 7, 7), an empty batch of boxes) is ambiguous, and
    onnxruntime refuses it."""
    if xdims is None or target.count(-1) != 1 or len(target) < 2:
        return None
    copied = [i for i, d in enumerate(target) if d == 0]
    if copied and copied[-1] >= len(xdims):
        return None
    rest = [d for i, d in enumerate(xdims) if i not in copied]
    if not all(type(d) is int for d in rest):
        return None
    have, known = int(np.prod(rest)), int(np.prod([d for d in target if d > 0]))
    if have == 0 or have % known:
        return None
    return [have // known if d == -1 else d for d in target]


def _reshape_to_known_dims(em: Emitter, x: ir.Value, target: ir.Value, allowzero: bool) -> ir.Value | None:
    """Reshape(x, Shape(u)) with u's dims known but one or more symbolic -> Reshape(x, constant target): 0 copies
    x's dim where it is the same symbol, one -1 infers the rest (the gradient of a Reshape under a symbolic batch)."""
    dims = shape_dims(target)
    if dims is None or allowzero or not _known(tuple(dims)):
        return None
    xdims = _dims(x) or []
    if dims.count(-1) == 1:  # a -1 of the target itself: known when the other dims account for all of x but ints
        dims[dims.index(-1)] = _inferred_dim(xdims, [d for d in dims if not (type(d) is int and d == -1)])
        if dims.count(None):
            return None
    out: list[int] = []
    for i, d in enumerate(dims):
        if type(d) is int:
            if d < 1:
                return None
            out.append(d)
        elif i < len(xdims) and type(xdims[i]) is not int and _same_dim(xdims[i], d):
            out.append(0)
        else:
            out.append(-1)
    if out.count(-1) > 1:
        return None
    reshaped = em.Reshape(x, em.ints(out))
    reshaped.shape = ir.Shape(dims)
    return reshaped


def _inferred_dim(xdims: Sequence[Any], others: Sequence[Any]) -> int | None:
    """The size a -1 of a Reshape target stands for, given x's dims and the target's other dims (ints, symbols):
    the quotient of their int products once each symbol of one side cancels one of the same name on the other."""
    if not xdims or not _known(tuple(xdims)):
        return None
    names = sorted(d.value for d in xdims if type(d) is not int)
    if names != sorted(d.value for d in others if type(d) is not int):
        return None
    have = int(np.prod([d for d in xdims if type(d) is int]))
    rest = int(np.prod([d for d in others if type(d) is int]))
    return have // rest if rest > 0 and have % rest == 0 else None


def _transpose(em: Emitter, inputs: Inputs, attrs: dict[str, Any]) -> ir.Value | None:
    """Transpose by the identity -> x; Transpose(Transpose(x, p), q) -> Transpose(x, p[q])"""
    x = inputs[0]
    perm = attrs.get("perm")
    if x is None or perm is None:
        return None
    perm = [int(p) for p in perm]
    if perm == list(range(len(perm))):
        return x if is_new(x) else None
    inner = _producer(x, "Transpose")
    inner_perm = None if inner is None else inner.attributes.get("perm")
    if inner is None or inner_perm is None or inner.inputs[0] is None:
        return _transpose_concat(em, x, perm) or _transpose_matmul(em, x, perm)
    first = [int(p) for p in inner_perm.value]
    if len(first) != len(perm):
        return None
    combined = [first[p] for p in perm]
    source = inner.inputs[0]
    if combined == list(range(len(combined))):
        return source if is_new(source) else None
    return em.Transpose(source, perm=combined)


def _concat_pieces(x: ir.Value) -> tuple[list[ir.Value], int, list[tuple[int, ...]]] | None:
    """x as a Concat of static-shaped pieces along one axis: (pieces, axis, their shapes as they sit in x). x is
    a new Concat, or a new Reshape of a Concat along axis 0 of k equal parts into (k, ...), each part then read
    as (1, ...)."""
    node = _producer(x, "Concat")
    if node is not None:
        parts = list(node.inputs)
        shapes = [_known_shape(p) for p in parts]
        if any(sh is None for sh in shapes) or not parts:
            return None
        rank = len(shapes[0])  # type: ignore[arg-type]
        return parts, int(_node_attr(node, "axis")) % rank, shapes  # type: ignore[return-value]
    node, dims = _producer(x, "Reshape"), _static(x)
    inner = None if node is None else _producer(node.inputs[0], "Concat")
    if inner is None or dims is None or int(_node_attr(inner, "axis")) != 0:
        return None
    parts = list(inner.inputs)
    shapes = {_known_shape(p) for p in parts}
    if len(shapes) != 1 or None in shapes or dims[0] != len(parts):
        return None
    (part,) = shapes
    if int(np.prod(part)) != int(np.prod(dims[1:])):  # type: ignore[arg-type]
        return None
    return parts, 0, [(1, *dims[1:])] * len(parts)  # type: ignore[list-item]


def _known_shape(v: ir.Value | None) -> tuple[int, ...] | None:
    """v's static shape, or the one the constant target of the Reshape that made it gives (``_reshaped_dims``, or
    a target of sizes alone)."""
    if v is None:
        return None
    dims = _static(v) or _reshaped_dims(v)
    if dims is None and (node := _producer(v, "Reshape")) is not None:
        target = const_array(node.inputs[1])
        if target is not None and target.ndim == 1 and bool(np.all(target > 0)):
            dims = target.tolist()
    return None if dims is None else tuple(int(d) for d in dims)


def _transpose_concat(em: Emitter, x: ir.Value, perm: list[int]) -> ir.Value | None:
    """Transpose(Concat(q_i, axis a), perm) -> Concat(Reshape(q_i), axis perm.index(a)) where transposing each
    q_i moves only axes of size 1 (a Reshape, no copy): one copy instead of two. PyTorch's attention exports
    stack q, k, v along a new axis and transpose it inward."""
    found = _concat_pieces(x)
    if found is None or x.uses():  # a Concat something else reads already would be made twice
        return None
    pieces, axis, shapes = found
    for shape in shapes:
        if len(shape) != len(perm):
            return None
        moved = [p for p in perm if shape[p] != 1]
        if moved != sorted(moved):
            return None
    reshaped = []
    for piece, shape in zip(pieces, shapes, strict=True):
        target = [shape[p] for p in perm]
        out = em.Reshape(piece, em.ints(target))
        out.shape = ir.Shape(target)
        reshaped.append(out)
    out = em.Concat(*reshaped, axis=perm.index(axis))
    dims = _static(x)
    if dims is not None:
        out.shape = ir.Shape([dims[p] for p in perm])
    return out


def _transpose_matmul(em: Emitter, x: ir.Value, perm: list[int], reused: int = 0) -> ir.Value | None:
    """Transpose(MatMul(a, b) (* scalar)) of the last two axes -> MatMul(b^T, a^T), float32 only: onnxruntime folds
    transposes of a MatMul's inputs into its FusedMatMul (no copy), not one of its output (PyTorch's attention
    exports transpose K before Q K^T, so dK comes out transposed)."""
    n = len(perm)
    if n < 3 or perm != [*range(n - 2), n - 1, n - 2] or x.dtype != ir.DataType.FLOAT or len(x.uses()) > reused:
        return None  # (a value something else reads already would be computed twice)
    scaled = _producer(x, "Mul")
    if scaled is not None:  # (a b) * c with c a single number: c stays outside
        inner, c = scaled.inputs
        ones = None if c is None else _static(c)
        if inner is not None and ones is not None and all(d == 1 for d in ones) and len(ones) <= n \
                and len(inner.uses()) == 1:
            t = _transpose_matmul(em, inner, perm, reused=1)
            return None if t is None else em.Mul(t, c)
        return None
    node = _producer(x, "MatMul")
    if node is None:
        return None
    a, b = node.inputs
    ranks = [None if v is None or v.shape is None else v.shape.rank() for v in (a, b)]
    if a is None or b is None or any(r is None or r < 2 for r in ranks):
        return None

    def swapped(v: ir.Value, rank: int) -> ir.Value:
        last = [*range(rank - 2), rank - 1, rank - 2]
        inner = _producer(v, "Transpose")  # a transpose back: its input, forward value or not (a MatMul reads it)
        if inner is not None and inner.inputs[0] is not None and _node_attr(inner, "perm") == last:
            return inner.inputs[0]
        return em.Transpose(v, perm=last)

    out = em.MatMul(swapped(b, ranks[1]), swapped(a, ranks[0]))  # type: ignore[arg-type]
    dims = _dims(x)
    if dims is not None:
        out.shape = ir.Shape([dims[p] for p in perm])
    return out


def _squeeze(em: Emitter, inputs: Inputs, attrs: dict[str, Any]) -> ir.Value | None:
    """Squeeze(Unsqueeze(x, a), a) -> x; Squeeze(ReduceSum(x, a, keepdims=1), a) -> ReduceSum(x, a, keepdims=0)"""
    axes = _axes(em, inputs, attrs)
    x = inputs[0]
    if axes is None or x is None:
        return None
    unsq = _producer(x, "Unsqueeze")
    if unsq is not None:
        inner_axes = _axes(em, unsq.inputs, {"axes": _node_attr(unsq, "axes")})
        source = unsq.inputs[0]
        if inner_axes is not None and sorted(inner_axes) == sorted(axes) and is_new(source):
            return source
    red = _producer(x, "ReduceSum")
    if red is not None and _node_attr(red, "keepdims", 1) and not _node_attr(red, "noop_with_empty_axes", 0) \
            and len(x.uses()) == 0:  # otherwise the keepdims=1 sum is needed anyway
        red_axes = _axes(em, red.inputs, {"axes": _node_attr(red, "axes")})
        rank = None if x.shape is None else x.shape.rank()
        if red_axes and rank is not None:
            norm = sorted(a % rank for a in red_axes)
            if norm == sorted(a % rank for a in axes) and red.inputs[0] is not None:
                out = em.reduce_sum(red.inputs[0], norm, keepdims=False)
                dims = _dims(x)
                if dims is not None:
                    out.shape = ir.Shape([d for i, d in enumerate(dims) if i not in norm])
                return out
    return None


def _unsqueeze(em: Emitter, inputs: Inputs, attrs: dict[str, Any]) -> ir.Value | None:
    """Unsqueeze(Squeeze(x, a), a) -> x (x had size 1 there)"""
    axes = _axes(em, inputs, attrs)
    sq = _producer(inputs[0], "Squeeze")
    if axes is None or sq is None:
        return None
    inner_axes = _axes(em, sq.inputs, {"axes": _node_attr(sq, "axes")})
    source = sq.inputs[0]
    if inner_axes is None or source is None or source.shape is None:
        return None
    rank = source.shape.rank()
    if sorted(a % rank for a in inner_axes) == sorted(a % rank for a in axes) and is_new(source):
        return source
    return None


def _sum(em: Emitter, inputs: Inputs, attrs: dict[str, Any]) -> ir.Value | None:
    """Sum of pieces placed into zeros that tile an axis -> their Concat: ScatterND(zeros (m, ...), rows, u_i) over
    disjoint runs of rows covering 0..m-1 (a split with Gathers), each Transposed alike (Gathers along another
    axis), or zero Pads of pieces along one axis among other terms (a split with Slices: rotary embeddings' halves)"""
    if len(inputs) < 2:
        return None
    return _sum_scattered(em, inputs) or _sum_transposed(em, inputs) or _sum_padded(em, inputs)


def _sum_transposed(em: Emitter, inputs: Inputs) -> ir.Value | None:
    """Sum(Transpose(s_i, p)) -> Transpose(Concat(u_i), p), the s_i ScatterND pieces that ``_sum_scattered`` joins"""
    nodes = [_producer(v, "Transpose") for v in inputs]
    if any(n is None for n in nodes):
        return None
    perms = {tuple(_node_attr(n, "perm") or ()) for n in nodes}  # type: ignore[arg-type]
    perm = next(iter(perms))
    if len(perms) != 1 or not perm:
        return None
    joined = _sum_scattered(em, [n.inputs[0] for n in nodes])  # type: ignore[union-attr]
    return None if joined is None else em.Transpose(joined, perm=list(perm))


def _sum_padded(em: Emitter, inputs: Inputs) -> ir.Value | None:
    """Sum(..., Pad(u_i) ...) where zero Pads along one axis place the u_i side by side over the whole axis ->
    Sum(..., Concat(u_i)) (the Concat alone when nothing else is summed)"""
    pieces: dict[int, list[tuple[int, int, Any, int]]] = {}  # axis -> (begin, end pad, size, input's index) each
    for k, v in enumerate(inputs):
        placed = _zero_padded(em, v)
        if placed is not None:
            pieces.setdefault(placed[0], []).append((*placed[1:], k))  # type: ignore[arg-type]
    for axis, found in sorted(pieces.items()):
        if len(found) < 2:
            continue
        found.sort(key=lambda t: t[0])
        start, ok = 0, all(type(size) is int for _, _, size, _ in found)
        full = {begin + size + end for begin, end, size, _ in found} if ok else set()
        for begin, _, size, _ in found:
            ok = ok and begin == start
            start += size
        if not ok or len(full) != 1 or start not in full:
            continue
        used = {k for *_, k in found}
        parts = [_producer(inputs[k], "Pad").inputs[0] for *_, k in found]  # type: ignore[union-attr]
        joined = em.Concat(*parts, axis=axis)
        rest = [v for k, v in enumerate(inputs) if k not in used]
        return joined if not rest else em.Sum(*rest, joined)
    return None


def _zero_padded(em: Emitter, v: ir.Value | None) -> tuple[int, int, int, Any] | None:
    """(axis, begin, end, u's size there) when v is a new Pad of u with zeros along one axis (u's other dims known
    alike to v's), else None."""
    node = _producer(v, "Pad")
    if node is None or _node_attr(node, "mode", "constant") not in ("constant", b"constant") or v is None:
        return None
    u = node.inputs[0]
    if em.opset >= 11:
        if len(node.inputs) > 3 and node.inputs[3] is not None:  # axes (opset 18)
            return None
        value = None if len(node.inputs) < 3 or node.inputs[2] is None else const_array(node.inputs[2])
        if len(node.inputs) > 2 and node.inputs[2] is not None and (value is None or np.any(value != 0)):
            return None
        pads = const_array(node.inputs[1]) if len(node.inputs) > 1 else None
    else:
        if float(_node_attr(node, "value", 0.0)) != 0.0:
            return None
        pads = np.asarray(_node_attr(node, "pads"))
    udims, vdims = None if u is None else _dims(u), _dims(v)
    if pads is None or udims is None or vdims is None or pads.size != 2 * len(udims) or len(vdims) != len(udims):
        return None
    rank = len(udims)
    moved = [a for a in range(rank) if pads[a] or pads[a + rank]]
    if len(moved) != 1 or np.any(pads < 0):
        return None
    axis = moved[0]
    if not all(_same_dim(udims[a], vdims[a]) for a in range(rank) if a != axis):
        return None
    return axis, int(pads[axis]), int(pads[axis + rank]), udims[axis]


def _sum_scattered(em: Emitter, inputs: Inputs) -> ir.Value | None:
    """Sum of ScatterND(zeros (m, ...), rows, u_i) over disjoint runs of rows covering 0..m-1 -> Concat(u_i)"""
    if len(inputs) < 2:
        return None
    data, runs = None, []
    for term in inputs:
        node = _producer(term, "ScatterND")
        if node is None or len(node.inputs) != 3 or _node_attr(node, "reduction", "none") not in ("none", "add"):
            return None
        if data is None:
            data = node.inputs[0]
        elif node.inputs[0] is not data:
            return None
        rows = const_array(node.inputs[1])
        if rows is None or rows.ndim != 2 or rows.shape[1] != 1:
            return None
        runs.append((rows.reshape(-1), node.inputs[2]))
    fill = fill_value(data) or run_time_fill(data)
    if fill is None or fill[0] != 0.0 or not fill[1] or type(fill[1][0]) is not int:
        return None
    m = fill[1][0]
    runs = [((r % m if m else r), u) for r, u in runs]
    runs.sort(key=lambda t: int(t[0][0]) if t[0].size else -1)
    flat = np.concatenate([r for r, _ in runs])
    if flat.size != m or not np.array_equal(flat, np.arange(m)):
        return None
    out = em.Concat(*[u for _, u in runs], axis=0)
    out.shape = ir.Shape(list(fill[1]))
    return out


def _slice(em: Emitter, inputs: Inputs, attrs: dict[str, Any]) -> ir.Value | None:
    """Slice that keeps every element (starts 0, ends past the static size, steps 1) -> x; only the sliced axes
    need static sizes (a symbolic batch does not hide a no-op Slice of the spatial axes)"""
    x = inputs[0]
    dims = None if x is None else _dims(x)
    if dims is None or not is_new(x):
        return None
    if len(inputs) > 1:  # opset 10 on: starts, ends, axes, steps as inputs
        arrays = [const_array(v) if v is not None else None for v in inputs[1:5]]
        if arrays[0] is None or arrays[1] is None or any(a is None for a, v in zip(arrays, inputs[1:5], strict=False)
                                                         if v is not None):
            return None
        starts, ends = arrays[0].reshape(-1).tolist(), arrays[1].reshape(-1).tolist()
        axes = arrays[2].reshape(-1).tolist() if len(arrays) > 2 and arrays[2] is not None else list(range(len(starts)))
        steps = arrays[3].reshape(-1).tolist() if len(arrays) > 3 and arrays[3] is not None else [1] * len(starts)
    else:
        starts, ends = list(attrs.get("starts") or []), list(attrs.get("ends") or [])
        axes = list(attrs.get("axes") or range(len(starts)))
        steps = [1] * len(starts)
    for start, end, axis, step in zip(starts, ends, axes, steps, strict=False):
        size = dims[int(axis) % len(dims)]
        if type(size) is not int or step != 1 or not (start == 0 or start <= -size) or end < size:
            return None
    return x


def _shape(em: Emitter, inputs: Inputs, attrs: dict[str, Any]) -> ir.Value | None:
    """Shape(u) -> its dims, when u's (selected) dims are static"""
    dims = _dims_of(inputs[0], _attr(attrs, "start", 0), attrs.get("end"))
    return em.ints(dims) if dims is not None and all(type(d) is int for d in dims) else None


def _gather(em: Emitter, inputs: Inputs, attrs: dict[str, Any]) -> ir.Value | None:
    """Gather(shape, i) -> the dims at i, when those are static (a shape value of a partly symbolic tensor)"""
    if len(inputs) != 2 or int(_attr(attrs, "axis", 0)) != 0:
        return None
    dims, idx = shape_dims(inputs[0]), const_array(inputs[1])
    if dims is None or idx is None or idx.ndim > 1 or not np.all((idx >= -len(dims)) & (idx < len(dims))):
        return None
    picked = [dims[int(i)] for i in idx.reshape(-1)]
    if not all(type(d) is int for d in picked):
        return None
    return em.ints(picked) if idx.ndim == 1 else em.const(np.array(picked[0]), dtype=ir.DataType.INT64)


def _node_attr(node: ir.Node, name: str, default: Any = None) -> Any:
    a = node.attributes.get(name)
    if a is None:
        return default
    value = a.value
    return list(value) if isinstance(value, Sequence) and not isinstance(value, str | bytes) else value


_REWRITES: dict[str, Rewrite] = {
    "Mul": _mul,
    "Pow": _pow,
    "Div": _div,
    "Add": _add,
    "Sub": _sub,
    "Neg": _neg,
    "Cast": _cast,
    "Reshape": _reshape,
    "Transpose": _transpose,
    "Squeeze": _squeeze,
    "Unsqueeze": _unsqueeze,
    "Sum": _sum,
    "Shape": _shape,
    "Gather": _gather,
    "Slice": _slice,
}


def simplify(em: Emitter, op_type: str, inputs: Inputs, attrs: dict[str, Any]) -> ir.Value | None:
    """A value to use instead of emitting ``op_type(inputs, attrs)`` (one output, default domain), or None."""
    rewrite = _REWRITES.get(op_type)
    if rewrite is None and op_type not in NUMPY_FOLDABLE:
        return None
    if not inputs or any(v is None for v in inputs[:1]):
        return None
    if op_type in NUMPY_FOLDABLE and all(v is None or _is_constant_node(v) for v in inputs):
        folded = _try_fold(em, op_type, inputs, attrs)
        if folded is not None:
            return folded
    return None if rewrite is None else rewrite(em, inputs, attrs)


def _is_constant_node(v: ir.Value) -> bool:
    """Cheap pre-check: a Constant output or an initializer (const_array decides the rest)."""
    node = v.producer()
    return (node.op_type == "Constant") if node is not None else v.const_value is not None
