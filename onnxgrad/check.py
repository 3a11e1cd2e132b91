"""Numerical gradient checking: onnxgrad's gradients against central differences along random
directions, ``<g, v>`` versus ``(L(x + h v) - L(x - h v)) / 2h`` with ``L = sum_i <u_i, y_i>``."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common

from onnxgrad.api import NEW_INPUT, add_gradients, upgrade
from onnxgrad.runtime import run, session


@dataclass
class CheckRow:
    """One x: the analytic and numeric directional derivatives and whether they agree."""

    x: str
    analytic: float
    numeric: float
    rel_error: float
    ok: bool


def cut_at(model: onnx.ModelProto, names: Sequence[str]) -> onnx.ModelProto:
    """A copy whose values ``names`` are graph inputs (initializers and intermediates cut loose)."""
    m = ir.serde.deserialize_model(model)
    g = m.graph
    inputs = {v.name for v in g.inputs}
    table = {v.name: v for n in g for v in n.outputs} | dict(g.initializers)
    for name in dict.fromkeys(names):
        v = table[name] if name in table else None
        if v is not None and v.is_initializer():
            g.initializers.pop(name)
            v.const_value = None
            if name not in inputs:
                g.inputs.append(v)
            continue
        if name in inputs:
            continue
        assert v is not None
        fresh = ir.Value(name=name, type=v.type, shape=v.shape)
        v.replace_all_uses_with(fresh, replace_graph_outputs=True)
        v.name = f"{name}__cut"
        g.inputs.append(fresh)
    ir.passes.common.RemoveUnusedNodesPass()(m)
    return ir.serde.serialize_model(m)


def random_feeds(model: onnx.ModelProto, rng: np.random.Generator, dims: int = 2) -> dict[str, np.ndarray]:
    """Random values for every graph input (symbolic dimensions become ``dims``)."""
    init = {i.name for i in model.graph.initializer}
    feeds = {}
    for inp in model.graph.input:
        if inp.name in init:
            continue
        t = inp.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else dims for d in t.shape.dim]
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type)
        if np.issubdtype(dtype, np.floating):
            feeds[inp.name] = rng.standard_normal(shape).astype(dtype)
        elif dtype == np.bool_:
            feeds[inp.name] = rng.random(shape) > 0.5
        else:
            feeds[inp.name] = rng.integers(0, 3, shape).astype(dtype)
    return feeds


def _values(
    model: onnx.ModelProto, feeds: Mapping[str, np.ndarray], names: Sequence[str], provider: str = "cpu"
) -> dict[str, np.ndarray]:
    """The values ``names`` take on ``feeds``: feeds, initializers, or computed."""
    out: dict[str, np.ndarray] = {k: np.asarray(v) for k, v in feeds.items() if k in names}
    for init in model.graph.initializer:
        if init.name in names and init.name not in out:
            out[init.name] = onnx.numpy_helper.to_array(init)
    rest = [n for n in dict.fromkeys(names) if n not in out]
    if rest:
        m = ir.serde.deserialize_model(model)
        table = {v.name: v for n in m.graph for v in n.outputs}
        have = {v.name for v in m.graph.outputs}
        for n in rest:
            if n not in have:
                m.graph.outputs.append(table[n])
        out |= run(ir.serde.serialize_model(m), feeds, rest, provider)
    return out


def check_gradients(
    model: onnx.ModelProto,
    ys: Sequence[str],
    xs: Sequence[str],
    feeds: Mapping[str, np.ndarray],
    *,
    seed: int = 0,
    eps: float | None = None,
    rtol: float | None = None,
    provider: str = "cpu",
) -> list[CheckRow]:
    """Compare onnxgrad's gradients of ``sum_i <u_i, y_i>`` with central differences, one row per x."""
    rng = np.random.default_rng(seed)
    model = upgrade(model)
    aug = add_gradients(model, list(ys), list(xs), [NEW_INPUT] * len(ys))
    seed_names = aug.new_inputs
    base = _values(model, feeds, [*xs, *ys], provider)
    x_vals = {x: base[x] for x in xs}
    us = {
        s: np.asarray(rng.standard_normal(np.shape(base[y])), dtype=base[y].dtype)
        for s, y in zip(seed_names, ys, strict=True)
    }
    grads = run(aug.model, {**feeds, **us}, provider=provider)
    u_list = [us[s] for s in seed_names]
    leaves = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    sessions: dict[str, tuple[object, set[str]]] = {}

    def loss(x: str, point: Mapping[str, np.ndarray]) -> float:
        key = "" if x in leaves else x
        if key not in sessions:
            sess = session(cut_at(model, [n for n in xs if n in leaves] if key == "" else [x]), provider)
            sessions[key] = (sess, {i.name for i in sess.get_inputs()})
        sess, names = sessions[key]
        f = {k: np.asarray(v) for k, v in {**feeds, **x_vals, **point}.items() if k in names}
        outs = run(sess, f, list(ys))  # type: ignore[arg-type]
        return float(sum(np.sum(u.astype(np.float64) * outs[y].astype(np.float64))
                         for u, y in zip(u_list, ys, strict=True)))

    rows = []
    for x in dict.fromkeys(xs):
        x0 = x_vals[x]
        dt = x0.dtype
        h = eps if eps is not None else (1e-6 if dt == np.float64 else 1e-2 if dt == np.float16 else 1e-3)
        tol = rtol if rtol is not None else (1e-5 if dt == np.float64 else 5e-2 if dt == np.float16 else 1e-2)
        v = rng.standard_normal(x0.shape)
        g_name = aug.gradients[x]
        g = np.zeros(x0.shape) if g_name is None else np.asarray(grads[g_name], dtype=np.float64)
        analytic = float(np.sum(g * v))
        plus = loss(x, {x: (x0.astype(np.float64) + h * v).astype(dt)})
        minus = loss(x, {x: (x0.astype(np.float64) - h * v).astype(dt)})
        numeric = (plus - minus) / (2 * h)
        scale = max(abs(analytic), abs(numeric), 1e-3)
        err = abs(analytic - numeric) / scale
        rows.append(CheckRow(x, analytic, numeric, err, bool(err <= tol)))
    return rows
