"""float16, bfloat16 and float64 models differentiate in their own dtype (mixed precision with Cast too),
checked against PyTorch autograd in float64 with dtype-appropriate tolerances."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto as TP
from onnx import helper as oh

from onnxgrad import add_gradients
from onnxgrad.runtime import run

# bfloat16 kernels are missing from onnxruntime's CPU build for most ops: those run on onnx's reference evaluator
PROVIDER = {TP.FLOAT16: "cpu", TP.BFLOAT16: "reference", TP.DOUBLE: "cpu"}
TOL = {TP.FLOAT16: 2e-2, TP.BFLOAT16: 8e-2, TP.DOUBLE: 1e-10}


def _mlp(t: int) -> tuple[list[onnx.NodeProto], Callable[..., torch.Tensor]]:
    nodes = [oh.make_node("MatMul", ["x", "W"], ["h"]), oh.make_node("Tanh", ["h"], ["a"]),
             oh.make_node("Mul", ["a", "a"], ["s"]), oh.make_node("ReduceSum", ["s"], ["y"], keepdims=0)]
    return nodes, lambda x, w: (torch.tanh(x @ w) ** 2).sum()


def _softmax(t: int) -> tuple[list[onnx.NodeProto], Callable[..., torch.Tensor]]:
    nodes = [oh.make_node("MatMul", ["x", "W"], ["h"]), oh.make_node("Softmax", ["h"], ["p"], axis=-1),
             oh.make_node("Mul", ["p", "h"], ["s"]), oh.make_node("ReduceSum", ["s"], ["y"], keepdims=0)]
    return nodes, lambda x, w: (torch.softmax(x @ w, -1) * (x @ w)).sum()


def _mixed(t: int) -> tuple[list[onnx.NodeProto], Callable[..., torch.Tensor]]:
    """The product runs in dtype t, the rest in float32, joined by Casts both ways."""
    nodes = [oh.make_node("Cast", ["x"], ["xf"], to=TP.FLOAT), oh.make_node("Sigmoid", ["xf"], ["sx"]),
             oh.make_node("Cast", ["sx"], ["sl"], to=t), oh.make_node("MatMul", ["sl", "W"], ["h"]),
             oh.make_node("Cast", ["h"], ["hf"], to=TP.FLOAT), oh.make_node("Mul", ["hf", "hf"], ["s"]),
             oh.make_node("ReduceSum", ["s"], ["y"], keepdims=0)]
    return nodes, lambda x, w: ((torch.sigmoid(x) @ w) ** 2).sum()


GRAPHS = {"mlp": _mlp, "softmax": _softmax, "mixed": _mixed}


@pytest.mark.parametrize("elem", [TP.FLOAT16, TP.BFLOAT16, TP.DOUBLE], ids=["float16", "bfloat16", "float64"])
@pytest.mark.parametrize("graph", list(GRAPHS))
def test_gradient_in_own_dtype(graph: str, elem: int) -> None:
    nodes, reference = GRAPHS[graph](elem)
    y_type = TP.FLOAT if graph == "mixed" else elem
    g = oh.make_graph(nodes, graph, [oh.make_tensor_value_info("x", elem, [2, 3]),
                                     oh.make_tensor_value_info("W", elem, [3, 4])],
                      [oh.make_tensor_value_info("y", y_type, [])])
    model = oh.make_model(g, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    aug = add_gradients(model, "y", ["x", "W"])
    onnx.checker.check_model(aug.model, full_check=True)
    np_dtype = onnx.helper.tensor_dtype_to_np_dtype(elem)
    rng = np.random.default_rng(0)
    x = (rng.standard_normal((2, 3)) * 0.5).astype(np_dtype)
    w = (rng.standard_normal((3, 4)) * 0.5).astype(np_dtype)
    out = run(aug.model, {"x": x, "W": w}, provider=PROVIDER[elem])
    xt = torch.tensor(x.astype(np.float64), requires_grad=True)
    wt = torch.tensor(w.astype(np.float64), requires_grad=True)
    gx, gw = torch.autograd.grad(reference(xt, wt), [xt, wt])
    for name, want in (("x", gx), ("W", gw)):
        have = out[aug.gradients[name]]  # type: ignore[index]
        assert have.dtype == np_dtype, f"{name}: gradient is {have.dtype}, not {np.dtype(np_dtype)}"
        want_np = want.numpy()
        err = np.abs(have.astype(np.float64) - want_np).max() / max(np.abs(want_np).max(), 1e-3)
        tol = max(TOL[elem], 1e-5) if graph == "mixed" else TOL[elem]  # mixed: part of it runs in float32
        assert err <= tol, f"{graph}/{name}: relative error {err:.3g} > {tol}"
