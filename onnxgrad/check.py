"""Numerical gradient checking: onnxgrad's gradients against central differences along random
directions, ``<g, v>`` versus ``(L(x + h v) - L(x - h v)) / 2h`` with ``L = sum_i <u_i, y_i>``.

Robust to kinks (ReLU, max-pool, abs): when the first step disagrees, smaller and larger steps and
other directions are tried, and an x is accepted as soon as one agrees. A disagreement that the one-sided
differences ``(L(x+hv) - L(x)) / h`` and ``(L(x) - L(x-hv)) / h`` explain (they differ by at least the
error: the slope jumps within the step) is a kink, not a failure; only a clean disagreement, where the
function is smooth along the step and still disagrees at every smaller step tried (a disagreement that shrinks with
the step is the curvature of the loss), is a mismatch; so is a gradient of another shape than its x.

Round-off is budgeted: the loss is computed from outputs of x's precision, so a difference quotient carries an error
of about ``NOISE_ULPS * eps * sum_i |u_i| . |y_i| / h``; that much disagreement is allowed on top of the relative
tolerance, and a row whose gradient and difference quotient are both within it is ``flat`` (a saturated softmax, a
loss that does not move): reported, not failed. The random inputs, the directions and the output weights ``u`` are
drawn from independent streams of one seed.

``check_model`` runs the check in float64 wherever it can (the model is converted: initializers, Constant values,
Cast targets, input and output types): in onnxruntime, or, where onnxruntime lacks a float64 kernel, in onnx's
reference evaluator; float32 is the last resort. The report says which ran it, and why the others did not."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_ir as ir
import onnx_ir.passes.common

from onnxgrad.api import NEW_INPUT
from onnxgrad.augment import add_gradients
from onnxgrad.io import one_line
from onnxgrad.runtime import REFERENCE, complete_feeds, provider_label, run, session
from onnxgrad.upgrade import upgrade
from onnxgrad.workarounds import is_runtime_error, kernel_gap

OK, KINK, FLAT, MISMATCH = "ok", "kink", "flat", "mismatch"

CHECK_DIM = 2  # symbolic dimensions of random inputs in a check (run's default is 1)


@dataclass
class CheckRow:
    """One x: the analytic and numeric directional derivatives and whether they agree.

    ``status`` is ``ok``, ``kink`` (no step agreed, but every disagreement is explained by a jump of the
    slope within the step: not a failure, ``ok`` is False), ``flat`` (the gradient and the difference quotient are
    both within round-off of zero: nothing to compare, not a failure, ``ok`` is False) or ``mismatch``."""

    x: str
    analytic: float
    numeric: float
    rel_error: float
    ok: bool
    status: str = OK
    step: float = 0.0
    tries: int = 1  # (direction, step) pairs evaluated
    shape: tuple[int, ...] = ()
    dtype: str = ""
    one_sided: tuple[float, float] | None = None  # forward and backward differences of the reported try
    noise: float = 0.0  # the round-off allowed in the difference quotient of the reported try
    note: str = ""  # what else is wrong (a gradient of another shape than x)
    flat: bool = False  # the gradient and the difference quotient are both zero within round-off


def cut_at(
    model: onnx.ModelProto, names: Sequence[str], dtypes: Mapping[str, np.dtype] | None = None,
    outputs: Sequence[str] = (),
) -> onnx.ModelProto:
    """A copy whose values ``names`` are graph inputs (initializers and intermediates cut loose) and whose values
    ``outputs`` are graph outputs; ``dtypes`` types an intermediate the model declares no type for (an exporter
    writes no value_info: a graph input needs one)."""
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
        known = v.type if v.type is not None or dtypes is None or name not in dtypes else ir.TensorType(
            ir.DataType.from_numpy(dtypes[name]))
        fresh = ir.Value(name=name, type=known, shape=v.shape)
        v.replace_all_uses_with(fresh, replace_graph_outputs=True)
        v.name = f"{name}__cut"
        g.inputs.append(fresh)
    have = {v.name for v in g.outputs}
    table = {v.name: v for n in g for v in n.outputs}
    g.outputs.extend(table[n] for n in dict.fromkeys(outputs) if n not in have and n in table)
    ir.passes.common.RemoveUnusedNodesPass()(m)
    return ir.serde.serialize_model(m)


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


# first step is the historical default; the others rescue a try that a kink or rounding spoiled
STEPS: dict[str, tuple[float, ...]] = {
    "float64": (1e-6, 1e-4, 1e-8),
    "float32": (1e-3, 1e-2, 1e-4),
    "float16": (1e-2, 3e-2, 3e-3),
}
RTOL: dict[str, float] = {"float64": 1e-5, "float32": 1e-2, "float16": 5e-2}
DIRECTIONS = 3
# a directional derivative that, over the smallest step, would move the loss by this many times its own size
# cannot be checked by differences (the loss stays bounded; a mask constant times finfo.min is ~1e24)
STEEP = 1e3
# the smallest step a try is refined to: below it the rounding of x + h v to x's dtype spoils the step
MIN_STEP: dict[str, float] = {"float64": 1e-10, "float32": 1e-5, "float16": 1e-3}
# the round-off of L = sum_i <u_i, y_i>, in units of eps * sum_i |u_i| . |y_i|: the outputs of a deep float32 net
# are good to a few ulps of their magnitude, and L adds them up
NOISE_ULPS = 8.0
# the streams of one seed: inputs use the seed itself (as `run` draws them), the others these spawn keys
U_STREAM, DIRECTION_STREAM = 1, 2

Progress = Callable[[int, int, str], None]


def _kind(dtype: np.dtype) -> str:
    return dtype.name if dtype.name in STEPS else "float32"


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
    steps: Sequence[float] | None = None,
    directions: int = DIRECTIONS,
    progress: Progress | None = None,
    stop_gradients: Sequence[str] = (),
) -> list[CheckRow]:
    """Compare onnxgrad's gradients of ``sum_i <u_i, y_i>`` with central differences, one row per x.

    ``eps`` fixes the step (``steps`` gives several, tried in order); by default the steps and
    tolerance follow x's dtype (``STEPS``, ``RTOL``). ``stop_gradients`` are held at their values on ``feeds`` in
    the differences too (as ``gradients`` treats them). ``u`` and the directions come from streams of ``seed``
    apart from the one ``run`` draws random inputs from. ``progress(done, total, x)`` is called after each x.
    Random draws (``draw_nodes``: random generators, Dropout in training mode) are sampled once and held fixed."""
    u_rng = np.random.default_rng([seed, U_STREAM])
    rng = np.random.default_rng([seed, DIRECTION_STREAM])
    model = upgrade(model)
    stops = list(dict.fromkeys(stop_gradients))
    aug = add_gradients(model, list(ys), list(xs), [NEW_INPUT] * len(ys),
                        **({"stop_gradients": stops} if stops else {}))
    seed_names = aug.new_inputs
    aug_model = aug.model
    drawing = draw_nodes(model)
    if drawing:  # one sample of the random draws, held in both models: differences of one function, not of noise
        draws = record_draws(model, drawing, feeds, provider)
        model, aug_model = hold_draws(model, drawing, draws), hold_draws(aug_model, drawing, draws)
    base = _values(model, feeds, [*xs, *ys, *stops], provider)
    x_vals = {x: base[x] for x in [*xs, *stops]}
    us = {
        s: np.asarray(u_rng.standard_normal(np.shape(base[y])), dtype=base[y].dtype)
        for s, y in zip(seed_names, ys, strict=True)
    }
    grads = run(aug_model, {**feeds, **us}, provider=provider)
    u_list = [us[s] for s in seed_names]
    # the round-off scale of the loss: sum_i |u_i| . |y_i|, in the outputs' own precision
    magnitude = float(sum(np.sum(np.abs(u.astype(np.float64) * base[y].astype(np.float64)))
                          for u, y in zip(u_list, ys, strict=True)))
    leaves = {i.name for i in model.graph.input} | {i.name for i in model.graph.initializer}
    sessions: dict[str, tuple[object, set[str]]] = {}

    def loss(x: str, point: Mapping[str, np.ndarray]) -> float:
        key = "" if x in leaves else x
        if key not in sessions:
            cut = [n for n in xs if n in leaves and x_vals[n].size] if key == "" else [x]
            sess = session(cut_at(model, [*cut, *stops], {n: v.dtype for n, v in x_vals.items()}, ys), provider)
            sessions[key] = (sess, {i.name for i in sess.get_inputs()})
        sess, names = sessions[key]
        f = {k: np.asarray(v) for k, v in {**feeds, **x_vals, **point}.items() if k in names}
        outs = run(sess, f, list(ys))  # type: ignore[arg-type]
        return float(sum(np.sum(u.astype(np.float64) * outs[y].astype(np.float64))
                         for u, y in zip(u_list, ys, strict=True)))

    out_eps = max([_eps(base[y].dtype) for y in ys] or [_eps(np.dtype(np.float64))])
    rows = []
    unique = list(dict.fromkeys(xs))
    for done, x in enumerate(unique, 1):
        x0 = x_vals[x]
        g_name = aug.gradients[x]
        g = np.zeros(x0.shape) if g_name is None else np.asarray(grads[g_name], dtype=np.float64)
        if g.shape != x0.shape:  # a rule that missed a reduction over broadcast axes, say
            rows.append(CheckRow(x, math.nan, math.nan, math.inf, False, MISMATCH, 0.0, 0, tuple(x0.shape),
                                 x0.dtype.name, note=f"its gradient has shape {list(g.shape)}, it has "
                                 f"{list(x0.shape)}"))
            if progress is not None:
                progress(done, len(unique), x)
            continue
        if x0.size == 0:  # Resize's empty roi, say: only the gradient's shape says anything
            rows.append(CheckRow(x, 0.0, 0.0, 0.0, True, OK, 0.0, 0, tuple(x0.shape), x0.dtype.name,
                                 note="no elements: nothing to compare"))
            if progress is not None:
                progress(done, len(unique), x)
            continue
        hs = [eps] if eps is not None else list(steps) if steps is not None else list(STEPS[_kind(x0.dtype)])
        tol = rtol if rtol is not None else RTOL[_kind(x0.dtype)]
        noise = NOISE_ULPS * max(out_eps, _eps(x0.dtype)) * magnitude
        rows.append(_check_one(x, x0, g, hs, tol, max(1, directions), rng, lambda p, x=x: loss(x, {x: p}), noise))
        if progress is not None:
            progress(done, len(unique), x)
    return rows


def _eps(dtype: np.dtype) -> float:
    """Machine epsilon of a float dtype (float32's for the types numpy has no ``finfo`` for)."""
    try:
        return float(np.finfo(dtype).eps)
    except (TypeError, ValueError):
        return float(np.finfo(np.float32).eps)


def _check_one(
    x: str,
    x0: np.ndarray,
    g: np.ndarray,
    steps: Sequence[float],
    tol: float,
    directions: int,
    rng: np.random.Generator,
    loss: Callable[[np.ndarray], float],
    noise: float = 0.0,
) -> CheckRow:
    """Try (direction, step) pairs until one agrees (ok) or one disagrees cleanly (mismatch); when
    every try is spoiled by a jump of the slope within the step, the verdict is ``kink``.

    A try that disagrees is first refined: the step shrinks tenfold while the disagreement keeps shrinking
    (a strongly curved loss, a BatchNorm over few values, needs small steps; a wrong gradient disagrees by the
    same amount at every step), down to ``MIN_STEP``. A try disagrees cleanly when its one-sided differences agree
    with each other better than the central difference agrees with the analytic value: the function is smooth
    along that step, so a kink cannot explain the error (a kink at ``x + t h v`` makes them differ by twice the
    error it causes).

    ``noise`` is the round-off of one loss value: a difference quotient over step h may be off by ``noise / h``,
    which is allowed; a try whose gradient and quotient are both within it is ``flat``."""
    dt = x0.dtype
    base = x0.astype(np.float64)
    finite = np.isfinite(base)  # a -inf of an attention mask stays put: x + h v is still -inf there
    # <g, v> has standard deviation |g| over random v: a directional derivative that cancels to
    # near zero is judged against that, not against itself
    typical = float(np.linalg.norm(np.where(finite, g, 0.0)))
    smallest = MIN_STEP[_kind(dt)]
    f0: float | None = None
    first: CheckRow | None = None
    tries = 0

    def attempt(v: np.ndarray, h: float, refining: bool = False) -> tuple[CheckRow, float, float, float]:
        nonlocal tries
        tries += 1
        xp, xm = (base + h * v).astype(dt), (base - h * v).astype(dt)
        # the step actually taken, after rounding to x's dtype (it matters in float32 and below)
        with np.errstate(invalid="ignore"):
            taken = np.where(finite, xp.astype(np.float64) - xm.astype(np.float64), 0.0)
            analytic = float(np.sum(np.where(finite, g * taken, 0.0))) / (2 * h)
        plus, minus = loss(xp), loss(xm)
        numeric = (plus - minus) / (2 * h)
        scale = max(abs(analytic), abs(numeric), typical, 1e-3)
        err = abs(analytic - numeric) / scale
        slack = noise / h  # what round-off in the loss alone does to the quotient
        row = CheckRow(x, analytic, numeric, err, True, OK, h, tries, tuple(x0.shape), dt.name, noise=slack)
        row.flat = max(abs(analytic), typical) <= slack and abs(numeric) <= 2 * slack
        # a refining try shrinks h, and noise / h with it grows: it may only agree, never be excused by round-off
        if err <= tol or (not refining and abs(analytic - numeric) <= tol * scale + slack):
            return row, plus, minus, scale
        if row.flat and not refining:
            row.ok, row.status = False, FLAT  # zero within round-off, both ways: nothing to compare
            return row, plus, minus, scale
        row.ok, row.status = False, MISMATCH  # for now: refined and classified below
        return row, plus, minus, scale

    for _ in range(directions):
        v = rng.standard_normal(x0.shape) * finite
        for h in steps:
            row, plus, minus, _scale = attempt(v, h)
            if row.status != MISMATCH:
                return row
            # refine: a disagreement that shrinks with the step is the curvature of the loss, not a wrong gradient
            gap, step = abs(row.analytic - row.numeric), h
            while step / 10 >= smallest:
                step /= 10
                finer, *_ = attempt(v, step, refining=True)
                if finer.status != MISMATCH:
                    finer.tries = tries
                    return finer
                finer_gap = abs(finer.analytic - finer.numeric)
                if finer_gap > gap / 2:  # no longer converging
                    break
                gap = finer_gap
            if f0 is None:
                f0 = loss(x0)
            forward, backward = (plus - f0) / h, (f0 - minus) / h
            row.one_sided = (forward, backward)
            row.tries = tries
            if abs(row.analytic) * smallest > STEEP * max(abs(f0), abs(plus), abs(minus), noise):
                row.status, row.note = KINK, (
                    "too steep for differences: over the smallest step the gradient predicts a change of the loss "
                    f"{STEEP:.0e} times its own size (a constant an attention mask multiplies by the float minimum, "
                    "say), so no step is in the linear regime")
                return row
            if abs(forward - backward) < abs(row.numeric - row.analytic) - row.noise:
                return row  # smooth along the step, and still wrong at every smaller step
            row.status = KINK
            first = first or row
    assert first is not None
    first.tries = tries
    if not math.isfinite(first.numeric):
        first.note = ("the loss is not finite at x +- h v for every step tried: the function is undefined next to x "
                      "(a Pow of a negative base whose exponent moves, say)")
    return first


# ---------------------------------------------------------------------------- random draws
DRAWS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli",
                   "Multinomial"})


def draw_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The top-level nodes whose outputs change from run to run: the random generators, and each Dropout whose
    training_mode input is not a constant false (a model exported for training). Central differences of such a
    model compare noise: every run draws new masks."""
    modes = {n.input[2] for n in model.graph.node if n.op_type == "Dropout" and len(n.input) > 2 and n.input[2]}
    consts = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer if t.name in modes}
    for n in model.graph.node:  # only the training_mode values are read: a large model's weights stay as they are
        if n.op_type == "Constant" and n.domain in ("", "ai.onnx") and n.output[0] in modes:
            value = next((a.t for a in n.attribute if a.name == "value"), None)
            if value is not None:
                consts[n.output[0]] = onnx.numpy_helper.to_array(value)
    out = []
    for n in model.graph.node:
        if n.domain not in ("", "ai.onnx"):
            continue
        if n.op_type in DRAWS:
            out.append(n)
        elif n.op_type == "Dropout" and len(n.input) > 2 and n.input[2]:
            training = consts.get(n.input[2])
            if training is None or bool(np.asarray(training).reshape(-1)[0]):
                out.append(n)
    return out


def _mask_name(node: onnx.NodeProto) -> str:
    return node.output[1] if len(node.output) > 1 and node.output[1] else f"{node.output[0]}__held_mask"


def record_draws(model: onnx.ModelProto, drawing: Sequence[onnx.NodeProto], feeds: Mapping[str, np.ndarray],
                 provider: str) -> dict[str, np.ndarray]:
    """One run's draws on ``feeds``: each random generator's outputs; each Dropout's output, mask (one is added
    where the node has none), ratio and training_mode."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    names: list[str] = []
    held = {n.output[0] for n in drawing}
    masks = {n.output[0]: _mask_name(n) for n in drawing if n.op_type == "Dropout"}
    for n in m.graph.node:
        if n.op_type == "Dropout" and n.output[0] in masks:
            del n.output[1:]
            n.output.append(masks[n.output[0]])
            names += [n.output[0], n.output[1], *(i for i in n.input[1:3] if i)]
        elif n.op_type in DRAWS and n.output and n.output[0] in held:
            names += [o for o in n.output if o]
    return _values(m, feeds, names, provider)


def hold_draws(model: onnx.ModelProto, drawing: Sequence[onnx.NodeProto],
               draws: Mapping[str, np.ndarray]) -> onnx.ModelProto:
    """A copy of ``model`` where ``drawing``'s nodes give the values ``draws`` recorded: a generator becomes
    Constants; a Dropout ``y = x * (mask / (1 - ratio))`` with that mask (``y = x`` where training_mode was false),
    its mask output a Constant. The gradient rules still differentiate the model's own Dropout: its mask is what
    they read."""
    held = {n.output[0]: n for n in drawing}
    m = onnx.ModelProto()
    m.CopyFrom(model)
    nodes: list[onnx.NodeProto] = []
    for n in m.graph.node:
        d = held.get(n.output[0]) if n.output and n.op_type in (*DRAWS, "Dropout") else None
        if d is None:
            nodes.append(n)
            continue
        if n.op_type != "Dropout":
            nodes += [onnx.helper.make_node("Constant", [], [o], value=onnx.numpy_helper.from_array(draws[o]))
                      for o in n.output if o]
            continue
        y = draws[n.output[0]]
        ratio = float(np.asarray(draws[n.input[1]])) if len(n.input) > 1 and n.input[1] else 0.5
        mask = np.asarray(draws[_mask_name(d)], dtype=bool)
        factor = mask / (1.0 - ratio) if bool(np.asarray(draws[n.input[2]]).reshape(-1)[0]) else np.ones(mask.shape)
        name = f"{n.output[0]}__held_factor"
        nodes += [onnx.helper.make_node("Constant", [], [name], value=onnx.numpy_helper.from_array(
                      factor.astype(y.dtype), name)),
                  onnx.helper.make_node("Mul", [n.input[0], name], [n.output[0]])]
        if len(n.output) > 1 and n.output[1]:
            nodes.append(onnx.helper.make_node("Constant", [], [n.output[1]],
                                               value=onnx.numpy_helper.from_array(mask)))
    del m.graph.node[:]
    m.graph.node.extend(nodes)
    return m


# ---------------------------------------------------------------------------- precision
FLOAT_ELEMS = frozenset({onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                         onnx.TensorProto.BFLOAT16})
_DTYPE_ATTRS = frozenset({"to", "dtype"})  # Cast's target; EyeLike, Random*, Bernoulli, Multinomial


def float_elem_types(model: onnx.ModelProto) -> set[int]:
    """The float element types of the model's inputs, outputs and initializers."""
    g = model.graph
    found = {vi.type.tensor_type.elem_type for vi in [*g.input, *g.output]}
    found |= {t.data_type for t in g.initializer}
    return found & FLOAT_ELEMS


def convert_floats(model: onnx.ModelProto, to: int = onnx.TensorProto.DOUBLE) -> onnx.ModelProto:
    """A copy computing in one float type: every float initializer, Constant / ConstantOfShape value,
    Cast target, dtype attribute and input, output and value_info type becomes ``to`` (subgraphs and
    model-local functions too). Integer and bool values are untouched."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    _convert_graph(m.graph, to)
    for f in m.functions:
        _convert_nodes(f.node, to)
        for vi in f.value_info:
            _convert_type(vi.type, to)
    opset = next((o.version for o in m.opset_import if o.domain in ("", "ai.onnx")), None)
    if opset is not None:
        _keep_fixed_float_inputs(m.graph, opset)
    return m


def _keep_fixed_float_inputs(g: onnx.GraphProto, opset: int, empty: frozenset[str] = frozenset()) -> None:
    """Cast back to float32 what an input that only takes float32 reads (Resize's and Upsample's scales): a
    converted model must stay valid (tf2onnx stores the scales as an initializer, and a float64 one broke inference
    of every value after the Resize). An empty one (Resize's scales beside its sizes) becomes an empty float32
    constant, which inference still sees is empty."""
    empty = empty | {t.name for t in g.initializer if 0 in t.dims} | {
        n.output[0] for n in g.node if n.op_type == "Constant" and n.attribute and n.attribute[0].type ==
        onnx.AttributeProto.TENSOR and 0 in n.attribute[0].t.dims}
    nodes: list[onnx.NodeProto] = []
    cast: dict[str, str] = {}  # one Cast per value, however many nodes read it
    for node in g.node:
        for a in node.attribute:
            for sub in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
                _keep_fixed_float_inputs(sub, opset, empty)
        for k in _float32_only_inputs(node, opset):
            if node.input[k] not in cast:
                cast[node.input[k]] = f"{node.input[k]}__float32"
                nodes.append(onnx.helper.make_node("Constant", [], [cast[node.input[k]]], value=onnx.numpy_helper
                                                   .from_array(np.zeros(0, np.float32))) if node.input[k] in empty
                             else onnx.helper.make_node("Cast", [node.input[k]], [cast[node.input[k]]],
                                                        to=onnx.TensorProto.FLOAT))
            node.input[k] = cast[node.input[k]]
        nodes.append(node)
    del g.node[:]
    g.node.extend(nodes)


def _float32_only_inputs(node: onnx.NodeProto, opset: int) -> list[int]:
    """Positions of the node's inputs that its schema types as float32 alone."""
    if node.domain not in ("", "ai.onnx"):
        return []
    try:
        schema = onnx.defs.get_schema(node.op_type, opset, "")
    except onnx.defs.SchemaError:
        return []
    allowed = {c.type_param_str: set(c.allowed_type_strs) for c in schema.type_constraints}
    out = []
    for k, name in enumerate(node.input):
        if not name or not schema.inputs:
            continue
        formal = schema.inputs[min(k, len(schema.inputs) - 1)]
        if allowed.get(formal.type_str, {formal.type_str}) == {"tensor(float)"}:
            out.append(k)
    return out


def _convert_tensor(t: onnx.TensorProto, to: int) -> onnx.TensorProto:
    if t.data_type not in FLOAT_ELEMS or t.data_type == to:
        return t
    array = onnx.numpy_helper.to_array(t).astype(onnx.helper.tensor_dtype_to_np_dtype(to))
    out = onnx.numpy_helper.from_array(array, t.name)
    out.doc_string = t.doc_string
    return out


def _convert_type(tp: onnx.TypeProto, to: int) -> None:
    kind = tp.WhichOneof("value")
    if kind == "tensor_type" and tp.tensor_type.elem_type in FLOAT_ELEMS:
        tp.tensor_type.elem_type = to
    elif kind == "sparse_tensor_type" and tp.sparse_tensor_type.elem_type in FLOAT_ELEMS:
        tp.sparse_tensor_type.elem_type = to
    elif kind == "sequence_type":
        _convert_type(tp.sequence_type.elem_type, to)
    elif kind == "optional_type":
        _convert_type(tp.optional_type.elem_type, to)
    elif kind == "map_type":
        _convert_type(tp.map_type.value_type, to)


def _convert_graph(g: onnx.GraphProto, to: int) -> None:
    for vi in [*g.input, *g.output, *g.value_info]:
        _convert_type(vi.type, to)
    for t in g.initializer:
        t.CopyFrom(_convert_tensor(t, to))
    for s in g.sparse_initializer:
        s.values.CopyFrom(_convert_tensor(s.values, to))
    _convert_nodes(g.node, to)


def _convert_nodes(nodes: Sequence[onnx.NodeProto], to: int) -> None:
    A = onnx.AttributeProto
    for node in nodes:
        for a in node.attribute:
            if a.type == A.TENSOR:
                a.t.CopyFrom(_convert_tensor(a.t, to))
            elif a.type == A.TENSORS:
                for t in a.tensors:
                    t.CopyFrom(_convert_tensor(t, to))
            elif a.type == A.GRAPH:
                _convert_graph(a.g, to)
            elif a.type == A.GRAPHS:
                for sub in a.graphs:
                    _convert_graph(sub, to)
            elif a.type == A.INT and a.name in _DTYPE_ATTRS and a.i in FLOAT_ELEMS:
                a.i = to
            elif a.type == A.TYPE_PROTO:
                _convert_type(a.tp, to)
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for i, a in enumerate(node.attribute):
                if a.name in ("value_float", "value_floats"):
                    value = np.asarray(a.f if a.name == "value_float" else list(a.floats))
                    tensor = onnx.numpy_helper.from_array(value.astype(onnx.helper.tensor_dtype_to_np_dtype(to)))
                    node.attribute[i].CopyFrom(onnx.helper.make_attribute("value", tensor))


def elem_name(elem: int) -> str:
    """``float64`` for TensorProto.DOUBLE (ONNX's own lower-case name where numpy has none)."""
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem).lower()


def cast_feeds(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Float feeds cast to the float type of the model input they feed (after ``convert_floats``)."""
    types = {i.name: i.type.tensor_type.elem_type for i in model.graph.input}
    out = {}
    for k, v in feeds.items():
        v = np.asarray(v)
        elem = types.get(k, 0)
        if v.dtype.kind == "f" and elem in FLOAT_ELEMS:
            v = v.astype(onnx.helper.tensor_dtype_to_np_dtype(elem))
        out[k] = v
    return out


@dataclass
class CheckReport:
    """The rows of a ``check_model`` run, the precision they were computed in and what ran them."""

    rows: list[CheckRow]
    precision: str  # "float64", "float32" (or the model's own type when asked)
    source: list[str]  # the model's float types, e.g. ["float32"]
    converted: bool  # whether the model was converted to ``precision``
    fallback: str | None  # why onnxruntime in float64 was given up, if it was
    rtol: float
    runner: str = ""  # what computed the rows: "onnxruntime (CPUExecutionProvider)", "onnx ReferenceEvaluator"
    held: list[str] = field(default_factory=list)  # the random draws sampled once and held (``draw_nodes``)

    @property
    def ok(self) -> bool:
        """No mismatch (kinks and flat rows are reported, not failures)."""
        return all(r.status != MISMATCH for r in self.rows)

    @property
    def flat(self) -> bool:
        """Every row's gradient and difference quotient zero within round-off: the loss does not move here (a
        saturated softmax, say), so agreement says little."""
        return bool(self.rows) and all(r.flat for r in self.rows)

    def next_steps(self) -> list[str]:
        """What to do about each verdict present, one line each (none when every row is ok)."""
        counts = {s: sum(1 for r in self.rows if r.status == s) for s in (KINK, FLAT, MISMATCH)}
        steps = [f"{r.x}: {r.note}: a rule on its path returns a gradient of the wrong shape (a sum over broadcast "
                 "axes missed?)" for r in self.rows if r.note and r.status == MISMATCH]
        if any(r.status == MISMATCH and not r.note for r in self.rows):
            bad = ", ".join(r.x for r in self.rows if r.status == MISMATCH and not r.note)
            if self.precision != "float64":
                steps.append(f"mismatch ({bad}) in {self.precision}: round-off may explain it; settle it in float64 "
                             "with --precision float64 --provider reference (onnx's reference evaluator runs every "
                             "op in float64)")
            else:
                steps.append(f"mismatch ({bad}) in float64: a gradient rule on the way from these xs to the ys is "
                             "wrong; check intermediate values with --xs NAME to find the first op that disagrees, "
                             "and report it with the model")
        if counts[FLAT] or self.flat:
            what = "the loss is flat here (every gradient is zero within round-off, a saturated softmax, say)" \
                if self.flat else f"{counts[FLAT]} flat (zero within round-off): nothing to compare for them"
            steps.append(f"{what}: feed other inputs (--inputs, --input) or another --seed, or pick another --ys")
        steps += [f"{r.x}: {r.note}" for r in self.rows if r.status == KINK and r.note]
        plain = sum(1 for r in self.rows if r.status == KINK and not r.note)
        if plain:
            steps.append(f"{plain} kink: no step was smooth (ReLU, max-pool, abs at a tie); rerun with "
                         "another --seed to check them at a smooth point")
        return steps


def unnamed_node_gap(e: BaseException) -> str:
    """``kernel_gap``'s line, with an unnamed node called so rather than ``node ''``."""
    return kernel_gap(e).replace("(node '')", "(an unnamed node)")


def check_model(
    model: onnx.ModelProto,
    ys: Sequence[str],
    xs: Sequence[str],
    feeds: Mapping[str, np.ndarray] | None = None,
    *,
    seed: int = 0,
    precision: str = "auto",
    provider: str = "cpu",
    rtol: float | None = None,
    directions: int = DIRECTIONS,
    progress: Progress | None = None,
    dims: int | Mapping[str, int] = CHECK_DIM,
    stop_gradients: Sequence[str] = (),
) -> CheckReport:
    """``check_gradients`` in the best precision available.

    ``precision``: ``auto`` and ``float64`` convert the model to float64 and run it on ``provider``; where that
    lacks a float64 kernel they fall back, for the whole model, to onnx's reference evaluator in float64, and
    ``auto`` then to float32 on ``provider``. ``float32`` asks for float32; ``model`` keeps the model's own types.
    Inputs that ``feeds`` leaves out get seeded random values (``onnxgrad.runtime.make_feeds``: symbolic
    dimensions of size ``dims``, 2 by default where ``run`` uses 1: a gradient that misses its sum over a broadcast
    batch axis then shows)."""
    if precision not in ("auto", "float64", "float32", "model"):
        raise ValueError(f"precision must be 'auto', 'float64', 'float32' or 'model', got {precision!r}")
    source = sorted(float_elem_types(model))
    f64, f32 = onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT
    wide = [(f64, provider)] if provider == REFERENCE else [(f64, provider), (f64, REFERENCE)]
    attempts: list[tuple[int | None, str]] = {
        "auto": [*wide, (f32, provider)],
        "float64": wide,
        "float32": [(f32, provider)],
        "model": [(None, provider)],
    }[precision]
    feeds = complete_feeds(model, feeds, seed, dims)
    fallback: str | None = None
    for k, (to, runner) in enumerate(attempts):
        converted = to is not None and any(s != to for s in source)
        m = convert_floats(model, to) if converted and to is not None else model
        try:
            rows = check_gradients(m, ys, xs, cast_feeds(m, feeds), seed=seed, rtol=rtol, provider=runner,
                                   directions=directions, progress=progress, stop_gradients=stop_gradients)
        except Exception as e:
            last = k + 1 == len(attempts)
            if not last and (is_runtime_error(e) or runner == REFERENCE):
                why = unnamed_node_gap(e) if is_runtime_error(e) else f"the reference evaluator failed: {one_line(e)}"
                fallback = why if fallback is None else f"{fallback}; {why}"
                continue
            raise
        name = elem_name(to) if to is not None else (elem_name(source[0]) if len(source) == 1 else "mixed")
        tol = rtol if rtol is not None else RTOL.get(name, RTOL["float32"])
        return CheckReport(rows, name, [elem_name(s) for s in source], converted, fallback, tol,
                           provider_label(runner) if runner == REFERENCE else f"onnxruntime ({provider_label(runner)})",
                           [f"{n.op_type} '{n.name or n.output[0]}'" for n in draw_nodes(model)])
    raise AssertionError("unreachable")
