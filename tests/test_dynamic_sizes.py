"""Dynamic-size exports end to end (issue 15): fully convolutional PyTorch networks exported with run-time N, H
and W (TorchScript exporter, opsets 11 and 17, eval mode), differentiated ONCE by onnxgrad, and the one gradient
model run in onnxruntime at three input sizes, odd ones included; the input gradient and every parameter's
gradient of ``sum_i <u_i, y_i>`` (a fixed random cotangent per output) are compared with ``torch.autograd``.
The networks are in ``tests/dynamic_nets.py``: a segmentation net (strided convs, bilinear upsampling by a scale and
to the input's size), a detection backbone (ceil-mode max and average pools, a global pool) and a U-Net
(ConvTranspose, skips fitted by ``F.pad`` and by a center crop)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

pytest.importorskip("torch")

from onnxgrad import NEW_INPUT, add_gradients
from onnxgrad.runtime import run
from tests import dynamic_nets as nets
from tests.conftest import Cli
from tests.test_torch_e2e import initializer_names

OPSETS = (11, 17)
# (N, H, W): the traced size, two odd ones, one larger and oblong; none of them is the size the export traced
# at for H or W except the first (which checks that the dynamic graph still gives the static answer)
SIZES = ((2, 32, 32), (1, 45, 37), (3, 64, 50))
# float32: convolutions summed in another order by onnxruntime than by PyTorch; measured errors are ~1e-6
RTOL = 1e-4
CASES = [(name, opset) for name in nets.NETS for opset in OPSETS]


def _assert_dynamic(model: onnx.ModelProto) -> None:
    """The export's input really has symbolic N, H and W (else the test would prove nothing)."""
    (x,) = [i for i in model.graph.input if i.name == "x"]
    dims = [d.dim_param or d.dim_value for d in x.type.tensor_type.shape.dim]
    assert dims == ["n", nets.IN_CHANNELS, "h", "w"], dims


def _compare(label: str, got: dict[str, np.ndarray], want: dict[str, np.ndarray]) -> list[str]:
    """Lines naming each value whose shape differs or whose relative error exceeds RTOL."""
    bad = []
    for key, expect in want.items():
        value = got[key]
        if value.shape != expect.shape:
            bad.append(f"{label} {key}: shape {value.shape}, torch {expect.shape}")
        elif (err := nets.rel_err(value, expect)) > RTOL:
            bad.append(f"{label} {key}: relative error {err:.2e} (norm {np.linalg.norm(expect):.3g})")
    return bad


@pytest.mark.parametrize(("name", "opset"), CASES, ids=[f"{n}-opset{o}" for n, o in CASES])
def test_one_gradient_model_matches_torch_at_every_size(name: str, opset: int) -> None:
    module = nets.build(name)
    model = nets.export(module, name, opset)
    _assert_dynamic(model)
    params = initializer_names(model, module)
    ys = nets.OUTPUTS[name]
    aug = add_gradients(model, ys, ["x", *params.values()], [NEW_INPUT] * len(ys))
    onnx.checker.check_model(aug.model, full_check=True)
    assert len(aug.new_inputs) == len(ys)
    keys = ["x", *params]  # torch's order: the input, then named_parameters()
    rng = np.random.default_rng(opset)
    bad: list[str] = []
    for n, h, w in SIZES:
        x = rng.standard_normal((n, nets.IN_CHANNELS, h, w)).astype(np.float32)
        outs, cotangents, grads = nets.torch_grads(module, x, None, rng)
        got = run(aug.model, {"x": x, **dict(zip(aug.new_inputs, cotangents, strict=True))})
        label = f"{name} opset {opset} at {n}x{h}x{w}:"
        bad += _compare(label, got, dict(zip(ys, outs, strict=True)))
        names = {key: aug.gradients["x" if key == "x" else params[key]] for key in keys}
        missing = [key for key, out in names.items() if out is None]
        assert not missing, f"{label} no gradient for {missing}"
        bad += _compare(label, {key: got[out] for key, out in names.items() if out},
                        dict(zip(keys, grads, strict=True)))
    assert not bad, "\n".join(bad)


def test_cli_grad_then_run_at_two_sizes(tmp_path: Path, cli: Cli) -> None:
    """`onnxgrad grad` on a dynamic-size segmentation export (the model of the issue's error), then `onnxgrad run`
    of the one gradient file at two sizes, against torch.autograd."""
    module = nets.build("seg")
    model_path, out_path = tmp_path / "seg.onnx", tmp_path / "seg_grad.onnx"
    onnx.save(nets.export(module, "seg", 17), model_path)
    res = cli("grad", model_path, "-o", out_path, "--ys", "y", "--xs", "x", "--xs", "@weights",
              "--grad-ys", "y=input", "--json")
    assert res.code == 0, res.err
    report = json.loads(res.out)
    (seed_name,) = report["new_inputs"]
    grads = report["gradients"]
    assert set(grads) == {"x", *(p for p, _ in module.named_parameters())}, sorted(grads)
    keys = ["x", *(p for p, _ in module.named_parameters())]
    rng = np.random.default_rng(0)
    bad: list[str] = []
    for n, h, w in ((1, 45, 37), (2, 64, 50)):
        x = rng.standard_normal((n, nets.IN_CHANNELS, h, w)).astype(np.float32)
        (y,), (u,), want = nets.torch_grads(module, x, None, rng)
        feeds, results = tmp_path / f"feeds_{h}x{w}.npz", tmp_path / f"results_{h}x{w}.npz"
        np.savez(feeds, **{"x": x, seed_name: u})
        res = cli("run", out_path, "--inputs", feeds, "-o", results)
        assert res.code == 0, res.err
        with np.load(results) as got:
            outputs = {key: got[grads[key]] for key in keys} | {"y": got["y"]}
        bad += _compare(f"cli at {n}x{h}x{w}:", outputs, {"y": y, **dict(zip(keys, want, strict=True))})
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("name", list(nets.NETS))
def test_batch_only_export_matches_torch_at_every_batch(name: str) -> None:
    """The export almost every user makes: only the batch dynamic (dynamic_axes={'x': {0: 'n'}}), H and W static;
    one gradient model against torch.autograd, the input's and every parameter's gradient, at batch sizes 1, 2
    and 5 (the dW plans over a symbolic batch, onnxgrad/plans/conv.py: det's last strided conv, 9 outputs and 16
    filters, takes by_batch's If, im2col + Gemm at batch 1 and the interleaved Conv from 2 on)."""
    module = nets.build(name)
    model = nets.export(module, name, 17, {0: "n"}, shape=(2, nets.IN_CHANNELS, 20, 18))
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert dims == ["n", nets.IN_CHANNELS, 20, 18], dims
    params = initializer_names(model, module)
    ys = nets.OUTPUTS[name]
    aug = add_gradients(model, ys, ["x", *params.values()], [NEW_INPUT] * len(ys))
    onnx.checker.check_model(aug.model, full_check=True)
    keys = ["x", *params]
    rng = np.random.default_rng(5)
    bad: list[str] = []
    for n in (1, 2, 5):
        x = rng.standard_normal((n, nets.IN_CHANNELS, 20, 18)).astype(np.float32)
        _, cotangents, grads = nets.torch_grads(module, x, None, rng)
        got = run(aug.model, {"x": x, **dict(zip(aug.new_inputs, cotangents, strict=True))})
        names = {key: aug.gradients["x" if key == "x" else params[key]] for key in keys}
        assert all(names.values()), names
        bad += _compare(f"{name} at batch {n}:", {key: got[out] for key, out in names.items() if out},
                        dict(zip(keys, grads, strict=True)))
    assert not bad, "\n".join(bad)
