"""float32 accuracy of the normalization gradients, against PyTorch's autograd in float64 (``bench/accuracy.py``
measures whole models the same way). Inputs whose mean is 30-100x their spread and statistics over 10k+
elements: the float32 mean onnxruntime computes is then off by ~1e-5 of the spread, which shifts every xhat
alike and used to put dscale at 5-10x PyTorch's error. Each tensor must be within 3x PyTorch's own float32
error on the same tensor (plus 1e-7 for round-off at the level of a few ulps)."""

from __future__ import annotations

import pytest

pytest.importorskip("torch")

from bench.accuracy import Spec, TensorRow, measure, single_op

CASES = {
    "batchnorm-train": Spec(single_op("batchnorm", 8), (4, 8, 64, 64), 21, train=True, offset=100.0),
    "instancenorm": Spec(single_op("instancenorm", 4), (2, 4, 128, 128), 22, offset=100.0),
    "layernorm": Spec(single_op("layernorm"), (4, 64, 1024), 23, offset=100.0),
    # a large running mean: the fused Conv -> inference BatchNormalization's dscale, (sum(W * dW) - (mean - b)
    # * sum(dY)) * inv, cancels; measured no worse than PyTorch's, which reads the Conv output
    "conv-batchnorm-eval": Spec(single_op("conv-batchnorm", 8), (4, 8, 34, 34), 24, offset=30.0, calibrate=True),
}


@pytest.mark.parametrize("name", list(CASES))
def test_float32_within_3x_pytorch(name: str) -> None:
    rows = measure(name, CASES[name])
    assert not isinstance(rows, str), rows
    assert len(rows) >= 3
    bad = [r for r in rows if not _close(r)]
    assert not bad, "\n".join(f"{r.tensor}: ours {r.ours}, PyTorch {r.torch}" for r in bad)


def _close(r: TensorRow) -> bool:
    return all(o <= 3.0 * t + 1e-7 for o, t in zip(r.ours, r.torch, strict=True))
