"""Real models end to end: PyTorch modules exported to ONNX (TorchScript exporter, several opsets, a
symbolic batch axis, no constant folding), differentiated by onnxgrad, run in onnxruntime, and compared
with ``torch.autograd.grad`` on the same weights: every parameter and the input, at two batch sizes
with one exported model."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable
from typing import Any
from unittest import mock

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from onnxgrad import NEW_INPUT, add_gradients  # noqa: E402
from onnxgrad.runtime import run  # noqa: E402

BATCHES = (2, 5)
EXPORT_BATCH = 3


def _mlp() -> Any:
    return torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))


def _cnn() -> Any:
    return torch.nn.Sequential(
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), torch.nn.MaxPool2d(2),
        torch.nn.Conv2d(4, 6, 3, padding=1), torch.nn.ReLU(), torch.nn.AvgPool2d(2),
        torch.nn.Flatten(), torch.nn.Linear(6 * 2 * 2, 3),
    )


def _transformer() -> Any:
    return torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0, batch_first=True)


# name -> (module factory, input shape without the batch axis, opsets)
# TransformerEncoderLayer: torch's TorchScript exporter has no aten::unflatten before opset 13 (used by
# MultiheadAttention's packed in-projection), so that model is exported at 13 and 17 instead of 11 and 17
MODELS: dict[str, tuple[Callable[[], Any], tuple[int, ...], tuple[int, ...]]] = {
    "mlp": (_mlp, (6,), (11, 17)),
    "cnn": (_cnn, (2, 8, 8), (11, 17)),
    "transformer": (_transformer, (4, 8), (13, 17)),
}
CASES = [(name, opset) for name, (_, _, opsets) in MODELS.items() for opset in opsets]


def _math_sdpa(q: Any, k: Any, v: Any, attn_mask: Any = None, dropout_p: float = 0.0, is_causal: bool = False,
               **_: Any) -> Any:
    """Scaled dot-product attention spelled out (dropout 0, no causal mask in these tests)."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])
    if attn_mask is not None:
        scores = scores + attn_mask
    return torch.softmax(scores, dim=-1) @ v


def build(name: str) -> Any:
    """The module in eval mode with every parameter and buffer drawn from a fixed seed (no two alike,
    so the exporter keeps one initializer per parameter)."""
    factory, _, _ = MODELS[name]
    torch.manual_seed(0)
    module = factory().eval()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for pname, p in module.named_parameters():
            scale = 0.5 if p.dim() > 1 else 0.2
            p.copy_(torch.randn(p.shape, generator=gen) * scale + (1.0 if pname.endswith("norm1.weight")
                                                                    or pname.endswith("norm2.weight") else 0.0))
        for bname, b in module.named_buffers():
            if bname.endswith("running_mean"):
                b.copy_(torch.randn(b.shape, generator=gen) * 0.1)
            elif bname.endswith("running_var"):
                b.copy_(1.0 + torch.rand(b.shape, generator=gen) * 0.5)
    return module


def export(module: Any, name: str, opset: int) -> onnx.ModelProto:
    """TorchScript export with a symbolic batch axis and no constant folding."""
    _, shape, _ = MODELS[name]
    example = torch.randn(EXPORT_BATCH, *shape)
    f = io.BytesIO()
    with warnings.catch_warnings(), mock.patch.object(F, "scaled_dot_product_attention", _math_sdpa):
        # torch 2.13's tracer hands MultiheadAttention's is_causal to SDPA as a tensor, which SDPA refuses;
        # the exported graph is the same attention written out (MatMul, Softmax)
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module, (example,), f, dynamo=False, opset_version=opset, input_names=["x"], output_names=["y"],
            dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}}, do_constant_folding=False,
        )
    return onnx.load_from_string(f.getvalue())


def initializer_names(model: onnx.ModelProto, module: Any) -> dict[str, str]:
    """Parameter name -> initializer name (the same name, or the initializer holding the same values)."""
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    out = {}
    for pname, p in module.named_parameters():
        if pname in inits:
            out[pname] = pname
            continue
        value = p.detach().numpy()
        same = [n for n, a in inits.items() if a.shape == value.shape and np.array_equal(a, value)]
        assert len(same) == 1, f"parameter {pname!r} has no (unique) initializer in the exported model"
        out[pname] = same[0]
    return out


@pytest.mark.parametrize(("name", "opset"), CASES, ids=[f"{n}-opset{o}" for n, o in CASES])
def test_gradients_match_torch_autograd(name: str, opset: int) -> None:
    module = build(name)
    model = export(module, name, opset)
    names = initializer_names(model, module)
    xs = ["x", *names.values()]
    aug = add_gradients(model, ["y"], xs, [NEW_INPUT])
    onnx.checker.check_model(aug.model, full_check=True)
    (seed_name,) = aug.new_inputs
    _, shape, _ = MODELS[name]
    rng = np.random.default_rng(opset)
    params = dict(module.named_parameters())
    for batch in BATCHES:
        x = rng.standard_normal((batch, *shape)).astype(np.float32)
        tx = torch.tensor(x, requires_grad=True)
        ty = module(tx)
        u = rng.standard_normal(tuple(ty.shape)).astype(np.float32)
        want = torch.autograd.grad(ty, [tx, *params.values()], grad_outputs=torch.tensor(u))
        got = run(aug.model, {"x": x, seed_name: u})
        np.testing.assert_allclose(got["y"], ty.detach().numpy(), rtol=1e-4, atol=1e-5)
        for key, w in zip(["x", *params], want, strict=True):
            grad_name = aug.gradients["x" if key == "x" else names[key]]
            assert grad_name is not None, f"{name} opset {opset}: no gradient for {key}"
            expect = w.numpy()
            scale = max(1.0, float(np.abs(expect).max()))
            np.testing.assert_allclose(got[grad_name], expect, rtol=1e-3, atol=1e-5 * scale,
                                       err_msg=f"{name} opset {opset} batch {batch}: d y / d {key}")
