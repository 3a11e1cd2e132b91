"""Shared test machinery: one-node models from a table row, checked by central differences."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import helper as oh

from onnxgrad import add_gradients
from onnxgrad.check import check_gradients
from onnxgrad.runtime import run

IR_VERSION = {7: 3, 8: 3, 9: 4, 10: 5, 11: 6, 12: 7, 13: 7, 14: 7, 15: 8, 16: 8, 17: 8, 18: 8, 19: 9,
              20: 9, 21: 10, 22: 10, 23: 10, 24: 10, 25: 10, 26: 10, 27: 10, 28: 10}


@dataclass(frozen=True)
class Const:
    """An input fed as an initializer: not differentiated (shapes, indices, frozen operands)."""

    value: np.ndarray


@dataclass(frozen=True)
class Seq:
    """A sequence input: SequenceConstruct of these float arrays (each a graph input, differentiated)."""

    items: tuple[np.ndarray, ...]


@dataclass
class Case:
    """One gradient rule test: a single node ``op`` on ``inputs`` at ``opset``.

    Float ndarray inputs become graph inputs and are differentiated; ``Const`` inputs become
    initializers; ``None`` leaves an optional input empty."""

    op: str
    inputs: list[Any]
    attrs: dict[str, Any] = field(default_factory=dict)
    opset: int = 17
    id: str = ""
    domain: str = ""
    n_outputs: int = 1
    ys: list[int] | None = None  # which outputs to differentiate (default: every float output)
    rtol: float | None = None
    eps: float | None = None
    dynamic: bool = True  # also check with the leading dimension of every input unknown
    seed: int = 0
    second_order: bool = True  # False (with a comment why) where the first derivative has kinks at the inputs
    checker: bool = True  # False where onnx's checker rejects the schema as deprecated (GroupNormalization-18)
    captured: dict[str, Any] = field(default_factory=dict)  # graph inputs read only inside subgraphs (If, Loop)
    finish: dict[str, Any] | None = None  # a node ({"op": ..., attributes}) turning each output into a tensor

    @property
    def name(self) -> str:
        return f"{self.op}-v{self.opset}" + (f"-{self.id}" if self.id else "")


def rng_array(*shape: int, seed: int = 0, low: float | None = None, high: float | None = None,
              dtype: Any = np.float64) -> np.ndarray:
    """Reproducible random test data (standard normal, or uniform in [low, high))."""
    rng = np.random.default_rng(seed + 7919 * len(shape) + sum(shape))
    if low is not None and high is not None:
        return np.asarray(rng.uniform(low, high, shape), dtype=dtype)
    return np.asarray(rng.standard_normal(shape), dtype=dtype)


def build(case: Case, dynamic: bool | str = False
          ) -> tuple[onnx.ModelProto, list[str], list[str], dict[str, np.ndarray]]:
    """The one-node model of a case: (model, ys, xs, feeds). ``dynamic=True`` leaves the leading dimension of
    every input unknown; ``dynamic="spatial"`` also every dimension of the first input but its channels (axis 1
    of a rank >= 3 input), as a fully convolutional export with dynamic height and width has it."""
    graph_inputs, inits, names, feeds, xs = [], [], [], {}, []
    before: list[onnx.NodeProto] = []
    for i, v in enumerate(case.inputs):
        name = f"in{i}"
        if v is None:
            names.append("")
            continue
        names.append(name)
        if isinstance(v, Seq):  # a sequence built from graph inputs
            items = [f"{name}_{j}" for j in range(len(v.items))]
            for item, a in zip(items, v.items, strict=True):
                dims: list[Any] = [f"N_{item}" if dynamic and k == 0 and d != 1 else d for k, d in enumerate(a.shape)]
                graph_inputs.append(oh.make_tensor_value_info(item, oh.np_dtype_to_tensor_dtype(a.dtype), dims))
                feeds[item] = a
                xs.append(item)
            before.append(oh.make_node("SequenceConstruct", items, [name]))
            continue
        if isinstance(v, Const):
            inits.append(onnx.numpy_helper.from_array(np.asarray(v.value), name))
            continue
        arr = np.asarray(v)
        shape: list[Any] = list(arr.shape)
        if dynamic and shape and shape[0] != 1 and (case.dynamic or i == 0):  # others: where the case allows it
            shape[0] = f"N_{name}"
        if dynamic == "spatial" and i == 0:
            shape = [d if k == 1 and len(shape) >= 3 else f"S{k}_{name}" for k, d in enumerate(shape)]
        graph_inputs.append(oh.make_tensor_value_info(name, oh.np_dtype_to_tensor_dtype(arr.dtype), shape))
        feeds[name] = arr
        if np.issubdtype(arr.dtype, np.floating):
            xs.append(name)
    for name, v in case.captured.items():  # outer values that the node's subgraphs read
        arr = np.asarray(v)
        dims: list[Any] = [f"N_{name}" if dynamic and i == 0 and d != 1 else d for i, d in enumerate(arr.shape)]
        graph_inputs.append(oh.make_tensor_value_info(name, oh.np_dtype_to_tensor_dtype(arr.dtype), dims))
        feeds[name] = arr
        if np.issubdtype(arr.dtype, np.floating):
            xs.append(name)
    outs = [f"out{k}" for k in range(case.n_outputs)]
    raw = outs if case.finish is None else [f"raw{k}" for k in range(case.n_outputs)]
    node = oh.make_node(case.op, names, raw, domain=case.domain, **case.attrs)
    after = [] if case.finish is None else [
        oh.make_node(case.finish["op"], [r], [o], **{k: a for k, a in case.finish.items() if k != "op"})
        for r, o in zip(raw, outs, strict=True)]
    graph = oh.make_graph([*before, node, *after], case.name, graph_inputs,
                          [oh.make_value_info(o, onnx.TypeProto()) for o in outs], inits)
    opsets = [oh.make_opsetid("", case.opset)]
    if case.domain:
        opsets.append(oh.make_opsetid(case.domain, 1))
    model = oh.make_model(graph, opset_imports=opsets, ir_version=IR_VERSION.get(case.opset, 10))
    if model.ir_version < 4:
        model.graph.input.extend(
            oh.make_tensor_value_info(t.name, t.data_type, list(t.dims)) for t in inits
        )
    model = onnx.shape_inference.infer_shapes(model)
    inferred = {o.name: o for o in model.graph.value_info}
    untyped = [o for o in outs if o not in inferred]
    if untyped:  # onnx infers nothing for some ops (GroupNormalization): take dtype and rank from a run
        probe = onnx.ModelProto()
        probe.CopyFrom(model)
        del probe.graph.output[:]
        probe.graph.output.extend(oh.make_value_info(o, onnx.TypeProto()) for o in untyped)
        for o, a in run(probe, feeds, untyped, provider=provider_for(case)).items():
            dims = [None if (dynamic and i == 0) or (dynamic == "spatial" and i >= 2) else d
                    for i, d in enumerate(np.shape(a))]
            inferred[o] = oh.make_tensor_value_info(o, oh.np_dtype_to_tensor_dtype(np.asarray(a).dtype), dims)
    del model.graph.output[:]
    ys = []
    for k, o in enumerate(outs):
        if case.ys is not None and k not in case.ys:
            continue
        info = inferred.get(o)
        elem = info.type.tensor_type.elem_type if info is not None else onnx.TensorProto.DOUBLE
        if elem in (onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16,
                    onnx.TensorProto.BFLOAT16) or info is None:
            model.graph.output.append(info if info is not None else oh.make_value_info(o, onnx.TypeProto()))
            ys.append(o)
    return model, ys, xs, feeds


# onnxruntime 1.31 loads opsets up to 26; newer forms run on onnx's reference evaluator
ORT_MAX_OPSET = 26


def provider_for(case: Case) -> str:
    return "reference" if case.opset > ORT_MAX_OPSET else "cpu"


def assert_gradients_match(case: Case, dynamic: bool | str = False) -> None:
    """Central differences along a random direction agree with onnxgrad for every float input."""
    model, ys, xs, feeds = build(case, dynamic)
    assert ys and xs, f"{case.name}: nothing to differentiate"
    if case.checker:
        onnx.checker.check_model(add_gradients(model, ys, xs).model, full_check=True)
    rows = check_gradients(model, ys, xs, feeds, seed=case.seed, eps=case.eps, rtol=case.rtol,
                           provider=provider_for(case))
    bad = [r for r in rows if not r.ok]
    assert not bad, f"{case.name}: " + "; ".join(
        f"{r.x}: analytic {r.analytic:.8g} vs numeric {r.numeric:.8g} (rel {r.rel_error:.2e})" for r in bad
    )
