"""A thin builder over onnx_ir that rules emit through: ``em.Mul(a, b)``, ``em.const(...)``, and the
opset-aware helpers, plus the one ``unbroadcast``.

Every opset form lives here: a rule asks for what it wants computed (``em.reduce_sum``, ``em.split``,
``em.scatter_add``, ``em.zeros``, ``em.gemm``...) and the helper picks the op that does it at the model's
opset, or raises a ValueError saying what is missing. Each ai.onnx op is checked against onnx's schema at
that opset when it is emitted, so an op too new for the model is caught at once.

Nothing an emitter builds touches the graph until ``commit``; ``rollback`` detaches it all again.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Collection, Iterable, Iterator, Sequence
from typing import Any

import numpy as np
import onnx.defs
import onnx_ir as ir

from onnxgrad import workarounds
from onnxgrad.optimize import FOLD_LIMIT, elementwise_shape, simplify
from onnxgrad.registry import normalize_domain

FLOAT_TYPES = frozenset(
    {ir.DataType.FLOAT16, ir.DataType.BFLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE}
)
# ops whose outputs depend on their input's shape alone, not its values
SHAPE_ONLY = frozenset({"Shape", "Size", "EyeLike", "RandomUniformLike", "RandomNormalLike"})

_INT64_OUT = frozenset({"Shape", "Size", "NonZero", "ArgMax", "ArgMin"})
_BOOL_OUT = frozenset(
    {"Equal", "Greater", "Less", "GreaterOrEqual", "LessOrEqual", "Not", "And", "Or", "Xor",
     "IsNaN", "IsInf"}
)


def is_float(value: ir.Value) -> bool:
    """True when ``value`` can carry a gradient; an unknown dtype counts as float (never pruned silently)."""
    return value.dtype is None or value.dtype in FLOAT_TYPES


def static_dims(value: ir.Value) -> tuple[int, ...] | None:
    """The shape of ``value`` as ints, or None when any dimension is unknown."""
    shape = value.shape
    if shape is None or not all(isinstance(d, int) for d in shape):
        return None
    return tuple(int(d) for d in shape)  # type: ignore[arg-type]


def subgraphs(node: ir.Node) -> list[ir.Graph]:
    """The graphs held by node's attributes (If branches, Loop and Scan bodies), in attribute order."""
    found: list[ir.Graph] = []
    for a in node.attributes.values():
        if a.type == ir.AttributeType.GRAPH:
            found.append(a.as_graph())
        elif a.type == ir.AttributeType.GRAPHS:
            found.extend(a.as_graphs())
    return found


def implicit_inputs(node: ir.Node) -> list[ir.Value]:
    """The outer-scope values that node's subgraphs (at any depth) read, in order of first use in a depth-first
    walk of the bodies (attributes in node order); [] for a node without subgraphs."""
    subs = subgraphs(node)
    if not subs:
        return []
    inner: set[int] = set()
    for sub in subs:
        inner.add(id(sub))
        inner.update(id(g) for g in sub.subgraphs())
    found: dict[ir.Value, None] = {}
    for sub in subs:
        for n in ir.traversal.RecursiveGraphIterator(sub):
            for v in n.inputs:
                if v is not None and v not in found and id(v.graph) not in inner:
                    found[v] = None
        for v in sub.outputs:  # a body may pass an outer value straight out
            if v not in found and id(v.graph) not in inner:
                found[v] = None
    return list(found)


def rank_of(value: ir.Value) -> int | None:
    """The rank of ``value``, or None when unknown."""
    return None if value.shape is None else value.shape.rank()


def rank(value: ir.Value, node: ir.Node | None = None) -> int:
    """The rank of ``value``; a ValueError naming it (and the node being differentiated) when unknown."""
    r = rank_of(value)
    if r is None:
        where = "" if node is None else f"{node.op_type} '{node.name}': "
        raise ValueError(f"{where}the gradient needs the rank of '{value.name}', which shape inference did not find")
    return r


def swap_with_last(n_axes: int, axis: int) -> list[int]:
    """The permutation of ``n_axes`` axes that swaps ``axis`` with the last one (its own inverse)."""
    perm = list(range(n_axes))
    perm[axis], perm[-1] = perm[-1], perm[axis]
    return perm


Dims = list[int] | ir.Value  # sizes: static ints, or a 1-D int64 value known at run time


@functools.cache
def missing_op(op_type: str, opset: int) -> str | None:
    """Why the ai.onnx op ``op_type`` cannot be emitted at ``opset``, or None when it can."""
    try:
        schema = onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        if not onnx.defs.has(op_type, ""):
            return f"{op_type} is not an ai.onnx operator"
        first = next(v for v in range(opset + 1, onnx.defs.onnx_opset_version() + 1)
                     if _has_version(op_type, v))
        return f"{op_type} does not exist at ai.onnx opset {opset} (it arrived in opset {first})"
    if schema.deprecated:
        return f"{op_type} does not exist at ai.onnx opset {opset} (it was removed in opset {schema.since_version})"
    return None


def _has_version(op_type: str, opset: int) -> bool:
    try:
        onnx.defs.get_schema(op_type, opset, "")
    except onnx.defs.SchemaError:
        return False
    return True


def same_dim(a: object, b: object) -> bool:
    """True when two dimensions are known to be equal (ints, or symbols with the same name)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, ir.SymbolicDim) and isinstance(b, ir.SymbolicDim):
        return a.value is not None and a.value == b.value
    return False


def _agree(x: ir.Value, indices: ir.Value, axis: int) -> bool:
    """True when x and indices are known to have the same dimensions on every axis but ``axis``."""
    if x.shape is None or indices.shape is None or len(x.shape) != len(indices.shape):
        return False
    return all(same_dim(d, e) for i, (d, e) in enumerate(zip(x.shape, indices.shape, strict=True)) if i != axis)


class Emitter:
    """Records new nodes for one ``gradients()`` call, named under ``scope``, valid at ``opset``."""

    def __init__(
        self, graph: ir.Graph, opset: int, scope: str, ir_version: int = 8, aggregation: str = "add_n"
    ) -> None:
        self.graph = graph
        self.ir_version = ir_version
        self.opset = opset
        self.scope = scope
        self.nodes: list[ir.Node] = []
        self.initializers: list[ir.Value] = []
        self._counter = 0
        self._consts: dict[tuple[Any, ...], ir.Value] = {}
        self._shapes: dict[int, ir.Value] = {}
        self._emitted: dict[tuple[Any, ...], tuple[ir.Value, ...]] = {}
        self._keys_of: dict[int, list[tuple[Any, ...]]] = {}  # id of a value -> the CSE keys that hand it out
        self._pinned: set[int] = set()  # ids of values the constant and shape caches hand out
        self._valid_ops: set[str] = set()  # ai.onnx op types already checked against the schema at ``opset``
        self.aggregation = aggregation  # how add_n adds gradient terms: 'add_n' (one Sum), 'tree' or 'accumulate'
        self._floor = 0  # own_nodes: nodes emitted before it are not shared (but Constants)
        self._order: dict[int, int] = {}  # id of an emitted node -> its position in ``nodes``

    # ----------------------------------------------------------------- raw ops
    def fresh_name(self, hint: str) -> str:
        self._counter += 1
        return f"{self.scope}/{hint}_{self._counter}"

    def op(
        self,
        op_type: str,
        *inputs: ir.Value | None,
        _outputs: int = 1,
        _domain: str = "",
        **attrs: Any,
    ) -> Any:
        """Emit one node; returns its output, or a tuple of outputs when ``_outputs > 1``.

        An op identical to one already emitted (same type, inputs and attributes) is not emitted
        twice: its outputs are reused (common subexpressions never reach the graph). An ai.onnx op that
        does not exist at the emitter's opset raises a ValueError."""
        if op_type not in self._valid_ops and _domain in ("", "ai.onnx"):
            self._check_op(op_type)
        if op_type == "Cast" and "to" in attrs and attrs["to"] is None:  # a rule read the dtype of an untyped value
            raise ValueError(f"a Cast of '{inputs[0].name if inputs and inputs[0] is not None else ''}' to the type "
                             "of a value that type inference did not type")
        while inputs and inputs[-1] is None:
            inputs = inputs[:-1]
        key = _cse_key(op_type, _domain, inputs, _outputs, attrs)
        if key is not None and key in self._emitted and self._shareable(self._emitted[key]):
            outs = self._emitted[key]
            return outs[0] if _outputs == 1 else outs
        simpler = simplify(self, op_type, inputs, attrs) if _outputs == 1 and _domain in ("", "ai.onnx") else None
        if simpler is not None:  # folded or a no-op (onnxgrad.optimize); the forward part is never touched
            if key is not None:
                self._remember(key, (simpler,))
            return simpler
        attributes = ir.convenience.convert_attributes(
            {k: v for k, v in attrs.items() if v is not None}
        )
        name = self.fresh_name(op_type)
        node = ir.Node(
            normalize_domain(_domain), op_type, inputs, attributes=attributes,
            num_outputs=_outputs, name=name,
        )
        for i, out in enumerate(node.outputs):
            out.name = name if i == 0 else f"{name}:{i}"
        self._type_outputs(node, attrs)
        self._shape_outputs(node, attrs)
        self._order[id(node)] = len(self.nodes)
        self.nodes.append(node)
        if key is not None:
            self._remember(key, tuple(node.outputs))
        return node.outputs[0] if _outputs == 1 else tuple(node.outputs)

    @contextlib.contextmanager
    def own_nodes(self) -> Iterator[None]:
        """Within, an op is shared only with one emitted inside (or a Constant): a rule that re-emits a node's
        computation and walks those nodes (``nodes[start:]``) then finds every node of it, where sharing would hand
        it a node another rule emitted, off its walk (two LSTMs reading one initial state lost one's gradient)."""
        saved, self._floor = self._floor, len(self.nodes)
        try:
            yield
        finally:
            self._floor = saved

    def _shareable(self, outs: tuple[ir.Value, ...]) -> bool:
        if not self._floor:
            return True
        node = outs[0].producer()
        return node is None or not node.inputs or self._order.get(id(node), self._floor) >= self._floor

    def _remember(self, key: tuple[Any, ...], outs: tuple[ir.Value, ...]) -> None:
        self._emitted[key] = outs
        for out in outs:
            self._keys_of.setdefault(id(out), []).append(key)

    def discard(self, value: ir.Value, since: int, keep: Collection[int] = ()) -> None:
        """Take back ``value``, a result the caller will not use, with whatever only it reads, among the nodes
        emitted since there were ``since`` (but for the values whose ids are in ``keep``): their inputs are
        detached and common-subexpression sharing forgets them, so that the clean-ups that follow count only real
        readers of a value (optimize's guards against computing something twice). Commit would drop them anyway."""
        fresh = {id(n) for n in self.nodes[since:]}
        stack = [value]
        while stack:
            node = stack.pop().producer()
            if node is None or id(node) not in fresh:  # (made before: a forward value, a gradient the walk has)
                continue
            if any(o.uses() or id(o) in self._pinned or id(o) in keep for o in node.outputs):
                continue
            fresh.discard(id(node))
            stack.extend(v for v in node.inputs if v is not None)
            for i in range(len(node.inputs)):
                node.replace_input_with(i, None)
            for out in node.outputs:
                for key in self._keys_of.pop(id(out), []):
                    self._emitted.pop(key, None)

    def _check_op(self, op_type: str) -> None:
        """Raise when the ai.onnx op ``op_type`` does not exist at this opset; remember it when it does."""
        problem = missing_op(op_type, self.opset)
        if problem is not None:
            raise ValueError(
                f"{problem}: a gradient rule or emitter helper asked for it in a model of opset {self.opset}; "
                f"emit it through an Emitter helper that knows an older form, or convert the model to a newer "
                f"opset (onnx.version_converter)"
            )
        self._valid_ops.add(op_type)

    def __getattr__(self, op_type: str) -> Any:
        if not op_type[:1].isupper():
            raise AttributeError(op_type)
        return lambda *inputs, **attrs: self.op(op_type, *inputs, **attrs)

    def _type_outputs(self, node: ir.Node, attrs: dict[str, Any]) -> None:
        op = node.op_type
        out = node.outputs[0]
        if op in _INT64_OUT:
            out.dtype = ir.DataType.INT64
        elif op in _BOOL_OUT:
            out.dtype = ir.DataType.BOOL
        elif op == "Cast":
            out.dtype = ir.DataType(attrs["to"])
        elif op == "Constant":
            out.dtype = attrs["value"].dtype
            out.shape = ir.Shape(attrs["value"].shape)
        elif op == "ConstantOfShape":
            out.dtype = attrs["value"].dtype if "value" in attrs else ir.DataType.FLOAT
        elif op == "CastLike":
            out.dtype = node.inputs[1].dtype  # type: ignore[union-attr]
        elif op == "Where":
            out.dtype = node.inputs[1].dtype  # type: ignore[union-attr]
        else:
            for v in node.inputs:
                if v is not None and v.dtype is not None:
                    out.dtype = v.dtype
                    break
        if op == "Split":
            for o in node.outputs[1:]:
                o.dtype = out.dtype
        if op in ("TopK", "MaxPool") and len(node.outputs) > 1:
            node.outputs[1].dtype = ir.DataType.INT64

    def _shape_outputs(self, node: ir.Node, attrs: dict[str, Any]) -> None:
        """Static shapes (or at least ranks) for the emitted ops whose rank later rules lean on."""
        op, out = node.op_type, node.outputs[0]
        if op == "Reshape" and len(node.inputs) > 1:
            target = self.constant_value(node.inputs[1])
            if target is not None:
                dims = [int(d) for d in np.asarray(target).reshape(-1)]
                out.shape = ir.Shape([d if d > 0 else None for d in dims])
        elif op == "Transpose" and node.inputs[0] is not None and node.inputs[0].shape is not None:
            dims = list(node.inputs[0].shape)
            perm = attrs.get("perm") or list(range(len(dims)))[::-1]
            out.shape = ir.Shape([dims[p] for p in perm])
        elif out.shape is None:  # elementwise ops: the (broadcast) shape of the inputs, when fully known
            out.shape = elementwise_shape(op, node.inputs)

    # --------------------------------------------------------------- constants
    def const(
        self, value: Any, like: ir.Value | None = None, dtype: ir.DataType | None = None
    ) -> ir.Value:
        """A Constant of ``value`` in ``dtype`` (or ``like``'s dtype); identical constants are shared."""
        if dtype is None:
            if like is None or like.dtype is None:
                raise ValueError("const() needs a dtype or a value of known dtype")
            dtype = like.dtype
        array = np.asarray(value).astype(dtype.numpy())
        key = (int(dtype), array.shape, array.tobytes())
        hit = self._consts.get(key)
        if hit is None:
            tensor = ir.tensor(array, dtype=dtype)
            if self.opset >= 9 or dtype in (ir.DataType.FLOAT16, ir.DataType.FLOAT, ir.DataType.DOUBLE):
                hit = self.op("Constant", value=tensor)
            else:  # Constant takes only float tensors before opset 9
                hit = ir.Value(name=self.fresh_name("const"), type=ir.TensorType(dtype),
                               shape=ir.Shape(array.shape), const_value=tensor)
                self.initializers.append(hit)
            self._consts[key] = hit
            self._pinned.add(id(hit))
        return hit

    def ints(self, values: Sequence[int]) -> ir.Value:
        """A 1-D int64 Constant."""
        return self.const(np.asarray(list(values), dtype=np.int64), dtype=ir.DataType.INT64)

    @staticmethod
    def constant_value(value: ir.Value | None) -> np.ndarray | None:
        """The value of an initializer or Constant output, else None."""
        if value is None:
            return None
        tensor = ir.convenience.get_const_tensor(value)
        return None if tensor is None else tensor.numpy()

    # ------------------------------------------------------------------ shapes
    def shape_of(self, x: ir.Value) -> ir.Value:
        """x's shape as an int64 tensor: a Constant when static, a (shared) Shape node otherwise."""
        dims = static_dims(x)
        if dims is not None:
            return self.ints(dims)
        hit = self._shapes.get(id(x))
        if hit is None:
            hit = self.op("Shape", x)
            self._shapes[id(x)] = hit
            self._pinned.add(id(hit))
        return hit

    def reshape_like(self, g: ir.Value, x: ir.Value) -> ir.Value:
        """Reshape g to x's (run-time) shape."""
        out = self.Reshape(g, self.shape_of(x))
        out.shape = x.shape
        return out

    def dim(self, x: ir.Value, axis: int, keepdims: bool = False) -> int | ir.Value:
        """x's size along ``axis``: an int when static, else a Gather of x's Shape (a 0-D int64 scalar, or a
        1-element 1-D tensor with ``keepdims``)."""
        shape = x.shape
        if shape is not None and isinstance(shape[axis], int):
            return int(shape[axis])  # type: ignore[arg-type]
        whole = self.shape_of(x)  # before the index constant: the order the rules used to emit them in
        index = self.ints([axis]) if keepdims else self.const(np.array(axis), dtype=ir.DataType.INT64)
        return self.Gather(whole, index)

    def dims(self, x: ir.Value, axes: Iterable[int]) -> Dims:
        """x's sizes along ``axes``: a list of ints when they are static, else a 1-D int64 value."""
        shape, axes = x.shape, list(axes)
        if shape is not None and all(isinstance(shape[a], int) for a in axes):
            return [int(shape[a]) for a in axes]  # type: ignore[arg-type]
        return self.Gather(self.shape_of(x), self.ints(axes))

    def cat_ints(self, *parts: Dims) -> ir.Value:
        """The 1-D int64 concatenation of static and run-time pieces (one Constant when all are static)."""
        if all(isinstance(p, list) for p in parts):
            return self.ints([i for p in parts for i in p])  # type: ignore[union-attr]
        return self.Concat(*[self.ints(p) if isinstance(p, list) else p for p in parts], axis=0)

    def _as_vector(self, n: int | ir.Value) -> Dims:
        """A size (an int, or a 0-D int64 value) as a 1-element piece for ``cat_ints``."""
        return [n] if isinstance(n, int) else self.Reshape(n, self.ints([1]))

    # -------------------------------------------------- opset-dependent forms
    def reduce(
        self, op: str, x: ir.Value, axes: Sequence[int] | ir.Value | None, keepdims: bool = True
    ) -> ir.Value:
        """``op`` (ReduceSum, ReduceMax, ...) over ``axes`` (None = all), axes as input where the opset wants it."""
        axes_as_input = self.opset >= (13 if op == "ReduceSum" else 18)
        k = int(keepdims)
        if axes is None:
            return self.op(op, x, keepdims=k)
        if isinstance(axes, ir.Value):
            if not axes_as_input:
                raise ValueError(f"{op} with run-time axes needs opset >= 13/18, model has {self.opset}")
            return self.op(op, x, axes, keepdims=k)
        if len(axes) == 0:
            return x
        if axes_as_input:
            return self.op(op, x, self.ints(axes), keepdims=k)
        return self.op(op, x, axes=list(axes), keepdims=k)

    def reduce_sum(
        self, x: ir.Value, axes: Sequence[int] | ir.Value | None, keepdims: bool = True
    ) -> ir.Value:
        return self.reduce("ReduceSum", x, axes, keepdims)

    def unsqueeze(self, x: ir.Value, axes: Sequence[int] | ir.Value) -> ir.Value:
        if isinstance(axes, ir.Value):
            return self.Unsqueeze(x, axes)
        if len(axes) == 0:
            return x
        out = self.Unsqueeze(x, self.ints(axes)) if self.opset >= 13 else self.Unsqueeze(x, axes=list(axes))
        if out.shape is None and x.shape is not None:
            dims: list[Any] = list(x.shape)
            rank = len(dims) + len(axes)
            for a in sorted(a % rank for a in axes):
                dims.insert(a, 1)
            out.shape = ir.Shape(dims)
        return out

    def squeeze(self, x: ir.Value, axes: Sequence[int]) -> ir.Value:
        if len(axes) == 0:
            return x
        if self.opset >= 13:
            return self.Squeeze(x, self.ints(axes))
        return self.Squeeze(x, axes=list(axes))

    def split(self, x: ir.Value, sizes: Sequence[int | ir.Value], axis: int) -> tuple[ir.Value, ...]:
        """x cut along ``axis`` into consecutive pieces of ``sizes`` (ints, or 1-element int64 values known at
        run time): one Split (sizes as input from opset 13), or Slices for run-time sizes before."""
        n = len(sizes)
        static = [s for s in sizes if isinstance(s, int)]
        if len(static) < n and self.opset < 13:
            if self.opset < 10:
                raise ValueError(f"cutting '{x.name}' into pieces of run-time sizes needs opset >= 10 (Slice with "
                                 f"inputs), the model has opset {self.opset}")
            pieces, start = [], self.ints([0])
            for s in sizes:
                end = self.Add(start, self.cat_ints([s] if isinstance(s, int) else s))
                pieces.append(self.Slice(x, start, end, self.ints([axis])))
                start = end
            return tuple(pieces)
        if self.opset >= 13:
            split = self.ints(static) if len(static) == n else self.cat_ints(*[[s] if isinstance(s, int) else s
                                                                                for s in sizes])
            outs = self.op("Split", x, split, axis=axis, _outputs=n)
        else:
            outs = self.op("Split", x, axis=axis, split=static, _outputs=n)
        return (outs,) if n == 1 else outs

    def slice(
        self,
        x: ir.Value,
        starts: Sequence[int],
        ends: Sequence[int],
        axes: Sequence[int],
        steps: Sequence[int] | None = None,
    ) -> ir.Value:
        if self.opset >= 10:
            args = [x, self.ints(starts), self.ints(ends), self.ints(axes)]
            if steps is not None:
                args.append(self.ints(steps))
            out = self.Slice(*args)
        else:
            if steps is not None and any(s != 1 for s in steps):
                raise ValueError("Slice with steps needs opset >= 10")
            out = self.Slice(x, starts=list(starts), ends=list(ends), axes=list(axes))
        if x.shape is not None and out.shape is None:  # the rank (and static sizes) carry over
            dims: list[Any] = list(x.shape)
            for k, axis in enumerate(axes):
                d = dims[axis]
                step = 1 if steps is None else steps[k]
                dims[axis] = len(range(d)[slice(starts[k], ends[k], step)]) if isinstance(d, int) else None
            out.shape = ir.Shape(dims)
        return out

    def gemm(
        self, a: ir.Value, b: ir.Value, trans_a: int = 0, trans_b: int = 0, alpha: float | None = None
    ) -> ir.Value:
        """alpha * op(a) @ op(b) as one Gemm with no C (C was required before opset 11: a zero with beta 0 then)."""
        if self.opset >= 11:
            return self.Gemm(a, b, alpha=alpha, beta=0.0, transA=trans_a or None, transB=trans_b or None)
        zero = self.const(0.0, like=a)
        return self.Gemm(a, b, zero, alpha=alpha, beta=0.0, transA=trans_a or None, transB=trans_b or None)

    def pad(self, x: ir.Value, pads: Sequence[int]) -> ir.Value:
        """Zero (constant-mode) Pad of x by ``pads`` (ONNX layout: all begins, then all ends; may be negative)."""
        if not any(pads):
            return x
        if self.opset >= 11:
            return self.Pad(x, self.ints(pads))
        return self.Pad(x, pads=list(pads))

    def has_op(self, op_type: str) -> bool:
        """Whether the ai.onnx op ``op_type`` exists at this opset (Range, for one, arrived in opset 11)."""
        return missing_op(op_type, self.opset) is None

    @property
    def runtime_pads(self) -> bool:
        """Whether Pad takes its pads as a run-time input (opset >= 11) rather than an attribute."""
        return self.opset >= 11

    def clip(self, x: ir.Value, lo: float, hi: float) -> ir.Value:
        """x clipped to [lo, hi]: bounds as inputs from opset 11, as attributes before."""
        if self.opset >= 11:
            return self.Clip(x, self.const(lo, like=x), self.const(hi, like=x))
        return self.Clip(x, min=lo, max=hi)

    @property
    def slice_inputs(self) -> bool:
        """Whether Slice takes its starts, ends, axes and steps as inputs (opset >= 10): steps, run-time bounds."""
        return self.opset >= 10

    def can_scatter(self, reduction: str | None = None) -> bool:
        """Whether ScatterElements is available with this ``reduction`` (``scatter_elements`` also emits the
        older Scatter at opsets 9-10, which onnx's reference evaluator cannot run)."""
        return self.opset >= {None: 11, "add": 16, "mul": 16}.get(reduction, 18)

    def scatter_elements(
        self, data: ir.Value, indices: ir.Value, updates: ir.Value, axis: int, reduction: str | None = None
    ) -> ir.Value:
        """ScatterElements (Scatter before opset 11); ``reduction`` needs opset >= 16 (max/min: 18)."""
        if reduction is not None and self.opset < (18 if reduction in ("max", "min") else 16):
            raise ValueError(f"ScatterElements with reduction '{reduction}' needs a newer opset than {self.opset}")
        if self.opset >= 11:
            return self.ScatterElements(data, indices, updates, axis=axis, reduction=reduction)
        if self.opset < 9:
            raise ValueError("scattering needs opset >= 9")
        return self.Scatter(data, indices, updates, axis=axis)

    def scatter_add(
        self, x: ir.Value, indices: ir.Value, updates: ir.Value, axis: int, unique: bool = False
    ) -> ir.Value:
        """Zeros shaped like x with ``updates`` added at ``indices`` along ``axis`` (the adjoint of GatherElements):
        ScatterElements with reduction 'add' (opset 16), a plain scatter where the indices are known to be
        distinct (opset 9), else a one-hot product (exact, memory O(indices x axis length))."""
        if self.opset >= 16:
            return self.ScatterElements(self.zeros_like(x), indices, updates, axis=axis, reduction="add")
        if unique and self.opset >= 9:
            return self.scatter_elements(self.zeros_like(x), indices, updates, axis)
        r = rank(x)
        hot = self._one_hot(indices, r, self.dim(x, axis), updates)
        summed = self.reduce_sum(self.Mul(hot, self.unsqueeze(updates, [r])), [axis])
        out = self.squeeze(self.Transpose(summed, perm=swap_with_last(r + 1, axis)), [r])
        if _agree(x, indices, axis):
            return out
        xd, idd = static_dims(x), static_dims(indices)
        if xd is not None and idd is not None:  # indices smaller than x on other axes: pad the ends with zeros
            return self.pad(out, [0] * r + [0 if i == axis else xd[i] - idd[i] for i in range(r)])
        if self.opset < 11:
            return out
        others = self.ints([int(i != axis) for i in range(r)])
        ends = self.Mul(self.Sub(self.shape_of(x), self.shape_of(indices)), others)
        return self.Pad(out, self.cat_ints([0] * r, ends))

    def scatter_add_rows(self, updates: ir.Value, index: ir.Value, rows: int | ir.Value, row_dims: Dims) -> ir.Value:
        """out[index[n]] += updates[n] into zeros of shape (rows, *row_dims): updates (N, *row_dims), index (N,)
        in [0, rows). From opset 16 ScatterND with reduction 'add' where the index is a constant without repeats,
        else ScatterElements with reduction 'add' along the rows (onnxruntime's ScatterND races on repeated
        rows: see workarounds.py); before, a one-hot MatMul (exact, memory O(N x rows))."""
        if self.opset >= 16:
            zeros = self.zeros(self.cat_ints(self._as_vector(rows), row_dims), like=updates)
            if workarounds.scatter_nd_is_safe(self.constant_value(index)):
                return self.ScatterND(zeros, self.unsqueeze(index, [1]), updates, reduction="add")
            flat = self.Flatten(updates, axis=1)  # (N, row size): the index spread along each row
            spread = self.Expand(self.unsqueeze(index, [1]), self.shape_of(flat))
            summed = self.ScatterElements(self.Flatten(zeros, axis=1), spread, flat, axis=0, reduction="add")
            return self.Reshape(summed, self.cat_ints(self._as_vector(rows), row_dims))
        hot = self._one_hot(index, 1, rows, updates)
        out = self.MatMul(self.Transpose(hot, perm=[1, 0]), self.Reshape(updates, self.ints([0, -1])))
        return self.Reshape(out, self.cat_ints(self._as_vector(rows), row_dims))  # no -1: updates may be empty

    def gather_elements(self, data: ir.Value, indices: ir.Value, axis: int) -> ir.Value:
        """GatherElements(data, indices, axis) (opset 11); before, a one-hot product."""
        if self.opset >= 11:
            return self.GatherElements(data, indices, axis=axis)
        r, m = rank(data), self.dim(data, axis)
        others = [i for i in range(r) if i != axis]
        idd = static_dims(indices)
        if not _agree(data, indices, axis) and idd is not None:  # indices smaller than data on other axes
            data = self.slice(data, [0] * (r - 1), [idd[i] for i in others], others)
        elif not _agree(data, indices, axis) and self.opset >= 10:
            data = self.Slice(data, self.ints([0] * (r - 1)), self.cat_ints(self.dims(indices, others)),
                              self.ints(others))
        moved = self.unsqueeze(self.Transpose(data, perm=[*range(axis), *range(axis + 1, r), axis]), [axis])
        return self.reduce_sum(self.Mul(self._one_hot(indices, r, m, data), moved), [r], keepdims=False)

    def wrap_indices(self, indices: ir.Value, n: int | ir.Value) -> ir.Value:
        """Indices into an axis of length ``n`` with the negative ones counted from its end, as int64 (only a Cast
        before opset 11, where indices may not be negative)."""
        found = self.constant_value(indices)
        if found is not None and isinstance(n, int):
            found = np.asarray(found, dtype=np.int64)
            return self.const(np.where(found < 0, found + n, found), dtype=ir.DataType.INT64)
        if indices.dtype != ir.DataType.INT64:
            indices = self.Cast(indices, to=ir.DataType.INT64)
        if self.opset < 11:
            return indices
        negative = self.Cast(self.Less(indices, self.const(np.array(0), dtype=ir.DataType.INT64)), to=ir.DataType.INT64)
        size = self.const(np.array(n), dtype=ir.DataType.INT64) if isinstance(n, int) else n
        return self.Add(indices, self.Mul(negative, size))

    def _one_hot(self, indices: ir.Value, r: int, m: int | ir.Value, like: ir.Value) -> ir.Value:
        """indices.shape + (m,) for indices of rank r: 1 where the last coordinate equals the index, like's dtype."""
        return self.indicator(self.Equal(self.unsqueeze(indices, [r]), self.arange(m)), like)

    def full(
        self, shape: Sequence[int] | ir.Value, fill: float, like: ir.Value | None = None,
        dtype: ir.DataType | None = None,
    ) -> ir.Value:
        """``fill`` in ``shape`` (ints, or a 1-D int64 value), in ``dtype`` or like's dtype: a Constant when the
        shape is static and small (so it folds), else built at run time (no full-size constant in the model)."""
        return self._fill(shape, fill, like, dtype)

    def zeros(self, shape: Sequence[int] | ir.Value, like: ir.Value | None = None,
              dtype: ir.DataType | None = None) -> ir.Value:
        """Zeros in ``shape`` (ints, or a 1-D int64 value), in ``dtype`` or like's dtype (see ``full``)."""
        return self._fill(shape, 0.0, like, dtype)

    def full_like(self, x: ir.Value, fill: float, dtype: ir.DataType | None = None) -> ir.Value:
        """``fill`` in x's (run-time) shape, in x's dtype unless given (see ``full``)."""
        out = self._fill(static_dims(x), fill, x, dtype, of=x)
        out.shape = x.shape
        return out

    def zeros_like(self, x: ir.Value) -> ir.Value:
        """Zeros in x's (run-time) shape and dtype."""
        return self.full_like(x, 0.0)

    def ones_like(self, x: ir.Value) -> ir.Value:
        """Ones in x's (run-time) shape and dtype."""
        return self.full_like(x, 1.0)

    def _fill(self, shape: Sequence[int] | ir.Value | None, fill: float, like: ir.Value | None,
              dtype: ir.DataType | None, of: ir.Value | None = None) -> ir.Value:
        """``full`` (shape None: the run-time shape of ``of``): a Constant when small and static, else
        ConstantOfShape (opset 9; bfloat16 from 20), else a Constant (static), Expand of a scalar (opset 13,
        bfloat16) or Tile of a [1, ..., 1] (before opset 9)."""
        dtype = dtype or (None if like is None else like.dtype)
        if dtype is None:
            raise ValueError("a filled tensor needs a dtype or a value of known dtype")
        static = None if shape is None else self._static_ints(shape)
        if static is not None and int(np.prod(static)) <= FOLD_LIMIT:
            return self.const(np.full(static, fill), dtype=dtype)

        def value() -> ir.Value:
            if shape is None:
                assert of is not None
                return self.shape_of(of)
            return shape if isinstance(shape, ir.Value) else self.ints(static)  # type: ignore[arg-type]

        if self.opset >= (20 if dtype == ir.DataType.BFLOAT16 else 9):
            return self.ConstantOfShape(value(), value=ir.tensor(np.full(1, fill, dtype.numpy()), dtype=dtype))
        if static is not None:
            return self.const(np.full(static, fill), dtype=dtype)
        if self.opset >= 13:
            return self.Expand(self.const(np.array(fill), dtype=dtype), value())
        n_axes = rank_of(of) if of is not None else None
        if isinstance(shape, ir.Value) and shape.shape is not None and isinstance(shape.shape[0], int):
            n_axes = int(shape.shape[0])  # type: ignore[arg-type]
        if n_axes is None:
            raise ValueError(f"filling a tensor of run-time shape and unknown rank needs opset >= 9, the model "
                             f"has opset {self.opset}")
        return self.Tile(self.const(np.full([1] * n_axes, fill), dtype=dtype), value())

    def _static_ints(self, shape: Sequence[int] | ir.Value) -> list[int] | None:
        """``shape`` as a list of ints when it is static or a constant, else None."""
        if not isinstance(shape, ir.Value):
            return [int(d) for d in shape]
        found = self.constant_value(shape)
        return None if found is None else [int(d) for d in np.asarray(found).reshape(-1)]

    def expand(self, g: ir.Value, like: ir.Value) -> ir.Value:
        """Broadcast g to like's run-time shape."""
        if static_dims(g) is not None and static_dims(g) == static_dims(like):
            return g
        if self.opset >= 8:
            out = self.Expand(g, self.shape_of(like))
        else:
            out = self.Mul(g, self.full_like(like, 1.0, dtype=g.dtype))
        out.shape = like.shape
        return out

    def indicator(self, cond: ir.Value, like: ir.Value) -> ir.Value:
        """1 where the bool ``cond`` holds, else 0, in like's dtype (a Cast)."""
        assert like.dtype is not None
        return self.Cast(cond, to=like.dtype)

    def where(self, cond: ir.Value, a: ir.Value, b: ir.Value) -> ir.Value:
        """Where(cond, a, b); before opset 9, a*c + b*(1-c) (a and b must be finite there)."""
        if self.opset >= 9:
            return self.Where(cond, a, b)
        c = self.indicator(cond, a)
        return self.Add(self.Mul(a, c), self.Mul(b, self.Sub(self.const(1.0, like=c), c)))

    def sign(self, x: ir.Value) -> ir.Value:
        """Sign(x) (-1, 0 or 1); before opset 9, (x > 0) - (x < 0)."""
        if self.opset >= 9:
            return self.Sign(x)
        zero = self.const(0.0, like=x)
        return self.Sub(self.indicator(self.Greater(x, zero), x), self.indicator(self.Less(x, zero), x))

    def transpose_last2(self, x: ir.Value) -> ir.Value:
        """x with its last two axes swapped."""
        r = rank(x)
        return self.Transpose(x, perm=[*range(r - 2), r - 1, r - 2])

    def dft(self, x: ir.Value, axis: int, inverse: bool = False, onesided: bool = False) -> ir.Value:
        """DFT of x along ``axis`` (its full length), axis as attribute (opset 17) or input (opset 20)."""
        flags = {"inverse": int(inverse), "onesided": int(onesided)}
        if self.opset >= 20:
            return self.DFT(x, None, self.const(np.array(axis), dtype=ir.DataType.INT64), **flags)
        return self.DFT(x, axis=axis, **flags)

    def eye(self, n: int | ir.Value, like: ir.Value) -> ir.Value:
        """An n x n identity matrix in like's dtype; n an int or an int64 scalar (0-D) value."""
        assert like.dtype is not None
        if isinstance(n, int) and self.opset < 9:
            return self.const(np.eye(n), dtype=like.dtype)
        if self.opset < 9:
            raise ValueError("an identity matrix of run-time size needs opset >= 9")
        side = self.ints([n]) if isinstance(n, int) else self.Reshape(n, self.ints([1]))
        zeros = self.ConstantOfShape(
            self.Concat(side, side, axis=0), value=ir.tensor(np.zeros(1, like.dtype.numpy()), dtype=like.dtype)
        )
        return self.EyeLike(zeros)

    def arange(self, n: int | ir.Value) -> ir.Value:
        """0, 1, ..., n-1 as a 1-D int64 tensor; n an int or an int64 scalar (0-D) value."""
        if isinstance(n, int):
            return self.ints(range(n))
        if self.opset >= 11:
            return self.Range(self.const(np.array(0), dtype=ir.DataType.INT64), n,
                              self.const(np.array(1), dtype=ir.DataType.INT64))
        if self.opset < 9:
            raise ValueError("a range of run-time length needs opset >= 9")
        ones = self.ConstantOfShape(self.Reshape(n, self.ints([1])), value=ir.tensor(np.ones(1, np.int64)))
        return self.Reshape(self.NonZero(ones), self.ints([-1]))

    # ------------------------------------------------------------ broadcasting
    def unbroadcast(self, g: ir.Value, x: ir.Value) -> ir.Value:
        """Sum g (shaped like a broadcast result) over the axes that x was broadcast along."""
        gshape, xshape = g.shape, x.shape
        if gshape is not None and xshape is not None:
            gr, xr = gshape.rank(), xshape.rank()
            lead = gr - xr
            if lead < 0:
                raise ValueError(f"gradient of rank {gr} cannot be reduced to '{x.name}' of rank {xr}")
            axes = list(range(lead))
            decided = True
            for i in range(xr):
                dx, dg = xshape[i], gshape[lead + i]
                if isinstance(dx, int) and dx == 1:
                    if not (isinstance(dg, int) and dg == 1):
                        axes.append(lead + i)
                elif isinstance(dx, int) or same_dim(dx, dg) or (isinstance(dg, int) and dg == 1):
                    continue
                else:
                    decided = False
            if decided or self.opset < 13:
                # Before opset 13 an undecidable axis is taken as not broadcast (see README).
                if not axes:
                    return g
                if axes == list(range(lead)):  # leading axes only: one sum, no Squeeze (plans/reduce.py)
                    from onnxgrad.plans.reduce import sum_leading

                    out = sum_leading(self, g, lead)
                else:
                    out = self.reduce_sum(g, axes, keepdims=True)
                    if lead:
                        out = self.squeeze(out, list(range(lead)))
                out.shape = x.shape
                return out
        if self.opset < 13:
            raise ValueError(
                f"cannot reduce a gradient of unknown rank to '{x.name}' before opset 13"
            )
        return self._unbroadcast_runtime(g, x)

    def _unbroadcast_runtime(self, g: ir.Value, x: ir.Value) -> ir.Value:
        """Run-time form: reduce over every axis where x's left-padded shape is 1, then reshape."""
        gsh, xsh = self.Shape(g), self.Shape(x)
        pad = self.Sub(self.Size(gsh), self.Size(xsh))
        ones = self.ConstantOfShape(
            self.Reshape(pad, self.ints([1])),
            value=ir.tensor(np.array([1], dtype=np.int64)),
        )
        padded = self.Concat(ones, xsh, axis=0)
        axes = self.Reshape(self.NonZero(self.Equal(padded, self.ints([1]))), self.ints([-1]))
        out = self.Reshape(self.ReduceSum(g, axes, keepdims=1, noop_with_empty_axes=1), xsh)
        out.shape = x.shape
        return out

    # ------------------------------------------------------------- aggregation
    def add_all(self, *terms: ir.Value | None) -> ir.Value | None:
        """The sum of the terms that are not None (a chain of Adds), or None when every term is None."""
        present = [t for t in terms if t is not None]
        if not present:
            return None
        total = present[0]
        for t in present[1:]:
            total = self.Add(total, t)
        return total

    def add_n(self, terms: Sequence[ir.Value], method: str | None = None) -> ir.Value:
        """Aggregate gradient terms: one Sum ('add_n'), a balanced Add tree, or a running Add chain."""
        method = method or self.aggregation
        if len(terms) == 1:
            return terms[0]
        if method == "tree":
            level = list(terms)
            while len(level) > 1:
                nxt = [self.Add(a, b) for a, b in zip(level[::2], level[1::2], strict=False)]
                if len(level) % 2:
                    nxt.append(level[-1])
                level = nxt
            return level[0]
        if method == "accumulate":
            acc = terms[0]
            for t in terms[1:]:
                acc = self.Add(acc, t)
            return acc
        return self.Sum(*terms)

    # ------------------------------------------------------------ bookkeeping
    def live_nodes(self, roots: Iterable[ir.Value]) -> list[ir.Node]:
        """The emitted nodes that some root depends on, in emission (topological) order."""
        mine = {id(n) for n in self.nodes}
        live: set[int] = set()
        stack = [r.producer() for r in roots]
        while stack:
            node = stack.pop()
            if node is None or id(node) not in mine or id(node) in live:
                continue
            live.add(id(node))
            stack.extend(v.producer() for v in node.inputs if v is not None)
            stack.extend(v.producer() for v in implicit_inputs(node))  # what its subgraphs read from outside
        return [n for n in self.nodes if id(n) in live]

    def rollback(self, nodes: Iterable[ir.Node] | None = None) -> None:
        """Detach emitted nodes from the values they use, so the graph is as before."""
        for node in self.nodes if nodes is None else nodes:
            for i in range(len(node.inputs)):
                node.replace_input_with(i, None)

    def commit(self, roots: Iterable[ir.Value]) -> list[ir.Node]:
        """Append the nodes the roots need to the graph; drop the rest."""
        roots = list(roots)
        live = self.live_nodes(roots)
        keep = {id(n) for n in live}
        self.rollback(n for n in self.nodes if id(n) not in keep)
        workarounds.read_through_output_identities(self.graph, live, keep)  # onnxruntime 1.31's optimizer
        self.graph.extend(live)
        roots = set(roots) | {v for n in live for v in implicit_inputs(n)}  # subgraphs' reads count as uses
        for init in self.initializers:
            if init in roots or any(id(u.node) in keep for u in init.uses()):
                self.graph.register_initializer(init)
                if self.ir_version < 4:  # initializers were graph inputs too then
                    self.graph.inputs.append(init)
        return live


_NOT_PURE = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial",
                       "Bernoulli", "Dropout"})


def _attr_key(value: Any) -> Any:
    """A hashable stand-in for an attribute value (None when it cannot be compared cheaply)."""
    if isinstance(value, bool | int | float | str | bytes) or value is None:
        return value
    if isinstance(value, list | tuple):
        parts = tuple(_attr_key(v) for v in value)
        return None if any(p is None and v is not None for p, v in zip(parts, value, strict=True)) else parts
    if isinstance(value, ir.TensorProtocol):
        array = value.numpy()
        return (int(value.dtype), array.shape, array.tobytes())
    if isinstance(value, ir.DataType):
        return int(value)
    return None


def _cse_key(op_type: str, domain: str, inputs: Sequence[ir.Value | None], n_out: int,
             attrs: dict[str, Any]) -> tuple[Any, ...] | None:
    """The identity of a pure op application, or None where it must not be shared."""
    if op_type in _NOT_PURE:
        return None
    items = []
    for k in sorted(attrs):
        v = _attr_key(attrs[k])
        if v is None and attrs[k] is not None:
            return None
        items.append((k, v))
    return (domain, op_type, tuple(None if v is None else id(v) for v in inputs), n_out, tuple(items))


def attr(node: ir.Node, name: str, default: Any = None) -> Any:
    """A node attribute's Python value, or ``default``."""
    a = node.attributes.get(name)
    if a is None:
        return default
    value = a.value
    if isinstance(value, Sequence) and not isinstance(value, str | bytes):
        return list(value)
    return value


def eye_of_size(em: Emitter, n: int | ir.Value, like: ir.Value) -> ir.Value:
    """An n x n identity in like's dtype, n an int or an int64 scalar (0-D) value, at every opset: ``em.eye`` where
    it can; before opset 9 with a run-time n, ones spaced n + 1 apart (Tile of [1, 0 x n], n times) read as
    n + 1 rows of n, the last row (all zeros) dropped."""
    if isinstance(n, int) or em.has_op("EyeLike"):
        return em.eye(n, like)
    assert like.dtype is not None
    side = em.Reshape(n, em.ints([1]))
    zeros = em.Tile(em.const(np.zeros(1), dtype=like.dtype), side)
    row = em.Concat(em.const(np.ones(1), dtype=like.dtype), zeros, axis=0)
    rows = em.Reshape(em.Tile(row, side), em.Concat(em.ints([-1]), side, axis=0))
    return em.slice(rows, [0], [-1], [0])


def contract_axis(em: Emitter, g: ir.Value, m: ir.Value, axis: int, n_axes: int) -> ir.Value:
    """g (of rank ``n_axes``) with its ``axis`` (length out) contracted with m (in x out): the result has length
    in along ``axis`` (one MatMul, with Transposes around it for an axis before the last two)."""
    if axis == n_axes - 1:
        return em.MatMul(g, em.Transpose(m, perm=[1, 0]))
    if axis == n_axes - 2:
        return em.MatMul(m, g)
    perm = list(range(n_axes))
    perm[axis], perm[n_axes - 2] = n_axes - 2, axis
    return em.Transpose(em.MatMul(m, em.Transpose(g, perm=perm)), perm=perm)


def arange_of_size(em: Emitter, n: int | ir.Value) -> ir.Value:
    """0, 1, ..., n-1 (1-D int64), n an int or an int64 scalar (0-D) value, at every opset: ``em.arange`` where it
    can; before opset 9 with a run-time n, the ArgMax of each row of an n x n identity (``eye_of_size``)."""
    if isinstance(n, int) or em.opset >= 9:
        return em.arange(n)
    eye = eye_of_size(em, n, em.const(np.zeros(1), dtype=ir.DataType.FLOAT))
    return em.ArgMax(eye, axis=1, keepdims=0)


def static_value(em: Emitter, v: ir.Value | None, depth: int = 24) -> np.ndarray | None:
    """v's value when the graph fixes it: a constant, the shape of a value of static shape, or any ai.onnx op of
    such values (``optimize.fold``), as exporters compute pads, scales and sizes (PyTorch writes F.pad's pads as
    ConstantOfShape, Concat, Slice, Transpose and Cast of constants). Small values only; None otherwise."""
    if v is None:
        return None
    found = em.constant_value(v)
    node = v.producer()
    if found is not None or node is None or depth == 0 or node.domain not in ("", "ai.onnx") \
            or node.op_type in _NOT_PURE or subgraphs(node):
        return found
    if node.op_type in ("Shape", "Size") and node.inputs[0] is not None:
        dims = static_dims(node.inputs[0])
        if dims is None:
            return None
        if node.op_type == "Size":
            return np.array(int(np.prod(dims)), dtype=np.int64)
        start, end = attr(node, "start", 0), attr(node, "end", None)
        return np.array(dims[start:end], dtype=np.int64)
    arrays = [None if i is None else static_value(em, i, depth - 1) for i in node.inputs]
    if any(a is None for a, i in zip(arrays, node.inputs, strict=True) if i is not None) \
            or sum(a.size for a in arrays if a is not None) > 4096:
        return None
    from onnxgrad.optimize import fold

    out = fold(node.op_type, arrays, dict(node.attributes), em.opset, len(node.outputs))
    if out is None or len(out) != len(node.outputs):
        return None
    value = np.asarray(out[list(node.outputs).index(v)])
    return value if value.size <= 4096 else None
