"""``check`` raises no false alarm on real models, and still catches real errors.

No false alarm: ``check_model`` (the float64 check, on onnxruntime or onnx's reference evaluator) finds no mismatch
on a ResNet-18 exported from PyTorch in train and eval mode, a Keras CNN converted by tf2onnx (four seeds), onnx's
``light`` model-zoo architectures (seeded random weights in place of the stripped ones) and the pytorch-converted
and pytorch-operator models shipped in the onnx package. Real errors: user rules that flip a sign, sum over the wrong
axis or miss the sum over broadcast axes are each a mismatch.

The heavy sweeps run in full with ``ONNXGRAD_LONG=1`` (every x of both ResNet-18s, every light model, every shipped
model); by default a fixed sample runs (six xs of each ResNet-18, the input and two weights of two light models, and
every shipped model, which are small), so the suite stays quick. ``@weights`` is checked on the exported models too:
it names exactly the PyTorch parameters.
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from bench import models
from onnxgrad import registry
from onnxgrad.check import FLAT, KINK, MISMATCH, OK, check_model
from onnxgrad.shorthands import INPUTS, WEIGHTS, expand_xs, select_weights
from tests.test_backend_models import INTEGER_ONLY, MODELS, _case

LONG = os.environ.get("ONNXGRAD_LONG") == "1"
long_only = pytest.mark.skipif(not LONG, reason="a long sweep: set ONNXGRAD_LONG=1")
LIGHT = Path(onnx.__file__).parent / "backend" / "test" / "data" / "light"


def verdicts(report: Any) -> dict[str, int]:
    return {s: sum(1 for r in report.rows if r.status == s) for s in (OK, KINK, FLAT, MISMATCH)}


def no_mismatch(report: Any) -> str:
    return "; ".join(f"{r.x}: {r.analytic:.9g} vs {r.numeric:.9g} (rel {r.rel_error:.1e}, step {r.step:.0e})"
                     for r in report.rows if r.status == MISMATCH)


# ---------------------------------------------------------------------------- ResNet-18 from PyTorch
def resnet18() -> Any:
    """bench.models' ResNet-18 with 10 classes and seeded weights."""
    import torch

    torch.manual_seed(0)
    return models.resnet18(classes=10)


def export(module: Any, args: tuple[Any, ...], train: bool, names: tuple[list[str], list[str]],
           fold: bool | None = None) -> onnx.ModelProto:
    """``module`` exported by torch.onnx (the TorchScript exporter, opset 17), in train or eval mode; constants are
    folded in eval mode unless ``fold`` says otherwise (folding renames weights it transposes)."""
    import torch

    module.train(train)
    f = io.BytesIO()
    mode = torch.onnx.TrainingMode.TRAINING if train else torch.onnx.TrainingMode.EVAL
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, args, f, dynamo=False, training=mode, opset_version=17, input_names=names[0],
                          output_names=names[1], do_constant_folding=not train if fold is None else fold)
    return onnx.load_from_string(f.getvalue())


_EXPORTED: dict[str, onnx.ModelProto] = {}


def resnet_model(mode: str) -> onnx.ModelProto:
    """ResNet-18 at batch 2, 3x32x32, exported in ``mode`` (train: BatchNorm on batch statistics)."""
    if mode not in _EXPORTED:
        import torch

        _EXPORTED[mode] = export(resnet18(), (torch.randn(2, 3, 32, 32),), mode == "train", (["x"], ["logits"]))
    return _EXPORTED[mode]


def sample(xs: list[str], k: int) -> list[str]:
    """``k`` names spread evenly over ``xs`` (first and last among them), or all of them in the long run."""
    if LONG or len(xs) <= k:
        return xs
    picks = np.linspace(0, len(xs) - 1, k).round().astype(int)
    return [xs[i] for i in dict.fromkeys(picks.tolist())]


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_resnet18_check_has_no_false_alarm(mode: str) -> None:
    model = resnet_model(mode)
    xs = expand_xs(model, [WEIGHTS, INPUTS])
    assert len(xs) == (63 if mode == "train" else 27)  # eval: BatchNorm folded into the convolutions
    report = check_model(model, ["logits"], sample(xs, 6))
    assert report.precision == "float64" and report.runner == "onnx ReferenceEvaluator", report.fallback
    assert report.fallback is not None and "no kernel for Conv-11" in report.fallback
    assert report.ok, no_mismatch(report)
    assert verdicts(report)[OK] == len(report.rows)


def test_resnet18_weights_are_the_pytorch_parameters() -> None:
    """``@weights`` of the exported train-mode model is exactly the module's parameters; BatchNorm's running
    statistics (buffers) are left out, each with why."""
    weights, left = select_weights(resnet_model("train"))
    params = [name for name, _ in resnet18().named_parameters()]
    assert sorted(weights) == sorted(params)
    assert {w.name for w in left} == {f"{p}.running_{s}" for p in {n.rsplit(".", 1)[0] for n in params if "bn" in n
                                                                    or "down.1" in n} for s in ("mean", "var")}
    assert all("BatchNormalization (a statistic, not trained)" in w.reason for w in left)


# ---------------------------------------------------------------------------- a Keras CNN through tf2onnx
def keras_cnn() -> onnx.ModelProto:
    """A Keras CNN (Conv, BatchNorm, max-pool, Conv, global average pool, Dense) with seeded random weights,
    converted by tf2onnx. Keras 3's model is converted as a ``tf.function`` (``from_keras`` fails on Keras 3)."""
    pytest.importorskip("tf2onnx")
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import tensorflow as tf
    import tf2onnx

    tf.keras.utils.set_random_seed(0)
    layers = tf.keras.layers
    model = tf.keras.Sequential([
        tf.keras.Input((12, 12, 3)), layers.Conv2D(6, 3, padding="same", activation="relu"),
        layers.BatchNormalization(), layers.MaxPooling2D(), layers.Conv2D(8, 3, activation="tanh"),
        layers.GlobalAveragePooling2D(), layers.Dense(5),
    ])
    rng = np.random.default_rng(0)
    model.set_weights([rng.uniform(0.5, 1.5, w.shape).astype(np.float32) if "variance" in v.path or "gamma" in v.path
                       else 0.3 * rng.standard_normal(w.shape).astype(np.float32)
                       for v, w in zip(model.weights, model.get_weights(), strict=True)])
    spec = (tf.TensorSpec((None, 12, 12, 3), tf.float32, name="x"),)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        proto, _ = tf2onnx.convert.from_function(tf.function(lambda x: model(x, training=False)),
                                                 input_signature=spec, opset=17)
    return proto


def test_keras_cnn_check_has_no_false_alarm() -> None:
    model = keras_cnn()
    xs = expand_xs(model, [WEIGHTS, INPUTS])
    assert len(xs) >= 6, xs  # conv kernels and biases, the folded BatchNorm, the dense kernel and bias, x
    y = model.graph.output[0].name
    for seed in range(4):
        report = check_model(model, [y], xs, seed=seed)
        assert report.precision == "float64" and report.ok, (seed, no_mismatch(report))


# ---------------------------------------------------------------------------- onnx's light model zoo
def light_model(name: str, seed: int = 0) -> onnx.ModelProto:
    """A ``light`` model with every weight its ConstantOfShape stood for drawn at random (seeded): He-scaled
    filters, positive BatchNorm scales and variances, small biases and means."""
    m = onnx.load(LIGHT / f"{name}.onnx")
    g = m.graph
    rng = np.random.default_rng(seed)
    shapes = {t.name: [int(d) for d in numpy_helper.to_array(t)] for t in g.initializer
              if t.data_type == TensorProto.INT64 and len(t.dims) == 1}
    role = {i: (n.op_type, k) for n in g.node for k, i in enumerate(n.input)}
    kept = []
    for n in g.node:
        if n.op_type != "ConstantOfShape" or n.input[0] not in shapes:
            kept.append(n)
            continue
        shape = shapes[n.input[0]]
        op, k = role.get(n.output[0], ("", 0))
        if op == "BatchNormalization" and k in (1, 4):
            w = rng.uniform(0.5, 1.5, shape)
        elif len(shape) > 1:
            w = rng.standard_normal(shape) * np.sqrt(2.0 / int(np.prod(shape[1:])))
        else:
            w = 0.1 * rng.standard_normal(shape)
        g.initializer.append(numpy_helper.from_array(w.astype(np.float32), n.output[0]))
    del g.node[:]
    g.node.extend(kept)
    used = {i for n in g.node for i in n.input}
    for field in (g.initializer, g.input):
        keep = [v for v in field if v.name in used]
        del field[:]
        field.extend(keep)
    m.ir_version = max(m.ir_version, 7)  # initializers that are not graph inputs
    return m


LIGHT_MODELS = sorted(p.stem for p in LIGHT.glob("*.onnx"))
LIGHT_QUICK = {"light_shufflenet", "light_squeezenet"}


@pytest.mark.parametrize("name", [n if n in LIGHT_QUICK else pytest.param(n, marks=long_only) for n in LIGHT_MODELS])
def test_light_zoo_check_has_no_false_alarm(name: str) -> None:
    model = light_model(name)
    onnx.checker.check_model(model)
    xs = expand_xs(model, [INPUTS, WEIGHTS])
    y = model.graph.output[0].name
    report = check_model(model, [y], [xs[0], *sample(xs[1:], 2 if not LONG else 8)] if not LONG else
                         [xs[0], *xs[1::max(1, len(xs) // 8)]], directions=2)
    assert report.precision == "float64" and report.ok, no_mismatch(report)


def test_saturated_softmax_is_flat_not_a_mismatch() -> None:
    """The light ShuffleNet with random weights saturates its softmax: the gradient is zero to round-off and so is
    every difference quotient. In float32 that once read as a mismatch; it is reported flat."""
    model = light_model("light_shufflenet")
    y = model.graph.output[0].name
    for precision in ("float64", "float32"):
        report = check_model(model, [y], expand_xs(model, [INPUTS]), precision=precision, directions=1)
        assert report.ok and report.flat, (precision, no_mismatch(report))
        assert any("the loss is flat here" in s for s in report.next_steps())


# ---------------------------------------------------------------------------- the models shipped with onnx
BACKEND = [m for m in MODELS if os.path.basename(m) != INTEGER_ONLY]


@pytest.mark.parametrize("path", BACKEND, ids=os.path.basename)
def test_backend_model_check_has_no_false_alarm(path: str) -> None:
    model, feeds, ys, xs = _case(path)
    report = check_model(model, ys, xs, feeds, seed=1)
    assert report.precision == "float64" and report.ok, no_mismatch(report)


# ---------------------------------------------------------------------------- real errors are caught
def _sin_sign_flipped(em: Any, node: Any, dy: list[Any]) -> list[Any]:
    """dx = -dy * cos(x): the sign flipped."""
    return [em.Neg(em.Mul(dy[0], em.Cos(node.inputs[0])))]


def _softmax_wrong_axis(em: Any, node: Any, dy: list[Any]) -> list[Any]:
    """dx = y * (dy - sum(dy * y)) with the sum over axis 0, not the softmax axis."""
    (y,) = node.outputs
    s = em.reduce_sum(em.Mul(dy[0], y), [0], keepdims=True)
    return [em.Mul(y, em.Sub(dy[0], s))]


def _add_unreduced(em: Any, node: Any, dy: list[Any]) -> list[Any]:
    """da = db = dy, registered without broadcast=: the sum over broadcast axes is missed."""
    return [dy[0], dy[0]]


BROKEN: dict[str, tuple[str, Callable[..., list[Any]], onnx.ModelProto]] = {}


def _model(nodes: list[onnx.NodeProto], x: list[int], w: np.ndarray) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, x)],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          initializer=[numpy_helper.from_array(w.astype(np.float32), "w")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


BROKEN_CASES = {
    "sign-flip": ("Sin", _sin_sign_flipped,
                  _model([oh.make_node("Mul", ["x", "w"], ["a"]), oh.make_node("Sin", ["a"], ["y"])], [3, 4],
                         np.linspace(0.5, 1.5, 4))),
    "wrong-axis": ("Softmax", _softmax_wrong_axis,
                   _model([oh.make_node("Mul", ["x", "w"], ["a"]), oh.make_node("Softmax", ["a"], ["y"], axis=-1)],
                          [3, 4], np.linspace(0.5, 1.5, 4))),
    "missing-broadcast-reduction": ("Add", _add_unreduced,
                                    _model([oh.make_node("Add", ["x", "w"], ["a"]), oh.make_node("Tanh", ["a"], ["y"])],
                                           [3, 4], np.linspace(-0.5, 0.5, 4))),
}


@pytest.fixture
def user_rule(request: pytest.FixtureRequest) -> Iterator[str]:
    """The case's broken rule registered as a user rule for its op; the original registered back after."""
    op, fn, _ = BROKEN_CASES[request.param]
    original = registry.lookup("", op, 17)
    assert original is not None and original.fn is not None
    registry.register(op, since=original.since)(fn)
    try:
        yield request.param
    finally:
        registry.register(op, since=original.since, broadcast=original.broadcast, dense=original.dense,
                          notes=original.notes, wrt=original.wrt)(original.fn)
        restored = registry.lookup("", op, 17)
        assert restored is not None and restored.fn is original.fn


@pytest.mark.parametrize("user_rule", list(BROKEN_CASES), indirect=True)
def test_check_catches_broken_user_rules(user_rule: str) -> None:
    _, _, model = BROKEN_CASES[user_rule]
    for precision in ("auto", "float32"):
        report = check_model(model, ["y"], ["x", "w"], precision=precision)
        statuses = {r.x: r.status for r in report.rows}
        if user_rule == "missing-broadcast-reduction":  # x's gradient has x's shape and is right; w's is not
            assert statuses == {"x": OK, "w": MISMATCH}, statuses
            assert "its gradient has shape [3, 4], it has [4]" in report.rows[1].note
            assert any("wrong shape" in s for s in report.next_steps())
        else:
            assert statuses == {"x": MISMATCH, "w": MISMATCH}, statuses
        assert not report.ok


@pytest.mark.parametrize("case", list(BROKEN_CASES))
def test_the_same_models_pass_with_the_real_rules(case: str) -> None:
    _, _, model = BROKEN_CASES[case]
    report = check_model(model, ["y"], ["x", "w"])
    assert report.ok and verdicts(report)[OK] == 2, no_mismatch(report)


# ---------------------------------------------------------------------------- @weights on an exported transformer
def tiny_transformer() -> Any:
    """An embedding, causal self-attention with its -inf mask kept as a buffer, an RMS norm (``x.pow(2)``), a layer
    norm and a two-layer MLP: what ``@weights`` must tell apart (parameters from a mask and an exponent)."""
    import torch
    from torch import nn

    class Block(nn.Module):
        def __init__(self, vocab: int = 11, d: int = 8, t: int = 5) -> None:
            super().__init__()
            self.embed = nn.Embedding(vocab, d)
            self.pos = nn.Parameter(0.1 * torch.randn(t, d))
            self.qkv = nn.Linear(d, 3 * d)
            self.out = nn.Linear(d, d)
            self.gain = nn.Parameter(torch.ones(d))
            self.norm = nn.LayerNorm(d)
            self.mlp = nn.Sequential(nn.Linear(d, 2 * d), nn.GELU(), nn.Linear(2 * d, d))
            self.register_buffer("mask", torch.triu(torch.full((t, t), float("-inf")), diagonal=1))
            self.exponent = 2.0

        def forward(self, tokens: torch.Tensor) -> torch.Tensor:
            x = self.embed(tokens) + self.pos
            q, k, v = self.qkv(x).chunk(3, dim=-1)
            att = torch.softmax(q @ k.transpose(-1, -2) / 8**0.5 + self.mask, dim=-1)
            x = x + self.out(att @ v)
            x = x * torch.rsqrt(x.pow(self.exponent).mean(-1, keepdim=True) + 1e-6) * self.gain
            x = self.norm(x)
            return (x + self.mlp(x)).sum(-1)

    torch.manual_seed(0)
    return Block()


def test_weights_of_an_exported_transformer_are_its_parameters() -> None:
    import torch

    module = tiny_transformer()
    model = export(module, (torch.randint(0, 11, (2, 5)),), False, (["tokens"], ["y"]), fold=False)
    weights, left = select_weights(model)
    inits = {t.name for t in model.graph.initializer}
    params = {name for name, _ in module.named_parameters()} & inits  # the exporter makes some a Constant node
    assert set(weights) == params and len(params) >= 10, (set(weights) ^ params)
    reasons = {w.name: w.reason for w in left}
    assert set(reasons) == inits - params == {"mask"}
    assert "mask" in reasons and reasons["mask"].startswith("a mask (holds -inf"), reasons
    report = check_model(model, ["y"], expand_xs(model, [WEIGHTS]))  # no NaN gradient of a mask, no false alarm
    assert report.ok and all(np.isfinite(r.analytic) for r in report.rows), no_mismatch(report)
