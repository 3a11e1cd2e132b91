"""Beyond first order: Hessian-vector products, Jacobians, and lowering ONNX's own ``Gradient`` op.

All of them are ``gradients()`` applied again to graphs it made, which works because every op a rule
emits has a rule itself (tests/test_closure.py proves it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np
import onnx_ir as ir

from onnxgrad.api import NEW_INPUT, GradInput, UnconnectedGradients, gradients
from onnxgrad.emitter import Emitter, rank_of, static_dims
from onnxgrad.registry import opset_of
from onnxgrad.values import as_list, unique_scope, value_table

TRAINING_DOMAIN = "ai.onnx.preview.training"

Tangent = str | np.ndarray | GradInput | None


HvpMode = Literal["auto", "forward-over-reverse", "reverse-over-reverse"]
JacobianMode = Literal["auto", "forward", "reverse"]


def _has_subgraphs(model: ir.Model) -> bool:
    return any(a.type in (ir.AttributeType.GRAPH, ir.AttributeType.GRAPHS)
               for n in model.graph for a in n.attributes.values())


def choose_hvp_mode(model: ir.Model, mode: str, xs: Sequence[Any] = ()) -> str:
    """The mode ``auto`` stands for, by what bench/forward.py measured on the bundled models: forward-over-reverse
    (fewer nodes and faster: 109 against 220 nodes on mlp.onnx, 635 against 1236 on transformer_block.onnx) when
    every node between the xs and the outputs has a forward rule; reverse-over-reverse where some node would take
    the transposed-VJP fallback (MaxPool, BatchNormalization, SoftmaxCrossEntropyLoss: cnn.onnx 413 against 353)
    or holds a subgraph (If, Loop, Scan)."""
    if mode not in ("auto", "forward-over-reverse", "reverse-over-reverse"):
        raise ValueError(f"mode must be 'auto', 'forward-over-reverse' or 'reverse-over-reverse', got {mode!r}")
    if mode != "auto":
        return mode
    if _has_subgraphs(model):
        return "reverse-over-reverse"
    from onnxgrad.backprop import _forward_reach
    from onnxgrad.forward import FORWARD

    nodes = list(model.graph)
    table = value_table(model.graph)
    starts = [table[x] if isinstance(x, str) else x for x in xs if not isinstance(x, str) or x in table]
    reached = _forward_reach(nodes, starts, set(), {id(n): i for i, n in enumerate(nodes)})
    on_path = {id(p): p for v in reached if (p := v.producer()) is not None}
    slow = [n for n in on_path.values() if n.domain not in ("", "ai.onnx") or n.op_type not in FORWARD]
    return "reverse-over-reverse" if slow else "forward-over-reverse"


def hessian_vector_product(
    model: ir.Model,
    ys: str | Sequence[str],
    xs: str | Sequence[str],
    v: Tangent | Sequence[Tangent] = NEW_INPUT,
    name: str = "hvp",
    mode: HvpMode = "auto",
    **kwargs: Any,
) -> list[str | None]:
    """Add ``H v = d/dx <d(sum ys)/dx, v>`` for each x; ``v`` per x: a value name, an array, or a new input
    (named ``<name>_v/<x>``; the results are ``<name>/<x>_grad``).

    ``mode``: 'forward-over-reverse' pushes v through the gradient graph in forward mode (``onnxgrad.jvp``);
    'reverse-over-reverse' differentiates ``<gradient, v>`` in reverse; 'auto' picks (``choose_hvp_mode``).
    Returns one name per x (None where the second derivative is unconnected)."""
    x_list = as_list(xs)
    vs: list[Tangent] = list(v) if isinstance(v, list | tuple) else [v] * len(x_list)
    if len(vs) != len(x_list):
        raise ValueError(f"Length mismatch. Passed {len(vs)} vectors for {len(x_list)} xs")
    vs = [GradInput(f"{name}_v/{x}") if isinstance(t, GradInput) and t.name is None else t
          for t, x in zip(vs, x_list, strict=True)]
    chosen = choose_hvp_mode(model, mode, x_list)
    first = gradients(model, ys, x_list, name=f"{name}_first", **kwargs)
    if chosen == "forward-over-reverse":
        return _forward_over_reverse(model, first, x_list, vs, name, **kwargs)
    pairs = [(g, t) for g, t in zip(first, vs, strict=True) if g is not None]
    if not pairs:
        return [None] * len(x_list)
    return gradients(model, [g for g, _ in pairs], x_list, grad_ys=[t for _, t in pairs], name=name, **kwargs)


def _forward_over_reverse(model: ir.Model, first: list[str | None], xs: list[Any], vs: Sequence[Tangent],
                          name: str, **kwargs: Any) -> list[str | None]:
    """H v as the JVP of the first-order gradients along v, each result named ``<scope>/<x>_grad``."""
    from onnxgrad.forward import jvp

    kept = {k: kwargs[k] for k in ("stop_gradients", "unconnected_gradients") if k in kwargs}
    pairs = [(g, x) for g, x in zip(first, xs, strict=True) if g is not None]
    if not pairs:
        return [None] * len(xs)
    xs_unique = list(dict.fromkeys(x for _, x in pairs))  # an x that the ys do not depend on moves no gradient
    tangents = [vs[xs.index(x)] for x in xs_unique]
    _, found = jvp(model, xs_unique, tangents=tangents, ys=[g for g, _ in pairs], name=name,  # type: ignore[arg-type]
                   result_names=[f"{x if isinstance(x, str) else x.name}_grad" for _, x in pairs], **kept)
    by_x = {x: f for (_, x), f in zip(pairs, found, strict=True)}
    missing = [x for x in dict.fromkeys(xs) if by_x.get(x) is None]
    if missing and kept.get("unconnected_gradients") in ("zero", UnconnectedGradients.ZERO):
        table = value_table(model.graph)  # an x whose first derivative is unconnected: its second is zeros too
        em = Emitter(model.graph, opset_of(model.opset_imports), unique_scope(model.graph, f"{name}_zero"),
                     model.ir_version or 8)
        zeros = []
        for x in missing:
            xv = table[x] if isinstance(x, str) else x
            z = em.Identity(em.zeros_like(xv))
            z.name = f"{em.scope}/{xv.name}_grad"
            zeros.append(z)
        em.commit(zeros)
        by_x.update({x: z.name for x, z in zip(missing, zeros, strict=True)})
    return [by_x.get(x) for x in xs]


def jacobian_mode(n_in: int, n_out: int, mode: str) -> str:
    """'forward' (one JVP per element of x) when x has fewer elements than y, else 'reverse' (one VJP per y)."""
    if mode not in ("auto", "forward", "reverse"):
        raise ValueError(f"mode must be 'auto', 'forward' or 'reverse', got {mode!r}")
    if mode != "auto":
        return mode
    return "forward" if n_in < n_out else "reverse"


def jacobian(model: ir.Model, y: str, x: str, name: str = "jacobian", mode: JacobianMode = "auto") -> str:
    """Add the full Jacobian ``J[i..., j...] = dy[i...]/dx[j...]`` (shape y.shape + x.shape) and return its name.

    ``mode``: 'reverse' runs one backward pass per element of y (y needs a static shape), 'forward' one JVP per
    element of x (x needs a static shape); 'auto' takes the one with fewer passes (``jacobian_mode``)."""
    graph = model.graph
    table = value_table(graph)
    yv, xv = table.get(y), table.get(x)
    if yv is None or xv is None:
        missing = y if yv is None else x
        raise ValueError(f"jacobian: no value named {missing!r} in the graph")
    ydims, xdims = static_dims(yv), static_dims(xv)
    n_out = None if ydims is None else int(np.prod(ydims))
    n_in = None if xdims is None else int(np.prod(xdims))
    if mode == "auto" and (n_in is None or n_out is None):
        mode = "forward" if n_out is None else "reverse"
    chosen = jacobian_mode(n_in or 0, n_out or 0, mode)
    if chosen == "forward":
        return _jacobian_forward(model, yv, xv, name)
    if ydims is None or n_out is None:
        raise ValueError(f"jacobian: {y!r} needs a static shape (it has {yv.shape})")
    if yv.dtype is None:
        raise ValueError(f"jacobian: the dtype of {y!r} is unknown")
    rows = []
    for i in range(n_out):
        seed = np.zeros(n_out, dtype=yv.dtype.numpy())
        seed[i] = 1
        (g,) = gradients(model, y, x, grad_ys=[seed.reshape(ydims)], name=f"{name}/row",
                         unconnected_gradients="zero")
        rows.append(value_table(graph)[g])  # type: ignore[index]
    em = Emitter(graph, opset_of(model.opset_imports), unique_scope(graph, name), model.ir_version or 8)
    stacked = em.Concat(*[em.unsqueeze(r, [0]) for r in rows], axis=0)
    out = em.Reshape(stacked, em.Concat(em.ints(list(ydims)), em.shape_of(xv), axis=0))
    out.name = f"{em.scope}/{y}_by_{x}"
    em.commit([out])
    return out.name


def _jacobian_forward(model: ir.Model, yv: ir.Value, xv: ir.Value, name: str) -> str:
    """One JVP per element of x along its unit vector; the columns stacked last, then reshaped to y + x."""
    from onnxgrad.forward import jvp

    graph = model.graph
    xdims = static_dims(xv)
    if xdims is None or xv.dtype is None:
        raise ValueError(f"jacobian: forward mode needs a static shape and dtype for {xv.name!r} (it has {xv.shape})")
    n_in = int(np.prod(xdims))
    cols = []
    for j in range(n_in):
        unit = np.zeros(n_in, dtype=xv.dtype.numpy())
        unit[j] = 1
        _, (c,) = jvp(model, xv.name, tangents=[unit.reshape(xdims)], ys=[yv.name], name=f"{name}/col",
                      unconnected_gradients="zero")
        cols.append(value_table(graph)[c])  # type: ignore[index]
    em = Emitter(graph, opset_of(model.opset_imports), unique_scope(graph, name), model.ir_version or 8)
    r = rank_of(yv)
    stacked = em.Concat(*[em.unsqueeze(c, [-1 if r is None else r]) for c in cols], axis=-1)  # y.shape + [n_in]
    out = em.Reshape(stacked, em.Concat(em.shape_of(yv), em.ints(list(xdims)), axis=0))
    out.name = f"{em.scope}/{yv.name}_by_{xv.name}"
    em.commit([out])
    return out.name


def lower_gradient_ops(model: ir.Model) -> int:
    """Replace every ai.onnx.preview.training Gradient node by its explicit gradient subgraph.

    Returns how many were lowered."""
    graph = model.graph
    count = 0
    for node in [n for n in graph if n.domain == TRAINING_DOMAIN and n.op_type == "Gradient"]:
        xs = [str(s) for s in node.attributes["xs"].as_strings()]
        y = node.attributes["y"].as_string()
        zs = [str(s) for s in node.attributes["zs"].as_strings()] if "zs" in node.attributes else []
        stop = [z for z in zs if z not in xs]
        grads = gradients(model, y, xs, name=f"{node.name or 'Gradient'}/lowered",
                          stop_gradients=stop or None, unconnected_gradients="zero")
        table = value_table(graph)
        for out, g in zip(node.outputs, grads, strict=False):
            assert g is not None
            ident = ir.Node("", "Identity", [table[g]], num_outputs=1, name=f"{g}/as_{out.name}")
            new = ident.outputs[0]
            new.dtype, new.shape = out.dtype or table[g].dtype, out.shape or table[g].shape
            graph.append(ident)
            out.replace_all_uses_with(new, replace_graph_outputs=True)
            old = out.name
            out.name = f"{old}/removed"
            new.name = old
        graph.remove(node, safe=True)
        count += 1
    if count and not any(n.domain == TRAINING_DOMAIN for n in ir.traversal.RecursiveGraphIterator(graph)):
        model.opset_imports.pop(TRAINING_DOMAIN, None)
    if count:
        ir.passes.common.TopologicalSortPass()(model)
    return count


def higher_order_gradients(
    model: ir.Model,
    ys: str | Sequence[str],
    xs: str | Sequence[str],
    order: int,
    grad_ys: Any = None,
    name: str = "gradients",
    hvp_mode: HvpMode = "auto",
    **kwargs: Any,
) -> list[list[str | None]]:
    """Gradients of order 1..``order``: order k is ``d/dx <order k-1 gradient, v_k>`` with ``v_k`` a new
    graph input per x (``<name>_order<k>/<x>_v``), so order 2 is a Hessian-vector product (forward-over-reverse
    or reverse-over-reverse as ``hvp_mode`` says, see ``choose_hvp_mode``; orders 3 and up in reverse).

    Returns one list of names per order (None where unconnected)."""
    if order < 1:
        raise ValueError(f"order must be 1 or more, got {order}")
    x_list = as_list(xs)
    second = choose_hvp_mode(model, hvp_mode, x_list) if order >= 2 else "reverse-over-reverse"
    orders = [gradients(model, ys, x_list, grad_ys, name=name, **kwargs)]
    for k in range(2, order + 1):
        prev = orders[-1]
        pairs = [(g, x) for g, x in zip(prev, x_list, strict=True) if g is not None]
        if not pairs:
            orders.append([None] * len(x_list))
            continue
        scope = f"{name}_order{k}"
        seeds = [GradInput(f"{scope}/{x}_v") for _, x in pairs]
        if k == 2 and second == "forward-over-reverse":
            vs = {x: GradInput(f"{scope}/{x}_v") for x in x_list}
            orders.append(_forward_over_reverse(model, prev, x_list, [vs[x] for x in x_list], scope, **kwargs))
            continue
        orders.append(gradients(model, [g for g, _ in pairs], x_list, grad_ys=seeds, name=scope, **kwargs))
    return orders
