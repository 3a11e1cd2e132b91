"""Per-layer cost of Conv gradients against the forward conv, for each weight-gradient plan.

    .venv/bin/python bench/conv_grad.py                  # CNN and ResNet-50 layer shapes, every plan
    .venv/bin/python bench/conv_grad.py --plan auto      # only the plan onnxgrad picks

For each layer, one-Conv models are differentiated with respect to W (dW) and to X (dX) with dY as a new graph
input, and run in onnxruntime (CPU, 2 threads) with its profiler on. Reported: the forward Conv's kernel time
and the gradient nodes' kernel times (medians over runs), as multiples of the forward's. Plans: ``interleaved``
(one Conv of X with its channels interleaved into the last spatial axis), ``gemm`` (im2col Slices + one Gemm),
``auto`` (what the rule chooses). The forward Conv runs onnxruntime's NCHWc kernels (constant weights); the
dW Conv cannot (its kernel is dY), which is most of the gap.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper as oh

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnxgrad
from onnxgrad.plans import conv as conv_plans

# (name, N, C, H, M, kernel, stride): the CNN's 3x3 layers (batch 16) and some of ResNet-50's (batch 1)
LAYERS = [
    ("cnn 32@32 3x3", 16, 32, 32, 32, 3, 1),
    ("cnn 64@16 3x3", 16, 64, 16, 64, 3, 1),
    ("cnn 128@8 3x3", 16, 128, 8, 128, 3, 1),
    ("resnet 64@56 3x3", 1, 64, 56, 64, 3, 1),
    ("resnet 256@56 1x1->64", 1, 256, 56, 64, 1, 1),
    ("resnet 128@56 3x3 s2", 1, 128, 56, 128, 3, 2),
    ("resnet 256@14 3x3", 1, 256, 14, 256, 3, 1),
    ("resnet 512@7 3x3", 1, 512, 7, 512, 3, 1),
]


@contextmanager
def plan(name: str) -> Iterator[None]:
    """Force a weight-gradient plan (``auto``: leave the rule's choice)."""
    if name == "auto":
        yield
        return
    forced = "forced by --plan gemm" if name == "gemm" else None
    with mock.patch.object(conv_plans, "gemm_is_faster", lambda *args: forced):
        yield


def model(n: int, c: int, h: int, m: int, k: int, s: int) -> onnx.ModelProto:
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array((rng.standard_normal((m, c, k, k)) * 0.1).astype(np.float32), "w")
    node = oh.make_node("Conv", ["x", "w"], ["y"], pads=[k // 2] * 4, strides=[s, s])
    graph = oh.make_graph([node], "conv", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [n, c, h, h])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], [w])
    return onnx.shape_inference.infer_shapes(
        oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8))


def profile(proto: onnx.ModelProto, feeds: dict[str, np.ndarray], runs: int) -> dict[str, float]:
    """Median per-run kernel milliseconds of the forward conv with its layout reorders ('fwd') and of all
    gradient nodes ('grad')."""
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 2, 1, 3
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.enable_profiling = True
    with tempfile.TemporaryDirectory() as tmp:
        opts.profile_file_prefix = os.path.join(tmp, "p")
        sess = ort.InferenceSession(proto.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        for _ in range(runs + 3):  # the first 3: warm-up
            sess.run(None, feeds)
        with open(sess.end_profiling()) as f:
            events = json.load(f)
    spans = [(e["ts"], e["ts"] + e["dur"]) for e in events if e.get("cat") == "Session" and e["name"] == "model_run"]
    totals = {key: [0.0] * len(spans) for key in ("fwd", "grad")}
    for e in events:
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time"):
            continue
        key = "grad" if e["name"].startswith("gradients/") else "fwd"  # fwd: the Conv and its layout reorders
        run = next((k for k, (a, b) in enumerate(spans) if a <= e["ts"] <= b), None)
        if run is not None:
            totals[key][run] += e["dur"] / 1e3
    return {key: statistics.median(v[3:]) for key, v in totals.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", nargs="+", default=["auto", "interleaved", "gemm"],
                        choices=["auto", "interleaved", "gemm"])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    rng = np.random.default_rng(1)
    print("| layer | fwd conv ms | dX / fwd | " + " | ".join(f"dW / fwd ({p})" for p in args.plan) + " |")
    print("|---|---|---|" + "---|" * len(args.plan))
    for name, n, c, h, m, k, s in LAYERS:
        proto = model(n, c, h, m, k, s)
        x = rng.standard_normal((n, c, h, h)).astype(np.float32)
        out = [d.dim_value for d in proto.graph.output[0].type.tensor_type.shape.dim]
        dy = rng.standard_normal(out).astype(np.float32)
        aug = onnxgrad.add_gradients(proto, ["y"], ["x"], grad_ys=onnxgrad.NEW_INPUT)
        seed = next(i.name for i in aug.model.graph.input if i.name != "x")
        dx = profile(aug.model, {"x": x, seed: dy}, args.runs)
        cells = [f"{dx['fwd']:.2f}", f"{dx['grad'] / dx['fwd']:.2f}"]
        for p in args.plan:
            with plan(p):
                aug = onnxgrad.add_gradients(proto, ["y"], ["w"], grad_ys=onnxgrad.NEW_INPUT)
            dw = profile(aug.model, {"x": x, seed: dy}, args.runs)
            cells.append(f"{dw['grad'] / dw['fwd']:.2f}")
        print(f"| {name} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
