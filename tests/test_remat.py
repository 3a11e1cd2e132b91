"""Rematerialisation: gradients with recomputed forward values equal those without (bit for bit with onnxruntime's
graph optimizations off), the forward part untouched, what stays saved as planned, and ``info --residuals``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest

from onnxgrad import add_gradients
from onnxgrad.augment import residuals
from onnxgrad.remat import Budget, format_residuals, parse_bytes
from onnxgrad.runtime import random_feeds

MODELS = Path(__file__).resolve().parents[1] / "models"
LOSS = {"mlp.onnx": "loss", "mlp_classifier.onnx": "loss", "cnn.onnx": "loss", "transformer_block.onnx": "loss",
        "lj_energy.onnx": "energy"}
DIMS = {"batch": 3, "seq": 6, "atoms": 5}
SETTINGS: list[dict[str, Any]] = [
    {"remat": "nothing-saveable"},
    {"remat": "matmuls-only"},
    {"recompute": ["*"]},
    {"memory_budget": Budget(1000, DIMS)},
]


def _plain(model: onnx.ModelProto) -> ort.InferenceSession:
    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("setting", SETTINGS, ids=lambda s: "-".join(f"{k}" for k in s))
@pytest.mark.parametrize("file", list(LOSS))
def test_remat_gradients_are_bit_identical(file: str, setting: dict[str, Any]) -> None:
    proto = onnx.load(MODELS / file)
    plain = add_gradients(proto, [LOSS[file]], ["@inputs", "@weights"])
    remat = add_gradients(proto, [LOSS[file]], ["@inputs", "@weights"], **setting)
    onnx.checker.check_model(remat.model, full_check=True)
    assert remat.gradients == plain.gradients
    feeds = random_feeds(proto, np.random.default_rng(0), DIMS)
    outs = [o.name for o in remat.model.graph.output]
    want = dict(zip(outs, _plain(plain.model).run(outs, feeds), strict=True))
    got = dict(zip(outs, _plain(remat.model).run(outs, feeds), strict=True))
    for name in outs:
        np.testing.assert_array_equal(got[name], want[name], err_msg=f"{file}: {name}")
    original = {n.output[0]: n for n in proto.graph.node}
    kept = [n for n in remat.model.graph.node if n.output[0] in original]
    assert [n.output[0] for n in kept] == list(original) and all(n == original[n.output[0]] for n in kept)


def _saved(file: str, **kwargs: Any) -> dict[str, int]:
    rows = residuals(MODELS / file, [LOSS[file]], ["@inputs", "@weights"], DIMS, **kwargs)  # type: ignore[arg-type]
    return {r.name: r.bytes for r in rows}


def test_residuals_of_the_mlp() -> None:
    """mlp.onnx: tanh(x W1 + b1) W2 + b2 - target, squared and averaged: the backward reads h (for dW2 and
    tanh') and err (for the square's gradient), largest first; sq and the loss it reads only for their sizes
    (ReduceMean's count), which does not keep them alive."""
    rows = residuals(MODELS / "mlp.onnx", ["loss"], ["@weights"], {"batch": 10})
    assert [(r.name, r.op, r.bytes) for r in rows] == [("h", "Tanh", 10 * 8 * 4), ("err", "Sub", 10 * 3 * 4)]
    text = format_residuals(rows)
    assert text.splitlines()[1].split()[:2] == ["h", "Tanh"]


def test_policies_leave_what_they_promise() -> None:
    default = _saved("transformer_block.onnx")
    assert sum(default.values()) > 0
    # nothing-saveable keeps only segment boundaries and the last segment (recomputing it would save nothing)
    assert sum(_saved("transformer_block.onnx", remat="nothing-saveable").values()) <= sum(default.values()) // 4
    dots = _saved("transformer_block.onnx", remat="matmuls-only")
    model = onnx.load(MODELS / "transformer_block.onnx")
    op = {o: n.op_type for n in model.graph.node for o in n.output}
    assert dots and {op[name] for name in dots} == {"MatMul"}
    budget = sum(default.values()) // 2
    assert sum(_saved("transformer_block.onnx", memory_budget=Budget(budget, DIMS)).values()) <= budget
    only = _saved("transformer_block.onnx", recompute=["probs"])
    assert "probs" not in only and "probs" in default


def test_parse_bytes() -> None:
    assert parse_bytes("512MB") == 512 * 10**6 and parse_bytes("1.5GiB") == 3 * 2**29 and parse_bytes(7) == 7
    assert parse_bytes("2e3") == 2000
    with pytest.raises(ValueError, match="memory budget"):
        parse_bytes("lots")


def test_unknown_policy_is_an_error() -> None:
    m = ir.serde.deserialize_model(onnx.load(MODELS / "mlp.onnx"))
    from onnxgrad import gradients

    with pytest.raises(ValueError, match="remat policy"):
        gradients(m, "loss", "W1", remat="everything")


# ------------------------------------------------------------------ segments: memory in the order emitted
def _chain(layers: int = 16, width: int = 64, batch: int = 32, opset: int = 17) -> onnx.ModelProto:
    """x -> (MatMul W_i -> Tanh) * layers -> sum of squares: every Tanh output is an articulation value."""
    from onnx import helper as oh

    rng = np.random.default_rng(0)
    nodes, inits, h = [], [], "x"
    for i in range(layers):
        inits.append(onnx.numpy_helper.from_array(
            (rng.standard_normal((width, width)) / np.sqrt(width)).astype(np.float32), f"W{i}"))
        nodes += [oh.make_node("MatMul", [h, f"W{i}"], [f"m{i}"]), oh.make_node("Tanh", [f"m{i}"], [f"h{i}"])]
        h = f"h{i}"
    nodes += [oh.make_node("Mul", [h, h], ["sq"]), oh.make_node("ReduceSum", ["sq"], ["loss"], keepdims=0)]
    graph = oh.make_graph(nodes, "chain", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [batch, width])],
                          [oh.make_tensor_value_info("loss", onnx.TensorProto.FLOAT, [])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=8)


def _peak_live_bytes(model: onnx.ModelProto) -> int:
    """The most bytes of node outputs alive at once when the nodes run in the model's order (graph outputs kept)."""
    from bench.memtrace import live_peak, value_sizes

    fixed, sizes = value_sizes(model, {"x": np.zeros((32, 64), np.float32)})
    return live_peak(list(fixed.graph.node), sizes, {o.name for o in fixed.graph.output})[0]


@pytest.mark.parametrize("opset", [9, 17])
def test_nothing_saveable_recomputes_one_segment_at_a_time(opset: int) -> None:
    """A 16-layer chain: the segments' boundaries are saved, each segment is recomputed after the gradient of its
    end exists (behind a gate on it), so in the emitted order at most a few segments are alive at once: the peak
    of live activations falls by more than 40%, and the gradients are bit-identical."""
    model = _chain(opset=opset)
    plain = add_gradients(model, ["loss"], ["x"])  # no weight gradients: activations are what is alive
    remat = add_gradients(model, ["loss"], ["x"], remat="nothing-saveable")
    assert _peak_live_bytes(remat.model) <= 0.6 * _peak_live_bytes(plain.model)
    feeds = {"x": np.random.default_rng(1).standard_normal((32, 64)).astype(np.float32)}
    outs = [o.name for o in remat.model.graph.output]
    for a, b in zip(_plain(plain.model).run(outs, feeds), _plain(remat.model).run(outs, feeds), strict=True):
        np.testing.assert_array_equal(a, b)
    nodes = list(remat.model.graph.node)
    made = {o: n for n in nodes for o in n.output}
    gates = [n for n in nodes if n.op_type == "Where" and "remat_gate" in n.name]
    saved = {n.input[1] for n in gates}
    assert 2 <= len(saved) <= 8 and saved <= {"x", *(f"h{i}" for i in range(16))}  # sqrt-many boundaries

    def gated(name: str) -> bool:
        stack, seen = [name], set()
        while stack:
            v = stack.pop()
            if v in seen or v not in made:
                continue
            seen.add(v)
            if made[v] in gates:
                return True
            stack.extend(made[v].input)
        return False

    copies = [n for n in nodes if n.op_type == "Tanh" and n.output[0] not in {f"h{i}" for i in range(16)}]
    assert copies and all(gated(n.output[0]) for n in copies)


def test_runtime_session_runs_remat_models_in_their_own_order() -> None:
    from onnxgrad.runtime import session
    from onnxgrad.workarounds import REMAT_KEY

    model = _chain(layers=4)
    remat = add_gradients(model, ["loss"], ["x"], remat="nothing-saveable").model
    plain = add_gradients(model, ["loss"], ["x"]).model
    assert any(p.key == REMAT_KEY for p in remat.metadata_props)
    assert not any(p.key == REMAT_KEY for p in plain.metadata_props)
    opts = session(remat).get_session_options()
    assert opts.execution_order == ort.ExecutionOrder.PRIORITY_BASED and not opts.enable_mem_reuse
    assert session(plain).get_session_options().execution_order == ort.ExecutionOrder.DEFAULT
