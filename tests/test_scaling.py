"""The gradient graph grows linearly with the model (no timing here: bench/scaling.py measures time)."""

from __future__ import annotations

import gc

import onnxgrad
from bench.scaling import chain


def _added(n: int) -> int:
    model, xs = chain(n)
    before = len(model.graph)
    onnxgrad.gradients(model, [model.graph.outputs[0].name], xs)
    return len(model.graph) - before


def test_gradient_nodes_per_forward_node_are_constant() -> None:
    small, large = _added(400), _added(4000)
    assert large - 10 * small <= 10 * 4  # a few shared constants at most, never a per-node surplus
    assert small / 400 <= 3.0  # Mul/Add: 2 (a bias-like sum is one ReduceSum), Tanh/Sigmoid: 3


def test_garbage_collector_is_restored() -> None:
    assert gc.isenabled()
    _added(10)
    assert gc.isenabled()
    gc.disable()
    try:
        _added(10)
        assert not gc.isenabled()
    finally:
        gc.enable()
