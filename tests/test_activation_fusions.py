"""The GELU that exporters write out op by op (plans/activation_fusions.py), differentiated as one function of x:
where the fusion applies, against torch.autograd in float64 and against the node-by-node rules; the gradient reads
x alone, so onnxruntime fuses the forward pattern into its Gelu (erf) or FastGelu (tanh) kernel; where it does not
apply, it says why and the node-by-node gradient is the same."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxgrad
from onnxgrad import plans
from tests.graphs import Graph, N, build, run

RNG = np.random.default_rng(11)
F32 = np.float32
X = RNG.uniform(-3, 3, (4, 6)).astype(F32)
W = RNG.uniform(-1, 1, (6, 5)).astype(F32)
SQRT2 = np.array(np.sqrt(2.0), F32)
SEED = RNG.uniform(-1, 1, (4, 5)).astype(F32)


def _gelu(inner: N, prod: tuple[str, str] = ("h", "s"), half_first: bool = False, add_first: bool = False) -> list[N]:
    """h = x W, then y = (h * (erf(inner) + 1)) * 0.5 with the factors in the orders given."""
    return [N("h", "MatMul", "x", "w"), inner, N("e", "Erf", "t"),
            N("s", "Add", *(("one", "e") if add_first else ("e", "one"))), N("a", "Mul", *prod),
            N("y", "Mul", *(("half", "a") if half_first else ("a", "half")))]


def _gelu_tanh(cube: Sequence[N], half_inside: bool = False) -> list[N]:
    """h = x W, then y = 0.5 h (1 + tanh(k (h + a h^3))): (h * s) * 0.5 as PyTorch writes it, or (0.5 * h) * s as
    Hugging Face's gelu_new does; the cube h^3 as given."""
    tail = [N("q", "Mul", "half", "h"), N("y", "Mul", "q", "s")] if half_inside else \
        [N("p", "Mul", "h", "s"), N("y", "Mul", "half", "p")]
    return [N("h", "MatMul", "x", "w"), *cube, N("a", "Mul", "A", "h3"), N("b", "Add", "h", "a"),
            N("kb", "Mul", "K", "b"), N("t", "Tanh", "kb"), N("s", "Add", "one", "t"), *tail]


@dataclass(frozen=True)
class Row:
    id: str
    nodes: Sequence[N]
    why: str | None  # None: the fusion applies; else a phrase of its reason not to
    outputs: tuple[str, ...] = ("y",)
    tanh: bool = False  # the tanh approximation (else erf)


CONSTS = {"one": np.array(1.0, F32), "half": np.array(0.5, F32), "c": SQRT2, "r": np.array(1 / np.sqrt(2.0), F32),
          "three": np.array(3.0, F32), "A": np.array(0.044715, F32), "K": np.array(np.sqrt(2 / np.pi), F32)}
ROWS = [
    Row("pytorch", _gelu(N("t", "Div", "h", "c")), None),
    Row("other-orders", _gelu(N("t", "Div", "h", "c"), prod=("s", "h"), half_first=True, add_first=True), None),
    # forms onnxruntime does not fuse: the node-by-node gradient (the same values)
    Row("reciprocal", _gelu(N("t", "Mul", "r", "h")), "not a GELU onnxruntime fuses"),
    Row("other-divisor", _gelu(N("t", "Div", "h", "three")), "not a GELU onnxruntime fuses"),
    Row("x-times-half-first", [N("h", "MatMul", "x", "w"), N("t", "Div", "h", "c"), N("e", "Erf", "t"),
                               N("s", "Add", "e", "one"), N("q", "Mul", "h", "half"), N("y", "Mul", "s", "q")], None),
    # the tanh approximation: onnxruntime fuses Hugging Face's gelu_new form alone (x^3 a Pow, x * 0.5 first)
    Row("tanh-hf-pow", _gelu_tanh([N("h3", "Pow", "h", "three")], half_inside=True), None, tanh=True),
    Row("tanh-hf-other-orders", [N("h", "MatMul", "x", "w"), N("h3", "Pow", "h", "three"), N("a", "Mul", "h3", "A"),
                                 N("b", "Add", "a", "h"), N("kb", "Mul", "b", "K"), N("t", "Tanh", "kb"),
                                 N("s", "Add", "t", "one"), N("q", "Mul", "h", "half"), N("y", "Mul", "s", "q")],
        None, tanh=True),
    Row("tanh-pytorch", _gelu_tanh([N("h2", "Mul", "h", "h"), N("h3", "Mul", "h", "h2")]),
        "not a GELU onnxruntime fuses"),
    Row("tanh-pow-half-last", _gelu_tanh([N("h3", "Pow", "h", "three")]), "not a GELU onnxruntime fuses"),
    Row("tanh-other-number", [N("h", "MatMul", "x", "w"), N("h3", "Pow", "h", "three"), N("a", "Mul", "h3", "r"),
                              N("b", "Add", "h", "a"), N("kb", "Mul", "K", "b"), N("t", "Tanh", "kb"),
                              N("s", "Add", "one", "t"), N("q", "Mul", "half", "h"), N("y", "Mul", "q", "s")],
        "not a GELU onnxruntime fuses"),
    Row("inner-value-read", [*_gelu(N("t", "Div", "h", "c")), N("z", "Add", "y", "e")], "other readers",
        outputs=("z",)),
    Row("not-x-inside", [N("h", "MatMul", "x", "w"), N("g", "Tanh", "h"), N("t", "Div", "g", "c"),
                         N("e", "Erf", "t"), N("s", "Add", "e", "one"), N("a", "Mul", "h", "s"),
                         N("y", "Mul", "a", "half")], "not a GELU onnxruntime fuses"),
]


def _graph(row: Row) -> Graph:
    used = {i for n in row.nodes for i in n.inputs}
    return Graph(row.nodes, inputs={"x": X}, inits={"w": W}, consts={k: v for k, v in CONSTS.items() if k in used},
                 outputs=list(row.outputs))


def _grads(row: Row, fused: bool = True) -> tuple[onnx.ModelProto, dict[str, np.ndarray], list[dict[str, str | None]]]:
    g = _graph(row)
    seen: list[dict[str, str | None]] = []
    real = plans.fusions

    def spy(ctx: object, path: object) -> list[plans.Fusion]:
        seen.append(plans.explain_fusions(ctx, path))  # type: ignore[arg-type]
        return real(ctx, path) if fused else []  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plans, "fusions", spy)
        aug = onnxgrad.add_gradients(build(g), list(row.outputs), ["x", "w"], grad_ys=[SEED])
    names = [aug.gradients["x"], aug.gradients["w"]]
    got = run(aug.model, g.feeds, names)  # type: ignore[arg-type]
    return aug.model, {"x": got[names[0]], "w": got[names[1]]}, seen  # type: ignore[index]


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_gelu_fusion_applies_or_says_why(row: Row) -> None:
    _, _, seen = _grads(row)
    reasons = [why for found in seen for name, why in found.items() if name == "y"]
    assert len(reasons) == 1, seen
    assert reasons[0] is None if row.why is None else (reasons[0] is not None and row.why in reasons[0]), reasons


@pytest.mark.parametrize("row", ROWS, ids=lambda r: r.id)
def test_gelu_gradient_equals_the_node_by_node_one_and_torch(row: Row) -> None:
    _, fused, _ = _grads(row)
    _, apart, _ = _grads(row, fused=False)
    for k in ("x", "w"):
        np.testing.assert_allclose(fused[k], apart[k], rtol=1e-5, atol=1e-6, err_msg=k)
    if row.why is None:
        torch = pytest.importorskip("torch")
        x = torch.tensor(X, dtype=torch.float64, requires_grad=True)
        w = torch.tensor(W, dtype=torch.float64, requires_grad=True)
        h = x @ w
        if row.tanh:
            y = 0.5 * h * (1 + torch.tanh(float(CONSTS["K"]) * (h + float(CONSTS["A"]) * h ** 3)))
        else:
            y = h * (torch.erf(h / float(SQRT2)) + 1) * 0.5
        y.backward(torch.tensor(SEED, dtype=torch.float64))
        np.testing.assert_allclose(fused["x"], x.grad.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(fused["w"], w.grad.numpy(), rtol=1e-5, atol=1e-5)


def test_the_forward_keeps_onnxruntimes_gelu_kernel(tmp_path: object) -> None:
    """The gradient reads x alone (not x / sqrt(2), erf, x^3 or tanh), so onnxruntime's optimizer still fuses the
    forward's nodes into one Gelu (FastGelu); node by node it cannot. (y is read by a Relu: onnxruntime does not fuse
    a tanh GELU whose y is a graph output.)"""
    def gelus(model: onnx.ModelProto) -> int:
        opts = ort.SessionOptions()
        path = f"{tmp_path}/opt.onnx"
        opts.optimized_model_filepath = path
        ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        return sum(n.op_type in ("Gelu", "FastGelu") for n in onnx.load(path).graph.node)

    for row in ROWS:
        if row.why is None:
            read = Row(row.id, [*row.nodes, N("z", "Relu", "y")], None, ("z",), row.tanh)
            fused, _, _ = _grads(read)
            apart, _, _ = _grads(read, fused=False)
            assert (gelus(fused), gelus(apart)) == (1, 0), row.id


def test_gelu_numbers_that_are_differentiated_keep_their_gradients() -> None:
    """PyTorch's dynamo exporter at opset 18 writes GELU with its numbers (sqrt(2), 1, 0.5) as initializers, so
    ``@weights`` differentiates them too: the fusion, which holds them constant, declines, and every gradient
    equals torch's in float64 (before, d/d sqrt(2) read 0.018 where it is 0.137, in a dynamo-exported ViT)."""
    torch = pytest.importorskip("torch")
    row = ROWS[0]
    g = _graph(row)
    g = Graph(row.nodes, inputs={"x": X}, inits={"w": W, **g.consts}, outputs=list(row.outputs))
    names = ["x", "w", "c", "one", "half"]
    seen: list[dict[str, str | None]] = []
    real = plans.fusions

    def spy(ctx: object, path: object) -> list[plans.Fusion]:
        seen.append(plans.explain_fusions(ctx, path))  # type: ignore[arg-type]
        return real(ctx, path)  # type: ignore[arg-type]

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(plans, "fusions", spy)
        aug = onnxgrad.add_gradients(build(g), ["y"], names, grad_ys=[SEED])
    assert any(why is not None and "itself differentiated" in why for found in seen for why in found.values()), seen
    got = run(aug.model, g.feeds, [aug.gradients[k] for k in names])  # type: ignore[misc]
    t = {k: torch.tensor(np.asarray(v, np.float64), requires_grad=True)
         for k, v in {"x": X, "w": W, "c": SQRT2, "one": CONSTS["one"], "half": CONSTS["half"]}.items()}
    h = t["x"] @ t["w"]
    (h * (torch.erf(h / t["c"]) + t["one"]) * t["half"]).backward(torch.tensor(SEED, dtype=torch.float64))
    for k in names:
        np.testing.assert_allclose(got[aug.gradients[k]], t[k].grad.numpy(), rtol=1e-4, atol=1e-4, err_msg=k)


@pytest.mark.parametrize("row", [r for r in ROWS if r.why is None], ids=lambda r: r.id)
def test_gelu_fusion_differentiates_again(row: Row) -> None:
    """The fused gradient is ordinary ops: its own gradient (the Hessian times ones, order 2) is torch's in
    float64."""
    torch = pytest.importorskip("torch")
    g = _graph(row)
    aug = onnxgrad.add_gradients(build(g), ["y"], ["x"], order=2)
    got = run(aug.model, {**g.feeds, "gradients_order2/x_v": np.ones_like(X)}, ["gradients_order2/x_grad"])
    x = torch.tensor(X, dtype=torch.float64, requires_grad=True)
    h = x @ torch.tensor(W, dtype=torch.float64)
    if row.tanh:
        y = 0.5 * h * (1 + torch.tanh(float(CONSTS["K"]) * (h + float(CONSTS["A"]) * h ** 3)))
    else:
        y = h * (torch.erf(h / float(SQRT2)) + 1) * 0.5
    (dx,) = torch.autograd.grad(y.sum(), x, create_graph=True)
    (hv,) = torch.autograd.grad(dx.sum(), x)
    np.testing.assert_allclose(got["gradients_order2/x_grad"], hv.numpy(), rtol=1e-4, atol=1e-4)
