"""The reverse walk: which values lie between xs and ys, which nodes to differentiate, and how
contributions are gathered. It knows nothing of any op: every node goes through the registry (or a fusion
that the plans name). It runs on a graph or on any node sequence in topological order: a function body
re-emitted in the gradient part walks through the same code."""

from __future__ import annotations

import functools
import gc
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

import onnx_ir as ir

from onnxgrad import plans, registry
from onnxgrad.emitter import Emitter, implicit_inputs, is_float, subgraphs
from onnxgrad.registry import UNDEFINED, Undefined, opset_of
from onnxgrad.schemas import unknown_op

F = TypeVar("F", bound=Callable[..., Any])


def gc_paused(fn: F) -> F:
    """Run ``fn`` with Python's cyclic garbage collector paused (and restored after).

    Building a gradient graph allocates hundreds of thousands of long-lived objects (nodes, values,
    uses) and almost no garbage; the collector's repeated passes over them cost twice the build itself
    and grow with the graph (measured: 10k-node chain 1.8 s with, 0.6 s without)."""

    @functools.wraps(fn)
    def paused(*args: Any, **kwargs: Any) -> Any:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return fn(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    return paused  # type: ignore[return-value]


@dataclass
class Request:
    """A validated walk: everything here exists in the graph (or node sequence) walked."""

    ys: list[ir.Value]
    xs: list[ir.Value]
    seeds: list[ir.Value]  # one per y, same dtype and shape as y
    stop: set[ir.Value] = field(default_factory=set)
    totals: dict[ir.Value, ir.Value] | None = None  # when given, filled with every walked value's gradient
    straight_through: bool = False  # DequantizeLinear(QuantizeLinear(x)) passes gradient to x (plans/quantization)


@dataclass(frozen=True)
class WalkContext:
    """What plans may know of the walk in progress, handed to them explicitly."""

    wanted: frozenset[ir.Value]  # values whose gradient this walk computes: between xs and ys, not stopped
    stop: frozenset[ir.Value]
    xs: frozenset[ir.Value]
    ys: frozenset[ir.Value]
    opset: int
    straight_through: bool = False


class UndefinedGradient(ValueError):
    """An x whose gradient passes through an input that no rule differentiates (see ``registry.UNDEFINED``)."""


def _subgraph_owners(nodes: Sequence[ir.Node]) -> dict[int, ir.Node]:
    """For every node inside a subgraph of one of ``nodes``, the node of ``nodes`` that holds it."""
    outer: dict[int, ir.Node] = {}
    for top in nodes:
        for sub in subgraphs(top):
            for inner in ir.traversal.RecursiveGraphIterator(sub):
                outer[id(inner)] = top
    return outer


def _forward_reach(
    nodes: Sequence[ir.Node], xs: Sequence[ir.Value], stop: set[ir.Value], order: dict[int, int],
    straight_through: bool = False,
) -> set[ir.Value]:
    """Float values that depend on some x through float values and ``nodes`` (stopped values pass nothing on).

    A value used inside a subgraph (If, Loop, Scan) reaches the outputs of the node that holds the subgraph;
    consumers outside ``nodes`` (the forward graph around a function body, say) are not followed.
    ``straight_through``: a QuantizeLinear's integer output, and the outputs of the DequantizeLinear nodes that read
    it, are reached from its float input too."""
    seen: set[ir.Value] = set(xs)
    stack = list(xs)
    outer: dict[int, ir.Node] | None = None
    while stack:
        v = stack.pop()
        if v in stop and v not in xs:
            continue
        for node in v.consumers():
            if id(node) not in order:
                outer = _subgraph_owners(nodes) if outer is None else outer
                holder = outer.get(id(node))
                if holder is None:
                    continue
                node = holder
            for out in node.outputs:
                if out not in seen and is_float(out):
                    seen.add(out)
                    stack.append(out)
            if straight_through and node.op_type == "QuantizeLinear" and not node.domain and node.inputs[0] is v:
                for use in node.outputs[0].uses():
                    dq = use.node
                    if dq.op_type == "DequantizeLinear" and not dq.domain and use.idx == 0 and id(dq) in order \
                            and dq.outputs[0] not in seen:
                        seen.update((node.outputs[0], dq.outputs[0]))
                        stack.append(dq.outputs[0])
    return seen


def _backward_reach(ys: Sequence[ir.Value], stop: set[ir.Value]) -> set[ir.Value]:
    """Values some y depends on, not looking past stopped values."""
    seen: set[ir.Value] = set(ys)
    stack = list(ys)
    while stack:
        v = stack.pop()
        if v in stop:
            continue
        node = v.producer()
        if node is None:
            continue
        for inp in [*node.inputs, *implicit_inputs(node)]:
            if inp is not None and inp not in seen:
                seen.add(inp)
                stack.append(inp)
    return seen


def _uses_any(node: ir.Node, values: set[ir.Value]) -> bool:
    """True when node reads some value of ``values``, directly or from inside a subgraph."""
    if any(i in values for i in node.inputs if i is not None):
        return True
    for a in node.attributes.values():
        if a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS):
            return True  # conservatively on the path; its rule (or its absence) decides
    return False


def _annotate(g: ir.Value, like: ir.Value) -> None:
    """A gradient has the dtype and shape of the value it belongs to."""
    if g.dtype is None:
        g.dtype = like.dtype
    if g.shape is None and like.shape is not None:
        g.shape = like.shape


def node_label(node: ir.Node) -> str:
    """'name', or '#k (unnamed)' by the node's position in its graph."""
    if node.name:
        return f"'{node.name}'"
    graph = node.graph
    return "(unnamed)" if graph is None else f"#{next(k for k, n in enumerate(graph) if n is node)} (unnamed)"


def no_rule_error(node: ir.Node, opset: int, where: str = "") -> LookupError:
    domain = node.domain or "ai.onnx"
    why = unknown_op(node.domain, node.op_type)  # tf2onnx writes an Erfc; the early zoo an ImageScaler
    unknown = "" if why is None else f"; {why}"
    return LookupError(
        f"no gradient rule for node {node_label(node)}{where} (op_type '{node.op_type}', domain '{domain}', "
        f"opset {opset}): register one with "
        f"@onnxgrad.register_gradient('{node.op_type}', domain='{node.domain}') "
        f"or list its output in stop_gradients{unknown}"
    )


def _arity_error(node: ir.Node, got: int, want: int) -> RuntimeError:
    return RuntimeError(
        f"the gradient rule for {node.op_type} (node {node_label(node)}) returned {got} gradients, not {want}: "
        "a rule returns exactly one entry per input (None where not connected, UNDEFINED where it gives none), "
        "or per input before its data inputs when registered with wrt="
    )


@dataclass
class Walk:
    """The gradients found so far: contributions per value, their totals, and where undefined ones came from."""

    em: Emitter
    contribs: dict[ir.Value, list[ir.Value | Undefined]] = field(default_factory=dict)
    totals: dict[ir.Value, ir.Value | Undefined] = field(default_factory=dict)
    why: dict[ir.Value, str] = field(default_factory=dict)  # value -> the input whose gradient is undefined

    def add(self, v: ir.Value, g: ir.Value | Undefined, why: str = "") -> None:
        self.contribs.setdefault(v, []).append(g)
        if g is UNDEFINED:
            self.why.setdefault(v, why)

    def total(self, v: ir.Value) -> ir.Value | Undefined | None:
        """The sum of v's contributions (UNDEFINED if any is); None when there are none."""
        if v in self.totals:
            return self.totals[v]
        terms = self.contribs.pop(v, None)
        if not terms:
            return None
        if any(t is UNDEFINED for t in terms):
            self.totals[v] = UNDEFINED
            return UNDEFINED
        g = add_terms(self.em, terms, v)  # type: ignore[arg-type]
        _annotate(g, v)
        self.totals[v] = g
        return g


def add_terms(em: Emitter, terms: Sequence[ir.Value], like: ir.Value) -> ir.Value:
    """The sum of the gradient terms of ``like``: the emitter's add_n for tensors; for a sequence (of equally shaped
    tensors) its terms stacked, added and split again; for an optional, the sum of its elements wrapped again."""
    if len(terms) < 2 or isinstance(like.type, ir.TensorType) or like.type is None:
        return em.add_n(terms)
    assert like.dtype is not None
    if isinstance(like.type, ir.SequenceType):
        total = em.add_n([em.ConcatFromSequence(t, axis=0, new_axis=1) for t in terms])
        out = em.SplitToSequence(total, axis=0, keepdims=0)
        out.type, out.shape = ir.SequenceType(ir.TensorType(like.dtype)), None
        return out
    out = em.Optional(em.add_n([em.OptionalGetElement(t) for t in terms]))
    out.type, out.shape = ir.OptionalType(ir.TensorType(like.dtype)), None
    return out


def backprop(em: Emitter, nodes: Iterable[ir.Node], req: Request, opsets: Mapping[str, int],
             where: str = "") -> tuple[list[ir.Value | Undefined | None], dict[ir.Value, str]]:
    """Emit the gradient of sum(seed_i * y_i) with respect to each x, walking ``nodes`` (a graph, or any node
    sequence in topological order: a function body re-emitted in the gradient part).

    Returns one entry per x (None where unconnected, UNDEFINED where some path has no rule for it) and, for
    the undefined ones, which input made them so."""
    nodes = list(nodes)
    order = {id(n): i for i, n in enumerate(nodes)}
    between = _forward_reach(nodes, req.xs, req.stop, order, req.straight_through) & _backward_reach(req.ys, req.stop)
    walk = Walk(em)
    for y, seed in zip(req.ys, req.seeds, strict=True):
        if y in between:
            walk.add(y, seed)

    producers = {
        id(n): n
        for v in between
        if v not in req.stop and (n := v.producer()) is not None and id(n) in order
    }
    path = sorted((n for n in producers.values() if _uses_any(n, between)), key=lambda n: order[id(n)])
    ctx = WalkContext(frozenset(between - req.stop), frozenset(req.stop), frozenset(req.xs), frozenset(req.ys),
                      opset_of(opsets), req.straight_through)
    fused = {id(f.nodes[-1]): f for f in plans.fusions(ctx, path)}
    absorbed = {id(n) for f in fused.values() for n in f.nodes[:-1]}

    rules: dict[tuple[str, str], tuple[int, registry.Rule | None]] = {}
    for node in path:  # one look-up per op type; the ops without a rule are only named when a gradient reaches them
        if (node.domain, node.op_type) not in rules:
            opset = opset_of(opsets, node.domain)
            rules[node.domain, node.op_type] = (opset, registry.rule_for(node.domain, node.op_type, opset))
    unruled = next((n for n in path if rules[n.domain, n.op_type][1] is None and id(n) not in absorbed), None)
    for node in reversed(path):
        if id(node) in absorbed:
            continue
        grads_out = [None if out in req.stop else walk.total(out) for out in node.outputs]
        if all(g is None for g in grads_out):
            continue
        fusion = fused.get(id(node))
        if any(g is UNDEFINED for g in grads_out):  # undefined in, undefined out: nothing to emit
            why = next(walk.why[o] for o, g in zip(node.outputs, grads_out, strict=True) if g is UNDEFINED)
            for inp in (i for n in (fusion.nodes if fusion else [node]) for i in n.inputs):
                if inp is not None and inp in between:
                    walk.add(inp, UNDEFINED, why)
            continue
        if fusion is not None:
            for inp, g in fusion.grad(em, grads_out):
                if g is not None and inp in between:
                    _annotate(g, inp)
                    walk.add(inp, g)
            continue
        opset, rule = rules[node.domain, node.op_type]
        if rule is None:
            raise no_rule_error(node, opset, where)
        if rule.fn is None:
            if rule.undefined:
                _undefined_inputs(walk, node, between, range(len(node.inputs)), where)
            continue
        if rule.dense:
            grads_out = [em.zeros_like(out) if g is None else g for g, out in zip(grads_out, node.outputs, strict=True)]
        since = len(em.nodes)
        try:
            grads_in = list(rule.fn(em, node, grads_out))
        except ValueError as e:  # e.g. no ranks, where shape inference stopped at an op no schema describes
            if unruled is None:  # (tf2onnx leaves Keras' Erfc so): that op is the error to report
                raise
            raise no_rule_error(unruled, rules[unruled.domain, unruled.op_type][0], where) from e
        captured = implicit_inputs(node) if rule.captures else []
        if len(grads_in) != rule.arity(node) + len(captured):
            raise _arity_error(node, len(grads_in), rule.arity(node) + len(captured))
        grads_captured: list[Any] = []
        if captured:  # the outer-scope values the subgraphs read: after the inputs, in implicit_inputs' order
            grads_in, grads_captured = grads_in[:rule.arity(node)], grads_in[rule.arity(node):]
            for c, g in zip(captured, grads_captured, strict=True):
                if g is not None and c in between:
                    if g is UNDEFINED:
                        walk.add(c, UNDEFINED, f"'{c.name}', read inside {node.op_type} node {node_label(node)}"
                                 f"{where}, whose gradient onnxgrad does not define")
                    else:
                        _annotate(g, c)
                        walk.add(c, g)
        grads_in += [None] * (len(node.inputs) - len(grads_in))
        undefined = [i for i, g in enumerate(grads_in) if g is UNDEFINED]
        _undefined_inputs(walk, node, between, undefined, where)
        kept = {id(g) for inp, g in zip([*node.inputs, *captured], [*grads_in, *grads_captured], strict=True)
                if inp is not None and inp in between}
        for i, (inp, g) in enumerate(zip(node.inputs, grads_in, strict=True)):
            if g is None or g is UNDEFINED:
                continue
            if inp is None or inp not in between:  # a gradient no path needs: taken back at once
                if isinstance(g, ir.Value):
                    em.discard(g, since, kept)
                continue
            if rule.unbroadcast_input(i):
                if g.shape is None:  # a broadcasting rule's gradients are shaped like its output
                    g.shape = node.outputs[0].shape
                g = em.unbroadcast(g, inp)
            _annotate(g, inp)
            walk.add(inp, g)

    results = [walk.total(x) if x in between else None for x in req.xs]
    if req.totals is not None:
        req.totals.update((v, g) for v, g in walk.totals.items() if isinstance(g, ir.Value))
    return results, {x: walk.why[x] for x, g in zip(req.xs, results, strict=True) if g is UNDEFINED}


def _undefined_inputs(walk: Walk, node: ir.Node, between: set[ir.Value], indices: Iterable[int], where: str) -> None:
    """Give the inputs at ``indices`` that lie on the path an undefined gradient, saying where it came from."""
    for i in indices:
        inp = node.inputs[i]
        if inp is not None and inp in between:
            why = (f"input {i} ('{inp.name}') of {node.op_type} node {node_label(node)}{where}, whose gradient "
                   "onnxgrad does not define")
            walk.add(inp, UNDEFINED, why)
