"""A training step in onnxruntime (the train-step model, params and state kept in place with IOBinding) against a
PyTorch eager training step (forward, loss, backward, optimizer step), on the benchmark models of ``bench/models.py``.

    .venv/bin/python bench/train.py                    # mlp, cnn, transformer
    .venv/bin/python bench/train.py --model cnn --steps 30

Each model gets a loss (cross-entropy against labels for the classifiers, mean squared error against a target for
the transformer) and AdamW (lr 1e-3, weight decay 1e-2, gradients clipped at norm 1.0), the same on both sides;
BatchNorm trains in training mode on both. Steps/s: the median of rounds of ``ROUND`` steps of each engine in turn,
same threads (2), same input batch. CPU ms/step: the process's CPU time (both threads) over the same rounds,
median; neither engine spins while it waits, so it is the work done, which other processes on a shared machine
disturb much less than wall time (steps/s also show how well each keeps both cores busy). Peak MiB: resident
memory that the first 3 steps add to the loaded model and optimizer, in a fresh process (median of 3). loss rel.
err: the losses of the first 2 steps, ours against PyTorch's (the same batch every step: by the third the loss is
near 0, and its relative error means little).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP workers sleep (see bench/run.py)

import numpy as np
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import models
from bench.peakmem import release_free_heap, rss_kib
from onnxgrad.train import TrainStep, make_train_step
from onnxgrad.trainer import _Bindings, in_place

THREADS = 2
ROUND = 3
HYPER = {"lr": 1e-3, "weight_decay": 1e-2}
CLIP = 1.0
CLASSES = 10
MEM_PATTERN_OFF = os.environ.get("ONNXGRAD_BENCH_MEM_PATTERN", "0") != "1"  # =1: onnxruntime's default, for comparison


@dataclass
class Case:
    name: str
    step: TrainStep
    feeds: dict[str, np.ndarray]  # the data inputs
    module: Any
    torch_batch: tuple[Any, Any]  # (input, labels or target)
    build_s: float


def _loss_spec(name: str) -> str:
    return "mse:y:target" if name == "transformer" else "cross_entropy:y:labels"


def make_case(name: str) -> Case:
    import torch

    bench = models.build(name)
    module, x = models.torch_twin(name)
    rng = np.random.default_rng(7)
    if name == "transformer":
        other = rng.standard_normal(x.shape).astype(np.float32)
        feeds = {bench.input_name: bench.x, "target": other}
    else:
        other = rng.integers(0, CLASSES, x.shape[0]).astype(np.int64)
        feeds = {bench.input_name: bench.x, "labels": other}
    t0 = time.perf_counter()
    step = make_train_step(bench.model, _loss_spec(name), optimizer="adamw", clip_grad_norm=CLIP, **HYPER)
    build_s = time.perf_counter() - t0
    module.train()
    return Case(name, step, feeds, module, (torch.from_numpy(bench.x), torch.from_numpy(other)), build_s)


def ort_stepper(case: Case, threads: int = THREADS) -> Any:
    """A function running one training step in onnxruntime; returns the loss."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
    opts.log_severity_level = 3
    opts.enable_mem_pattern = not MEM_PATTERN_OFF  # as onnxgrad.trainer.open_session has it (off)
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    ts = case.step
    sess = ort.InferenceSession(ts.model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    pairs = [*ts.params.values(), *ts.state.values()]
    bindings = _Bindings(sess, pairs, ts.initial, "cpu", [ts.loss], in_place(ts.model, pairs))  # as onnxgrad train
    count = [0]

    def step() -> float:
        count[0] += 1
        feeds = {**case.feeds, ts.lr: np.asarray(HYPER["lr"], np.float32)}
        if ts.step:
            feeds[ts.step] = np.asarray(count[0], np.int64)
        return float(bindings.run(feeds)[0])

    return step


def torch_stepper(case: Case, threads: int = THREADS) -> Any:
    """A function running one PyTorch eager training step; returns the loss."""
    import torch

    torch.set_num_threads(threads)
    module = case.module
    opt = torch.optim.AdamW(module.parameters(), **HYPER)
    x, other = case.torch_batch
    loss_fn = torch.nn.functional.mse_loss if case.name == "transformer" else torch.nn.functional.cross_entropy

    def step() -> float:
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(module(x), other)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(module.parameters(), CLIP)
        opt.step()
        return float(loss.detach())

    return step


def peak_child(engine: str, name: str) -> None:
    """In a fresh process: MiB that the first 3 steps add to resident memory (printed on the last line)."""
    case = make_case(name)
    step = ort_stepper(case) if engine == "ort" else torch_stepper(case)
    release_free_heap()
    before = rss_kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    for _ in range(3):
        step()
    print(f"{(rss_kib('VmHWM') - before) / 1024:.1f}")


def peak(engine: str, name: str, runs: int = 3) -> float:
    values = []
    for _ in range(runs):
        out = subprocess.run([sys.executable, os.path.abspath(__file__), "--peak", engine, "--model", name],
                             capture_output=True, text=True, check=True)
        values.append(float(out.stdout.strip().splitlines()[-1]))
    return statistics.median(values)


def measure(name: str, steps: int, memory: bool) -> dict[str, Any]:
    case = make_case(name)
    ours, theirs = ort_stepper(case), torch_stepper(case)
    a = [ours() for _ in range(3)]
    b = [theirs() for _ in range(3)]
    err = max(abs(x - y) / abs(y) for x, y in zip(a[:2], b[:2], strict=True))  # the 3rd is near 0 (one batch)
    times: dict[str, list[float]] = {"ort": [], "torch": []}
    cpu: dict[str, list[float]] = {"ort": [], "torch": []}
    for _ in range(max(1, steps // ROUND)):
        for key, fn in (("ort", ours), ("torch", theirs)):
            t0, c0 = time.perf_counter(), time.process_time()
            for _ in range(ROUND):
                fn()
            times[key].append((time.perf_counter() - t0) / ROUND)
            cpu[key].append((time.process_time() - c0) / ROUND)
    ort_s, torch_s = statistics.median(times["ort"]), statistics.median(times["torch"])
    ort_cpu, torch_cpu = statistics.median(cpu["ort"]), statistics.median(cpu["torch"])
    n_params = sum(int(v.size) for k, v in case.step.initial.items() if k in case.step.params)
    row = {"model": name, "params": n_params, "nodes": len(case.step.model.graph.node), "build_s": case.build_s,
           "ort_steps_s": 1 / ort_s, "torch_steps_s": 1 / torch_s, "speedup": torch_s / ort_s, "loss_err": err,
           "ort_cpu_ms": 1e3 * ort_cpu, "torch_cpu_ms": 1e3 * torch_cpu, "cpu_ratio": torch_cpu / ort_cpu,
           "peak_ort": None, "peak_torch": None}
    if memory:
        row["peak_ort"], row["peak_torch"] = peak("ort", name), peak("torch", name)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", default="all", choices=["all", "mlp", "cnn", "transformer"])
    parser.add_argument("--steps", type=int, default=30, help="timed steps per engine (default 30)")
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--peak", choices=["ort", "torch"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.peak:
        peak_child(args.peak, args.model)
        return
    names = ["mlp", "cnn", "transformer"] if args.model == "all" else [args.model]
    print("| model | params | nodes | build s | ORT steps/s | PyTorch steps/s | ours / PyTorch (speed) | "
          "CPU ms/step ORT | CPU ms/step PyTorch | ours / PyTorch (CPU) | peak MiB ORT | peak MiB PyTorch | "
          "loss rel. err |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory():
        for name in names:
            r = measure(name, args.steps, not args.no_memory)

            def mib(v: float | None) -> str:
                return "" if v is None else f"{v:.0f}"

            print(f"| {r['model']} | {r['params']:,} | {r['nodes']} | {r['build_s']:.2f} | {r['ort_steps_s']:.1f} | "
                  f"{r['torch_steps_s']:.1f} | **{r['speedup']:.2f}x** | {r['ort_cpu_ms']:.1f} | "
                  f"{r['torch_cpu_ms']:.1f} | {r['cpu_ratio']:.2f}x | {mib(r['peak_ort'])} | "
                  f"{mib(r['peak_torch'])} | {r['loss_err']:.1e} |", flush=True)


if __name__ == "__main__":
    main()
