"""Resampling and padding as PyTorch exports them with dynamic N, H and W (TorchScript exporter): F.interpolate
(scales written as a Concat of constants, or sizes computed from Shape at run time), F.pad in reflect and replicate
modes (pads computed by a Shape/ConstantOfShape/Slice subgraph) and F.grid_sample. Each module is exported once,
differentiated once, and the one gradient model is compared with ``torch.autograd`` at three input sizes, odd ones
included, for the input, a per-channel gain in front of the op, and the grid."""

from __future__ import annotations

import io
import warnings
from collections.abc import Callable
from typing import Any

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from onnxgrad import NEW_INPUT, add_gradients  # noqa: E402
from onnxgrad.runtime import run  # noqa: E402

CHANNELS = 3
EXPORT = (2, CHANNELS, 8, 8)
SIZES = ((1, CHANNELS, 5, 7), (2, CHANNELS, 9, 6), (3, CHANNELS, 8, 8))

Op = Callable[..., Any]
# name -> (op on the gained input (and the grid), opsets, whether the op reads a grid)
OPS: dict[str, tuple[Op, tuple[int, ...], bool]] = {
    "bilinear-x2": (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=False), (11, 17), False),
    "bilinear-x2-align": (lambda x: F.interpolate(x, scale_factor=2, mode="bilinear", align_corners=True),
                          (11, 17), False),
    "nearest-x2": (lambda x: F.interpolate(x, scale_factor=2, mode="nearest"), (11, 17), False),
    "bilinear-to-size": (lambda x: F.interpolate(x, size=(x.shape[2] * 2 - 1, x.shape[3] + 3), mode="bilinear",
                                                 align_corners=False), (11, 17), False),
    "reflect-pad": (lambda x: F.pad(x, (1, 2, 2, 1), mode="reflect"), (11, 17), False),
    "replicate-pad": (lambda x: F.pad(x, (2, 1, 0, 3), mode="replicate"), (11, 17), False),
    "grid-zeros": (lambda x, g: F.grid_sample(x, g, mode="bilinear", padding_mode="zeros", align_corners=False),
                   (16, 17), True),
    "grid-border": (lambda x, g: F.grid_sample(x, g, mode="bilinear", padding_mode="border", align_corners=False),
                    (16, 17), True),
}
CASES = [(name, opset) for name, (_, opsets, _) in OPS.items() for opset in opsets]


class Gained(torch.nn.Module):
    """y = op(x * w): a per-channel gain w in front, so a parameter's gradient also crosses the op."""

    def __init__(self, op: Op) -> None:
        super().__init__()
        self.op = op
        self.w = torch.nn.Parameter(torch.linspace(0.5, 1.5, CHANNELS).reshape(1, CHANNELS, 1, 1))

    def forward(self, x: Any, *grid: Any) -> Any:
        return self.op(x * self.w, *grid)


def _grid(n: int, h: int, w: int, rng: np.random.Generator) -> np.ndarray:
    """A sampling grid a little beyond [-1, 1], so the padding mode matters."""
    return rng.uniform(-1.15, 1.15, (n, h, w, 2)).astype(np.float32)


def export(module: Gained, opset: int, grid: bool) -> onnx.ModelProto:
    names = ["x", "grid"] if grid else ["x"]
    args = (torch.randn(*EXPORT), torch.tensor(_grid(EXPORT[0], 4, 5, np.random.default_rng(0))))[: len(names)]
    axes = {"x": {0: "n", 2: "h", 3: "w"}, "grid": {0: "n", 1: "gh", 2: "gw"}, "y": {0: "n", 2: "oh", 3: "ow"}}
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, f, dynamo=False, opset_version=opset, input_names=names, output_names=["y"],
                          dynamic_axes={k: v for k, v in axes.items() if k in [*names, "y"]})
    return onnx.load_from_string(f.getvalue())


@pytest.mark.parametrize(("name", "opset"), CASES, ids=[f"{n}-opset{o}" for n, o in CASES])
def test_dynamic_size_export_matches_torch(name: str, opset: int) -> None:
    op, _, has_grid = OPS[name]
    module = Gained(op).eval()
    model = export(module, opset, has_grid)
    (x_info,) = [i for i in model.graph.input if i.name == "x"]
    assert [d.dim_param or d.dim_value for d in x_info.type.tensor_type.shape.dim] == ["n", CHANNELS, "h", "w"]
    (w_name,) = [t.name for t in model.graph.initializer if t.dims == [1, CHANNELS, 1, 1]]
    xs = ["x", w_name, *(["grid"] if has_grid else [])]
    aug = add_gradients(model, ["y"], xs, [NEW_INPUT])
    onnx.checker.check_model(aug.model, full_check=True)
    (seed_name,) = aug.new_inputs
    rng = np.random.default_rng(opset)
    for size in SIZES:
        x = rng.standard_normal(size).astype(np.float32)
        feeds = {"x": x}
        inputs = [torch.tensor(x, requires_grad=True)]
        if has_grid:
            feeds["grid"] = _grid(size[0], size[2] - 1, size[3] + 2, rng)
            inputs.append(torch.tensor(feeds["grid"], requires_grad=True))
        ty = module(*inputs)
        u = rng.standard_normal(tuple(ty.shape)).astype(np.float32)
        want = torch.autograd.grad(ty, [inputs[0], module.w, *inputs[1:]], grad_outputs=torch.tensor(u))
        got = run(aug.model, {**feeds, seed_name: u})
        np.testing.assert_allclose(got["y"], ty.detach().numpy(), rtol=1e-5, atol=1e-5)
        for key, expect in zip(xs, want, strict=True):
            grad = aug.gradients[key]
            assert grad is not None, f"{name} opset {opset}: no gradient for {key}"
            scale = max(1.0, float(np.abs(expect).max()))
            np.testing.assert_allclose(got[grad], expect.numpy(), rtol=1e-4, atol=1e-5 * scale,
                                       err_msg=f"{name} opset {opset} size {size}: d y / d {key}")
