"""Python stand-ins for torchvision's compiled ``nms`` and ``roi_align``, for the detection models' tests.

This machine's torchvision wheel is built for another torch, so its compiled operators do not load; the detectors
need them to run and to export. ``install()`` defines ``torchvision::nms`` and ``torchvision::roi_align`` as torch
custom ops with these kernels (the exporter then writes NonMaxSuppression and RoiAlign, as with the real ones), and
``differentiable_roi_align`` is the same sampling in plain tensor operations, which torch autograd differentiates
(w.r.t. the features, as torchvision's own backward does) for an eager reference."""

from __future__ import annotations

import sys
from typing import Any

import torch

_INSTALLED: list[Any] = []


def _nms(boxes: torch.Tensor, scores: torch.Tensor, threshold: float) -> torch.Tensor:
    """Greedy non-maximum suppression in order of decreasing score."""
    x1, y1, x2, y2 = boxes.unbind(1)
    area = (x2 - x1) * (y2 - y1)
    dropped = torch.zeros(len(boxes), dtype=torch.bool)
    keep = []
    for i in scores.argsort(descending=True).tolist():
        if dropped[i]:
            continue
        keep.append(i)
        w = (torch.minimum(x2[i], x2) - torch.maximum(x1[i], x1)).clamp(min=0)
        h = (torch.minimum(y2[i], y2) - torch.maximum(y1[i], y1)).clamp(min=0)
        inter = w * h
        dropped |= inter / (area[i] + area - inter) > threshold
    return torch.tensor(keep, dtype=torch.int64)


def differentiable_roi_align(x: torch.Tensor, rois: torch.Tensor, output_size: Any, spatial_scale: float = 1.0,
                             sampling_ratio: int = -1, aligned: bool = False) -> torch.Tensor:
    """RoIAlign (average of bilinear samples per bin, rois (R, 5) = batch index, x1, y1, x2, y2), sample by sample,
    in tensor operations that autograd follows to the features and to the boxes (torchvision's own backward
    leaves the boxes out; the ONNX graph's derivative has them)."""
    ph, pw = (output_size, output_size) if isinstance(output_size, int) else output_size
    height, width = x.shape[2], x.shape[3]
    shift = 0.5 if aligned else 0.0
    out = []
    for r in range(rois.shape[0]):
        b = int(rois[r, 0])
        x1, y1, x2, y2 = (v * spatial_scale - shift for v in rois[r, 1:])
        rh, rw = y2 - y1, x2 - x1
        if not aligned:
            rh, rw = torch.clamp(rh, min=1.0), torch.clamp(rw, min=1.0)
        gh = sampling_ratio if sampling_ratio > 0 else max(int(-(-float(rh) // ph)), 1)
        gw = sampling_ratio if sampling_ratio > 0 else max(int(-(-float(rw) // pw)), 1)
        bins = []
        for i in range(ph):
            for j in range(pw):
                acc = x.new_zeros(x.shape[1])
                for iy in range(gh):
                    yy = y1 + (i + (iy + 0.5) / gh) * rh / ph
                    for ix in range(gw):
                        xx = x1 + (j + (ix + 0.5) / gw) * rw / pw
                        if yy < -1 or yy > height or xx < -1 or xx > width:
                            continue
                        acc = acc + _bilinear(x[b], torch.clamp(yy, min=0.0), torch.clamp(xx, min=0.0))
                bins.append(acc / (gh * gw))
        out.append(torch.stack(bins, 1).reshape(x.shape[1], ph, pw))
    return torch.stack(out) if out else x.new_zeros(0, x.shape[1], ph, pw)


def _bilinear(image: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    h, w = image.shape[1], image.shape[2]
    y0, x0 = int(y), int(x)
    if y0 >= h - 1:
        y0 = y1 = h - 1
        y = y.detach() * 0 + y0
    else:
        y1 = y0 + 1
    if x0 >= w - 1:
        x0 = x1 = w - 1
        x = x.detach() * 0 + x0
    else:
        x1 = x0 + 1
    ly, lx = y - y0, x - x0
    return ((1 - ly) * (1 - lx) * image[:, y0, x0] + (1 - ly) * lx * image[:, y0, x1]
            + ly * (1 - lx) * image[:, y1, x0] + ly * lx * image[:, y1, x1])


def _roi_align_kernel(x: torch.Tensor, rois: torch.Tensor, scale: float, ph: int, pw: int, ratio: int,
                      aligned: bool) -> torch.Tensor:
    with torch.no_grad():
        return differentiable_roi_align(x, rois, (ph, pw), scale, ratio, aligned)


def install() -> Any:
    """torchvision, with the two operators defined (once per process) where its compiled ones are missing."""
    import torchvision

    if _INSTALLED or (hasattr(torch.ops.torchvision, "nms") and _compiled()):
        return torchvision
    lib = torch.library.Library("torchvision", "DEF")
    lib.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    lib.define("roi_align(Tensor input, Tensor rois, float spatial_scale, SymInt pooled_height, "
               "SymInt pooled_width, int sampling_ratio, bool aligned) -> Tensor")
    lib.impl("nms", _nms, "CPU")
    lib.impl("roi_align", _roi_align_kernel, "CPU")
    _INSTALLED.append(lib)

    def has_ops() -> bool:
        return True

    def assert_has_ops() -> None:
        pass

    for name in ("torchvision.extension", "torchvision.ops.boxes", "torchvision.ops.roi_align"):
        module = sys.modules[name]
        module._has_ops = has_ops  # type: ignore[attr-defined]
        if hasattr(module, "_assert_has_ops"):
            module._assert_has_ops = assert_has_ops  # type: ignore[attr-defined]
    return torchvision


def _compiled() -> bool:
    try:
        torch.ops.torchvision.nms(torch.zeros(1, 4), torch.zeros(1), 0.5)
    except (RuntimeError, NotImplementedError):
        return False
    return True
