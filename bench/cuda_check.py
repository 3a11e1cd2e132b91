"""Do gradient graphs run the same on CUDA as on the CPU?

    python bench/cuda_check.py                  # exit 0 with a note when CUDA is not available
    python bench/cuda_check.py --require-cuda   # exit 1 when it is not

Builds the bundled example models' gradient graphs (every float weight and input of each, with
``onnxgrad.add_gradients``), in float32 and converted to float64, runs each on onnxruntime's CUDA and
CPU execution providers with the same seeded inputs (two batch sizes), and checks that every output,
forward and gradient, agrees within a tolerance for its dtype. Prints a table; exits 1 on any
disagreement. Needs onnxruntime-gpu on a machine with an NVIDIA GPU for the CUDA side.
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # run from a checkout without installing

import onnx  # noqa: E402
import onnxruntime as ort  # noqa: E402

from onnxgrad import add_gradients  # noqa: E402
from onnxgrad.check import convert_floats  # noqa: E402
from onnxgrad.runtime import complete_feeds  # noqa: E402
from onnxgrad.shorthands import INPUTS, WEIGHTS, expand_xs  # noqa: E402
from onnxgrad.workarounds import kernel_gap  # noqa: E402

EXAMPLES = {
    "mlp_classifier.onnx": "loss",
    "cnn.onnx": "loss",
    "transformer_block.onnx": "loss",
    "lj_energy.onnx": "energy",
    "mlp.onnx": "loss",
}
# (rtol, atol relative to the largest magnitude of the CPU result); float32 allows for reassociated sums
TOLERANCE = {"float64": (1e-9, 1e-12), "float32": (1e-3, 1e-5), "float16": (1e-2, 1e-3)}
BATCHES = (3, 16)
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"


@dataclass
class Row:
    model: str
    dtype: str
    batch: int
    outputs: int
    worst: str
    error: float
    tol: float
    ok: bool | None  # None: skipped
    note: str = ""


def session(model: onnx.ModelProto, provider: str) -> ort.InferenceSession:
    """A session on one provider; CUDA with TF32 off (plain float32 matmuls and convolutions)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    data = model.SerializeToString()
    if provider == CUDA:
        try:
            return ort.InferenceSession(data, opts, providers=[(CUDA, {"use_tf32": "0"}), CPU])
        except Exception:  # an onnxruntime-gpu too old for the use_tf32 option
            return ort.InferenceSession(data, opts, providers=[CUDA, CPU])
    return ort.InferenceSession(data, opts, providers=[CPU])


def augmented(path: Path, y: str, dtype: str) -> onnx.ModelProto:
    """The model's gradient graph: d y / d every float weight and input, in ``dtype``."""
    model = onnx.load(path)
    if dtype == "float64":
        model = convert_floats(model, onnx.TensorProto.DOUBLE)
    return add_gradients(model, [y], expand_xs(model, [WEIGHTS, INPUTS])).model


def compare(cpu: dict[str, np.ndarray], gpu: dict[str, np.ndarray], dtype: str) -> tuple[str, float, float, bool]:
    """The worst output by error relative to tolerance: (name, error, tolerance, within)."""
    rtol, atol = TOLERANCE[dtype]
    worst = ("", 0.0, rtol, True)
    ratio_worst = -1.0
    for name, want in cpu.items():
        got = gpu[name]
        want64, got64 = np.asarray(want, np.float64), np.asarray(got, np.float64)
        scale = max(1.0, float(np.max(np.abs(want64)))) if want64.size else 1.0
        diff = np.abs(got64 - want64)
        allowed = atol * scale + rtol * np.abs(want64)
        ratio = float(np.max(diff / allowed)) if diff.size else 0.0
        if not np.all(np.isfinite(got64) == np.isfinite(want64)):
            ratio = float("inf")
        if ratio > ratio_worst:
            ratio_worst = ratio
            rel = float(np.max(diff) / scale) if diff.size else 0.0
            worst = (name, rel, rtol, ratio <= 1.0)
    return worst


def check(models: Path, dtypes: list[str], target: str = CUDA) -> list[Row]:
    rows: list[Row] = []
    for name, y in EXAMPLES.items():
        path = models / name
        if not path.exists():
            rows.append(Row(name, "-", 0, 0, "", 0.0, 0.0, None, f"not found in {models}"))
            continue
        for dtype in dtypes:
            try:
                model = augmented(path, y, dtype)
                cpu_sess, gpu_sess = session(model, CPU), session(model, target)
            except Exception as e:  # e.g. no float64 kernel for an op
                rows.append(Row(name, dtype, 0, 0, "", 0.0, 0.0, None, kernel_gap(e)))
                continue
            if gpu_sess.get_providers()[0] != target:
                rows.append(Row(name, dtype, 0, 0, "", 0.0, 0.0, False, f"{target} not used"))
                continue
            for batch in BATCHES:
                feeds = complete_feeds(model, None, seed=batch, dims=batch)
                feeds = {k: v for k, v in feeds.items() if k in {i.name for i in cpu_sess.get_inputs()}}
                names = [o.name for o in cpu_sess.get_outputs()]
                cpu = dict(zip(names, cpu_sess.run(names, feeds), strict=True))
                gpu = dict(zip(names, gpu_sess.run(names, feeds), strict=True))
                worst, err, tol, ok = compare(cpu, gpu, dtype)
                rows.append(Row(name, dtype, batch, len(names), worst, err, tol, ok))
    return rows


def check_rules(target: str = CUDA, max_opset: int = 26) -> list[Row]:
    """Every rule case of the test table: its gradient graph on ``target`` against the CPU."""
    from tests.cases import ALL
    from tests.gradcheck import build

    rows: list[Row] = []
    for case in ALL:
        if case.opset > max_opset:
            continue
        try:
            model, ys, xs, feeds = build(case)
            aug = add_gradients(model, ys, xs).model
            cpu_sess, gpu_sess = session(aug, CPU), session(aug, target)
            names = [o.name for o in cpu_sess.get_outputs()]
            cpu = dict(zip(names, cpu_sess.run(names, feeds), strict=True))
            gpu = dict(zip(names, gpu_sess.run(names, feeds), strict=True))
        except Exception as e:
            rows.append(Row(case.name, "-", 0, 0, "", 0.0, 0.0, None, kernel_gap(e)))
            continue
        dtype = str(next(iter(feeds.values())).dtype)
        worst, err, tol, ok = compare(cpu, gpu, dtype if dtype in TOLERANCE else "float32")
        rows.append(Row(case.name, dtype, 0, len(names), worst, err, tol, ok))
    return rows


def show(rows: list[Row]) -> None:
    table = [["model", "dtype", "batch", "outputs", "worst output", "max diff / scale", "rtol", "result"]]
    for r in rows:
        result = "skip" if r.ok is None else "ok" if r.ok else "FAIL"
        table.append([r.model, r.dtype, str(r.batch or "-"), str(r.outputs or "-"), r.worst or "-",
                      f"{r.error:.2e}" if r.batch else "-", f"{r.tol:.0e}" if r.batch else "-",
                      result + (f" ({r.note})" if r.note else "")])
    widths = [max(len(row[i]) for row in table) for i in range(len(table[0]))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").strip().splitlines()[0])
    parser.add_argument("--require-cuda", action="store_true", help="exit 1 when CUDA is not available")
    parser.add_argument("--models", type=Path, default=ROOT / "models", help="folder of the example models")
    parser.add_argument("--dtype", action="append", choices=sorted(TOLERANCE), help="dtypes (default float32, float64)")
    parser.add_argument("--rules", action="store_true",
                        help="also run every rule case of tests/cases on both providers")
    parser.add_argument("--dry-run", action="store_true",
                        help="compare the CPU with itself (tests this script where there is no GPU)")
    args = parser.parse_args(argv)
    dtypes = args.dtype or ["float32", "float64"]
    if hasattr(ort, "preload_dlls"):  # CUDA/cuDNN from the nvidia-* wheels, where they are installed
        try:
            ort.preload_dlls()
        except Exception as e:  # pragma: no cover - depends on the machine
            print(f"note: preload_dlls: {e}")
    if args.dry_run:
        rows = check(args.models, dtypes, CPU) + (check_rules(CPU) if args.rules else [])
        show(rows)
        return 0 if all(r.ok is not False for r in rows) else 1
    available = ort.get_available_providers()
    print(f"onnxruntime {ort.__version__}, providers: {', '.join(available)}")
    if CUDA not in available:
        print(f"CUDA unavailable: this onnxruntime has no {CUDA}; install onnxruntime-gpu on a machine with an "
              "NVIDIA GPU to run the comparison")
        return 1 if args.require_cuda else 0
    start = time.perf_counter()
    rows = check(args.models, dtypes) + (check_rules() if args.rules else [])
    show(rows)
    failed = [r for r in rows if r.ok is False]
    ran = [r for r in rows if r.ok is not None]
    print(f"{len(ran) - len(failed)} agree, {len(failed)} disagree, {len(rows) - len(ran)} skipped "
          f"in {time.perf_counter() - start:.1f} s")
    if not ran:
        print("nothing ran on CUDA")
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
