"""Running models in onnxruntime: providers, sessions, and feeds (arrays read from ``.npy`` / ``.npz`` files,
the rest drawn at random, seeded), the same for ``onnxgrad run`` and ``onnxgrad check``."""

from __future__ import annotations

import difflib
import os
import re
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import onnx
import onnxruntime as ort

from onnxgrad import workarounds
from onnxgrad.io import file_kind, one_line

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# onnx's reference evaluator: slow, but it knows every opset onnx does (onnxruntime 1.31 stops at 26)
REFERENCE = "reference"
CHOICES = (*PROVIDERS, REFERENCE)  # what the command line offers


@dataclass(frozen=True)
class ValueArg:
    """A graph input or output as onnxruntime's NodeArg shows it: name, 'tensor(float)'-style type, shape."""

    name: str
    type: str
    shape: list[int | str | None]

    @staticmethod
    def of(info: onnx.ValueInfoProto) -> ValueArg:
        t = info.type.tensor_type
        if not info.type.HasField("tensor_type"):
            return ValueArg(info.name, info.type.WhichOneof("value") or "unknown", [])
        name = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in t.shape.dim]
        return ValueArg(info.name, f"tensor({_ORT_TYPE_NAMES.get(name, name)})", dims)


_ORT_TYPE_NAMES = {"float32": "float", "float64": "double"}


def conv_nd(x: np.ndarray, w: np.ndarray, strides: Sequence[int], dilations: Sequence[int], begin: Sequence[int],
            end: Sequence[int], group: int) -> np.ndarray:
    """ONNX Conv in numpy, in the inputs' precision: x [N, C, *S], w [M, C/group, *K]; a negative pad crops.

    One tensor contraction per kernel offset (BLAS does the work), so float64 models run in seconds."""
    rank = x.ndim - 2
    grow = [(0, 0), (0, 0), *((max(b, 0), max(e, 0)) for b, e in zip(begin, end, strict=True))]
    x = np.pad(x, grow)
    crop = tuple(slice(max(-b, 0), x.shape[2 + i] - max(-e, 0))
                 for i, (b, e) in enumerate(zip(begin, end, strict=True)))
    x = x[(slice(None), slice(None), *crop)]
    kernel = w.shape[2:]
    out_shape = [(x.shape[2 + i] - (kernel[i] - 1) * dilations[i] - 1) // strides[i] + 1 for i in range(rank)]
    n, c = x.shape[:2]
    m = w.shape[0]
    xg = x.reshape(n, group, c // group, *x.shape[2:])
    wg = w.reshape(group, m // group, c // group, *kernel)
    out = np.zeros((n, group, m // group, *out_shape), dtype=np.result_type(x, w))
    for offset in np.ndindex(*kernel):
        window = tuple(slice(o * d, o * d + (size - 1) * st + 1, st)
                       for o, d, st, size in zip(offset, dilations, strides, out_shape, strict=True))
        patch = xg[(slice(None), slice(None), slice(None), *window)]  # [N, G, C/G, *out]
        out += np.einsum("ngc...,gmc->ngm...", patch, wg[(slice(None), slice(None), slice(None), *offset)])
    return out.reshape(n, m, *out_shape)


def conv_transpose_nd(x: np.ndarray, w: np.ndarray, strides: Sequence[int], dilations: Sequence[int],
                      begin: Sequence[int], end: Sequence[int], extra: Sequence[int], group: int) -> np.ndarray:
    """ONNX ConvTranspose in numpy, in the inputs' precision: x [N, C, *S], w [C, M/group, *K]. Each kernel offset
    scatters one tensor contraction into the strided positions it reaches; ``begin``/``end`` pads are then cropped
    and ``extra`` (output_padding) extends the end."""
    rank = x.ndim - 2
    n, c = x.shape[:2]
    kernel = w.shape[2:]
    m = w.shape[1] * group
    size = x.shape[2:]
    full = [(size[i] - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 + extra[i] for i in range(rank)]
    xg = x.reshape(n, group, c // group, *size)
    wg = w.reshape(group, c // group, m // group, *kernel)
    out = np.zeros((n, group, m // group, *full), dtype=np.result_type(x, w))
    for offset in np.ndindex(*kernel):
        where = tuple(slice(o * dl, o * dl + (sz - 1) * st + 1, st)
                      for o, dl, sz, st in zip(offset, dilations, size, strides, strict=True))
        out[(slice(None), slice(None), slice(None), *where)] += np.einsum(
            "ngc...,gcm->ngm...", xg, wg[(slice(None), slice(None), slice(None), *offset)])
    crop = tuple(slice(begin[i], full[i] - end[i]) for i in range(rank))
    return out.reshape(n, m, *full)[(slice(None), slice(None), *crop)]


def _conv_pads(auto_pad: str | None, pads: Sequence[int] | None, size: Sequence[int], kernel: Sequence[int],
               strides: Sequence[int], dilations: Sequence[int]) -> tuple[list[int], list[int]]:
    """(begin, end) pads of a Conv, from ``pads`` or ``auto_pad`` as the ONNX spec computes them."""
    rank = len(size)
    if auto_pad in ("SAME_UPPER", "SAME_LOWER"):
        begin, end = [], []
        for i in range(rank):
            total = max((-(-size[i] // strides[i]) - 1) * strides[i] + (kernel[i] - 1) * dilations[i] + 1 - size[i], 0)
            low = total // 2 if auto_pad == "SAME_UPPER" else total - total // 2
            begin.append(low)
            end.append(total - low)
        return begin, end
    if auto_pad == "VALID" or not pads:
        return [0] * rank, [0] * rank
    return list(pads[:rank]), list(pads[rank:])


def _faithful_ops() -> list[type]:
    """Reference-evaluator kernels in place of onnx 1.23's where those are wrong or too slow for a float64 check.

    onnx's Erf rounds every value to float32 (``np.vectorize(math.erf, otypes=["f"])``). Gelu, GroupNormalization
    and MeanVarianceNormalization it runs as their schemas' function bodies, without the kernels given here: Gelu's
    Erf rounds to float32, GroupNormalization-21 computes its statistics in float32 (stash_type), and
    MeanVarianceNormalization adds a float32 epsilon to a float64 value (an error). Its ConvTranspose fails
    for ``group`` > 1 (it reshapes W as if its first axis were the output channels) and loops in Python (a minute
    for a ShuffleNet gradient); Conv and ConvTranspose here are ``conv_nd`` and ``conv_transpose_nd`` (an
    ``output_shape`` goes to onnx's own, one group at a time). Its BatchNormalization 9-13 blends batch statistics
    in by momentum where the node asks for inference (one output); here the spec: running statistics for one output,
    batch statistics otherwise. Its Dropout before opset 12 drops at random; in inference (every opset's default)
    Dropout is the identity. Its LRN sums the squares for the first channels only (it loops over the batch axis).
    Its Softmax, LogSoftmax and Hardmax ignore the opset: before 13 they act on the input flattened to 2D at
    ``axis`` (default 1). Its Pad hands negative pads (a crop, valid ONNX) to numpy.pad, which refuses them."""
    import math

    from onnx.reference.op_run import OpRun
    from onnx.reference.ops.op_conv_transpose import ConvTranspose as OnnxConvTranspose

    erf = np.vectorize(math.erf, otypes=[np.float64])

    class Erf(OpRun):
        op_domain = ""

        def _run(self, x: np.ndarray) -> tuple[np.ndarray]:  # type: ignore[override]
            return (np.asarray(erf(x)).astype(x.dtype) if x.size else x.copy(),)

    class Gelu(OpRun):
        op_domain = ""

        def _run(self, x: np.ndarray, approximate: str = "none") -> tuple[np.ndarray]:  # type: ignore[override]
            if approximate == "tanh":
                inner = np.tanh(np.sqrt(2.0 / np.pi) * (x + 0.044715 * x ** 3))
            else:
                inner = np.asarray(erf(x / np.sqrt(2.0))) if x.size else x.copy()
            return ((0.5 * x * (1.0 + inner)).astype(x.dtype),)

    def _model_opset(op: OpRun, default: int) -> int:
        """The ai.onnx opset of the model a kernel runs in (its semantics can depend on it)."""
        opsets = op.run_params["opsets"]
        return int(opsets.get("", opsets.get("ai.onnx", default)))

    def _bias(out: np.ndarray, b: np.ndarray | None) -> np.ndarray:
        return out if b is None else out + b.reshape((1, -1) + (1,) * (out.ndim - 2))

    class Conv(OpRun):
        op_domain = ""

        def _run(self, X: np.ndarray, W: np.ndarray, B: np.ndarray | None = None,  # type: ignore[override]
                 auto_pad: str | None = None, dilations: Sequence[int] | None = None, group: int | None = None,
                 kernel_shape: Sequence[int] | None = None, pads: Sequence[int] | None = None,
                 strides: Sequence[int] | None = None) -> tuple[np.ndarray]:
            rank = X.ndim - 2
            dilations, strides = list(dilations or [1] * rank), list(strides or [1] * rank)
            begin, end = _conv_pads(auto_pad, pads, X.shape[2:], W.shape[2:], strides, dilations)
            out = conv_nd(X, W, strides, dilations, begin, end, group or 1)
            return (_bias(out, B).astype(X.dtype),)

    class ConvTranspose(OnnxConvTranspose):
        op_domain = ""

        def _run(self, X: np.ndarray, W: np.ndarray, B: np.ndarray | None = None,  # type: ignore[override]
                 auto_pad: str | None = None, dilations: Sequence[int] | None = None, group: int | None = None,
                 kernel_shape: Sequence[int] | None = None, output_padding: Sequence[int] | None = None,
                 output_shape: Sequence[int] | None = None, pads: Sequence[int] | None = None,
                 strides: Sequence[int] | None = None) -> tuple[np.ndarray]:
            g, rank = group or 1, X.ndim - 2
            if output_shape or auto_pad not in (None, "NOTSET"):
                attrs = {"auto_pad": auto_pad, "dilations": dilations, "kernel_shape": kernel_shape,
                         "output_padding": output_padding, "output_shape": output_shape, "pads": pads,
                         "strides": strides}
                one = super()._run
                parts = [one(x, w, None, group=1, **attrs)[0]
                         for x, w in zip(np.split(X, g, axis=1), np.split(W, g, axis=0), strict=True)]
                return (_bias(np.concatenate(parts, axis=1), B).astype(X.dtype),)
            d, st = list(dilations or [1] * rank), list(strides or [1] * rank)
            extra = list(output_padding or [0] * rank)
            begin, end = (list(pads[:rank]), list(pads[rank:])) if pads else ([0] * rank, [0] * rank)
            out = conv_transpose_nd(X, W, st, d, begin, end, extra, g)
            return (_bias(out, B).astype(X.dtype),)

    class BatchNormalization(OpRun):
        op_domain = ""

        def _run(self, x: np.ndarray, scale: np.ndarray, bias: np.ndarray, mean: np.ndarray,  # type: ignore[override]
                 var: np.ndarray, epsilon: float | None = None, momentum: float | None = None,
                 training_mode: int | None = None, **legacy: Any) -> tuple[np.ndarray, ...]:
            eps = 1e-5 if epsilon is None else epsilon
            outs = len(self.onnx_node.output)
            shape = (1, -1) + (1,) * (x.ndim - 2)
            if training_mode != 1 and outs == 1:  # inference: the running statistics
                y = (x - mean.reshape(shape)) / np.sqrt(var.reshape(shape) + eps) * scale.reshape(shape)
                return ((y + bias.reshape(shape)).astype(x.dtype),)
            axes = (0, *range(2, x.ndim))
            batch_mean, batch_var = x.mean(axis=axes), x.var(axis=axes)
            y = (x - batch_mean.reshape(shape)) / np.sqrt(batch_var.reshape(shape) + eps) * scale.reshape(shape)
            y = (y + bias.reshape(shape)).astype(x.dtype)
            mom = 0.9 if momentum is None else momentum
            running = (mean * mom + batch_mean * (1 - mom), var * mom + batch_var * (1 - mom))
            extra = (*running, batch_mean, batch_var) if outs == 5 else running
            return (y, *(v.astype(x.dtype) for v in extra))[:outs]

    class Dropout(OpRun):
        op_domain = ""

        def _run(self, x: np.ndarray, ratio: np.ndarray | None = None,  # type: ignore[override]
                 training_mode: np.ndarray | None = None, seed: int | None = None, **legacy: Any
                 ) -> tuple[np.ndarray, ...]:
            if training_mode is not None and bool(training_mode):
                raise NotImplementedError("Dropout in training mode draws random numbers: no reference for it")
            outs = len(self.onnx_node.output)
            return (x.copy(), np.ones(x.shape, dtype=bool))[:outs]

    class LRN(OpRun):
        op_domain = ""

        def _run(self, x: np.ndarray, alpha: float | None = None, beta: float | None = None,  # type: ignore[override]
                 bias: float | None = None, size: int | None = None) -> tuple[np.ndarray]:
            n = int(size or 1)
            a, b, k = 1e-4 if alpha is None else alpha, 0.75 if beta is None else beta, 1.0 if bias is None else bias
            low, high = (n - 1) // 2, -(-(n - 1) // 2)  # channels below and above c in its window
            sq = np.pad(np.square(x), [(0, 0), (low, high)] + [(0, 0)] * (x.ndim - 2))
            total = np.cumsum(np.concatenate([np.zeros_like(sq[:, :1]), sq], axis=1), axis=1)
            square_sum = total[:, n:] - total[:, :-n] if n else np.zeros_like(x)
            return ((x / (k + a / n * square_sum) ** b).astype(x.dtype),)

    def _softmax_kind(kind: str) -> type:
        """Softmax, LogSoftmax or Hardmax in the semantics of the model's opset: before 13, over the input seen as
        a matrix of the dimensions before ``axis`` (default 1) by those from it; from 13, along ``axis`` (-1)."""

        def _run(self: OpRun, x: np.ndarray, axis: int | None = None) -> tuple[np.ndarray]:
            opset = _model_opset(self, 13)
            given = [a.i for a in self.onnx_node.attribute if a.name == "axis"]
            if opset >= 13:
                ax, shape, flat = (given[0] if given else -1), x.shape, x
            else:
                ax = given[0] if given else 1
                ax = ax + x.ndim if ax < 0 else ax
                shape = x.shape
                flat = x.reshape(int(np.prod(shape[:ax], dtype=np.int64)), -1)
                ax = 1
            if kind == "Hardmax":
                out = np.zeros_like(flat)
                np.put_along_axis(out, np.expand_dims(np.argmax(flat, axis=ax), ax), 1, axis=ax)
            else:
                shifted = flat - flat.max(axis=ax, keepdims=True)
                log_sum = np.log(np.exp(shifted).sum(axis=ax, keepdims=True))
                out = shifted - log_sum if kind == "LogSoftmax" else np.exp(shifted - log_sum)
            return (out.reshape(shape).astype(x.dtype),)

        return type(kind, (OpRun,), {"op_domain": "", "_run": _run})

    class Pad(OpRun):
        op_domain = ""

        def _run(self, data: np.ndarray, pads: np.ndarray | None = None,  # type: ignore[override]
                 constant_value: np.ndarray | None = None, axes: np.ndarray | None = None, mode: str | None = None,
                 value: float | None = None) -> tuple[np.ndarray]:
            r = data.ndim
            chosen = [int(a) % r for a in axes] if axes is not None else list(range(r))
            given = [int(p) for p in np.asarray(pads).reshape(-1)]
            begin, end = [0] * r, [0] * r
            for k, a in enumerate(chosen):
                begin[a], end[a] = given[k], given[k + len(chosen)]
            crop = tuple(slice(max(-b, 0), n - max(-e, 0)) for n, b, e in zip(data.shape, begin, end, strict=True))
            widths = [(max(b, 0), max(e, 0)) for b, e in zip(begin, end, strict=True)]
            how = (mode or "constant").decode() if isinstance(mode, bytes) else (mode or "constant")
            fill = value if constant_value is None else np.asarray(constant_value).reshape(-1)[0]
            kwargs = {"constant_values": 0 if fill is None else fill} if how == "constant" else {}
            return (np.pad(data[crop], widths, mode=how, **kwargs).astype(data.dtype),)

    class GroupNormalization(OpRun):
        op_domain = ""

        def _run(self, x: np.ndarray, scale: np.ndarray, bias: np.ndarray,  # type: ignore[override]
                 epsilon: float | None = None, num_groups: int | None = None, stash_type: int | None = None
                 ) -> tuple[np.ndarray]:
            g, c = int(num_groups or 1), x.shape[1]
            grouped = x.reshape(x.shape[0], g, -1)
            mean, var = grouped.mean(axis=2, keepdims=True), grouped.var(axis=2, keepdims=True)
            xhat = ((grouped - mean) / np.sqrt(var + (1e-5 if epsilon is None else epsilon))).reshape(x.shape)
            opset = _model_opset(self, 21)
            if opset < 21:  # scale and bias per group
                scale, bias = np.repeat(scale, c // g), np.repeat(bias, c // g)
            view = (1, c) + (1,) * (x.ndim - 2)
            return ((xhat * scale.reshape(view) + bias.reshape(view)).astype(x.dtype),)

    class MeanVarianceNormalization(OpRun):
        op_domain = ""

        def _run(self, x: np.ndarray, axes: Sequence[int] | None = None) -> tuple[np.ndarray]:  # type: ignore[override]
            over = tuple(axes) if axes is not None else (0, 2, 3)
            d = x - x.mean(axis=over, keepdims=True)
            return ((d / (np.sqrt((d * d).mean(axis=over, keepdims=True)) + 1e-9)).astype(x.dtype),)

    class Flatten(OpRun):
        op_domain = ""

        def _run(self, x: np.ndarray, axis: int | None = None) -> tuple[np.ndarray]:  # type: ignore[override]
            cut = (1 if axis is None else int(axis)) % (x.ndim + 1) if x.ndim else 0
            # both sizes written out: numpy cannot infer a -1 beside a 0 (an empty batch of boxes)
            return (x.reshape(int(np.prod(x.shape[:cut])), int(np.prod(x.shape[cut:]))),)

    from onnx.reference.ops.op_roi_align import RoiAlign as _RoiAlign

    class RoiAlign(_RoiAlign):
        op_domain = ""

        def _run(self, x: np.ndarray, rois: np.ndarray, batch: np.ndarray,  # type: ignore[override]
                 coordinate_transformation_mode: str | None = None, **attrs: Any) -> tuple[np.ndarray]:
            # before opset 16 there is no such attribute and no half-pixel shift (onnx's kernel fills in the
            # latest schema's default, half_pixel)
            mode = "output_half_pixel" if _model_opset(self, 16) < 16 else coordinate_transformation_mode
            return super()._run(x, rois, batch, coordinate_transformation_mode=mode, **attrs)

    from onnx.reference.ops.op_grid_sample import GridSample as _GridSample

    class GridSample(_GridSample):
        op_domain = ""

        def _run(self, x: np.ndarray, grid: np.ndarray, mode: Any = None,  # type: ignore[override]
                 **attrs: Any) -> Any:
            # opset 16's names of the modes; onnx's kernel knows opset 20's alone
            mode = mode or self.mode
            mode = {"bilinear": "linear", "bicubic": "cubic"}.get(mode, mode)
            return super()._run(x, grid, mode=mode, **attrs)

    class GatherElements(OpRun):
        op_domain = ""

        def _run(self, data: np.ndarray, indices: np.ndarray,  # type: ignore[override]
                 axis: int | None = None) -> tuple[np.ndarray]:
            # (onnx's kernel uses np.choose: at most 64 entries along the axis)
            a = int(axis or 0) % data.ndim
            return (np.take_along_axis(data, np.where(indices < 0, indices + data.shape[a], indices), axis=a),)

    from onnx.reference.ops.op_loop import Loop as _Loop

    class Loop(_Loop):
        """The spec's Loop, where onnx's kernel differs: no condition given runs the trip count (it ran no
        iteration), scan outputs are stacked along a new axis (it concatenated those of rank 2 and more)."""

        op_domain = ""

        def _run(self, trips: Any, cond: Any, *carried: Any, context: Any = None,  # type: ignore[override]
                 attributes: Any = None, bindings: Any = None, **_: Any) -> Any:
            names = self.body.input_names
            state, scans = list(carried), [[] for _ in range(self.K)]
            going, step = True if cond is None else bool(cond), 0
            while going and (trips is None or step < int(trips)):
                feed = {**(context or {}), names[0]: np.array(step, dtype=np.int64), names[1]: np.array(going)}
                feed.update(zip(names[2:], state, strict=True))
                outs = self._run_body(feed, attributes=attributes, bindings=bindings)
                going, state = bool(outs[0]), list(outs[1:1 + self.N])
                for k in range(self.K):
                    scans[k].append(outs[1 + self.N + k])
                step += 1
            stacked = [np.stack(s) if s else np.empty((0,), dtype=np.float32) for s in scans]
            return self._check_and_fix_outputs(tuple(state + stacked))

    softmaxes = [_softmax_kind(k) for k in ("Softmax", "LogSoftmax", "Hardmax")]
    return [Erf, Gelu, Conv, ConvTranspose, BatchNormalization, Dropout, LRN, Pad, GroupNormalization,
            MeanVarianceNormalization, Flatten, RoiAlign, Loop, GridSample, GatherElements,
            *softmaxes, *_experimental_ops()]


def _experimental_ops() -> list[type]:
    """Reference kernels for the experimental ops ONNX removed (onnx's evaluator has none; onnxruntime runs them
    in float32 alone), so an old zoo model (tiny-YOLOv2's ImageScaler) checks in float64."""
    from onnx.reference.op_run import OpRun

    def kernel(name: str, fn: Callable[..., np.ndarray]) -> type:
        def _run(self: OpRun, x: np.ndarray, **attrs: Any) -> tuple[np.ndarray]:
            return (np.asarray(fn(x, **attrs)).astype(x.dtype),)
        return type(name, (OpRun,), {"op_domain": "", "_run": _run})

    def image_scaler(x: np.ndarray, scale: float = 1.0, bias: Sequence[float] | None = None) -> np.ndarray:
        shift = np.zeros(x.shape[1]) if bias is None else np.asarray(bias)
        return scale * x + shift.reshape((1, -1) + (1,) * (x.ndim - 2))

    def crop(x: np.ndarray, border: Sequence[int] | None = None, scale: Sequence[int] | None = None) -> np.ndarray:
        left, top, right, bottom = list(border or [0, 0, 0, 0])
        h, w = (scale[0], scale[1]) if scale else (x.shape[2] - top - bottom, x.shape[3] - left - right)
        return x[:, :, top:top + h, left:left + w]

    return [
        kernel("ImageScaler", image_scaler),
        kernel("Scale", lambda x, scale=1.0: scale * x),
        kernel("Affine", lambda x, alpha=1.0, beta=0.0: alpha * x + beta),
        kernel("ScaledTanh", lambda x, alpha=1.0, beta=1.0: alpha * np.tanh(beta * x)),
        kernel("ParametricSoftplus", lambda x, alpha=1.0, beta=1.0: alpha * np.logaddexp(0.0, beta * x)),
        kernel("Crop", crop),
    ]


class ReferenceSession:
    """onnx.reference.ReferenceEvaluator behind the slice of InferenceSession's interface used here (with the
    kernels of ``_faithful_ops`` in place of onnx's)."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnx.reference import ReferenceEvaluator

        self._model = model
        self._eval = ReferenceEvaluator(model, new_ops=_faithful_ops())

    def get_inputs(self) -> list[ValueArg]:
        init = {i.name for i in self._model.graph.initializer}
        return [ValueArg.of(i) for i in self._model.graph.input if i.name not in init]

    def get_outputs(self) -> list[ValueArg]:
        return [ValueArg.of(o) for o in self._model.graph.output]

    def run(self, names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(v) for v in self._eval.run(list(names) if names else None, dict(feeds))]


class ProviderUnavailable(RuntimeError):
    """The asked-for execution provider is not in this onnxruntime build."""


def providers_for(provider: str) -> list[str]:
    """onnxruntime provider names for 'cpu' or 'cuda'; never a silent fallback."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise ProviderUnavailable(
            f"onnxruntime {ort.__version__} here has no {name} (available: "
            f"{', '.join(ort.get_available_providers())}); install the GPU build with "
            "'pip uninstall onnxruntime && pip install onnxruntime-gpu' on a machine with CUDA"
        )
    return [name] if provider == "cpu" else [name, "CPUExecutionProvider"]


def provider_label(provider: str) -> str:
    """The name of what runs a model for ``provider`` ('cpu', 'cuda', 'reference'), as shown to users; raises
    like ``providers_for`` when that is not available."""
    return "onnx ReferenceEvaluator" if provider == REFERENCE else providers_for(provider)[0]


def explain(e: BaseException) -> str:
    """onnxruntime's error on one line, without its status-code framing; a model stamped with a newer opset
    than this onnxruntime runs gets told how to run it anyway."""
    text = one_line(e)
    newest = re.search(r"official support for domain (\S+) is till opset (\d+)", text)
    if newest:
        used = re.search(r"Opset (\d+) is under development", text)
        return (f"onnxruntime {ort.__version__} runs {newest[1]} opsets up to {newest[2]}"
                + (f" and this model uses opset {used[1]}" if used else "")
                + ": run it with --provider reference (onnx's reference evaluator, slower)")
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return re.sub(r"^Load model from .*? failed: ?", "", text)


def session(
    model: onnx.ModelProto | str, provider: str = "cpu", threads: int | None = None
) -> ort.InferenceSession:
    """An InferenceSession for a ModelProto or a path ('reference': onnx's reference evaluator). A model with
    float64 inputs or outputs runs each node as written (``workarounds.exact_session_options``: no fusions into
    kernels that compute otherwise): who computes in float64, a float64 check first, wants float64's precision."""
    if provider == REFERENCE:
        return ReferenceSession(onnx.load(model) if isinstance(model, str) else model)  # type: ignore[return-value]
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    head = onnx.load(model, load_external_data=False) if isinstance(model, str) else model
    if workarounds.computes_in_float64(head):
        workarounds.exact_session_options(opts)
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    if workarounds.has_remat(head):  # recomputed segments: an order and a planner that let them free memory
        workarounds.remat_session_options(opts)
    source = model if isinstance(model, str) else model.SerializeToString()
    sess = ort.InferenceSession(source, opts, providers=providers_for(provider))
    if provider == "cpu" and workarounds.has_run_time_kernel_conv(head):  # the CPU kernel's hang
        _EMPTY_HANGS.add(sess)
    return sess


_EMPTY_HANGS: weakref.WeakSet[Any] = weakref.WeakSet()  # sessions an empty input would hang (workarounds.py)


def run(
    model: onnx.ModelProto | str | ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    provider: str = "cpu",
) -> dict[str, np.ndarray]:
    """Run and return the named outputs (all outputs by default)."""
    live = isinstance(model, ort.InferenceSession | ReferenceSession)
    sess = model if live else session(model, provider)  # type: ignore[arg-type]
    empty = workarounds.empty_input(feeds) if sess in _EMPTY_HANGS else None
    if empty is not None:
        raise ValueError(workarounds.EMPTY_CONV_MESSAGE.format(name=empty[0], shape=list(empty[1])))
    names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds)), strict=True))


# ---------------------------------------------------------------------------- feeds
DEFAULT_DIM = 1  # size of a symbolic dimension of a random input, unless told otherwise
# random integer inputs: small non-negative values, valid as indices into most axes (class labels of the bundled
# models/cnn.onnx, which has 3 classes, among them)
INT_RANGE = (0, 3)


class InputArg(Protocol):
    """A graph input as onnxruntime lists it (its NodeArg, or a ``ValueArg``): name, ``tensor(float)`` type, shape."""

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def shape(self) -> Sequence[Any]: ...


class FeedError(ValueError):
    """A feed that cannot be had: an unreadable file, an input the model lacks, a type with no random values."""


@dataclass
class Feeds:
    """The arrays to feed, how each was made (``given``, ``random normal, seed 0``...), and the size given to
    each symbolic dimension of the random ones (``?`` for unnamed dimensions)."""

    arrays: dict[str, np.ndarray]
    sources: dict[str, str] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)


def model_inputs(model: onnx.ModelProto) -> list[ValueArg]:
    """The graph inputs a caller feeds (initializers left out), as onnxruntime lists them."""
    init = {i.name for i in model.graph.initializer}
    return [ValueArg.of(i) for i in model.graph.input if i.name not in init]


def numpy_dtype(type_name: str) -> np.dtype[Any] | None:
    """The numpy dtype of onnxruntime's ``tensor(float)`` style type names (``bfloat16`` and the float8 types as
    ml_dtypes has them); None for sequences, maps, strings and the like."""
    m = re.fullmatch(r"tensor\((\w+)\)", type_name)
    if m is None:
        return None
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.DataType.Value(m.group(1).upper())))
    except (KeyError, TypeError, ValueError):
        return None
    return dtype if dtype.kind in "fiub" or _is_float(dtype) else None


def _is_float(dtype: np.dtype[Any]) -> bool:
    return dtype.kind == "f" or dtype.name.startswith(("bfloat", "float"))


def read_feeds(npz: str | os.PathLike[str] | None = None,
               npy: Iterable[tuple[str, str | os.PathLike[str]]] = ()) -> dict[str, np.ndarray]:
    """Arrays from a ``.npz`` file (its keys are input names), then from ``(input name, .npy file)`` pairs, which
    win. A ``FeedError`` names the file that cannot be read."""
    feeds: dict[str, np.ndarray] = {}
    if npz is not None:
        try:
            archive = np.load(npz, allow_pickle=False)
        except FileNotFoundError:
            raise FeedError(f"feeds file '{os.fspath(npz)}' not found") from None
        except (OSError, ValueError, EOFError) as e:
            raise FeedError(f"cannot read '{os.fspath(npz)}' as .npz ({_why_unreadable(npz, e)})") from None
        if not isinstance(archive, np.lib.npyio.NpzFile):  # a plain array: a .npy file, which names no input
            raise FeedError(f"cannot read '{os.fspath(npz)}' as .npz (it is a NumPy .npy file: give it as "
                            "--input NAME=FILE.npy)")
        with archive:
            feeds.update({k: archive[k] for k in archive.files})
    for name, path in npy:
        try:
            array = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise FeedError(f"input {name!r}: file '{os.fspath(path)}' not found") from None
        except (OSError, ValueError, EOFError) as e:
            raise FeedError(f"input {name!r}: cannot read '{os.fspath(path)}' as .npy "
                            f"({_why_unreadable(path, e)})") from None
        if not isinstance(array, np.ndarray):
            array.close()
            raise FeedError(f"input {name!r}: cannot read '{os.fspath(path)}' as .npy (it is a .npz archive: give "
                            "it as --inputs FILE.npz)")
        feeds[name] = array
    return feeds


def _why_unreadable(path: str | os.PathLike[str], e: BaseException) -> str:
    """Why numpy could not read a feeds file, in words: it is empty, a folder, or another kind of file (numpy calls
    any text 'pickled (object) data'); numpy's own words otherwise."""
    try:
        empty = os.path.isfile(path) and os.path.getsize(path) == 0
    except OSError:
        empty = False
    if empty or isinstance(e, EOFError):
        return "it is empty"
    if isinstance(e, IsADirectoryError):
        return "it is a folder"
    if isinstance(e, OSError):
        return one_line(e.strerror or e)
    kind = file_kind(path)
    if kind is not None and "NumPy" not in kind and "zip" not in kind:
        return f"it is {kind}"
    if "pickled" in str(e):  # numpy's words for any bytes that do not start like a .npy or .npz file
        return "not a NumPy file"
    return f"truncated or corrupt: {one_line(e)}"


def make_feeds(
    inputs: Sequence[InputArg],
    given: Mapping[str, np.ndarray] | None = None,
    *,
    seed: int = 0,
    dims: int | Mapping[str, int] | None = None,
) -> Feeds:
    """Feeds for every input: the ``given`` arrays, cast to the input's dtype where they differ, and random values
    for the rest, from ``numpy.random.default_rng(seed)`` in input order: floats standard normal, integers in
    ``INT_RANGE``, bools fair coins. A symbolic dimension gets ``dims[name]``, else ``dims['*']``, else
    ``DEFAULT_DIM`` (an int ``dims`` sizes them all). A given name that is no input is a ``FeedError``."""
    given = dict(given or {})
    names = [i.name for i in inputs]
    for name in given:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f"; inputs: {', '.join(names)}"
            raise FeedError(f"the model has no input named {name!r}{hint}")
    sizes = {"*": dims} if isinstance(dims, int) else dict(dims or {})
    rng = np.random.default_rng(seed)
    out = Feeds({})
    for arg in inputs:
        want = numpy_dtype(arg.type)
        if arg.name in given:
            have = np.asarray(given[arg.name])
            out.sources[arg.name] = "given"
            if want is not None and have.dtype != want:
                out.sources[arg.name] = f"given (cast from {have.dtype.name})"
                have = have.astype(want)
            out.arrays[arg.name] = have
            continue
        out.arrays[arg.name], how = _random(arg, rng, sizes, out.dims)
        out.sources[arg.name] = f"{how}, seed {seed}"
    return out


def _random(arg: InputArg, rng: np.random.Generator, sizes: Mapping[str, int], used: dict[str, int]
            ) -> tuple[np.ndarray, str]:
    """Random values for one input, and how they were drawn; records each symbolic dimension's size in ``used``."""
    dtype = numpy_dtype(arg.type)
    if dtype is None:
        raise FeedError(f"cannot make random values for input {arg.name!r} of type {arg.type}; give it a value "
                        f"(on the command line: --input {arg.name}=FILE.npy)")
    shape = []
    for d in arg.shape:
        if isinstance(d, int) and d >= 0:
            shape.append(d)
            continue
        key = d if isinstance(d, str) and d else "?"
        used[key] = sizes.get(key, sizes.get("*", DEFAULT_DIM))
        shape.append(used[key])
    if _is_float(dtype):
        return rng.standard_normal(shape).astype(dtype), "random normal"
    if dtype.kind == "b":
        return rng.random(shape) < 0.5, "random bool"
    low, high = INT_RANGE
    return rng.integers(low, high, size=shape).astype(dtype), f"random integers in [{low}, {high})"


def random_feeds(model: onnx.ModelProto, rng: np.random.Generator, dims: int | Mapping[str, int] = DEFAULT_DIM
                 ) -> dict[str, np.ndarray]:
    """Random values for every input of ``model``, drawn from ``rng`` as ``make_feeds`` draws them."""
    sizes = {"*": dims} if isinstance(dims, int) else dict(dims)
    return {arg.name: _random(arg, rng, sizes, {})[0] for arg in model_inputs(model)}


def complete_feeds(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None = None, seed: int = 0,
                   dims: int | Mapping[str, int] = DEFAULT_DIM) -> dict[str, np.ndarray]:
    """``feeds`` (cast to the dtypes of the inputs they feed) plus seeded random values for the inputs they leave
    out: ``make_feeds`` on ``model``'s inputs."""
    return make_feeds(model_inputs(model), feeds, seed=seed, dims=dims).arrays
