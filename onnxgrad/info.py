"""What ``onnxgrad info`` shows: what a model takes and gives, its weights and ops, which of its values can be
differentiated, and which ops on the way lack a rule.

Everything here reads a model through ``onnx_ir``, which keeps external tensors on disk until asked:
describing a large model never pulls its weights into Python memory."""

from __future__ import annotations

import os
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common

import onnxgrad.rules  # noqa: F401  (registers every rule: the report looks each op up)
from onnxgrad import registry
from onnxgrad.backprop import _backward_reach, _forward_reach
from onnxgrad.emitter import FLOAT_TYPES
from onnxgrad.io import load_lazy
from onnxgrad.shorthands import INPUTS, WEIGHTS, ModelLike, dtype_of

FIRST_FEW = 8


def as_ir(model: ModelLike | str | os.PathLike[str]) -> ir.Model:
    """An onnx_ir.Model: a path is loaded lazily (external data stays on disk); a ModelProto is converted."""
    if isinstance(model, ir.Model):
        return model
    if isinstance(model, onnx.ModelProto):
        return ir.serde.deserialize_model(model)
    return load_lazy(model)


def dtype_name(dtype: ir.DataType | None) -> str:
    """numpy's name (``float32``) where there is one, else ONNX's (``bfloat16``), ``?`` when unknown."""
    if dtype is None:
        return "?"
    try:
        return np.dtype(dtype.numpy()).name
    except (TypeError, ValueError, NotImplementedError):
        return dtype.name.lower()


def dims_of(shape: ir.Shape | None) -> list[int | str] | None:
    """Dimensions as ints and symbol names (``?`` for an unnamed unknown); None when the rank is unknown."""
    if shape is None:
        return None
    return [d if isinstance(d, int) else (d.value or "?") for d in shape]


def type_string(dtype: ir.DataType | None, shape: ir.Shape | None) -> str:
    """``float32[batch,4]``; ``float32`` alone when the rank is unknown."""
    dims = dims_of(shape)
    return dtype_name(dtype) if dims is None else f"{dtype_name(dtype)}[{','.join(str(d) for d in dims)}]"


def _value_row(v: ir.Value) -> dict[str, Any]:
    shape = v.shape if v.shape is not None or v.const_value is None else ir.Shape(v.const_value.shape)
    return {"name": v.name, "dtype": dtype_name(dtype_of(v)), "shape": dims_of(shape)}


def _nbytes(v: ir.Value) -> int:
    """Bytes of an initializer, from its dtype and shape (its data is not read)."""
    t = v.const_value
    if t is None:
        return 0
    count = int(np.prod([int(d) for d in t.shape], dtype=np.int64))
    return (count * t.dtype.bitwidth + 7) // 8


def _is_external(v: ir.Value) -> bool:
    return isinstance(v.const_value, ir.ExternalTensor)


def _op_label(node: ir.Node) -> str:
    domain = registry.normalize_domain(node.domain)
    return node.op_type if domain == "" else f"{domain}::{node.op_type}"


def _ensure_types(model: ir.Model) -> None:
    """Fill in dtypes and shapes of intermediate values with onnx shape inference when some are missing
    (large initializers are left out of the call, so external data is not read)."""
    if all(v.dtype is not None for n in model.graph for v in n.outputs):
        return
    ir.passes.common.ShapeInferencePass(strict_mode=False, data_prop=False)(model)


def differentiability(model: ir.Model) -> dict[str, Any]:
    """Which float outputs depend on which float inputs and weights, and the ops on those paths that
    have no gradient rule at the model's opset (these block ``gradients``; a stop gradient cures them)."""
    _ensure_types(model)
    graph = model.graph
    order = {id(n): i for i, n in enumerate(graph)}
    inputs = [v for v in graph.inputs if not v.is_initializer() and dtype_of(v) in FLOAT_TYPES]
    weights = [v for v in graph.initializers.values() if dtype_of(v) in FLOAT_TYPES]
    leaves = [*inputs, *weights]
    reach = _forward_reach(graph, leaves, set(), order) if leaves else set()
    outputs: list[dict[str, Any]] = []
    missing: dict[tuple[str, str, int], list[str]] = {}
    for out in graph.outputs:
        row: dict[str, Any] = {"name": out.name, "float": dtype_of(out) in FLOAT_TYPES or dtype_of(out) is None}
        if not row["float"]:
            row.update(inputs=[], weights=0, missing_rules=[])
            outputs.append(row)
            continue
        back = _backward_reach([out], set())
        between = reach & back
        row["inputs"] = [v.name for v in inputs if v in between]
        row["weights"] = sum(1 for v in weights if v in between)
        blocked: list[str] = []
        for node in graph:
            if not any(o in between for o in node.outputs) or not any(i in between for i in node.inputs):
                continue
            opset = registry.opset_of(model.opset_imports, node.domain)
            if registry.lookup(node.domain, node.op_type, opset) is None:
                key = (registry.normalize_domain(node.domain) or "ai.onnx", node.op_type, opset)
                names = missing.setdefault(key, [])
                if node.name not in names:
                    names.append(node.name or "")
                blocked.append(_op_label(node))
        row["missing_rules"] = sorted(set(blocked))
        outputs.append(row)
    return {
        "inputs": [v.name for v in inputs],
        "weights": [v.name for v in weights],
        "outputs": outputs,
        "missing_rules": [
            {"domain": d, "op_type": op, "opset": opset, "nodes": nodes}
            for (d, op, opset), nodes in sorted(missing.items())
        ],
    }


def describe(model: ModelLike | str | os.PathLike[str]) -> dict[str, Any]:
    """Everything ``onnxgrad info`` shows, as a JSON-ready dict."""
    m = as_ir(model)
    graph = m.graph
    weights = list(graph.initializers.values())
    nodes = [n for n in ir.traversal.RecursiveGraphIterator(graph)]
    ops = Counter(_op_label(n) for n in nodes)
    diff = differentiability(m)
    sizes = [_nbytes(v) for v in weights]
    return {
        "ir_version": m.ir_version,
        "producer": " ".join(p for p in (m.producer_name, m.producer_version) if p),
        "opsets": {(d or "ai.onnx"): int(v) for d, v in sorted(m.opset_imports.items())},
        "graph": graph.name,
        "inputs": [_value_row(v) for v in graph.inputs if not v.is_initializer()],
        "outputs": [_value_row(v) for v in graph.outputs],
        "weights": {
            "count": len(weights),
            "bytes": int(sum(sizes)),
            "float_count": len(diff["weights"]),
            "external": sum(1 for v in weights if _is_external(v)),
            "items": [_value_row(v) | {"bytes": s} for v, s in zip(weights, sizes, strict=True)],
        },
        "nodes": len(nodes),
        "ops": dict(sorted(ops.items(), key=lambda kv: (-kv[1], kv[0]))),
        "functions": [f"{f.domain}::{f.name}" for f in m.functions.values()],
        "differentiable": diff,
        "suggestion": suggestion(diff),
    }


def suggestion(diff: dict[str, Any]) -> str | None:
    """A ``--ys/--xs`` line for ``onnxgrad grad`` from the differentiability report (None if nothing fits)."""
    ys = [o["name"] for o in diff["outputs"] if o["float"] and (o["inputs"] or o["weights"])]
    if not ys:
        return None
    xs = []
    if any(o["weights"] for o in diff["outputs"] if o["name"] in ys):
        xs.append(WEIGHTS)
    if any(o["inputs"] for o in diff["outputs"] if o["name"] in ys):
        xs.append(INPUTS)
    scalar = [o for o in ys if o in ("loss", "energy", "cost")]
    chosen = scalar[:1] or ys[:1]
    return " ".join([*(f"--ys {y}" for y in chosen), *(f"--xs {x}" for x in xs)])


def human_bytes(n: int) -> str:
    """``1.5 MB`` style (powers of 1000, like file managers)."""
    size = float(n)
    for unit in ("B", "kB", "MB", "GB"):
        if size < 1000 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{n} B"


def format_description(info: dict[str, Any], path: str | os.PathLike[str] | None = None,
                       first: int = FIRST_FEW) -> str:
    """The human-readable text of ``onnxgrad info``."""
    lines: list[str] = []
    opsets = ", ".join(f"{d} {v}" for d, v in info["opsets"].items())
    head = f"{path}: " if path is not None else ""
    lines.append(f"{head}IR version {info['ir_version']}, opsets: {opsets}"
                 + (f", producer {info['producer']}" if info["producer"] else ""))

    def rows(items: Sequence[dict[str, Any]]) -> list[str]:
        width = max([len(str(r["name"])) for r in items] or [0])
        return [f"  {r['name']:<{width}}  {_type(r)}" for r in items]

    lines.append(f"inputs ({len(info['inputs'])}):")
    lines.extend(rows(info["inputs"]))
    lines.append(f"outputs ({len(info['outputs'])}):")
    lines.extend(rows(info["outputs"]))
    w = info["weights"]
    ext = f", {w['external']} in external data" if w["external"] else ""
    lines.append(f"weights: {w['count']} tensors, {human_bytes(w['bytes'])} ({w['float_count']} float{ext})")
    shown = w["items"][:first]
    width = max([len(str(r["name"])) for r in shown] or [0])
    twidth = max([len(_type(r)) for r in shown] or [0])
    for r in shown:
        lines.append(f"  {r['name']:<{width}}  {_type(r):<{twidth}}  {human_bytes(r['bytes'])}")
    if len(w["items"]) > first:
        lines.append(f"  ... and {len(w['items']) - first} more")
    lines.append(f"ops ({info['nodes']} nodes): " + ", ".join(f"{k} {v}" for k, v in info["ops"].items()))
    d = info["differentiable"]
    lines.append("differentiable:")
    lines.append(f"  float inputs ({INPUTS}): {', '.join(d['inputs']) or 'none'}")
    lines.append(f"  float weights ({WEIGHTS}): {len(d['weights'])}")
    for o in d["outputs"]:
        if not o["float"]:
            lines.append(f"  {o['name']}: not a float value (cannot be a y)")
            continue
        deps = [*o["inputs"], *([f"{o['weights']} weights"] if o["weights"] else [])]
        what = ", ".join(deps) if deps else "nothing (constant)"
        status = f"; blocked: no rule for {', '.join(o['missing_rules'])}" if o["missing_rules"] else ""
        lines.append(f"  {o['name']}: depends on {what}{status}")
    for m in d["missing_rules"]:
        nodes = ", ".join(repr(n) for n in m["nodes"][:3]) + (" ..." if len(m["nodes"]) > 3 else "")
        lines.append(f"  no gradient rule: {m['op_type']} ({m['domain']}, opset {m['opset']}) at {nodes}")
    if info["suggestion"]:
        lines.append(f"try: onnxgrad grad {path if path is not None else 'MODEL'} -o OUT {info['suggestion']}")
    return "\n".join(lines)


def _type(row: dict[str, Any]) -> str:
    dims = row["shape"]
    return row["dtype"] if dims is None else f"{row['dtype']}[{','.join(str(d) for d in dims)}]"
