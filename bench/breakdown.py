"""Where a gradient graph's time goes: onnxruntime's kernel times of forward-only and of forward + gradients,
split by what each node does, as multiples of the forward-only run.

    .venv/bin/python bench/breakdown.py --model cnn resnet50 transformer

Both models of a ``bench/run.py`` benchmark run in onnxruntime (CPU, 2 threads) with its profiler on; kernel times
are summed per run (medians would hide nothing here: every run executes the same kernels). The gradient graph's
kernels are split into: the forward part (convolutions, GEMMs, the rest); onnxruntime's NCHWc layout reorders
(``ReorderInput``/``ReorderOutput``, which it inserts around convolutions with constant weights wherever a
neighbour reads plain NCHW); and the gradients: weight gradients of convolutions (a Conv or ConvTranspose whose
kernel is computed from the data), input gradients of convolutions (constant kernel: onnxruntime's NCHWc path),
GEMMs (Gemm, MatMul, FusedMatMul: weight gradients of 1x1 convolutions and linear layers), and the rest
(elementwise masks, normalization and pooling gradients, sums, copies). A ratio of 3.0 for the whole run
leaves the gradients twice the forward-only time.
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import sys

import onnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import models
from bench.run import build_gradients, ort_session

RUNS = 10
CONVS = {"Conv", "ConvTranspose", "NchwcConv", "FusedConv"}
GEMMS = {"Gemm", "MatMul", "FusedMatMul", "FusedGemm"}


def kernel_times(model: onnx.ModelProto, feeds: dict, prefix: str, threads: int) -> list[tuple[str, str, float]]:
    """(node name, op type, ms per run) of every kernel of RUNS profiled runs (after one warm-up run)."""
    ort_session(model, threads).run(None, feeds)
    sess = ort_session(model, threads, prefix)
    for _ in range(RUNS):
        sess.run(None, feeds)
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    return [(e["name"][: -len("_kernel_time")], e["args"]["op_name"], e["dur"] / 1e3 / RUNS) for e in events
            if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]


def data_dependent(model: onnx.ModelProto) -> set[str]:
    """Names of the values computed from the graph's inputs (not from initializers alone)."""
    inits = {i.name for i in model.graph.initializer}
    live = {i.name for i in model.graph.input if i.name not in inits}
    for node in model.graph.node:
        if any(i in live for i in node.input):
            live.update(node.output)
    return live


def category(name: str, op: str, convs: dict[str, bool]) -> str:
    if op.startswith("Reorder"):
        return "NCHWc reorders"
    grad = name.startswith("gradients")
    if op in CONVS:
        if not grad:
            return "forward: conv"
        weight = next((w for node, w in convs.items() if name.startswith(node)), None)
        return "gradients: conv dW" if weight else "gradients: conv dX"
    if op in GEMMS:
        return "gradients: GEMM" if grad else "forward: GEMM"
    return "gradients: other" if grad else "forward: other"


def breakdown(name: str, threads: int, prefix: str) -> list[tuple[str, float, float]]:
    bench = models.build(name)
    grad = build_gradients(bench).model
    feeds = {bench.input_name: bench.x}
    forward = sum(ms for _, _, ms in kernel_times(bench.model, feeds, f"{prefix}_{name}_fwd", threads))
    live = data_dependent(grad)
    convs = {}  # gradient conv node (name, output name) -> whether its kernel comes from the data (a dW)
    for node in grad.graph.node:
        if node.op_type in ("Conv", "ConvTranspose") and node.name.startswith("gradients"):
            for key in (node.name, node.output[0]):
                convs[key] = node.input[1] in live
    totals: collections.Counter[str] = collections.Counter()
    for node_name, op, ms in kernel_times(grad, feeds, f"{prefix}_{name}_grad", threads):
        totals[category(node_name, op, convs)] += ms
    rows = [("forward-only run", forward, 1.0)]
    order = ["forward: conv", "forward: GEMM", "forward: other", "NCHWc reorders", "gradients: conv dW",
             "gradients: conv dX", "gradients: GEMM", "gradients: other"]
    rows += [(key, totals[key], totals[key] / forward) for key in order if totals[key]]
    whole = sum(totals.values())
    rows.append(("forward + gradients run", whole, whole / forward))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--model", nargs="+", default=["cnn", "resnet50"], choices=list(models.MODELS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prefix", default="/tmp/onnxgrad_breakdown", help="where onnxruntime writes its profiles")
    args = parser.parse_args()
    for name in args.model:
        print(f"\n{name}: kernel ms per run (onnxruntime profiler, {args.threads} threads)\n")
        print("| part | ms | x forward-only |\n|---|---|---|")
        for label, ms, ratio in breakdown(name, args.threads, args.prefix):
            print(f"| {label} | {ms:.1f} | {ratio:.2f} |")


if __name__ == "__main__":
    main()
