"""``onnxgrad train-step`` and ``onnxgrad train``: the layout JSON, a run end to end (metrics, checkpoint, export),
resume equal to an uninterrupted run, checkpoints that stay whole when a write fails or the process is killed, and
one-line errors for bad input."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import numpy_helper

import onnxgrad.cli.train_cmd  # noqa: F401  (registers the commands)
from onnxgrad import train as train_module
from onnxgrad.train import make_train_step, read_layout
from onnxgrad.trainer import CHECKPOINT_KEY, METRICS_COLUMNS, TrainConfig, load_checkpoint, train
from tests.conftest import Cli

MODELS = Path(__file__).resolve().parent.parent / "models"
ROOT = MODELS.parent


def mlp_data(path: Path, n: int = 200, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, 4)).astype(np.float32)
    np.savez(path, x=x, target=np.sin(x[:, :3]).astype(np.float32))
    return path


def cnn_data(path: Path, n: int = 50, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    image = rng.standard_normal((n, 1, 8, 8)) + labels[:, None, None, None]
    np.savez(path, image=image.astype(np.float32), labels=labels.astype(np.int64))
    return path


def test_train_step_json_layout(cli: Cli, tmp_path: Path) -> None:
    """--json prints where everything is; the initial file holds every param and state input; the model runs."""
    out = tmp_path / "step.onnx"
    r = cli("train-step", MODELS / "cnn.onnx", "-o", out, "--loss", "loss", "--optimizer", "adam", "--lr", "0.01",
            "--json")
    assert r.code == 0, r.err
    layout = json.loads(r.out)
    assert set(layout) == {"loss", "lr", "step", "data", "params", "state", "initial", "outputs", "seed", "apply",
                           "buffers"}
    assert (layout["loss"], layout["lr"], layout["step"], layout["data"]) == ("loss", "lr", "step", ["image", "labels"])
    model = onnx.load(out)
    floats = [t.name for t in onnx.load(MODELS / "cnn.onnx").graph.initializer if t.data_type == onnx.TensorProto.FLOAT]
    assert sorted(layout["params"]) == sorted(w for w in floats if "running" not in w)
    assert layout["buffers"] == ["bn1.running_mean", "bn1.running_var"]
    assert {"optim/conv1.weight/exp_avg", "optim/conv1.weight/exp_avg_sq", *layout["buffers"]} <= set(layout["state"])
    assert read_layout(model)["initial"] == "step.initial.npz"
    with np.load(layout["initial"]) as init:
        assert set(init.files) == {*layout["params"], *layout["state"]}
        values = {k: init[k] for k in init.files}
    feeds = {"image": np.ones((4, 1, 8, 8), np.float32), "labels": np.arange(4) % 3, **values,
             "lr": np.asarray(0.01, np.float32), "step": np.asarray(1, np.int64)}
    sess = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"])
    outs = sess.run([layout["loss"], *[new for _, new in layout["params"].values()]], feeds)
    assert np.isfinite(outs[0]) and outs[0].shape == ()


def test_train_end_to_end(cli: Cli, tmp_path: Path) -> None:
    """Train, log, checkpoint and export; the exported inference model holds the trained weights."""
    step = tmp_path / "step.onnx"
    assert cli("train-step", MODELS / "mlp.onnx", "-o", step, "--loss", "loss", "--optimizer", "adamw",
               "--lr", "0.02").code == 0
    data = mlp_data(tmp_path / "data.npz")
    ckpt, log, exported = tmp_path / "ckpt.npz", tmp_path / "log.csv", tmp_path / "trained.onnx"
    r = cli("train", step, "--data", data, "--epochs", "3", "--batch-size", "16", "--checkpoint", ckpt,
            "--metrics", log, "--export", exported, "--schedule", "cosine", "--warmup", "3", "--json")
    assert r.code == 0, r.err
    summary = json.loads(r.out)
    assert summary["updates"] == 3 * 13 and summary["epoch_losses"][-1] < 0.5 * summary["epoch_losses"][0]
    with open(log, newline="") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == METRICS_COLUMNS and [int(r["update"]) for r in rows] == list(range(1, 40))
    assert float(rows[0]["lr"]) == pytest.approx(0.02 / 3) and float(rows[-1]["lr"]) < 0.001
    values, meta = load_checkpoint(ckpt)
    assert (meta["update"], meta["epoch"], meta["batch"]) == (39, 3, 0)
    trained = {t.name: numpy_helper.to_array(t) for t in onnx.load(exported).graph.initializer}
    original = onnx.load(MODELS / "mlp.onnx")
    assert [i.name for i in original.graph.output] == [o.name for o in onnx.load(exported).graph.output]
    for name in ("W1", "b1", "W2", "b2"):
        np.testing.assert_array_equal(trained[name], values[name])
    with np.load(data) as d:
        feeds = {"x": d["x"], "target": d["target"]}
    before = ort.InferenceSession(str(MODELS / "mlp.onnx"), providers=["CPUExecutionProvider"]).run(["loss"], feeds)
    after = ort.InferenceSession(str(exported), providers=["CPUExecutionProvider"]).run(["loss"], feeds)
    assert after[0] < 0.5 * before[0]


# (model, train-step options, data maker, train options)
RESUME_CASES: dict[str, tuple[str, dict[str, Any], Any, dict[str, Any]]] = {
    "cnn-batchnorm-adam": ("cnn.onnx", {"optimizer": "adam", "lr": 0.01}, cnn_data, {"batch_size": 8}),
    "mlp-accumulate-sgd": ("mlp.onnx", {"optimizer": "sgd", "lr": 0.05, "momentum": 0.9, "accumulate": True},
                           mlp_data, {"batch_size": 16, "accumulate": 3}),
}


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_resume_equals_uninterrupted(tmp_path: Path, case: str) -> None:
    """Stopped after update 10 (Ctrl-C: a checkpoint of that update is written), then resumed: the same final
    values as a run never stopped, and a metrics log with every update once."""
    model, build, make_data, options = RESUME_CASES[case]
    ts = make_train_step(MODELS / model, "loss", **build)
    step = tmp_path / "step.onnx"
    ts.save(step)
    data = make_data(tmp_path / "data.npz")
    whole = train(step, data, TrainConfig(epochs=3, schedule="cosine", **options))

    def stop_at_10(update: int, loss: float) -> None:
        if update == 10:
            raise KeyboardInterrupt

    ckpt, log = tmp_path / "ckpt.npz", tmp_path / "log.csv"
    config = TrainConfig(epochs=3, schedule="cosine", checkpoint=ckpt, metrics=log, **options)
    with pytest.raises(KeyboardInterrupt):
        train(step, data, TrainConfig(**{**config.__dict__, "on_update": stop_at_10}))
    assert load_checkpoint(ckpt)[1]["update"] == 10
    with open(log, "a") as f:  # a row written after the checkpoint, as a killed run may leave
        f.write("11,2,1,0.5,0.01,8,100.0,1.0\n")
    rest = train(step, data, TrainConfig(**{**config.__dict__, "resume": True}))
    assert rest.updates == whole.updates - 10
    for name, value in whole.values.items():
        np.testing.assert_array_equal(rest.values[name], value, err_msg=name)
    with open(log, newline="") as f:
        assert [int(r["update"]) for r in csv.DictReader(f)] == list(range(1, whole.updates + 1))


def test_failed_checkpoint_write_keeps_the_old_one(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint write that fails half-way (disk full) leaves the previous checkpoint whole, and no stray file."""
    ts = make_train_step(MODELS / "mlp.onnx", "loss", optimizer="sgd", lr=0.05)
    step = tmp_path / "step.onnx"
    ts.save(step)
    data = mlp_data(tmp_path / "data.npz")
    ckpt = tmp_path / "ckpt.npz"
    train(step, data, TrainConfig(epochs=1, batch_size=50, checkpoint=ckpt))
    before = ckpt.read_bytes()
    real = np.savez

    def half_then_fail(f: Any, **arrays: np.ndarray) -> None:
        real(f, **dict(list(arrays.items())[:2]))
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(train_module.np, "savez", half_then_fail)
    with pytest.raises(OSError, match="No space left"):
        train(step, data, TrainConfig(epochs=2, batch_size=50, checkpoint=ckpt, resume=True))
    assert ckpt.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt.npz", "data.npz", "step.initial.npz", "step.onnx"]


def _cli_process(*args: str | Path) -> subprocess.Popen[str]:
    code = "import onnxgrad.cli.train_cmd; from onnxgrad.cli import main; main()"
    env = {**os.environ, "PYTHONPATH": os.fspath(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def _wait_for(path: Path, proc: subprocess.Popen[str], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no checkpoint appeared"
        time.sleep(0.05)


def test_interrupted_and_killed_train_keep_the_checkpoint_whole(tmp_path: Path) -> None:
    """Ctrl-C stops between steps with a checkpoint and one line; kill -9 in the middle of frequent checkpoint
    writes leaves the last one whole; training resumes from it either way."""
    ts = make_train_step(MODELS / "mlp.onnx", "loss", optimizer="adam", lr=0.01)
    step = tmp_path / "step.onnx"
    ts.save(step)
    data = mlp_data(tmp_path / "data.npz", n=2000)
    ckpt = tmp_path / "ckpt.npz"
    args = ("train", step, "--data", data, "--epochs", "1000", "--batch-size", "1", "--checkpoint", ckpt,
            "--checkpoint-every", "50", "--no-progress")
    proc = _cli_process(*args)
    _wait_for(ckpt, proc)
    time.sleep(0.3)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 1
    lines = [line for line in err.splitlines() if line]  # click ends the ^C line first
    assert lines[-1] == "onnxgrad: aborted" and lines[-2].startswith("interrupted after update ")
    values, meta = load_checkpoint(ckpt)
    assert meta["update"] == int(lines[-2].split()[3].rstrip(";")) and set(ts.initial) <= set(values)

    proc = _cli_process(*args, "--resume")
    stamp = ckpt.stat().st_mtime_ns
    deadline = time.monotonic() + 60
    while ckpt.stat().st_mtime_ns == stamp:  # resumed, and writing checkpoints again
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.05)
    time.sleep(0.5)
    assert proc.poll() is None
    proc.kill()  # SIGKILL: no handler runs, a write in progress stops where it is
    proc.communicate(timeout=60)
    values, later = load_checkpoint(ckpt)
    assert later["update"] > meta["update"] and set(ts.initial) <= set(values)
    assert all(p.name.endswith(".tmp") for p in tmp_path.iterdir() if p.name.startswith("."))  # only a temp file
    with np.load(ckpt) as archive:  # every array reads back in full
        assert all(np.all(np.isfinite(archive[k])) for k in archive.files if k != CHECKPOINT_KEY)


# ------------------------------------------------------------------------------------------ bad input
def _bad_labels(path: Path) -> Path:
    rng = np.random.default_rng(0)
    np.savez(path, image=rng.standard_normal((10, 1, 8, 8)).astype(np.float32), labels=rng.random(10))
    return path


def _missing_target(path: Path) -> Path:
    np.savez(path, x=np.zeros((10, 4), np.float32))
    return path


def _uneven(path: Path) -> Path:
    np.savez(path, x=np.zeros((10, 4), np.float32), target=np.zeros((9, 3), np.float32))
    return path


def _wrong_shape(path: Path) -> Path:
    np.savez(path, x=np.zeros((10, 5), np.float32), target=np.zeros((10, 3), np.float32))
    return path


# (model, train-step arguments, data maker or None (train-step only), train arguments, exit code, stderr)
ERRORS: dict[str, tuple[str, list[str], Any, list[str], int, str]] = {
    "non-scalar-loss": ("mlp.onnx", ["--loss", "pred"], None, [], 1,
                        "the loss 'pred' has shape [batch, 3]; a loss must be a scalar: reduce it to one number "
                        "(ReduceMean), or append one with --loss mse:PRED:TARGET or cross_entropy:LOGITS:LABELS"),
    "integer-params": ("cnn.onnx", ["--loss", "loss", "--params", "flat_shape"], None, [], 1,
                       "params: 'flat_shape' is INT64; only float weights (float16, bfloat16, float32, float64) "
                       "can be trained"),
    "missing-model": ("nowhere.onnx", ["--loss", "loss"], None, [], 1, "model file 'MODELS/nowhere.onnx' not found"),
    "data-missing-an-input": ("mlp.onnx", ["--loss", "loss"], _missing_target, [], 1,
                              "the data file 'DATA' has no array for input 'target' (it has x); the train step "
                              "takes x, target"),
    "dtype-clash": ("cnn.onnx", ["--loss", "loss"], _bad_labels, [], 1,
                    "the data file 'DATA': array 'labels' is float64, but the train step's input 'labels' is int64: "
                    "convert it (e.g. numpy's .astype('int64'))"),
    "uneven-sample-counts": ("mlp.onnx", ["--loss", "loss"], _uneven, [], 1,
                             "the data file 'DATA': the arrays hold different numbers of samples: x 10, target 9"),
    "wrong-feature-size": ("mlp.onnx", ["--loss", "loss"], _wrong_shape, [], 1,
                           "the data file 'DATA': array 'x' has shape [10, 5], but the train step's input 'x' has "
                           "shape [batch, 4] (the first axis indexes samples)"),
    "resume-without-checkpoint": ("mlp.onnx", ["--loss", "loss"], mlp_data, ["--resume"], 2,
                                  "--resume needs --checkpoint CKPT.npz"),
    "accumulate-without-apply": ("mlp.onnx", ["--loss", "loss"], mlp_data, ["--accumulate", "2"], 1,
                                 "--accumulate needs a train step built for it (train-step --accumulate)"),
}


@pytest.mark.parametrize("case", list(ERRORS))
def test_bad_input_one_line(cli: Cli, tmp_path: Path, case: str) -> None:
    model, step_args, make_data, train_args, code, message = ERRORS[case]
    step = tmp_path / "step.onnx"
    r = cli("train-step", MODELS / model, "-o", step, *step_args)
    if make_data is not None:
        assert r.code == 0, r.err
        data = make_data(tmp_path / "data.npz")
        r = cli("train", step, "--data", data, *train_args)
        message = message.replace("DATA", str(data))
    message = message.replace("MODELS", str(MODELS))
    assert (r.code, r.err) == (code, f"onnxgrad: error: {message}\n")
    if make_data is None:
        assert not step.exists()


def test_train_rejects_an_inference_model(cli: Cli, tmp_path: Path) -> None:
    r = cli("train", MODELS / "mlp.onnx", "--data", mlp_data(tmp_path / "d.npz"))
    assert r.code == 1
    assert r.err == ("onnxgrad: error: the model has no 'onnxgrad.train_step' metadata: it is not a train-step "
                     "model (make one with 'onnxgrad train-step')\n")


@pytest.mark.parametrize(("schedule", "warmup", "expected"), [
    ("constant", 0, [1.0, 1.0, 1.0, 1.0, 1.0]),
    ("constant", 2, [0.5, 1.0, 1.0, 1.0, 1.0]),
    ("linear", 0, [1.0, 0.8, 0.6, 0.4, 0.2]),
    ("cosine", 1, [1.0, 1.0, 0.5 * (1 + np.cos(np.pi / 4)), 0.5, 0.5 * (1 + np.cos(3 * np.pi / 4))]),
])
def test_learning_rate_schedules(schedule: str, warmup: int, expected: list[float]) -> None:
    from onnxgrad.trainer import learning_rate

    got = [learning_rate(1.0, schedule, warmup, t, 5) for t in range(5)]
    np.testing.assert_allclose(got, expected, rtol=1e-12)


@pytest.mark.parametrize("clip", [None, 1.0])
def test_bindings_step_from_copies_of_the_values(clip: float | None) -> None:
    """The loop's buffers are copies of the values it is given (on the CPU an OrtValue wraps the array it is made
    from: one array for both sets made each step write its outputs over the inputs it was still reading, and
    change the caller's arrays). A value gets one buffer, written over in place, only where every node that reads
    it is an ancestor of the node computing its new value: without clipping, not the weights that an input
    gradient reads (W2's; W1 feeds no input gradient); with clipping by global norm, every param. Five steps equal
    five plain runs."""
    from onnxgrad.trainer import _Bindings, in_place

    step = make_train_step(str(MODELS / "mlp.onnx"), "loss", optimizer="adamw", lr=0.01, clip_grad_norm=clip)
    sess = ort.InferenceSession(step.model.SerializeToString(), providers=["CPUExecutionProvider"])
    pairs = [*step.params.values(), *step.state.values()]
    shared = in_place(step.model, pairs)
    separate = {name for name, _ in pairs} - shared
    assert separate == (set() if clip else {step.params["W2"][0]})
    rng = np.random.default_rng(0)
    data = {"x": rng.standard_normal((8, 4)).astype(np.float32),
            "target": rng.standard_normal((8, 3)).astype(np.float32)}
    given = {k: v.copy() for k, v in step.initial.items()}
    bindings = _Bindings(sess, pairs, given, "cpu", [step.loss], shared)
    for name, _ in pairs:
        same = bindings.buffers[0][name].data_ptr() == bindings.buffers[1][name].data_ptr()
        assert same == (name in shared), name
    values, names = dict(step.initial), [o.name for o in sess.get_outputs()]
    for k in range(5):
        feeds = {**data, step.lr: np.asarray(0.01, np.float32)}
        if step.step:
            feeds[step.step] = np.asarray(k + 1, np.int64)
        got = bindings.run(feeds)[0]
        out = dict(zip(names, sess.run(None, {**feeds, **values}), strict=True))
        values |= {i: out[o] for i, o in pairs}
        assert got == out[step.loss]
    assert all(np.array_equal(given[k], step.initial[k]) for k in given)
    for name, array in bindings.values().items():
        np.testing.assert_array_equal(array, values[name])


@pytest.mark.parametrize(("optimizer", "hyper", "accumulate"), [
    ("sgd", {"momentum": 0.9, "nesterov": True, "weight_decay": 0.01}, False),
    ("adagrad", {"weight_decay": 0.01}, False),
    ("adam", {"amsgrad": True, "weight_decay": 0.01}, False),
    ("adamw", {}, True),
], ids=["sgd-nesterov", "adagrad", "adam-amsgrad", "adamw-accumulate"])
def test_in_place_buffers_equal_plain_runs(optimizer: str, hyper: dict[str, Any], accumulate: bool) -> None:
    """Whatever the optimizer writes last, the buffers ``in_place`` shares give the plain runs' values."""
    from onnxgrad.trainer import _Bindings, in_place

    step = make_train_step(str(MODELS / "mlp.onnx"), "loss", optimizer=optimizer, lr=0.01, accumulate=accumulate,
                           **hyper)
    sess = ort.InferenceSession(step.model.SerializeToString(), providers=["CPUExecutionProvider"])
    pairs = [*step.params.values(), *step.state.values()]
    shared = in_place(step.model, pairs)
    assert {step.params["W1"][0], step.params["b2"][0]} <= shared  # read by no input gradient
    bindings = _Bindings(sess, pairs, step.initial, "cpu", [step.loss], shared)
    values, names = dict(step.initial), [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(1)
    for k in range(4):
        feeds = {"x": rng.standard_normal((8, 4)).astype(np.float32),
                 "target": rng.standard_normal((8, 3)).astype(np.float32), step.lr: np.asarray(0.01, np.float32)}
        if step.step:
            feeds[step.step] = np.asarray(k + 1, np.int64)
        if step.apply:
            feeds[step.apply] = np.asarray(k % 2 == 1)
        got = bindings.run(feeds)[0]
        out = dict(zip(names, sess.run(None, {**feeds, **values}), strict=True))
        values |= {i: out[o] for i, o in pairs}
        assert got == out[step.loss]
    for name, array in bindings.values().items():
        np.testing.assert_array_equal(array, values[name])
