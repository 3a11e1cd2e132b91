"""Where a gradient model's memory goes: the live tensors in the model's own node order, in the order onnxruntime
actually ran the nodes (read back from its profiler), and the resident memory a run adds (sampled over time).

    .venv/bin/python bench/memtrace.py MODEL.onnx X.npy                       # onnxgrad.runtime.session's settings
    .venv/bin/python bench/memtrace.py MODEL.onnx X.npy --order DEFAULT --level ORT_ENABLE_ALL --reuse

Live bytes: every node output from its node until its last reader (graph outputs to the end), sizes from onnx's
shape inference with the input's shape fixed to X's. The resident trace runs the model twice with the CPU arena off
(so freed tensors go back to the system: run under MALLOC_MMAP_THRESHOLD_=65536 for glibc to return them at once)
and samples /proc/self/statm during the second run. A gap between the simulated and the measured peak is
onnxruntime's own: kernel scratch buffers, or its planner holding buffers for reuse (``--reuse``). This is how the
rematerialisation settings in onnxgrad/workarounds.py were found.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time
from collections.abc import Sequence

import numpy as np
import onnx


def feeds_for(model: onnx.ModelProto, x: np.ndarray) -> dict[str, np.ndarray]:
    """x for the first input; random values for any other, its symbolic dims sized as x fixes them."""
    from onnxgrad.runtime import random_feeds

    dims = {d.dim_param: n for d, n in zip(model.graph.input[0].type.tensor_type.shape.dim, x.shape, strict=True)
            if d.dim_param}
    feeds = random_feeds(model, np.random.default_rng(0), {"*": 1, **dims})
    feeds[model.graph.input[0].name] = x
    return feeds


def value_sizes(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The model with its inputs fixed to the feeds' shapes and shapes inferred, and each sized value's bytes."""
    fixed = onnx.ModelProto()
    fixed.CopyFrom(model)
    for inp in fixed.graph.input:
        if inp.name not in feeds:
            continue
        for d, n in zip(inp.type.tensor_type.shape.dim, feeds[inp.name].shape, strict=True):
            d.ClearField("dim_param")
            d.dim_value = n
    fixed = onnx.shape_inference.infer_shapes(fixed, data_prop=True)
    sizes = {}
    for vi in [*fixed.graph.value_info, *fixed.graph.output, *fixed.graph.input]:
        t = vi.type.tensor_type
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim]
        if t.HasField("shape") and None not in dims:
            itemsize = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
            sizes[vi.name] = int(np.prod(dims, dtype=np.int64)) * itemsize
    return fixed, sizes


def live_peak(nodes: Sequence[onnx.NodeProto], sizes: dict[str, int], outputs: set[str]
              ) -> tuple[int, int, list[tuple[str, int]]]:
    """(peak bytes, the node index where it is reached, the largest values alive there) with ``nodes`` run in order."""
    last = {i: k for k, n in enumerate(nodes) for i in n.input}
    live: dict[str, int] = {}
    total, peak, at, snapshot = 0, 0, -1, {}
    for k, n in enumerate(nodes):
        for o in n.output:
            if o:
                live[o] = sizes.get(o, 0)
                total += live[o]
        if total > peak:
            peak, at, snapshot = total, k, dict(live)
        for v in {*n.input, *n.output}:
            if v in live and last.get(v, k) <= k and v not in outputs:
                total -= live.pop(v)
    return peak, at, sorted(snapshot.items(), key=lambda kv: -kv[1])[:8]


def _options(order: str, level: str, reuse: bool, profile: str | None = None) -> object:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads, opts.log_severity_level = 2, 1, 3
    opts.execution_order = getattr(ort.ExecutionOrder, order)
    opts.graph_optimization_level = getattr(ort.GraphOptimizationLevel, level)
    opts.enable_mem_reuse, opts.enable_cpu_mem_arena = reuse, False
    if profile:
        opts.enable_profiling, opts.profile_file_prefix = True, profile
    return opts


def runtime_order(path: str, feeds: dict[str, np.ndarray], order: str, level: str, reuse: bool, tmp: str
                  ) -> tuple[onnx.ModelProto, list[str]]:
    """onnxruntime's optimized model and the names of its nodes in the order one run executed them."""
    import onnxruntime as ort

    opts = _options(order, level, reuse, os.path.join(tmp, "prof"))
    opts.optimized_model_filepath = os.path.join(tmp, "optimized.onnx")  # type: ignore[attr-defined]
    sess = ort.InferenceSession(path, opts, providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    with open(sess.end_profiling()) as f:
        events = json.load(f)
    ran = [e["name"][: -len("_kernel_time")] for e in events
           if e.get("cat") == "Node" and e["name"].endswith("_kernel_time")]
    return onnx.load(opts.optimized_model_filepath), ran  # type: ignore[attr-defined]


def resident_trace(path: str, feeds: dict[str, np.ndarray], order: str, level: str, reuse: bool
                   ) -> tuple[float, list[float]]:
    """(peak MiB the second run adds to the resident size, the resident MiB above it at 20 points of the run)."""
    import onnxruntime as ort

    sess = ort.InferenceSession(path, _options(order, level, reuse), providers=["CPUExecutionProvider"])
    sess.run(None, feeds)
    page, samples, stop = os.sysconf("SC_PAGE_SIZE"), [], threading.Event()

    def sample() -> None:
        with open("/proc/self/statm") as f:
            while not stop.is_set():
                f.seek(0)
                samples.append((time.perf_counter(), int(f.read().split()[1]) * page))

    thread = threading.Thread(target=sample)
    thread.start()
    time.sleep(0.05)
    start, base = time.perf_counter(), samples[-1][1]
    sess.run(None, feeds)
    end = time.perf_counter()
    stop.set()
    thread.join()
    during = [(t, b) for t, b in samples if start <= t <= end] or samples[-1:]
    curve = [([b for t, b in during if t <= start + f * (end - start)] or [base])[-1] for f in np.linspace(0, 1, 20)]
    return (max(b for _, b in during) - base) / 2**20, [(b - base) / 2**20 for b in curve]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("x", help="the first input, as .npy (other inputs get random values of matching sizes)")
    parser.add_argument("--order", choices=["DEFAULT", "PRIORITY_BASED"], default="PRIORITY_BASED")
    parser.add_argument("--level", default="ORT_ENABLE_BASIC",
                        choices=["ORT_DISABLE_ALL", "ORT_ENABLE_BASIC", "ORT_ENABLE_EXTENDED", "ORT_ENABLE_ALL"])
    parser.add_argument("--reuse", action="store_true", help="let onnxruntime's planner reuse buffers")
    args = parser.parse_args()
    model = onnx.load(args.model)
    feeds = feeds_for(model, np.load(args.x))
    added, curve = resident_trace(args.model, feeds, args.order, args.level, args.reuse)  # first: a clean process
    mib = 2**20
    fixed, sizes = value_sizes(model, feeds)
    outputs = {o.name for o in fixed.graph.output}
    peak, at, big = live_peak(list(fixed.graph.node), sizes, outputs)
    print(f"live tensors, the model's order: peak {peak / mib:.1f} MiB at node {at} of {len(fixed.graph.node)}")
    for name, b in big:
        print(f"    {b / mib:8.1f} MiB  {name}")
    with tempfile.TemporaryDirectory() as tmp:
        optimized, ran = runtime_order(args.model, feeds, args.order, args.level, args.reuse, tmp)
        opt_fixed, opt_sizes = value_sizes(optimized, feeds)
        by_name = {n.name: n for n in opt_fixed.graph.node}
        seq = [by_name[n] for n in ran if n in by_name]
        peak, at, big = live_peak(seq, opt_sizes, outputs)
        print(f"live tensors, onnxruntime's order ({args.order}, {args.level}): peak {peak / mib:.1f} MiB at "
              f"{seq[at].op_type if seq else '?'} '{seq[at].name if seq else ''}' ({len(seq)} of {len(ran)} nodes)")
        for name, b in big:
            print(f"    {b / mib:8.1f} MiB  {name}")
    print(f"resident memory a run adds (arena off, reuse {'on' if args.reuse else 'off'}): {added:.1f} MiB; over the "
          "run: " + " ".join(f"{c:.0f}" for c in curve))


if __name__ == "__main__":
    sys.exit(main())
