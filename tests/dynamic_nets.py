"""Fully convolutional PyTorch networks exported with run-time batch, height and width (issue 15).

Shared by ``tests/test_dynamic_sizes.py`` (gradients against ``torch.autograd`` at several input sizes from one
gradient file) and ``bench/dynamic.py`` (the dynamic-size gradient graph against the static one, same size).

Three kinds of network that are usually exported with dynamic H and W, at small widths (4-16 channels):

- ``seg``: Conv -> BatchNorm -> ReLU, two strided downsamplings, a bilinear upsample by ``scale_factor=2`` and one
  back to the input's own size (``size=x.shape[-2:]``), a skip concatenation, a 1x1 head;
- ``det``: a detection-style backbone: strided convs, ceil-mode max pools (one padded), a ceil-mode average pool,
  two outputs (a stride-16 feature map and global-average-pooled class scores);
- ``unet``: a two-level U-Net: max-pool downsampling, ConvTranspose upsampling, skip concatenations that fit odd
  sizes as real U-Nets do (the upsampled map padded with ``F.pad`` at one level, the skip center-cropped at the other).
"""

from __future__ import annotations

import io
import warnings

import numpy as np
import onnx
import torch
import torch.nn.functional as F
from torch import nn

from bench.models import _randomize

IN_CHANNELS = 3
EXPORT_SHAPE = (2, IN_CHANNELS, 32, 32)  # the example the exporter traces
DYNAMIC_AXES = {0: "n", 2: "h", 3: "w"}


def _cbr(cin: int, cout: int, stride: int = 1) -> nn.Sequential:
    """3x3 Conv (no bias) -> BatchNorm -> ReLU."""
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


class SegNet(nn.Module):
    """Encoder with two stride-2 convs, bilinear decoder back to the input size, skip from full resolution."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.stem = _cbr(IN_CHANNELS, width)
        self.down1 = _cbr(width, 12, stride=2)
        self.down2 = _cbr(12, 16, stride=2)
        self.mid = nn.Conv2d(16, 12, 3, padding=1)
        self.fuse = _cbr(12 + width, width)
        self.head = nn.Conv2d(width, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stem(x)
        d = self.down2(self.down1(s))
        u = self.mid(F.interpolate(d, scale_factor=2.0, mode="bilinear", align_corners=False))
        u = F.interpolate(u, size=x.shape[-2:], mode="bilinear", align_corners=False)
        return self.head(self.fuse(torch.cat([u, s], dim=1)))


class Backbone(nn.Module):
    """Detection-style backbone: strided convs, ceil-mode max and average pools; a feature map and class scores."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = _cbr(IN_CHANNELS, 8, stride=2)
        self.pool1 = nn.MaxPool2d(3, 2, padding=1, ceil_mode=True)
        self.stage1 = _cbr(8, 12)
        self.pool2 = nn.MaxPool2d(2, 2, ceil_mode=True)
        self.stage2 = _cbr(12, 16, stride=2)
        self.pool3 = nn.AvgPool2d(2, 2, ceil_mode=True, count_include_pad=False)
        self.feat = nn.Conv2d(16, 8, 1)
        self.cls = nn.Linear(16, 5)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.stage2(self.pool2(self.stage1(self.pool1(self.stem(x)))))
        p = self.pool3(h)
        return self.feat(p), self.cls(torch.flatten(F.adaptive_avg_pool2d(p, 1), 1))


class UNet(nn.Module):
    """Two-level U-Net; ConvTranspose upsampling; the decoder fits odd sizes with F.pad and a center crop."""

    def __init__(self) -> None:
        super().__init__()
        self.enc1 = _cbr(IN_CHANNELS, 8)
        self.enc2 = _cbr(8, 12)
        self.bottom = _cbr(12, 16)
        self.up2 = nn.ConvTranspose2d(16, 12, 2, stride=2)
        self.dec2 = _cbr(24, 12)
        self.up1 = nn.ConvTranspose2d(12, 8, 3, stride=2, padding=2, output_padding=1)
        self.dec1 = _cbr(16, 8)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        e1 = self.enc1(x)
        e2 = self.enc2(F.max_pool2d(e1, 2))
        b = self.bottom(F.max_pool2d(e2, 2))
        u2 = self.up2(b)  # 2 * floor(H / 4), at most one short of e2: pad the upsampled map (milesial's U-Net)
        dy, dx = e2.shape[2] - u2.shape[2], e2.shape[3] - u2.shape[3]
        u2 = F.pad(u2, [dx // 2, dx - dx // 2, dy // 2, dy - dy // 2])
        d2 = self.dec2(torch.cat([e2, u2], dim=1))
        u1 = self.up1(d2)  # 2 * floor(H / 2) - 2 rows: center-crop the skip to it, as the original U-Net does
        cy, cx = (e1.shape[2] - u1.shape[2]) // 2, (e1.shape[3] - u1.shape[3]) // 2
        skip = e1[:, :, cy : cy + u1.shape[2], cx : cx + u1.shape[3]]
        return self.head(self.dec1(torch.cat([skip, u1], dim=1)))


NETS: dict[str, type[nn.Module]] = {"seg": SegNet, "det": Backbone, "unet": UNet}
OUTPUTS = {"seg": ["y"], "det": ["feat", "scores"], "unet": ["y"]}


def build(name: str, seed: int = 0) -> nn.Module:
    """The network in eval mode, with seeded random weights and BatchNorm statistics (bench/models.py's)."""
    torch.manual_seed(seed)
    module = NETS[name]()
    _randomize(module, seed + 10)
    return module.eval()


def export(module: nn.Module, name: str, opset: int, axes: dict[int, str] | None = DYNAMIC_AXES,
           shape: tuple[int, ...] = EXPORT_SHAPE, fold: bool = False) -> onnx.ModelProto:
    """TorchScript export (``dynamo=False``), eval mode; ``axes`` of the input symbolic (None: all static).

    ``fold``: the exporter's constant folding (its default, which also folds BatchNorm into the Conv before it);
    off, every parameter stays an initializer of its own name."""
    outputs = OUTPUTS[name]
    dynamic = None if axes is None else {"x": axes, **{o: {0: axes[0]} for o in outputs if 0 in axes}}
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the tracer's notes on shapes turned into values
        torch.onnx.export(
            module, (torch.randn(shape),), f, dynamo=False, opset_version=opset, input_names=["x"],
            output_names=outputs, dynamic_axes=dynamic, do_constant_folding=fold,
            training=torch.onnx.TrainingMode.EVAL,
        )
    return onnx.load_from_string(f.getvalue())


def torch_grads(module: nn.Module, x: np.ndarray, cotangents: list[np.ndarray] | None,
                rng: np.random.Generator) -> tuple[list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """(outputs, cotangents, [dx, d every parameter]) of sum_i <cotangent_i, output_i> by torch.autograd.

    Cotangents are drawn from ``rng`` (standard normal, one per output) when not given."""
    tx = torch.tensor(x, requires_grad=True)
    ys = module(tx)
    ys = list(ys) if isinstance(ys, tuple) else [ys]
    if cotangents is None:
        cotangents = [rng.standard_normal(tuple(y.shape)).astype(np.float32) for y in ys]
    params = [p for _, p in module.named_parameters()]
    grads = torch.autograd.grad(ys, [tx, *params], grad_outputs=[torch.tensor(u) for u in cotangents])
    return [y.detach().numpy() for y in ys], cotangents, [g.numpy() for g in grads]


def rel_err(got: np.ndarray, want: np.ndarray) -> float:
    """||got - want|| / ||want|| (2-norms; 0 when both are 0)."""
    scale = float(np.linalg.norm(want))
    diff = float(np.linalg.norm(np.asarray(got, np.float64) - want))
    return diff / scale if scale > 0 else diff
