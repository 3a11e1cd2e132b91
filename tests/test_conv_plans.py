"""Which form a windowed op's gradient takes, and why (``onnxgrad/plans``).

Every plan says whether it applies and, where not, why: the tables pin, per rule case, the plan taken and the
reason each plan before it gave; a spy on the chooser shows the rule takes that same plan (the central-difference
checks in test_rules.py then cover every form's values). The fusion table pins when a Conv is differentiated
together with the per-channel factor after it, and checks that fused and unfused gradients agree. MaxPool's
scatter form trusts each runtime's Indices: two runtimes must agree."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx_ir as ir
import pytest

import onnxgrad
from onnxgrad import plans, runtime
from onnxgrad.emitter import Emitter, attr
from onnxgrad.geometry import conv_transpose_window, conv_window, pool_window
from tests.cases.conv import CASES, r
from tests.gradcheck import Case, assert_gradients_match, build
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

ROWS = [
    # Conv dW: interleaved, else im2col + Gemm, else the grouped Conv of X^T
    Row("Conv", "bias", "WEIGHT_GRAD", "interleaved"),
    Row("Conv", "1d-stride-leftover", "WEIGHT_GRAD", "interleaved"),
    Row("Conv", "same-upper", "WEIGHT_GRAD", "interleaved"),
    Row("Conv", "3d-valid", "WEIGHT_GRAD", "interleaved"),
    Row("Conv", "strided-opset9", "WEIGHT_GRAD", "interleaved"),
    Row("Conv", "wide-weight-gemm", "WEIGHT_GRAD", "gemm", {"interleaved": "W outweighs the activations"}),
    Row("Conv", "1x1-gemm", "WEIGHT_GRAD", "gemm", {"interleaved": "unstrided 1x1 kernel"}),
    Row("Conv", "dilated-phases-gemm", "WEIGHT_GRAD", "gemm", {"interleaved": "dilated"}),
    Row("Conv", "group-dilate", "WEIGHT_GRAD", "grouped", {"interleaved": GROUPED, "gemm": GROUPED}),
    Row("Conv", "depthwise", "WEIGHT_GRAD", "grouped", {"interleaved": GROUPED, "gemm": GROUPED}),
    Row("Conv", "1d-strided-wide-opset9", "WEIGHT_GRAD", "grouped",
        {"interleaved": "W outweighs the activations", "gemm": "2-D only"}),
    Row("ConvTranspose", "output-padding", "WEIGHT_GRAD", "interleaved"),
    Row("ConvTranspose", "3d", "WEIGHT_GRAD", "interleaved"),
    Row("ConvTranspose", "dilated-output-padding", "WEIGHT_GRAD", "gemm", {"interleaved": "dilated"}),
    Row("ConvTranspose", "group-same-lower", "WEIGHT_GRAD", "grouped", {"interleaved": GROUPED, "gemm": GROUPED}),
    # Conv dX: the flipped-kernel Conv for stride 1, else ConvTranspose
    Row("Conv", "bias", "INPUT_GRAD", "flipped"),
    Row("Conv", "wide-weight-gemm", "INPUT_GRAD", "flipped"),
    Row("Conv", "same-lower", "INPUT_GRAD", "transpose", {"flipped": STRIDED}),
    Row("Conv", "stride-gt-kernel", "INPUT_GRAD", "transpose", {"flipped": STRIDED}),
    Row("Conv", "depthwise", "INPUT_GRAD", "transpose", {"flipped": GROUPED}),
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


def _differentiate(row: FusionRow) -> Differentiated:
    g = _fusion_graph(row)
    model = build_graph(g)
    rng = np.random.default_rng(5)  # the same seeds on every call
    outs = run_graph(model, g.feeds, list(row.outputs))
    seeds = [rng.uniform(-1, 1, outs[o].shape).astype(np.float32) for o in row.outputs]
    seen: list[dict[str, str | None]] = []
    real = plans.fusions

    def spy(ctx: Any, path: Any) -> list[plans.Fusion]:
        seen.append(plans.explain_fusions(ctx, path))
        return real(ctx, path)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plans, "fusions", spy)
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
