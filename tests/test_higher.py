"""Second and higher derivatives: Hessian-vector products, Jacobians, third order, ONNX's Gradient op."""

from __future__ import annotations

import io
import os
import warnings

import numpy as np
import onnx
import onnx.numpy_helper
import onnx_ir as ir
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh

import onnxgrad
import onnxgrad.check
from onnxgrad.higher import hessian_vector_product, jacobian, lower_gradient_ops
from onnxgrad.runtime import run

SIMPLE = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data", "simple")


def _model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[str],
           inits: list[onnx.TensorProto] | None = None, opset: int = 17) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", inputs, [oh.make_value_info(o, onnx.TypeProto()) for o in outputs], inits or [])
    m = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=8)
    return onnx.shape_inference.infer_shapes(m)


def _read(path: str) -> np.ndarray:
    t = onnx.TensorProto()
    with open(path, "rb") as f:
        t.ParseFromString(f.read())
    return onnx.numpy_helper.to_array(t)


@pytest.mark.parametrize("name", ["test_gradient_of_add", "test_gradient_of_add_and_mul"])
def test_lower_reference_gradient_models(name: str) -> None:
    case = os.path.join(SIMPLE, name)
    model = ir.load(os.path.join(case, "model.onnx"))
    assert lower_gradient_ops(model) == 1
    proto = ir.serde.serialize_model(model)
    onnx.checker.check_model(proto, full_check=True)
    assert all(n.domain != "ai.onnx.preview.training" for n in proto.graph.node)
    feeds = {i.name: _read(os.path.join(case, "test_data_set_0", f"input_{k}.pb"))
             for k, i in enumerate(proto.graph.input)}
    got = run(proto, feeds)
    for k, out in enumerate(proto.graph.output):
        expected = _read(os.path.join(case, "test_data_set_0", f"output_{k}.pb"))
        np.testing.assert_array_equal(got[out.name], expected)


def test_lower_command_writes_a_runnable_model(tmp_path: object) -> None:
    from onnxgrad.cli import main

    case = os.path.join(SIMPLE, "test_gradient_of_add_and_mul")
    out = os.path.join(str(tmp_path), "lowered.onnx")
    with pytest.raises(SystemExit) as done:
        main(["lower", os.path.join(case, "model.onnx"), "-o", out])
    assert done.value.code == 0
    proto = onnx.load(out)
    feeds = {i.name: _read(os.path.join(case, "test_data_set_0", f"input_{k}.pb"))
             for k, i in enumerate(proto.graph.input)}
    got = run(proto, feeds)
    np.testing.assert_array_equal(got["dd_da"], _read(os.path.join(case, "test_data_set_0", "output_1.pb")))


def _mlp64() -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w1, w2 = rng.standard_normal((3, 5)), rng.standard_normal((5, 2))
    return _model(
        [oh.make_node("MatMul", ["x", "W1"], ["h"]), oh.make_node("Tanh", ["h"], ["a"]),
         oh.make_node("MatMul", ["a", "W2"], ["o"]), oh.make_node("Sigmoid", ["o"], ["s"]),
         oh.make_node("ReduceSum", ["s"], ["loss"], keepdims=0)],
        [oh.make_tensor_value_info("x", TP.DOUBLE, ["N", 3])], ["loss"],
        [onnx.numpy_helper.from_array(w1, "W1"), onnx.numpy_helper.from_array(w2, "W2")],
    )


def test_hvp_matches_central_differences_of_the_gradient() -> None:
    proto = _mlp64()
    xs = ["x", "W1", "W2"]
    m = ir.serde.deserialize_model(proto)
    hv = hessian_vector_product(m, "loss", xs)
    grads = onnxgrad.gradients(m, "loss", xs, name="first")
    for n in [*hv, *grads]:
        m.graph.outputs.append(onnxgrad.api.value_table(m.graph)[n])  # type: ignore[index]
    aug = ir.serde.serialize_model(m)
    onnx.checker.check_model(aug, full_check=True)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((4, 3))
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in proto.graph.initializer}
    point = {"x": x, **inits}
    vs = {k: rng.standard_normal(point[k].shape) for k in xs}
    feeds = {"x": x, **{f"hvp_v/{k}": vs[k] for k in xs}}
    got = run(aug, feeds)
    # central differences of the first-order gradient along v (all xs moved together)
    h = 1e-5

    def grad_at(sign: float) -> list[np.ndarray]:
        moved = {k: point[k] + sign * h * vs[k] for k in xs}
        cut = onnxgrad.check.cut_at(aug, ["W1", "W2"])
        out = run(cut, {**feeds, **moved}, grads)  # type: ignore[arg-type]
        return [out[g] for g in grads]  # type: ignore[index]

    plus, minus = grad_at(1.0), grad_at(-1.0)
    for name, p, q in zip(hv, plus, minus, strict=True):
        np.testing.assert_allclose(got[name], (p - q) / (2 * h), rtol=1e-6, atol=1e-7)


def test_third_order_matches_closed_form() -> None:
    """f(x) = sum(x^4 + exp(x)): f''' = 24 x + exp(x), elementwise."""
    proto = _model(
        [oh.make_node("Pow", ["x", "four"], ["p"]), oh.make_node("Exp", ["x"], ["e"]),
         oh.make_node("Add", ["p", "e"], ["s"]), oh.make_node("ReduceSum", ["s"], ["f"], keepdims=0)],
        [oh.make_tensor_value_info("x", TP.DOUBLE, ["N"])], ["f"],
        [onnx.numpy_helper.from_array(np.array(4.0), "four")],
    )
    m = ir.serde.deserialize_model(proto)
    (g1,) = onnxgrad.gradients(m, "f", "x")
    (g2,) = onnxgrad.gradients(m, g1, "x")
    (g3,) = onnxgrad.gradients(m, g2, "x")
    m.graph.outputs.extend(onnxgrad.api.value_table(m.graph)[n] for n in (g1, g2, g3))  # type: ignore[index]
    out = run(ir.serde.serialize_model(m), {"x": np.linspace(-1.0, 1.5, 6)})
    x = np.linspace(-1.0, 1.5, 6)
    np.testing.assert_allclose(out[g1], 4 * x**3 + np.exp(x), rtol=1e-12)  # type: ignore[index]
    np.testing.assert_allclose(out[g2], 12 * x**2 + np.exp(x), rtol=1e-12)  # type: ignore[index]
    np.testing.assert_allclose(out[g3], 24 * x + np.exp(x), rtol=1e-12)  # type: ignore[index]


def test_jacobian_of_a_linear_map_is_its_matrix() -> None:
    w = np.arange(6.0).reshape(2, 3) - 2.5
    proto = _model(
        [oh.make_node("MatMul", ["W", "x"], ["y"])],
        [oh.make_tensor_value_info("x", TP.DOUBLE, [3])], ["y"], [onnx.numpy_helper.from_array(w, "W")],
    )
    m = ir.serde.deserialize_model(proto)
    j = jacobian(m, "y", "x")
    m.graph.outputs.append(onnxgrad.api.value_table(m.graph)[j])
    out = run(ir.serde.serialize_model(m), {"x": np.ones(3)})
    np.testing.assert_array_equal(out[j], w)


# ------------------------------------------------------------------ against PyTorch double backward
torch = pytest.importorskip("torch")


class _SmoothMLP(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(4, 6), torch.nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.l2(torch.tanh(self.l1(x)))).pow(2).sum()  # Softplus has no float64 kernel


class _SoftmaxCE(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.l1 = torch.nn.Linear(4, 5)
        self.register_buffer("target", torch.tensor([1, 0, 4]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.l1(x), self.target)


class _NormAttention(torch.nn.Module):
    """LayerNorm, then two-head scaled dot-product self-attention with an output projection."""

    def __init__(self) -> None:
        super().__init__()
        self.norm = torch.nn.LayerNorm(8)
        self.q, self.k, self.v, self.o = (torch.nn.Linear(8, 8) for _ in range(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, t, _ = h.shape

        def heads(z: torch.Tensor) -> torch.Tensor:
            return z.reshape(b, t, 2, 4).transpose(1, 2)

        q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
        p = torch.softmax(q @ k.transpose(-1, -2) / 2.0, dim=-1)
        return self.o((p @ v).transpose(1, 2).reshape(b, t, 8)).tanh().sum()


class _SmoothConv(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = torch.nn.Conv2d(2, 3, 3, padding=1), torch.nn.Conv2d(3, 2, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.softplus(self.c2(torch.tanh(self.c1(x)))).sum()


class _GeluDepthwise(torch.nn.Module):
    """A 3x3 depthwise conv (its dX: the flipped-kernel grouped Conv), then PyTorch's exported GELU (differentiated
    as one function, plans/activation_fusions.py) and a linear layer."""

    def __init__(self) -> None:
        super().__init__()
        self.dw, self.l1 = torch.nn.Conv2d(3, 3, 3, padding=1, groups=3), torch.nn.Linear(5, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.l1(torch.nn.functional.gelu(self.dw(x))).tanh().sum()


SECOND_ORDER = [
    ("mlp", _SmoothMLP, (3, 4), torch.float64, 1e-7),
    ("softmax-ce", _SoftmaxCE, (3, 4), torch.float64, 1e-7),
    ("layernorm-attention", _NormAttention, (2, 5, 8), torch.float64, 1e-7),
    ("conv", _SmoothConv, (1, 2, 6, 6), torch.float32, 2e-3),
    ("gelu-depthwise", _GeluDepthwise, (2, 3, 4, 5), torch.float32, 2e-3),
]


@pytest.mark.parametrize(("name", "cls", "shape", "dtype", "tol"), SECOND_ORDER, ids=[c[0] for c in SECOND_ORDER])
def test_second_order_matches_torch(name: str, cls: type, shape: tuple[int, ...], dtype: torch.dtype,
                                    tol: float) -> None:
    torch.manual_seed(0)
    module = cls().to(dtype).eval()
    x = torch.randn(*shape, dtype=dtype)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), f, dynamo=False, opset_version=17, input_names=["x"],
                          output_names=["loss"], do_constant_folding=False)
    proto = onnx.load_from_string(f.getvalue())
    params = dict(module.named_parameters())
    weights = [i.name for i in proto.graph.initializer if i.name in params]
    xs = ["x", *weights]
    m = ir.serde.deserialize_model(proto)
    hv = hessian_vector_product(m, "loss", xs)
    table = onnxgrad.api.value_table(m.graph)
    m.graph.outputs.extend(table[n] for n in hv if n is not None)
    aug = ir.serde.serialize_model(m)
    rng = np.random.default_rng(2)
    leaves = {"x": x, **{k: params[k] for k in weights}}
    vs = {k: rng.standard_normal(tuple(v.shape)) for k, v in leaves.items()}
    np_dtype = np.float64 if dtype == torch.float64 else np.float32
    got = run(aug, {"x": x.numpy(), **{f"hvp_v/{k}": v.astype(np_dtype) for k, v in vs.items()}})

    xt = x.clone().requires_grad_(True)
    inputs = [xt, *[params[k] for k in weights]]
    loss = module(xt)
    grads = torch.autograd.grad(loss, inputs, create_graph=True)
    dot = sum((g * torch.as_tensor(vs[k], dtype=dtype)).sum() for g, k in zip(grads, xs, strict=True))
    expected = torch.autograd.grad(dot, inputs, allow_unused=True)
    for k, n, e in zip(xs, hv, expected, strict=True):
        want = np.zeros(tuple(leaves[k].shape)) if e is None else e.detach().numpy()
        have = np.zeros_like(want) if n is None else got[n]
        scale = max(np.abs(want).max(), 1e-3)
        assert np.abs(have - want).max() <= tol * scale * 10, f"{name}: {k}: max err {np.abs(have - want).max()}"


def test_grad_order_2_command_gives_hessian_vector_products(tmp_path: object) -> None:
    """`onnxgrad grad --order 2`: the order-2 outputs equal central differences of the order-1 outputs."""
    from onnxgrad.cli import main

    src, out = os.path.join(str(tmp_path), "mlp64.onnx"), os.path.join(str(tmp_path), "o2.onnx")
    onnx.save(_mlp64(), src)
    with pytest.raises(SystemExit) as done:
        main(["grad", src, "-o", out, "--ys", "loss", "--xs", "x", "--xs", "W1", "--order", "2"])
    assert done.value.code == 0
    proto = onnx.load(out)
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4, 3))
    v = {"x": rng.standard_normal((4, 3)), "W1": rng.standard_normal((3, 5))}
    w1 = onnx.numpy_helper.to_array(next(i for i in proto.graph.initializer if i.name == "W1"))
    feeds = {"x": x, "gradients_order2/x_v": v["x"], "gradients_order2/W1_v": v["W1"]}
    got = run(proto, feeds)
    cut = onnxgrad.check.cut_at(proto, ["W1"])
    h = 1e-5

    def first(sign: float) -> dict[str, np.ndarray]:
        moved = {**feeds, "x": x + sign * h * v["x"], "W1": w1 + sign * h * v["W1"]}
        return run(cut, moved, ["gradients/x_grad", "gradients/W1_grad"])

    plus, minus = first(1.0), first(-1.0)
    for name in ("x", "W1"):
        numeric = (plus[f"gradients/{name}_grad"] - minus[f"gradients/{name}_grad"]) / (2 * h)
        np.testing.assert_allclose(got[f"gradients_order2/{name}_grad"], numeric, rtol=1e-6, atol=1e-7)
