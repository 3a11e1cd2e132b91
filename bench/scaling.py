"""Build time of the gradient graph against graph size: chains of 1k, 10k and 100k nodes.

    .venv/bin/python bench/scaling.py                 # 1000 10000 100000
    .venv/bin/python bench/scaling.py --sizes 1000 10000 --profile   # cProfile of the largest build

The chain cycles through Mul (by a weight), Add (of a weight), Tanh and Sigmoid on a (4, 8) tensor, with a
weight every 4 nodes; xs are the input and every weight. Reported per size: ``gradients()`` on an onnx_ir
model (onnxgrad's own time), best of 3 builds (2 for the largest), and the ratio of each size's time to the
previous one's (10x the nodes; linear is 10, the target is at most 12).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

import numpy as np
import onnx_ir as ir

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import onnxgrad


def chain(n: int, opset: int = 20) -> tuple[ir.Model, list[str]]:
    """An n-node chain over a (4, 8) float tensor and the names of its xs (input first)."""
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([4, 8]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": opset}, name="chain")
    rng = np.random.default_rng(0)
    xs, v = ["x"], x
    for i in range(n):
        kind = i % 4
        if kind in (0, 1):
            w = ir.Value(name=f"w{i}", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([8]),
                         const_value=ir.tensor(rng.standard_normal(8).astype(np.float32) * 0.1 + kind))
            graph.register_initializer(w)
            xs.append(w.name)  # type: ignore[arg-type]
            node = ir.node("Mul" if kind == 0 else "Add", [v, w], name=f"n{i}")
        else:
            node = ir.node("Tanh" if kind == 2 else "Sigmoid", [v], name=f"n{i}")
        out = node.outputs[0]
        out.name, out.dtype, out.shape = f"v{i}", ir.DataType.FLOAT, ir.Shape([4, 8])
        graph.append(node)
        v = out
    graph.outputs.append(v)
    return ir.Model(graph, ir_version=10), xs


def time_build(n: int, repeats: int) -> tuple[float, int]:
    """Best-of ``repeats`` seconds of gradients() on a fresh n-node chain, and the nodes it added."""
    best, added = float("inf"), 0
    for _ in range(repeats):
        gc.disable()  # building the chain itself: not measured
        model, xs = chain(n)
        gc.enable()
        before = len(model.graph)
        gc.collect()
        t0 = time.perf_counter()
        onnxgrad.gradients(model, [model.graph.outputs[0].name], xs)
        best = min(best, time.perf_counter() - t0)
        added = len(model.graph) - before
    return best, added


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[1000, 10000, 100000])
    parser.add_argument("--repeats", type=int, default=3, help="best of this many builds (2 for the largest)")
    parser.add_argument("--profile", action="store_true", help="cProfile the largest build")
    args = parser.parse_args(argv)
    if args.profile:
        import cProfile
        import pstats

        model, xs = chain(args.sizes[-1])
        prof = cProfile.Profile()
        prof.enable()
        onnxgrad.gradients(model, [model.graph.outputs[0].name], xs)
        prof.disable()
        pstats.Stats(prof).sort_stats("cumulative").print_stats(25)
        return
    print("| nodes | gradient nodes added | build s | x previous |")
    print("|---|---|---|---|")
    prev = None
    for n in args.sizes:
        seconds, added = time_build(n, args.repeats if n < max(args.sizes) else min(2, args.repeats))
        ratio = "" if prev is None else f"{seconds / prev:.1f}"
        print(f"| {n} | {added} | {seconds:.3f} | {ratio} |", flush=True)
        prev = seconds


if __name__ == "__main__":
    main()
