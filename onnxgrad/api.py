"""``gradients()`` with the signature of ``tf.gradients``: normalise and validate the arguments, then
hand a clean request to the walk. Nothing touches the caller's model until everything is built.

Around it: ``validate`` (is it a model at all), ``values`` (finding, naming and exposing values), ``markers``
(``stop_gradient``), ``upgrade`` (models older than opset 7); ``higher`` builds on ``gradients`` and ``augment``
(``add_gradients``, the entry point for files) on both."""

from __future__ import annotations

import enum
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx_ir as ir

import onnxgrad.rules  # noqa: F401  (registers every rule)
from onnxgrad.backprop import Request, UndefinedGradient, backprop, gc_paused, node_label
from onnxgrad.emitter import FLOAT_TYPES, SHAPE_ONLY, Emitter, implicit_inputs
from onnxgrad.registry import UNDEFINED, Undefined, opset_of
from onnxgrad.remat import Budget
from onnxgrad.remat import apply as remat_apply
from onnxgrad.upgrade import upgrade  # noqa: F401  (kept importable from here: tests/test_backend_models.py)
from onnxgrad.validate import MIN_OPSET, check_graph, check_versions
from onnxgrad.values import as_list, ensure_types, resolve, restore_types, unique_scope, value_table
from onnxgrad.workarounds import REMAT_KEY


class GradientNote(UserWarning):
    """Something the caller should know about a result that is not an error: an integer x taken as unconnected,
    an undefined gradient given as None."""


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
        seed = resolve(table, spec, "grad_ys")
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
    *,
    recompute: Sequence[str] | None = None,
    remat: str | None = None,
    memory_budget: int | str | Budget | None = None,
    straight_through: bool = False,
) -> list[str | None]:
    """Add to ``model`` the gradient of ``sum(grad_ys[i] * ys[i])`` with respect to each x.

    Returns one entry per x: the name of the value holding its gradient, or None where no y depends
    on it and ``unconnected_gradients`` is 'none'. ``gate_gradients`` is accepted for compatibility
    and has no effect: ONNX graphs are pure dataflow. ``recompute`` (value names or fnmatch patterns), ``remat``
    ('nothing-saveable', 'matmuls-only') and ``memory_budget`` (bytes, or '512MB') recompute forward values inside
    the gradient part instead of keeping them alive (``onnxgrad.remat``). ``straight_through``: each
    ``DequantizeLinear(QuantizeLinear(x))`` of a quantized model passes dy to x where x lies inside the integer grid
    (the estimator of torch's fake quantisation, ``onnxgrad.plans.quantization``); by default the integer value
    between them carries no gradient.
    """
    del gate_gradients  # no control edges in ONNX: nothing to gate
    if not isinstance(model, ir.Model):
        raise TypeError(
            f"gradients() works on an onnx_ir.Model, got {type(model).__module__}.{type(model).__name__}; "
            "load a file or onnx.ModelProto with onnxgrad.add_gradients() or onnx_ir.load()"
        )
    unconnected = _unconnected(unconnected_gradients)
    aggregation = _aggregation(aggregation_method)
    y_items, x_items = as_list(ys), as_list(xs)
    if not x_items:
        raise ValueError("xs is empty: name at least one value to differentiate with respect to")
    seeds_spec: list[GradY]
    if grad_ys is None:
        seeds_spec = [None] * len(y_items)
    elif isinstance(grad_ys, str | ir.Value | np.ndarray | float | int | GradInput):
        seeds_spec = [grad_ys]
    elif isinstance(grad_ys, Mapping):  # iterating it would take its keys (the names of ys) for value names
        raise TypeError("grad_ys is a list aligned with ys (as in tf.gradients), not a dict: pass "
                        "[grad_ys[y] for y in ys]")
    else:
        seeds_spec = list(grad_ys)  # type: ignore[arg-type]
    if len(seeds_spec) != len(y_items):
        raise ValueError(f"Length mismatch. Passed {len(seeds_spec)} grad_ys for {len(y_items)} ys")

    check_versions(model)
    opset = opset_of(model.opset_imports)
    if opset < MIN_OPSET:
        raise ValueError(
            f"the model imports ai.onnx opset {opset}; onnxgrad emits ops from opset {MIN_OPSET} on: "
            f"upgrade it with onnx.version_converter.convert_version(model, {MIN_OPSET}) "
            "(onnxgrad.add_gradients does this for you)"
        )
    graph = model.graph
    check_graph(graph)
    table = value_table(graph)
    y_vals = [resolve(table, y, "ys") for y in y_items]
    x_vals = [resolve(table, x, "xs") for x in x_items]
    stop = {resolve(table, s, "stop_gradients") for s in as_list(stop_gradients)}
    inferred = ensure_types(model)

    em = Emitter(graph, opset, unique_scope(graph, name), model.ir_version or 8, aggregation)
    new_inputs: list[ir.Value] = []
    try:
        # after inference: an intermediate x of a model without value_info has a dtype now
        for x in {x: None for x in x_vals if x.dtype is not None and x.dtype not in FLOAT_TYPES}:
            warnings.warn(GradientNote(
                f"xs: {x.name!r} is {x.dtype.name} (only float values carry gradients): unconnected, so "
                f"{'zeros' if unconnected is UnconnectedGradients.ZERO else 'None'}"), stacklevel=3)
        seeds = [_seed(em, model, table, y, s, new_inputs) for y, s in zip(y_vals, seeds_spec, strict=True)]
        _note_tied_statistics(graph, x_vals)
        floats = [x for x in x_vals if x.dtype is None or x.dtype in FLOAT_TYPES]
        totals: dict[ir.Value, ir.Value] = {}
        raw, why = backprop(em, graph, Request(y_vals, floats, seeds, stop, totals, bool(straight_through)),
                            graph.opset_imports)
        found = dict(zip(floats, raw, strict=True))
        finals = _finalize(em, x_vals, [found.get(x) for x in x_vals], why, unconnected,
                           {*seeds, *graph.inputs, *graph.initializers.values()})
        _note_integer_crossings(graph, [x for x in floats if found.get(x) is None], y_vals, stop, unconnected,
                                bool(straight_through))
        if remat_apply(em, [v for v in finals if v is not None], recompute, remat, memory_budget, totals):
            model.metadata_props[REMAT_KEY] = "recomputed forward segments: run with onnxgrad.runtime.session"
    except BaseException:
        em.rollback()
        restore_types(inferred)  # nothing half-built: not even the inferred types stay
        raise
    em.commit([v for v in finals if v is not None])
    graph.inputs.extend(new_inputs)
    return [None if v is None else v.name for v in finals]


def running_statistics(graph: ir.Graph) -> Iterator[tuple[ir.Node, int, str, ir.Value, ir.Value]]:
    """(node, input index, "mean" or "variance", the value read, that value seen through Identities) for the
    running statistics of every ai.onnx BatchNormalization of ``graph``."""
    for node in list(graph):
        if node.op_type != "BatchNormalization" or node.domain not in ("", "ai.onnx"):
            continue
        for index, what in ((3, "mean"), (4, "variance")):
            v = node.inputs[index] if len(node.inputs) > index else None
            source = v
            while source is not None and (p := source.producer()) is not None and p.op_type == "Identity" \
                    and p.domain in ("", "ai.onnx"):
                source = p.inputs[0]
            if v is not None and source is not None:
                yield node, index, what, v, source


def _note_tied_statistics(graph: ir.Graph, xs: Sequence[ir.Value]) -> None:
    """A note for each x that a BatchNormalization also reads, through Identities, as its running mean or
    variance: PyTorch's exporter ties a fresh model's statistics (zeros, ones) to the bias and scale of equal value,
    and the gradient then includes the statistics' path."""
    wanted = set(xs)
    for node, _, what, v, source in running_statistics(graph):
        if source is not v and source in wanted:
            warnings.warn(GradientNote(
                f"xs: {source.name!r} is also BatchNormalization node '{node.name}''s running {what} (through "
                f"{v.name!r}: the exporter merges tensors of equal value), so its gradient includes that path; "
                "export with distinct statistics (a trained model has them) if that is not meant"), stacklevel=4)


def _note_integer_crossings(graph: ir.Graph, xs: Sequence[ir.Value], ys: Sequence[ir.Value], stop: set[ir.Value],
                            unconnected: UnconnectedGradients, straight_through: bool) -> None:
    """A note for each float x without a gradient that a y still depends on through values that are not float,
    naming the nodes where its paths leave the floats (the QuantizeLinear of a quantized model, a Cast to int)."""
    if not xs:
        return
    needed: set[ir.Value] = set(ys)  # the values some y depends on
    for node in reversed(list(graph)):
        if any(o in needed for o in node.outputs):
            needed.update(v for v in (*node.inputs, *implicit_inputs(node)) if v is not None)
    bits = {x: 1 << k for k, x in enumerate(dict.fromkeys(xs))}
    reach: dict[ir.Value, int] = dict(bits)  # value -> the xs it depends on, as a bitmask
    crossings: list[tuple[ir.Node, int]] = []
    for node in graph:
        if node.op_type in SHAPE_ONLY and node.domain in ("", "ai.onnx"):
            continue  # no dependence on the values
        ins = [v for v in (*node.inputs, *implicit_inputs(node)) if v is not None]
        mask = 0
        for v in ins:
            mask |= reach.get(v, 0)
        if not mask:
            continue
        outs = [o for o in node.outputs if o not in stop]
        for o in outs:
            reach[o] = reach.get(o, 0) | mask
        floats_in = 0
        for v in ins:
            if v.dtype in FLOAT_TYPES:
                floats_in |= reach.get(v, 0)
        if floats_in and any(o.dtype is not None and o.dtype not in FLOAT_TYPES and o in needed for o in outs):
            crossings.append((node, floats_in))
    hits = 0
    for y in ys:
        hits |= reach.get(y, 0)
    for x, bit in bits.items():
        where = [n for n, m in crossings if m & bit]
        if not hits & bit or not where:  # no y depends on x, or only through a rule that gives none (a stop marker)
            continue
        named = ", ".join(f"{n.op_type} {node_label(n)}" for n in where[:3]) + (", ..." if len(where) > 3 else "")
        quantized = not straight_through and any(n.op_type in ("QuantizeLinear", "DynamicQuantizeLinear")
                                                 for n in where)
        warnings.warn(GradientNote(
            f"xs: the ys depend on {x.name!r} only through values that are not float (from {named}), which carry "
            f"no gradient: unconnected, so {'zeros' if unconnected is UnconnectedGradients.ZERO else 'None'}"
            + ("; straight_through=True (grad --straight-through) passes it through the fake quantisation as "
               "torch's FakeQuantize does" if quantized else "")), stacklevel=4)


def _finalize(
    em: Emitter,
    xs: list[ir.Value],
    raw: list[ir.Value | Undefined | None],
    why: dict[ir.Value, str],
    unconnected: UnconnectedGradients,
    foreign: set[ir.Value],
) -> list[ir.Value | None]:
    """Give each gradient a fresh value named ``<scope>/<x>_grad`` (zeros where asked, never for an undefined one)."""
    finals: list[ir.Value | None] = []
    named: dict[ir.Value, ir.Value] = {}
    given: set[ir.Value] = set()  # the values of ``named`` (a set: thousands of xs stay linear)
    for x, g in zip(xs, raw, strict=True):
        if x in named:
            finals.append(named[x])
            continue
        if g is UNDEFINED:
            message = (f"the gradient of {x.name!r} is undefined: it reaches the ys through {why[x]}; list that "
                       "node's output in stop_gradients to treat it as a constant")
            if unconnected is UnconnectedGradients.ZERO:
                raise UndefinedGradient(message + " (an undefined gradient is never given as zeros)")
            warnings.warn(GradientNote(message + ": None"), stacklevel=4)
            finals.append(None)
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
