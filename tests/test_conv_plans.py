"""Which form a windowed op's gradient takes, and why (``onnxgrad/plans``).

Every plan says whether it applies and, where not, why: the tables pin, per rule case, the plan taken and the
reason each plan before it gave; a spy on the chooser shows the rule takes that same plan (the central-difference
checks in test_rules.py then cover every form's values). The fusion table pins when a Conv is differentiated
together with the per-channel factor after it, and checks that fused and unfused gradients agree. MaxPool's
scatter form trusts each runtime's Indices: two runtimes must agree."""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxgrad
from onnxgrad import plans, runtime
from onnxgrad.check import check_gradients
from onnxgrad.emitter import Emitter, attr
from onnxgrad.geometry import conv_transpose_window, conv_window, pool_window
from tests.cases.conv import CASES, away, distinct, offsets, r
from tests.cases.sampling import CASES as SAMPLING
from tests.gradcheck import Case, assert_gradients_match, build, provider_for
from tests.gradcheck import rng_array as _r
from tests.graphs import Graph, N
from tests.graphs import build as build_graph
from tests.graphs import run as run_graph

# cases for reasons no rule case reaches (their values are checked below too)
EXTRA = [
    # W outweighs the activations, so im2col is preferred; but strided 1-D taps need Slice steps (opset 10)
    Case("Conv", [r(1, 2, 9, seed=1), r(20, 2, 3, seed=2)], attrs={"strides": [2]}, opset=9,
         id="1d-strided-wide-opset9"),
    # a begin pad past the kernel's reach: the flipped Conv would need a negative pad
    Case("Conv", [r(2, 2, 4, 4, seed=1), r(3, 2, 1, 1, seed=2)], attrs={"pads": [1, 0, 0, 1]}, id="1x1-padded"),
    # a kernel of more taps than the flipped dX reverses by one MatMul: one Gather per axis instead
    Case("Conv", [r(1, 2, 70, seed=1), r(3, 2, 66, seed=2)], attrs={"pads": [2, 1]}, id="long-kernel"),
]
ALL_CASES = CASES + EXTRA


@dataclass(frozen=True)
class Row:
    """The plan of ``table`` that rule case (op, id) takes, and a phrase of each earlier plan's reason."""

    op: str
    id: str
    table: str
    taken: str
    reasons: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return f"{self.op}-{self.id or 'default'}-{self.table}"


GROUPED = "grouped conv"
STRIDED = "strided"
MANY = "more than one window"
NO_SCATTER = "no ScatterElements at this opset"
NO_ADD = "reduction='add' (overlapping windows)"

STATIC_N = "the batch is static"

ROWS = [
    # Conv dW: interleaved, else (a batch known only at run time that decides) an If on it between interleaved and
    # im2col + Gemm, else im2col + Gemm, else the grouped Conv of X^T
    Row("Conv", "bias", "WEIGHT_GRAD", "interleaved"),
    Row("Conv", "1d-stride-leftover", "WEIGHT_GRAD", "interleaved"),
    Row("Conv", "same-upper", "WEIGHT_GRAD", "interleaved"),
    Row("Conv", "3d-valid", "WEIGHT_GRAD", "interleaved"),
    Row("Conv", "strided-opset9", "WEIGHT_GRAD", "interleaved"),
    Row("Conv", "wide-weight-gemm", "WEIGHT_GRAD", "gemm",
        {"interleaved": "W outweighs the activations", "by_batch": STATIC_N}),
    Row("Conv", "1x1-gemm", "WEIGHT_GRAD", "gemm", {"interleaved": "unstrided 1x1 kernel", "by_batch": STATIC_N}),
    Row("Conv", "dilated-phases-gemm", "WEIGHT_GRAD", "gemm", {"interleaved": "dilated", "by_batch": STATIC_N}),
    Row("Conv", "group-dilate", "WEIGHT_GRAD", "grouped",
        {"interleaved": GROUPED, "by_batch": STATIC_N, "gemm": GROUPED}),
    Row("Conv", "depthwise", "WEIGHT_GRAD", "grouped", {"interleaved": GROUPED, "by_batch": STATIC_N, "gemm": GROUPED}),
    Row("Conv", "1d-strided-wide-opset9", "WEIGHT_GRAD", "grouped",
        {"interleaved": "W outweighs the activations", "by_batch": STATIC_N, "gemm": "2-D only"}),
    Row("ConvTranspose", "output-padding", "WEIGHT_GRAD", "interleaved"),
    Row("ConvTranspose", "3d", "WEIGHT_GRAD", "interleaved"),
    Row("ConvTranspose", "dilated-output-padding", "WEIGHT_GRAD", "gemm",
        {"interleaved": "dilated", "by_batch": STATIC_N}),
    Row("ConvTranspose", "group-same-lower", "WEIGHT_GRAD", "grouped",
        {"interleaved": GROUPED, "by_batch": STATIC_N, "gemm": GROUPED}),
    # Conv dX: the flipped-kernel Conv for stride 1, else ConvTranspose
    Row("Conv", "bias", "INPUT_GRAD", "flipped"),
    Row("Conv", "wide-weight-gemm", "INPUT_GRAD", "flipped"),
    Row("Conv", "long-kernel", "INPUT_GRAD", "flipped"),
    Row("Conv", "same-lower", "INPUT_GRAD", "transpose", {"flipped": STRIDED}),
    Row("Conv", "stride-gt-kernel", "INPUT_GRAD", "transpose", {"flipped": STRIDED}),
    Row("Conv", "depthwise", "INPUT_GRAD", "transpose", {"flipped": STRIDED}),
    Row("Conv", "depthwise-7x7", "INPUT_GRAD", "flipped"),
    Row("Conv", "group-unstrided", "INPUT_GRAD", "flipped"),
    Row("Conv", "depthwise-multiplier-dilated", "INPUT_GRAD", "flipped"),
    Row("Conv", "1x1-padded", "INPUT_GRAD", "transpose", {"flipped": "wider than the kernel's reach"}),
    # a window sum's adjoint: one broadcast Mul for one window over the whole input, else ConvTranspose
    Row("AveragePool", "one-window", "SPREAD", "broadcast"),
    Row("AveragePool", "pads-include", "SPREAD", "transpose", {"broadcast": MANY}),
    Row("AveragePool", "3d", "SPREAD", "transpose", {"broadcast": MANY}),
    Row("LpPool", "p3-pads", "SPREAD", "transpose", {"broadcast": MANY}),
    # MaxPool: one ScatterElements through the Indices where the opset has it, else gather + ConvTranspose
    Row("MaxPool", "tiling-one-row", "MAX_POOL", "scatter"),
    Row("MaxPool", "scatter-add-ceil-dilate", "MAX_POOL", "scatter"),
    Row("MaxPool", "scatter-own-indices", "MAX_POOL", "scatter"),
    Row("MaxPool", "", "MAX_POOL", "gather", {"scatter": NO_SCATTER}),
    Row("MaxPool", "tiling-opset9", "MAX_POOL", "gather", {"scatter": NO_SCATTER}),
    Row("MaxPool", "same-lower", "MAX_POOL", "gather", {"scatter": NO_ADD}),
    Row("MaxPool", "storage-order", "MAX_POOL", "gather", {"scatter": NO_ADD}),
]


def _case(row: Row) -> Case:
    (case,) = [c for c in ALL_CASES if (c.op, c.id) == (row.op, row.id)]
    return case


def _plan_args(table: str, em: Emitter, node: ir.Node) -> tuple[Any, ...]:
    """What the rule for ``node`` hands the plans of ``table`` (the node's output stands in for dY: only its
    shape matters to the choice)."""
    x, y = node.inputs[0], node.outputs[0]
    assert x is not None
    if table == "MAX_POOL":
        return em, node, x, y, pool_window(node, x)[0]
    if table == "SPREAD":
        return em, y, pool_window(node, x)[0], 1.0
    w, group = node.inputs[1], attr(node, "group", 1)
    assert w is not None
    if node.op_type == "ConvTranspose":  # Conv's weight gradient with the roles of X and dY swapped
        return em, y, x, conv_transpose_window(node, x, w), group, w
    win = conv_window(node, x, w)
    return (em, x, y, win, group, w) if table == "WEIGHT_GRAD" else (em, y, w, win, group)


def _explain(row: Row) -> dict[str, str | None]:
    model, _, _, _ = build(_case(row))
    graph = ir.serde.deserialize_model(model).graph
    (node,) = [n for n in graph if n.op_type == row.op]
    table: Mapping[str, plans.Plan] = getattr(plans, row.table)
    return plans.explain(table, *_plan_args(row.table, Emitter(graph, _case(row).opset, "test"), node))


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_each_plan_says_why_it_does_not_apply(row: Row) -> None:
    reasons = _explain(row)
    assert row.taken in reasons and reasons[row.taken] is None, reasons
    earlier = list(reasons)[: list(reasons).index(row.taken)]
    assert sorted(row.reasons) == sorted(earlier), f"the table gives no reason for some plan before {row.taken}"
    for plan, phrase in row.reasons.items():
        why = reasons[plan]
        assert why is not None and phrase in why, (plan, why)


@pytest.mark.parametrize("row", ROWS, ids=lambda row: row.name)
def test_the_rule_takes_the_first_plan_that_applies(row: Row, monkeypatch: pytest.MonkeyPatch) -> None:
    """A spy on the chooser: what the rule itself took, for the gradient the table is about."""
    table = getattr(plans, row.table)
    taken: list[str] = []

    def spy(candidates: Mapping[str, plans.Plan], *args: Any) -> tuple[str, ir.Value]:
        name, value = plans.choose(candidates, *args)
        if candidates is table:
            taken.append(name)
        return name, value

    monkeypatch.setattr(plans.conv, "choose", spy)
    monkeypatch.setattr(plans.pool, "choose", spy)
    model, ys, xs, _ = build(_case(row))
    wrt = [xs[1]] if row.table == "WEIGHT_GRAD" else [xs[0]]
    onnxgrad.add_gradients(model, ys, wrt)
    assert taken == [row.taken]


@pytest.mark.parametrize("case", EXTRA, ids=lambda c: c.name)
def test_extra_plan_cases_match_central_differences(case: Case) -> None:
    assert_gradients_match(case)


@pytest.mark.parametrize("case", [c for c in CASES if c.op == "MaxPool"], ids=lambda c: c.name)
def test_max_pool_routing_agrees_across_runtimes(case: Case) -> None:
    """The scatter form trusts each runtime's MaxPool Indices (flat, row-major, first maximum): onnxruntime and
    onnx's reference evaluator must route dY to the same elements."""
    model, ys, xs, feeds = build(case)
    aug = onnxgrad.add_gradients(model, ys, xs)
    names = [n for n in aug.gradients.values() if n is not None]
    got = {p: runtime.run(aug.model, feeds, names, provider=p) for p in ("cpu", "reference")}
    for name in names:
        np.testing.assert_allclose(got["reference"][name], got["cpu"][name], rtol=1e-6, atol=1e-6)


# ------------------------------------------------------------------ run-time spatial sizes
RESIZABLE = {"Conv", "ConvTranspose", "AveragePool", "MaxPool", "LpPool", "GlobalAveragePool", "GlobalMaxPool",
             "GlobalLpPool"}
GROWTHS = [(1, 2, 3), (2, 3, 1), (3, 1, 2), (5, 4, 4)]  # per spatial axis: every remainder modulo the strides


def _resized(case: Case, growth: tuple[int, ...]) -> np.ndarray:
    """The case's first input grown along its spatial axes, drawn as the case draws it."""
    x = np.asarray(case.inputs[0])
    shape = (*x.shape[:2], *(n + g for n, g in zip(x.shape[2:], growth, strict=False)))
    if case.op in ("MaxPool", "GlobalMaxPool"):
        return distinct(*shape, seed=7)
    if case.op in ("LpPool", "GlobalLpPool"):
        return away(*shape, seed=7)
    return r(*shape, seed=7)


def _spatial_only(case: Case) -> tuple[onnx.ModelProto, list[str], list[str], dict[str, np.ndarray]]:
    """The case with X's batch and spatial sizes known only at run time and every other input (the weight) of
    static shape, as an exported model has it: the dW plans then see W (test_rules.py's run leaves W's first
    dimension open too, which takes the grouped plan)."""
    model, ys, xs, feeds = build(case, dynamic="spatial")
    for v in model.graph.input[1:]:
        if v.name in feeds:
            for d, n in zip(v.type.tensor_type.shape.dim, feeds[v.name].shape, strict=True):
                d.ClearField("dim_param")
                d.dim_value = n
    return model, ys, xs, feeds


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.op in RESIZABLE and "output_shape" not in c.attrs], ids=lambda c: c.name)
def test_one_gradient_graph_serves_every_spatial_size(case: Case) -> None:
    """With H and W known only at run time, the graph built once is right at other sizes too: odd and even,
    every remainder modulo the strides (output_padding against the run-time size, pads of SAME, divisors)."""
    model, ys, xs, feeds = _spatial_only(case)
    for growth in GROWTHS:
        sized = {**feeds, xs[0]: _resized(case, growth)}
        rows = check_gradients(model, ys, xs, sized, seed=case.seed, eps=case.eps, rtol=case.rtol,
                               provider=provider_for(case))
        bad = [f"{r.x}: {r.analytic:.6g} vs {r.numeric:.6g}" for r in rows if not r.ok]
        assert not bad, f"{case.name} grown by {growth}: " + "; ".join(bad)


@pytest.mark.parametrize(
    "case", [c for c in CASES if c.op in RESIZABLE and "output_shape" not in c.attrs and c.opset <= 26],
    ids=lambda c: c.name)
def test_the_run_time_graph_agrees_with_the_static_one_in_onnxruntime(case: Case) -> None:
    """onnxruntime (float32) runs the run-time-size graph at each size, and its gradients are the static graph's
    built for that size (output_padding stride - 1, run-time Slices and pads are accepted as the checker's
    float64 run took them)."""
    model, ys, xs, feeds = _spatial_only(case)
    aug = onnxgrad.add_gradients(model, ys, xs)
    for growth in GROWTHS:
        x = _resized(case, growth)
        sized = dataclasses.replace(case, inputs=[x, *case.inputs[1:]])
        fixed, fys, fxs, fixed_feeds = build(sized)
        ref = onnxgrad.add_gradients(fixed, fys, fxs)
        got = runtime.run(aug.model, {**feeds, xs[0]: x}, [aug.gradients[v] for v in xs])
        want = runtime.run(ref.model, fixed_feeds, [ref.gradients[v] for v in fxs])
        for v, fv in zip(xs, fxs, strict=True):
            np.testing.assert_allclose(got[aug.gradients[v]], want[ref.gradients[fv]], rtol=1e-5, atol=1e-5,
                                       err_msg=f"{case.name} grown by {growth}: {v}")


def _deform_inputs(case: Case, growth: tuple[int, ...]) -> list[Any]:
    """A DeformConv case's inputs for its image grown by ``growth``: offsets and mask drawn for the new output."""
    x, w = np.asarray(case.inputs[0]), np.asarray(case.inputs[1])
    size = [n + g for n, g in zip(x.shape[2:], growth, strict=False)]
    k, rank = w.shape[2:], len(size)
    pads = case.attrs.get("pads", [0] * 2 * rank)
    out = [(n + pads[a] + pads[a + rank] - case.attrs.get("dilations", [1] * rank)[a] * (k[a] - 1) - 1)
           // case.attrs.get("strides", [1] * rank)[a] + 1 for a, n in enumerate(size)]
    taps = int(np.prod(k)) * case.attrs.get("offset_group", 1)
    grown = [r(*x.shape[:2], *size, seed=7), w, offsets(x.shape[0], taps * rank, *out, seed=8), *case.inputs[3:4]]
    if len(case.inputs) > 4:
        grown.append(_r(x.shape[0], taps, *out, seed=9, low=0.2, high=1.0, dtype=np.float32))
    return grown


SAMPLED = [c for c in CASES if c.op == "DeformConv"] + [c for c in SAMPLING if c.op in ("RoiAlign", "MaxRoiPool")]


@pytest.mark.parametrize("case", SAMPLED, ids=lambda c: c.name)
def test_sampled_windows_serve_every_size(case: Case) -> None:
    """DeformConv, RoiAlign and MaxRoiPool over run-time image sizes: right at other sizes than the built one."""
    model, ys, xs, feeds = build(case, dynamic="spatial")
    names = [f"in{i}" for i in range(len(case.inputs))]
    if case.op == "DeformConv":  # offsets and mask follow the output's size, as a Conv of X would give them
        for v in [*model.graph.input[1:], *model.graph.output]:
            for k, d in enumerate(v.type.tensor_type.shape.dim):
                if k >= 2 and v.name != "in1":
                    d.dim_param = f"S{k}_{v.name}"
    for growth in GROWTHS[:2]:
        if case.op == "DeformConv":
            grown = _deform_inputs(case, growth)
        else:
            x = np.asarray(case.inputs[0])
            grown = [r(*x.shape[:2], *(n + g for n, g in zip(x.shape[2:], growth, strict=False)), seed=7)
                     .astype(x.dtype)]
        sized = {**feeds, **{n: v for n, v in zip(names, grown, strict=False) if n in feeds and v is not None}}
        rows = check_gradients(model, ys, xs, sized, seed=case.seed, eps=case.eps, rtol=case.rtol,
                               provider=provider_for(case))
        bad = [f"{r.x}: {r.analytic:.6g} vs {r.numeric:.6g}" for r in rows if not r.ok]
        assert not bad, f"{case.name} grown by {growth}: " + "; ".join(bad)


DROPPING = [  # ceil_mode with an end pad: at odd sizes the last window would start in the end pad and is dropped
    Case("AveragePool", [r(2, 2, 5, 6)], attrs={"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1],
         "ceil_mode": 1}, opset=19, id="ceil-drop"),
    Case("AveragePool", [r(2, 2, 5, 6)], attrs={"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1],
         "ceil_mode": 1, "count_include_pad": 1}, opset=19, id="ceil-drop-include"),
    Case("MaxPool", [distinct(2, 2, 5, 6)], attrs={"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1],
         "ceil_mode": 1}, opset=10, id="ceil-drop-windows"),
    Case("LpPool", [away(2, 2, 5, 6)], attrs={"kernel_shape": [2, 2], "strides": [2, 2], "pads": [1, 1, 1, 1],
         "ceil_mode": 1}, opset=18, id="ceil-drop"),
]


@pytest.mark.parametrize("case", DROPPING, ids=lambda c: c.name)
def test_ceil_mode_windows_that_start_in_the_end_pad(case: Case) -> None:
    """onnxruntime drops a ceil_mode window that would start in the end pad (onnx's shape inference counts it, so
    only run-time sizes can show it): the windows found in the end pads are cut to dY's own count."""
    model, ys, xs, feeds = build(case, dynamic="spatial")
    for growth in [(0, 0), (1, 1), (2, 3)]:
        sized = {**feeds, xs[0]: _resized(case, growth)}
        rows = check_gradients(model, ys, xs, sized, seed=case.seed, eps=case.eps, rtol=case.rtol)
        bad = [f"{r.x}: {r.analytic:.6g} vs {r.numeric:.6g}" for r in rows if not r.ok]
        assert not bad, f"{case.name} grown by {growth}: " + "; ".join(bad)


DYNAMIC_ROWS = [
    # over run-time sizes no static index table: the one-hot Conv of the windows before ScatterElements
    Row("MaxPool", "", "MAX_POOL", "windows", {"scatter": NO_SCATTER, "gather": "run time"}),
    Row("MaxPool", "same-lower", "MAX_POOL", "windows", {"scatter": NO_ADD, "gather": "run time"}),
    Row("MaxPool", "scatter-tiling-pads", "MAX_POOL", "scatter"),
    # an unknown output size is taken to outweigh W: the interleaved Conv, but im2col + Gemm for 1x1
    Row("Conv", "wide-weight-gemm", "WEIGHT_GRAD", "interleaved"),
    Row("Conv", "1x1-gemm", "WEIGHT_GRAD", "gemm",
        {"interleaved": "unstrided 1x1 kernel", "by_batch": "would for every batch (run-time sizes)"}),
    Row("Conv", "stride-gt-kernel", "INPUT_GRAD", "transpose", {"flipped": STRIDED}),
    Row("Conv", "bias", "INPUT_GRAD", "flipped"),
    Row("AveragePool", "one-window", "SPREAD", "transpose", {"broadcast": MANY}),
]


@pytest.mark.parametrize("row", DYNAMIC_ROWS, ids=lambda row: row.name)
def test_plans_over_run_time_sizes(row: Row) -> None:
    model, _, _, _ = build(_case(row), dynamic="spatial")
    graph = ir.serde.deserialize_model(model).graph
    (node,) = [n for n in graph if n.op_type == row.op]
    em = Emitter(graph, _case(row).opset, "test")
    x, y = node.inputs[0], node.outputs[0]
    assert x is not None
    if row.table in ("MAX_POOL", "SPREAD"):
        win = pool_window(node, x, em)[0]
        args: tuple[Any, ...] = (em, node, x, y, win) if row.table == "MAX_POOL" else (em, y, win, 1.0)
    else:
        w = node.inputs[1]
        assert w is not None
        w.shape = ir.Shape(np.shape(_case(row).inputs[1]))  # a weight's shape is static (the harness leaves M open)
        win = conv_window(node, x, w, em)
        args = (em, x, y, win, 1, w) if row.table == "WEIGHT_GRAD" else (em, y, w, win, 1)
    assert not win.static
    reasons = plans.explain(getattr(plans, row.table), *args)
    assert reasons[row.taken] is None, reasons
    earlier = list(reasons)[: list(reasons).index(row.taken)]
    assert sorted(row.reasons) == sorted(earlier)
    for plan, phrase in row.reasons.items():
        why = reasons[plan]
        assert why is not None and phrase in why, (plan, why)


def test_same_with_strides_over_run_time_sizes_needs_opset_11() -> None:
    """Before Pad took its pads as an input, auto_pad SAME over run-time sizes cannot be differentiated: a
    clear error naming the node, the op and what must be static."""
    case = Case("Conv", [r(1, 2, 5, 6, seed=1), r(3, 2, 3, 3, seed=2)], attrs={"auto_pad": "SAME_UPPER",
                "strides": [2, 2]}, opset=10, id="same-opset10")
    model, ys, xs, _ = build(case, dynamic="spatial")
    with pytest.raises(ValueError, match=r"Conv '.*': auto_pad SAME_UPPER with strides \[2, 2\] over spatial sizes "
                       r"known only at run time .*opset >= 11"):
        onnxgrad.add_gradients(model, ys, xs)


# ------------------------------------------------------------------ fusions
RNG = np.random.default_rng(3)


def _u(*shape: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(np.float32)


PARAMS = {"x": _u(2, 3, 6, 6), "w": _u(4, 3, 3, 3), "b": _u(4), "scale": _u(4, low=0.5, high=1.5), "B": _u(4),
          "mean": _u(4, low=-0.3, high=0.3), "var": _u(4, low=0.5, high=1.5), "s": _u(4, 1, 1, low=0.5, high=1.5),
          "t": _u(2, 4, 4, 4), "heavy": _u(64, 3, 3, 3)}
CONV = N("z", "Conv", "x", "w", "b")
BN = N("y", "BatchNormalization", "z", "scale", "B", "mean", "var")
ALL_XS = ("x", "w", "b", "scale", "B", "mean", "var")


@dataclass(frozen=True)
class FusionRow:
    """A graph, what is differentiated, and the fusion each BatchNormalization or Mul ends: None where it
    applies, else a phrase of the reason."""

    id: str
    nodes: list[N]
    xs: tuple[str, ...]
    want: dict[str, str | None]
    outputs: tuple[str, ...] = ("y",)
    stop: tuple[str, ...] = ()
    opset: int = 15


FUSION_ROWS = [
    FusionRow("bn", [CONV, BN], ALL_XS, {"y": None}),
    FusionRow("bn-frozen", [CONV, BN], ("x", "w", "b"), {"y": None}),
    FusionRow("bn-weight-not-wanted", [CONV, BN], ("x", "scale", "B"), {"y": "weight gradient is not wanted"}),
    FusionRow("bn-weight-heavy", [N("z", "Conv", "x", "heavy", strides=[3, 3]),
                                  N("y", "BatchNormalization", "z", "s64", "B64", "m64", "v64")],
              ("x", "heavy"), {"y": "W has more values"}),
    FusionRow("bn-conv-output-read-twice", [CONV, BN, N("zr", "Relu", "z")], ALL_XS, {"y": "other readers"},
              outputs=("y", "zr")),
    FusionRow("bn-conv-output-is-an-output", [CONV, BN], ALL_XS, {"y": "graph output"}, outputs=("y", "z")),
    FusionRow("bn-training", [CONV, N(("y", "rm", "rv"), "BatchNormalization", "z", "scale", "B", "mean", "var",
                                      training_mode=1)], ("x", "w"), {"y": "not an inference"}),
    FusionRow("bn-spatial-0", [CONV, N("y", "BatchNormalization", "z", "sa", "Ba", "ma", "va", spatial=0)],
              ("x", "w"), {"y": "not an inference"}, opset=7),
    FusionRow("bn-after-relu", [CONV, N("zr", "Relu", "z"), N("y", "BatchNormalization", "zr", "scale", "B",
                                                               "mean", "var")], ALL_XS, {"y": "not fed by a Conv"}),
    FusionRow("mul-per-channel", [CONV, N("y", "Mul", "z", "s")], ("x", "w", "b", "s"), {"y": None}),
    FusionRow("mul-per-channel-first", [CONV, N("y", "Mul", "s", "z")], ("x", "s"), {"y": None}),
    FusionRow("mul-full-size", [CONV, N("y", "Mul", "z", "t")], ("x", "w", "t"), {"y": "not one per output channel"}),
    FusionRow("mul-stopped", [CONV, N("y", "Mul", "z", "s")], ("x", "w", "s"), {"y": "the Conv is not differentiated"},
              stop=("z",)),
]


def _fusion_graph(row: FusionRow) -> Graph:
    extra = {}
    for suffix, shape in (("64", (64,)), ("a", (4, 4, 4))):  # 64 channels; per activation (spatial=0)
        extra |= {"s" + suffix: _u(*shape, low=0.5, high=1.5), "B" + suffix: _u(*shape),
                  "m" + suffix: _u(*shape, low=-0.3, high=0.3), "v" + suffix: _u(*shape, low=0.5, high=1.5)}
    used = {i for n in row.nodes for i in n.inputs}
    values = {k: v for k, v in {**PARAMS, **extra}.items() if k in used}
    return Graph(row.nodes, inputs={"x": values.pop("x")}, inits=values, outputs=list(row.outputs), opset=row.opset)


@dataclass
class Differentiated:
    grads: dict[str, np.ndarray]  # x -> its gradient
    seen: list[dict[str, str | None]]  # what plans.explain_fusions said, once per walk
    kernel_scaled: bool  # the gradient part multiplies the Conv's weight (by the factor moved onto it)


@contextmanager
def _fusion_spy() -> Iterator[tuple[pytest.MonkeyPatch, list[dict[str, str | None]]]]:
    """A patch context in which every walk records what each fusion said (``plans.explain_fusions``) in ``seen``."""
    seen: list[dict[str, str | None]] = []
    real = plans.fusions

    def spy(ctx: Any, path: Any) -> list[plans.Fusion]:
        seen.append(plans.explain_fusions(ctx, path))
        return real(ctx, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plans, "fusions", spy)
        yield patch, seen


def _differentiate(row: FusionRow) -> Differentiated:
    g = _fusion_graph(row)
    model = build_graph(g)
    rng = np.random.default_rng(5)  # the same seeds on every call
    outs = run_graph(model, g.feeds, list(row.outputs))
    seeds = [rng.uniform(-1, 1, outs[o].shape).astype(np.float32) for o in row.outputs]
    with _fusion_spy() as (_, seen):
        aug = onnxgrad.add_gradients(model, list(row.outputs), list(row.xs), grad_ys=seeds,
                                     stop_gradients=list(row.stop))
    names = [aug.gradients[x] for x in row.xs]
    got = run_graph(aug.model, g.feeds, [n for n in names if n is not None])
    weight = row.nodes[0].inputs[1]
    added = aug.model.graph.node[len(model.graph.node):]
    return Differentiated({x: got[n] for x, n in zip(row.xs, names, strict=True) if n is not None}, seen,
                          any(n.op_type == "Mul" and weight in n.input for n in added))


@pytest.mark.parametrize("row", FUSION_ROWS, ids=lambda row: row.id)
def test_each_fusion_says_why_it_does_not_apply(row: FusionRow) -> None:
    out = _differentiate(row)
    assert len(out.seen) == 1, out.seen
    assert out.seen[0].keys() == row.want.keys(), out.seen
    for node, phrase in row.want.items():
        why = out.seen[0][node]
        assert (why is None) if phrase is None else (why is not None and phrase in why), (node, why)
    assert out.kernel_scaled == (None in row.want.values()), "the walk did not differentiate the fusion it named"


@pytest.mark.parametrize("row", [r for r in FUSION_ROWS if None in r.want.values()], ids=lambda row: row.id)
def test_fused_gradients_equal_the_unfused_ones(row: FusionRow, monkeypatch: pytest.MonkeyPatch) -> None:
    """A fusion is exact: the same gradients as the Conv rule and the BatchNormalization or Mul rule apart."""
    fused = _differentiate(row).grads
    monkeypatch.setattr(plans, "fusions", lambda ctx, path: [])
    apart = _differentiate(row).grads
    assert fused.keys() == apart.keys() == set(row.xs)
    for x in row.xs:
        np.testing.assert_allclose(fused[x], apart[x], rtol=2e-4, atol=2e-4 * float(np.abs(apart[x]).max()), err_msg=x)


@pytest.mark.parametrize("row", [r for r in FUSION_ROWS if r.id in ("bn", "mul-per-channel")], ids=lambda r: r.id)
@pytest.mark.parametrize("conv", [{}, {"strides": [2, 2], "auto_pad": "SAME_UPPER"}], ids=["plain", "same-strided"])
def test_fusions_over_run_time_sizes(row: FusionRow, conv: dict[str, Any]) -> None:
    """With H and W known only at run time the Conv output is taken to outweigh W, so the factor moves onto the
    kernel; the gradients at several sizes are those of the Conv and BatchNormalization (or Mul) rules apart."""
    nodes = [N("z", "Conv", "x", "w", "b", **conv), *row.nodes[1:]]
    g = _fusion_graph(dataclasses.replace(row, nodes=nodes))
    model = build_graph(g)
    dims = model.graph.input[0].type.tensor_type.shape.dim
    dims[2].dim_param, dims[3].dim_param = "h", "w"
    for v in model.graph.output:
        v.type.tensor_type.ClearField("shape")
    del model.graph.value_info[:]
    model = onnx.shape_inference.infer_shapes(model)
    with _fusion_spy() as (patch, seen):
        fused = onnxgrad.add_gradients(model, list(row.outputs), list(row.xs))
        patch.setattr(plans, "fusions", lambda ctx, path: [])
        apart = onnxgrad.add_gradients(model, list(row.outputs), list(row.xs))
    assert seen == [{"y": None}]
    for size in [(6, 6), (9, 7)]:
        feeds = {"x": _u(2, 3, *size)}
        a = run_graph(fused.model, feeds, [fused.gradients[x] for x in row.xs])
        b = run_graph(apart.model, feeds, [apart.gradients[x] for x in row.xs])
        for x in row.xs:
            want = b[apart.gradients[x]]
            np.testing.assert_allclose(a[fused.gradients[x]], want, rtol=2e-4, atol=2e-4 * float(np.abs(want).max()),
                                       err_msg=f"{x} at {size}")



@pytest.mark.parametrize("size", [(9, 10), (10, 11), (11, 12), (12, 9)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_run_time_sizes_compute_no_more_rows_than_the_static_graph(size: tuple[int, int]) -> None:
    """A stride-2 conv over run-time H and W (pads 1, 3x3): the weight gradient's Conv yields exactly the kernel's
    taps (X end-padded or cut at run time, as the static graph pads it), and the input gradient's ConvTranspose
    S - spill rows, spill = S + begin - (s * (m - 1) + k) in [-1, 0] (output_padding 0, end pad 0), not S + 1 -
    spill; the gradients match the static graph's."""
    x_info = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3, "h", "w"])
    y_info = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    w = onnx.numpy_helper.from_array(_r(4, 3, 3, 3, seed=2).astype(np.float32), "W")
    node = onnx.helper.make_node("Conv", ["x", "W"], ["y"], strides=[2, 2], pads=[1, 1, 1, 1])
    graph = onnx.helper.make_graph([node], "conv", [x_info], [y_info], [w])
    model = onnx.shape_inference.infer_shapes(onnx.helper.make_model(graph, opset_imports=[
        onnx.helper.make_opsetid("", 17)], ir_version=8))
    aug = onnxgrad.add_gradients(model, ["y"], ["x", "W"])
    inner = [n for n in aug.model.graph.node if n.op_type in ("Conv", "ConvTranspose") and n.output[0] != "y"]
    assert sorted(n.op_type for n in inner) == ["Conv", "ConvTranspose"]
    probe = onnx.ModelProto()
    probe.CopyFrom(aug.model)
    probe.graph.output.extend(onnx.helper.make_tensor_value_info(n.output[0], onnx.TensorProto.FLOAT, None)
                              for n in inner)
    x = _r(2, 3, *size, seed=1).astype(np.float32)
    got = runtime.run(probe, {"x": x})
    for n in inner:
        out = got[n.output[0]].shape[2:]
        if n.op_type == "Conv":  # the interleaved layout: taps (kh, kw * C)
            assert out == (3, 3 * 3), out
        else:
            m = [(s + 2 - 3) // 2 + 1 for s in size]
            spill = [s + 1 - (2 * (k - 1) + 3) for s, k in zip(size, m, strict=True)]
            assert out == tuple(s - p for s, p in zip(size, spill, strict=True)), (out, size, spill)
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for d, v in zip(fixed.graph.input[0].type.tensor_type.shape.dim[2:], size, strict=True):
        d.ClearField("dim_param")
        d.dim_value = v
    ref = onnxgrad.add_gradients(onnx.shape_inference.infer_shapes(fixed), ["y"], ["x", "W"])
    want = runtime.run(ref.model, {"x": x})
    for v in ("x", "W"):
        np.testing.assert_allclose(got[aug.gradients[v]], want[ref.gradients[v]], rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------ a batch known only at run time
def _conv_model(batch: int | str, kernel: int, stride: int, m: int, size: tuple[int, int]) -> onnx.ModelProto:
    """One Conv (pads kernel // 2) of x (batch, 3, *size) with a weight initializer W (m, 3, k, k)."""
    x_info = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, 3, *size])
    y_info = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    w = onnx.numpy_helper.from_array(_r(m, 3, kernel, kernel, seed=2).astype(np.float32), "W")
    node = onnx.helper.make_node("Conv", ["x", "W"], ["y"], strides=[stride] * 2, pads=[kernel // 2] * 4)
    graph = onnx.helper.make_graph([node], "conv", [x_info], [y_info], [w])
    return onnx.shape_inference.infer_shapes(onnx.helper.make_model(graph, opset_imports=[
        onnx.helper.make_opsetid("", 17)], ir_version=8))


@dataclass(frozen=True)
class BatchRow:
    """A Conv whose batch is symbolic: the dW plan taken, each earlier plan's reason (a phrase), the batch sizes
    to check it at."""

    kernel: int
    stride: int
    m: int
    size: tuple[int, int]
    taken: str
    reasons: dict[str, str]

    @property
    def name(self) -> str:
        return f"{self.kernel}x{self.kernel}-s{self.stride}-M{self.m}-{self.size[0]}x{self.size[1]}-{self.taken}"


BATCH_ROWS = [
    BatchRow(1, 1, 4, (7, 6), "gemm", {"interleaved": "unstrided 1x1", "by_batch": "unstrided 1x1"}),
    BatchRow(3, 1, 4, (7, 6), "interleaved", {}),
    BatchRow(3, 2, 4, (7, 6), "interleaved", {}),
    BatchRow(1, 2, 4, (7, 6), "interleaved", {}),
    # out < M: im2col + Gemm for N * out < M (N = 1 here), the interleaved Conv from N = 2 on
    BatchRow(3, 1, 20, (4, 3), "by_batch", {"interleaved": "W outweighs the activations"}),
    BatchRow(3, 2, 20, (5, 6), "by_batch", {"interleaved": "W outweighs the activations"}),
]


@pytest.mark.parametrize("row", BATCH_ROWS, ids=lambda row: row.name)
def test_weight_gradient_under_a_symbolic_batch(row: BatchRow) -> None:
    """dW with the batch known only at run time (an export's dynamic_axes={'x': {0: 'batch'}}) and with it static:
    the plan taken and why not the earlier ones; central differences at batch sizes 1, 2 and 3 from the one
    symbolic-batch graph (both branches of by_batch's If); no Slice that copies all of X^T for a 1x1 tap
    (onnxruntime drops one itself only where every size is static)."""
    taken: list[str] = []

    def spy(candidates: Mapping[str, plans.Plan], *args: Any) -> tuple[str, ir.Value]:
        name, value = plans.choose(candidates, *args)
        if candidates is plans.WEIGHT_GRAD:
            taken.append(name)
            reasons = plans.explain(candidates, *args)
            for plan, phrase in row.reasons.items():
                why = reasons[plan]
                assert why is not None and phrase in why, (plan, why)
            assert sorted(row.reasons) == sorted(list(reasons)[: list(reasons).index(name)])
        return name, value

    symbolic = _conv_model("N", row.kernel, row.stride, row.m, row.size)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(plans.conv, "choose", spy)
        graph = onnxgrad.add_gradients(symbolic, ["y"], ["W"]).model.graph
    assert taken == [row.taken]
    assert row.taken != "gemm" or not [n for n in graph.node if n.op_type == "Slice"]
    assert (row.taken == "by_batch") == any(n.op_type == "If" for n in graph.node)
    for batch, model in [(2, _conv_model(2, row.kernel, row.stride, row.m, row.size)),
                         *[(b, symbolic) for b in (1, 2, 3)]]:
        feeds = {"x": _r(batch, 3, *row.size, seed=batch).astype(np.float32)}
        rows = check_gradients(model, ["y"], ["W"], feeds, seed=batch)
        bad = [f"{r.x}: {r.analytic:.6g} vs {r.numeric:.6g}" for r in rows if not r.ok]
        assert not bad, f"batch {batch} ({model.graph.input[0].type.tensor_type.shape.dim[0]}): " + "; ".join(bad)


def test_by_batch_agrees_with_the_static_graph_at_every_batch() -> None:
    """by_batch's If runs im2col + Gemm while N * out < M and the interleaved Conv after (onnxruntime, float32):
    both give the static graph's dW at each batch size."""
    row = BATCH_ROWS[4]
    aug = onnxgrad.add_gradients(_conv_model("N", row.kernel, row.stride, row.m, row.size), ["y"], ["W"])
    (node,) = [n for n in aug.model.graph.node if n.op_type == "If"]
    branches = {a.name: {n.op_type for n in a.g.node} for a in node.attribute}
    assert "Gemm" in branches["then_branch"] and "Conv" not in branches["then_branch"], branches
    assert "Conv" in branches["else_branch"] and "Gemm" not in branches["else_branch"], branches
    for batch in (1, 2, 5):  # out = 12, M = 20: the Gemm at N = 1 only
        x = _r(batch, 3, *row.size, seed=batch).astype(np.float32)
        ref = onnxgrad.add_gradients(_conv_model(batch, row.kernel, row.stride, row.m, row.size), ["y"], ["W"])
        want = runtime.run(ref.model, {"x": x})[ref.gradients["W"]]
        got = runtime.run(aug.model, {"x": x})[aug.gradients["W"]]
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_by_batch_for_a_conv_transpose() -> None:
    """ConvTranspose's dW runs the same plans with X and dY swapped: with W (20, 3, 3, 3) over a 2x3 input, N * 6 <
    20 up to N = 3 (im2col + Gemm), the interleaved Conv after; central differences on both sides, from one graph."""
    x_info = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 20, 2, 3])
    y_info = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)
    w = onnx.numpy_helper.from_array(_r(20, 3, 3, 3, seed=2).astype(np.float32), "W")
    node = onnx.helper.make_node("ConvTranspose", ["x", "W"], ["y"], strides=[2, 2], pads=[1, 0, 0, 1],
                                 output_padding=[1, 0])
    graph = onnx.helper.make_graph([node], "convt", [x_info], [y_info], [w])
    model = onnx.shape_inference.infer_shapes(onnx.helper.make_model(graph, opset_imports=[
        onnx.helper.make_opsetid("", 17)], ir_version=8))
    aug = onnxgrad.add_gradients(model, ["y"], ["W"])
    assert [n.op_type for n in aug.model.graph.node].count("If") == 1
    for batch in (1, 4):
        rows = check_gradients(model, ["y"], ["W"], {"x": _r(batch, 20, 2, 3, seed=batch).astype(np.float32)},
                               seed=batch)
        bad = [f"{r.x}: {r.analytic:.6g} vs {r.numeric:.6g}" for r in rows if not r.ok]
        assert not bad, f"batch {batch}: " + "; ".join(bad)
