"""Forward mode against reverse mode: node counts and onnxruntime run times.

    .venv/bin/python bench/forward.py            # prints the three tables of bench/RESULTS.md's forward-mode section

1. A JVP by ``onnxgrad.jvp`` against the double-VJP trick (the JVP as the gradient of <VJP(u), v> with respect to a
   dummy cotangent u), on every bundled model, every float input and weight with a tangent.
2. Hessian-vector products, forward-over-reverse against reverse-over-reverse (``hessian_vector_product(mode=)``),
   on every bundled model: nodes added and fwd+HVP run time.
3. ``jacobian(mode=)`` on a 3-input, 1000-output model: nodes, build time and run time, forward against reverse.

Times: onnxruntime CPU, 2 intra-op threads, the median of ``--reps`` runs after a warm-up.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
from onnx import helper as oh
from onnx import numpy_helper

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from onnxgrad import GradInput, gradients, hessian_vector_product, jacobian  # noqa: E402
from onnxgrad.forward import jvp  # noqa: E402
from onnxgrad.runtime import random_feeds  # noqa: E402
from onnxgrad.values import value_table  # noqa: E402

BUNDLED = ["mlp.onnx", "mlp_classifier.onnx", "cnn.onnx", "transformer_block.onnx", "lj_energy.onnx"]
DIMS = {"batch": 16, "seq": 32, "atoms": 20}


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads, opts.inter_op_num_threads = 2, 1
    opts.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


def _ms(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str], reps: int) -> float:
    sess = _session(model)
    names = {i.name for i in sess.get_inputs()}
    feeds = {k: v for k, v in feeds.items() if k in names}
    sess.run(outputs, feeds)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        sess.run(outputs, feeds)
        times.append(time.perf_counter() - t0)
    return 1e3 * statistics.median(times)


def _expose(m: ir.Model, names: list[str | None]) -> list[str]:
    table = value_table(m.graph)
    out = []
    for n in names:
        if n is not None and not table[n].is_graph_output():
            m.graph.outputs.append(table[n])
            out.append(n)
    return out


def _primals(proto: onnx.ModelProto) -> list[str]:
    floats = (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE)
    inits = {t.name for t in proto.graph.initializer}
    return [i.name for i in proto.graph.input if i.type.tensor_type.elem_type in floats and i.name not in inits] + [
        t.name for t in proto.graph.initializer if t.data_type in floats]


def _feeds(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return random_feeds(model, np.random.default_rng(0), DIMS)


def _build(proto: onnx.ModelProto, fn: Callable[[ir.Model], list[str | None]]) -> tuple[onnx.ModelProto, list[str],
                                                                                         int, float]:
    m = ir.serde.deserialize_model(proto)
    before = len(list(m.graph))
    t0 = time.perf_counter()
    names = fn(m)
    build = time.perf_counter() - t0
    outs = _expose(m, names)
    return ir.serde.serialize_model(m), outs, len(list(m.graph)) - before, build


def jvp_rows(reps: int) -> list[str]:
    rows = ["| model | forward nodes | jvp: nodes added | double-VJP: nodes added | jvp ms | double-VJP ms |",
            "|---|---|---|---|---|---|"]
    for file in BUNDLED:
        proto = onnx.load(ROOT / "models" / file)
        xs = _primals(proto)
        ys = [o.name for o in proto.graph.output]
        fwd, f_outs, f_nodes, _ = _build(proto, lambda m, xs=xs, ys=ys: jvp(m, xs, ys=ys)[1])

        def double_vjp(m: ir.Model, xs: list[str] = xs, ys: list[str] = ys) -> list[str | None]:
            us = [GradInput(f"u/{y}") for y in ys]
            first = gradients(m, ys, xs, grad_ys=us, name="vjp", unconnected_gradients="zero")
            table = value_table(m.graph)
            u_names = [n for n in (f"u/{y}" for y in ys) if n in table]
            vs = [GradInput(f"v/{x}") for x in xs]
            return gradients(m, [g for g in first if g is not None], u_names,
                             grad_ys=[v for g, v in zip(first, vs, strict=True) if g is not None], name="jvp2")

        dbl, d_outs, d_nodes, _ = _build(proto, double_vjp)
        feeds = _feeds(dbl)
        n_fwd = len(proto.graph.node)
        rows.append(f"| {file} | {n_fwd} | {f_nodes} | {d_nodes} | {_ms(fwd, feeds | _feeds(fwd), f_outs, reps):.3f} "
                    f"| {_ms(dbl, feeds, d_outs, reps):.3f} |")
    return rows


def hvp_rows(reps: int) -> list[str]:
    rows = ["| model | forward nodes | fwd-over-rev: nodes added | rev-over-rev: nodes added | fwd-over-rev ms "
            "| rev-over-rev ms | build s (f/r) |", "|---|---|---|---|---|---|---|"]
    for file in BUNDLED:
        proto = onnx.load(ROOT / "models" / file)
        xs = _primals(proto)
        loss = "energy" if file == "lj_energy.onnx" else "loss"
        built = {}
        for mode in ("forward-over-reverse", "reverse-over-reverse"):
            built[mode] = _build(proto, lambda m, mode=mode, loss=loss, xs=xs: hessian_vector_product(
                m, loss, xs, mode=mode))
        (fm, fo, fn, fb), (rm, ro, rn, rb) = built["forward-over-reverse"], built["reverse-over-reverse"]
        feeds = _feeds(fm)
        rows.append(f"| {file} | {len(proto.graph.node)} | {fn} | {rn} | {_ms(fm, feeds, fo, reps):.3f} | "
                    f"{_ms(rm, feeds, ro, reps):.3f} | {fb:.3f} / {rb:.3f} |")
    return rows


def wide_model(n_in: int = 3, n_out: int = 1000, hidden: int = 64) -> onnx.ModelProto:
    """y[1000] = W2 tanh(W1 x + b1) + sin(x) . c: three inputs, a thousand outputs."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(a.astype(np.float32), k) for k, a in {
        "W1": rng.standard_normal((n_in, hidden)) / np.sqrt(n_in), "b1": 0.1 * rng.standard_normal(hidden),
        "W2": rng.standard_normal((hidden, n_out)) / np.sqrt(hidden), "C": rng.standard_normal((n_in, n_out)),
    }.items()]
    nodes = [oh.make_node("MatMul", ["x", "W1"], ["h0"]), oh.make_node("Add", ["h0", "b1"], ["h1"]),
             oh.make_node("Tanh", ["h1"], ["h"]), oh.make_node("MatMul", ["h", "W2"], ["y0"]),
             oh.make_node("Sin", ["x"], ["s"]), oh.make_node("MatMul", ["s", "C"], ["y1"]),
             oh.make_node("Add", ["y0", "y1"], ["y"])]
    graph = oh.make_graph(nodes, "wide", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [n_in])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [n_out])], inits)
    return onnx.shape_inference.infer_shapes(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)],
                                                           ir_version=8))


def jacobian_rows(reps: int) -> list[str]:
    proto = wide_model()
    x = np.random.default_rng(1).standard_normal(3).astype(np.float32)
    rows = ["| jacobian of y[1000] by x[3] | nodes added | build s | run ms | max abs diff vs the other |",
            "|---|---|---|---|---|"]
    results: dict[str, Any] = {}
    for mode in ("forward", "reverse"):
        m, outs, nodes, build = _build(proto, lambda mm, mode=mode: [jacobian(mm, "y", "x", mode=mode)])
        ms = _ms(m, {"x": x}, outs, reps)
        value = _session(m).run(outs, {"x": x})[0]
        results[mode] = (nodes, build, ms, value)
    diff = float(np.abs(results["forward"][3] - results["reverse"][3]).max())
    for mode, (nodes, build, ms, _) in results.items():
        rows.append(f"| {mode} | {nodes} | {build:.2f} | {ms:.3f} | {diff:.1e} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--reps", type=int, default=50)
    args = parser.parse_args()
    print(f"onnxruntime {ort.__version__}, onnx {onnx.__version__}, 2 intra-op threads, median of {args.reps} runs")
    for title, rows in (("JVP: onnxgrad.jvp against the double-VJP trick", jvp_rows(args.reps)),
                        ("HVP: forward-over-reverse against reverse-over-reverse", hvp_rows(args.reps)),
                        ("Jacobian, 3 inputs and 1000 outputs", jacobian_rows(args.reps))):
        print(f"\n{title}\n")
        print("\n".join(rows))


if __name__ == "__main__":
    main()
