"""Beyond first order: Hessian-vector products, Jacobians, and lowering ONNX's own ``Gradient`` op.

All of them are ``gradients()`` applied again to graphs it made, which works because every op a rule
emits has a rule itself (tests/test_closure.py proves it)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import onnx_ir as ir

from onnxgrad.api import NEW_INPUT, GradInput, gradients
from onnxgrad.emitter import Emitter, static_dims
from onnxgrad.registry import opset_of
from onnxgrad.values import as_list, unique_scope, value_table

TRAINING_DOMAIN = "ai.onnx.preview.training"

Tangent = str | np.ndarray | GradInput | None


def hessian_vector_product(
    model: ir.Model,
    ys: str | Sequence[str],
    xs: str | Sequence[str],
    v: Tangent | Sequence[Tangent] = NEW_INPUT,
    name: str = "hvp",
    **kwargs: Any,
) -> list[str | None]:
    """Add ``H v = d/dx <d(sum ys)/dx, v>`` for each x; ``v`` per x: a value name, an array, or a new input
    (named ``<name>_v/<x>``; the results are ``<name>/<x>_grad``).

    Returns one name per x (None where the second derivative is unconnected)."""
    x_list = as_list(xs)
    vs: list[Tangent] = list(v) if isinstance(v, list | tuple) else [v] * len(x_list)
    if len(vs) != len(x_list):
        raise ValueError(f"Length mismatch. Passed {len(vs)} vectors for {len(x_list)} xs")
    vs = [GradInput(f"{name}_v/{x}") if isinstance(t, GradInput) and t.name is None else t
          for t, x in zip(vs, x_list, strict=True)]
    first = gradients(model, ys, x_list, name=f"{name}_first", **kwargs)
    pairs = [(g, t) for g, t in zip(first, vs, strict=True) if g is not None]
    if not pairs:
        return [None] * len(x_list)
    return gradients(model, [g for g, _ in pairs], x_list, grad_ys=[t for _, t in pairs], name=name, **kwargs)


def jacobian(model: ir.Model, y: str, x: str, name: str = "jacobian") -> str:
    """Add the full Jacobian ``J[i..., j...] = dy[i...]/dx[j...]`` (shape y.shape + x.shape) and return its name.

    One backward pass per element of y, so meant for small outputs with a static shape."""
    graph = model.graph
    table = value_table(graph)
    yv, xv = table.get(y), table.get(x)
    if yv is None or xv is None:
        missing = y if yv is None else x
        raise ValueError(f"jacobian: no value named {missing!r} in the graph")
    ydims = static_dims(yv)
    if ydims is None:
        raise ValueError(f"jacobian: {y!r} needs a static shape (it has {yv.shape})")
    n = int(np.prod(ydims))
    if yv.dtype is None:
        raise ValueError(f"jacobian: the dtype of {y!r} is unknown")
    rows = []
    for i in range(n):
        seed = np.zeros(n, dtype=yv.dtype.numpy())
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
    **kwargs: Any,
) -> list[list[str | None]]:
    """Gradients of order 1..``order``: order k is ``d/dx <order k-1 gradient, v_k>`` with ``v_k`` a new
    graph input per x (``<name>_order<k>/<x>_v``), so order 2 is a Hessian-vector product.

    Returns one list of names per order (None where unconnected)."""
    if order < 1:
        raise ValueError(f"order must be 1 or more, got {order}")
    x_list = as_list(xs)
    orders = [gradients(model, ys, x_list, grad_ys, name=name, **kwargs)]
    for k in range(2, order + 1):
        prev = orders[-1]
        pairs = [(g, x) for g, x in zip(prev, x_list, strict=True) if g is not None]
        if not pairs:
            orders.append([None] * len(x_list))
            continue
        scope = f"{name}_order{k}"
        seeds = [GradInput(f"{scope}/{x}_v") for _, x in pairs]
        orders.append(gradients(model, [g for g, _ in pairs], x_list, grad_ys=seeds, name=scope, **kwargs))
    return orders
