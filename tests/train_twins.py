"""PyTorch twins of the models the train-step tests train, and the two loops that train them side by side: the
train-step model in onnxruntime, and torch.optim on the same initial weights, data and learning rates."""

from __future__ import annotations

import io
import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from onnx import numpy_helper

from onnxgrad.check import convert_floats
from onnxgrad.train import TrainStep

F = torch.nn.functional
MODELS = Path(__file__).resolve().parent.parent / "models"
Batch = dict[str, np.ndarray]


@dataclass
class Twin:
    """An ONNX model, its loss (a value, or a --loss spec), a PyTorch loss over named torch params, the data."""

    name: str
    model: onnx.ModelProto
    loss: str
    torch_loss: Callable[[dict[str, Any], Batch], Any]
    batches: Callable[[int, np.random.Generator], Batch]
    module: Any = None  # a torch.nn.Module holding the params (and buffers), when the twin is one
    # params whose gradient is 0 in exact arithmetic (the keys' bias under softmax): what both sides compute is
    # rounding noise, which Adam's m / sqrt(v) scales up to steps of size lr, so no two implementations agree
    frozen: list[str] = field(default_factory=list)


def weights(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


# ---------------------------------------------------------------------------------------------- the MLP
def mlp() -> Twin:
    """models/mlp.onnx in float64: mean((tanh(x W1 + b1) W2 + b2 - target)^2)."""
    model = convert_floats(onnx.load(MODELS / "mlp.onnx"))

    def loss(p: dict[str, Any], b: Batch) -> Any:
        pred = torch.tanh(torch.from_numpy(b["x"]) @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]
        return torch.mean((pred - torch.from_numpy(b["target"])) ** 2)

    def batch(n: int, rng: np.random.Generator) -> Batch:
        x = rng.standard_normal((n, 4))
        return {"x": x, "target": np.sin(x[:, :3]) + 0.1 * rng.standard_normal((n, 3))}

    return Twin("mlp", model, "loss", loss, batch)


# ---------------------------------------------------------------------------------------------- the CNN
def cnn_module() -> Any:
    """A small image classifier with BatchNorm (439 params): 1x8x8 images, 3 classes. The convolution before the
    BatchNorm has no bias, as usual: BatchNorm removes it, its gradient is 0 but for rounding noise."""
    nn = torch.nn
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(), nn.MaxPool2d(2),
                        nn.Conv2d(4, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2), nn.Flatten(), nn.Linear(32, 3))
    with torch.no_grad():  # distinct values everywhere: the exporter merges equal initializers
        bn = net[1]
        bn.weight.copy_(1.0 + 0.1 * torch.randn(4))
        bn.bias.copy_(0.1 * torch.randn(4))
        bn.running_mean.copy_(0.1 * torch.randn(4))
        bn.running_var.copy_(1.0 + 0.2 * torch.rand(4))
    return net


def export(net: Any, example: Any, input_name: str, output_name: str, opset: int = 17) -> onnx.ModelProto:
    """torch.onnx.export with the TorchScript exporter, in eval mode, BatchNorm kept as BatchNormalization."""
    net.eval()
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (example,), f, dynamo=False, input_names=[input_name], output_names=[output_name],
                          dynamic_axes={input_name: {0: "batch"}, output_name: {0: "batch"}}, opset_version=opset,
                          training=torch.onnx.TrainingMode.PRESERVE)
    return onnx.load_from_string(f.getvalue())


def cnn() -> Twin:
    """The CNN, BatchNorm in training mode on the PyTorch side (``module.train()``) and in the train step."""
    net = cnn_module()
    model = export(net, torch.zeros(2, 1, 8, 8), "image", "logits")
    net.train()

    def loss(p: dict[str, Any], b: Batch) -> Any:
        return F.cross_entropy(net(torch.from_numpy(b["image"])), torch.from_numpy(b["labels"]))

    def batch(n: int, rng: np.random.Generator) -> Batch:
        labels = rng.integers(0, 3, n)
        image = rng.standard_normal((n, 1, 8, 8)).astype(np.float32) + labels[:, None, None, None]
        return {"image": image.astype(np.float32), "labels": labels.astype(np.int64)}

    return Twin("cnn", model, "cross_entropy:logits:labels", loss, batch, net)


# -------------------------------------------------------------------------------------- the transformer
def transformer() -> Twin:
    """models/transformer_block.onnx: pre-norm, 2-head self-attention, GELU (erf) MLP, loss mean(y^2)."""
    model = onnx.load(MODELS / "transformer_block.onnx")

    def loss(p: dict[str, Any], b: Batch) -> Any:
        x = torch.from_numpy(b["x"])
        batch, seq, d = x.shape

        def heads(t: Any) -> Any:
            return t.reshape(batch, seq, 2, d // 2)

        ln1 = F.layer_norm(x, (d,), p["ln1.weight"], p["ln1.bias"], 1e-5)
        q, k, v = (ln1 @ p[f"attn.{n}.weight"] + p[f"attn.{n}.bias"] for n in "qkv")
        q, k, v = heads(q).permute(0, 2, 1, 3), heads(k).permute(0, 2, 3, 1), heads(v).permute(0, 2, 1, 3)
        scale = torch.tensor(1.0 / np.sqrt(d // 2), dtype=torch.float32)
        probs = torch.softmax((q @ k) * scale, dim=-1)
        ctx = (probs @ v).permute(0, 2, 1, 3).reshape(batch, seq, d)
        h = x + (ctx @ p["attn.out.weight"] + p["attn.out.bias"])
        ln2 = F.layer_norm(h, (d,), p["ln2.weight"], p["ln2.bias"], 1e-5)
        u = ln2 @ p["mlp.fc1.weight"] + p["mlp.fc1.bias"]
        inv_sqrt2 = torch.tensor(1.0 / np.sqrt(2.0), dtype=torch.float32)
        gelu = (u * (torch.erf(u * inv_sqrt2) + 1.0)) * 0.5
        y = h + (gelu @ p["mlp.fc2.weight"] + p["mlp.fc2.bias"])
        return torch.mean(y * y)

    def batch(n: int, rng: np.random.Generator) -> Batch:
        return {"x": rng.standard_normal((n, 5, 8)).astype(np.float32)}

    return Twin("transformer", model, "loss", loss, batch, frozen=["attn.k.bias"])


TWINS = {"mlp": mlp, "cnn": cnn, "transformer": transformer}


# ------------------------------------------------------------------------------------------ the two loops
def schedule(steps: int, lr: float) -> list[float]:
    """A cosine learning rate with a short warm-up: the rate changes every step."""
    warm = 10
    return [lr * min(1.0, (t + 1) / warm) * 0.5 * (1 + math.cos(math.pi * t / steps)) for t in range(steps)]


@dataclass
class Trajectory:
    losses: np.ndarray
    params: dict[str, np.ndarray]
    state: dict[str, np.ndarray]  # BatchNorm running statistics, by name
    norms: np.ndarray | None = None  # the global gradient norm of each step, before clipping (PyTorch's side)


def run_onnx(ts: TrainStep, batches: Sequence[Batch], lrs: Sequence[float], accumulate: int = 1) -> Trajectory:
    """Train with the train-step model in onnxruntime, params and state fed back each step; ``accumulate``
    micro-batches per update (the step built with ``accumulate=True``)."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(ts.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    names = [o.name for o in sess.get_outputs()]
    lr_dtype = np.float64 if next(i.type for i in sess.get_inputs() if i.name == ts.lr) == "tensor(double)" \
        else np.float32
    cur = dict(ts.initial)
    losses, micro = [], []
    for i, batch in enumerate(batches):
        update = i // accumulate
        feeds = {**batch, **cur, ts.lr: np.asarray(lrs[update], lr_dtype)}
        if ts.step is not None:
            feeds[ts.step] = np.asarray(update + 1, np.int64)
        if ts.apply is not None:
            feeds[ts.apply] = np.asarray((i + 1) % accumulate == 0)
        out = dict(zip(names, sess.run(None, feeds), strict=True))
        micro.append(float(out[ts.loss]))
        if (i + 1) % accumulate == 0:
            losses.append(float(np.mean(micro)))
            micro = []
        cur = {k: out[new] for k, (_, new) in {**ts.params, **ts.state}.items()}
    return Trajectory(np.asarray(losses), {k: cur[k] for k in ts.params}, {k: cur[k] for k in ts.buffers})


def run_torch(twin: Twin, initial: dict[str, np.ndarray], trained: Sequence[str], optimizer: str,
              hyper: dict[str, Any], clip: float | None, batches: Sequence[Batch], lrs: Sequence[float],
              accumulate: int = 1) -> Trajectory:
    """Train the twin with torch.optim; ``accumulate`` micro-batches per step (each loss divided by their count)."""
    cls = {"sgd": torch.optim.SGD, "adam": torch.optim.Adam, "adamw": torch.optim.AdamW,
           "adagrad": torch.optim.Adagrad}[optimizer]
    if twin.module is not None:
        params = dict(twin.module.named_parameters())
        with torch.no_grad():
            for name, p in params.items():
                p.copy_(torch.from_numpy(initial[name]))
            for name, b in twin.module.named_buffers():
                if name in initial:
                    b.copy_(torch.from_numpy(initial[name]))
        for name, p in params.items():
            p.requires_grad_(name in trained)
    else:
        params = {k: torch.tensor(v, requires_grad=k in trained) for k, v in weights(twin.model).items()
                  if v.dtype.kind == "f"}
    live = [params[k] for k in trained]
    opt = cls(live, lr=lrs[0], **hyper)
    losses, norms = [], []
    for i in range(0, len(batches), accumulate):
        for group in opt.param_groups:
            group["lr"] = lrs[i // accumulate]
        opt.zero_grad()
        total = 0.0
        for batch in batches[i:i + accumulate]:
            loss = twin.torch_loss(params, batch)
            (loss / accumulate if accumulate > 1 else loss).backward()
            total += float(loss.detach())
        if clip is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(live, clip)))
        opt.step()
        losses.append(total / accumulate)
    state = {}
    if twin.module is not None:
        state = {k: b.detach().numpy().copy() for k, b in twin.module.named_buffers() if b.is_floating_point()}
    return Trajectory(np.asarray(losses), {k: params[k].detach().numpy().copy() for k in trained}, state,
                      np.asarray(norms))
