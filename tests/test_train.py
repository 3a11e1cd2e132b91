"""The train-step model against torch.optim: 200-step trajectories of every optimizer (clipping, weight decay and a
changing learning rate included) on the bundled MLP (float64), a CNN with BatchNorm in training mode and the bundled
transformer block (float32: onnxruntime has no float64 Conv or Erf on the CPU); frozen params, gradient
accumulation, the appended losses, dropout with a seed input; and the lowering of ONNX's preview training ops,
checked on onnx's own node tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

torch = pytest.importorskip("torch")

from onnxgrad.check import convert_floats  # noqa: E402
from onnxgrad.optim import lower_optimizer_ops  # noqa: E402
from onnxgrad.train import make_train_step  # noqa: E402
from tests.conftest import Cli  # noqa: E402
from tests.test_zoo_sweep import export_dynamo  # noqa: E402
from tests.train_twins import MODELS, TWINS, Twin, export, run_onnx, run_torch, schedule, weights  # noqa: E402

STEPS = 200
CLIP = 0.5
LOSS_RTOL = 1e-5
WEIGHT_ATOL = 1e-4

# name -> (optimizer, torch.optim keyword arguments, peak learning rate)
OPTIMIZERS: dict[str, tuple[str, dict[str, Any], float]] = {
    "sgd-nesterov": ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 1e-2}, 0.05),
    "sgd-dampening": ("sgd", {"momentum": 0.9, "dampening": 0.1, "weight_decay": 1e-2}, 0.05),
    "adam-amsgrad": ("adam", {"weight_decay": 1e-2, "amsgrad": True}, 0.01),
    "adamw": ("adamw", {"weight_decay": 1e-2}, 0.01),
    "adagrad": ("adagrad", {"lr_decay": 1e-3, "weight_decay": 1e-3, "initial_accumulator_value": 0.1}, 0.05),
}


@pytest.fixture(autouse=True)
def _one_thread() -> Any:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # the machine is shared: PyTorch's idle workers would spin
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def twins() -> dict[str, Twin]:
    return {name: make() for name, make in TWINS.items()}


def standard_ops_only(model: onnx.ModelProto) -> None:
    assert {n.domain for n in model.graph.node} <= {""}
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    onnx.checker.check_model(model, full_check=True)


@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
@pytest.mark.parametrize("model", list(TWINS))
def test_trajectory_matches_torch(twins: dict[str, Twin], model: str, optimizer: str) -> None:
    """200 steps from the same weights on the same batches, lr changing every step: the losses agree to 1e-5
    (relative), the final weights and BatchNorm running statistics to 1e-4."""
    twin = twins[model]
    name, hyper, lr = OPTIMIZERS[optimizer]
    rng = np.random.default_rng(0)
    batches = [twin.batches(8, rng) for _ in range(STEPS)]
    lrs = schedule(STEPS, lr)
    ts = make_train_step(twin.model, twin.loss, optimizer=name, clip_grad_norm=CLIP, frozen=twin.frozen, **hyper)
    standard_ops_only(ts.model)
    assert not set(twin.frozen) & set(ts.params)
    ours = run_onnx(ts, batches, lrs)
    ref = run_torch(twin, ts.initial, list(ts.params), name, hyper, CLIP, batches, lrs)
    assert ref.norms is not None and (ref.norms > CLIP).any() and (ref.norms < CLIP).any()  # clipping on and off
    assert ref.losses[-1] < 0.7 * ref.losses[0]  # it trains
    np.testing.assert_allclose(ours.losses, ref.losses, rtol=LOSS_RTOL, atol=0)
    for key, value in ref.params.items():
        np.testing.assert_allclose(ours.params[key], value, rtol=0, atol=WEIGHT_ATOL, err_msg=key)
    assert set(ours.state) == {k for k in ref.state if k.startswith("1.running")}
    for key, value in ours.state.items():
        np.testing.assert_allclose(value, ref.state[key], rtol=0, atol=WEIGHT_ATOL, err_msg=key)


def test_frozen_params_stay_weights(twins: dict[str, Twin]) -> None:
    """A frozen param stays an initializer with its value and gets no state; the others follow torch.optim with
    the frozen one's requires_grad off."""
    twin = twins["mlp"]
    ts = make_train_step(twin.model, "loss", optimizer="sgd", frozen=["W1"], momentum=0.9)
    assert list(ts.params) == ["b1", "W2", "b2"] and not any("W1" in k for k in ts.state)
    inits = {t.name: numpy_helper.to_array(t) for t in ts.model.graph.initializer}
    np.testing.assert_array_equal(inits["W1"], weights(twin.model)["W1"])
    rng = np.random.default_rng(1)
    batches = [twin.batches(8, rng) for _ in range(20)]
    lrs = [0.05] * 20
    ours = run_onnx(ts, batches, lrs)
    ref = run_torch(twin, ts.initial, list(ts.params), "sgd", {"momentum": 0.9}, None, batches, lrs)
    np.testing.assert_allclose(ours.losses, ref.losses, rtol=1e-10)
    for key, value in ref.params.items():
        np.testing.assert_allclose(ours.params[key], value, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("optimizer", ["adamw", "sgd"])
def test_gradient_accumulation_matches_torch(twins: dict[str, Twin], optimizer: str) -> None:
    """Three micro-batches per update (apply on the third) equal PyTorch's loss / 3 backward three times, then
    clip and step; nothing moves on the other micro-batches."""
    twin = twins["mlp"]
    _, hyper, _ = OPTIMIZERS["adamw" if optimizer == "adamw" else "sgd-nesterov"]
    ts = make_train_step(twin.model, "loss", optimizer=optimizer, accumulate=True, clip_grad_norm=CLIP, **hyper)
    assert ts.apply is not None and "accum/count" in ts.state
    rng = np.random.default_rng(2)
    batches = [twin.batches(4, rng) for _ in range(30)]
    lrs = schedule(10, 0.02)
    ours = run_onnx(ts, batches, lrs, accumulate=3)
    ref = run_torch(twin, ts.initial, list(ts.params), optimizer, hyper, CLIP, batches, lrs, accumulate=3)
    np.testing.assert_allclose(ours.losses, ref.losses, rtol=1e-8)
    for key, value in ref.params.items():  # float64; the mean of the sum against the sum of the means
        np.testing.assert_allclose(ours.params[key], value, rtol=1e-7, atol=1e-9, err_msg=key)
    # apply False: params and optimizer state pass through unchanged, the gradient is added into the accumulators
    sess = ort.InferenceSession(ts.model.SerializeToString(), providers=["CPUExecutionProvider"])
    feeds = {**batches[0], **ts.initial, ts.lr: np.asarray(0.1), ts.apply: np.asarray(False)}
    if ts.step:
        feeds[ts.step] = np.asarray(1, np.int64)
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))
    for name, (_, new) in {**ts.params, **ts.state}.items():
        if not name.startswith("accum/"):
            np.testing.assert_array_equal(out[new], ts.initial[name])
    assert float(out[ts.state["accum/count"][1]]) == 1.0


# ------------------------------------------------------------------------------------------ the losses
def _mlp64() -> onnx.ModelProto:
    return convert_floats(onnx.load(MODELS / "mlp.onnx"))


def _classifier64() -> onnx.ModelProto:
    return convert_floats(onnx.load(MODELS / "mlp_classifier.onnx"))


def _torch_mlp(p: dict[str, Any], feeds: dict[str, np.ndarray]) -> Any:
    return torch.tanh(torch.from_numpy(feeds["x"]) @ p["W1"] + p["b1"]) @ p["W2"] + p["b2"]


def _torch_classifier(p: dict[str, Any], feeds: dict[str, np.ndarray]) -> Any:
    h = torch.relu(torch.from_numpy(feeds["x"]) @ p["fc1.weight"].T + p["fc1.bias"])
    return h @ p["fc2.weight"].T + p["fc2.bias"]


# (model, --loss, the data, PyTorch's loss of the params and data)
LOSS_CASES: dict[str, tuple[Any, str, dict[str, np.ndarray], Any]] = {
    "mse-existing-target": (
        _mlp64, "mse:pred:target",
        {"x": np.linspace(-1, 1, 20).reshape(5, 4), "target": np.linspace(0, 1, 15).reshape(5, 3)},
        lambda p, f: torch.nn.functional.mse_loss(_torch_mlp(p, f), torch.from_numpy(f["target"]))),
    "mse-new-target": (
        _mlp64, "mse:pred:wanted",
        {"x": np.linspace(-1, 1, 20).reshape(5, 4), "target": np.zeros((5, 3)), "wanted": np.ones((5, 3))},
        lambda p, f: torch.nn.functional.mse_loss(_torch_mlp(p, f), torch.from_numpy(f["wanted"]))),
    "cross-entropy-new-labels": (
        _classifier64, "cross_entropy:logits:y",
        {"x": np.linspace(-2, 2, 48).reshape(6, 8), "labels": np.zeros(6, np.int64),
         "y": np.array([0, 1, 2, 3, 1, 2], np.int64)},
        lambda p, f: torch.nn.functional.cross_entropy(_torch_classifier(p, f), torch.from_numpy(f["y"]))),
}


@pytest.mark.parametrize("case", list(LOSS_CASES))
def test_appended_loss_matches_torch(case: str) -> None:
    """The appended loss (mean reduction) and one SGD step on it equal PyTorch's."""
    make, spec, feeds, torch_loss = LOSS_CASES[case]
    model = make()
    ts = make_train_step(model, spec, optimizer="sgd", lr=0.1)
    data = {k: v for k, v in feeds.items() if k in ts.data}
    assert set(ts.data) == set(data)
    sess = ort.InferenceSession(ts.model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in sess.get_outputs()],
                   sess.run(None, {**data, **ts.initial, ts.lr: np.asarray(0.1)}), strict=True))
    params = {k: torch.tensor(v, requires_grad=True) for k, v in weights(model).items()}
    loss = torch_loss(params, feeds)
    loss.backward()
    np.testing.assert_allclose(out[ts.loss], loss.item(), rtol=1e-12)
    for name, (_, new) in ts.params.items():
        want = (params[name] - 0.1 * params[name].grad).detach().numpy()
        np.testing.assert_allclose(out[new], want, rtol=1e-12, atol=1e-14)


def test_max_pool_computes_its_indices_once(twins: dict[str, Twin]) -> None:
    """The CNN's MaxPool, whose gradient routes dY through its Indices, runs once: the forward pool gives Y and
    the Indices (the trajectory test checks the values)."""
    ts = make_train_step(twins["cnn"].model, twins["cnn"].loss, optimizer="sgd")
    pools = [n for n in ts.model.graph.node if n.op_type == "MaxPool"]
    assert len(pools) == 1 and len(pools[0].output) == 2
    readers = {i for n in ts.model.graph.node for i in n.input}
    assert set(pools[0].output) <= readers


# ------------------------------------------------------------------------------------------ BatchNorm
def test_batchnorm_eval_mode_keeps_running_statistics(twins: dict[str, Twin]) -> None:
    """batchnorm='eval': the running statistics stay weights, normalization uses them, as module.eval() does."""
    twin = twins["cnn"]
    ts = make_train_step(twin.model, twin.loss, optimizer="sgd", batchnorm="eval")
    assert not ts.buffers and not ts.state
    assert "1.running_mean" in {t.name for t in ts.model.graph.initializer}
    batch = twin.batches(6, np.random.default_rng(3))
    sess = ort.InferenceSession(ts.model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in sess.get_outputs()],
                   sess.run(None, {**batch, **ts.initial, ts.lr: np.asarray(0.1, np.float32)}), strict=True))
    net = twin.module
    exported = weights(twin.model)
    with torch.no_grad():  # earlier tests trained the module: back to the exported values, statistics included
        for name, p in [*net.named_parameters(), *net.named_buffers()]:
            if name in exported:
                p.copy_(torch.from_numpy(exported[name].copy()))
    net.zero_grad(set_to_none=True)
    net.eval()
    try:
        loss = twin.torch_loss({}, batch)
        loss.backward()
    finally:
        net.train()
    np.testing.assert_allclose(out[ts.loss], loss.item(), rtol=1e-6)
    for name, p in net.named_parameters():
        np.testing.assert_allclose(out[ts.params[name][1]], (p - 0.1 * p.grad).detach().numpy(), atol=1e-6)
        p.grad = None


# ------------------------------------------------------------------------------------------ Dropout
def _dropout_model(ratio: float, n: int = 4000) -> onnx.ModelProto:
    """y = Dropout(x * w) with w a weight of n ones; loss = sum(y)."""
    nodes = [oh.make_node("Mul", ["x", "w"], ["z"]),
             oh.make_node("Dropout", ["z", "ratio"], ["y"]),
             oh.make_node("ReduceSum", ["y"], ["loss"], keepdims=0)]
    graph = oh.make_graph(nodes, "dropout", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", n])],
                          [oh.make_tensor_value_info("loss", TensorProto.FLOAT, []),
                           oh.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", n])],
                          [numpy_helper.from_array(np.ones(n, np.float32), "w"),
                           numpy_helper.from_array(np.asarray(ratio, np.float32), "ratio")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize(("shape", "kernel"), [((8, 6), 1), ((8, 6, 7), 1), ((2, 6, 5), 5), ((4, 6, 3, 5, 4), 1)],
                         ids=["1d", "1d-seq", "1d-seq-wide-kernel", "3d"])
def test_batchnorm_train_mode_gradient_matches_torch(shape: tuple[int, ...], kernel: int) -> None:
    """BatchNorm in training mode on inputs of rank 2, 3 and 5 (its gradient is written in closed form), after a
    layer whose weights need its input gradient: one SGD step with lr 1 moves every param by PyTorch's gradient,
    and the running statistics as PyTorch's; the model holds standard ops only. After the convolutions the
    per-channel factor of the gradient moves onto W and dW, except where W outweighs the output (wide kernel)."""
    nn = torch.nn
    torch.manual_seed(1)
    bn = nn.BatchNorm3d(6) if len(shape) == 5 else nn.BatchNorm1d(6)
    before = {2: nn.Linear(6, 6, bias=False), 3: nn.Conv1d(6, 6, kernel, padding=kernel // 2, bias=False),
              5: nn.Conv3d(6, 6, 1, bias=False)}[len(shape)]  # (no bias: BatchNorm removes it, its gradient is 0)
    net = nn.Sequential(before, bn, nn.Flatten(), nn.Linear(int(np.prod(shape[1:])), 3))
    with torch.no_grad():  # distinct values everywhere: the exporter merges equal initializers
        bn.weight.copy_(1.0 + 0.1 * torch.randn(6))
        bn.bias.copy_(0.1 * torch.randn(6))
        bn.running_mean.copy_(0.1 * torch.randn(6))
        bn.running_var.copy_(1.0 + 0.2 * torch.rand(6))
    x = (3.0 * torch.randn(shape) + 2.0).float()
    labels = torch.arange(shape[0]) % 3
    model = export(net, x, "x", "logits")
    net.train()
    loss = torch.nn.functional.cross_entropy(net(x), labels)
    loss.backward()
    ts = make_train_step(model, "cross_entropy:logits:labels", optimizer="sgd", lr=1.0)
    standard_ops_only(ts.model)
    sess = ort.InferenceSession(ts.model.SerializeToString(), providers=["CPUExecutionProvider"])
    out = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {
        "x": x.numpy(), "labels": labels.numpy(), **ts.initial, ts.lr: np.asarray(1.0, np.float32)}), strict=True))
    np.testing.assert_allclose(out[ts.loss], loss.item(), rtol=1e-6)
    grads = {k: p.grad.numpy() for k, p in net.named_parameters()}  # type: ignore[union-attr]
    for k, p in net.named_parameters():  # the exporter stores a Linear's weight transposed, named onnx::MatMul_*
        grads.update({name: grads[k].T for name in ts.params if name not in grads and p.dim() == 2
                      and np.array_equal(ts.initial[name], p.detach().numpy().T)})
    assert set(ts.params) <= set(grads) and len(ts.params) == len(list(net.parameters()))
    for name, (_, new) in ts.params.items():
        want = grads[name]
        np.testing.assert_allclose(ts.initial[name] - out[new], want, rtol=0, atol=1e-5 * np.abs(want).max(),
                                   err_msg=name)
    buffers = dict(net.named_buffers())
    for name in ts.buffers:
        np.testing.assert_allclose(out[ts.state[name][1]], buffers[name].numpy(), rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("conv", [
    {"group": 4, "strides": [2, 2], "pads": [1, 1, 1, 1], "w": (4, 1, 3, 3)},
    {"auto_pad": "SAME_UPPER", "strides": [2, 2], "w": (5, 4, 3, 3)},
    {"dilations": [2, 2], "pads": [2, 2, 2, 2], "w": (5, 4, 3, 3)},
    {"group": 2, "pads": [1, 0, 1, 0], "w": (6, 2, 3, 2)},
], ids=["depthwise-strided", "same-upper-strided", "dilated", "grouped"])
def test_batchnorm_after_a_conv_folds_its_factor_onto_the_kernel(conv: dict[str, Any],
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """Conv -> BatchNorm (training mode) -> ReLU over a batch and spatial sizes known only at run time: the step
    that moves the BatchNorm's per-channel factor onto W and dW moves every param as the one that scales dz."""
    from onnxgrad import train

    attrs = {k: v for k, v in conv.items() if k != "w"}
    rng = np.random.default_rng(0)
    m = conv["w"][0]
    inits = [numpy_helper.from_array(rng.standard_normal(conv["w"]).astype(np.float32), "W"),
             numpy_helper.from_array((1 + 0.1 * rng.standard_normal(m)).astype(np.float32), "s"),
             numpy_helper.from_array((0.1 * rng.standard_normal(m)).astype(np.float32), "b"),
             numpy_helper.from_array(np.zeros(m, np.float32), "mean"),
             numpy_helper.from_array(np.ones(m, np.float32), "var")]
    nodes = [oh.make_node("Conv", ["x", "W"], ["z"], **attrs),
             oh.make_node("BatchNormalization", ["z", "s", "b", "mean", "var"], ["n"]),
             oh.make_node("Relu", ["n"], ["r"]), oh.make_node("ReduceSumSquare", ["r"], ["loss"], keepdims=0)]
    graph = oh.make_graph(nodes, "conv_bn", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, "H", "W"])],
                          [oh.make_tensor_value_info("loss", TensorProto.FLOAT, [])], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=7)
    feeds = {"x": rng.standard_normal((3, 4, 9, 10)).astype(np.float32)}
    folded = []
    real = train._conv_to_fold
    monkeypatch.setattr(train, "_conv_to_fold", lambda bn, z: folded.append(real(bn, z)) or folded[-1])
    moved = []
    for _ in range(2):
        ts = make_train_step(model, "loss", optimizer="sgd", lr=1.0)
        sess = ort.InferenceSession(ts.model.SerializeToString(), providers=["CPUExecutionProvider"])
        out = dict(zip([o.name for o in sess.get_outputs()],
                       sess.run(None, {**feeds, **ts.initial, ts.lr: np.asarray(1.0, np.float32)}), strict=True))
        moved.append({name: ts.initial[name] - out[new] for name, (_, new) in ts.params.items()})
        monkeypatch.setattr(train, "_conv_to_fold", lambda bn, z: None)
    assert folded and folded[0] is not None
    for name, want in moved[1].items():
        np.testing.assert_allclose(moved[0][name], want, rtol=0, atol=1e-5 * np.abs(want).max(), err_msg=name)


def test_dropout_train_mode_takes_a_seed() -> None:
    """Elements are dropped with probability ratio and the rest scaled by 1 / (1 - ratio), the same mask in the
    forward and the gradient; a seed gives one mask, another seed another one, neighbours are uncorrelated."""
    ratio, lr = 0.3, 0.01
    ts = make_train_step(_dropout_model(ratio), "loss", params=["w"], outputs=["y"], optimizer="sgd")
    assert ts.seed is not None and ts.outputs == ["y"]
    sess = ort.InferenceSession(ts.model.SerializeToString(), providers=["CPUExecutionProvider"])
    x = np.ones((2, 4000), np.float32)

    def step(seed: int) -> dict[str, np.ndarray]:
        feeds = {"x": x, **ts.initial, ts.lr: np.asarray(lr, np.float32), ts.seed: np.asarray(seed, np.int64)}
        return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))

    a, b, again = step(7), step(8), step(7)
    y = a["y"]
    kept = y != 0
    assert abs(1 - kept.mean() - ratio) < 0.02
    np.testing.assert_allclose(y[kept], 1 / (1 - ratio), rtol=1e-6)
    np.testing.assert_array_equal(again["y"], y)
    assert (b["y"] != y).mean() > 0.3
    flat = kept.reshape(-1).astype(float)
    assert abs(np.corrcoef(flat[:-1], flat[1:])[0, 1]) < 0.05
    # d loss / d w_j = sum over the batch of the mask's scale: the gradient saw the forward's mask
    np.testing.assert_allclose(a[ts.params["w"][1]], 1 - lr * y.sum(axis=0), rtol=1e-6)


def test_dropout_eval_mode_is_identity() -> None:
    ts = make_train_step(_dropout_model(0.5, 10), "loss", params=["w"], outputs=["y"], dropout="eval")
    assert ts.seed is None
    x = np.arange(20, dtype=np.float32).reshape(2, 10)
    sess = ort.InferenceSession(ts.model.SerializeToString(), providers=["CPUExecutionProvider"])
    y = sess.run(["y"], {"x": x, **ts.initial, ts.lr: np.asarray(0.1, np.float32)})[0]
    np.testing.assert_array_equal(y, x)


# ------------------------------------------------------------------------------------------ bad input
def _int_param_model() -> onnx.ModelProto:
    return onnx.load(MODELS / "cnn.onnx")


BAD: dict[str, tuple[dict[str, Any], str]] = {
    "non-scalar-loss": ({"loss": "pred"}, "the loss 'pred' has shape [batch, 3]; a loss must be a scalar"),
    "unknown-loss": ({"loss": "los"}, "loss: no value named 'los' in the graph; did you mean 'loss'?"),
    "bad-loss-spec": ({"loss": "mse:pred"}, "loss: expected mse:PRED:TARGET, got 'mse:pred'"),
    "integer-params": ({"loss": "loss", "params": ["flat_shape"], "model": "cnn.onnx"},
                       "params: 'flat_shape' is INT64; only float weights"),
    "input-as-param": ({"loss": "loss", "params": ["x"]}, "params: 'x' is not a weight (an initializer)"),
    "running-stat-as-param": ({"loss": "loss", "params": ["bn1.running_var"], "model": "cnn.onnx"},
                              "params: 'bn1.running_var' is a BatchNormalization running statistic"),
    "all-frozen": ({"loss": "loss", "frozen": ["W1", "b1", "W2", "b2"]}, "params: nothing to train"),
    "nesterov-without-momentum": ({"loss": "loss", "nesterov": True},
                                  "sgd: nesterov momentum requires a momentum and zero dampening"),
    "unknown-hyperparameter": ({"loss": "loss", "betas": (0.9, 0.99)}, "sgd takes no betas"),
    "cross-entropy-float-labels": ({"loss": "cross_entropy:pred:target"},
                                   "loss: the labels 'target' are FLOAT; cross_entropy takes integer class indices"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_clear_error(case: str) -> None:
    kwargs, message = BAD[case]
    kwargs = dict(kwargs)
    model = MODELS / kwargs.pop("model", "mlp.onnx")
    with pytest.raises(ValueError) as e:
        make_train_step(model, kwargs.pop("loss"), **kwargs)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------- lowering the preview training ops
def _node_cases() -> dict[str, Any]:
    """onnx's node tests for the ai.onnx.preview.training optimizers (importing the case modules runs them)."""
    import onnx.backend.test.case.node as node_cases
    from onnx.backend.test.case.node import adagrad, adam, momentum  # noqa: F401

    return {c.name: c for c in node_cases._NodeTestCases}


NODE_TESTS = ["test_adam", "test_adam_multiple", "test_momentum", "test_momentum_multiple", "test_nesterov_momentum",
              "test_adagrad", "test_adagrad_multiple"]


@pytest.mark.parametrize("name", NODE_TESTS)
def test_lowered_node_test_runs_in_onnxruntime(name: str) -> None:
    case = _node_cases()[name]
    with pytest.raises(Exception, match=r"preview\.training|NOT_IMPLEMENTED|not a registered"):
        ort.InferenceSession(case.model.SerializeToString(), providers=["CPUExecutionProvider"])
    m = ir.serde.deserialize_model(case.model)
    assert lower_optimizer_ops(m) == 1
    model = ir.serde.serialize_model(m)
    standard_ops_only(model)
    sess = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    for inputs, outputs in case.data_sets:
        got = sess.run(None, {i.name: a for i, a in zip(sess.get_inputs(), inputs, strict=True)})
        for g, want in zip(got, outputs, strict=True):
            np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("t", [0, 5])
@pytest.mark.parametrize("name", ["test_adam_multiple", "test_momentum_multiple", "test_nesterov_momentum",
                                  "test_adagrad_multiple"])
def test_lowered_ops_match_reference_evaluator(name: str, t: int) -> None:
    """The node tests all use T = 0; onnx's reference evaluator checks the bias correction and decay at T > 0."""
    from onnx.reference import ReferenceEvaluator

    case = _node_cases()[name]
    rng = np.random.default_rng(t)
    feeds = {}
    for vi in case.model.graph.input:
        dims = [d.dim_value for d in vi.type.tensor_type.shape.dim]
        if vi.type.tensor_type.elem_type == TensorProto.INT64:
            feeds[vi.name] = np.asarray(t, np.int64)
        elif vi.name.startswith("H"):  # second moments are non-negative
            feeds[vi.name] = rng.random(dims).astype(np.float32)
        else:
            feeds[vi.name] = rng.standard_normal(dims).astype(np.float32)
    want = ReferenceEvaluator(case.model).run(None, feeds)
    m = ir.serde.deserialize_model(case.model)
    lower_optimizer_ops(m)
    got = ort.InferenceSession(ir.serde.serialize_model(m).SerializeToString(),
                               providers=["CPUExecutionProvider"]).run(None, feeds)
    for g, w in zip(got, want, strict=True):
        np.testing.assert_allclose(g, np.asarray(w, np.float32), rtol=2e-6, atol=1e-7)


def test_lower_command_lowers_optimizers(cli: Cli, tmp_path: Path) -> None:
    """`onnxgrad lower` rewrites the optimizer ops too; the result runs in onnxruntime and matches."""
    case = _node_cases()["test_adam_multiple"]
    src, out = tmp_path / "adam.onnx", tmp_path / "lowered.onnx"
    src.write_bytes(case.model.SerializeToString())
    r = cli("lower", src, "-o", out)
    assert (r.code, r.out) == (0, f"lowered 0 Gradient nodes and 1 optimizer node; wrote {out}\n"), r.err
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    inputs, outputs = case.data_sets[0]
    got = sess.run(None, {i.name: a for i, a in zip(sess.get_inputs(), inputs, strict=True)})
    for g, want in zip(got, outputs, strict=True):
        np.testing.assert_allclose(g, want, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("mode", ["EVAL", "TRAINING"])
def test_params_an_exporter_merged_get_a_note(mode: str) -> None:
    """A fresh nn.TransformerEncoder's two layers are copies: exported in eval mode, PyTorch merges parameters of
    equal value into one initializer each, which the train step would train as one tied weight (a note says so
    and how to export them apart); exported in training mode they stay apart, and no note comes."""
    import io
    import warnings

    from onnxgrad.api import GradientNote

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
    module = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module, (torch.randn(2, 3, 8),), buf, input_names=["x"], output_names=["y"],
                          opset_version=17, dynamo=False, training=getattr(torch.onnx.TrainingMode, mode))
    model = onnx.load_from_string(buf.getvalue())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_train_step(model, "mse:y:target")
    tied = [str(w.message) for w in caught if issubclass(w.category, GradientNote) and "tied" in str(w.message)]
    if mode == "EVAL":
        assert len(model.graph.initializer) < len(list(module.parameters()))
        assert tied and all("TrainingMode.TRAINING" in t for t in tied), tied
    else:
        assert len(model.graph.initializer) == len(list(module.parameters()))
        assert not tied, tied


class _WithBuffer(torch.nn.Module):
    """A parameter-free float buffer beside the parameters, as rotary embeddings keep their frequencies."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = torch.nn.Linear(6, 4)
        self.norm = torch.nn.LayerNorm(4)
        self.register_buffer("freq", torch.tensor([0.5, 1.0, 2.0, 4.0]))

    def forward(self, x: Any) -> Any:
        return self.norm(self.lin(x) * torch.cos(self.freq))


def _steps_against_torch(step: Any, module: Any, opt: Any, lr: float, steps: int, batch: dict[str, np.ndarray],
                         torch_loss: Any) -> dict[str, np.ndarray]:
    """``steps`` train steps on ``batch`` beside as many of ``opt`` on torch's ``torch_loss()``: each loss within
    1e-5, every param within 1e-4 at the end; returns the train step's params and state after."""
    sess = ort.InferenceSession(step.model.SerializeToString(), providers=["CPUExecutionProvider"])
    values, names = dict(step.initial), [o.name for o in sess.get_outputs()]
    for k in range(steps):
        feeds = {**batch, step.lr: np.asarray(lr, np.float32), **values}
        if step.step:
            feeds[step.step] = np.asarray(k + 1, np.int64)
        out = dict(zip(names, sess.run(None, {i.name: feeds[i.name] for i in sess.get_inputs()}), strict=True))
        values |= {i: out[o] for i, o in [*step.params.values(), *step.state.values()]}
        opt.zero_grad()
        loss = torch_loss()
        loss.backward()
        opt.step()
        np.testing.assert_allclose(out[step.loss], loss.item(), rtol=1e-5)
    for name, p in module.named_parameters():
        np.testing.assert_allclose(values[step.params[name][0]], p.detach().numpy(), rtol=1e-4, atol=1e-5)
    return values


def test_dynamo_export_trains_the_parameters_not_the_buffers() -> None:
    """PyTorch's dynamo exporter lifts buffers into initializers too, marking each with torch.export's kind: the
    default params are the module's parameters (a note names the buffer left out), and 5 AdamW steps follow
    torch.optim's (the buffer trained as a weight would not)."""
    import warnings

    from onnxgrad.api import GradientNote

    torch.manual_seed(0)
    module = _WithBuffer()
    x, target = torch.randn(3, 6), torch.randn(3, 4)
    model = export_dynamo(module, tuple(x.shape), 18, {}, optimize=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = make_train_step(model, "mse:y:target", optimizer="adamw", lr=0.05)
    notes = [str(w.message) for w in caught if issubclass(w.category, GradientNote)]
    assert set(step.params) == {n for n, _ in module.named_parameters()}
    assert any("'freq' (buffer)" in n for n in notes), notes
    _steps_against_torch(step, module, torch.optim.AdamW(module.parameters(), lr=0.05), 0.05, 5,
                         {"x": x.numpy(), "target": target.numpy()},
                         lambda: torch.nn.functional.mse_loss(module(x), target))


def test_optimized_dynamo_export_gets_a_note() -> None:
    """By default the dynamo exporter runs onnxscript's optimizer, which folds tensors into new initializers (the
    Linear's weight transposed, cos of the buffer): they would train as weights of their own, and a note says how
    to export the parameters as they are."""
    import warnings

    from onnxgrad.api import GradientNote

    torch.manual_seed(0)
    model = export_dynamo(_WithBuffer(), (3, 6), 18, {})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        make_train_step(model, "mse:y:target")
    notes = [str(w.message) for w in caught if issubclass(w.category, GradientNote)]
    assert any("folded" in n and "optimize=False" in n for n in notes), notes


@pytest.mark.parametrize("batchnorm", ["train", "eval"])
def test_running_statistics_the_exporter_tied_get_their_own(batchnorm: str) -> None:
    """A fresh BatchNorm's running mean (zeros) and variance (ones) equal its bias and scale: PyTorch's exporter
    (TrainingMode.PRESERVE, eval mode) writes them as Identities of those params. Each gets its own initializer
    (a note says so), so the train step keeps PyTorch's semantics: 4 SGD steps equal torch's, in training mode
    (the running statistics updated as state) and in eval mode (constant statistics, the bias trained alone)."""
    import copy
    import io
    import warnings

    from onnxgrad.api import GradientNote

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                              torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 5)).eval()
    x, labels = torch.randn(8, 3, 6, 6), torch.randint(0, 5, (8,))
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(net, (x,), buf, dynamo=False, training=torch.onnx.TrainingMode.PRESERVE,
                          input_names=["x"], output_names=["y"], opset_version=17)
    model = onnx.load_from_string(buf.getvalue())
    assert [n.op_type for n in model.graph.node].count("Identity") == 2  # the exporter's ties
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        step = make_train_step(model, "cross_entropy:y:labels", optimizer="sgd", lr=0.1, batchnorm=batchnorm)
    notes = [str(w.message) for w in caught if issubclass(w.category, GradientNote)]
    assert sum("tied to" in n for n in notes) == 2, notes
    assert set(step.params) == {n for n, _ in net.named_parameters()}
    ref = copy.deepcopy(net).train(batchnorm == "train")
    values = _steps_against_torch(step, ref, torch.optim.SGD(ref.parameters(), lr=0.1), 0.1, 4,
                                  {"x": x.numpy(), "labels": labels.numpy()},
                                  lambda: torch.nn.functional.cross_entropy(ref(x), labels))
    if batchnorm == "train":
        for name in ("1.running_mean", "1.running_var"):
            np.testing.assert_allclose(values[step.state[name][0]], ref.state_dict()[name].numpy(), rtol=1e-5,
                                       atol=1e-6)


class _Padded(torch.nn.Module):
    """Token embeddings with a padding row (as BERT's), summed over the sequence, into a Linear."""

    def __init__(self) -> None:
        super().__init__()
        self.emb, self.lin = torch.nn.Embedding(12, 5, padding_idx=0), torch.nn.Linear(5, 3)

    def forward(self, ids: Any) -> Any:
        return self.lin(self.emb(ids).sum(1))


def test_embedding_padding_row_keeps_no_gradient() -> None:
    """nn.Embedding(padding_idx=0) exports as a plain Gather; the dynamo exporter's node metadata still names the
    index, and the train step keeps that row's gradient at zero as PyTorch does: 4 AdamW steps on a padded batch
    follow torch.optim (the padding row trained before)."""
    import contextlib
    import io
    import warnings

    from onnxgrad.train import padding_rows

    torch.manual_seed(0)
    module = _Padded()
    ids, target = torch.tensor([[3, 7, 0, 0], [5, 1, 2, 0]]), torch.randn(2, 3)
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        model = torch.onnx.export(module, (ids,), dynamo=True, opset_version=18, optimize=False, input_names=["ids"],
                                  output_names=["y"]).model_proto
    step = make_train_step(model, "mse:y:target", optimizer="adamw", lr=0.05)
    graph = ir.serde.deserialize_model(model).graph
    assert padding_rows(graph.initializers["emb.weight"]) == [0]
    assert padding_rows(graph.initializers["lin.weight"]) == []
    values = _steps_against_torch(step, module, torch.optim.AdamW(module.parameters(), lr=0.05), 0.05, 4,
                                  {"ids": ids.numpy(), "target": target.numpy()},
                                  lambda: torch.nn.functional.mse_loss(module(ids), target))
    start = step.initial[step.params["emb.weight"][0]]
    np.testing.assert_allclose(values[step.params["emb.weight"][0]][0], start[0] * (1 - 0.05 * 0.01) ** 4, rtol=1e-6)
