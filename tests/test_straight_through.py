"""Straight-through gradients of fake quantisation (``straight_through=True``) against torch's FakeQuantize:
``DequantizeLinear(QuantizeLinear(x))`` passes dy to x where x lands inside the integer grid, as
``torch.fake_quantize_per_tensor_affine`` / ``_per_channel_affine`` do in autograd (plans/quantization.py)."""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto
from onnx import helper as oh
from onnx import numpy_helper as nh

import onnxgrad
from onnxgrad.runtime import run
from onnxgrad.train import make_train_step

torch = pytest.importorskip("torch")
F = torch.nn.functional


@dataclass
class Pair:
    """x (shape) -> QuantizeLinear(s_q, z_q) -> DequantizeLinear(s_dq, z_dq) -> y, per tensor or along ``axis``."""

    shape: tuple[int, ...]
    s_q: list[float]
    z_q: list[int] | None  # None: no zero point (uint8 grid, zero point 0)
    dtype: Any = np.uint8
    axis: int = 1
    s_dq: list[float] | None = None  # None: the same initializer as s_q
    z_dq: list[int] | None = None
    opset: int = 13
    attrs: dict[str, Any] = field(default_factory=dict)


PAIRS = {
    "uint8-per-tensor": Pair((3, 5), [0.05], [3]),
    "int8-per-tensor": Pair((3, 5), [0.04], [-5], np.int8),
    "no-zero-point": Pair((3, 5), [0.02], None),
    "int8-per-axis": Pair((3, 4), [0.02, 0.05, 0.01, 0.03], [0, 2, -3, 1], np.int8),
    "per-axis-last-axis": Pair((2, 3, 4), [0.02, 0.05, 0.01, 0.03], [0, 0, 0, 0], np.int8, axis=-1),
    "other-scale-back": Pair((3, 5), [0.05], [3], s_dq=[0.07], z_dq=[1]),
    # a power-of-two scale: onnxruntime divides by it, torch multiplies by its inverse (ties round apart otherwise)
    "int16-grid": Pair((3, 5), [2.0 ** -10], [10], np.int16, opset=21),
}


def pair_model(p: Pair) -> onnx.ModelProto:
    per_axis = len(p.s_q) > 1
    shape = (len(p.s_q),) if per_axis else ()

    def tensor(values: list[Any], dtype: Any, name: str) -> onnx.TensorProto:
        return nh.from_array(np.array(values, dtype).reshape(shape), name)

    inits = [tensor(p.s_q, np.float32, "s_q")]
    q_in, dq_in = ["x", "s_q"], ["q", "s_q"]
    if p.z_q is not None:
        inits.append(tensor(p.z_q, p.dtype, "z_q"))
        q_in.append("z_q")
        dq_in.append("z_q")
    if p.s_dq is not None:
        inits += [tensor(p.s_dq, np.float32, "s_dq"), tensor(p.z_dq or [0] * len(p.s_dq), p.dtype, "z_dq")]
        dq_in = ["q", "s_dq", "z_dq"]
    axis = {"axis": p.axis} if per_axis else {}
    nodes = [oh.make_node("QuantizeLinear", q_in, ["q"], **axis),
             oh.make_node("DequantizeLinear", dq_in, ["y"], **axis)]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, list(p.shape))],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, list(p.shape))], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", p.opset)], ir_version=8)


def torch_pair(p: Pair, x: Any) -> Any:
    """y = (fake_quant(x; s_q, z_q) / s_q + z_q - z_dq) * s_dq: torch's autograd gives the estimator's dx."""
    info = np.iinfo(p.dtype)
    z_q = p.z_q or [0] * len(p.s_q)
    s_dq, z_dq = p.s_dq or p.s_q, p.z_dq if p.z_dq is not None else z_q
    if len(p.s_q) > 1:
        axis = p.axis % len(p.shape)
        fq = torch.fake_quantize_per_channel_affine(x, torch.tensor(p.s_q), torch.tensor(z_q, dtype=torch.int32),
                                                    axis, int(info.min), int(info.max))
        view = [1] * len(p.shape)
        view[axis] = -1

        def along(v: list[float]) -> Any:
            return torch.tensor(v, dtype=torch.float32).reshape(view)
    else:
        fq = torch.fake_quantize_per_tensor_affine(x, p.s_q[0], z_q[0], int(info.min), int(info.max))

        def along(v: list[float]) -> Any:
            return torch.tensor(v[0], dtype=torch.float32)
    return (fq / along(p.s_q) + along(z_q) - along(z_dq)) * along(s_dq)


@pytest.mark.parametrize("name", list(PAIRS))
def test_fake_quantisation_pair_matches_torch(name: str) -> None:
    p = PAIRS[name]
    model = pair_model(p)
    rng = np.random.default_rng(0)
    spread = max(p.s_q) * (np.iinfo(p.dtype).max - np.iinfo(p.dtype).min) * 0.7  # some x clamp at both ends
    x = (rng.standard_normal(p.shape) * spread).astype(np.float32)
    u = rng.standard_normal(p.shape).astype(np.float32)
    aug = onnxgrad.add_gradients(model, ["y"], ["x"], [u], straight_through=True)
    got = run(aug.model, {"x": x})
    xt = torch.tensor(x, requires_grad=True)
    y = torch_pair(p, xt)
    y.backward(torch.tensor(u))
    np.testing.assert_allclose(got["y"], y.detach().numpy(), rtol=1e-6, atol=1e-6)
    want = xt.grad.numpy()
    assert 0 < (want == 0).sum() < want.size  # the mask both passes and stops
    np.testing.assert_allclose(got[aug.gradients["x"]], want, rtol=1e-6, atol=1e-7)
    with pytest.warns(onnxgrad.GradientNote, match="straight_through=True"):
        assert onnxgrad.add_gradients(model, ["y"], ["x"]).gradients["x"] is None  # off by default


class FakeQuantMLP(torch.nn.Module):
    """Quantisation-aware training as torch writes it: uint8 activations, int8 weights per output channel."""

    def __init__(self) -> None:
        super().__init__()
        self.l1, self.l2 = torch.nn.Linear(6, 8), torch.nn.Linear(8, 3)
        self.register_buffer("ws", torch.rand(8) * 0.02 + 0.01)
        self.register_buffer("wz", torch.zeros(8, dtype=torch.int32))

    def forward(self, x: Any) -> Any:
        x = torch.fake_quantize_per_tensor_affine(x, 0.05, 3, 0, 255)
        w = torch.fake_quantize_per_channel_affine(self.l1.weight, self.ws, self.wz, 0, -128, 127)
        h = torch.fake_quantize_per_tensor_affine(F.relu(F.linear(x, w, self.l1.bias)), 0.03, -5, -128, 127)
        return self.l2(h)


def export(module: Any, x: Any, dynamo: bool) -> onnx.ModelProto:
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        if dynamo:
            pytest.importorskip("onnxscript")
            return torch.onnx.export(module, (x,), dynamo=True, opset_version=18, optimize=False, input_names=["x"],
                                     output_names=["y"]).model_proto
        f = io.BytesIO()
        torch.onnx.export(module, (x,), f, dynamo=False, opset_version=13, do_constant_folding=False,
                          input_names=["x"], output_names=["y"])
        return onnx.load_from_string(f.getvalue())


PARAMS = ["l1.weight", "l1.bias", "l2.weight", "l2.bias"]


@pytest.mark.parametrize("dynamo", [False, True], ids=["torchscript-13", "dynamo-18"])
def test_fake_quantised_export_matches_torch(dynamo: bool) -> None:
    """Every gradient of a fake-quantised MLP exported from PyTorch (Q/DQ pairs on the input, the activations and,
    per channel, the weights), against autograd, which takes the same estimator."""
    torch.manual_seed(0)
    module = FakeQuantMLP().eval()
    x = torch.randn(4, 6) * 2
    model = export(module, x, dynamo)
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in model.graph.node}
    u = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    aug = onnxgrad.add_gradients(model, ["y"], ["x", *PARAMS], [u], straight_through=True)
    got = run(aug.model, {"x": x.numpy()})
    xt = x.clone().requires_grad_()
    module(xt).backward(torch.from_numpy(u))
    want = {"x": xt.grad, **{k: dict(module.named_parameters())[k].grad for k in PARAMS}}
    assert (want["x"] == 0).any() and (want["l1.weight"] == 0).any()  # clamped inputs and weights
    for k, w in want.items():
        np.testing.assert_allclose(got[aug.gradients[k]], w.numpy(), rtol=1e-5, atol=1e-6, err_msg=k)


def test_quantisation_aware_training_step_follows_torch() -> None:
    """``make_train_step(straight_through=True)``: 5 SGD steps of the fake-quantised MLP equal torch.optim's."""
    torch.manual_seed(0)
    module = FakeQuantMLP().train()
    x, target = torch.randn(16, 6) * 2, torch.randn(16, 3)
    model = export(module, x, False)
    step = make_train_step(model, "mse:y:target", PARAMS, "sgd", lr=0.1, momentum=0.9, straight_through=True)
    opt = torch.optim.SGD(module.parameters(), lr=0.1, momentum=0.9)
    sess_values = dict(step.initial)
    for k in range(5):
        feeds = {"x": x.numpy(), "target": target.numpy(), step.lr: np.asarray(0.1, np.float32),
                 **{i: sess_values[i] for i, _ in [*step.params.values(), *step.state.values()]}}
        if step.step:
            feeds[step.step] = np.asarray(k + 1, np.int64)
        out = run(step.model, feeds)
        opt.zero_grad()
        loss = F.mse_loss(module(x), target)
        loss.backward()
        opt.step()
        assert abs(float(out[step.loss]) - loss.item()) <= 1e-5 * abs(loss.item()), k
        for i, o in [*step.params.values(), *step.state.values()]:
            sess_values[i] = out[o]
    for name, (i, _) in step.params.items():
        np.testing.assert_allclose(sess_values[i], dict(module.named_parameters())[name].detach().numpy(),
                                   rtol=1e-4, atol=1e-5, err_msg=name)
