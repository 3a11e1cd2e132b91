"""Unseen raw exports against the framework's own autograd: models exported as users export them (PyTorch's
TorchScript exporter at opsets 11, 13 and 17; BatchNorm nets with nothing folded, so every parameter keeps its name;
Keras through tf2onnx), differentiated once by ``add_gradients(model, [y], ["@inputs", "@weights"])`` and run in
onnxruntime at every input size listed (dynamic N, H, W or sequence length: one gradient file for all sizes).

PyTorch: each gradient is compared with ``torch.autograd`` in float64, for the input and every weight onnxgrad
differentiates (matched by name, by value, transposed, or as the exporter lays out an RNN's gates); a weight no
parameter explains fails the test. Keras: ``tf.GradientTape`` in float32, for the input and the weights tf2onnx
keeps whole (it folds some, such as BatchNorm, into arithmetic of several variables).

By default a fast sample runs: small look-alikes of the architectures (a ResNet, a MobileNetV3 block with
squeeze-excite and hard-swish, a ShuffleNet unit, an LRASPP-style segmentation head, a ViT, a GRU and an LSTM, a
Keras CNN with SAME-padded strided convs and pools at run-time H and W) and the export patterns that once broke: a
GRU/LSTM at opset 11 whose zero initial state comes from ``ConstantOfShape``; bicubic ``align_corners`` resizing to
a fixed size (sizes: a ``Concat`` with a ``Constant``); EmbeddingBag's Loop, which carries no state.
``ONNXGRAD_LONG=1`` adds every case at every opset, a DenseNet block, torchvision's models (where its model
definitions import), Keras applications and, where the ``transformers`` package is installed (not a dependency),
small random Hugging Face models through both exporters.

PyTorch's default exporter (``dynamo=True``: torch.export, then onnxscript's optimizer) gets its own cases at opsets
18 and 20, torchvision's included in the long run. It folds each eval-mode BatchNorm into its conv (the reference
folds it the same way with torch.fx) and stores the forward's float constants as initializers (``@weights`` takes
them too); there every parameter must be found among the initializers instead.

Tolerance: float32 onnxruntime against float64 torch, relative to each gradient's norm, 1e-4, or ten times the error
of torch's own float32 gradient where that is larger (deep random nets amplify round-off); a gradient that is zero
in exact arithmetic (a bias in front of a normalization) is compared on the scale of the largest gradient.
"""

from __future__ import annotations

import contextlib
import copy
import io
import os
import sys
import types
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
import pytest

torch = pytest.importorskip("torch")
nn = torch.nn
F = torch.nn.functional

from onnxgrad import NEW_INPUT, add_gradients  # noqa: E402
from onnxgrad.runtime import run  # noqa: E402

LONG = os.environ.get("ONNXGRAD_LONG") == "1"
long_only = pytest.mark.skipif(not LONG, reason="a long sweep: set ONNXGRAD_LONG=1")
PRESERVE = {"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
NCHW = {0: "n", 2: "h", 3: "w"}
NTC = {0: "b", 1: "t"}


# ---------------------------------------------------------------------------------------------- look-alikes
def cbr(cin: int, cout: int, k: int = 3, s: int = 1, groups: int = 1, act: Any = nn.ReLU) -> Any:
    return nn.Sequential(nn.Conv2d(cin, cout, k, s, k // 2, groups=groups, bias=False), nn.BatchNorm2d(cout), act())


class Basic(nn.Module):
    """ResNet's basic block, with a strided 1x1 shortcut when the shape changes."""

    def __init__(self, cin: int, cout: int, s: int) -> None:
        super().__init__()
        self.a, self.b = cbr(cin, cout, 3, s), cbr(cout, cout, 3, 1, act=nn.Identity)
        self.short = nn.Identity() if s == 1 and cin == cout else cbr(cin, cout, 1, s, act=nn.Identity)

    def forward(self, x: Any) -> Any:
        return F.relu(self.b(self.a(x)) + self.short(x))


def resnet() -> Any:
    return nn.Sequential(cbr(3, 8, 3, 2), nn.MaxPool2d(3, 2, 1), Basic(8, 8, 1), Basic(8, 12, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(12, 5))


class SE(nn.Module):
    def __init__(self, c: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Conv2d(c, c // 2, 1), nn.Conv2d(c // 2, c, 1)

    def forward(self, x: Any) -> Any:
        return x * F.hardsigmoid(self.fc2(F.relu(self.fc1(F.adaptive_avg_pool2d(x, 1)))))


class Inverted(nn.Module):
    """MobileNetV3's inverted residual: expand, depthwise (strided), squeeze-excite, project."""

    def __init__(self, cin: int, mid: int, cout: int, s: int) -> None:
        super().__init__()
        self.body = nn.Sequential(cbr(cin, mid, 1, act=nn.Hardswish), cbr(mid, mid, 3, s, groups=mid, act=nn.Hardswish),
                                  SE(mid), cbr(mid, cout, 1, act=nn.Identity))
        self.res = s == 1 and cin == cout

    def forward(self, x: Any) -> Any:
        return x + self.body(x) if self.res else self.body(x)


def mobilenet() -> Any:
    return nn.Sequential(cbr(3, 8, 3, 2, act=nn.Hardswish), Inverted(8, 16, 8, 1), Inverted(8, 24, 12, 2),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.2), nn.Linear(12, 4))


def shuffle(x: Any, groups: int = 2) -> Any:
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


class ShuffleUnit(nn.Module):
    """ShuffleNetV2's units: stride 2 runs two branches, stride 1 splits the channels; then a channel shuffle."""

    def __init__(self, c: int, s: int) -> None:
        super().__init__()
        half = c // 2
        self.s = s
        cin = c if s == 2 else half
        self.left = nn.Sequential(cbr(c, c, 3, 2, groups=c, act=nn.Identity), cbr(c, half, 1)) if s == 2 else None
        self.right = nn.Sequential(cbr(cin, half, 1), cbr(half, half, 3, s, groups=half, act=nn.Identity),
                                   cbr(half, half, 1))

    def forward(self, x: Any) -> Any:
        if self.left is not None:
            out = torch.cat([self.left(x), self.right(x)], 1)
        else:
            a, b = x.chunk(2, dim=1)
            out = torch.cat([a, self.right(b)], 1)
        return shuffle(out)


def shufflenet() -> Any:
    return nn.Sequential(cbr(3, 8, 3, 2), ShuffleUnit(8, 2), ShuffleUnit(8, 1), nn.Conv2d(8, 6, 1))


class Dense(nn.Module):
    """DenseNet: each layer (BN, ReLU, 1x1, BN, ReLU, 3x3) sees the concatenation of all before it."""

    def __init__(self, c: int, growth: int, layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            nn.Sequential(nn.BatchNorm2d(c + k * growth), nn.ReLU(), nn.Conv2d(c + k * growth, 2 * growth, 1),
                          nn.BatchNorm2d(2 * growth), nn.ReLU(), nn.Conv2d(2 * growth, growth, 3, padding=1))
            for k in range(layers))

    def forward(self, x: Any) -> Any:
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


def densenet() -> Any:
    return nn.Sequential(nn.Conv2d(3, 8, 3, 2, 1), Dense(8, 4, 3), nn.BatchNorm2d(20), nn.ReLU(),
                         nn.Conv2d(20, 8, 1), nn.AvgPool2d(2, ceil_mode=True), Dense(8, 4, 2))


class Lraspp(nn.Module):
    """An LRASPP-style head: a strided backbone, a gate from global pooling, bilinear resizing to the low-level
    features and back to the input's run-time size."""

    def __init__(self) -> None:
        super().__init__()
        self.low = nn.Sequential(cbr(3, 8, 3, 2), cbr(8, 8, 3, 1, groups=8))
        self.high = nn.Sequential(cbr(8, 12, 3, 2), cbr(12, 16, 3, 2, act=nn.Hardswish))
        self.cbr, self.scale = cbr(16, 8, 1), nn.Conv2d(16, 8, 1, bias=False)
        self.low_cls, self.high_cls = nn.Conv2d(8, 3, 1), nn.Conv2d(8, 3, 1)

    def forward(self, x: Any) -> Any:
        low = self.low(x)
        high = self.high(low)
        y = self.cbr(high) * torch.sigmoid(self.scale(F.adaptive_avg_pool2d(high, 1)))
        y = F.interpolate(y, size=low.shape[-2:], mode="bilinear", align_corners=False)
        y = self.low_cls(low) + self.high_cls(y)
        return F.interpolate(y, size=x.shape[-2:], mode="bilinear", align_corners=False)


class Vit(nn.Module):
    """A ViT: patches by a strided conv, a class token, learned positions, a pre-norm encoder, a linear head."""

    def __init__(self, dim: int = 16, patch: int = 4, tokens: int = 16) -> None:
        super().__init__()
        self.patch = nn.Conv2d(3, dim, patch, patch)
        self.cls = nn.Parameter(torch.randn(1, 1, dim) * 0.1)
        self.pos = nn.Parameter(torch.randn(1, tokens + 1, dim) * 0.1)
        layer = nn.TransformerEncoderLayer(dim, 4, 32, dropout=0.0, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 5)

    def forward(self, x: Any) -> Any:
        t = self.patch(x).flatten(2).transpose(1, 2)
        t = torch.cat([self.cls.expand(t.shape[0], -1, -1), t], 1) + self.pos
        return self.head(self.norm(self.encoder(t))[:, 0])


class Recurrent(nn.Module):
    """A recurrent layer, its output sequence (the zero initial state is PyTorch's default)."""

    def __init__(self, rnn: Any) -> None:
        super().__init__()
        self.rnn = rnn

    def forward(self, x: Any) -> Any:
        return self.rnn(x)[0]


class Resample(nn.Module):
    """op(conv(x)): a 1x1 conv in front, so the weights' gradients cross the op too."""

    def __init__(self, op: Callable[[Any], Any], cout: int = 4) -> None:
        super().__init__()
        self.conv, self.op = nn.Conv2d(3, cout, 1), op

    def forward(self, x: Any) -> Any:
        return self.op(self.conv(x))


class Bag(nn.Module):
    """EmbeddingBag (exported as a Loop with scan outputs only, reading the table from the outer scope) times a
    linear map of x."""

    def __init__(self) -> None:
        super().__init__()
        self.bag, self.linear = nn.EmbeddingBag(10, 5, mode="mean"), nn.Linear(6, 5)
        self.register_buffer("ids", torch.tensor([1, 2, 4, 5, 4, 3, 2, 9]))
        self.register_buffer("offsets", torch.tensor([0, 4]))

    def forward(self, x: Any) -> Any:
        return self.bag(self.ids, self.offsets) * self.linear(x)


# ---------------------------------------------------------------------------------------------- cases
@dataclass
class Case:
    make: Callable[[], Any]
    sizes: list[tuple[int, ...]]  # the first is the export size
    dynamic: dict[int, str] = field(default_factory=dict)
    opsets: tuple[int, ...] = (11, 13, 17)
    export: dict[str, Any] = field(default_factory=dict)
    fast: int | None = None  # the opset of the default run; None: long runs only
    folded: bool = False  # exported with BatchNorm folded into the convs: compare with the folded module
    dynamo: bool = False  # exported by torch.export (the default exporter): BatchNorm folded, compared so
    constant: tuple[str, ...] = ()  # parameters the exporter folds into constants (names ending so): not compared


TORCH: dict[str, Case] = {
    "resnet": Case(resnet, [(2, 3, 32, 32), (1, 3, 40, 24), (3, 3, 29, 35)], NCHW, export=PRESERVE, fast=11),
    "resnet-folded": Case(resnet, [(2, 3, 32, 32), (1, 3, 40, 24)], NCHW, folded=True),
    "mobilenet": Case(mobilenet, [(2, 3, 32, 32), (1, 3, 24, 40), (2, 3, 33, 27)], NCHW, export=PRESERVE, fast=13),
    "shufflenet": Case(shufflenet, [(2, 3, 16, 16), (1, 3, 24, 12)], NCHW, export=PRESERVE, fast=17),
    "densenet": Case(densenet, [(2, 3, 16, 16), (1, 3, 14, 18)], NCHW, export=PRESERVE),
    "lraspp": Case(Lraspp, [(1, 3, 32, 32), (2, 3, 40, 24), (1, 3, 37, 29)], NCHW, export=PRESERVE, fast=17),
    # the exporter writes the encoder's head split with the export's sizes: one size only
    "vit": Case(Vit, [(2, 3, 16, 16)], {}, opsets=(17,), fast=17),
    "gru": Case(lambda: Recurrent(nn.GRU(5, 6, batch_first=True)), [(2, 4, 5), (3, 6, 5)], NTC, fast=11),
    "lstm-bidir": Case(lambda: Recurrent(nn.LSTM(5, 6, num_layers=2, bidirectional=True)), [(4, 2, 5), (6, 3, 5)],
                       {0: "t", 1: "b"}, fast=11),
    "bicubic-align-to-size": Case(
        lambda: Resample(lambda y: F.interpolate(y, size=(9, 11), mode="bicubic", align_corners=True)),
        [(2, 3, 6, 6), (1, 3, 5, 7)], NCHW, fast=11),
    "embedding-bag": Case(Bag, [(2, 6)], {}, fast=13),
    "nearest-x2": Case(lambda: Resample(lambda y: F.interpolate(y, scale_factor=2, mode="nearest")),
                       [(2, 3, 6, 6), (1, 3, 5, 7)], NCHW),
    "pixel-shuffle": Case(lambda: Resample(nn.PixelShuffle(2), 8), [(2, 3, 6, 6), (1, 3, 5, 7)], NCHW),
    "conv-transpose-output-padding": Case(
        lambda: Resample(nn.ConvTranspose2d(4, 3, 3, stride=2, padding=1, output_padding=1)),
        [(2, 3, 6, 6), (1, 3, 5, 7)], NCHW),
    # the default exporter (torch.export; opset 18 is its lowest)
    "resnet-dynamo": Case(resnet, [(2, 3, 32, 32), (1, 3, 40, 24), (3, 3, 29, 35)], NCHW, (18,), dynamo=True,
                          fast=18),
    "mobilenet-dynamo": Case(mobilenet, [(2, 3, 32, 32), (1, 3, 33, 27)], NCHW, (18, 20), dynamo=True),
    "lraspp-dynamo": Case(Lraspp, [(1, 3, 32, 32), (2, 3, 37, 29)], NCHW, (18,), dynamo=True),
    "vit-dynamo": Case(Vit, [(2, 3, 16, 16), (3, 3, 16, 16)], {0: "n"}, (18, 20), dynamo=True, fast=20),
    # torch.export specializes a recurrent layer's sizes: one size
    "gru-dynamo": Case(lambda: Recurrent(nn.GRU(5, 6, batch_first=True)), [(2, 4, 5)], {}, (18,), dynamo=True),
    "lstm-bidir-dynamo": Case(lambda: Recurrent(nn.LSTM(5, 6, num_layers=2, bidirectional=True)), [(4, 2, 5)], {},
                              (18,), dynamo=True),
    "group-instance-norm": Case(
        lambda: Resample(nn.Sequential(nn.GroupNorm(2, 4), nn.Conv2d(4, 4, 3), nn.InstanceNorm2d(4, affine=True))),
        [(2, 3, 9, 9), (1, 3, 7, 11)], NCHW),
}


def _id(name: str, opset: int) -> str:
    return f"{name}-opset{opset}"


FAST = [(n, c.fast) for n, c in TORCH.items() if c.fast is not None]
SLOW = [(n, o) for n, c in TORCH.items() for o in c.opsets if o != c.fast]


# ---------------------------------------------------------------------------------------------- the check
def seeded(module: Any, seed: int = 0) -> Any:
    """module in eval mode with every parameter perturbed (no two alike: zero biases would match any zeros) and
    random BatchNorm statistics."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
        for name, b in module.named_buffers():
            if name.endswith("running_var"):
                b.copy_(0.5 + torch.rand(b.shape, generator=g))
            elif name.endswith("running_mean"):
                b.copy_(0.1 * torch.randn(b.shape, generator=g))
    return module.eval()


def export(module: Any, shape: tuple[int, ...], opset: int, dynamic: dict[int, str],
           options: dict[str, Any]) -> onnx.ModelProto:
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(*shape),), f, dynamo=False, opset_version=opset, input_names=["x"],
                          output_names=["y"], dynamic_axes={"x": dynamic} if dynamic else None, **options)
    return onnx.load_from_string(f.getvalue())


def export_dynamo(module: Any, shape: tuple[int, ...], opset: int, dynamic: dict[int, str],
                  optimize: bool = True) -> onnx.ModelProto:
    """PyTorch's default exporter (torch.export, then onnxscript's optimizer, which folds each eval-mode
    BatchNorm into its conv; ``optimize=False``: not) as a user calls it, the axes of ``dynamic`` left for
    torch.export to decide."""
    pytest.importorskip("onnxscript")
    auto = torch.export.Dim.AUTO
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        program = torch.onnx.export(module, (torch.randn(*shape),), dynamo=True, opset_version=opset,
                                    optimize=optimize, input_names=["x"], output_names=["y"], verbose=False,
                                    dynamic_shapes=({a: auto for a in dynamic},) if dynamic else None)
    return program.model_proto


Layout = Callable[[dict[str, np.ndarray]], np.ndarray]


def rnn_layouts(module: Any) -> list[Layout]:
    """How the exporter lays out each recurrent layer's W, R and B from PyTorch's parameters (gates reordered,
    directions stacked, the two biases concatenated): functions of a name -> array mapping, so the same layout
    applies to the parameters (to match) and to their gradients (to compare)."""
    out: list[Layout] = []
    for prefix, m in module.named_modules():
        if not isinstance(m, nn.LSTM | nn.GRU):
            continue
        order = [0, 3, 1, 2] if isinstance(m, nn.LSTM) else [1, 0, 2]
        dirs = ["", "_reverse"] if m.bidirectional else [""]

        def gates(a: np.ndarray, order: list[int] = order) -> np.ndarray:
            return np.concatenate([a[k * (len(a) // len(order)):(k + 1) * (len(a) // len(order))] for k in order])

        for layer in range(m.num_layers):
            def build(kinds: Sequence[str], layer: int = layer, dirs: list[str] = dirs, pre: str = prefix,
                      gates: Callable[[np.ndarray], np.ndarray] = gates) -> Layout:
                return lambda p: np.stack([np.concatenate([gates(p[f"{pre}.{k}_l{layer}{d}"]) for k in kinds])
                                           for d in dirs])
            out += [build(["weight_ih"]), build(["weight_hh"]), build(["bias_ih", "bias_hh"])]
    return out


def weight_map(model: onnx.ModelProto, module: Any, names: Sequence[str], close: bool = False,
               constants: bool = False, folded: tuple[str, ...] = (), lenient: bool = False) -> dict[str, Layout]:
    """Each differentiated initializer -> how to read it from the module's trainable parameters (by name, by value,
    by value transposed, or an RNN layout); an initializer no parameter explains fails the test, except with
    ``constants`` (the dynamo exporter stores the forward's float constants as initializers too), where instead
    every parameter must be found but those named ending as in ``folded``; ``lenient``: neither (a model whose
    graph leaves parameters out and folds others into new constants)."""
    params = {n: p.detach().numpy() for n, p in module.named_parameters() if p.requires_grad}
    out: dict[str, Layout] = {}
    for t in model.graph.initializer:
        if t.name not in names:
            continue
        a = onnx.numpy_helper.to_array(t)
        if t.name in params and _same(params[t.name], a, close):
            out[t.name] = lambda p, n=t.name: p[n]
            continue
        for n, v in params.items():
            if _same(v, a, close):
                out[t.name] = lambda p, n=n: p[n]
            elif v.ndim == 2 and v.T.shape == a.shape and np.array_equal(v.T, a):
                out[t.name] = lambda p, n=n: p[n].T
            elif v.size == a.size and np.array_equal(v.reshape(a.shape), a):
                out[t.name] = lambda p, n=n, s=a.shape: p[n].reshape(s)
            if t.name in out:
                break
        for layout in rnn_layouts(module) if t.name not in out else []:
            if np.array_equal(layout(params), a):
                out[t.name] = layout
                break
        assert constants or lenient or t.name in out, f"initializer {t.name} {a.shape} matches no parameter"
    if constants and not lenient:
        found = {name for layout in out.values() for name in params if _reads(layout, params, name)}
        want = {name for name in params if not name.endswith(folded)}
        assert found >= want, f"parameters no initializer holds: {sorted(want - found)}"
    return out


def _same(v: np.ndarray, a: np.ndarray, close: bool) -> bool:
    return v.shape == a.shape and (np.array_equal(v, a) or (close and np.allclose(v, a, rtol=1e-5, atol=1e-7)))


def _reads(layout: Layout, params: dict[str, np.ndarray], name: str) -> bool:
    """Whether ``layout`` reads parameter ``name`` (it changes when that parameter does)."""
    before = layout(params)
    changed = {**params, name: params[name] + 1.0}
    after = layout(changed)
    return before.shape != after.shape or not np.array_equal(before, after)


def relative(got: np.ndarray, want: np.ndarray, floor: float) -> float:
    d = np.linalg.norm((got.astype(np.float64) - want).ravel())
    return float(d / max(np.linalg.norm(want.ravel()), floor, 1e-30))


def compare(label: str, got: dict[str, np.ndarray], want64: dict[str, np.ndarray],
            want32: dict[str, np.ndarray]) -> None:
    """Every gradient within 1e-4 of float64 (relative to its norm), or within ten times torch's float32 error."""
    ref = max(float(np.sqrt(np.mean(w ** 2))) for w in want64.values())
    for key, w in want64.items():
        floor = 1e-3 * ref * np.sqrt(w.size)
        err, err32 = relative(got[key], w, floor), relative(want32[key], w, floor)
        assert got[key].shape == w.shape, f"{label}: d/d {key}: shape {got[key].shape}, want {w.shape}"
        assert err <= max(1e-4, 10 * err32), f"{label}: d/d {key}: relative error {err:.1e} (torch f32 {err32:.1e})"


def torch_grads(module: Any, x: np.ndarray, u: np.ndarray, double: bool) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    m = copy.deepcopy(module).double() if double else module
    xt = torch.tensor(x, dtype=torch.float64 if double else torch.float32, requires_grad=True)
    y = m(xt)
    params = {n: p for n, p in m.named_parameters() if p.requires_grad}  # (Whisper's positions are frozen)
    grads = torch.autograd.grad(y, [xt, *params.values()], torch.tensor(u, dtype=y.dtype), allow_unused=True)
    named = {n: (np.zeros(p.shape) if g is None else g.detach().numpy())
             for (n, p), g in zip(params.items(), grads[1:], strict=True)}
    return grads[0].detach().numpy(), {**named, "@y": y.detach().numpy()}


def fold_batchnorm(module: Any, traced: bool = False) -> Any:
    """module with every Conv2d -> BatchNorm2d pair of a Sequential folded into one conv (eval mode); ``traced``:
    every pair that torch.fx finds in the traced forward (a module it cannot trace: the Sequential pairs)."""
    if traced:
        from torch.fx.experimental.optimization import fuse

        try:
            return fuse(module).requires_grad_()
        except Exception:  # torch.fx raises many kinds for code it cannot trace
            pass
    for m in module.modules():
        if isinstance(m, nn.Sequential):
            for k in range(len(m) - 1):
                if isinstance(m[k], nn.Conv2d) and isinstance(m[k + 1], nn.BatchNorm2d):
                    m[k] = torch.nn.utils.fusion.fuse_conv_bn_eval(m[k], m[k + 1])
                    m[k + 1] = nn.Identity()
    return module.requires_grad_()  # the folded bias of a conv without one is made constant


def check_torch(name: str, opset: int) -> None:
    case = TORCH[name]
    torch.manual_seed(0)
    module = seeded(case.make())
    exported = module
    if case.folded or case.dynamo:  # the exporter folds each BatchNorm into its conv; so does the reference
        exported, module = module, fold_batchnorm(copy.deepcopy(module), traced=case.dynamo)
    if case.dynamo:
        model = export_dynamo(exported, case.sizes[0], opset, case.dynamic)
    else:
        model = export(exported, case.sizes[0], opset, case.dynamic, case.export)
    aug = add_gradients(model, ["y"], ["@inputs", "@weights"], [NEW_INPUT])
    (seed,) = aug.new_inputs
    weights = weight_map(model, module, [k for k in aug.gradients if k != "x"], close=case.folded or case.dynamo,
                         constants=case.dynamo, folded=case.constant)
    assert len(weights) >= 2 and set(aug.gradients) >= {"x", *weights}
    assert case.dynamo or set(aug.gradients) == {"x", *weights}
    rng = np.random.default_rng(opset)
    for shape in case.sizes:
        label = f"{name} opset {opset} at {shape}"
        x = rng.standard_normal(shape).astype(np.float32)
        y32 = module(torch.tensor(x)).detach().numpy()
        u = rng.standard_normal(y32.shape).astype(np.float32)
        dx64, p64 = torch_grads(module, x, u, True)
        dx32, p32 = torch_grads(module, x, u, False)
        got = run(aug.model, {"x": x, seed: u})
        assert relative(got["y"], p64["@y"], 0.0) <= max(1e-5, 10 * relative(y32, p64["@y"], 0.0)), label
        compare(label, {"x": got[aug.gradients["x"]], **{k: got[aug.gradients[k]] for k in weights}},
                {"x": dx64, **{k: layout(p64) for k, layout in weights.items()}},
                {"x": dx32, **{k: layout(p32) for k, layout in weights.items()}})


@pytest.mark.parametrize(("name", "opset"), FAST, ids=[_id(*c) for c in FAST])
def test_export_matches_torch(name: str, opset: int) -> None:
    check_torch(name, opset)


@long_only
@pytest.mark.parametrize(("name", "opset"), SLOW, ids=[_id(*c) for c in SLOW])
def test_export_matches_torch_long(name: str, opset: int) -> None:
    check_torch(name, opset)


def test_recurrent_gradient_reads_no_run_time_broadcast() -> None:
    """The gradient of a raw GRU export (run-time batch and length) records the lengths it knows by name, so the
    walk through the cell unbroadcasts nothing at run time: two Shape-based reductions are left for the layer (the
    bias rows and the input's reshape), not one per elementwise op of the cell (24 before)."""
    torch.manual_seed(0)
    model = export(seeded(TORCH["gru"].make()), (2, 4, 5), 17, NTC, {})
    aug = add_gradients(model, ["y"], ["@inputs", "@weights"], [NEW_INPUT])
    assert sum(n.op_type == "NonZero" for n in aug.model.graph.node) <= 2


TILES = [(opset, dynamic) for opset in (13, 17) for dynamic in (False, True)]


@pytest.mark.parametrize(("opset", "dynamic"), TILES, ids=[f"opset{o}-{'nchw' if d else 'static'}" for o, d in TILES])
def test_tile_that_adds_axes_matches_torch(opset: int, dynamic: bool) -> None:
    """TorchScript (opset 13+) writes ``tile`` with more repeats than x has axes as Ifs on
    ``Size(Shape(x)) - len(repeats)``, x reshaped to the higher rank in a branch; Tile's gradient needs that rank,
    which only folding the conditions gives ("needs the rank of '/If_1_output_0'" before). The exporter declares y
    one axis short (onnxruntime warns and runs), so the seed is ones, built from y's run-time shape."""
    torch.manual_seed(0)
    module = seeded(Resample(lambda y: y.tile(2, 1, 1, 1, 3).mean(0)))
    model = export(module, (2, 3, 6, 6), opset, NCHW if dynamic else {}, {})
    aug = add_gradients(model, ["y"], ["@inputs", "@weights"])
    weights = weight_map(model, module, [k for k in aug.gradients if k != "x"])
    rng = np.random.default_rng(opset)
    for shape in [(2, 3, 6, 6), (1, 3, 5, 7)] if dynamic else [(2, 3, 6, 6)]:
        x = rng.standard_normal(shape).astype(np.float32)
        got = run(aug.model, {"x": x})
        y32 = module(torch.tensor(x)).detach().numpy()
        dx64, p64 = torch_grads(module, x, np.ones(y32.shape, np.float32), True)
        dx32, p32 = torch_grads(module, x, np.ones(y32.shape, np.float32), False)
        compare(f"tile at opset {opset}, {shape}",
                {"x": got[aug.gradients["x"]], **{k: got[aug.gradients[k]] for k in weights}},
                {"x": dx64, **{k: layout(p64) for k, layout in weights.items()}},
                {"x": dx32, **{k: layout(p32) for k, layout in weights.items()}})


# ---------------------------------------------------------------------------------------------- torchvision
def torchvision_models() -> Any:
    """torchvision.models, or a skip. Its model definitions are plain Python; where the wheel's compiled operators
    do not load (a CUDA build beside a CPU torch), only the registration of their fake kernels fails, so that module
    is left out and the models still import."""
    try:
        import torchvision
    except ImportError:
        pytest.skip("torchvision is not installed")
    except RuntimeError:
        for name in [m for m in sys.modules if m.startswith("torchvision")]:
            del sys.modules[name]
        sys.modules["torchvision._meta_registrations"] = types.ModuleType("torchvision._meta_registrations")
        import torchvision
    return torchvision.models


VISION = {  # name -> (constructor arguments, input size, dynamic axes, opsets)
    "resnet18": ({}, (2, 3, 64, 64), {0: "n"}, (11, 13, 17)),
    "mobilenet_v2": ({}, (2, 3, 64, 64), {0: "n"}, (11, 17)),
    "mobilenet_v3_small": ({}, (2, 3, 64, 64), {0: "n"}, (11, 17)),
    "squeezenet1_1": ({}, (2, 3, 64, 64), {0: "n"}, (11, 17)),
    "shufflenet_v2_x0_5": ({}, (2, 3, 64, 64), {0: "n"}, (11, 17)),
    "efficientnet_b0": ({}, (2, 3, 64, 64), {0: "n"}, (11, 17)),
    "regnet_y_400mf": ({}, (2, 3, 64, 64), {0: "n"}, (11, 17)),
    "googlenet": ({"aux_logits": False, "init_weights": True}, (2, 3, 64, 64), {0: "n"}, (11, 17)),
    "swin_t": ({}, (1, 3, 64, 64), {}, (17,)),
    "convnext_tiny": ({}, (2, 3, 64, 64), {0: "n"}, (11, 17)),  # 7x7 depthwise convs, LayerNorm, exported GELU
    "segmentation.lraspp_mobilenet_v3_large": ({"weights_backbone": None}, (1, 3, 64, 64), NCHW, (11, 17)),
    "segmentation.deeplabv3_mobilenet_v3_large": ({"weights_backbone": None, "aux_loss": False}, (1, 3, 64, 64),
                                                  NCHW, (11, 17)),
}
VISION_CASES = [(n, o) for n, (_, _, _, opsets) in VISION.items() for o in opsets]


class Out(nn.Module):
    """A segmentation model's ``out`` tensor."""

    def __init__(self, m: Any) -> None:
        super().__init__()
        self.m = m

    def forward(self, x: Any) -> Any:
        y = self.m(x)
        return y["out"] if isinstance(y, dict) else y


@long_only
@pytest.mark.parametrize(("name", "opset"), VISION_CASES, ids=[_id(*c) for c in VISION_CASES])
def test_torchvision_matches_torch(name: str, opset: int) -> None:
    models = torchvision_models()
    kwargs, shape, dynamic, _ = VISION[name]
    make = models
    for part in name.split("."):
        make = getattr(make, part)
    _, c, h, w = shape
    sizes = [shape, (1, c, h + 8, w - 8) if dynamic == NCHW else (1, c, h, w)]
    TORCH[f"torchvision.{name}"] = Case(lambda: Out(make(weights=None, **kwargs)), sizes, dynamic, (opset,),
                                        PRESERVE)
    check_torch(f"torchvision.{name}", opset)


VISION_DYNAMO = ["resnet18", "mobilenet_v3_small", "efficientnet_b0", "convnext_tiny", "swin_t",
                 "segmentation.deeplabv3_mobilenet_v3_large"]


@long_only
@pytest.mark.parametrize("name", VISION_DYNAMO)
def test_torchvision_dynamo_export_matches_torch(name: str) -> None:
    """The same models through the default (dynamo) exporter at opset 18, with BatchNorm folded as it folds it."""
    make = torchvision_models()
    for part in name.split("."):
        make = getattr(make, part)
    kwargs, (_, c, h, w), dynamic, _ = VISION[name]
    sizes = [(2, c, h, w), (1, c, h + 8, w - 8) if dynamic == NCHW else (3, c, h, w)]
    TORCH[f"torchvision.{name}-dynamo"] = Case(lambda: Out(make(weights=None, **kwargs)), sizes,
                                               NCHW if dynamic == NCHW else {0: "n"}, (18,), dynamo=True,
                                               constant=("relative_position_bias_table",))  # swin: a Gather of it
    check_torch(f"torchvision.{name}-dynamo", 18)


DETECTORS = {  # torchvision.models.detection constructor -> arguments (few proposals, small images)
    "maskrcnn_resnet50_fpn": {"num_classes": 5, "box_score_thresh": 0.0, "rpn_pre_nms_top_n_test": 50,
                              "rpn_post_nms_top_n_test": 20, "box_detections_per_img": 10, "min_size": 128,
                              "max_size": 160},
    "keypointrcnn_resnet50_fpn": {"num_classes": 2, "num_keypoints": 3, "box_score_thresh": 0.0,
                                  "rpn_pre_nms_top_n_test": 50, "rpn_post_nms_top_n_test": 20,
                                  "box_detections_per_img": 10, "min_size": 128, "max_size": 160},
    "retinanet_resnet50_fpn": {"num_classes": 5, "score_thresh": 0.0, "detections_per_img": 10,
                               "topk_candidates": 20, "min_size": 128, "max_size": 160},
}
DETECTOR_CASES = [(n, o) for n in DETECTORS for o in (11, 17)]


@long_only
@pytest.mark.parametrize(("name", "opset"), DETECTOR_CASES, ids=[_id(*c) for c in DETECTOR_CASES])
def test_torchvision_detector_matches_torch(name: str, opset: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A detector's image gradient of u . scores + v . boxes (+ w . masks, which a Loop pastes into the image, or the
    keypoints, which a Loop reads off heatmaps) through the resize of its transform, the FPN, the region proposals,
    NMS, RoiAlign (boxes included: the reference's RoiAlign differentiates them as the ONNX graph's derivative does,
    where torchvision's own backward leaves them out) and the box decoding, against torch autograd. Its weights are
    drawn wide, so that scores differ (ties would let NMS and TopK order them differently). torch detaches the
    proposals' box deltas, which the ONNX graph cannot say: the gradient is stopped there."""
    from tests.torchvision_ops import differentiable_roi_align, install

    detection = torchvision_models().detection
    install()
    torch.manual_seed(0)
    model = getattr(detection, name)(weights=None, weights_backbone=None, **DETECTORS[name]).eval()
    draw = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=draw) * ((2.0 / p[0].numel()) ** 0.5 if p.dim() > 1 else 0.1))
    image = torch.rand(3, 160, 144, generator=draw)
    with torch.no_grad():
        names = list(model([image])[0])
    buffer = io.BytesIO()
    with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()):
        warnings.simplefilter("ignore")
        torch.onnx.export(model, ([image],), buffer, opset_version=opset, dynamo=False, input_names=["image"],
                          output_names=names)
    proto = onnx.load_from_string(buffer.getvalue())
    stops = [n.output[0] for n in proto.graph.node if n.op_type == "Conv" and "/rpn/head/bbox_pred" in n.name]
    ys = [k for k in ("scores", "boxes", "masks", "keypoints") if k in names]
    aug = add_gradients(proto, ys, ["image"], [NEW_INPUT] * len(ys), stop_gradients=stops)

    monkeypatch.setattr(sys.modules["torchvision.ops.poolers"], "roi_align", differentiable_roi_align)
    x = image.clone().requires_grad_(True)
    out = model([x])[0]
    rng = np.random.default_rng(2)
    seeds = [rng.standard_normal(out[k].shape).astype(np.float32) for k in ys]
    sum((out[k] * torch.from_numpy(u)).sum() for k, u in zip(ys, seeds, strict=True)).backward()
    got = run(aug.model, {"image": image.numpy(), **dict(zip(aug.new_inputs, seeds, strict=True))})
    np.testing.assert_allclose(got["boxes"], out["boxes"].detach().numpy(), atol=1e-3)  # the same detections
    want, have = x.grad.numpy(), got[aug.gradients["image"]]  # type: ignore[index, union-attr]
    # float32 round-off: 0.3% for Mask R-CNN (torch's own float32 gradient of its masks is 0.6% off its float64 one)
    assert np.linalg.norm(have - want) <= 1e-2 * np.linalg.norm(want), (np.abs(have - want).max(), np.abs(want).max())


# ---------------------------------------------------------------------------------------------- Keras
def keras_case(name: str) -> tuple[Any, list[tuple[int, ...]]]:
    import tensorflow as tf

    keras, layers = tf.keras, tf.keras.layers
    if name == "cnn-same-stride":  # SAME pads of strided convs and pools at run-time H, W
        i = keras.Input((None, None, 3))
        h = layers.Conv2D(6, 3, strides=2, padding="same")(i)
        h = layers.BatchNormalization()(h)
        h = layers.MaxPooling2D(3, strides=2, padding="same")(layers.ReLU()(h))
        h = layers.DepthwiseConv2D(3, strides=2, padding="same", activation="swish")(h)
        h = layers.Conv2D(4, 3, dilation_rate=2, padding="same")(h)
        return keras.Model(i, layers.Dense(3)(layers.GlobalAveragePooling2D()(h))), [(2, 13, 11, 3), (1, 16, 9, 3)]
    if name == "unet":
        i = keras.Input((None, None, 3))
        a = layers.Conv2D(8, 3, padding="same", activation="relu")(i)
        b = layers.SeparableConv2D(12, 3, strides=2, padding="same", activation="relu")(a)
        u = layers.Conv2DTranspose(8, 3, strides=2, padding="same")(b)
        return keras.Model(i, layers.Conv2D(2, 1)(layers.Concatenate()([u, a]))), [(2, 8, 8, 3), (1, 12, 4, 3)]
    if name == "text-attention":
        i = keras.Input((None, 16))
        h = layers.LayerNormalization()(layers.MultiHeadAttention(4, 8)(i, i) + i)
        h = layers.Bidirectional(layers.GRU(6, return_sequences=True))(h)
        h = layers.Conv1D(8, 3, padding="causal", dilation_rate=2)(h)
        return keras.Model(i, layers.GlobalAveragePooling1D()(h)), [(2, 5, 16), (3, 7, 16)]
    apps = {"MobileNetV2": keras.applications.MobileNetV2, "ResNet50": keras.applications.ResNet50,
            "EfficientNetB0": keras.applications.EfficientNetB0}
    base = apps[name](include_top=False, input_shape=(None, None, 3), weights=None)
    top = layers.Dense(10)(layers.GlobalAveragePooling2D()(base.outputs[0]))
    return keras.Model(base.inputs, top), [(2, 64, 64, 3), (1, 56, 72, 3)]


KERAS_FAST = [("cnn-same-stride", 13)]
KERAS_SLOW = [(n, o) for n in ("cnn-same-stride", "unet", "text-attention", "MobileNetV2", "ResNet50",
                               "EfficientNetB0") for o in (13, 17) if (n, o) not in KERAS_FAST]


def keras_transforms(a: np.ndarray) -> list[Callable[[np.ndarray], np.ndarray]]:
    """Ways tf2onnx lays out a variable: as is, transposed (any axis order: HWIO kernels become OIHW), reshaped."""
    import itertools

    out: list[Callable[[np.ndarray], np.ndarray]] = [lambda v: v]
    out += [lambda v, p=p: np.transpose(v, p) for p in itertools.permutations(range(a.ndim))][1:]
    return out


def check_keras(name: str, opset: int) -> None:
    pytest.importorskip("tf2onnx")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    import tf2onnx

    tf.keras.utils.set_random_seed(0)
    model, sizes = keras_case(name)
    rng = np.random.default_rng(0)
    for v in model.trainable_variables:  # no two alike
        v.assign(v.numpy() + rng.normal(0, 0.05, v.shape).astype(np.float32))
    for v in model.non_trainable_variables:
        if "moving_variance" in v.path:
            v.assign(rng.uniform(0.5, 1.5, v.shape).astype(np.float32))
        elif "moving_mean" in v.path:
            v.assign(rng.normal(0, 0.1, v.shape).astype(np.float32))
    shape = [None] * (len(model.inputs[0].shape) - 1) + [model.inputs[0].shape[-1]]
    spec = (tf.TensorSpec(shape, tf.float32, name="x"),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto, _ = tf2onnx.convert.from_keras(model, input_signature=spec, opset=opset)
    y = proto.graph.output[0].name
    aug = add_gradients(proto, [y], ["@inputs", "@weights"], [NEW_INPUT])
    variables = {v.path: v for v in model.trainable_variables}
    values = {p: v.numpy() for p, v in variables.items()}
    found: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {}
    for t in proto.graph.initializer:
        if aug.gradients.get(t.name) is None:  # tf2onnx keeps copies of some kernels that only Shape reads
            continue
        a = onnx.numpy_helper.to_array(t)
        for path, v in values.items():
            hit = [f for f in keras_transforms(v) if f(v).size == a.size and np.array_equal(f(v).reshape(a.shape), a)]
            if hit:
                found[t.name] = (path, lambda g, f=hit[0], s=a.shape: f(g).reshape(s))
                break
    # a few initializers are tf2onnx's own arithmetic of several variables (a folded BatchNorm, the attention's
    # fused projections): the input and the weights it kept whole are compared
    assert len(found) >= 3, found
    # inputs clear of float32 near-ties: at the first draw of the stream the weights used, onnxruntime's float32
    # forward of ResNet50 flips a max-pool near-tie that TF's float32 and float64 agree on (onnxgrad 2e-2 from TF
    # float64 there; 1e-6 at that input plus 1e-3 noise, and at the next draw, where TF's float32 flips one instead)
    rng = np.random.default_rng(1)
    for shape in sizes:
        x = rng.standard_normal(shape).astype(np.float32)
        xt = tf.constant(x)
        with tf.GradientTape() as tape:
            tape.watch(xt)
            out = model(xt, training=False)
        u = rng.standard_normal(out.shape).astype(np.float32)
        want = tape.gradient(out, [xt, *[variables[p] for p, _ in found.values()]], output_gradients=tf.constant(u))
        got = run(aug.model, {"x": x, aug.new_inputs[0]: u})
        wants = {"x": want[0].numpy()} | {k: f(np.asarray(w))
                                          for (k, (_, f)), w in zip(found.items(), want[1:], strict=True)}
        ref = max(float(np.sqrt(np.mean(w ** 2))) for w in wants.values())
        assert relative(got[y], out.numpy().astype(np.float64), 0.0) < 1e-5
        for key, w in wants.items():
            err = relative(got[aug.gradients[key]], w.astype(np.float64), 1e-3 * ref * np.sqrt(w.size))
            assert err < 1e-4, f"{name} opset {opset} at {shape}: d/d {key}: relative error {err:.1e}"


@pytest.mark.parametrize(("name", "opset"), KERAS_FAST, ids=[_id(*c) for c in KERAS_FAST])
def test_keras_export_matches_gradient_tape(name: str, opset: int) -> None:
    check_keras(name, opset)


@long_only
@pytest.mark.parametrize(("name", "opset"), KERAS_SLOW, ids=[_id(*c) for c in KERAS_SLOW])
def test_keras_export_matches_gradient_tape_long(name: str, opset: int) -> None:
    check_keras(name, opset)


CHECKED = [("vit-dynamo", True), ("lstm-bidir-dynamo", True), ("mobilenet-dynamo", False), ("lraspp-dynamo", False),
           ("resnet-dynamo", False)]


@pytest.mark.parametrize(("name", "fast"), CHECKED, ids=[n for n, _ in CHECKED])
def test_dynamo_export_checks_with_every_float_initializer(name: str, fast: bool) -> None:
    """``check`` with every float input and initializer as an x: the dynamo exporter stores constants as
    initializers (GELU's numbers, a stacked LSTM's zero state shared by its layers), so ``@weights`` differentiates
    values no parameter holds. Two wrong gradients were found this way (the GELU fusion held its numbers constant;
    the second LSTM layer lost its part of the shared state)."""
    if not (fast or LONG):
        pytest.skip("a long sweep: set ONNXGRAD_LONG=1")
    from onnxgrad.check import check_model

    case = TORCH[name]
    torch.manual_seed(0)
    model = export_dynamo(seeded(case.make()), case.sizes[0], 18, case.dynamic)
    xs = [v.name for v in model.graph.input] + [t.name for t in model.graph.initializer
                                                 if t.data_type == onnx.TensorProto.FLOAT]
    report = check_model(model, ["y"], xs)
    assert report.ok, [(r.x, r.status, r.rel_error) for r in report.rows if r.status != "ok"]


# ---------------------------------------------------------------------------------------------- Hugging Face
def transformers_library() -> Any:
    """The transformers package, or a skip (not a dependency; its image utilities import torchvision, which
    ``torchvision_models`` makes importable where the wheel's compiled operators do not load)."""
    pytest.importorskip("transformers")
    with contextlib.suppress(pytest.skip.Exception):
        torchvision_models()
    import transformers

    return transformers


class Hf(nn.Module):
    """A transformers model called with one float tensor (``inputs_embeds``, ``pixel_values``, ...; an encoder-decoder
    also gets half of it as the decoder's embeddings), returning one output tensor."""

    def __init__(self, model: Any, key: str, out: str = "last_hidden_state", decoder: bool = False) -> None:
        super().__init__()
        self.m, self.key, self.out, self.decoder = model, key, out, decoder

    def forward(self, x: Any) -> Any:
        extra = {"decoder_inputs_embeds": 0.5 * x[:, :5]} if self.decoder else {}
        return getattr(self.m(**{self.key: x}, **extra), self.out)


TEXT = {0: "b", 1: "t"}
SMALL = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 64}
SEQ = [(2, 7, 32), (3, 11, 32)]  # (batch, length, features): the export size, then another
HF: dict[str, tuple[str, str, dict[str, Any], list[tuple[int, ...]], dict[int, str]]] = {
    # name: (model class, config class, config, sizes (the first exported), dynamic axes); small random models
    "bert": ("BertModel", "BertConfig", SMALL, SEQ, TEXT),
    "gpt2": ("GPT2Model", "GPT2Config", {**SMALL, "n_embd": 32, "n_layer": 2, "n_head": 4}, SEQ, TEXT),
    # RMSNorm, rotary embeddings, SiLU gating, grouped key/value heads
    "llama": ("LlamaModel", "LlamaConfig", {**SMALL, "num_key_value_heads": 2}, SEQ, TEXT),
    "t5": ("T5Model", "T5Config", {"d_model": 32, "d_kv": 8, "num_heads": 4, "d_ff": 64, "num_layers": 1,
                                   "num_decoder_layers": 1}, SEQ, TEXT),
    "deberta-v2": ("DebertaV2Model", "DebertaV2Config", SMALL, SEQ, TEXT),
    "bloom": ("BloomModel", "BloomConfig", {**SMALL, "n_layer": 2, "n_head": 4}, SEQ, TEXT),  # ALiBi
    "convbert": ("ConvBertModel", "ConvBertConfig", {**SMALL, "embedding_size": 32}, SEQ, TEXT),
    "swin": ("SwinModel", "SwinConfig", {"image_size": 32, "patch_size": 4, "embed_dim": 16, "depths": [2, 2],
                                         "num_heads": [2, 4], "window_size": 4}, [(2, 3, 32, 32)], {}),
    "segformer": ("SegformerForSemanticSegmentation", "SegformerConfig",
                  {"num_encoder_blocks": 2, "depths": [1, 1], "sr_ratios": [2, 1], "hidden_sizes": [8, 16],
                   "num_attention_heads": [1, 2], "decoder_hidden_size": 16, "num_labels": 3},
                  [(2, 3, 32, 32), (3, 3, 40, 36)], NCHW),
    # a strided conv feature extractor with GroupNorm, a weight-normed grouped positional conv
    "wav2vec2": ("Wav2Vec2Model", "Wav2Vec2Config",
                 {**SMALL, "conv_dim": (8, 8), "conv_stride": (5, 2), "conv_kernel": (10, 3),
                  "num_feat_extract_layers": 2, "num_conv_pos_embeddings": 8, "num_conv_pos_embedding_groups": 4},
                 [(2, 400), (3, 560)], TEXT),
    # a selective state-space scan, unrolled over the length (which the export therefore fixes; TorchScript's
    # export of it does not run: a Tile's repeats are not int64)
    "mamba": ("MambaModel", "MambaConfig", {"hidden_size": 16, "state_size": 4, "num_hidden_layers": 2,
                                            "conv_kernel": 3}, [(2, 7, 16), (3, 7, 16)], {0: "b"}),
}
HF_KEYS = {"Wav2Vec2Model": "input_values", "SwinModel": "pixel_values"}
HF_CASES = [(n, e) for n in HF for e in ("torchscript", "dynamo") if (n, e) != ("mamba", "torchscript")]


def hf_module(name: str) -> Any:
    transformers = transformers_library()
    model_class, config_class, config, _, _ = HF[name]
    cfg = getattr(transformers, config_class)(**config)
    cfg._attn_implementation = "eager"  # TorchScript cannot export grouped-query SDPA
    key = HF_KEYS.get(model_class, "pixel_values" if "Segformer" in model_class else "inputs_embeds")
    return Hf(getattr(transformers, model_class)(cfg), key, "logits" if "Segmentation" in model_class else
              "last_hidden_state", decoder=model_class == "T5Model")


@long_only
@pytest.mark.parametrize(("name", "exporter"), HF_CASES, ids=[f"{n}-{e}" for n, e in HF_CASES])
def test_transformers_model_matches_torch(name: str, exporter: str) -> None:
    """Hugging Face models as their users export them (TorchScript at opset 17 with run-time batch and length or
    size, or the dynamo exporter at opset 18), random weights: the gradients of the input and of every
    initializer that holds a trainable parameter (``weight_map``, leniently) against torch.autograd in float64, at
    every size from one gradient file. Parameters the graph does not read (a pooler, the token embeddings beside
    ``inputs_embeds``) have no initializer; at least ten must be found."""
    module = seeded(hf_module(name))
    _, _, _, sizes, dynamic = HF[name]
    if exporter == "dynamo":
        model = export_dynamo(module, sizes[0], 18, dynamic)
    else:
        model = export(module, sizes[0], 17, dynamic, {})
    aug = add_gradients(model, ["y"], ["@inputs", "@weights"], [NEW_INPUT])
    (seed,) = aug.new_inputs
    weights = weight_map(model, module, [k for k in aug.gradients if k != "x"], close=True, lenient=True)
    assert len(weights) >= 10, sorted(weights)
    rng = np.random.default_rng(0)
    for shape in sizes:
        label = f"{name} ({exporter}) at {shape}"
        x = rng.standard_normal(shape).astype(np.float32)
        u = rng.standard_normal(module(torch.tensor(x)).shape).astype(np.float32)
        dx64, p64 = torch_grads(module, x, u, True)
        dx32, p32 = torch_grads(module, x, u, False)
        got = run(aug.model, {"x": x, seed: u})
        assert relative(got["y"], p64["@y"], 0.0) <= 1e-5, label
        compare(label, {"x": got[aug.gradients["x"]], **{k: got[aug.gradients[k]] for k in weights}},
                {"x": dx64, **{k: layout(p64) for k, layout in weights.items()}},
                {"x": dx32, **{k: layout(p32) for k, layout in weights.items()}})
