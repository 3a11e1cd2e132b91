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
from onnxgrad.emitter import FLOAT_TYPES, SHAPE_ONLY, implicit_inputs, subgraphs
from onnxgrad.io import load_lazy
from onnxgrad.shorthands import INPUTS, WEIGHTS, ModelLike, dtype_of, select_weights

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


def _reads(node: ir.Node) -> list[ir.Value]:
    """What ``node`` reads: its inputs and the outer values its subgraphs read."""
    return [*(v for v in node.inputs if v is not None), *implicit_inputs(node)]


def _backward(ys: Sequence[ir.Value]) -> set[ir.Value]:
    """Values some y depends on, through node inputs and the outer values that subgraphs read."""
    seen: set[ir.Value] = set(ys)
    stack = list(ys)
    while stack:
        node = stack.pop().producer()
        if node is None:
            continue
        for v in _reads(node):
            if v not in seen:
                seen.add(v)
                stack.append(v)
    return seen


def _forward(nodes: Sequence[ir.Node], seeds: Sequence[ir.Value]) -> set[ir.Value]:
    """Float values of ``nodes``' outputs that depend on a seed (a subgraph's read counts as its holder's)."""
    reach: set[ir.Value] = set(seeds)
    for node in nodes:  # topological order
        if any(v in reach for v in _reads(node)):
            reach.update(o for o in node.outputs if dtype_of(o) in FLOAT_TYPES or dtype_of(o) is None)
    return reach


def _body_gaps(node: ir.Node, live: set[ir.Value], opsets: Any, where: str) -> list[tuple[ir.Node, str]]:
    """Nodes without a rule inside ``node``'s subgraphs, on the way from what varies (the body's inputs and the
    outer values in ``live``) to the body's outputs, with where each sits (``If 'cond' / then_branch``)."""
    gaps: list[tuple[ir.Node, str]] = []
    for sub in subgraphs(node):
        here = f"{where}{node.op_type} '{node.name or '(unnamed)'}' / {sub.name or 'body'}"
        nodes = list(sub)
        reach = _forward(nodes, [*sub.inputs, *live])
        between = reach & _backward(list(sub.outputs))
        for inner in nodes:
            if not any(o in between for o in inner.outputs) or not any(v in between for v in _reads(inner)):
                continue
            opset = registry.opset_of(opsets, inner.domain)
            if registry.rule_for(inner.domain, inner.op_type, opset) is None:
                gaps.append((inner, here))
            gaps.extend(_body_gaps(inner, between, opsets, here + ": "))
    return gaps


def differentiability(model: ir.Model) -> dict[str, Any]:
    """Which float outputs depend on which float inputs and trainable weights, and the ops on those paths that
    have no gradient rule at the model's opset (these block ``gradients``; a stop gradient cures them). Values that
    If / Loop / Scan bodies read from outer scope are dependencies of the node that holds them, and ops inside
    those bodies need rules too. Float initializers that ``@weights`` leaves out are listed, with why."""
    _ensure_types(model)
    graph = model.graph
    nodes = list(graph)
    inputs = [v for v in graph.inputs if not v.is_initializer() and dtype_of(v) in FLOAT_TYPES]
    trainable, left_out = select_weights(model)
    weights = [graph.initializers[n] for n in trainable]
    leaves = [*inputs, *weights]
    reach = _forward(nodes, leaves) if leaves else set()
    outputs: list[dict[str, Any]] = []
    missing: dict[tuple[str, str, int], list[str]] = {}
    for out in graph.outputs:
        row: dict[str, Any] = {"name": out.name, "float": dtype_of(out) in FLOAT_TYPES or dtype_of(out) is None}
        if not row["float"]:
            row.update(inputs=[], weights=0, missing_rules=[], through_integers=[], quantized=False)
            outputs.append(row)
            continue
        back = _backward([out])
        between = reach & back
        fed = {v for node in nodes if any(o in between for o in node.outputs) for v in _reads(node)}
        row["inputs"] = [v.name for v in inputs if v in between and v in fed]  # a float path to the output
        row["weights"] = sum(1 for v in weights if v in between and v in fed)
        read = {v for node in nodes if node.op_type not in SHAPE_ONLY and any(o in back for o in node.outputs)
                for v in _reads(node)}  # a value read for its shape alone is no dependence
        row["through_integers"] = [v.name for v in leaves if v in read and v not in fed]
        row["quantized"] = bool(row["through_integers"]) and any(
            n.op_type == "QuantizeLinear" and n.inputs and n.inputs[0] in reach for n in nodes)
        blocked: list[str] = []
        for node in nodes:
            if not any(o in between for o in node.outputs) or not any(v in between for v in _reads(node)):
                continue
            opset = registry.opset_of(model.opset_imports, node.domain)
            gaps = [(node, "")] if registry.rule_for(node.domain, node.op_type, opset) is None else []
            gaps += _body_gaps(node, between, model.opset_imports, "")
            for gap, where in gaps:
                opset = registry.opset_of(model.opset_imports, gap.domain)
                key = (registry.normalize_domain(gap.domain) or "ai.onnx", gap.op_type, opset)
                names = missing.setdefault(key, [])
                label = f"{where}: {gap.name or '(unnamed)'}" if where else gap.name or ""
                if label not in names:
                    names.append(label)
                blocked.append(_op_label(gap))
        row["missing_rules"] = sorted(set(blocked))
        outputs.append(row)
    return {
        "inputs": [v.name for v in inputs],
        "weights": [v.name for v in weights],
        "left_out": [{"name": w.name, "reason": w.reason} for w in left_out],
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
            "float_count": len(diff["weights"]) + len(diff["left_out"]),
            "trainable": len(diff["weights"]),
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
    ys = [o["name"] for o in diff["outputs"]
          if o["float"] and (o["inputs"] or o["weights"]) and not o["missing_rules"]]
    if not ys:  # nothing, or every candidate blocked by an op without a rule: a grad line would fail
        return None
    scalar = [o for o in ys if o in ("loss", "energy", "cost")]
    chosen = scalar[:1] or ys[:1]
    xs = []
    if any(o["weights"] for o in diff["outputs"] if o["name"] in chosen):
        xs.append(WEIGHTS)
    if any(o["inputs"] for o in diff["outputs"] if o["name"] in chosen):
        xs.append(INPUTS)
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
    lines.append(f"  float weights ({WEIGHTS}): {len(d['weights'])} trainable"
                 + (f", {len(d['left_out'])} left out" if d["left_out"] else ""))
    for w in d["left_out"][:first]:
        lines.append(f"    left out: {w['name']} ({w['reason']})")
    if len(d["left_out"]) > first:
        lines.append(f"    ... and {len(d['left_out']) - first} more left out")
    for o in d["outputs"]:
        if not o["float"]:
            lines.append(f"  {o['name']}: not a float value (cannot be a y)")
            continue
        deps = [*o["inputs"], *([f"{o['weights']} weights"] if o["weights"] else [])]
        what = ", ".join(deps) if deps else "nothing (constant)"
        status = f"; blocked: no rule for {', '.join(o['missing_rules'])}" if o["missing_rules"] else ""
        lines.append(f"  {o['name']}: depends on {what}{status}")
        if o["through_integers"]:
            names = ", ".join(o["through_integers"][:3]) + (" ..." if len(o["through_integers"]) > 3 else "")
            lines.append(f"    and on {names} only through values that are not float: no gradient"
                         + (" (grad --straight-through passes one through fake quantisation)" if o["quantized"]
                            else ""))
    for m in d["missing_rules"]:
        nodes = ", ".join(repr(n) for n in m["nodes"][:3]) + (" ..." if len(m["nodes"]) > 3 else "")
        lines.append(f"  no gradient rule: {m['op_type']} ({m['domain']}, opset {m['opset']}) at {nodes}")
    if info["suggestion"]:
        lines.append(f"try: onnxgrad grad {path if path is not None else 'MODEL'} -o OUT {info['suggestion']}")
    elif any(o["missing_rules"] for o in d["outputs"]):
        lines.append("no grad line to suggest: every output that depends on an input or weight passes an op without "
                     "a rule (register one, or stop the gradient before it with --stop-gradients)")
    return "\n".join(lines)


def _type(row: dict[str, Any]) -> str:
    dims = row["shape"]
    return row["dtype"] if dims is None else f"{row['dtype']}[{','.join(str(d) for d in dims)}]"
