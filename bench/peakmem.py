"""Peak resident memory that fwd+bwd adds, in a fresh process: prints MiB on its last line.

    peakmem.py ort NAME X.npy THREADS MODEL.onnx   # onnxruntime on the gradient model
    peakmem.py torch NAME X.npy THREADS            # PyTorch eager forward + backward

The model is loaded (session created, weights in memory) first; then the kernel's peak-RSS mark is reset
(``/proc/self/clear_refs``) and one run made. Reported: peak RSS during the run minus RSS before it.
The first run is the one measured (onnxruntime's arena and PyTorch's allocator both grow on it); the
caller takes the median over a few fresh processes.
"""

from __future__ import annotations

import ctypes
import os
import sys

import numpy as np


def rss_kib(field: str) -> int:
    """This process's VmRSS or VmHWM (/proc/self/status), in KiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def release_free_heap() -> None:
    """Give the heap's free pages back to the system (glibc's malloc_trim), so that what the run allocates shows
    in resident memory even where setting up freed more than it needs (ResNet-50's twin is built from the ONNX
    model, through an onnxruntime session, before its run: without this, its 97 MiB of weight gradients fit in
    pages already resident, and PyTorch's peak read 45 MiB)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def main() -> None:
    engine, name, x_path, threads = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    x = np.load(x_path)
    if engine == "ort":
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        sess = ort.InferenceSession(sys.argv[5], opts, providers=["CPUExecutionProvider"])
        name_in = sess.get_inputs()[0].name

        def run() -> object:
            return sess.run(None, {name_in: x})
    else:
        import torch

        torch.set_num_threads(threads)
        sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        from bench.models import torch_twin

        module, _ = torch_twin(name)
        xt = torch.from_numpy(x).requires_grad_(True)

        def run() -> object:
            y = module(xt)
            y.backward(torch.ones_like(y))
            return xt.grad, [p.grad for p in module.parameters()]
    release_free_heap()
    before = rss_kib("VmRSS")
    _reset_peak()
    result = run()
    peak = rss_kib("VmHWM")
    del result
    print(f"{(peak - before) / 1024:.1f}")


if __name__ == "__main__":
    main()
