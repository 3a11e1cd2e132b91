"""Recurrent networks: fwd+bwd against forward-only onnxruntime and PyTorch eager autograd, in one run.

    .venv/bin/python bench/rnn.py                     # LSTM and GRU, 2 layers, hidden 256, batch 32, sequence 128
    .venv/bin/python bench/rnn.py --seq 32 --threads 2 --rounds 5 --loop no

Each module is exported by the TorchScript exporter (``dynamo=False``, the default settings), the gradient graph
is built for the input and every weight (W, R, B of both layers), and the three engines are timed in
alternating rounds on the same threads; medians are printed with the ratios, and the input gradient is checked
against PyTorch's. Each module twice: exported with a static sequence length (the gradient's recurrences
unrolled) and with a run-time one (the recurrences are Loops).
"""

from __future__ import annotations

import argparse
import io
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP workers sleep (see bench/run.py)

import numpy as np
import onnx
import onnxruntime as ort

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnxgrad
from bench.run import ort_session


def median_ms(fn: Callable[[], object], rounds: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(rounds):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1000 * statistics.median(times)


def bench(kind: str, layers: int, hidden: int, batch: int, seq: int, threads: int, rounds: int,
          dynamic: bool = False) -> dict[str, float]:
    import torch

    torch.manual_seed(0)
    module = getattr(torch.nn, kind)(hidden, hidden, num_layers=layers)
    x = torch.randn(seq, batch, hidden)
    f = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (x,), f, dynamo=False, input_names=["x"], output_names=["y"],
                          dynamic_axes={"x": {0: "T"}} if dynamic else None)
    model = onnx.load_from_string(f.getvalue())
    xs = ["x", *[t.name for t in model.graph.initializer]]
    t0 = time.perf_counter()
    aug = onnxgrad.add_gradients(model, ["y"], xs)
    build_s = time.perf_counter() - t0
    feeds = {"x": x.numpy()}
    fwd, both = ort_session(model, threads), ort_session(aug.model, threads)
    grad_names = [aug.gradients[n] for n in xs]
    outs = both.run(["y", grad_names[0]], feeds)

    xt = x.clone().requires_grad_(True)
    module(xt)[0].sum().backward()
    err = float(np.max(np.abs(outs[1] - xt.grad.numpy())) / max(1e-12, float(np.max(np.abs(xt.grad.numpy())))))

    def torch_step() -> None:
        module.zero_grad(set_to_none=True)
        xi = x.clone().requires_grad_(True)
        module(xi)[0].sum().backward()

    torch.set_num_threads(threads)
    times = {"fwd": [], "fwdbwd": [], "torch": []}  # type: dict[str, list[float]]
    steps = {"fwd": lambda: fwd.run(["y"], feeds), "fwdbwd": lambda: both.run(["y", *grad_names], feeds),
             "torch": torch_step}
    for _ in range(rounds):  # alternate the engines, so that a busy spell of the machine hits all three
        for k, fn in steps.items():
            times[k].append(median_ms(fn, 1))
    res = {k: statistics.median(v) for k, v in times.items()}
    nodes = len(aug.model.graph.node)
    label = f"{kind} ({'Loop' if dynamic else 'unrolled'})"
    print(f"{label:16s} fwd {res['fwd']:7.1f} ms   fwd+bwd {res['fwdbwd']:7.1f} ms   torch {res['torch']:7.1f} ms"
          f"   fwd+bwd/fwd {res['fwdbwd'] / res['fwd']:.2f}x   vs torch {res['fwdbwd'] / res['torch']:.2f}x"
          f"   (graph {nodes} nodes, built in {build_s:.1f} s; dx rel. error vs torch {err:.1e})", flush=True)
    return res


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--kind", choices=["LSTM", "GRU", "RNN"], nargs="*", default=["LSTM", "GRU"])
    p.add_argument("--loop", choices=["no", "yes", "both"], default="both",
                   help="export with a run-time sequence length, so that the gradient's recurrences are Loops")
    a = p.parse_args()
    print(f"{a.layers} layers, hidden {a.hidden}, batch {a.batch}, sequence {a.seq}, {a.threads} threads, "
          f"onnxruntime {ort.__version__}; medians of {a.rounds} alternating rounds")
    for kind in a.kind:
        for dynamic in {"no": [False], "yes": [True], "both": [False, True]}[a.loop]:
            bench(kind, a.layers, a.hidden, a.batch, a.seq, a.threads, a.rounds, dynamic)


if __name__ == "__main__":
    main()
