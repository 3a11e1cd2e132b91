"""fwd+bwd against forward-only onnxruntime and PyTorch eager, on the same weights and the same threads.

    .venv/bin/python bench/run.py --model all          # mlp, cnn, transformer, resnet50
    .venv/bin/python bench/run.py --model cnn --profile /tmp/prof   # also write onnxruntime profiles
    .venv/bin/python bench/run.py --model cnn resnet50 --bind-outputs  # also time with every output bound

For each model: build the gradient graph (the input and every weight as xs; ones as grad_ys, except for
ResNet-50 whose softmax output sums to 1: a fixed random seed there), then time in rounds, (a) onnxruntime
forward only, (b) onnxruntime forward + gradients and (c) PyTorch eager forward + backward, and report
medians. ``--bind-outputs`` adds two engines to the same rounds, (a) and (b) with onnxruntime's IOBinding: the
input and every output (the model's outputs and the gradients) bound once to arrays allocated before the timed
runs, which each run overwrites, as a training loop reusing its gradient buffers would (their values are checked
against the unbound run's). The models are those a user exports (no pre-simplification). Peak memory of (b)
and (c) is measured in fresh processes (see ``bench/peakmem.py``). The input gradient is checked against
PyTorch's. Idle threads sleep (onnxruntime: no spinning; OpenMP: PASSIVE) so that one engine's idle workers do
not slow the next one's run.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field

# Idle OpenMP workers must sleep, not spin: on a shared 2-core machine PyTorch's spinning workers starve the
# next run (PyTorch's own included: measured 10x slower MLP steps with spinning on a loaded machine).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnxgrad
from bench import models

HERE = os.path.dirname(os.path.abspath(__file__))
ROUND = 3  # consecutive runs of one engine per round


def ort_session(model: onnx.ModelProto | str, threads: int, profile: str | None = None) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    opts.log_severity_level = 3
    # idle pool threads must not spin: the other sessions and PyTorch run in between on the same cores
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    if profile:
        opts.enable_profiling = True
        opts.profile_file_prefix = profile
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=["CPUExecutionProvider"])


@dataclass
class Build:
    """The gradient model and what building it cost."""

    model: onnx.ModelProto
    grads: dict[str, str | None]
    seconds: float  # onnxgrad.gradients() on an onnx_ir model: onnxgrad's own time
    total_seconds: float  # add_gradients(): ModelProto in, ModelProto out (conversion included)
    nodes_before: int
    nodes_after: int


def build_gradients(bench: models.Bench) -> Build:
    ys = [o.name for o in bench.model.graph.output]
    ir_model = ir.serde.deserialize_model(bench.model)
    t0 = time.perf_counter()
    onnxgrad.gradients(ir_model, ys, bench.xs, grad_ys=bench.grad_y)
    own = time.perf_counter() - t0
    t0 = time.perf_counter()
    aug = onnxgrad.add_gradients(bench.model, ys, bench.xs, grad_ys=bench.grad_y)
    total = time.perf_counter() - t0
    return Build(aug.model, aug.gradients, own, total, len(bench.model.graph.node), len(aug.model.graph.node))


@dataclass
class Timing:
    samples: dict[str, list[float]] = field(default_factory=dict)

    def median(self, key: str) -> float:
        return statistics.median(self.samples[key]) if self.samples.get(key) else float("nan")


def _torch_step(module: object, x: np.ndarray, seed: np.ndarray | None = None) -> Callable[[], object]:
    import torch

    xt = torch.from_numpy(x).clone().requires_grad_(True)
    params = [p for p in module.parameters()]  # type: ignore[attr-defined]
    dy = None if seed is None else torch.from_numpy(seed)

    def step() -> object:
        xt.grad = None
        for p in params:
            p.grad = None
        y = module(xt)  # type: ignore[operator]
        y.backward(torch.ones_like(y) if dy is None else dy)
        return xt.grad

    return step


def bound_run(sess: ort.InferenceSession, feeds: dict[str, np.ndarray]) -> Callable[[], object]:
    """A run of ``sess`` with the inputs and every output bound once (IOBinding) to preallocated arrays: the
    steady state of a training loop that reuses its buffers. The bound outputs are checked against a plain run."""
    names = [o.name for o in sess.get_outputs()]
    expected = sess.run(names, feeds)
    buffers = [np.empty_like(e) for e in expected]
    binding = sess.io_binding()
    for name, value in feeds.items():
        binding.bind_cpu_input(name, value)
    for name, buf in zip(names, buffers, strict=True):
        binding.bind_output(name, "cpu", 0, buf.dtype, list(buf.shape), buf.ctypes.data)

    def run() -> object:
        sess.run_with_iobinding(binding)
        return buffers

    run()
    for name, buf, ref in zip(names, buffers, expected, strict=True):
        np.testing.assert_allclose(buf, ref, rtol=1e-5, atol=1e-6 * float(np.max(np.abs(ref), initial=1.0)),
                                   err_msg=f"bound output {name!r} differs from the unbound run's")
    return run


def time_model(bench: models.Bench, build: Build, threads: int, budget_s: float, min_reps: int,
               profile: str | None, bind: bool = False) -> tuple[Timing, float]:
    """Interleaved repetitions of the three runs (five with ``bind``); returns the timings and the input gradient's
    error."""
    fwd = ort_session(bench.model, threads)
    fb = ort_session(build.model, threads, profile)
    feeds = {bench.input_name: bench.x}
    fb_names = [o.name for o in build.model.graph.output]
    runs: dict[str, Callable[[], object]] = {
        "fwd": lambda: fwd.run(None, feeds),
        "fwd+bwd": lambda: fb.run(fb_names, feeds),
    }
    if bind:  # separate sessions, so that the bound buffers are the only difference
        runs["fwd bound"] = bound_run(ort_session(bench.model, threads), feeds)
        runs["fwd+bwd bound"] = bound_run(ort_session(build.model, threads), feeds)
    err = float("nan")
    if bench.torch_module is not None:
        import torch

        torch.set_num_threads(threads)
        step = _torch_step(bench.torch_module, bench.x, bench.grad_y)
        runs["torch"] = step
        dx_ref = step().numpy()  # type: ignore[attr-defined]
        out = dict(zip(fb_names, fb.run(fb_names, feeds), strict=True))
        dx = out[build.grads[bench.xs[0]]]  # type: ignore[index]
        err = float(np.max(np.abs(dx - dx_ref)) / (np.max(np.abs(dx_ref)) + 1e-30))
    for run in runs.values():  # warm-up
        for _ in range(2):
            run()
    timing = Timing({k: [] for k in runs})
    start, reps = time.perf_counter(), 0
    while reps < min_reps or (time.perf_counter() - start < budget_s and reps < 1000):
        for key, run in runs.items():  # rounds of a few runs of each, so that load drift hits all alike
            for _ in range(ROUND):
                t0 = time.perf_counter()
                run()
                timing.samples[key].append(time.perf_counter() - t0)
        reps += ROUND
    if profile:
        print(f"  profile: {fb.end_profiling()}")
    return timing, err


def peak_memory(name: str, engine: str, model_path: str | None, x_path: str, threads: int, repeats: int = 3
                ) -> float:
    """Peak resident memory (MiB) that one fwd+bwd run adds: median over fresh processes."""
    cmd = [sys.executable, os.path.join(HERE, "peakmem.py"), engine, name, x_path, str(threads)]
    if model_path:
        cmd.append(model_path)
    values = []
    for _ in range(repeats):
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip().splitlines()
        values.append(float(out[-1]))
    return statistics.median(values)


@dataclass
class Row:
    name: str
    build: Build
    timing: Timing
    err: float
    mem_ort: float = float("nan")
    mem_torch: float = float("nan")

    def cells(self, bound: bool = False) -> list[str]:
        t = self.timing
        fwd, fb, pt = t.median("fwd"), t.median("fwd+bwd"), t.median("torch")
        reps = len(t.samples["fwd"])
        extra = []
        if bound:
            bf, bfb = t.median("fwd bound"), t.median("fwd+bwd bound")
            extra = [f"{bf * 1e3:.1f}", f"{bfb * 1e3:.1f}", f"**{bfb / bf:.2f}**", f"{bfb / fwd:.2f}",
                     f"{bfb / fb:.2f}", "" if pt != pt else f"**{bfb / pt:.2f}**"]
        return [
            self.name, f"{fwd * 1e3:.1f}", f"{fb * 1e3:.1f}", f"**{fb / fwd:.2f}**",
            "" if pt != pt else f"{pt * 1e3:.1f}", "" if pt != pt else f"**{fb / pt:.2f}**", *extra,
            f"{self.build.seconds:.3f}", f"{self.build.total_seconds:.3f}",
            f"{self.build.nodes_before} → {self.build.nodes_after}",
            "" if self.mem_ort != self.mem_ort else f"{self.mem_ort:.0f}",
            "" if self.mem_torch != self.mem_torch else f"{self.mem_torch:.0f}",
            "" if self.err != self.err else f"{self.err:.1e}", str(reps),
        ]


HEADER = ["model", "ORT fwd ms", "ORT fwd+bwd ms", "fwd+bwd / fwd", "PyTorch fwd+bwd ms", "ours / PyTorch",
          "build s (gradients())", "build s (add_gradients)", "nodes", "peak MiB ORT", "peak MiB PyTorch",
          "dx rel. err", "reps"]


BOUND_HEADER = ["ORT fwd ms, all outputs bound", "ORT fwd+bwd ms, input + all outputs (y, every gradient) bound",
                "bound fwd+bwd / bound fwd", "bound fwd+bwd / fwd", "bound / unbound fwd+bwd", "bound / PyTorch"]


def table(rows: list[Row], bound: bool = False) -> str:
    header = [*HEADER[:6], *BOUND_HEADER, *HEADER[6:]] if bound else HEADER
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r.cells(bound)) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=["all"], nargs="+", choices=[*models.MODELS, "all"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--budget", type=float, default=30.0, help="seconds of timed repetitions per model")
    parser.add_argument("--min-reps", type=int, default=10)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory processes")
    parser.add_argument("--profile", help="write onnxruntime profiles of the fwd+bwd runs with this prefix")
    parser.add_argument("--bind-outputs", action="store_true",
                        help="also time both onnxruntime runs with the input and every output bound once (IOBinding)")
    parser.add_argument("--save", help="folder to save each model and its gradient model to")
    parser.add_argument("--write", help="write the table to this markdown file (e.g. bench/RESULTS.md)")
    args = parser.parse_args(argv)
    names = list(models.MODELS) if "all" in args.model else list(dict.fromkeys(args.model))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t0 = time.perf_counter()
            bench = models.build(name)
            build = build_gradients(bench)
            print(f"{name}: {len(bench.xs)} xs, {build.nodes_before} -> {build.nodes_after} nodes, "
                  f"gradients() {build.seconds:.3f} s, add_gradients {build.total_seconds:.3f} s", flush=True)
            if args.save:
                os.makedirs(args.save, exist_ok=True)
                onnx.save(bench.model, os.path.join(args.save, f"{name}.onnx"))
                onnx.save(build.model, os.path.join(args.save, f"{name}_grad.onnx"))
            profile = f"{args.profile}_{name}" if args.profile else None
            timing, err = time_model(bench, build, args.threads, args.budget, args.min_reps, profile,
                                     args.bind_outputs)
            row = Row(name, build, timing, err)
            if not args.no_memory:
                path, x_path = os.path.join(tmp, f"{name}_grad.onnx"), os.path.join(tmp, f"{name}_x.npy")
                onnx.save(build.model, path)
                np.save(x_path, bench.x)
                row.mem_ort = peak_memory(name, "ort", path, x_path, args.threads)
                if bench.torch_module is not None:
                    row.mem_torch = peak_memory(name, "torch", None, x_path, args.threads)
            rows.append(row)
            print(table([row], args.bind_outputs).splitlines()[-1], f"({time.perf_counter() - t0:.0f} s)",
                  flush=True)
    text = table(rows, args.bind_outputs)
    print()
    print(text)
    if args.write:
        command = "python bench/run.py " + " ".join(argv if argv is not None else sys.argv[1:])
        with open(args.write, "w") as f:
            f.write(_results_doc(text, command, args.threads))


def _results_doc(text: str, command: str, threads: int) -> str:
    import platform

    import torch

    return (
        "# Benchmark results\n\n"
        f"Command: `{command}`\n\n"
        f"onnxruntime {ort.__version__} (CPU, {threads} intra-op threads), torch {torch.__version__} "
        f"(`torch.set_num_threads({threads})`), onnx {onnx.__version__}, onnx-ir {ir.__version__}, "
        f"Python {platform.python_version()}, {os.cpu_count()} CPUs.\n\n"
        "Times are medians over interleaved repetitions (fwd, fwd+bwd, PyTorch in turn). fwd+bwd computes the "
        "model's outputs and the gradients of sum(outputs) with respect to the input and every weight; PyTorch "
        "eager runs the same module (same weights) forward and `backward(ones)`. Build times: "
        "`onnxgrad.gradients()` on an `onnx_ir` model (onnxgrad's own time) and `add_gradients()` on a "
        "ModelProto (conversion to and from protobuf included). Peak MiB: resident memory one fwd+bwd adds "
        "over the loaded model, each measured in a fresh process (`bench/peakmem.py`). dx rel. err: the "
        "input gradient against PyTorch's, max |diff| / max |ref|.\n\n"
        f"{text}\n"
    )


if __name__ == "__main__":
    main()
