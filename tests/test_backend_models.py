"""The PyTorch-exported single-module models shipped in the onnx package differentiate with respect to
every float input and weight, and agree with central differences."""

from __future__ import annotations

import glob
import os

import numpy as np
import onnx
import onnx.numpy_helper
import pytest

from onnxgrad import NEW_INPUT, add_gradients
from onnxgrad.api import GradientNote, upgrade
from onnxgrad.check import check_gradients
from onnxgrad.runtime import run

DATA = os.path.join(os.path.dirname(onnx.__file__), "backend", "test", "data")
MODELS = sorted(
    glob.glob(os.path.join(DATA, "pytorch-converted", "*")) + glob.glob(os.path.join(DATA, "pytorch-operator", "*"))
)
FLOATS = {onnx.TensorProto.FLOAT, onnx.TensorProto.DOUBLE, onnx.TensorProto.FLOAT16}

INTEGER_ONLY = "test_operator_non_float_params"


def _case(path: str) -> tuple[onnx.ModelProto, dict[str, np.ndarray], list[str], list[str]]:
    model = onnx.load(os.path.join(path, "model.onnx"))
    init = {i.name for i in model.graph.initializer}
    feeds = {}
    inputs = [i for i in model.graph.input if i.name not in init]
    for k, inp in enumerate(inputs):
        t = onnx.TensorProto()
        with open(os.path.join(path, "test_data_set_0", f"input_{k}.pb"), "rb") as f:
            t.ParseFromString(f.read())
        value = onnx.numpy_helper.to_array(t).copy()
        garbage = value.dtype.kind == "f" and (
            not np.all(np.isfinite(value)) or np.any((value != 0) & (np.abs(value) < 1e-30))
        )
        if garbage:
            # a few shipped inputs hold denormal garbage: use positive values of the same shape instead
            value = np.random.default_rng(k).uniform(0.5, 1.5, value.shape).astype(value.dtype)
        feeds[inp.name] = value
    outs = run(upgrade(model), feeds)
    if not all(np.all(np.isfinite(v)) for v in outs.values()):
        # the shipped inputs lie outside the function's domain (Sqrt, Pow of negatives)
        rng = np.random.default_rng(0)
        feeds = {k: rng.uniform(0.5, 1.5, v.shape).astype(v.dtype) if v.dtype.kind == "f" else v
                 for k, v in feeds.items()}
    xs = [i.name for i in inputs if i.type.tensor_type.elem_type in FLOATS]
    xs += [i.name for i in model.graph.initializer if i.data_type in FLOATS]
    ys = [o.name for o in model.graph.output if o.type.tensor_type.elem_type in FLOATS]
    return model, feeds, ys, xs


@pytest.mark.parametrize("path", MODELS, ids=os.path.basename)
def test_backend_model_gradients(path: str) -> None:
    model, feeds, ys, xs = _case(path)
    if os.path.basename(path) == INTEGER_ONLY:
        with pytest.warns(GradientNote, match="only float values carry gradients"):  # as tf.gradients: None
            assert add_gradients(model, "3", "0").gradients == {"0": None}
        return
    rows = check_gradients(model, ys, xs, feeds, seed=1, eps=1e-3, rtol=2e-2)
    # max-pool windows of hundreds of float32 values hold near-ties that a 1e-3 step crosses: the checker
    # calls those kinks; test_max_pool_models_match_torch compares them with PyTorch instead
    allowed = {"ok", "kink"} if "MaxPool" in path else {"ok"}
    bad = [r for r in rows if not r.ok and r.status not in allowed]
    assert not bad, "; ".join(f"{r.x}: {r.analytic:.6g} vs {r.numeric:.6g} ({r.status})" for r in bad)


@pytest.mark.parametrize("path", [m for m in MODELS if "MaxPool" in m], ids=os.path.basename)
def test_max_pool_models_match_torch(path: str) -> None:
    """The exported MaxPool models' input gradients equal PyTorch autograd's on the same input."""
    import torch

    model, feeds, ys, xs = _case(path)
    (node,) = [n for n in model.graph.node if n.op_type == "MaxPool"]
    attrs = {a.name: list(a.ints) for a in node.attribute}
    (x,) = feeds.values()
    rank = x.ndim - 2
    aug = add_gradients(model, ys, xs, [NEW_INPUT])
    y = run(upgrade(model), feeds)[ys[0]]
    u = np.random.default_rng(0).standard_normal(y.shape).astype(np.float32)
    got = run(aug.model, {**feeds, aug.new_inputs[0]: u})[aug.gradients[xs[0]]]  # type: ignore[index]
    pool = [torch.nn.functional.max_pool1d, torch.nn.functional.max_pool2d, torch.nn.functional.max_pool3d][rank - 1]
    xt = torch.tensor(x, requires_grad=True)
    pads = attrs.get("pads", [0] * 2 * rank)
    assert pads[:rank] == pads[rank:], "torch pads symmetrically"
    yt = pool(xt, attrs["kernel_shape"], stride=attrs.get("strides", 1), padding=pads[:rank],
              dilation=attrs.get("dilations", 1))
    (want,) = torch.autograd.grad(yt, xt, torch.tensor(u))
    np.testing.assert_allclose(got, want.numpy(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("path", [m for m in MODELS if "PReLU" in m or "operator_add" in m], ids=os.path.basename)
def test_upgraded_model_keeps_the_shipped_outputs(path: str) -> None:
    """Differentiating a pre-opset-7 model upgrades it first; the upgrade must not change what it computes."""
    model = onnx.load(os.path.join(path, "model.onnx"))
    init = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in init]
    feeds, expected = {}, []
    for k, inp in enumerate(inputs):
        t = onnx.TensorProto()
        with open(os.path.join(path, "test_data_set_0", f"input_{k}.pb"), "rb") as f:
            t.ParseFromString(f.read())
        feeds[inp.name] = onnx.numpy_helper.to_array(t)
    for k in range(len(model.graph.output)):
        t = onnx.TensorProto()
        with open(os.path.join(path, "test_data_set_0", f"output_{k}.pb"), "rb") as f:
            t.ParseFromString(f.read())
        expected.append(onnx.numpy_helper.to_array(t))
    got = run(upgrade(model), feeds)
    for out, want in zip(model.graph.output, expected, strict=True):
        np.testing.assert_allclose(got[out.name], want, rtol=1e-5, atol=1e-6)
