"""The command line (grad, run, ops), model file handling, the bundled model and the README's examples."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto
from onnx import helper as oh

from onnxgrad import registry, runtime
from onnxgrad.io import ModelFileError, load_model, save_model
from onnxgrad.runtime import run
from tests.conftest import Cli

ROOT = Path(__file__).resolve().parents[1]
MLP = ROOT / "models" / "mlp.onnx"
XS = ["W1", "b1", "W2", "b2", "x"]
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()




def console_script() -> list[str]:
    """The installed ``onnxgrad`` entry point (or the same through the interpreter)."""
    script = Path(sys.executable).parent / "onnxgrad"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-c", "from onnxgrad.cli import main; main()"]


def mlp_feeds(batch: int = 3, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {"x": rng.standard_normal((batch, 4)).astype(np.float32),
            "target": rng.standard_normal((batch, 3)).astype(np.float32)}


def mlp_reference(feeds: dict[str, np.ndarray], dpred: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """The MLP's gradients by hand in float64 (``dpred`` overrides d loss/d pred, i.e. a seed on pred)."""
    w = {i.name: onnx.numpy_helper.to_array(i).astype(np.float64) for i in onnx.load(MLP).graph.initializer}
    x, target = feeds["x"].astype(np.float64), feeds["target"].astype(np.float64)
    h = np.tanh(x @ w["W1"] + w["b1"])
    pred = h @ w["W2"] + w["b2"]
    if dpred is None:
        dpred = 2.0 * (pred - target) / pred.size
    dz1 = (dpred @ w["W2"].T) * (1.0 - h * h)
    return {"W1": x.T @ dz1, "b1": dz1.sum(0), "W2": h.T @ dpred, "b2": dpred.sum(0), "x": dz1 @ w["W1"].T,
            "loss": np.mean((pred - target) ** 2), "h": h}


def outputs_of(path: Path) -> list[str]:
    return [o.name for o in onnx.load(path).graph.output]


def listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


# ---------------------------------------------------------------------------------------------- grad
def test_grad_bundled_model(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "mlp_grad.onnx"
    before = MLP.read_bytes()
    r = cli("grad", MLP, "-o", out, "--ys", "loss", *[a for x in XS for a in ("--xs", x)], "--json")
    assert r.code == 0, r.err
    assert r.err == ""
    payload = json.loads(r.out)
    assert set(payload) == {"gradients", "new_inputs"}
    assert payload == {"gradients": {x: f"gradients/{x}_grad" for x in XS}, "new_inputs": []}
    assert MLP.read_bytes() == before
    onnx.checker.check_model(str(out), full_check=True)
    original, augmented = onnx.load(MLP), onnx.load(out)
    # the original outputs first, unchanged, then one output per x in order
    n = len(original.graph.output)
    assert [o.SerializeToString() for o in augmented.graph.output[:n]] == [
        o.SerializeToString() for o in original.graph.output]
    assert outputs_of(out)[n:] == [f"gradients/{x}_grad" for x in XS]
    for batch in (1, 5):
        feeds = mlp_feeds(batch)
        want, got = run(original, feeds), run(augmented, feeds)
        for name in ("loss", "pred"):
            assert np.array_equal(want[name], got[name])  # bitwise
        ref = mlp_reference(feeds)
        for x in XS:
            np.testing.assert_allclose(got[f"gradients/{x}_grad"], ref[x], rtol=1e-4, atol=1e-6)


def test_grad_human_summary(cli: Cli, tmp_path: Path) -> None:
    r = cli("grad", MLP, "-o", tmp_path / "g.onnx", "--ys", "loss", "--xs", "W2", "--xs", "W1", "--xs", "x",
            "--stop-gradients", "h", "--grad-ys", "loss=input")
    assert r.code == 0, r.err
    assert "gradients/W2_grad  float32[8,3]" in r.out
    assert re.search(r"W1\s+->\s+none", r.out) and re.search(r"x\s+->\s+none", r.out)
    assert "new input: gradients/loss_seed  float32[]" in r.out


@dataclass
class GradCase:
    """One ``onnxgrad grad`` run on the bundled model and the gradients it must give.

    ``args`` may use ``{tmp}``; ``expect(ref)`` maps each x to its gradient (None: no output)."""

    id: str
    args: list[str]
    expect: Callable[[dict[str, Any]], dict[str, np.ndarray | None]]
    feeds: dict[str, np.ndarray] = field(default_factory=dict)
    dpred: Callable[[dict[str, np.ndarray]], np.ndarray] | None = None
    new_inputs: list[str] = field(default_factory=list)
    prefix: str = "gradients/"


GRAD_CASES = [
    GradCase("default", ["--ys", "loss", "--xs", "W2", "--xs", "b2"], lambda r: {"W2": r["W2"], "b2": r["b2"]}),
    GradCase("grad-ys-value", ["--ys", "pred", "--grad-ys", "pred=target", "--xs", "W2", "--xs", "b1"],
             lambda r: {"W2": r["W2"], "b1": r["b1"]}, dpred=lambda f: f["target"].astype(np.float64)),
    GradCase("grad-ys-npy", ["--ys", "loss", "--grad-ys", "loss={tmp}/seed.npy", "--xs", "W1", "--xs", "x"],
             lambda r: {"W1": 2.5 * r["W1"], "x": 2.5 * r["x"]}),
    GradCase("grad-ys-input", ["--ys", "loss", "--grad-ys", "loss=input", "--xs", "b2"],
             lambda r: {"b2": -3.0 * r["b2"]}, feeds={"gradients/loss_seed": np.array(-3.0, np.float32)},
             new_inputs=["gradients/loss_seed"]),
    GradCase("stop-gradients", ["--ys", "loss", "--xs", "W1", "--xs", "W2", "--stop-gradients", "h"],
             lambda r: {"W1": None, "W2": r["W2"]}),
    GradCase("unconnected-zero", ["--ys", "loss", "--xs", "W1", "--xs", "W2", "--stop-gradients", "h",
                                  "--unconnected-gradients", "zero"],
             lambda r: {"W1": np.zeros((4, 8)), "W2": r["W2"]}),
    GradCase("unconnected-none-target", ["--ys", "pred", "--xs", "target", "--xs", "b2"],
             lambda r: {"target": None, "b2": np.full(3, float(r["batch"]))}, dpred=lambda f: np.ones((3, 3))),
    GradCase("gate-gradients", ["--ys", "loss", "--xs", "x", "--gate-gradients"], lambda r: {"x": r["x"]}),
    GradCase("name", ["--ys", "loss", "--xs", "W1", "--name", "train"], lambda r: {"W1": r["W1"]},
             prefix="train/"),
    GradCase("two-ys", ["--ys", "loss", "--ys", "pred", "--grad-ys", "pred={tmp}/zeros.npy", "--xs", "b1"],
             lambda r: {"b1": r["b1"]}),
]


@pytest.mark.parametrize("case", GRAD_CASES, ids=lambda c: c.id)
def test_grad_options(cli: Cli, tmp_path: Path, case: GradCase) -> None:
    np.save(tmp_path / "seed.npy", np.array(2.5))
    np.save(tmp_path / "zeros.npy", np.zeros((3, 3), np.float32))
    out = tmp_path / "out.onnx"
    r = cli("grad", MLP, "-o", out, "--json", *[a.replace("{tmp}", str(tmp_path)) for a in case.args])
    assert r.code == 0, r.err
    payload = json.loads(r.out)
    feeds = mlp_feeds(3)
    ref = mlp_reference(feeds, None if case.dpred is None else case.dpred(feeds)) | {"batch": 3}
    expected = case.expect(ref)
    assert list(payload["gradients"]) == list(expected)
    assert payload["new_inputs"] == case.new_inputs
    onnx.checker.check_model(str(out), full_check=True)
    results = run(onnx.load(out), feeds | case.feeds)
    assert outputs_of(out) == ["loss", "pred", *[n for n in payload["gradients"].values() if n is not None]]
    for x, want in expected.items():
        name = payload["gradients"][x]
        if want is None:
            assert name is None
            continue
        assert name == f"{case.prefix}{x}_grad"
        np.testing.assert_allclose(results[name], want, rtol=1e-4, atol=1e-6)


def test_grad_every_aggregation_method_agrees(cli: Cli, tmp_path: Path) -> None:
    feeds = mlp_feeds(4)
    values = {}
    for method in ("add_n", "default", "experimental_tree", "experimental_accumulate_n"):
        out = tmp_path / f"{method}.onnx"
        r = cli("grad", MLP, "-o", out, "--ys", "loss", "--ys", "pred", *[a for x in XS for a in ("--xs", x)],
                "--aggregation-method", method, "--json")
        assert r.code == 0, r.err
        values[method] = run(onnx.load(out), feeds)
    first = values["add_n"]
    for method, got in values.items():
        assert list(got) == list(first), method
        for name in first:
            np.testing.assert_allclose(got[name], first[name], rtol=1e-6, atol=1e-7, err_msg=method)


def model_without_rule() -> onnx.ModelProto:
    """y = Foo(x) * x where my.ops::Foo has no rule (a model-local function, so it would run)."""
    foo = oh.make_function("my.ops", "Foo", ["a"], ["b"], [oh.make_node("Neg", ["a"], ["b"])],
                           opset_imports=[oh.make_opsetid("", 17)])
    graph = oh.make_graph(
        [oh.make_node("Foo", ["x"], ["f"], domain="my.ops", name="the_foo"), oh.make_node("Mul", ["f", "x"], ["y"])],
        "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return oh.make_model(graph, functions=[foo], ir_version=8,
                         opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("my.ops", 1)])


@dataclass
class ErrorCase:
    """A failing ``onnxgrad grad``: exit code and a fragment of the one stderr line."""

    id: str
    args: list[str]
    code: int
    message: str
    model: Callable[[Path], None] = lambda p: shutil.copy(MLP, p)


def write_bytes(data: bytes) -> Callable[[Path], None]:
    return lambda p: p.write_bytes(data)


LOSS_W2 = ["--ys", "loss", "--xs", "W2"]
ERROR_CASES = [
    ErrorCase("missing-file", LOSS_W2, 1, "not found", model=lambda p: None),
    ErrorCase("corrupt-file", LOSS_W2, 1, "is not a valid ONNX model",
              model=write_bytes(b"\x08\x08\x12\x05hello this is not onnx \xff\xff" * 4)),
    ErrorCase("empty-file", LOSS_W2, 1, "is not a valid ONNX model (an empty file)", model=write_bytes(b"")),
    ErrorCase("text-file", LOSS_W2, 1, "is not a valid ONNX model", model=write_bytes(b"not a model\n")),
    ErrorCase("unknown-ys", ["--ys", "los", "--xs", "W2"], 1, "no value named 'los' in the graph; did you mean 'loss'"),
    ErrorCase("unknown-xs", ["--ys", "loss", "--xs", "W3"], 1, "no value named 'W3'"),
    ErrorCase("unknown-stop", [*LOSS_W2, "--stop-gradients", "hh"], 1, "no value named 'hh'"),
    ErrorCase("no-rule", ["--ys", "y", "--xs", "x"], 1,
              "no gradient rule for node 'the_foo' (op_type 'Foo', domain 'my.ops', opset 1)",
              model=lambda p: onnx.save(model_without_rule(), p)),
    ErrorCase("grad-ys-no-equals", [*LOSS_W2, "--grad-ys", "loss"], 2, "expected Y=SPEC"),
    ErrorCase("grad-ys-not-a-y", [*LOSS_W2, "--grad-ys", "pred=input"], 2, "'pred' is not one of the --ys"),
    ErrorCase("grad-ys-twice", [*LOSS_W2, "--grad-ys", "loss=input", "--grad-ys", "loss=input"], 2, "given twice"),
    ErrorCase("grad-ys-missing-npy", [*LOSS_W2, "--grad-ys", "loss=nowhere/seed.npy"], 1, "not found"),
    ErrorCase("grad-ys-int-npy", [*LOSS_W2, "--grad-ys", "loss={tmp}/int.npy"], 1, "must be a float array"),
    ErrorCase("grad-ys-shape", [*LOSS_W2, "--grad-ys", "loss={tmp}/vec.npy"], 1, "has shape (5,)"),
    ErrorCase("grad-ys-bad-npy", [*LOSS_W2, "--grad-ys", "loss={tmp}/bad.npy"], 1, "cannot read"),
    ErrorCase("grad-ys-unknown-value", [*LOSS_W2, "--grad-ys", "loss=nothing"], 1, "no value named 'nothing'"),
    ErrorCase("grad-ys-wrong-dtype-value", ["--ys", "y", "--grad-ys", "y=n", "--xs", "x"], 1, "dtype",
              model=lambda p: onnx.save(int_model(), p)),
    ErrorCase("bad-aggregation", [*LOSS_W2, "--aggregation-method", "tree"], 2, "--aggregation-method"),
    ErrorCase("bad-unconnected", [*LOSS_W2, "--unconnected-gradients", "zeros"], 2, "--unconnected-gradients"),
    ErrorCase("no-xs", ["--ys", "loss"], 2, "--xs"),
    ErrorCase("out-is-input", [*LOSS_W2, "-o", "{model}"], 2, "OUT is the input model"),
]


def int_model() -> onnx.ModelProto:
    """y = x * Cast(n): an int64 input n beside a float input x."""
    graph = oh.make_graph(
        [oh.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT), oh.make_node("Mul", ["x", "nf"], ["y"])],
        "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2]),
              oh.make_tensor_value_info("n", TensorProto.INT64, [2])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2])])
    return oh.make_model(graph, ir_version=8, opset_imports=[oh.make_opsetid("", 17)])


@pytest.mark.parametrize("case", ERROR_CASES, ids=lambda c: c.id)
def test_grad_errors(cli: Cli, tmp_path: Path, case: ErrorCase) -> None:
    model, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    case.model(model)
    np.save(tmp_path / "int.npy", np.array(1, np.int64))
    np.save(tmp_path / "vec.npy", np.ones(5, np.float32))
    (tmp_path / "bad.npy").write_bytes(b"garbage")
    before = listing(tmp_path)
    args = [a.replace("{tmp}", str(tmp_path)).replace("{model}", str(model)) for a in case.args]
    if "-o" not in args:
        args += ["-o", str(out)]
    r = cli("grad", model, *args)
    assert r.code == case.code, r.err
    assert r.out == ""
    assert len(r.err.splitlines()) == 1 and r.err.startswith("onnxgrad: error: "), r.err
    assert case.message in r.err
    assert "Traceback" not in r.err
    assert listing(tmp_path) == before  # input bytes unchanged, no OUT and no temporary file left


def test_grad_failure_keeps_existing_out(cli: Cli, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out.onnx"
    out.write_bytes(b"previous contents")

    def broken_checker(*args: Any, **kwargs: Any) -> None:
        raise onnx.checker.ValidationError("Nodes in a graph must be topologically sorted,\nhowever input 'z'...")

    monkeypatch.setattr(onnx.checker, "check_model", broken_checker)
    r = cli("grad", MLP, "-o", out, *LOSS_W2)
    assert r.code == 1
    assert len(r.err.splitlines()) == 1 and "topologically sorted, however" in r.err
    assert listing(tmp_path) == {"out.onnx": b"previous contents"}


def test_grad_overwrites_out_atomically(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "sub" / "out.onnx"
    for _ in range(2):
        r = cli("grad", MLP, "-o", out, *LOSS_W2)
        assert r.code == 0, r.err
    assert sorted(p.name for p in out.parent.iterdir()) == ["out.onnx"]
    assert out.stat().st_mode & 0o644 == 0o644


# ------------------------------------------------------------------------------------------------ io
def test_load_model_errors(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        load_model(tmp_path / "nope.onnx")
    with pytest.raises(ModelFileError, match="is a directory"):
        load_model(tmp_path)
    assert load_model(MLP).graph.name == "mlp"


def test_save_model_external_data(tmp_path: Path) -> None:
    model = onnx.load(MLP)
    model.graph.initializer.append(onnx.numpy_helper.from_array(np.arange(2000, dtype=np.float32), "unused"))
    dest = tmp_path / "big.onnx"
    save_model(model, dest, external_threshold=0)  # as if the model were over 2 GB
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.onnx", "big.onnx.data"]
    onnx.checker.check_model(str(dest), full_check=True)
    assert onnx.numpy_helper.to_array(load_model(dest).graph.initializer[-1])[-1] == 1999
    feeds = mlp_feeds(2)
    assert np.array_equal(run(str(dest), feeds)["loss"], run(model, feeds)["loss"])


def test_save_model_checks_before_writing(tmp_path: Path) -> None:
    model = onnx.load(MLP)
    model.graph.node[0].input[0] = "undefined_value"
    with pytest.raises(onnx.checker.ValidationError):
        save_model(model, tmp_path / "bad.onnx")
    assert list(tmp_path.iterdir()) == []


# ----------------------------------------------------------------------------------------------- run
def test_run_summary(cli: Cli, tmp_path: Path) -> None:
    r = cli("run", MLP, "--seed", "3", "--dim", "batch=4")
    assert r.code == 0, r.err
    assert "dims: batch=4" in r.out
    assert re.search(r"^  x\s+float32\[4,4\]\s+random normal, seed 3$", r.out, re.M)
    assert re.search(r"^  loss\s+float32\[\]\s+norm \S+\s+min \S+\s+max \S+\s+\[\S+\]$", r.out, re.M)
    assert re.search(r"^  pred\s+float32\[4,3\]\s+norm .*, \.\.\.\]$", r.out, re.M)
    assert cli("run", MLP, "--seed", "3", "--dim", "batch=4").out == r.out  # seeded
    assert cli("run", MLP, "--seed", "4", "--dim", "batch=4").out != r.out


def test_run_given_inputs_and_results(cli: Cli, tmp_path: Path) -> None:
    feeds = mlp_feeds(2)
    np.save(tmp_path / "x.npy", feeds["x"].astype(np.float64))  # cast to the input's dtype
    np.savez(tmp_path / "feeds.npz", x=np.zeros((2, 4), np.float32), target=feeds["target"])
    results = tmp_path / "results.npz"
    r = cli("run", MLP, "--inputs", tmp_path / "feeds.npz", "--input", f"x={tmp_path / 'x.npy'}", "-o", results)
    assert r.code == 0, r.err
    assert "given (cast from float64)" in r.out
    assert f"wrote {results}" in r.out
    want = run(onnx.load(MLP), feeds)
    with np.load(results) as got:
        assert got.files == list(want)
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_run_gradient_model_json(cli: Cli, tmp_path: Path) -> None:
    out = tmp_path / "g.onnx"
    assert cli("grad", MLP, "-o", out, "--ys", "loss", "--xs", "W1", "--grad-ys", "loss=input").code == 0
    r = cli("run", out, "--json", "--dim", "*=2")
    assert r.code == 0, r.err
    payload = json.loads(r.out)
    assert payload["provider"] == "CPUExecutionProvider"
    assert payload["dims"] == {"batch": 2}
    assert list(payload["inputs"]) == ["x", "target", "gradients/loss_seed"]
    assert payload["inputs"]["gradients/loss_seed"]["shape"] == []
    assert list(payload["outputs"]) == ["loss", "pred", "gradients/W1_grad"]
    row = payload["outputs"]["gradients/W1_grad"]
    assert row["shape"] == [4, 8] and row["dtype"] == "float32" and len(row["values"]) == 6
    assert row["min"] <= row["values"][0] <= row["max"]


def test_run_provider_cuda(cli: Cli) -> None:
    r = cli("run", MLP, "--provider", "cuda")
    if HAS_CUDA:
        assert r.code == 0, r.err
        assert "CUDAExecutionProvider" in r.out
        return
    assert r.code == 1
    assert r.out == ""
    assert len(r.err.splitlines()) == 1
    assert "has no CUDAExecutionProvider" in r.err and "onnxruntime-gpu" in r.err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--input", "X=a.npy"], 1, "not found"),
        (["--input", "x"], 2, "expected NAME=FILE.npy"),
        (["--dim", "batch"], 2, "expected NAME=SIZE"),
        (["--dim", "batch=-1"], 2, "expected NAME=SIZE"),
        (["--provider", "tpu"], 2, "--provider"),
        (["--inputs", "missing.npz"], 1, "not found"),
    ],
    ids=["missing-npy", "input-no-equals", "dim-no-size", "dim-negative", "bad-provider", "missing-npz"],
)
def test_run_errors(cli: Cli, args: list[str], code: int, message: str) -> None:
    r = cli("run", MLP, *args)
    assert r.code == code
    assert len(r.err.splitlines()) == 1 and message in r.err, r.err


def test_run_unknown_input_name(cli: Cli, tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.zeros((1, 4), np.float32))
    r = cli("run", MLP, "--input", f"xx={tmp_path / 'a.npy'}")
    assert r.code == 1
    assert "no input named 'xx'; did you mean 'x'?" in r.err


# ----------------------------------------------------------------------------------- feeds (run and check)
def feeds_model() -> onnx.ModelProto:
    """Inputs of every kind random feeds handle: float, int, bool, float16 over two symbols, a float64 scalar."""
    infos = [oh.make_tensor_value_info("f", TensorProto.FLOAT, ["batch", 2]),
             oh.make_tensor_value_info("i", TensorProto.INT64, ["batch", 50]),
             oh.make_tensor_value_info("b", TensorProto.BOOL, [3]),
             oh.make_tensor_value_info("h", TensorProto.FLOAT16, ["n", "batch"]),
             oh.make_tensor_value_info("d", TensorProto.DOUBLE, [])]
    nodes = [oh.make_node("Identity", [v.name], [f"{v.name}_out"]) for v in infos]
    outs = [oh.make_tensor_value_info(f"{v.name}_out", v.type.tensor_type.elem_type, None) for v in infos]
    return oh.make_model(oh.make_graph(nodes, "feeds", infos, outs), opset_imports=[oh.make_opsetid("", 17)],
                         ir_version=8)


@pytest.mark.parametrize(
    ("dims", "shapes", "used"),
    [
        (None, {"f": (1, 2), "i": (1, 50), "b": (3,), "h": (1, 1), "d": ()}, {"batch": 1, "n": 1}),  # the default
        ({"*": 2}, {"f": (2, 2), "i": (2, 50), "h": (2, 2)}, {"batch": 2, "n": 2}),
        (4, {"f": (4, 2), "h": (4, 4)}, {"batch": 4, "n": 4}),
        ({"batch": 3}, {"f": (3, 2), "h": (1, 3)}, {"batch": 3, "n": 1}),
        ({"batch": 3, "*": 5}, {"f": (3, 2), "h": (5, 3)}, {"batch": 3, "n": 5}),
    ],
    ids=["default", "star", "int", "named", "named-and-star"],
)
def test_make_feeds_defaults(dims: Any, shapes: dict[str, tuple[int, ...]], used: dict[str, int]) -> None:
    """One implementation for run and check: floats normal, integers in [0, 3), bools, symbolic dimensions 1."""
    feeds = runtime.make_feeds(runtime.model_inputs(feeds_model()), seed=5, dims=dims)
    arrays = feeds.arrays
    assert list(arrays) == ["f", "i", "b", "h", "d"]
    assert {k: arrays[k].shape for k in shapes} == shapes
    assert feeds.dims == used
    assert [arrays[k].dtype for k in arrays] == [np.float32, np.int64, np.bool_, np.float16, np.float64]
    assert runtime.INT_RANGE == (0, 3) and set(np.unique(arrays["i"])) <= {0, 1, 2}
    assert feeds.sources["i"] == "random integers in [0, 3), seed 5"
    assert feeds.sources["f"] == "random normal, seed 5" and feeds.sources["b"] == "random bool, seed 5"
    again = runtime.make_feeds(runtime.model_inputs(feeds_model()), seed=5, dims=dims).arrays
    assert all(np.array_equal(arrays[k], again[k]) for k in arrays)  # seeded


def test_make_feeds_given_and_errors(tmp_path: Path) -> None:
    inputs = runtime.model_inputs(feeds_model())
    feeds = runtime.make_feeds(inputs, {"f": np.ones((7, 2)), "i": np.array([[1.0] * 50])})
    assert feeds.arrays["f"].dtype == np.float32 and feeds.arrays["f"].shape == (7, 2)
    assert feeds.arrays["i"].dtype == np.int64
    assert feeds.sources["f"] == "given (cast from float64)" and feeds.dims == {"batch": 1, "n": 1}
    with pytest.raises(runtime.FeedError, match=r"no input named 'ff'; did you mean 'f'\?"):
        runtime.make_feeds(inputs, {"ff": np.ones(2)})
    strings = oh.make_model(oh.make_graph([oh.make_node("Identity", ["s"], ["t"])], "g",
                                          [oh.make_tensor_value_info("s", TensorProto.STRING, [1])],
                                          [oh.make_tensor_value_info("t", TensorProto.STRING, [1])]))
    with pytest.raises(runtime.FeedError, match=r"cannot make random values for input 's'.*--input s=FILE\.npy"):
        runtime.make_feeds(runtime.model_inputs(strings))
    (tmp_path / "bad.npz").write_bytes(b"not a zip")
    np.save(tmp_path / "a.npy", np.ones(2))
    for npz, npy, message in [(tmp_path / "none.npz", [], "feeds file '.*none.npz' not found"),
                              (tmp_path / "bad.npz", [], "cannot read '.*bad.npz' as .npz"),
                              (None, [("f", tmp_path / "none.npy")], "input 'f': file '.*none.npy' not found"),
                              (None, [("f", tmp_path / "bad.npz")], "input 'f': cannot read '.*bad.npz' as .npy")]:
        with pytest.raises(runtime.FeedError, match=message):
            runtime.read_feeds(npz, npy)
    assert runtime.read_feeds(None, [("f", tmp_path / "a.npy")])["f"].tolist() == [1.0, 1.0]


@pytest.mark.parametrize("args", [[], ["--dim", "batch=3"], ["--dim", "*=2", "--seed", "7"]])
def test_run_feeds_are_make_feeds(cli: Cli, tmp_path: Path, args: list[str]) -> None:
    """What run feeds is what ``runtime.make_feeds`` (which check uses too) draws for the model's inputs."""
    results = tmp_path / "r.npz"
    r = cli("run", MLP, "-o", results, *args)
    assert r.code == 0, r.err
    seed = int(args[args.index("--seed") + 1]) if "--seed" in args else 0
    dims = {k: int(v) for k, _, v in (a.partition("=") for a in args[1::2] if "=" in a)} if "--dim" in args else None
    proto = onnx.load(MLP)
    want = run(proto, runtime.make_feeds(runtime.model_inputs(proto), seed=seed, dims=dims).arrays)
    with np.load(results) as got:
        for name in want:
            np.testing.assert_array_equal(got[name], want[name])


def test_run_reference_provider_agrees_with_onnxruntime(cli: Cli) -> None:
    rows = {}
    for provider in ("cpu", "reference"):
        r = cli("run", MLP, "--json", "--seed", "2", "--dim", "batch=3", "--provider", provider)
        assert r.code == 0, r.err
        rows[provider] = json.loads(r.out)
    assert rows["reference"]["provider"] == "onnx ReferenceEvaluator"
    assert rows["reference"]["inputs"] == rows["cpu"]["inputs"]
    for name, row in rows["cpu"]["outputs"].items():
        np.testing.assert_allclose(rows["reference"]["outputs"][name]["values"], row["values"], rtol=1e-5, atol=1e-6)


def _graph_model(path: Path, opset: int, nodes: list[onnx.NodeProto], out: str) -> Path:
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2])
    y = onnx.helper.make_tensor_value_info(out, onnx.TensorProto.FLOAT, [2])
    graph = onnx.helper.make_graph(nodes, "g", [x], [y])
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", opset)], ir_version=8), path)
    return path


def test_run_explains_what_onnxruntime_refuses(cli: Cli, tmp_path: Path) -> None:
    dangling = _graph_model(tmp_path / "dangling.onnx", 17, [onnx.helper.make_node("Add", ["x", "gone"], ["y"])], "y")
    r = cli("run", dangling)  # named before onnxruntime sees it
    assert r.code == 1 and len(r.err.splitlines()) == 1
    assert f"'{dangling}' is not a valid ONNX model: node #0 (Add, unnamed) reads 'gone'" in r.err
    mixed = _graph_model(tmp_path / "mixed.onnx", 17, [onnx.helper.make_node("Cast", ["x"], ["i"], to=7),
                                                        onnx.helper.make_node("Add", ["x", "i"], ["y"])], "y")
    r = cli("run", mixed)  # float + int64: onnxruntime's type check refuses it
    assert r.code == 1 and len(r.err.splitlines()) == 1, r.err
    assert "onnxruntime (CPUExecutionProvider) cannot load" in r.err and "Add" in r.err
    assert "[ONNXRuntimeError]" not in r.err
    newer = _graph_model(tmp_path / "opset27.onnx", 27, [onnx.helper.make_node("Relu", ["x"], ["y"])], "y")
    r = cli("run", newer)
    assert r.code == 1 and len(r.err.splitlines()) == 1
    assert "opsets up to 26 and this model uses opset 27" in r.err and "--provider reference" in r.err
    r = cli("run", newer, "--provider", "reference", "--input", f"x={_npy(tmp_path, np.array([-1.0, 2.0]))}")
    assert r.code == 0, r.err
    assert re.search(r"^  y\s+float32\[2\].*\[0, 2\]$", r.out, re.M), r.out


def _npy(folder: Path, array: np.ndarray) -> Path:
    path = folder / "a.npy"
    np.save(path, array.astype(np.float32))
    return path


def test_run_bad_model(cli: Cli, tmp_path: Path) -> None:
    (tmp_path / "m.onnx").write_bytes(b"\x00\x01garbage")
    for path in (tmp_path / "m.onnx", tmp_path / "none.onnx"):
        r = cli("run", path)
        assert r.code == 1 and len(r.err.splitlines()) == 1 and "Traceback" not in r.err


# ----------------------------------------------------------------------------------------------- ops
def expected_rows(opset: int | None = None) -> list[tuple[Any, ...]]:
    rows = []
    for r in registry.all_rules():
        if opset is not None and registry.lookup(r.domain, r.op_type, opset) != r:
            continue
        rows.append((r.op_type, r.domain or "ai.onnx", r.since, r.until, r.differentiable, r.notes))
    return rows


@pytest.mark.parametrize("opset", [None, 7, 12, 13, 17, 21])
def test_ops_json(cli: Cli, opset: int | None) -> None:
    r = cli("ops", "--json", *([] if opset is None else ["--opset", str(opset)]))
    assert r.code == 0, r.err
    got = [(d["op"], d["domain"], d["since"], d["until"], d["differentiable"], d["notes"]) for d in json.loads(r.out)]
    assert got == expected_rows(opset)
    assert got  # rules exist at every opset listed


def test_ops_table(cli: Cli) -> None:
    r = cli("ops")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert lines[0].split() == ["op", "domain", "opsets", "differentiable", "notes"]
    rows = expected_rows()
    assert len(lines) == len(rows) + 2
    for line, (op, domain, since, until, diff, _notes) in zip(lines[1:], rows, strict=False):
        span = f"{since}..{until}" if until is not None else f"{since}+"
        assert line.split()[:4] == [op, domain, span, "yes" if diff else "no"]
    assert lines[-1].startswith(f"{len(rows)} rules: ")


# -------------------------------------------------------------------------------------- end to end
def test_end_to_end_console_script(tmp_path: Path) -> None:
    out = tmp_path / "g.onnx"
    grad = subprocess.run([*console_script(), "grad", str(MLP), "-o", str(out), "--ys", "loss",
                           "--xs", "W2", "--xs", "x", "--json"], capture_output=True, text=True, timeout=300)
    assert grad.returncode == 0, grad.stderr
    assert json.loads(grad.stdout)["gradients"] == {"W2": "gradients/W2_grad", "x": "gradients/x_grad"}
    ran = subprocess.run([*console_script(), "run", str(out), "--json"], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, ran.stderr
    assert list(json.loads(ran.stdout)["outputs"]) == ["loss", "pred", "gradients/W2_grad", "gradients/x_grad"]


def test_end_to_end_error_is_one_line(tmp_path: Path) -> None:
    p = subprocess.run([*console_script(), "grad", str(tmp_path / "missing.onnx"), "-o", str(tmp_path / "o.onnx"),
                        "--ys", "y", "--xs", "x"], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1
    assert p.stdout == ""
    assert p.stderr.splitlines() == [f"onnxgrad: error: model file '{tmp_path / 'missing.onnx'}' not found"]


# ------------------------------------------------------------------------------ bundled model, README
def test_bundled_model_is_rebuilt_identically(tmp_path: Path) -> None:
    subprocess.run([sys.executable, str(ROOT / "models" / "build_models.py"), "-o", str(tmp_path)],
                   check=True, capture_output=True, timeout=300)
    assert (tmp_path / "mlp.onnx").read_bytes() == MLP.read_bytes()
    model = onnx.load(MLP)
    assert model.ir_version == 8
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert [i.name for i in model.graph.input] == ["x", "target"]
    assert [o.name for o in model.graph.output] == ["loss", "pred"]
    shapes = {i.name: list(i.dims) for i in model.graph.initializer}
    assert shapes == {"W1": [4, 8], "b1": [8], "W2": [8, 3], "b2": [3]}


def test_readme_python_examples(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, re.S)
    assert len(blocks) >= 4
    shutil.copytree(ROOT / "models", tmp_path / "models", ignore=shutil.ignore_patterns("*.py", "__pycache__"))
    monkeypatch.chdir(tmp_path)
    key = ("my.ops", "Cube")
    saved = list(registry._RULES.get(key, []))
    try:
        for block in blocks:
            exec(compile(block, "README.md", "exec"), {"__name__": "readme"})
    finally:
        if saved:
            registry._RULES[key] = saved
        else:
            registry._RULES.pop(key, None)


def test_readme_opens_with_make_demo_then_make_test() -> None:
    make_lines = [line.split("#")[0].strip() for line in (ROOT / "README.md").read_text().splitlines()
                  if line.startswith("make ")]
    assert make_lines[:2] == ["make demo", "make test"]


def test_grad_xs_shorthands(cli: Cli, tmp_path: Path) -> None:
    """@weights and @inputs expand to every float initializer / float graph input."""
    out = tmp_path / "g.onnx"
    res = cli("grad", MLP, "-o", out, "--ys", "loss", "--xs", "@weights", "--xs", "@inputs", "--json")
    assert res.code == 0, res.err
    assert list(json.loads(res.out)["gradients"]) == ["W1", "b1", "W2", "b2", "x", "target"]


# ---------------------------------------------------------------- every message is one line, with the prefix
def _feed_file(kind: str, folder: Path) -> Path:
    """A file that is no feeds archive: text, empty, bytes numpy cannot place, a .npy where a .npz is asked."""
    path = folder / f"feeds.{kind}"
    if kind == "txt":
        path.write_text("x = 1, 2, 3\n")
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "bin":
        path.write_bytes(b"\x00\x01\x02 not numpy")
    elif kind == "npy":
        np.save(path.with_suffix(".npy"), np.zeros(3))
        path = path.with_suffix(".npy")
    return path


FEED_MESSAGES = [
    ("txt", "--inputs", "cannot read '{path}' as .npz (it is a text file)"),
    ("empty", "--inputs", "cannot read '{path}' as .npz (it is empty)"),
    ("devnull", "--inputs", "cannot read '/dev/null' as .npz (it is empty)"),
    ("bin", "--inputs", "cannot read '{path}' as .npz (not a NumPy file)"),
    ("npy", "--inputs", "cannot read '{path}' as .npz (it is a NumPy .npy file: give it as --input NAME=FILE.npy)"),
    ("txt", "--input", "input 'x': cannot read '{path}' as .npy (it is a text file)"),
    ("devnull", "--input", "input 'x': cannot read '/dev/null' as .npy (it is empty)"),
]


@pytest.mark.parametrize("command", ["run", "check"])
@pytest.mark.parametrize(("kind", "option", "message"), FEED_MESSAGES, ids=[f"{o}-{k}" for k, o, _ in FEED_MESSAGES])
def test_feed_file_messages(cli: Cli, tmp_path: Path, command: str, kind: str, option: str, message: str) -> None:
    path = Path("/dev/null") if kind == "devnull" else _feed_file(kind, tmp_path)
    value = str(path) if option == "--inputs" else f"x={path}"
    extra = ["--ys", "loss", "--xs", "W1"] if command == "check" else []
    r = cli(command, MLP, *extra, option, value)
    assert (r.code, r.out) == (1, "")
    assert r.err == f"onnxgrad: error: {message.format(path=path)}\n"  # one line, the prefix, no "aborted"


@pytest.mark.parametrize("command", ["run", "check", "info"])
def test_an_invalid_model_is_named_so_by_every_command(cli: Cli, tmp_path: Path, command: str) -> None:
    path = _graph_model(tmp_path / "dangling.onnx", 17, [onnx.helper.make_node("Add", ["x", "gone"], ["y"])], "y")
    extra = ["--ys", "y", "--xs", "x"] if command == "check" else []
    r = cli(command, path, *extra)
    assert (r.code, r.out) == (1, "")
    assert r.err == (f"onnxgrad: error: '{path}' is not a valid ONNX model: node #0 (Add, unnamed) reads 'gone', "
                     "which no node, graph input or initializer defines (a dangling input)\n")


def test_a_missing_kernel_of_an_unnamed_node_is_said_so(cli: Cli, tmp_path: Path) -> None:
    path = _graph_model(tmp_path / "erf.onnx", 13, [onnx.helper.make_node("Erf", ["x"], ["y"])], "y")
    r = cli("check", path, "--ys", "y", "--xs", "x", "--json")
    assert r.code == 0, r.err
    payload = json.loads(r.out)
    assert payload["runner"] == "onnx ReferenceEvaluator" and payload["precision"] == "float64"
    assert payload["fallback"] == "onnxruntime has no kernel for Erf-13 (an unnamed node) in this type"
    r = cli("check", path, "--ys", "y", "--xs", "x")
    assert "onnxruntime in float64 not used: onnxruntime has no kernel for Erf-13 (an unnamed node)" in r.out
    assert "node ''" not in r.out
