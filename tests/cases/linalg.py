"""Rule cases: Einsum and Det (MatMul and Gemm are in core).

Einsum covers products, sums over one operand's own letters, diagonals (repeated subscripts), implicit
outputs, '...', upper-case letters and three operands. Size-1 broadcasting is left out of the table:
onnx 1.23's Einsum shape inference gets the forward output's shape wrong (or leaves it untyped) when an
operand broadcasts, so the one-node model is itself inconsistent; and onnxruntime 1.31 crashes (segfault)
on a forward Einsum whose operands' '...' spans differ.
onnxruntime's CPU Det is float-only, so those cases are float32 (checker defaults: eps 1e-3, rtol 1e-2)."""

from __future__ import annotations

import numpy as np

from tests.gradcheck import Case
from tests.gradcheck import rng_array as r

F32 = np.float32


def well_conditioned(*shape: int, seed: int = 0) -> np.ndarray:
    """Random square matrices (float32) with a strong diagonal."""
    n = shape[-1]
    return (r(*shape, seed=seed) + 2.0 * np.eye(n)).astype(F32)


EINSUM = [
    ("ij,jk->ik", [(3, 4), (4, 5)], "matmul"),
    ("bij,bjk->bik", [(2, 3, 4), (2, 4, 5)], "batch"),
    ("ij->ji", [(3, 4)], "transpose"),
    ("ij->i", [(3, 4)], "rowsum"),
    ("ij->", [(3, 4)], "sum"),
    ("ii->i", [(3, 3)], "diag"),
    ("ii", [(3, 3)], "trace"),
    ("bii->b", [(2, 3, 3)], "batch-trace"),
    ("iij->ji", [(3, 3, 2)], "partial-diag"),
    ("iii->i", [(3, 3, 3)], "diag3"),
    ("ij,ij->", [(3, 4), (3, 4)], "inner"),
    ("i,j->ij", [(3,), (4,)], "outer"),
    ("ij,kj", [(3, 4), (5, 4)], "implicit"),
    ("...ij,...jk->...ik", [(2, 3, 4), (2, 4, 5)], "ellipsis"),
    ("...ij,...jk", [(2, 3, 4), (2, 4, 5)], "ellipsis-implicit"),
    ("i...j->...i", [(3, 2, 4)], "ellipsis-mid"),
    ("Ab,bC->AC", [(3, 4), (4, 2)], "upper"),
    ("ij,jk,kl->il", [(2, 3), (3, 4), (4, 2)], "chain"),
    ("i,i,i->", [(4,), (4,), (4,)], "three"),
    ("b i j , b j->b i", [(2, 3, 4), (2, 4)], "spaces"),
]

CASES: list[Case] = [
    Case("Einsum", [r(*s, seed=k + 1) for k, s in enumerate(shapes)], attrs={"equation": eq}, opset=12, id=name)
    for eq, shapes, name in EINSUM
]
CASES += [
    Case("Einsum", [r(2, 3, 4, seed=1), r(4, 5, seed=2)], attrs={"equation": "bij,jk->bik"}, opset=23),
    Case("Einsum", [r(2, 3, 3, seed=1), r(3, 5, seed=2)], attrs={"equation": "bii,ik->bk"}, opset=28),
    Case("Det", [well_conditioned(3, 3)], opset=11),
    Case("Det", [well_conditioned(2, 3, 3, seed=1)], opset=11, id="batch"),
    Case("Det", [well_conditioned(2, 2, seed=2)], opset=11, id="2x2"),
    Case("Det", [well_conditioned(1, 1, seed=3)], opset=11, id="1x1"),
    Case("Det", [np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [1.0, 0.0, 1.0]], dtype=F32)], opset=11,
         id="singular"),
    Case("Det", [well_conditioned(2, 2, 4, 4, seed=4)], opset=22, id="batch2"),
]
