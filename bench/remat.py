"""Rematerialisation: peak memory and fwd+bwd time with remat off, ``nothing-saveable`` and a budget of half the
default's saved activations, on the transformer encoder (sequence 512) and ResNet-50, in one run.

    .venv/bin/python bench/remat.py                       # both models, onnxruntime's default execution order
    .venv/bin/python bench/remat.py --orders              # also the PRIORITY_BASED order

Peak memory: VmHWM of a fresh process that loads the gradient model (2 intra-op threads, memory pattern off as in
``onnxgrad train``), then runs it once (``--child``); reported as the high-water mark minus the resident size
before the run, and the high-water mark itself. Time: the median of ``--reps`` runs in this process. The gradients
are compared with those of the model without remat (max abs difference over every gradient).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# MEMORY_EFFICIENT is refused by the pip onnxruntime ("not enabled for non-training build")
ORDERS = ("DEFAULT", "PRIORITY_BASED")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _options(order: str, threads: int = 2) -> Any:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.enable_mem_pattern = False
    opts.log_severity_level = 3
    opts.execution_order = getattr(ort.ExecutionOrder, order)
    return opts


def child(model: str, x_path: str, order: str) -> None:
    """One fresh process: load, measure, run once, print the peak."""
    import onnxruntime as ort

    x = np.load(x_path)
    sess = ort.InferenceSession(model, _options(order), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    before = _status("VmRSS")
    sess.run(None, {name: x})
    print(json.dumps({"peak": _status("VmHWM"), "before": before}))


def _peak(model: Path, x_path: Path, order: str, repeats: int) -> tuple[float, float]:
    """Median over fresh processes of (VmHWM - RSS before the run, VmHWM), in MiB."""
    rows = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child", str(model), str(x_path), order],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return (statistics.median((r["peak"] - r["before"]) / 2**20 for r in rows),
            statistics.median(r["peak"] / 2**20 for r in rows))


def _bench_model(name: str, seq: int) -> tuple[onnx.ModelProto, np.ndarray, list[str], np.ndarray | None, str]:
    from bench import models

    if name == "resnet50":
        b = models.resnet50(1)
        return b.model, b.x, b.xs, b.grad_y, b.input_name
    import torch

    module, _ = models.torch_twin("transformer")
    x = torch.randn((2, seq, 256), generator=torch.Generator().manual_seed(4))
    proto = models._simplify(models._export(module, x))
    return proto, x.numpy(), ["x", *models._weights(proto, module)], None, "x"


def run_model(name: str, seq: int, orders: tuple[str, ...], reps: int, repeats: int) -> list[str]:
    import onnxruntime as ort

    from onnxgrad import add_gradients
    from onnxgrad.augment import residuals
    from onnxgrad.remat import Budget

    proto, x, xs, grad_y, input_name = _bench_model(name, seq)
    y = proto.graph.output[0].name
    seeds = None if grad_y is None else [grad_y]
    default = residuals(proto, [y], xs, grad_ys=seeds)
    saved = sum(max(r.bytes, 0) for r in default)
    settings: dict[str, dict[str, Any]] = {
        "off": {}, "nothing-saveable": {"remat": "nothing-saveable"},
        f"budget {saved / 2**21:.0f} MiB": {"memory_budget": Budget(saved // 2)},
    }
    rows = []
    reference: dict[str, np.ndarray] | None = None
    with tempfile.TemporaryDirectory() as tmp:
        x_path = Path(tmp) / "x.npy"
        np.save(x_path, x)
        for label, kwargs in settings.items():
            aug = add_gradients(proto, [y], xs, seeds, **kwargs)
            path = Path(tmp) / f"{label.split()[0]}.onnx"
            onnx.save(aug.model, path)
            left = sum(max(r.bytes, 0) for r in residuals(proto, [y], xs, grad_ys=seeds, **kwargs))
            sess = ort.InferenceSession(str(path), _options("DEFAULT"), providers=["CPUExecutionProvider"])
            names = [g for g in aug.gradients.values() if g is not None]
            feeds = {input_name: x}
            got = dict(zip(names, sess.run(names, feeds), strict=True))
            times = []
            for _ in range(reps):
                t0 = time.perf_counter()
                sess.run(None, feeds)
                times.append(time.perf_counter() - t0)
            ms = 1e3 * statistics.median(times)
            if reference is None:
                reference = got
                diff = "-"
            else:
                diff = f"{max(float(np.abs(got[k] - reference[k]).max()) for k in names):.1e}"
            peaks = [_peak(path, x_path, order, repeats) for order in orders]
            cells = " | ".join(f"{d:.0f} ({hwm:.0f})" for d, hwm in peaks)
            rows.append(f"| {name} | {label} | {len(aug.model.graph.node)} | {left / 2**20:.1f} | {cells} | "
                        f"{ms:.0f} | {diff} |")
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", choices=["transformer", "resnet50", "all"], default="all")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--orders", action="store_true", help="also the PRIORITY_BASED order")
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per peak")
    args = parser.parse_args()
    orders = ORDERS if args.orders else ORDERS[:1]
    head = " | ".join(f"peak MiB {o} (VmHWM)" for o in orders)
    print(f"| model | remat | nodes | saved activations MiB | {head} | fwd+bwd ms | max abs diff |")
    print("|---|---|---|---|" + "---|" * len(orders) + "---|---|")
    for name in (["transformer", "resnet50"] if args.model == "all" else [args.model]):
        for row in run_model(name, args.seq, orders, args.reps, args.repeats):
            print(row, flush=True)


if __name__ == "__main__":
    main()
