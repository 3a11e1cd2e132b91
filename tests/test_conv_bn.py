"""Conv followed by an inference-mode BatchNormalization, differentiated together (``plans/conv_fusions.py``):
BN's sum(dY * X) comes from the Conv's weight gradient instead of reading X (so onnxruntime can fuse Conv+BN
in the forward part), and BN's per-channel factor moves onto the Conv's kernel. Every gradient is compared with
PyTorch autograd on the same weights, and each case pins whether the gradient part reads the Conv output (why
the fusion does or does not apply is pinned in test_conv_plans.py)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest

import onnxgrad
from tests.graphs import Graph, N, build, run

torch = pytest.importorskip("torch")
F = torch.nn.functional

RNG = np.random.default_rng(11)


def _r(*shape: int, low: float = -1.0, high: float = 1.0) -> np.ndarray:
    return RNG.uniform(low, high, shape).astype(np.float32)


@dataclass
class ConvBN:
    id: str
    x: tuple[int, ...]
    w: tuple[int, ...]
    conv: dict[str, Any] = field(default_factory=dict)
    bias: bool = True
    relu: bool = False
    also_relu_of_z: bool = False  # the conv output feeds a second op: X must be read
    xs: tuple[str, ...] = ("x", "w", "b", "scale", "B", "mean", "var")
    fused: bool = True  # the gradient part does not read the conv output


CASES = [
    ConvBN("bias-pad", (2, 3, 6, 6), (4, 3, 3, 3), {"pads": [1, 1, 1, 1]}),
    ConvBN("no-bias-stride", (2, 3, 11, 11), (5, 3, 3, 3), {"strides": [2, 2]}, bias=False,
           xs=("x", "w", "scale", "B", "mean", "var")),
    ConvBN("grouped-relu", (2, 4, 5, 5), (6, 2, 3, 3), {"group": 2, "pads": [1, 0, 1, 0]}, relu=True),
    ConvBN("1x1", (1, 8, 4, 4), (16, 8, 1, 1), {}, relu=True),
    ConvBN("weight-not-wanted", (2, 3, 6, 6), (4, 3, 3, 3), {}, xs=("x", "scale", "B"), fused=False),
    ConvBN("weight-heavy", (1, 8, 3, 3), (16, 8, 3, 3), {"pads": [1, 1, 1, 1]}, fused=False),
    ConvBN("conv-output-shared", (2, 3, 6, 6), (4, 3, 3, 3), {}, also_relu_of_z=True, fused=False),
]


def _graph(c: ConvBN) -> tuple[Graph, dict[str, np.ndarray]]:
    m = c.w[0]
    values = {"x": _r(*c.x), "w": _r(*c.w), "b": _r(m), "scale": _r(m, low=0.5, high=1.5), "B": _r(m),
              "mean": _r(m, low=-0.3, high=0.3), "var": _r(m, low=0.5, high=1.5)}
    conv_in = ["x", "w", "b"] if c.bias else ["x", "w"]
    nodes = [N("z", "Conv", *conv_in, **c.conv), N("y", "BatchNormalization", "z", "scale", "B", "mean", "var")]
    outputs = ["y"]
    if c.relu:
        nodes.append(N("r", "Relu", "y"))
        outputs = ["r"]
    if c.also_relu_of_z:
        nodes.append(N("zr", "Relu", "z"))
        outputs.append("zr")
    inits = {k: v for k, v in values.items() if k != "x" and (c.bias or k != "b")}
    return Graph(nodes, inputs={"x": values["x"]}, inits=inits, outputs=outputs, opset=15), values


def _torch_grads(c: ConvBN, values: dict[str, np.ndarray], seeds: list[np.ndarray]) -> dict[str, np.ndarray]:
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in values.items()}
    pads = c.conv.get("pads", [0, 0, 0, 0])
    xp = F.pad(t["x"], (pads[1], pads[3], pads[0], pads[2]))
    z = F.conv2d(xp, t["w"], t["b"] if c.bias else None, stride=c.conv.get("strides", [1, 1]),
                 groups=c.conv.get("group", 1))
    def per_channel(v: Any) -> Any:
        return v.reshape(1, -1, 1, 1)

    # inference BatchNormalization written out (torch's batch_norm does not differentiate the running stats)
    y = (z - per_channel(t["mean"])) / torch.sqrt(per_channel(t["var"]) + 1e-5) * per_channel(t["scale"]) \
        + per_channel(t["B"])
    outs = [F.relu(y) if c.relu else y] + ([F.relu(z)] if c.also_relu_of_z else [])
    total = sum((o * torch.tensor(s, dtype=torch.float64)).sum() for o, s in zip(outs, seeds, strict=True))
    grads = torch.autograd.grad(total, [t[k] for k in c.xs])
    return {k: g.numpy() for k, g in zip(c.xs, grads, strict=True)}


@pytest.mark.parametrize("c", CASES, ids=lambda c: c.id)
def test_conv_bn_gradients_match_torch(c: ConvBN) -> None:
    g, values = _graph(c)
    model = build(g)
    outs = list(g.outputs)
    forward = run(model, g.feeds, outs)
    seeds = [_r(*forward[o].shape) for o in outs]
    aug = onnxgrad.add_gradients(model, outs, list(c.xs), grad_ys=seeds)
    onnx.checker.check_model(aug.model, full_check=True)
    names = [aug.gradients[x] for x in c.xs]
    got = run(aug.model, g.feeds, names)  # type: ignore[arg-type]
    want = _torch_grads(c, values, seeds)
    for x, name in zip(c.xs, names, strict=True):
        ref = want[x]
        np.testing.assert_allclose(got[name], ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()), err_msg=x)
    added = aug.model.graph.node[len(model.graph.node):]
    readers = [n.op_type for n in added if "z" in n.input]
    assert (not readers) == c.fused, readers
    # BN's sum(W * dW') and the Conv's dW share one weight gradient: one product for dX, one for dW
    products = [n.op_type for n in added if n.op_type in ("Conv", "ConvTranspose", "Gemm")]
    assert len(products) == (2 if "w" in c.xs else 1), products


def _random_cases(count: int, seed: int) -> list[ConvBN]:
    """Seeded random geometries: groups, strides, uneven pads, with and without bias and ReLU."""
    rng = np.random.default_rng(seed)
    cases = []
    for i in range(count):
        group = int(rng.choice([1, 1, 2]))
        c, m = group * int(rng.integers(1, 4)), group * int(rng.integers(1, 4))
        k = [int(v) for v in rng.integers(1, 4, 2)]
        pads = [int(rng.integers(0, kk)) for kk in k] + [int(rng.integers(0, kk)) for kk in k]
        strides = [int(v) for v in rng.integers(1, 3, 2)]
        x = (int(rng.integers(1, 4)), c, *[int(v) for v in rng.integers(max(k), 9, 2)])
        out = [(x[2 + a] + pads[a] + pads[2 + a] - k[a]) // strides[a] + 1 for a in range(2)]
        fused = m * (c // group) * k[0] * k[1] <= x[0] * m * out[0] * out[1]
        cases.append(ConvBN(f"random-{i}", x, (m, c // group, *k),
                            {"group": group, "pads": pads, "strides": strides, "kernel_shape": k},
                            bias=bool(rng.integers(0, 2)), relu=bool(rng.integers(0, 2)), fused=fused))
        if not cases[-1].bias:
            cases[-1].xs = ("x", "w", "scale", "B", "mean", "var")
    return cases


@pytest.mark.parametrize("c", _random_cases(24, seed=5), ids=lambda c: c.id)
def test_random_conv_bn_geometries_match_torch(c: ConvBN) -> None:
    test_conv_bn_gradients_match_torch(c)


@pytest.mark.parametrize("scale_shape", [(4, 1, 1), (1, 4, 1, 1)], ids=["m11", "1m11"])
def test_per_channel_scale_after_conv_moves_onto_the_kernel(scale_shape: tuple[int, ...]) -> None:
    """Conv -> Mul by a per-channel scale (no BatchNormalization), differentiated together: s moves into the
    Conv's kernel and weight gradient; every gradient still matches torch, the scale's included."""
    values = {"x": _r(2, 3, 6, 6), "w": _r(4, 3, 3, 3), "s": _r(*scale_shape, low=0.5, high=1.5)}
    g = Graph([N("z", "Conv", "x", "w", pads=[1, 1, 1, 1]), N("y", "Mul", "z", "s")],
              inputs={"x": values["x"]}, inits={"w": values["w"], "s": values["s"]}, opset=15)
    model = build(g)
    seed = _r(2, 4, 6, 6)
    aug = onnxgrad.add_gradients(model, ["y"], ["x", "w", "s"], grad_ys=[seed])
    got = run(aug.model, g.feeds, [aug.gradients[k] for k in ("x", "w", "s")])  # type: ignore[misc]
    t = {k: torch.tensor(v, dtype=torch.float64, requires_grad=True) for k, v in values.items()}
    y = F.conv2d(t["x"], t["w"], padding=1) * t["s"]
    want = torch.autograd.grad((y * torch.tensor(seed, dtype=torch.float64)).sum(), [t["x"], t["w"], t["s"]])
    for k, ref in zip(("x", "w", "s"), want, strict=True):
        ref = ref.numpy()
        np.testing.assert_allclose(got[aug.gradients[k]], ref, rtol=1e-4, atol=1e-4 * float(np.abs(ref).max()))
    kernels = [n for n in aug.model.graph.node[len(model.graph.node):] if n.op_type == "Mul" and "w" in n.input]
    assert kernels, "the scale was not moved onto the kernel"
