"""Per-layer cost of Conv gradients against the forward conv, for each weight-gradient plan.

    .venv/bin/python bench/conv_grad.py                  # CNN and ResNet-50 layer shapes, every plan
    .venv/bin/python bench/conv_grad.py --plan auto      # only the plan onnxgrad picks
    .venv/bin/python bench/conv_grad.py --layers seg --batch static symbolic   # dynamic_nets' layers, both batches
    .venv/bin/python bench/conv_grad.py --layers seg --forms   # hand-built dW forms over a symbolic batch

For each layer, one-Conv models are differentiated with respect to W (dW) and to X (dX) with dY as a new graph
input, and run in onnxruntime (CPU, 2 threads) with its profiler on. Reported: the forward Conv's kernel time
and the gradient nodes' kernel times (medians over runs), as multiples of the forward's. Plans: ``interleaved``
(one Conv of X with its channels interleaved into the last spatial axis), ``gemm`` (im2col Slices + one Gemm),
``auto`` (what the rule chooses: with a symbolic batch, an If between the two where the batch decides, whose
own time is left out, as it is the time of its branch's nodes). The forward Conv runs onnxruntime's NCHWc
kernels (constant weights); the dW Conv cannot (its kernel is dY), which is most of the gap.

``--batch symbolic`` leaves X's batch dimension symbolic (an export's ``dynamic_axes={"x": {0: "batch"}}``): the
interleaved dW Conv is then ungrouped (N as its input channels, dY transposed to its kernel) where a static N
makes it one grouped Conv (group = N).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from unittest import mock

import numpy as np
import onnx
import onnxruntime as ort
from onnx import helper as oh

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnxgrad
from bench.run import ort_session
from onnxgrad.plans import conv as conv_plans
from onnxgrad.plans.base import NotApplicable

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
# tests/dynamic_nets.py's seg and det layers at bench/dynamic.py's size (4x3x96x96)
SEG_LAYERS = [
    ("seg stem 3@96 3x3", 4, 3, 96, 8, 3, 1),
    ("seg down1 8@96 3x3 s2", 4, 8, 96, 12, 3, 2),
    ("seg down2 12@48 3x3 s2", 4, 12, 48, 16, 3, 2),
    ("seg mid 16@48 3x3", 4, 16, 48, 12, 3, 1),
    ("seg fuse 20@96 3x3", 4, 20, 96, 8, 3, 1),
    ("seg head 8@96 1x1", 4, 8, 96, 4, 1, 1),
    ("det stem 3@96 3x3 s2", 4, 3, 96, 8, 3, 2),
    ("det stage1 8@24 3x3", 4, 8, 24, 12, 3, 1),
    ("det stage2 12@12 3x3 s2", 4, 12, 12, 16, 3, 2),
]


@contextmanager
def plan(name: str) -> Iterator[None]:
    """Force a weight-gradient plan (``auto``: leave the rule's choice)."""
    if name == "auto":
        yield
        return
    if name == "interleaved":
        with mock.patch.object(conv_plans, "gemm_is_faster", lambda *args: None):
            yield
        return
    skip = {k: (lambda *args: NotApplicable("forced by --plan gemm")) for k in ("interleaved", "by_batch")}
    with mock.patch.dict(conv_plans.WEIGHT_GRAD, skip):
        yield


def model(n: int, c: int, h: int, m: int, k: int, s: int, batch: str = "static") -> onnx.ModelProto:
    """One Conv (pads k // 2, strides s) of x (n, c, h, h), its batch dimension symbolic with ``batch='symbolic'``."""
    rng = np.random.default_rng(0)
    w = onnx.numpy_helper.from_array((rng.standard_normal((m, c, k, k)) * 0.1).astype(np.float32), "w")
    node = oh.make_node("Conv", ["x", "w"], ["y"], pads=[k // 2] * 4, strides=[s, s])
    lead: int | str = "N" if batch == "symbolic" else n
    graph = oh.make_graph([node], "conv", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [lead, c, h, h])],
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
        if e.get("cat") != "Node" or not e["name"].endswith("_kernel_time") or e["args"].get("op_name") == "If":
            continue  # an If's time is its branch's nodes', reported on their own
        key = "grad" if e["name"].startswith("gradients/") else "fwd"  # fwd: the Conv and its layout reorders
        run = next((k for k, (a, b) in enumerate(spans) if a <= e["ts"] <= b), None)
        if run is not None:
            totals[key][run] += e["dur"] / 1e3
    return {key: statistics.median(v[3:]) for key, v in totals.items()}


# ---------------------------------------------------------------- --forms: hand-built dW graphs (2-D, pads k // 2)
# Other forms of dW = dY (*) X over a symbolic batch, built directly (not by onnxgrad), checked against
# torch.autograd; each returns (nodes, initializers) reading "x" (N, C, H, H) and "dy" (N, M, o, o), writing "dw".
Form = tuple[list[onnx.NodeProto], list[onnx.TensorProto]]


def _ints(name: str, values: int | list[int]) -> onnx.TensorProto:
    return onnx.numpy_helper.from_array(np.asarray(values, dtype=np.int64), name)


def _geometry(c: int, h: int, k: int, s: int) -> tuple[int, int, list[int]]:
    """(o, p, pads of the interleaved Conv over (1, N, H, H * C)): end pads reach the last window exactly."""
    p = k // 2
    o = (h + 2 * p - k) // s + 1
    e = s * (o - 1) + k - p - h
    return o, p, [p, p * c, e, e * c]


def form_interleaved(n: int, c: int, h: int, m: int, k: int, s: int, groups: int | None) -> Form:
    """onnxgrad's interleaved dW: X (1, N, H, H * C) convolved with dY as the kernel. ``groups``: None, the
    ungrouped Conv of a symbolic N (dY^T (M, N, o, o) as the kernel); g, a Conv of g groups of N / g samples each
    (dY reshaped to (g * M, N / g, o, o); g = N is onnxgrad's static-N form), its g partial dWs summed."""
    o, _, pads = _geometry(c, h, k, s)
    inits = [_ints("s1", [1, -1, h, h * c]), _ints("s4", [m, k, k, c])]
    nodes = [oh.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 3, 1]), oh.make_node("Reshape", ["xt", "s1"], ["xi"])]
    conv = {"dilations": [s, s * c], "pads": pads}
    if groups is None:
        nodes += [oh.make_node("Transpose", ["dy"], ["ker"], perm=[1, 0, 2, 3]),
                  oh.make_node("Conv", ["xi", "ker"], ["dws"], **conv)]
    else:
        inits += [_ints("k5", [groups, -1, m, o, o]), _ints("k4", [groups * m, -1, o, o]),
                  _ints("s3", [groups, -1]), _ints("ax", [0])]
        nodes += [oh.make_node("Reshape", ["dy", "k5"], ["d5"]),
                  oh.make_node("Transpose", ["d5"], ["d5t"], perm=[0, 2, 1, 3, 4]),
                  oh.make_node("Reshape", ["d5t", "k4"], ["ker"]),
                  oh.make_node("Conv", ["xi", "ker"], ["dwg"], group=groups, **conv),
                  oh.make_node("Reshape", ["dwg", "s3"], ["dwr"]),
                  oh.make_node("ReduceSum", ["dwr", "ax"], ["dws"], keepdims=0)]
    nodes += [oh.make_node("Reshape", ["dws", "s4"], ["dw3"]),
              oh.make_node("Transpose", ["dw3"], ["dw"], perm=[0, 3, 1, 2])]
    return nodes, inits


def form_if_even(n: int, c: int, h: int, m: int, k: int, s: int) -> Form:
    """An If on N % 2 == 0: the 2-group interleaved Conv, else the ungrouped one (X interleaved outside the If)."""
    two, _ = form_interleaved(n, c, h, m, k, s, 2)
    one, _ = form_interleaved(n, c, h, m, k, s, None)
    _, inits = form_interleaved(n, c, h, m, k, s, 2)
    out = oh.make_tensor_value_info("dws", onnx.TensorProto.FLOAT, None)
    even = oh.make_graph(two[2:8], "even", [], [out])
    odd = oh.make_graph(one[2:4], "odd", [], [out])
    inits += [_ints("two", 2), _ints("zero", 0)]
    nodes = [*two[:2], oh.make_node("Shape", ["dy"], ["shape"]), oh.make_node("Gather", ["shape", "zero"], ["n"]),
             oh.make_node("Mod", ["n", "two"], ["r"]), oh.make_node("Equal", ["r", "zero"], ["c"]),
             oh.make_node("If", ["c"], ["dws"], then_branch=even, else_branch=odd), *two[8:]]
    return nodes, inits


def form_eye_bmm(n: int, c: int, h: int, m: int, k: int, s: int) -> Form:
    """im2col by a Conv with constant one-hot kernels (onnxruntime's NCHWc kernels), then dY (N, M, P) times the
    taps (N, C * k * k, P) transposed, one MatMul per sample, summed over N."""
    o, p, _ = _geometry(c, h, k, s)
    eye = onnx.numpy_helper.from_array(np.eye(k * k, dtype=np.float32).reshape(k * k, 1, k, k), "eye")
    inits = [eye, _ints("s1", [-1, 1, h, h]), _ints("s2", [-1, c * k * k, o * o]), _ints("s3", [-1, m, o * o]),
             _ints("ax", [0]), _ints("s4", [m, c, k, k])]
    nodes = [oh.make_node("Reshape", ["x", "s1"], ["x1"]),
             oh.make_node("Conv", ["x1", "eye"], ["t"], pads=[p] * 4, strides=[s, s]),
             oh.make_node("Reshape", ["t", "s2"], ["t2"]), oh.make_node("Transpose", ["t2"], ["t2t"], perm=[0, 2, 1]),
             oh.make_node("Reshape", ["dy", "s3"], ["d3"]), oh.make_node("MatMul", ["d3", "t2t"], ["pw"]),
             oh.make_node("ReduceSum", ["pw", "ax"], ["dws"], keepdims=0),
             oh.make_node("Reshape", ["dws", "s4"], ["dw"])]
    return nodes, inits


def form_grouped(n: int, c: int, h: int, m: int, k: int, s: int) -> Form:
    """onnxgrad's grouped plan at group 1: X^T (C, N, H, H) convolved with dY^T (M, N, o, o), transposed back."""
    _, _, pads = _geometry(1, h, k, s)
    nodes = [oh.make_node("Transpose", ["x"], ["xt"], perm=[1, 0, 2, 3]),
             oh.make_node("Transpose", ["dy"], ["dyt"], perm=[1, 0, 2, 3]),
             oh.make_node("Conv", ["xt", "dyt"], ["dwt"], dilations=[s, s], pads=pads),
             oh.make_node("Transpose", ["dwt"], ["dw"], perm=[1, 0, 2, 3])]
    return nodes, []


FORMS: dict[str, tuple[Callable[..., Form], bool]] = {  # name: (builder, whether N is static)
    "interleaved, static N (group N)": (lambda *a: form_interleaved(*a, a[0]), True),
    "interleaved, symbolic N": (lambda *a: form_interleaved(*a, None), False),
    "interleaved, 2 groups": (lambda *a: form_interleaved(*a, 2), False),
    "If N even: 2 groups": (form_if_even, False),
    "one-hot Conv + batched MatMul": (form_eye_bmm, False),
    "grouped (X^T, dY^T)": (form_grouped, False),
}


def run_forms(layers: list[tuple[str, int, int, int, int, int, int]], rounds: int) -> None:
    """Each form per layer, interleaved rounds: the median wall time of a run (ms), checked against torch."""
    import torch

    names = list(FORMS)
    print("| layer | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))
    rng = np.random.default_rng(0)
    for label, n, c, h, m, k, s in layers:
        o = (h + 2 * (k // 2) - k) // s + 1
        x = rng.standard_normal((n, c, h, h)).astype(np.float32)
        dy = rng.standard_normal((n, m, o, o)).astype(np.float32)
        w = torch.zeros((m, c, k, k), requires_grad=True)
        (torch.nn.functional.conv2d(torch.tensor(x), w, stride=s, padding=k // 2) * torch.tensor(dy)).sum().backward()
        want = w.grad.numpy()
        sessions = {}
        for name, (build, static) in FORMS.items():
            nodes, inits = build(n, c, h, m, k, s)
            lead: int | str = n if static else "N"
            inputs = [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [lead, c, h, h]),
                      oh.make_tensor_value_info("dy", onnx.TensorProto.FLOAT, [lead, m, o, o])]
            graph = oh.make_graph(nodes, "dw", inputs, [oh.make_tensor_value_info("dw", onnx.TensorProto.FLOAT, None)],
                                  inits)
            proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
            sessions[name] = ort_session(proto, 2)
            got = sessions[name].run(None, {"x": x, "dy": dy})[0]
            assert np.abs(got - want).max() <= 1e-4 * np.abs(want).max(), (label, name)
        times: dict[str, list[float]] = {name: [] for name in names}
        for _ in range(rounds):
            for name, sess in sessions.items():
                t0 = time.perf_counter()
                sess.run(None, {"x": x, "dy": dy})
                times[name].append(time.perf_counter() - t0)
        cells = [f"{statistics.median(times[k]) * 1e3:.3f}" for k in names]
        print(f"| {label} | " + " | ".join(cells) + " |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--plan", nargs="+", default=["auto", "interleaved", "gemm"],
                        choices=["auto", "interleaved", "gemm"])
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--layers", choices=["cnn", "seg"], default="cnn",
                        help="the CNN's and ResNet-50's layers, or tests/dynamic_nets.py's seg and det layers")
    parser.add_argument("--batch", nargs="+", choices=["static", "symbolic"], default=["static"],
                        help="X's batch dimension: static, or symbolic (one row per layer and batch)")
    parser.add_argument("--forms", action="store_true",
                        help="instead: hand-built dW graphs over a symbolic batch (FORMS), even batches only")
    args = parser.parse_args()
    if args.forms:
        run_forms(LAYERS if args.layers == "cnn" else SEG_LAYERS, args.runs)
        return
    rng = np.random.default_rng(1)
    print("| layer | batch | fwd conv ms | dX / fwd | " + " | ".join(f"dW / fwd ({p})" for p in args.plan) + " |")
    print("|---|---|---|---|" + "---|" * len(args.plan))
    for name, n, c, h, m, k, s in LAYERS if args.layers == "cnn" else SEG_LAYERS:
        x = rng.standard_normal((n, c, h, h)).astype(np.float32)
        o = (h + 2 * (k // 2) - k) // s + 1
        dy = rng.standard_normal((n, m, o, o)).astype(np.float32)
        for batch in args.batch:
            proto = model(n, c, h, m, k, s, batch)
            aug = onnxgrad.add_gradients(proto, ["y"], ["x"], grad_ys=onnxgrad.NEW_INPUT)
            seed = next(i.name for i in aug.model.graph.input if i.name != "x")
            dx = profile(aug.model, {"x": x, seed: dy}, args.runs)
            cells = [f"{dx['fwd']:.2f}", f"{dx['grad'] / dx['fwd']:.2f}"]
            for p in args.plan:
                with plan(p):
                    aug = onnxgrad.add_gradients(proto, ["y"], ["w"], grad_ys=onnxgrad.NEW_INPUT)
                dw = profile(aug.model, {"x": x, seed: dy}, args.runs)
                cells.append(f"{dw['grad'] / dw['fwd']:.2f}")
            print(f"| {name} | {batch} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
