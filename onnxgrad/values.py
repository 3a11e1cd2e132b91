"""The values of a graph: finding them by name, naming new ones, typing them, and exposing them as outputs.

A low module (it imports no other part of onnxgrad but the shape inference): the API, the higher orders and
the model-file entry point all build on it."""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

import onnx_ir as ir

from onnxgrad.shapes import infer_missing_types


def as_list(x: Any) -> list[Any]:
    """``x`` as a list: None is empty, one name or value is a list of one."""
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


def resolve(table: dict[str, ir.Value], item: str | ir.Value, role: str) -> ir.Value:
    """The value ``item`` names (or is), from ``table``; a ``ValueError`` with close matches when there is none."""
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


def expose(model: ir.Model, names: str | ir.Value | Sequence[str | ir.Value | None] | None) -> list[str]:
    """Make each named value an output of ``model``'s graph, after the outputs it has; returns the names exposed.

    What ``gradients``, ``hessian_vector_product`` and ``jacobian`` return are values inside the graph, which a
    plain run does not output: ``expose(model, names)`` makes them outputs under the same names. None entries
    (unconnected gradients) are skipped, a value that is an output already is not added twice, and calling it
    again changes nothing. An unknown name is a ``ValueError`` (with close matches), and nothing is added."""
    if not isinstance(model, ir.Model):
        raise TypeError(
            f"expose() works on an onnx_ir.Model, got {type(model).__module__}.{type(model).__name__}; "
            "onnxgrad.add_gradients returns a model with its gradients exposed already"
        )
    items = [n for n in as_list(names) if n is not None]
    table = value_table(model.graph)
    values = [resolve(table, n, "expose") for n in items]  # all found before any is added
    outputs = model.graph.outputs
    have = {id(v) for v in outputs}
    for v in values:
        if id(v) not in have:
            outputs.append(v)
            have.add(id(v))
    return [v.name or "" for v in values]


TypeSnapshot = list[tuple[ir.Value, Any, Any, Any]]


def ensure_types(model: ir.Model) -> TypeSnapshot:
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


def restore_types(snapshot: TypeSnapshot) -> None:
    """Undo ``ensure_types`` (inference sets dtypes in place on existing types)."""
    for v, type_, dtype, shape in snapshot:
        v.type, v.shape = type_, shape
        if type_ is not None and dtype is not None and type_.dtype != dtype:
            type_.dtype = dtype
