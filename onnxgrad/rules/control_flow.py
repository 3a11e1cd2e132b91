"""Gradients of If, Loop and Scan.

Every body is differentiated by the one walk (``backprop``) over a renamed copy of itself, inside a new body
of the same kind, so the forward values a gradient needs are recomputed where the gradient runs and the
forward nodes stay untouched. Outer-scope values that a body reads are the node's implicit inputs
(``emitter.implicit_inputs``): the rules are registered with ``captures=True`` and answer for them too.

- If: an If on the same condition, each branch the walk over that branch, zeros for the captured values the
  branch does not read. A constant condition is inlined (the taken branch's copy joins the gradient part).
- Loop: a saving Loop (a copy of the forward one that counts its iterations and emits each iteration's
  loop-carried values as scan outputs), then a Loop that runs that count backwards, recomputes one body
  from the saved values and carries the gradients of the loop-carried values and of the captured values.
  A captured value that the body reads only as ``Gather(c, iteration)`` (a sequence the loop walks through)
  gets its gradient as one slice per iteration (a scan output, reversed and zero-padded after the loop) instead
  of a full-size sum carried through every iteration.
- Scan (opset 9+): a saving Scan as above, then a Scan over the reversed sequences (every direction flipped,
  the axes kept) that carries the same gradients and emits the gradients of the scan inputs as its outputs.
- Scan (opset 8: batch axis 0, sequence axis 1, ragged ``sequence_lens``): the same with the opset 8 form, the
  captured gradients carried per batch element (then summed), and the scan inputs' gradients put back in order
  by a Scan that reverses each element's valid prefix (opset 8 has no output directions).

Why recompute rather than save more: the saving node emits only the loop-carried values (O(T x |state|)), never
the body's intermediates, and the forward node itself is left alone (bit-identical outputs); the backward body
recomputes one step from its saved state, so memory stays O(T x |state| + |captured|).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping, Sequence

import numpy as np
import onnx_ir as ir
from onnx_ir import _cloner

from onnxgrad.backprop import Request, backprop, node_label
from onnxgrad.emitter import Emitter, attr, implicit_inputs, is_float, rank, static_dims, subgraphs
from onnxgrad.registry import UNDEFINED, Undefined, register
from onnxgrad.shapes import infer_node, outputs_from_bodies, rank_from_shape_operand

Grad = ir.Value | Undefined | None

BOOL, INT64 = ir.DataType.BOOL, ir.DataType.INT64


# ------------------------------------------------------------------------------------------- bodies
def _clone(body: ir.Graph) -> ir.Graph:
    """A copy of body reading the same outer values; an output that is an outer value becomes an Identity's
    (``Graph.clone`` cannot hold an outer value as an output)."""
    value_map: dict[ir.Value, ir.Value | None] = {}
    for v in [*body.inputs, *body.initializers.values()]:
        value_map[v] = ir.Value(name=v.name, type=v.type, shape=None if v.shape is None else v.shape.copy(),
                                const_value=v.const_value)
    cloner = _cloner.Cloner(attr_map={}, value_map=value_map, metadata_props={}, allow_outer_scope_values=True)
    nodes = [cloner.clone_node(n) for n in body]
    outputs = []
    for k, v in enumerate(body.outputs):
        mine = value_map.get(v)
        if mine is None or mine in outputs or mine.is_graph_input():
            node = ir.Node("", "Identity", [v if mine is None else mine], name=f"{body.name}/output_{k}")
            node.outputs[0].name, node.outputs[0].type, node.outputs[0].shape = f"{v.name}/output_{k}", v.type, v.shape
            nodes.append(node)
            mine = node.outputs[0]
        outputs.append(mine)
    inits = [value_map[v] for v in body.initializers.values()]
    return ir.Graph([value_map[v] for v in body.inputs], outputs, nodes=nodes,  # type: ignore[misc]
                    initializers=inits, opset_imports=dict(body.opset_imports), name=body.name)


def _copy(body: ir.Graph, tag: str, opset: int) -> ir.Graph:
    """A copy of ``body`` that reads the same outer-scope values, every value and node inside renamed under tag."""
    g = _clone(body)
    _infer(g, opset)
    for s, sub in enumerate([g, *g.subgraphs()]):
        for v in sub.inputs:
            v.name = f"{tag}/{v.name}"
        for k, n in enumerate(sub):
            n.name = f"{tag}/{n.name or f'#{s}.{k}'}"
            for v in n.outputs:
                if v.name:
                    v.name = f"{tag}/{v.name}"
    return g


def _infer(g: ir.Graph, opset: int) -> None:
    """Types and shapes for the values of body g that have none (a model's inference may skip bodies):
    onnx's per-node inference, and for If, Loop and Scan nodes what their bodies say."""
    for n in g:
        for sub in subgraphs(n):
            _infer(sub, opset)
        if all(o.dtype is not None and o.shape is not None for o in n.outputs):
            continue
        infer_node(n, opset)
        outputs_from_bodies(n)
        rank_from_shape_operand(n)


def _outer_shapes(caps: Sequence[ir.Value]) -> None:
    """Shapes for captured values made by other control-flow nodes (a body's rules may need their ranks)."""
    for c in caps:
        p = c.producer()
        if c.shape is None and p is not None:
            outputs_from_bodies(p)


def _typed(v: ir.Value, like: ir.Value) -> ir.Value:
    """v with like's type and shape (where v has none): bodies of Loop and Scan need typed inputs and outputs."""
    if v.type is None and like.type is not None:
        v.type = like.type
    if v.shape is None and like.shape is not None:
        v.shape = like.shape
    return v


def _value(name: str, like: ir.Value | None = None, dtype: ir.DataType | None = None,
           shape: ir.Shape | None = None) -> ir.Value:
    """A new body input named ``name``, typed like ``like`` (or by ``dtype`` and ``shape``)."""
    if like is not None:
        return ir.Value(name=name, type=like.type, shape=like.shape)
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=shape)  # type: ignore[arg-type]


def _close(emb: Emitter, g: ir.Graph, outs: Sequence[ir.Value], likes: Sequence[ir.Value]) -> None:
    """Make ``outs`` the outputs of body ``g``: the emitted nodes committed, each output made by its own node
    of g (an Identity where it is an input, an outer value or already an output), the nodes sorted, and the
    copied forward nodes that no output needs dropped."""
    read = [v for n in g for v in [*n.inputs, *implicit_inputs(n)] if v is not None]  # the copied nodes' reads
    emb.commit([*outs, *read])
    final: list[ir.Value] = []
    for o, like in zip(outs, likes, strict=True):
        p = o.producer()
        if p is None or p.graph is not g or o in final:
            node = ir.Node("", "Identity", [o], name=emb.fresh_name("Identity"))
            node.outputs[0].name = node.name
            g.append(node)
            o = node.outputs[0]
        final.append(_typed(o, like))
    g.outputs.clear()
    g.outputs.extend(final)
    live: set[int] = set()
    stack = [o.producer() for o in final]
    while stack:
        n = stack.pop()
        if n is None or n.graph is not g or id(n) in live:
            continue
        live.add(id(n))
        stack.extend(v.producer() for v in [*n.inputs, *implicit_inputs(n)] if v is not None)
    g.remove([n for n in g if id(n) not in live], safe=True)
    g.sort()


def _walk(emb: Emitter, nodes: Sequence[ir.Node], ys: Sequence[ir.Value], seeds: Sequence[ir.Value],
          xs: Sequence[ir.Value], where: str) -> list[Grad]:
    """The one walk over a body copy: the gradient of sum(seed * y) for each x."""
    pairs = [(y, s) for y, s in zip(ys, seeds, strict=True) if s is not None]
    if not pairs or not xs:
        return [None] * len(xs)
    found, _ = backprop(emb, nodes, Request([y for y, _ in pairs], list(xs), [s for _, s in pairs]),
                        {"": emb.opset}, where)
    return found


def _body_emitter(em: Emitter, g: ir.Graph, tag: str) -> Emitter:
    return Emitter(g, em.opset, tag, em.ir_version, em.aggregation)


def _fix_outputs(outs: Sequence[ir.Value], likes: Sequence[ir.Value]) -> None:
    for o, like in zip(outs, likes, strict=True):
        o.type, o.shape = like.type, like.shape


# ----------------------------------------------------------------------------------------------- If
def _branch(em: Emitter, node: ir.Node, key: str, grads: Sequence[ir.Value | None],
            xs: Sequence[ir.Value]) -> tuple[ir.Graph, Emitter, list[Grad]]:
    """A copy of one branch with the walk over it: the gradients of the captured values xs."""
    branch = node.attributes[key].as_graph()
    tag = em.fresh_name(f"If_{key}")
    g = _copy(branch, tag, em.opset)
    emb = _body_emitter(em, g, f"{tag}/grad")
    found = _walk(emb, list(g), list(g.outputs), grads, xs, f" in the {key} of If node {node_label(node)}")
    return g, emb, found


@register("If", since=1, captures=True,
          notes="an If on the same condition; constant conditions inlined; outer values get zeros from the "
                "branch that does not read them")
def if_grad(em: Emitter, node: ir.Node, grads: Sequence[ir.Value | None]) -> list[Grad]:
    """d(captured) = If(cond, walk(then_branch), walk(else_branch))"""
    caps = implicit_inputs(node)
    _outer_shapes(caps)
    xs = [c for c in caps if is_float(c)]
    fixed = em.constant_value(node.inputs[0])
    if fixed is not None:
        key = "then_branch" if bool(np.asarray(fixed).reshape(-1)[0]) else "else_branch"
        g = _copy(node.attributes[key].as_graph(), em.fresh_name(f"If_{key}"), em.opset)
        outs, nodes = list(g.outputs), list(g)
        g.outputs.clear()
        g.remove(nodes)
        em.nodes.extend(nodes)  # the taken branch joins the gradient part (kept where the gradient reads it)
        found = _walk(em, nodes, outs, grads, xs, f" in the {key} of If node {node_label(node)}")
        by_cap = dict(zip(xs, found, strict=True))
        return [None, *(by_cap.get(c) for c in caps)]
    branches = [_branch(em, node, key, grads, xs) for key in ("then_branch", "else_branch")]
    result: dict[ir.Value, Grad] = {}
    for k, c in enumerate(xs):
        got = [b[2][k] for b in branches]
        result[c] = UNDEFINED if UNDEFINED in got else (None if all(t is None for t in got) else c)
    kept = [c for c in xs if result[c] is c]
    if kept:
        for g, emb, found in branches:
            by_cap = dict(zip(xs, found, strict=True))
            outs = [emb.zeros_like(c) if by_cap[c] is None else by_cap[c] for c in kept]
            _close(emb, g, outs, kept)  # type: ignore[arg-type]
        made = em.op("If", node.inputs[0], _outputs=len(kept), then_branch=branches[0][0],
                     else_branch=branches[1][0])
        made = (made,) if len(kept) == 1 else made
        _fix_outputs(made, kept)
        result.update(zip(kept, made, strict=True))
    return [None, *(result.get(c) for c in caps)]


# --------------------------------------------------------------------------------------------- Loop
def _float_captures(caps: Sequence[ir.Value]) -> list[ir.Value]:
    """The float tensors among the outer values a Loop's or Scan's body reads: the reverse loop accumulates their
    gradients in its carry. A sequence or optional read from outside has no carry form: ``_cap_grad``."""
    return [c for c in caps if is_float(c) and not _untensored(c)]


def _untensored(c: ir.Value) -> bool:
    return c.type is not None and not isinstance(c.type, ir.TensorType)


def _cap_grad(found: Mapping[ir.Value, Grad], c: ir.Value) -> Grad:
    """The gradient of the captured value c: found, else undefined for a float sequence or optional (a second
    derivative through a loop that appended to a list reads its gradient sequence so), else None."""
    return found.get(c, UNDEFINED if is_float(c) and _untensored(c) else None)


def _scalar(name: str, dtype: ir.DataType) -> ir.Value:
    return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape([]))


def _stacked(like: ir.Value) -> ir.Shape | None:
    """The shape of a stack of values shaped like ``like`` along a new leading axis of unknown length."""
    return None if like.shape is None else ir.Shape([None, *like.shape])


def _saving_loop(em: Emitter, node: ir.Node, body: ir.Graph, n_state: int, skip: Collection[int] = ()
                 ) -> tuple[ir.Value, list[ir.Value | None]]:
    """A copy of the Loop that also counts its iterations and emits each iteration's loop-carried inputs as
    scan outputs: (the count, one stack per loop-carried value; None for those in ``skip``)."""
    tag = em.fresh_name("Loop_save")
    g = _copy(body, tag, em.opset)
    ems = _body_emitter(em, g, f"{tag}/save")
    count_in = _scalar(f"{tag}/count_in", INT64)
    g.inputs.append(count_in)
    count_out = ems.Add(count_in, ems.const(np.array(1), dtype=INT64))
    states = [v for k, v in enumerate(list(g.inputs)[2:2 + n_state]) if k not in skip]
    outs = [g.outputs[0], *g.outputs[1:1 + n_state], count_out, *states]
    _close(ems, g, outs, [g.outputs[0], *g.outputs[1:1 + n_state], count_in, *states])
    zero = em.const(np.array(0), dtype=INT64)
    made = em.op("Loop", *node.inputs[:2], *node.inputs[2:], zero, _outputs=n_state + 1 + len(states), body=g)
    made = made if isinstance(made, tuple) else (made,)  # a Loop of scan outputs only: the count alone
    count, saved = made[n_state], iter(made[n_state + 1:])
    _fix_outputs(made[:n_state], node.outputs[:n_state])
    count.type, count.shape = ir.TensorType(INT64), ir.Shape([])
    stacks: list[ir.Value | None] = [None if k in skip else next(saved) for k in range(n_state)]
    for s, v in zip(stacks, list(g.inputs)[2:2 + n_state], strict=True):
        if s is not None:
            s.type, s.shape = v.type, _stacked(v)
    return count, stacks


def _appended(node: ir.Node, body: ir.Graph, k: int) -> ir.Node | None:
    """The SequenceInsert that appends to loop-carried value k, when k is a sequence the loop only appends to: it
    starts empty (SequenceEmpty), and the body reads it only to append one element at the end, which is all its
    next value is (a list built in a scripted loop, EmbeddingBag's rows in PyTorch's dynamo export)."""
    init = node.inputs[2 + k]
    made = None if init is None else init.producer()
    if made is None or made.op_type != "SequenceEmpty" or made.domain not in ("", "ai.onnx"):
        return None
    uses = list(body.inputs[2 + k].uses())
    ins = uses[0].node if len(uses) == 1 else None
    if ins is None or ins.op_type != "SequenceInsert" or ins.domain not in ("", "ai.onnx") or uses[0].idx != 0 \
            or (len(ins.inputs) > 2 and ins.inputs[2] is not None) or ins.outputs[0] is not body.outputs[1 + k] \
            or list(ins.outputs[0].uses()):
        return None
    return ins


def _as_declared(em: Emitter, scalar: ir.Value, declared: ir.Value) -> ir.Value:
    """``scalar`` reshaped to the one-element shape a body declares for its input ``declared`` ([1], say)."""
    if declared.shape is None or declared.shape.rank() == 0:
        return scalar
    out = em.Reshape(scalar, em.ints([1] * declared.shape.rank()))
    out.type, out.shape = scalar.type, ir.Shape([1] * declared.shape.rank())
    return out


def _concatenated(node: ir.Node, body: ir.Graph, k: int) -> tuple[ir.Node, int] | None:
    """(the Concat, its axis) that grows loop-carried tensor k, when the body reads k only to concatenate one piece
    after it (through a Cast to its own type, at most), which is all its next value is: torchvision's pasted masks
    and keypoints, ``res = torch.cat((res, piece))`` in a scripted loop."""
    carry = body.inputs[2 + k]
    read = _only_reader(carry)
    if read is not None and read.op_type == "Cast" and not read.domain and carry.dtype is not None \
            and attr(read, "to", None) == int(carry.dtype):
        read = _only_reader(read.outputs[0])
    if read is None or read.op_type != "Concat" or read.domain not in ("", "ai.onnx") or len(read.inputs) != 2 \
            or read.outputs[0] is not body.outputs[1 + k] or list(read.outputs[0].uses()):
        return None
    rank = next((v.shape.rank() for v in (carry, node.inputs[2 + k], read.outputs[0])
                 if v is not None and v.shape is not None), None)
    axis = int(attr(read, "axis", 0))
    axis = axis + rank if rank is not None and axis < 0 else axis
    return (read, axis) if rank is not None and 0 <= axis < rank else None


def _only_reader(v: ir.Value) -> ir.Node | None:
    """The node that reads v, when exactly one does, as its first input."""
    uses = list(v.uses())
    return uses[0].node if len(uses) == 1 and uses[0].idx == 0 else None


@register("Loop", since=1, captures=True,
          notes="a saving Loop (iteration count and loop-carried values), then a reverse Loop over that count "
                "recomputing each body; captured weights' gradients accumulate in the carry; a carried sequence "
                "must start empty and only grow at its end (a list appended to), its element t then seeds "
                "iteration t; so may a carried tensor that only grows by one Concat at its end (from opset 10): "
                "its slice for piece t seeds iteration t, what is left is its start's")
def loop_grad(em: Emitter, node: ir.Node, grads: Sequence[ir.Value | None]) -> list[Grad]:
    """d(v_initial), d(captured) = reverse Loop of walk(body) over the iterations the forward ran"""
    body = node.attributes["body"].as_graph()
    n_state = len(node.inputs) - 2
    n_scan = len(node.outputs) - n_state
    caps = implicit_inputs(node)
    _outer_shapes([*caps, *node.inputs[2:]])
    finals = list(node.outputs[:n_state])
    appends = {k: ins for k in range(n_state) if (ins := _appended(node, body, k)) is not None}
    grown = {k: cat[1] for k in range(n_state) if k not in appends and (cat := _concatenated(node, body, k))
             and em.slice_inputs}
    carried = [k for k in range(n_state) if is_float(finals[k]) and k not in appends and k not in grown]
    cap_x = _float_captures(caps)
    if not carried and not cap_x and not any(grads[k] is not None and is_float(finals[k]) for k in grown):
        return [*([None] * len(node.inputs)), *(_cap_grad({}, c) for c in caps)]
    odd = [v.name for k, v in enumerate(node.inputs[2:]) if v is not None and v.type is not None
           and not isinstance(v.type, ir.TensorType) and k not in appends]
    if odd:
        raise ValueError(f"Loop node {node_label(node)}: the loop-carried values {odd} are sequences or optionals, "
                         "which the saving Loop cannot stack for the backward pass (a sequence that starts empty "
                         "and only grows by one SequenceInsert at its end per iteration is taken); list the Loop's "
                         "outputs in stop_gradients, or carry tensors")
    count, stacks = _saving_loop(em, node, body, n_state, {*appends, *grown})

    tag = em.fresh_name("Loop_grad")
    g = _copy(body, tag, em.opset)
    emb = _body_emitter(em, g, f"{tag}/grad")
    old = list(g.inputs)
    sliced = {c: reads for c in cap_x if (reads := _step_slices(g, c, old[0])) and em.runtime_pads}
    cap_x = [c for c in cap_x if c not in sliced]  # the rest accumulate their gradients in the carry
    step = _scalar(f"{tag}/i", INT64)
    go_on = _scalar(f"{tag}/cond", BOOL)
    dv_in = [_value(f"{tag}/d_{k}", like=old[2 + k]) for k in carried]
    dc_in = [_value(f"{tag}/dc_{j}", like=c) for j, c in enumerate(cap_x)]
    ends_in = {k: _value(f"{tag}/end_{k}", dtype=INT64, shape=ir.Shape([1])) for k in grown if grads[k] is not None}
    one = emb.const(np.array(1), dtype=INT64)
    t = emb.Sub(emb.Sub(count, one), step)  # the forward iteration this one undoes
    t.type, t.shape = ir.TensorType(INT64), ir.Shape([])
    # an appended-to sequence is not saved: its element t is read from its gradient, the body appends to nothing
    pushed = {k: ins.inputs[1] for k in appends if (ins := _appended(node, g, k)) is not None}
    # a concatenated-onto tensor neither: its piece t is the slice of its gradient before what later pieces took, and
    # the body concatenates onto the start
    pieces = {k: cat[0].inputs[1] for k in ends_in if (cat := _concatenated(node, g, k)) is not None}
    at_t = [emb.Gather(s, t, axis=0) if s is not None else node.inputs[2 + k] if k in grown
            else emb.op("SequenceEmpty", dtype=like.dtype) for k, (s, like) in enumerate(zip(stacks, old[2:],
                                                                                             strict=True))]
    for k, (v, like) in enumerate(zip(at_t, old[2:], strict=True)):
        if k not in grown:  # (that one is the forward's start itself)
            v.type, v.shape = like.type, like.shape
    # the body reads the iteration number and condition in the shapes it declares them (tf2onnx: [1], a Slice bound)
    old[0].replace_all_uses_with(_as_declared(emb, t, old[0]), replace_graph_outputs=True)
    old[1].replace_all_uses_with(_as_declared(emb, emb.const(np.array(True), dtype=BOOL), old[1]),
                                 replace_graph_outputs=True)
    for v, new in zip(old[2:], at_t, strict=True):
        v.replace_all_uses_with(new, replace_graph_outputs=True)
    g.inputs.clear()
    g.inputs.extend([step, go_on, *dv_in, *dc_in, *ends_in.values()])
    ys = [g.outputs[1 + k] for k in carried]
    seeds: list[ir.Value | None] = list(dv_in)
    for k, pushed_value in pushed.items():
        if grads[k] is not None and pushed_value is not None and is_float(pushed_value):
            ys.append(pushed_value)
            seeds.append(_typed(emb.SequenceAt(grads[k], t), pushed_value))
    ends_out = []
    for k, end in ends_in.items():
        piece = pieces.get(k)
        start = end if piece is None else emb.Sub(end, emb.Gather(emb.Shape(piece), emb.ints([grown[k]])))
        ends_out.append(start)
        if piece is not None and is_float(piece):
            ys.append(piece)
            seeds.append(_typed(emb.Slice(grads[k], start, end, emb.ints([grown[k]])), piece))
    for s in range(n_scan):
        y = g.outputs[1 + n_state + s]
        gs = grads[n_state + s]
        if gs is not None and is_float(y):
            ys.append(y)
            seeds.append(_typed(emb.Gather(gs, t, axis=0), y))
    reads = [r for rs in sliced.values() for r in rs]
    xs = [at_t[k] for k in carried] + cap_x + reads
    found = _walk(emb, list(g), ys, seeds, xs, f" in the body of Loop node {node_label(node)}")
    if UNDEFINED in found:
        return [None, None, *(UNDEFINED if k in carried else None for k in range(n_state)),
                *(UNDEFINED if is_float(c) else None for c in caps)]
    n_c = len(carried) + len(cap_x)
    dv_out = [emb.zeros_like(at_t[k]) if d is None else d for k, d in zip(carried, found, strict=False)]
    dc_out = [dc if d is None else emb.Add(dc, d) for dc, d in zip(dc_in, found[len(carried):n_c], strict=True)]
    by_read = dict(zip(reads, found[n_c:], strict=True))
    ds_out = []  # per iteration, the gradient of the slice it read: a scan output (no full-size carry)
    for rs in sliced.values():
        d = emb.add_all(*(by_read[r] for r in rs if isinstance(by_read[r], ir.Value)))  # type: ignore[arg-type]
        ds_out.append(emb.zeros_like(rs[0]) if d is None else d)
    true = emb.const(np.array(True), dtype=BOOL)
    _close(emb, g, [true, *dv_out, *dc_out, *ends_out, *ds_out],
           [go_on, *dv_in, *dc_in, *ends_in.values(), *(rs[0] for rs in sliced.values())])

    seeds_in = [em.zeros_like(finals[k]) if grads[k] is None else grads[k] for k in carried]
    lengths = [em.dims(finals[k], [grown[k]]) for k in ends_in]
    n_made = n_c + len(ends_in) + len(sliced)
    made = em.op("Loop", count, em.const(np.array(True), dtype=BOOL), *seeds_in, *(em.zeros_like(c) for c in cap_x),
                 *(em.cat_ints(n) for n in lengths), _outputs=n_made, body=g)
    made = (made,) if n_made == 1 else made
    _fix_outputs(made[:n_c], [*(node.inputs[2 + k] for k in carried), *cap_x])  # type: ignore[misc]
    by_state = dict(zip(carried, made[:len(carried)], strict=True))
    by_cap: dict[ir.Value, Grad] = dict(zip(cap_x, made[len(carried):n_c], strict=True))
    for c, stacked in zip(sliced, made[n_c + len(ends_in):], strict=True):
        by_cap[c] = _unstack(em, stacked, c, count)
    for k, end in zip(ends_in, made[n_c:n_c + len(ends_in)], strict=True):  # what no piece took: the start's
        if is_float(node.inputs[2 + k]):
            by_state[k] = em.Slice(grads[k], em.ints([0]), end, em.ints([grown[k]]))
    return [None, None, *(by_state.get(k) for k in range(n_state)), *(_cap_grad(by_cap, c) for c in caps)]


def _step_slices(g: ir.Graph, c: ir.Value, step: ir.Value) -> list[ir.Value]:
    """The values Gather(c, iteration number) when that is the only way body g reads the captured c, else [].

    Such a capture (a sequence the loop walks through: TorchScript's ``x[t]``) gets its gradient one slice per
    iteration, as a scan output of the backward Loop, rather than as a full-size sum carried through every
    iteration (which costs O(T x |c|) time)."""
    inner = {id(sub) for sub in g.subgraphs()}
    reads = []
    for use in c.uses():
        n = use.node
        if id(n.graph) in inner:
            return []
        if n.graph is not g:
            continue
        if n.op_type != "Gather" or n.domain or use.idx != 0 or n.inputs[1] is not step or attr(n, "axis", 0) != 0:
            return []
        reads.append(n.outputs[0])
    return reads


def _unstack(em: Emitter, stacked: ir.Value, c: ir.Value, count: ir.Value) -> ir.Value:
    """The gradient of c from the slices' gradients, stacked last iteration first: reversed along axis 0 and
    padded with zeros where the loop stopped before c's end."""
    r = rank(c)
    stacked.type, stacked.shape = c.type, None
    back = em.Slice(stacked, em.ints([-1]), em.ints([-(2**63)]), em.ints([0]), em.ints([-1]))
    length = em.dim(c, 0)
    length = em.const(np.array(length), dtype=INT64) if isinstance(length, int) else length
    short = em.Reshape(em.Sub(length, count), em.ints([1]))
    out = em.Pad(back, em.cat_ints([0] * r, short, [0] * (r - 1)))
    out.type, out.shape = c.type, c.shape
    return out


# --------------------------------------------------------------------------------------------- Scan
def _scan_backward_body(em: Emitter, body: ir.Graph, n_state: int, n_in: int, carried: list[int],
                        cap_x: list[ir.Value]) -> tuple[str, ir.Graph, Emitter, list[ir.Value], list[ir.Value],
                                                        list[ir.Value], list[ir.Value]]:
    """A copy of a Scan body for the backward Scan, its inputs renamed (saved states s_t, scan inputs x_t), with new
    values for the carried gradients of the states (dv) and of the captured floats (dc)."""
    tag = em.fresh_name("Scan_grad")
    g = _copy(body, tag, em.opset)
    emb = _body_emitter(em, g, f"{tag}/grad")
    old = list(g.inputs)
    dv_in = [_value(f"{tag}/d_{k}", like=old[k]) for k in carried]
    dc_in = [_value(f"{tag}/dc_{j}", like=c) for j, c in enumerate(cap_x)]
    s_t = [_value(f"{tag}/s_{k}", like=old[k]) for k in range(n_state)]
    x_t = [_value(f"{tag}/x_{k}", like=old[n_state + k]) for k in range(n_in)]
    for v, new in zip(old, [*s_t, *x_t], strict=True):
        v.replace_all_uses_with(new, replace_graph_outputs=True)
    return tag, g, emb, dv_in, dc_in, s_t, x_t


def _ints_attr(node: ir.Node, name: str, n: int, default: int = 0) -> list[int]:
    found = attr(node, name)
    return [default] * n if found is None else [int(v) for v in found]


def _reverse_body(emb: Emitter, g: ir.Graph, node: ir.Node, ys: list[ir.Value], seeds: list[ir.Value],
                  s_t: list[ir.Value], x_t: list[ir.Value], carried: list[int], scanned: list[int],
                  cap_x: list[ir.Value], dv_in: list[ir.Value], dc_in: list[ir.Value], dy_in: list[ir.Value]) -> bool:
    """Walk a Scan body (its copy g) back from ys and close g as the reverse body: state gradients, captured
    gradients accumulated, scanned-input gradients out; False (g left open) when a gradient in it is undefined."""
    xs = [s_t[k] for k in carried] + [x_t[k] for k in scanned] + cap_x
    found = _walk(emb, list(g), ys, seeds, xs, f" in the body of Scan node {node_label(node)}")
    if UNDEFINED in found:
        return False
    f_state, f_x, f_cap = (found[:len(carried)], found[len(carried):len(carried) + len(scanned)],
                           found[len(carried) + len(scanned):])
    dv_out = [emb.zeros_like(s_t[k]) if d is None else d for k, d in zip(carried, f_state, strict=True)]
    dc_out = [dc if d is None else emb.Add(dc, d) for dc, d in zip(dc_in, f_cap, strict=True)]
    dx_out = [emb.zeros_like(x_t[k]) if d is None else d for k, d in zip(scanned, f_x, strict=True)]
    _close(emb, g, [*dv_out, *dc_out, *dx_out], [*dv_in, *dc_in, *(x_t[k] for k in scanned)])  # type: ignore[list-item]
    g.inputs.clear()
    g.inputs.extend([*dv_in, *dc_in, *s_t, *x_t, *dy_in])
    return True


@register("Scan", since=9, captures=True,
          notes="a saving Scan (each step's state), then a Scan over the reversed sequences (directions flipped, "
                "axes kept) recomputing each body; captured weights' gradients accumulate in the carry")
def scan_grad(em: Emitter, node: ir.Node, grads: Sequence[ir.Value | None]) -> list[Grad]:
    """d(initial states), d(scan inputs), d(captured) = Scan over the reversed sequences of walk(body)"""
    body = node.attributes["body"].as_graph()
    n_in = int(attr(node, "num_scan_inputs"))
    n_state = len(node.inputs) - n_in
    n_out = len(node.outputs) - n_state
    in_axes = _ints_attr(node, "scan_input_axes", n_in)
    in_dirs = _ints_attr(node, "scan_input_directions", n_in)
    out_axes = _ints_attr(node, "scan_output_axes", n_out)
    out_dirs = _ints_attr(node, "scan_output_directions", n_out)
    caps = implicit_inputs(node)
    _outer_shapes([*caps, *node.inputs])
    carried = [k for k in range(n_state) if is_float(node.outputs[k])]
    scanned = [k for k in range(n_in) if is_float(node.inputs[n_state + k])]
    cap_x = _float_captures(caps)
    if not carried and not scanned and not cap_x:
        return [*([None] * len(node.inputs)), *(_cap_grad({}, c) for c in caps)]

    # the saving Scan: the same steps, emitting each step's incoming states
    tag = em.fresh_name("Scan_save")
    g = _copy(body, tag, em.opset)
    ems = _body_emitter(em, g, f"{tag}/save")
    states = list(g.inputs)[:n_state]
    _close(ems, g, [*g.outputs[:n_state], *states], [*g.outputs[:n_state], *states])
    saved = () if not n_state else em.op("Scan", *node.inputs, _outputs=2 * n_state, body=g, num_scan_inputs=n_in,
                                          scan_input_axes=in_axes, scan_input_directions=in_dirs)
    _fix_outputs(saved[:n_state], node.outputs[:n_state])
    stacks = list(saved[n_state:])
    for st, v in zip(stacks, states, strict=True):
        st.type, st.shape = v.type, _stacked(v)

    # the backward Scan: states (d states, d captured), scan inputs (saved states, x, dy) all read in reverse
    tag, g, emb, dv_in, dc_in, s_t, x_t = _scan_backward_body(em, body, n_state, n_in, carried, cap_x)
    ys: list[ir.Value] = [g.outputs[k] for k in carried]
    seeds: list[ir.Value | None] = list(dv_in)
    dy_in, dy_outer, dy_axes, dy_dirs = [], [], [], []
    for s in range(n_out):
        y, gs = g.outputs[n_state + s], grads[n_state + s]
        if gs is None or not is_float(y):
            continue
        d = _value(f"{tag}/dy_{s}", like=y)
        ys.append(y)
        seeds.append(d)
        dy_in.append(d)
        dy_outer.append(gs)
        dy_axes.append(out_axes[s])
        dy_dirs.append(1 - out_dirs[s])
    if not _reverse_body(emb, g, node, ys, seeds, s_t, x_t, carried, scanned, cap_x, dv_in, dc_in, dy_in):
        return [*(UNDEFINED if k in carried else None for k in range(n_state)),
                *(UNDEFINED if k in scanned else None for k in range(n_in)),
                *(UNDEFINED if is_float(c) else None for c in caps)]

    seeds_in = [em.zeros_like(node.outputs[k]) if grads[k] is None else grads[k] for k in carried]
    n_made = len(carried) + len(cap_x) + len(scanned)
    made = em.op("Scan", *seeds_in, *(em.zeros_like(c) for c in cap_x), *stacks, *node.inputs[n_state:],
                 *dy_outer, _outputs=n_made, body=g, num_scan_inputs=n_state + n_in + len(dy_in),
                 scan_input_axes=[0] * n_state + in_axes + dy_axes,
                 scan_input_directions=[1] * n_state + [1 - d for d in in_dirs] + dy_dirs,
                 scan_output_axes=[in_axes[k] for k in scanned],
                 scan_output_directions=[1 - in_dirs[k] for k in scanned])
    made = (made,) if n_made == 1 else made
    likes = [*(node.inputs[k] for k in carried), *cap_x, *(node.inputs[n_state + k] for k in scanned)]
    _fix_outputs(made, likes)  # type: ignore[arg-type]
    by_state = dict(zip(carried, made[:len(carried)], strict=True))
    by_cap = dict(zip(cap_x, made[len(carried):len(carried) + len(cap_x)], strict=True))
    by_x = dict(zip(scanned, made[len(carried) + len(cap_x):], strict=True))
    return [*(by_state.get(k) for k in range(n_state)), *(by_x.get(k) for k in range(n_in)),
            *(_cap_grad(by_cap, c) for c in caps)]


@register("Scan", since=8, captures=True,
          notes="opset 8 form (batch axis 0, sequence axis 1, ragged sequence_lens): a saving Scan, a Scan over the "
                "reversed sequences, and a reversing Scan that puts the scan inputs' gradients back in order")
def scan8_grad(em: Emitter, node: ir.Node, grads: Sequence[ir.Value | None]) -> list[Grad]:
    """d(initial states), d(scan inputs), d(captured) = Scan-8 over the reversed (valid) sequences of walk(body)"""
    body = node.attributes["body"].as_graph()
    lens = node.inputs[0]
    n_in = int(attr(node, "num_scan_inputs"))
    n_state = len(node.inputs) - 1 - n_in
    n_out = len(node.outputs) - n_state
    in_dirs = _ints_attr(node, "directions", n_in)
    caps = implicit_inputs(node)
    _outer_shapes([*caps, *node.inputs[1:]])
    carried = [k for k in range(n_state) if is_float(node.outputs[k])]
    scanned = [k for k in range(n_in) if is_float(node.inputs[1 + n_state + k])]
    cap_x = _float_captures(caps)
    if not carried and not scanned and not cap_x:
        return [*([None] * len(node.inputs)), *(_cap_grad({}, c) for c in caps)]

    tag = em.fresh_name("Scan_save")
    g = _copy(body, tag, em.opset)
    states = list(g.inputs)[:n_state]
    _close(_body_emitter(em, g, f"{tag}/save"), g, [*g.outputs[:n_state], *states], [*g.outputs[:n_state], *states])
    saved = () if not n_state else em.op("Scan", *node.inputs, _outputs=2 * n_state, body=g, num_scan_inputs=n_in,
                                          directions=in_dirs)
    _fix_outputs(saved[:n_state], node.outputs[:n_state])
    stacks = list(saved[n_state:])
    for st, v in zip(stacks, node.inputs[1:1 + n_state], strict=True):
        st.type = v.type  # type: ignore[union-attr]

    tag, g, emb, dv_in, dc_in, s_t, x_t = _scan_backward_body(em, body, n_state, n_in, carried, cap_x)
    ys: list[ir.Value] = [g.outputs[k] for k in carried]
    seeds: list[ir.Value | None] = list(dv_in)
    dy_in, dy_outer = [], []
    for s in range(n_out):
        y, gs = g.outputs[n_state + s], grads[n_state + s]
        if gs is not None and is_float(y):
            d = _value(f"{tag}/dy_{s}", like=y)
            ys.append(y)
            seeds.append(d)
            dy_in.append(d)
            dy_outer.append(gs)
    if not _reverse_body(emb, g, node, ys, seeds, s_t, x_t, carried, scanned, cap_x, dv_in, dc_in, dy_in):
        return [None, *(UNDEFINED if k in carried else None for k in range(n_state)),
                *(UNDEFINED if k in scanned else None for k in range(n_in)),
                *(UNDEFINED if is_float(c) else None for c in caps)]

    # the accumulated captured gradients are per batch element here (states carry a batch axis): summed after
    seeds_in = [em.zeros_like(node.outputs[k]) if grads[k] is None else grads[k] for k in carried]
    per_batch = [_batched_zeros(em, c, node.inputs[1 + n_state]) for c in cap_x]  # type: ignore[arg-type]
    n_made = len(carried) + len(cap_x) + len(scanned)
    made = em.op("Scan", lens, *seeds_in, *per_batch, *stacks, *node.inputs[1 + n_state:], *dy_outer,
                 _outputs=n_made, body=g, num_scan_inputs=n_state + n_in + len(dy_in),
                 directions=[1] * n_state + [1 - d for d in in_dirs] + [1] * len(dy_in))
    made = (made,) if n_made == 1 else made
    d_caps = [em.reduce_sum(m, [0], keepdims=False) for m in made[len(carried):len(carried) + len(cap_x)]]
    d_xs = list(made[len(carried) + len(cap_x):])
    for k, m in zip(scanned, d_xs, strict=True):
        m.type = node.inputs[1 + n_state + k].type  # type: ignore[union-attr]
    d_xs = [m if in_dirs[k] else _reverse8(em, m, lens, tag) for k, m in zip(scanned, d_xs, strict=True)]
    _fix_outputs([*made[:len(carried)], *d_caps, *d_xs],
                 [*(node.inputs[1 + k] for k in carried), *cap_x, *(node.inputs[1 + n_state + k] for k in scanned)])
    by_state = dict(zip(carried, made[:len(carried)], strict=True))
    by_cap = dict(zip(cap_x, d_caps, strict=True))
    by_x = dict(zip(scanned, d_xs, strict=True))
    return [None, *(by_state.get(k) for k in range(n_state)), *(by_x.get(k) for k in range(n_in)),
            *(_cap_grad(by_cap, c) for c in caps)]


def _batched_zeros(em: Emitter, c: ir.Value, batched: ir.Value) -> ir.Value:
    """Zeros of shape (batch, *c.shape): batch read from axis 0 of ``batched``."""
    shape = em.cat_ints(em._as_vector(em.dim(batched, 0)), em.shape_of(c) if static_dims(c) is None
                        else [int(d) for d in static_dims(c)])  # type: ignore[union-attr]
    return em.zeros(shape, like=c)


def _reverse8(em: Emitter, x: ir.Value, lens: ir.Value | None, tag: str) -> ir.Value:
    """x (batch, time, ...) with each batch element's valid prefix reversed: a Scan-8 with an identity body."""
    g = ir.Graph([], [], nodes=[], opset_imports={"": em.opset}, name=f"{tag}_reverse")
    elem = ir.Value(name=f"{tag}_reverse/x", type=x.type, shape=None if x.shape is None else ir.Shape(
        list(x.shape)[2:]))
    g.inputs.append(elem)
    node = ir.Node("", "Identity", [elem], name=f"{tag}_reverse/Identity")
    node.outputs[0].name = f"{tag}_reverse/y"
    node.outputs[0].type, node.outputs[0].shape = elem.type, elem.shape
    g.append(node)
    g.outputs.append(node.outputs[0])
    out = em.op("Scan", lens, x, body=g, num_scan_inputs=1, directions=[1])
    out.type, out.shape = x.type, x.shape
    return out
