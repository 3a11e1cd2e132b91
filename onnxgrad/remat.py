"""Rematerialisation: forward values that the gradient part reads (residuals) recomputed inside the gradient part
instead of kept alive from the forward pass, the way ``jax.checkpoint`` and ``torch.utils.checkpoint`` do.

``residuals`` lists what a gradient keeps alive, with sizes; ``plan`` picks the values to recompute (names or
patterns, a policy, or a memory budget solved greedily); ``rematerialize`` re-emits the forward nodes that compute
them, through the gradient's emitter, right before the gradient nodes that read them, and points those reads at the
copies. The forward part is untouched: its nodes and outputs stay as they are."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import _NOT_PURE, Emitter, attr, is_float, subgraphs

POLICIES = ("nothing-saveable", "matmuls-only")
SHAPE_ONLY = frozenset({"Shape", "Size"})
DOTS = frozenset({"MatMul", "Gemm", "Conv", "ConvTranspose", "Einsum", "MatMulInteger", "QLinearMatMul"})
UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}


@dataclass(frozen=True)
class Residual:
    """A forward value that the gradient part reads."""

    name: str
    op: str  # the op that computes it
    shape: tuple[int | str, ...] | None
    dtype: str
    bytes: int  # at the dimensions asked for; -1 when the shape is unknown


def parse_bytes(text: str | int) -> int:
    """'512MB', '1.5GiB', '2e9' or an int, as bytes."""
    if isinstance(text, int):
        return text
    s = text.strip().upper().replace(" ", "")
    unit = next((u for u in sorted(UNITS, key=len, reverse=True) if u and s.endswith(u)), "")
    try:
        return int(float(s[: len(s) - len(unit)]) * UNITS[unit])
    except ValueError:
        raise ValueError(f"memory budget {text!r}: expected a number of bytes such as 512MB, 1.5GiB or 2e9") from None


def value_bytes(v: ir.Value, dims: Mapping[str, int] | None = None, default: int = 1) -> int:
    """v's size in bytes with symbolic dimensions taken from ``dims`` (else ``default``); -1 when unknown."""
    if v.shape is None or v.dtype is None:
        return -1
    n = 1
    for d in v.shape:
        if isinstance(d, int):
            n *= d
        else:
            n *= (dims or {}).get(str(d.value) if isinstance(d, ir.SymbolicDim) else str(d), default)
    return math.ceil(n * v.dtype.itemsize)


def _forward_nodes(graph: ir.Graph, emitted: Iterable[ir.Node]) -> set[int]:
    mine = {id(n) for n in emitted}
    return {id(n) for n in graph if id(n) not in mine}


def _forward_positions(graph: ir.Graph, emitted: Iterable[ir.Node]) -> dict[int, int]:
    """Each forward node's position among the forward nodes, by id."""
    forward = _forward_nodes(graph, emitted)
    return {id(n): k for k, n in enumerate(n for n in graph if id(n) in forward)}


def read_residuals(graph: ir.Graph, grad_nodes: Sequence[ir.Node]) -> list[ir.Value]:
    """The outputs of forward nodes (not graph inputs or initializers) that ``grad_nodes`` read for more than their
    shape (a Shape or Size reader runs as soon as the value exists), in first-read order."""
    forward = _forward_nodes(graph, grad_nodes)
    found: dict[ir.Value, None] = {}
    for n in grad_nodes:
        if n.op_type in SHAPE_ONLY:
            continue
        for v in n.inputs:
            p = None if v is None else v.producer()
            if p is not None and id(p) in forward and v not in found:
                found[v] = None
    return list(found)


def recomputable(v: ir.Value) -> bool:
    """A forward value that can be computed again with the same bits: a float output of a pure node without
    subgraphs (not Dropout, not a random op)."""
    p = v.producer()
    return p is not None and is_float(v) and p.op_type not in _NOT_PURE and not subgraphs(p) and p.domain in (
        "", "ai.onnx")


def _sizes(values: Iterable[ir.Value], dims: Mapping[str, int] | None) -> dict[ir.Value, int]:
    return {v: max(value_bytes(v, dims), 0) for v in values}


def plan(residuals: Sequence[ir.Value], recompute: Sequence[str] | None = None, policy: str | None = None,
         budget: int | None = None, dims: Mapping[str, int] | None = None) -> set[ir.Value]:
    """The values to recompute: those ``recompute`` names (or matches, fnmatch patterns), all a policy gives up
    ('nothing-saveable': every recomputable value; 'matmuls-only': all but the outputs of MatMul, Gemm, Conv...),
    and, under a ``budget`` in bytes, the largest residuals until what stays saved fits (greedy, largest first,
    counting the inputs a recomputation keeps alive instead)."""
    if policy is not None and policy not in POLICIES:
        raise ValueError(f"remat policy {policy!r}: expected one of {', '.join(POLICIES)}")
    chosen: set[ir.Value] = set()
    for v in residuals:
        if not recomputable(v):
            continue
        if recompute and any(fnmatch.fnmatchcase(v.name or "", pat) for pat in recompute):
            chosen.add(v)
        if policy == "nothing-saveable" or (policy == "matmuls-only" and v.producer().op_type not in DOTS):  # type: ignore[union-attr]
            chosen.add(v)
    if budget is not None:
        sizes = _sizes(residuals, dims)
        for v in sorted((r for r in residuals if recomputable(r)), key=lambda r: -sizes[r]):
            if saved_bytes(residuals, chosen, policy, dims) <= budget:
                break
            chosen.add(v)
    return chosen


def _closure(chosen: set[ir.Value], policy: str | None, residuals: Sequence[ir.Value],
             saved: Iterable[ir.Value] = ()) -> set[ir.Value]:
    """What recomputing ``chosen`` recomputes: the chosen values and, back from them, every recomputable value on the
    way that is not saved anyway (a residual not chosen, or a segment boundary in ``saved``) and that the policy does
    not save ('matmuls-only' keeps the products). Its other inputs stay alive, saved."""
    kept = (set(residuals) - chosen) | set(saved)
    out: set[ir.Value] = set()
    stack = list(chosen)
    while stack:
        v = stack.pop()
        if v in out:
            continue
        out.add(v)
        for i in v.producer().inputs:  # type: ignore[union-attr]
            if i is None or i in kept or not recomputable(i):
                continue
            if policy == "matmuls-only" and i.producer().op_type in DOTS:  # type: ignore[union-attr]
                continue
            stack.append(i)
    return out


def boundaries(graph: ir.Graph, grad_nodes: Sequence[ir.Node]) -> list[tuple[int, ir.Value]]:
    """The forward's articulation values, in forward order with their node positions: a recomputable value ``v`` such
    that, once the node at that position has run, ``v`` is the only recomputable value a later forward node still
    reads (integer shape arithmetic, weights and values that cannot be recomputed do not count: they stay saved).
    Cutting there splits the forward into segments that each recompute from the boundary before them alone."""
    pos = _forward_positions(graph, grad_nodes)
    order = [n for n in graph if id(n) in pos]
    ends: dict[int, list[ir.Value]] = {}
    for k, n in enumerate(order):
        for v in n.outputs:
            if not recomputable(v):
                continue
            last = max((pos[id(u.node)] for u in v.uses() if id(u.node) in pos), default=k)
            ends.setdefault(last, []).append(v)
    crossing: dict[ir.Value, None] = {}
    found = []
    for k, n in enumerate(order):
        for v in n.outputs:
            if recomputable(v):
                crossing[v] = None
        for v in ends.get(k, ()):
            crossing.pop(v, None)
        if len(crossing) == 1:
            found.append((k, next(iter(crossing))))
    return found


def segment(graph: ir.Graph, grad_nodes: Sequence[ir.Node], residuals: Sequence[ir.Value], chosen: set[ir.Value],
            dims: Mapping[str, int] | None = None
            ) -> tuple[set[ir.Value], set[ir.Value], dict[ir.Value, ir.Value]]:
    """(boundaries to save, chosen values to save after all, the boundary ending each recomputed value's segment)
    for recomputing ``chosen`` segment by segment: about
    sqrt(recomputed bytes / boundary bytes) segments, cut at ``boundaries`` where the recomputed bytes since the last
    cut reach their share. Each segment is recomputed from the boundary before it, right before its own backward,
    so only one segment's values are alive at a time; the last segment is kept from the forward (its backward runs
    right after it, so recomputing it would cost time and save nothing)."""
    cuts = boundaries(graph, grad_nodes)
    if not cuts or not chosen:
        return set(), set(), {}
    pos = _forward_positions(graph, grad_nodes)
    sizes = _sizes(chosen, dims)
    total = sum(sizes.values())
    per_cut = max(1, sum(max(value_bytes(v, dims), 0) for _, v in cuts) // len(cuts))
    share = total / max(1.0, min(len(cuts) + 1.0, math.sqrt(total / per_cut)))
    at = sorted((pos[id(v.producer())], sizes[v]) for v in chosen)  # type: ignore[arg-type]
    saved: dict[ir.Value, None] = {}
    acc, i = 0, 0
    for k, v in cuts:
        while i < len(at) and at[i][0] <= k:
            acc += at[i][1]
            i += 1
        if acc >= share and v not in saved:
            saved[v] = None
            acc = 0
    if not saved:
        return set(), set(), {}
    ends = sorted((pos[id(v.producer())], v) for v in saved)  # type: ignore[arg-type]
    tail, end_of = set(), {}
    for v in chosen:
        at_v = pos[id(v.producer())]  # type: ignore[arg-type]
        after = next((b for k, b in ends if k >= at_v), None)
        if after is None:
            tail.add(v)
        else:
            end_of[v] = after
    return set(saved), tail, end_of


def saved_bytes(residuals: Sequence[ir.Value], chosen: set[ir.Value], policy: str | None,
                dims: Mapping[str, int] | None, saved: Iterable[ir.Value] = ()) -> int:
    """Bytes of forward activations kept for the gradient part once ``chosen`` is recomputed."""
    again = _closure(chosen, policy, residuals, saved)
    kept = {r for r in residuals if r not in again}
    for v in again:
        for i in v.producer().inputs:  # type: ignore[union-attr]
            if i is not None and i not in again and i.producer() is not None:
                kept.add(i)  # an input of a recomputation stays alive instead
    return sum(_sizes(kept, dims).values())


def rematerialize(em: Emitter, chosen: set[ir.Value], policy: str | None = None,
                  residuals: Sequence[ir.Value] = (), readers: Sequence[ir.Node] | None = None,
                  saved: Iterable[ir.Value] = (), triggers: Mapping[ir.Value, ir.Value] | None = None,
                  hold: Mapping[ir.Value, ir.Value] | None = None) -> dict[ir.Value, ir.Value]:
    """Re-emit the forward nodes computing ``chosen`` (and, under a policy, what it does not save on the way) and point
    every read of them by ``readers`` (default: the emitter's nodes) at the copies, each copy placed right before its
    first reader. A copy waits for a gradient value: ``triggers`` gives it per chosen value (the gradient of its
    segment's end), else it is a gradient its first reader reads. ``hold`` gives, per saved forward value, the gradient
    its direct reads wait for (so a gradient node that reads only forward values cannot run during the forward pass,
    keeping a second copy of it alive from there on).

    Returns the copies by original value."""
    again = _closure(chosen, policy, residuals, saved)
    grad_nodes = list(em.nodes)
    reading = grad_nodes if readers is None else list(readers)
    copies: dict[ir.Value, ir.Value] = {}
    gated: dict[tuple[int, int], ir.Value] = {}
    forward = _forward_nodes(em.graph, grad_nodes)

    def gate(v: ir.Value, trigger: ir.Value | None) -> ir.Value:
        """v, read only once ``trigger`` (a gradient value) exists: Where(ok, v, v) is v bit for bit whatever ok is,
        and it keeps onnxruntime from computing the copy during the forward pass or merging it with the original
        (its common-subexpression elimination)."""
        p = v.producer()
        if trigger is None or em.opset < 9 or not is_float(trigger) or v.is_initializer() or (
                p is not None and p.op_type == "Constant"):
            return v  # weights and constants live all along: nothing to hold back
        key = (id(v), id(trigger))
        if key not in gated:
            first = em.Reshape(em.slice(em.Reshape(trigger, em.ints([-1])), [0], [1], [0]), em.ints([]))
            node = ir.Node("", "Where", [em.Not(em.IsNaN(first)), v, v], name=em.fresh_name("remat_gate"))
            em.nodes.append(node)  # built by hand: the emitter's clean-up folds Where(c, v, v) to v
            out = node.outputs[0]
            out.name, out.dtype, out.shape = node.name, v.dtype, v.shape
            gated[key] = out
        return gated[key]

    def copy(v: ir.Value, trigger: ir.Value | None) -> ir.Value:
        if v in copies:
            return copies[v]
        node = v.producer()
        assert node is not None
        inputs = [None if i is None else copy(i, trigger) if i in again else gate(i, trigger) for i in node.inputs]
        attrs = {k: attr(node, k) for k in node.attributes}
        outs = em.op(node.op_type, *inputs, _outputs=len(node.outputs), _domain=node.domain, **attrs)
        outs = (outs,) if len(node.outputs) == 1 else outs
        for o, c in zip(node.outputs, outs, strict=True):
            if c.dtype is None:
                c.dtype = o.dtype
            if c.shape is None:
                c.shape = o.shape
            copies[o] = c
        return copies[v]

    for n in reading:
        if n.op_type in SHAPE_ONLY:
            continue  # it reads only the shape: onnxruntime runs it as soon as the original exists, then frees that
        trigger = next((v for v in n.inputs if v is not None and (p := v.producer()) is not None
                        and id(p) not in forward and p.op_type != "Constant" and v.dtype is not None
                        and is_float(v) and v not in copies.values()), None)
        for i, v in enumerate(n.inputs):
            if v is not None and v in chosen:
                n.replace_input_with(i, copy(v, (triggers or {}).get(v, trigger)))
            elif v is not None and hold and v in hold:
                n.replace_input_with(i, gate(v, hold[v]))
    _place_before_readers(em, grad_nodes)
    return copies


def _place_before_readers(em: Emitter, grad_nodes: list[ir.Node]) -> None:
    """Order the emitter's nodes so that each recomputation comes right before the first node that reads it."""
    mine = {id(n) for n in em.nodes}
    ordered: list[ir.Node] = []
    placed: set[int] = set()

    def place(root: ir.Node) -> None:  # depth first, producers before readers (iterative: graphs are deep)
        stack: list[tuple[ir.Node, bool]] = [(root, False)]
        while stack:
            n, ready = stack.pop()
            if ready:
                ordered.append(n)
                continue
            if id(n) in placed:
                continue
            placed.add(id(n))
            stack.append((n, True))
            for v in reversed(n.inputs):
                p = None if v is None else v.producer()
                if p is not None and id(p) in mine and id(p) not in placed:
                    stack.append((p, False))

    for n in [*grad_nodes, *em.nodes]:
        place(n)
    em.nodes[:] = ordered


@dataclass(frozen=True)
class Budget:
    """A memory budget with the sizes of the symbolic dimensions it is meant for (others count as 1)."""

    bytes: int | str
    dims: Mapping[str, int] | None = None


def apply(em: Emitter, roots: Sequence[ir.Value], recompute: Sequence[str] | None, policy: str | None,
          budget: int | str | Budget | None, totals: Mapping[ir.Value, ir.Value] | None = None
          ) -> dict[ir.Value, ir.Value]:
    """The hook ``gradients()`` calls before committing: plan and rematerialize what the live gradient nodes (those
    ``roots`` need) read (nothing when nothing is asked). ``totals``: the walk's gradient of each forward value."""
    if not recompute and policy is None and budget is None:
        return {}
    live = em.live_nodes(roots)
    residuals = read_residuals(em.graph, live)
    spec = budget if isinstance(budget, Budget) else None if budget is None else Budget(budget)
    dims = None if spec is None else spec.dims
    chosen = plan(residuals, recompute, policy, None if spec is None else parse_bytes(spec.bytes), dims)
    saved: set[ir.Value] = set()
    if policy == "nothing-saveable":  # one segment at a time, not the whole forward at once
        saved, tail, end_of = segment(em.graph, live, residuals, chosen, dims)
        chosen -= tail | saved
        triggers = {v: totals[b] for v, b in end_of.items() if totals and b in totals}
    else:  # each recomputation waits for the gradient that reaches the value's last forward reader
        triggers = _hold(em.graph, live, list(chosen), totals or {})
    if not chosen:
        return {}
    hold = _hold(em.graph, live, [r for r in residuals if r not in chosen], totals or {})
    return rematerialize(em, chosen, policy, residuals, live, saved, triggers, hold)


def _hold(graph: ir.Graph, grad_nodes: Sequence[ir.Node], kept: Sequence[ir.Value],
          totals: Mapping[ir.Value, ir.Value]) -> dict[ir.Value, ir.Value]:
    """For each saved value, the gradient its reads in the gradient part wait for: that of an output of its last
    forward reader (computed before any rule reads the value, and from later nodes' rules only, which do not read
    it)."""
    pos = _forward_positions(graph, grad_nodes)
    out = {}
    for v in kept:
        readers = [u.node for u in v.uses() if id(u.node) in pos]
        if not readers:
            continue
        last = max(readers, key=lambda n: pos[id(n)])
        g = next((totals[o] for o in last.outputs if o in totals), None)
        if g is not None and is_float(g):
            out[v] = g
    return out


# --------------------------------------------------------------------------------- info --residuals
def residual_rows(graph: ir.Graph, grad_nodes: Sequence[ir.Node], dims: Mapping[str, int] | None = None,
                  default: int = 1) -> list[Residual]:
    """The forward values ``grad_nodes`` read, largest first, with their sizes at ``dims`` (symbolic dimensions not
    named there: ``default``). ``onnxgrad.augment.residuals`` builds the gradient and calls this."""
    rows = [Residual(v.name or "", v.producer().op_type,  # type: ignore[union-attr]
                     None if v.shape is None else tuple(d if isinstance(d, int) else str(d) for d in v.shape),
                     "?" if v.dtype is None else np.dtype(v.dtype.numpy()).name, value_bytes(v, dims, default))
            for v in read_residuals(graph, grad_nodes)]
    return sorted(rows, key=lambda r: (-r.bytes, r.name))


def format_residuals(rows: Sequence[Residual]) -> str:
    """The table ``onnxgrad info --residuals`` prints."""
    total = sum(max(r.bytes, 0) for r in rows)
    lines = [f"{len(rows)} forward values kept alive for the backward part, {total} bytes in all:"]
    width = max((len(r.name) for r in rows), default=4)
    for r in rows:
        shape = "?" if r.shape is None else "[" + ",".join(map(str, r.shape)) + "]"
        size = "?" if r.bytes < 0 else f"{r.bytes}"
        lines.append(f"  {r.name:<{width}}  {r.op:<20} {r.dtype}{shape}  {size} bytes")
    return "\n".join(lines)
