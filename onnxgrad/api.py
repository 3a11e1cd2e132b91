"""``gradients()`` with the signature of ``tf.gradients``: normalise and validate the arguments, then
hand a clean request to the walk. Nothing touches the caller's model until everything is built."""

from __future__ import annotations

import difflib
import enum
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import onnx
import onnx.version_converter
import onnx_ir as ir
import onnx_ir.passes.common

import onnxgrad.rules  # noqa: F401  (registers every rule)
from onnxgrad.backprop import Request, backprop, gc_paused
from onnxgrad.emitter import FLOAT_TYPES, Emitter
from onnxgrad.io import load_model
from onnxgrad.rules.markers import MARKER_DOMAIN
from onnxgrad.shapes import infer_missing_types

MIN_OPSET = 7


class UnconnectedGradients(enum.Enum):
    """What an x that no y depends on gets: ``None`` or zeros of its run-time shape."""

    NONE = "none"
    ZERO = "zero"


class AggregationMethod(enum.IntEnum):
    """How contributions to one gradient are added (values agree; graph shape differs)."""

    ADD_N = 0
    DEFAULT = 0
    EXPERIMENTAL_TREE = 1
    EXPERIMENTAL_ACCUMULATE_N = 2


_AGGREGATION_NAMES = {
    "add_n": AggregationMethod.ADD_N,
    "default": AggregationMethod.ADD_N,
    "experimental_tree": AggregationMethod.EXPERIMENTAL_TREE,
    "experimental_accumulate_n": AggregationMethod.EXPERIMENTAL_ACCUMULATE_N,
}
_AGGREGATION_FORM = {0: "add_n", 1: "tree", 2: "accumulate"}


@dataclass(frozen=True)
class GradInput:
    """A ``grad_ys`` entry asking for a new graph input (named ``name``, or ``<scope>/<y>_seed``)."""

    name: str | None = None


NEW_INPUT = GradInput()

GradY = None | str | ir.Value | np.ndarray | float | int | GradInput


def _unconnected(value: Any) -> UnconnectedGradients:
    if isinstance(value, UnconnectedGradients):
        return value
    try:
        return UnconnectedGradients(value)
    except ValueError:
        raise ValueError(
            f"Unknown value for unconnected_gradients: {value!r}; "
            "accepted: 'none', 'zero' or an UnconnectedGradients member"
        ) from None


def _aggregation(value: Any) -> str:
    if value is None:
        return "add_n"
    if isinstance(value, str) and value.lower() in _AGGREGATION_NAMES:
        return _AGGREGATION_FORM[int(_AGGREGATION_NAMES[value.lower()])]
    if isinstance(value, int) and not isinstance(value, bool) and value in _AGGREGATION_FORM:
        return _AGGREGATION_FORM[int(value)]
    raise ValueError(
        f"Invalid aggregation_method specified {value!r}; accepted: None, "
        + ", ".join(repr(n) for n in _AGGREGATION_NAMES)
        + ", 0, 1, 2 or an AggregationMethod member"
    )


def _as_list(x: Any) -> list[Any]:
    if x is None:
        return []
    if isinstance(x, str | ir.Value):
        return [x]
    return list(x)


def value_table(graph: ir.Graph) -> dict[str, ir.Value]:
    """Every named value of the top-level graph."""
    table: dict[str, ir.Value] = {}
    for v in graph.inputs:
        table[v.name or ""] = v
    for name, v in graph.initializers.items():
        table[name] = v
    for node in graph:
        for v in node.outputs:
            if v.name:
                table[v.name] = v
    return table


def _resolve(table: dict[str, ir.Value], item: str | ir.Value, role: str) -> ir.Value:
    if isinstance(item, ir.Value):
        if table.get(item.name or "") is not item:
            raise ValueError(f"{role} value {item.name!r} does not belong to this graph")
        return item
    if not isinstance(item, str):
        raise TypeError(f"{role} entries must be value names (str), got {type(item).__name__}")
    found = table.get(item)
    if found is None:
        close = difflib.get_close_matches(item, list(table), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"{role}: no value named {item!r} in the graph{hint}")
    return found


def _all_names(graph: ir.Graph) -> list[str]:
    names: list[str] = []
    for g in [graph, *(n for n in ir.traversal.RecursiveGraphIterator(graph))]:
        if isinstance(g, ir.Graph):
            names.extend(v.name or "" for v in g.inputs)
            names.extend(g.initializers)
        else:
            names.append(g.name or "")
            names.extend(v.name or "" for v in g.outputs)
    return names


def unique_scope(graph: ir.Graph, name: str) -> str:
    """``name``, or ``name_1``, ``name_2``... so that no value or node of the graph lies under it."""
    names = _all_names(graph)
    candidate, k = name, 0
    while any(n == candidate or n.startswith(candidate + "/") for n in names):
        k += 1
        candidate = f"{name}_{k}"
    return candidate


def _opset(model: ir.Model) -> int:
    imports = model.opset_imports
    return int(imports.get("", imports.get("ai.onnx", 1)))


# ---------------------------------------------------------------------------- is it a model at all
def check_versions(model: ir.Model) -> None:
    """A ``ValueError`` when the model's IR version or ai.onnx opset is one this onnx does not know."""
    if model.ir_version is not None and model.ir_version > onnx.IR_VERSION:
        raise ValueError(
            f"the model has IR version {model.ir_version}, newer than onnx {onnx.__version__} knows "
            f"(up to {onnx.IR_VERSION}): upgrade onnx, or save the model with an older exporter"
        )
    imports = model.opset_imports
    if "" not in imports and "ai.onnx" not in imports:
        raise ValueError(
            "the model imports no ai.onnx opset, and the gradient uses ai.onnx ops: "
            f"add one ({MIN_OPSET} or newer) to its opset_import"
        )
    newest = onnx.defs.onnx_opset_version()
    if _opset(model) > newest:
        raise ValueError(
            f"the model imports ai.onnx opset {_opset(model)}, newer than onnx {onnx.__version__} knows "
            f"(up to {newest}): upgrade onnx, or export the model at opset {newest} or older"
        )


def _node_label(name: str | None, op_type: str, k: int) -> str:
    return f"node '{name}' ({op_type})" if name else f"node #{k} ({op_type}, unnamed)"


def check_names(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> None:
    """A ``ValueError`` naming the first value defined twice, node input defined nowhere (a dangling
    input) or graph output defined nowhere; subgraphs see the names of the graphs around them.

    Runs on the protobuf, before onnx_ir's deserializer (which fails on the first and only warns on
    the others)."""
    where = f" in subgraph '{graph.name}'" if outer else ""
    defined: dict[str, str] = {}

    def define(name: str, what: str) -> None:
        if name in defined:
            raise ValueError(
                f"value '{name}' is defined twice{where}, by {defined[name]} and by {what}: "
                "every value of an ONNX graph must have exactly one producer"
            )
        defined[name] = what

    for v in graph.input:
        define(v.name, "a graph input")
    inputs = set(defined)
    for name in [t.name for t in graph.initializer] + [t.values.name for t in graph.sparse_initializer]:
        if name not in inputs:  # an initializer may give a graph input its default value
            define(name, "an initializer")
    for k, node in enumerate(graph.node):
        for out in node.output:
            if out:
                define(out, _node_label(node.name, node.op_type, k))
    visible = outer | defined.keys()
    for k, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in visible:
                raise ValueError(
                    f"{_node_label(node.name, node.op_type, k)}{where} reads '{name}', which no node, graph input "
                    "or initializer defines (a dangling input)"
                )
        for a in node.attribute:
            for sub in [*([a.g] if a.HasField("g") else []), *a.graphs]:
                check_names(sub, frozenset(visible))
    for v in graph.output:
        if v.name and v.name not in visible:
            raise ValueError(
                f"graph output '{v.name}'{where} is defined by no node, graph input or initializer (a dangling output)"
            )


def check_graph(graph: ir.Graph) -> None:
    """A ``ValueError`` for an empty graph, or a node that reads a value defined nowhere or not yet:
    a cycle (named value by value) or nodes out of topological order."""
    if not len(graph) and not graph.inputs and not graph.initializers:
        raise ValueError(
            f"the graph '{graph.name}' is empty (no nodes, inputs or initializers): nothing to differentiate"
        )
    position = {id(n): k for k, n in enumerate(graph)}
    for k, node in enumerate(graph):
        for v in node.inputs:
            if v is None:
                continue
            producer = v.producer()
            if producer is None and not (v.is_graph_input() or v.is_initializer()):
                raise ValueError(
                    f"{_node_label(node.name, node.op_type, k)} reads '{v.name}', which no node, graph input or "
                    "initializer defines (a dangling input)"
                )
            if producer is None or position.get(id(producer), -1) < k:
                continue
            cycle = _cycle_through(node, position)
            if cycle:
                raise ValueError(
                    f"the graph has a cycle: {' -> '.join(repr(n) for n in cycle)} (each value feeds the next): "
                    "an ONNX graph must be acyclic"
                )
            raise ValueError(
                f"{_node_label(node.name, node.op_type, k)} reads '{v.name}' before "
                f"{_node_label(producer.name, producer.op_type, position[id(producer)])} computes it: the nodes are "
                "not in topological order (onnx_ir's Graph.sort() orders them)"
            )


def _cycle_through(start: ir.Node, position: dict[int, int]) -> list[str]:
    """The value names around a cycle upstream of ``start``, in data-flow order (first = last), or []."""
    state = {id(start): 1}  # 1: on the depth-first path, 2: done
    stack = [(start, iter(start.inputs))]
    via: list[ir.Value] = []  # via[i]: the value stack[i] reads from stack[i + 1]
    while stack:
        node, inputs = stack[-1]
        for v in inputs:
            producer = None if v is None else v.producer()
            if producer is None or id(producer) not in position or state.get(id(producer)) == 2:
                continue
            if state.get(id(producer)) == 1:
                i = next(j for j, (n, _) in enumerate(stack) if n is producer)
                ring = [v, *reversed(via[i:]), v]
                return [r.name or "?" for r in ring]
            state[id(producer)] = 1
            via.append(v)
            stack.append((producer, iter(producer.inputs)))
            break
        else:
            state[id(node)] = 2
            stack.pop()
            if via:
                via.pop()
    return []


TypeSnapshot = list[tuple[ir.Value, Any, Any, Any]]


def _ensure_types(model: ir.Model) -> TypeSnapshot:
    """Run onnx shape inference when some value lacks its dtype or shape (the walk prunes by dtype;
    rules such as MatMul's need ranks). A second-order call meets the first call's unshaped values.

    Returns each value's (type, dtype, shape) from before, so that a failed call can undo it."""
    graph = model.graph
    if all(v.dtype is not None and v.shape is not None for n in graph for v in n.outputs):
        return []
    before = [
        (v, v.type, v.dtype, v.shape)
        for g in model.graphs()
        for v in ir.convenience.create_value_mapping(g).values()
    ]
    infer_missing_types(model)
    return before


def _restore_types(snapshot: TypeSnapshot) -> None:
    """Undo ``_ensure_types`` (inference sets dtypes in place on existing types)."""
    for v, type_, dtype, shape in snapshot:
        v.type, v.shape = type_, shape
        if type_ is not None and dtype is not None and type_.dtype != dtype:
            type_.dtype = dtype


def _check_seed_shape(y: ir.Value, dims: Sequence[Any] | None, what: str) -> None:
    ydims = None if y.shape is None else list(y.shape)
    if ydims is None or dims is None:
        return
    if len(ydims) != len(dims) or any(
        isinstance(a, int) and isinstance(b, int) and a != b for a, b in zip(ydims, dims, strict=True)
    ):
        raise ValueError(
            f"grad_ys for {y.name!r} has shape {tuple(dims)}, but {y.name!r} has shape {tuple(ydims)} ({what})"
        )


def _seed_name(em: Emitter, y: ir.Value, taken: set[str | None]) -> str:
    """``<scope>/<y>_seed``, or ``<scope>/<y>_seed_1``... when y is seeded more than once (duplicate ys)."""
    name, k = f"{em.scope}/{y.name}_seed", 0
    while name in taken:
        k += 1
        name = f"{em.scope}/{y.name}_seed_{k}"
    return name


def _seed(
    em: Emitter, model: ir.Model, table: dict[str, ir.Value], y: ir.Value, spec: GradY, new_inputs: list[ir.Value]
) -> ir.Value:
    """The value fed as dy for y."""
    if spec is None:
        return em.ones_like(y)
    taken = {v.name for v in [*new_inputs, *em.initializers]}
    if isinstance(spec, GradInput):
        if spec.name and (spec.name in table or spec.name in taken):
            raise ValueError(f"grad_ys: a value named {spec.name!r} already exists")
        seed = ir.Value(
            name=spec.name or _seed_name(em, y, taken), type=ir.TensorType(y.dtype), shape=y.shape
        )
        new_inputs.append(seed)
        return seed
    if isinstance(spec, str | ir.Value):
        seed = _resolve(table, spec, "grad_ys")
        if seed.dtype is not None and y.dtype is not None and seed.dtype != y.dtype:
            raise TypeError(
                f"grad_ys for {y.name!r} is {seed.name!r} of dtype {seed.dtype.name}, "
                f"but {y.name!r} is {y.dtype.name}"
            )
        _check_seed_shape(y, None if seed.shape is None else list(seed.shape), "value")
        return seed
    array = np.asarray(spec)
    if array.dtype.kind not in "fiu" or (array.dtype.kind in "iu" and not np.isscalar(spec)):
        raise TypeError(
            f"grad_ys for {y.name!r} must be a float array (got {array.dtype}); {y.name!r} is "
            f"{y.dtype.name if y.dtype else 'of unknown dtype'}"
        )
    assert y.dtype is not None
    _check_seed_shape(y, list(array.shape), "array")
    tensor = ir.tensor(array.astype(y.dtype.numpy()), dtype=y.dtype)
    init = ir.Value(
        name=_seed_name(em, y, taken), type=ir.TensorType(y.dtype), shape=ir.Shape(array.shape),
        const_value=tensor,
    )
    em.initializers.append(init)
    return init


@gc_paused
def gradients(
    model: ir.Model,
    ys: str | ir.Value | Sequence[str | ir.Value],
    xs: str | ir.Value | Sequence[str | ir.Value],
    grad_ys: GradY | Sequence[GradY] = None,
    name: str = "gradients",
    gate_gradients: bool = False,
    aggregation_method: Any = None,
    stop_gradients: str | ir.Value | Sequence[str | ir.Value] | None = None,
    unconnected_gradients: str | UnconnectedGradients = "none",
) -> list[str | None]:
    """Add to ``model`` the gradient of ``sum(grad_ys[i] * ys[i])`` with respect to each x.

    Returns one entry per x: the name of the value holding its gradient, or None where no y depends
    on it and ``unconnected_gradients`` is 'none'. ``gate_gradients`` is accepted for compatibility
    and has no effect: ONNX graphs are pure dataflow.
    """
    del gate_gradients  # no control edges in ONNX: nothing to gate
    if not isinstance(model, ir.Model):
        raise TypeError(
            f"gradients() works on an onnx_ir.Model, got {type(model).__module__}.{type(model).__name__}; "
            "load a file or onnx.ModelProto with onnxgrad.add_gradients() or onnx_ir.load()"
        )
    unconnected = _unconnected(unconnected_gradients)
    aggregation = _aggregation(aggregation_method)
    y_items, x_items = _as_list(ys), _as_list(xs)
    if not x_items:
        raise ValueError("xs is empty: name at least one value to differentiate with respect to")
    seeds_spec: list[GradY]
    if grad_ys is None:
        seeds_spec = [None] * len(y_items)
    elif isinstance(grad_ys, str | ir.Value | np.ndarray | float | int | GradInput):
        seeds_spec = [grad_ys]
    else:
        seeds_spec = list(grad_ys)  # type: ignore[arg-type]
    if len(seeds_spec) != len(y_items):
        raise ValueError(f"Length mismatch. Passed {len(seeds_spec)} grad_ys for {len(y_items)} ys")

    check_versions(model)
    if _opset(model) < MIN_OPSET:
        raise ValueError(
            f"the model imports ai.onnx opset {_opset(model)}; onnxgrad emits ops from opset {MIN_OPSET} on: "
            f"upgrade it with onnx.version_converter.convert_version(model, {MIN_OPSET}) "
            "(onnxgrad.add_gradients does this for you)"
        )
    graph = model.graph
    check_graph(graph)
    table = value_table(graph)
    y_vals = [_resolve(table, y, "ys") for y in y_items]
    x_vals = [_resolve(table, x, "xs") for x in x_items]
    stop = {_resolve(table, s, "stop_gradients") for s in _as_list(stop_gradients)}
    inferred = _ensure_types(model)

    em = Emitter(graph, _opset(model), unique_scope(graph, name), model.ir_version or 8)
    new_inputs: list[ir.Value] = []
    try:
        for x in x_vals:  # after inference: an intermediate x of a model without value_info has a dtype now
            if x.dtype is not None and x.dtype not in FLOAT_TYPES:
                raise TypeError(
                    f"xs: {x.name!r} is {x.dtype.name}; only float values (float16, bfloat16, float32, "
                    "float64) carry gradients"
                )
        seeds = [_seed(em, model, table, y, s, new_inputs) for y, s in zip(y_vals, seeds_spec, strict=True)]
        raw = backprop(em, graph, Request(y_vals, x_vals, seeds, stop, aggregation))
        finals = _finalize(em, x_vals, raw, unconnected, {*seeds, *graph.inputs, *graph.initializers.values()})
    except BaseException:
        em.rollback()
        _restore_types(inferred)  # nothing half-built: not even the inferred types stay
        raise
    em.commit([v for v in finals if v is not None])
    graph.inputs.extend(new_inputs)
    return [None if v is None else v.name for v in finals]


def _finalize(
    em: Emitter,
    xs: list[ir.Value],
    raw: list[ir.Value | None],
    unconnected: UnconnectedGradients,
    foreign: set[ir.Value],
) -> list[ir.Value | None]:
    """Give each gradient a fresh value named ``<scope>/<x>_grad`` (zeros where asked)."""
    finals: list[ir.Value | None] = []
    named: dict[ir.Value, ir.Value] = {}
    given: set[ir.Value] = set()  # the values of ``named`` (a set: thousands of xs stay linear)
    for x, g in zip(xs, raw, strict=True):
        if x in named:
            finals.append(named[x])
            continue
        if g is None and unconnected is UnconnectedGradients.ZERO:
            g = em.zeros_like(x)
        if g is None:
            finals.append(None)
            continue
        if g in foreign or g in given or g.producer() is None or g.producer().op_type == "Constant":
            g = em.Identity(g)
        g.name = f"{em.scope}/{x.name}_grad"
        g.dtype, g.shape = x.dtype, x.shape
        named[x] = g
        given.add(g)
        finals.append(g)
    return finals


# ---------------------------------------------------------------------------- conveniences
class Augmented(NamedTuple):
    """A model with gradients appended as outputs, and what was added."""

    model: onnx.ModelProto
    gradients: dict[str, str | None]  # x -> output name (None where unconnected)
    new_inputs: list[str]
    higher: dict[int, dict[str, str | None]] | None = None  # order (2, 3...) -> x -> output name, order > 1


def load(model: onnx.ModelProto | ir.Model | str | os.PathLike[str]) -> ir.Model:
    """An onnx_ir.Model from a path, a ModelProto (copied) or an ir.Model (used as is)."""
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    if isinstance(model, str | os.PathLike):
        return ir.load(os.fspath(model))
    raise TypeError(f"expected a path, an onnx.ModelProto or an onnx_ir.Model, got {type(model).__name__}")


def upgrade(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model itself, or converted to opset 7 when older.

    Opsets 1-6 broadcast only on request (broadcast=1, axis); onnx's version converter rewrites those
    nodes into opset 7's numpy broadcasting without changing any value."""
    opset = min((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), default=MIN_OPSET)
    if opset >= MIN_OPSET:
        return model
    return _channel_slopes(onnx.version_converter.convert_version(model, MIN_OPSET))


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


def add_gradients(
    model: onnx.ModelProto | ir.Model | str | os.PathLike[str],
    ys: str | Sequence[str],
    xs: str | Sequence[str],
    grad_ys: GradY | Sequence[GradY] = None,
    order: int = 1,
    **kwargs: Any,
) -> Augmented:
    """A new model: the original outputs first, unchanged, then one output per x with a gradient.

    ``order`` > 1 also appends the derivatives of order 2..order (``onnxgrad.higher_order_gradients``:
    Hessian-vector products and beyond, each with its vector as a new graph input)."""
    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    if not isinstance(model, onnx.ModelProto):
        if not isinstance(model, str | os.PathLike):
            raise TypeError(
                "add_gradients() takes a path, an onnx.ModelProto or an onnx_ir.Model, "
                f"got {type(model).__module__}.{type(model).__name__}"
            )
        model = load_model(model)
    check_names(model.graph)
    m = load(upgrade(model))
    before = {v.name for v in m.graph.inputs}
    if order == 1:
        orders = [gradients(m, ys, xs, grad_ys, **kwargs)]
    else:
        from onnxgrad.higher import higher_order_gradients

        orders = higher_order_gradients(m, ys, xs, order, grad_ys, **kwargs)
    have = {v.name for v in m.graph.outputs}
    table = value_table(m.graph)
    for n in (n for names in orders for n in names):
        if n is not None and n not in have:
            m.graph.outputs.append(table[n])
            have.add(n)
    x_names = [x if isinstance(x, str) else x.name for x in _as_list(xs)]
    by_x = [dict(zip(x_names, names, strict=True)) for names in orders]
    return Augmented(
        ir.serde.serialize_model(m),
        by_x[0],
        [v.name for v in m.graph.inputs if v.name not in before and not v.is_initializer()],
        {k: found for k, found in enumerate(by_x[1:], start=2)},
    )


# ---------------------------------------------------------------------------- stop_gradient
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
    v = _resolve(value_table(graph), value, "stop_gradient")
    if v.dtype is None:  # a model loaded without value_info: type it first, or it cannot be serialized
        _ensure_types(model)
    opset = _opset(model)
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
