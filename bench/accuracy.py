"""float32 gradients of onnxgrad and of PyTorch, each against the same float64 reference.

    .venv/bin/python bench/accuracy.py                     # every model, the table on stdout
    .venv/bin/python bench/accuracy.py --model resnet18-train --all-tensors

For each model: a PyTorch module with seeded random weights is exported to ONNX (TorchScript exporter,
``dynamo=False``); onnxgrad appends the gradients of the outputs (weighted by a seeded random ``grad_ys``, so
that BatchNorm in training mode, whose outputs sum to a constant, still has gradients) with respect to the
input and every parameter, and onnxruntime (CPU) runs that in float32. PyTorch's own float32 autograd runs
the same module on the same input and seed. The reference for both columns is PyTorch's autograd in float64
on a float64 copy of the module: an independent computation (onnxruntime lacks float64 Conv and pools).

Models: the bench models (``bench/models.py``), ResNet-18 in training and eval mode (eval: running statistics
set to the input's, as training leaves them), a 2-layer LSTM, and single ops under stress (``op:*``: inputs whose
mean is 30x their spread, 50k-element statistics, 32k-class softmaxes).

Per tensor: the norm-wise relative error ||g - ref|| / ||ref|| and the max-wise one max|g - ref| / max|ref|.
A tensor passes when onnxgrad's error is at most 3x PyTorch's, or at most 1e-5, for both measures.
"""

from __future__ import annotations

import argparse
import copy
import io
import os
import sys
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnxgrad
from bench import models

FACTOR, FLOOR = 3.0, 1e-5  # the bar: ours <= max(FACTOR * PyTorch's, FLOOR)


# ----------------------------------------------------------------------------------------------- models


def _lstm() -> Any:
    import torch
    import torch.nn as nn

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.lstm = nn.LSTM(64, 128, num_layers=2, batch_first=True)
            self.head = nn.Linear(128, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.lstm(x)[0])

    return Net()


def single_op(kind: str, c: int = 32) -> Callable[[], Any]:
    """One normalization or softmax, alone (``c`` channels): the ops whose gradients sum long and cancel;
    "conv-batchnorm": a 3x3 Conv (no padding) then an inference BatchNormalization."""
    import torch
    import torch.nn as nn

    class Op(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.f: Any = {
                "conv-batchnorm": lambda: nn.Sequential(nn.Conv2d(c, c, 3), nn.BatchNorm2d(c)),
                "batchnorm": lambda: nn.BatchNorm2d(c), "instancenorm": lambda: nn.InstanceNorm2d(c, affine=True),
                "groupnorm": lambda: nn.GroupNorm(8, c), "layernorm": lambda: nn.LayerNorm(1024),
                "softmax": lambda: nn.Softmax(-1), "logsoftmax": lambda: nn.LogSoftmax(-1),
            }[kind]()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.f(x)

    return Op


@dataclass
class Spec:
    make: Callable[[], Any]
    shape: tuple[int, ...]
    seed: int
    train: bool = False  # BatchNorm with batch statistics (the module in training mode)
    needs: str | None = None  # an op whose rule must exist
    offset: float = 0.0  # added to the input: mean / spread, what makes normalizations cancel
    scale: float = 1.0  # the input's spread
    calibrate: bool = False  # BatchNorm running statistics := the input's (what training leaves)


def _specs() -> dict[str, Spec]:
    out = {name: Spec(make, shape, seed) for name, (make, shape, seed) in models._TORCH.items()}
    out["resnet18-train"] = Spec(models.resnet18, (4, 3, 64, 64), 7, train=True)
    out["resnet18-eval"] = Spec(models.resnet18, (4, 3, 64, 64), 7, calibrate=True)
    out["lstm"] = Spec(_lstm, (8, 32, 64), 9, needs="LSTM")
    # single ops under stress: long reductions (50k elements per statistic), inputs whose mean is 30x their
    # spread, saturated softmax
    image = (4, 32, 112, 112)
    out["op:batchnorm-train"] = Spec(single_op("batchnorm"), image, 11, train=True, offset=30.0)
    out["op:batchnorm-eval"] = Spec(single_op("batchnorm"), image, 11, offset=30.0)
    out["op:conv-batchnorm-eval"] = Spec(single_op("conv-batchnorm"), (8, 32, 58, 58), 17, offset=30.0, calibrate=True)
    out["op:instancenorm"] = Spec(single_op("instancenorm"), image, 12, offset=30.0)
    out["op:groupnorm"] = Spec(single_op("groupnorm"), image, 13, offset=30.0)
    out["op:layernorm"] = Spec(single_op("layernorm"), (8, 256, 1024), 14, offset=30.0)
    out["op:softmax"] = Spec(single_op("softmax"), (64, 32000), 15, scale=10.0)
    out["op:logsoftmax"] = Spec(single_op("logsoftmax"), (64, 32000), 16, scale=10.0)
    return out


SPECS = _specs()


# ----------------------------------------------------------------------------------------------- running


def _export(module: Any, x: Any, train: bool) -> onnx.ModelProto:
    import torch

    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mode = torch.onnx.TrainingMode.TRAINING if train else torch.onnx.TrainingMode.PRESERVE
        torch.onnx.export(module, (x,), f, dynamo=False, input_names=["x"], output_names=["y"], training=mode,
                          do_constant_folding=False)
    return onnx.load_from_string(f.getvalue())


def _onnx_names(model: onnx.ModelProto, module: Any) -> dict[str, tuple[str, bool]]:
    """For each parameter of ``module``: the ONNX value holding it and whether it is stored transposed. A value
    named like the parameter (an initializer, or the Identity the exporter makes for a parameter whose values
    equal another's), or else the initializer holding its values (the exporter stores some transposed)."""
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    values = set(inits) | {o for n in model.graph.node for o in n.output}
    out = {}
    for name, p in module.named_parameters():
        v = p.detach().numpy()
        if name in values:
            out[name] = (name, False)
            continue
        for iname, value in inits.items():
            if value.shape == v.shape and np.array_equal(value, v):
                out[name] = (iname, False)
                break
            if v.ndim == 2 and value.shape == v.T.shape and np.array_equal(value, v.T):
                out[name] = (iname, True)
                break
    return out


def _torch_grads(module: Any, x: np.ndarray, seed: np.ndarray, dtype: Any, train: bool) -> dict[str, np.ndarray]:
    import torch

    m = copy.deepcopy(module).to(dtype)
    m.train(train)
    xt = torch.from_numpy(x).to(dtype).requires_grad_(True)
    y = m(xt)
    y.backward(torch.from_numpy(seed).to(dtype))
    out = {"x": xt.grad.double().numpy()}  # type: ignore[union-attr]
    for name, p in m.named_parameters():
        out[name] = p.grad.double().numpy()  # type: ignore[union-attr]
    return out


def _onnxgrad_grads(model: onnx.ModelProto, names: dict[str, tuple[str, bool]], buffers: list[str], x: np.ndarray,
                    seed: np.ndarray) -> dict[str, np.ndarray]:
    xs = ["x", *dict.fromkeys(n for n, _ in names.values())]
    # partial derivatives, buffers constant: the exporter makes a parameter or a buffer whose values equal
    # another's (all-ones scales, all-zero running means) an Identity of it
    values = {o for n in model.graph.node for o in n.output} | {i.name for i in model.graph.initializer}
    stop = [*xs, *(b for b in buffers if b in values)]
    aug = onnxgrad.add_gradients(model, ["y"], xs, grad_ys=[seed], stop_gradients=stop)
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.intra_op_num_threads = 2
    sess = ort.InferenceSession(aug.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    wanted = {x_: aug.gradients[x_] for x_ in xs}
    values = dict(zip([v for v in wanted.values() if v], sess.run([v for v in wanted.values() if v], {"x": x}),
                      strict=True))
    out = {"x": values[wanted["x"]].astype(np.float64)}  # type: ignore[index]
    for pname, (oname, transposed) in names.items():
        g = values[wanted[oname]].astype(np.float64)  # type: ignore[index]
        out[pname] = g.T if transposed else g
    return out


def errors(g: np.ndarray, ref: np.ndarray) -> tuple[float, float]:
    """(norm-wise, max-wise) relative error of g against ref."""
    d = g - ref
    tiny = 1e-300
    return float(np.linalg.norm(d) / max(np.linalg.norm(ref), tiny)), float(np.abs(d).max() / max(np.abs(ref).max(),
                                                                                                 tiny))


@dataclass
class TensorRow:
    model: str
    tensor: str
    ours: tuple[float, float]
    torch: tuple[float, float]

    @property
    def ok(self) -> bool:
        return all(o <= max(FACTOR * t, FLOOR) for o, t in zip(self.ours, self.torch, strict=True))

    @property
    def ratio(self) -> float:
        """The worse of ours / PyTorch's over the two measures."""
        return max(o / max(t, 1e-30) for o, t in zip(self.ours, self.torch, strict=True))


def _calibrate(module: Any, x: Any) -> None:
    """Every BatchNorm's running mean and variance := the statistics of its input for x."""
    import torch

    norms = [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # a cumulative average: after one batch, that batch's statistics
    module.train()
    with torch.no_grad():
        module(x)


def measure(name: str, spec: Spec | None = None) -> list[TensorRow] | str:
    """Per-tensor errors for one model (``SPECS[name]`` unless ``spec`` is given), or why it was skipped."""
    import torch

    spec = spec or SPECS[name]
    if spec.needs and onnxgrad.registry.lookup("", spec.needs, 14) is None:
        return f"no {spec.needs} rule yet"
    torch.manual_seed(spec.seed)
    module = spec.make()
    models._randomize(module, spec.seed)
    x = torch.randn(spec.shape, generator=torch.Generator().manual_seed(spec.seed + 1)) * spec.scale + spec.offset
    if spec.calibrate:
        _calibrate(module, x)
    module.train(spec.train)
    with torch.no_grad():
        y_shape = copy.deepcopy(module)(x).shape
    seed = np.random.default_rng(spec.seed + 2).standard_normal(tuple(y_shape)).astype(np.float32)
    model = _export(copy.deepcopy(module), x, spec.train)
    names = _onnx_names(model, module)
    xn = x.numpy()
    ref = _torch_grads(module, xn, seed, torch.float64, spec.train)
    theirs = _torch_grads(module, xn, seed, torch.float32, spec.train)
    ours = _onnxgrad_grads(model, names, [b for b, _ in module.named_buffers()], xn, seed)
    rows = []
    for key in ["x", *names]:
        rows.append(TensorRow(name, key, errors(ours[key], ref[key]), errors(theirs[key], ref[key])))
    missing = [p for p, _ in module.named_parameters() if p not in names]
    if missing:
        print(f"{name}: parameters not found in the ONNX model: {missing}", file=sys.stderr)
    return rows


def summary(name: str, rows: list[TensorRow] | str) -> str:
    if isinstance(rows, str):
        return f"| {name} | skipped: {rows} | | | | | | |"
    worst_ours = max(r.ours[1] for r in rows)
    worst_torch = max(r.torch[1] for r in rows)
    worst_norm_ours = max(r.ours[0] for r in rows)
    worst_norm_torch = max(r.torch[0] for r in rows)
    bad = [r for r in rows if not r.ok]
    worst = max(rows, key=lambda r: r.ratio)
    return (f"| {name} | {len(rows)} | {worst_norm_ours:.1e} | {worst_norm_torch:.1e} | {worst_ours:.1e} | "
            f"{worst_torch:.1e} | {worst.ratio:.1f} ({worst.tensor}) | {len(rows) - len(bad)}/{len(rows)} |")


SUMMARY_HEADER = ("| model | tensors | onnxgrad norm-wise (worst) | PyTorch norm-wise (worst) | onnxgrad max-wise "
                  "(worst) | PyTorch max-wise (worst) | largest onnxgrad / PyTorch (tensor) | tensors within the bar |"
                  "\n|---|---|---|---|---|---|---|---|")
TENSOR_HEADER = ("| model | tensor | onnxgrad norm-wise | PyTorch norm-wise | onnxgrad max-wise | PyTorch max-wise | "
                 "within the bar |\n|---|---|---|---|---|---|---|")


def tensor_line(r: TensorRow) -> str:
    return (f"| {r.model} | {r.tensor} | {r.ours[0]:.1e} | {r.torch[0]:.1e} | {r.ours[1]:.1e} | {r.torch[1]:.1e} | "
            f"{'yes' if r.ok else '**no**'} |")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", nargs="+", default=["all"], choices=[*SPECS, "all"])
    parser.add_argument("--all-tensors", action="store_true", help="print every tensor, not only the failures")
    args = parser.parse_args(argv)
    import torch

    torch.set_num_threads(2)
    names = list(SPECS) if "all" in args.model else args.model
    results = {}
    for name in names:
        results[name] = measure(name)
        print(summary(name, results[name]), flush=True)
    print()
    print(SUMMARY_HEADER)
    for name, rows in results.items():
        print(summary(name, rows))
    shown = [r for rows in results.values() if not isinstance(rows, str) for r in rows
             if args.all_tensors or not r.ok]
    if shown:
        print()
        print(TENSOR_HEADER)
        for r in shown:
            print(tensor_line(r))
    return 0 if all(r.ok for rows in results.values() if not isinstance(rows, str) for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
