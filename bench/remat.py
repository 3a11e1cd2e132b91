"""Rematerialisation: peak memory and fwd+bwd time with remat off, ``nothing-saveable`` and a budget of half the
default's saved activations, on the transformer encoder (sequence 512) and ResNet-50, in one run, on the raw exports.

    .venv/bin/python bench/remat.py                       # all: the transformer, ResNet-50 (dx and dW), ResNet-50 dx
    .venv/bin/python bench/remat.py --model transformer --reps 5

Each gradient model runs under two session settings: onnxruntime's defaults, and the settings
``onnxgrad.runtime.session`` gives a model with recomputed segments (``workarounds.remat_session_options``:
PRIORITY_BASED order, no buffer reuse, basic graph optimizations). Peak memory: VmHWM of a fresh process that
loads the gradient model (2 intra-op threads, arena on as by default), then runs it once (``--child``); reported as
the high-water mark minus the resident size before the run. Time: the median of ``--reps`` interleaved rounds in
this process. The gradients are compared with those of the model without remat under the same session
settings (the largest over the gradients of |difference| / |gradient|, 2-norms).
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
CONFIGS = ("default", "remat")
MODELS = ["transformer", "resnet50", "resnet50-dx"]
BATCH = 8  # ResNet-50's: at batch 1 its 98 MiB of weight gradients (outputs) outweigh its 49 MiB of activations


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(field)


def _options(config: str, threads: int = 2) -> Any:
    """'default' (onnxruntime's) or 'remat' (what onnxgrad.runtime.session gives a model with recomputed segments)."""
    import onnxruntime as ort

    from onnxgrad.workarounds import remat_session_options

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    if config == "remat":
        remat_session_options(opts)
    return opts


def child(model: str, x_path: str, config: str) -> None:
    """One fresh process: load, measure, run once, print the peak."""
    import onnxruntime as ort

    x = np.load(x_path)
    sess = ort.InferenceSession(model, _options(config), providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    before = _status("VmRSS")
    sess.run(None, {name: x})
    print(json.dumps({"peak": _status("VmHWM"), "before": before}))


def _peak(model: Path, x_path: Path, config: str, repeats: int) -> tuple[float, float]:
    """Median over fresh processes of (VmHWM - RSS before the run, VmHWM), in MiB."""
    rows = []
    for _ in range(repeats):
        out = subprocess.run([sys.executable, __file__, "--child", str(model), str(x_path), config],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    return (statistics.median((r["peak"] - r["before"]) / 2**20 for r in rows),
            statistics.median(r["peak"] / 2**20 for r in rows))


def _bench_model(name: str, seq: int) -> tuple[onnx.ModelProto, np.ndarray, list[str], np.ndarray | None, str]:
    from bench import models

    if name.startswith("resnet50"):  # "resnet50-dx": the input's gradient alone (a saliency map)
        b = models.resnet50(1)
        model, x, seed = _batched(b.model, BATCH), *_batch_of(b.x, b.grad_y, BATCH)
        return model, x, b.xs[:1] if name.endswith("-dx") else b.xs, seed, b.input_name
    import torch

    module, _ = models.torch_twin("transformer")
    x = torch.randn((2, seq, 256), generator=torch.Generator().manual_seed(4))
    proto = models._export(module, x)  # raw, as exported
    return proto, x.numpy(), ["x", *models._weights(proto, module)], None, "x"


def _batched(model: onnx.ModelProto, batch: int) -> onnx.ModelProto:
    """The zoo ResNet-50 at another batch: its input's batch and its one flattening Reshape's leading 1."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    out.graph.input[0].type.tensor_type.shape.dim[0].dim_value = batch
    shapes = {n.input[1] for n in out.graph.node if n.op_type == "Reshape"}
    for init in out.graph.initializer:
        if init.name in shapes:
            dims = onnx.numpy_helper.to_array(init).copy()
            if dims[0] == 1:
                dims[0] = batch
                init.CopyFrom(onnx.numpy_helper.from_array(dims, init.name))
    del out.graph.value_info[:]
    for o in out.graph.output:
        o.type.tensor_type.shape.dim[0].dim_value = batch
    return out


def _batch_of(x: np.ndarray, seed: np.ndarray | None, batch: int) -> tuple[np.ndarray, np.ndarray | None]:
    rng = np.random.default_rng(5)
    x = rng.standard_normal((batch, *x.shape[1:])).astype(np.float32)
    return x, None if seed is None else rng.standard_normal((batch, *seed.shape[1:])).astype(np.float32)


def run_model(name: str, seq: int, reps: int, repeats: int) -> list[str]:
    import onnxruntime as ort

    from onnxgrad import add_gradients
    from onnxgrad.augment import residuals
    from onnxgrad.remat import Budget

    proto, x, xs, grad_y, input_name = _bench_model(name, seq)
    y = proto.graph.output[0].name
    seeds = None if grad_y is None else [grad_y]
    saved = sum(max(r.bytes, 0) for r in residuals(proto, [y], xs, grad_ys=seeds))
    settings: dict[str, dict[str, Any]] = {
        "off": {}, "nothing-saveable": {"remat": "nothing-saveable"},
        f"budget {saved / 2**21:.0f} MiB": {"memory_budget": Budget(saved // 2)},
    }
    runs = [(label, config) for label in settings for config in CONFIGS if label == "off" or config == "remat"]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        x_path = Path(tmp) / "x.npy"
        np.save(x_path, x)
        built = {}
        for label, kwargs in settings.items():
            aug = add_gradients(proto, [y], xs, seeds, **kwargs)
            path = Path(tmp) / f"{label.split()[0]}.onnx"
            onnx.save(aug.model, path, save_as_external_data=aug.model.ByteSize() > 2**30)
            left = sum(max(r.bytes, 0) for r in residuals(proto, [y], xs, grad_ys=seeds, **kwargs))
            names = [g for g in aug.gradients.values() if g is not None]
            built[label] = (path, left, len(aug.model.graph.node), names)
        sessions = {(label, config): ort.InferenceSession(str(built[label][0]), _options(config),
                                                          providers=["CPUExecutionProvider"]) for label, config in runs}
        feeds = {input_name: x}
        times: dict[tuple[str, str], list[float]] = {k: [] for k in runs}
        got: dict[tuple[str, str], dict[str, np.ndarray]] = {}
        for k, sess in sessions.items():  # a warm-up run each, whose gradients are compared
            names = built[k[0]][3]
            got[k] = dict(zip(names, sess.run(names, feeds), strict=True))
        for _ in range(reps):  # interleaved rounds: the machine's load moves all settings alike
            for k, sess in sessions.items():
                t0 = time.perf_counter()
                sess.run(None, feeds)
                times[k].append(time.perf_counter() - t0)
        del sessions
        base_ms = 1e3 * statistics.median(times["off", "default"])
        base_peak = None
        for label, config in runs:
            path, left, nodes, names = built[label]
            peak, hwm = _peak(path, x_path, config, repeats)
            base_peak = peak if base_peak is None else base_peak
            ms = 1e3 * statistics.median(times[label, config])
            ref = got["off", config]  # remat against none under the same session settings
            diff = max(float(np.linalg.norm(got[label, config][k] - ref[k]) / max(np.linalg.norm(ref[k]), 1e-30))
                       for k in names)
            rows.append(f"| {name} | {label} | {config} | {nodes} | {left / 2**20:.1f} | {peak:.0f} ({hwm:.0f}) | "
                        f"{peak / base_peak - 1:+.0%} | {ms:.0f} | {ms / base_ms - 1:+.0%} | {diff:.1e} |")
    return rows


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:5])
        return
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", choices=[*MODELS, "all"], default="all")
    parser.add_argument("--seq", type=int, default=512)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="fresh processes per peak")
    args = parser.parse_args()
    print("| model | remat | session | nodes | saved activations MiB | peak MiB (VmHWM) | peak vs off | fwd+bwd ms | "
          "time vs off | diff vs off |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for name in (MODELS if args.model == "all" else [args.model]):
        for row in run_model(name, args.seq, args.reps, args.repeats):
            print(row, flush=True)


if __name__ == "__main__":
    main()
