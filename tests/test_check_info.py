"""``onnxgrad check`` and ``onnxgrad info``: numerical checks that pass on good models, catch a broken
rule, call kinks kinks; model descriptions; the ``@weights`` / ``@inputs`` shorthands; float64 conversion."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

from onnxgrad import add_gradients, registry, runtime
from onnxgrad.api import GradientNote
from onnxgrad.check import KINK, MISMATCH, OK, check_gradients, check_model, convert_floats
from onnxgrad.info import describe
from onnxgrad.shorthands import INPUTS, WEIGHTS, expand_xs
from onnxgrad.workarounds import NO_FLOAT64_KERNELS, is_runtime_error, kernel_gap
from tests.conftest import Cli

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
MLP = MODELS / "mlp.onnx"
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()

# example model -> (y, what runs the float64 check)
ORT, REF = "onnxruntime (CPUExecutionProvider)", "onnx ReferenceEvaluator"
EXAMPLES = {
    "mlp_classifier.onnx": ("loss", ORT),
    "cnn.onnx": ("loss", REF),  # onnxruntime's CPU Conv has no float64 kernel
    "transformer_block.onnx": ("loss", REF),  # ... nor Erf
    "lj_energy.onnx": ("energy", ORT),
}




def save(model: onnx.ModelProto, path: Path) -> Path:
    onnx.checker.check_model(model, full_check=True)
    path.write_bytes(model.SerializeToString())
    return path


def one_op_model(op: str, x_shape: list[int], w: np.ndarray | None = None, elem: int = TensorProto.DOUBLE,
                 **attrs: Any) -> onnx.ModelProto:
    """y = ReduceSum(op(x) [* w]): a scalar of one op, with an optional weight."""
    nodes = [oh.make_node(op, ["x"], ["z"], **attrs)]
    inits = []
    last = "z"
    if w is not None:
        inits.append(numpy_helper.from_array(w, "w"))
        nodes.append(oh.make_node("Mul", ["z", "w"], ["zw"]))
        last = "zw"
    nodes.append(oh.make_node("ReduceSum", [last], ["y"], keepdims=0))
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", elem, x_shape)],
                          [oh.make_tensor_value_info("y", elem, [])], initializer=inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


# ---------------------------------------------------------------------------- check passes
@pytest.mark.parametrize("name", list(EXAMPLES))
def test_check_passes_on_examples(cli: Cli, name: str) -> None:
    y, runner = EXAMPLES[name]
    r = cli("check", MODELS / name, "--ys", y, "--xs", WEIGHTS, "--xs", INPUTS, "--json")
    assert r.code == 0, r.err
    payload = json.loads(r.out)
    assert payload["ok"] and payload["precision"] == "float64" and payload["runner"] == runner
    assert payload["source_types"] == ["float32"] and payload["converted"]
    if runner == REF:  # onnxruntime in float64 was tried first, and the reason it was given up is told
        assert payload["fallback"] and "no kernel" in payload["fallback"]
    else:
        assert payload["fallback"] is None
    rows = payload["rows"]
    model = onnx.load(MODELS / name)
    assert [row["x"] for row in rows] == expand_xs(model, [WEIGHTS, INPUTS])
    assert all(row["status"] == OK for row in rows), rows


def test_check_table_and_feeds(cli: Cli, tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    feeds = tmp_path / "feeds.npz"
    np.savez(feeds, x=rng.standard_normal((5, 4)).astype(np.float32))
    target = tmp_path / "target.npy"
    np.save(target, rng.standard_normal((5, 3)))  # float64: cast to the input's type
    r = cli("check", MLP, "--ys", "loss", "--xs", "W1", "--xs", "x", "--inputs", feeds, "--input", f"target={target}")
    assert r.code == 0, r.err
    lines = r.out.splitlines()
    assert "precision: float64 (converted from float32) in onnxruntime (CPUExecutionProvider), rtol 1e-05" in lines[1]
    assert lines[2].split() == ["x", "shape", "analytic", "numeric", "rel", "err", "step", "result"]
    assert lines[3].split()[:2] == ["W1", "[4,8]"] and lines[3].split()[-1] == "ok"
    assert lines[4].split()[:2] == ["x", "[5,4]"]
    assert lines[-1] == "2 ok, 0 kink, 0 mismatch"


@pytest.mark.parametrize(("args", "batch"), [([], 2), (["--dim", "batch=3"], 3), (["--dim", "*=1"], 1)],
                         ids=["default", "named", "star"])
def test_check_random_inputs_as_run_draws_them(cli: Cli, args: list[str], batch: int) -> None:
    """check takes run's --dim, and draws as run draws (onnxgrad.runtime.make_feeds), but symbolic dimensions
    default to 2 (a missing sum over a broadcast batch axis shows)."""
    r = cli("check", MLP, "--ys", "loss", "--xs", "x", "--xs", "target", "--json", *args)
    assert r.code == 0, r.err
    rows = json.loads(r.out)["rows"]
    assert [row["shape"] for row in rows] == [[batch, 4], [batch, 3]]
    assert all(row["status"] == OK for row in rows)


def test_check_intermediate_value_and_float32(cli: Cli) -> None:
    r = cli("check", MLP, "--ys", "loss", "--xs", "h", "--precision", "float32", "--json")
    assert r.code == 0, r.err
    payload = json.loads(r.out)
    assert payload["precision"] == "float32" and payload["rtol"] == 1e-2 and not payload["converted"]
    assert payload["rows"][0]["x"] == "h" and payload["rows"][0]["status"] == OK


def test_check_on_the_reference_evaluator(cli: Cli) -> None:
    r = cli("check", MLP, "--ys", "loss", "--xs", "@weights", "--provider", "reference", "--json")
    assert r.code == 0, r.err
    rows = json.loads(r.out)["rows"]
    assert [row["x"] for row in rows] == ["W1", "b1", "W2", "b2"]
    assert all(row["status"] == OK for row in rows)


def test_check_usage_errors(cli: Cli, tmp_path: Path) -> None:
    r = cli("check", MLP, "--ys", "loss", "--xs", "@everything")
    assert r.code == 1 and "unknown shorthand '@everything'" in r.err
    r = cli("check", MLP, "--ys", "loss", "--xs", "W11")
    assert r.code == 1 and "'W11'" in r.err and "did you mean 'W1'" in r.err
    r = cli("check", tmp_path / "missing.onnx", "--ys", "loss", "--xs", "x")
    assert r.code == 1 and "not found" in r.err
    r = cli("check", MLP, "--ys", "loss", "--xs", "x", "--input", "nope=a.npy")
    assert r.code == 1
    r = cli("check", MLP, "--xs", "x")
    assert r.code == 2 and "--ys" in r.err


def test_check_provider_cuda(cli: Cli) -> None:
    r = cli("check", MLP, "--ys", "loss", "--xs", "W1", "--provider", "cuda")
    if HAS_CUDA:
        assert r.code == 0, r.err
        return
    assert r.code == 1 and r.out == ""
    assert "CUDAExecutionProvider" in r.err and "onnxruntime-gpu" in r.err


def test_progress_bar_on_stderr(cli: Cli, monkeypatch: pytest.MonkeyPatch) -> None:
    from onnxgrad.cli import check_cmd

    monkeypatch.setattr(check_cmd, "PROGRESS_AFTER_S", 0.0)
    r = cli("check", MLP, "--ys", "loss", "--xs", WEIGHTS, "--json")
    assert r.code == 0, r.err
    assert "checking 4 gradients" in r.err
    json.loads(r.out)  # stdout stays pure JSON


# ---------------------------------------------------------------------------- a broken rule is caught
@pytest.fixture
def broken_tanh() -> Iterator[None]:
    """Tanh's rule replaced by a wrong one (dx = dy * (1 + y^2)); the original is registered back after."""
    original = registry.lookup("", "Tanh", 17)
    assert original is not None and original.fn is not None

    @registry.register("Tanh", since=original.since)
    def wrong(em: Any, node: Any, dy: Any) -> list[Any]:
        (y,) = node.outputs
        return [em.Mul(dy[0], em.Add(em.const(1.0, like=y), em.Mul(y, y)))]

    try:
        yield
    finally:
        registry.register("Tanh", since=original.since, broadcast=original.broadcast, dense=original.dense,
                          notes=original.notes)(original.fn)
        restored = registry.lookup("", "Tanh", 17)
        assert restored is not None and restored.fn is original.fn and restored.notes == original.notes


def test_check_catches_broken_rule(cli: Cli, broken_tanh: None) -> None:
    r = cli("check", MLP, "--ys", "loss", "--xs", WEIGHTS, "--xs", "x", "--json")
    assert r.code == 1
    assert "gradient check failed for 3 of 5 xs: W1, b1, x" in r.err
    rows = {row["x"]: row for row in json.loads(r.out)["rows"]}
    assert {x for x, row in rows.items() if row["status"] == MISMATCH} == {"W1", "b1", "x"}
    assert rows["W2"]["status"] == OK and rows["b2"]["status"] == OK  # not behind the Tanh
    r = cli("check", MLP, "--ys", "loss", "--xs", "b1")
    assert r.code == 1 and "MISMATCH" in r.out and "0 ok, 0 kink, 1 mismatch" in r.out
    assert "next: mismatch (b1) in float64: a gradient rule" in r.out
    assert r.err.strip().endswith("b1 (float64; a gradient rule on their path is wrong)")


def test_broken_rule_restored(cli: Cli) -> None:
    r = cli("check", MLP, "--ys", "loss", "--xs", "b1", "--json")
    assert r.code == 0, r.err


# ---------------------------------------------------------------------------- kinks
def test_relu_at_zero_is_a_kink(cli: Cli, tmp_path: Path) -> None:
    path = save(one_op_model("Relu", [2, 3]), tmp_path / "relu.onnx")
    x = tmp_path / "x.npy"
    np.save(x, np.array([[0.0, 1.0, -2.0], [0.5, 0.0, -0.3]]))  # exactly on the kink
    r = cli("check", path, "--ys", "y", "--xs", "x", "--input", f"x={x}")
    assert r.code == 0, r.err
    assert "0 ok, 1 kink, 0 mismatch" in r.out and "kink:" in r.out
    assert "next: 1 kink: no step was smooth" in r.out and "another --seed" in r.out
    np.save(x, np.array([[0.7, 1.0, -2.0], [0.5, -0.4, -0.3]]))  # away from it
    r = cli("check", path, "--ys", "y", "--xs", "x", "--input", f"x={x}")
    assert r.code == 0 and "1 ok, 0 kink, 0 mismatch" in r.out


def test_maxpool_tie_is_a_kink(tmp_path: Path) -> None:
    model = one_op_model("MaxPool", [1, 1, 4, 4], w=np.arange(1.0, 5.0).reshape(1, 1, 2, 2),
                         kernel_shape=[2, 2], strides=[2, 2])
    x = np.random.default_rng(0).standard_normal((1, 1, 4, 4))
    x[0, 0, 0, 0] = x[0, 0, 0, 1] = 3.0  # a tie for the maximum of the first window
    report = check_model(model, ["y"], ["x", "w"], {"x": x})
    rows = {r.x: r for r in report.rows}
    assert report.ok and rows["x"].status == KINK and rows["w"].status == OK
    forward, backward = rows["x"].one_sided or (0.0, 0.0)
    assert abs(forward - backward) >= abs(rows["x"].numeric - rows["x"].analytic)
    x[0, 0, 0, 1] = 2.0  # no tie: a plain pass
    assert all(r.status == OK for r in check_model(model, ["y"], ["x"], {"x": x}).rows)


def test_kink_within_the_first_step_is_rescued_by_a_smaller_one() -> None:
    model = one_op_model("Relu", [1, 4])
    x = np.array([[3e-7, -4e-7, 1.0, -1.0]])  # the first step (1e-6) crosses the kinks, 1e-8 does not
    (row,) = check_gradients(model, ["y"], ["x"], {"x": x}, seed=2)
    assert row.status == OK and row.step < 3e-7 and row.tries > 1  # refined: the step shrinks tenfold


def test_smooth_disagreement_is_a_mismatch_not_a_kink(broken_tanh: None) -> None:
    model = one_op_model("Tanh", [3, 2])
    x = np.random.default_rng(1).standard_normal((3, 2))
    report = check_model(model, ["y"], ["x"], {"x": x})
    (row,) = report.rows
    # one refinement (a tenth of the step) shows the gap is not shrinking: a wrong gradient, not curvature
    assert not report.ok and row.status == MISMATCH and row.tries == 2


# ---------------------------------------------------------------------------- float64 conversion
def test_convert_floats_runs_in_float64() -> None:
    nodes = [
        oh.make_node("Constant", [], ["c"], value_float=0.1),
        oh.make_node("Constant", [], ["cs"], value_floats=[1.0, 2.0, 3.0]),
        oh.make_node("Shape", ["x"], ["shape"]),
        oh.make_node("ConstantOfShape", ["shape"], ["fill"],
                     value=numpy_helper.from_array(np.array([0.5], np.float32))),
        oh.make_node("Cast", ["n"], ["nf"], to=TensorProto.FLOAT16),
        oh.make_node("Cast", ["nf"], ["nf32"], to=TensorProto.FLOAT),
        oh.make_node("Mul", ["x", "c"], ["a"]),
        oh.make_node("Add", ["a", "cs"], ["b"]),
        oh.make_node("Add", ["b", "fill"], ["d"]),
        oh.make_node("Mul", ["d", "nf32"], ["e"]),
        oh.make_node("Mul", ["e", "w"], ["y"]),
    ]
    graph = oh.make_graph(
        nodes, "g",
        [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3]),
         oh.make_tensor_value_info("n", TensorProto.INT64, [])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])],
        initializer=[numpy_helper.from_array(np.full(3, 1 / 3, np.float32), "w")],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    m64 = convert_floats(model)
    onnx.checker.check_model(m64, full_check=True)
    x = np.random.default_rng(0).standard_normal((2, 3))
    (y,) = ort.InferenceSession(m64.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x, "n": np.array(3, np.int64)})
    assert y.dtype == np.float64
    c, w = float(np.float32(0.1)), float(np.float32(1 / 3))  # the float32 values, now computed in float64
    np.testing.assert_allclose(y, (x * c + [1.0, 2.0, 3.0] + 0.5) * 3.0 * w, rtol=1e-14)
    assert model.graph.input[0].type.tensor_type.elem_type == TensorProto.FLOAT  # the original is untouched


# ---------------------------------------------------------------------------- onnxruntime's float64 gaps
def _one_node(op: str, elem: int) -> onnx.ModelProto:
    """``op`` on float inputs of shapes that every op of the table accepts (at opset 17)."""
    shapes, attrs = FLOAT64_PROBES.get(op, ([[2, 3]], {}))
    inputs = [oh.make_tensor_value_info(f"i{k}", elem, s) for k, s in enumerate(shapes)]
    node = oh.make_node(op, [i.name for i in inputs], ["o"], **attrs)
    graph = oh.make_graph([node], "g", inputs, [oh.make_tensor_value_info("o", elem, None)])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


X4 = [1, 2, 5, 5]
FLOAT64_PROBES: dict[str, tuple[list[list[int]], dict[str, Any]]] = {
    "Conv": ([X4, [3, 2, 3, 3]], {}), "ConvTranspose": ([X4, [2, 3, 3, 3]], {}), "Det": ([[3, 3]], {}),
    "AveragePool": ([X4], {"kernel_shape": [2, 2]}), "LpPool": ([X4], {"kernel_shape": [2, 2]}),
    "GlobalAveragePool": ([X4], {}), "GlobalLpPool": ([X4], {}), "GlobalMaxPool": ([X4], {}),
    "LRN": ([X4], {"size": 3}),
    "GridSample": ([X4, [1, 3, 3, 2]], {}), "InstanceNormalization": ([X4, [2], [2]], {}),
    "MeanVarianceNormalization": ([X4], {}), "Mean": ([[2, 3], [2, 3]], {}),
    "Tanh": ([[2, 3]], {}), "MatMul": ([[2, 3], [3, 2]], {}), "MaxPool": ([X4], {"kernel_shape": [2, 2]}),
}


@pytest.mark.parametrize("op", [*sorted(NO_FLOAT64_KERNELS), "Tanh", "MatMul", "MaxPool", "Sin", "Exp", "Relu"])
def test_no_float64_kernels_table_matches_onnxruntime(op: str) -> None:
    """The ops of ``workarounds.NO_FLOAT64_KERNELS`` fail in float64 for want of a kernel and run in float32; a few
    ops outside it run in float64 (so the probe itself works)."""
    f32 = _one_node(op, TensorProto.FLOAT)
    ort.InferenceSession(f32.SerializeToString(), providers=["CPUExecutionProvider"])
    opts = ort.SessionOptions()
    opts.log_severity_level = 4
    try:
        ort.InferenceSession(_one_node(op, TensorProto.DOUBLE).SerializeToString(), opts,
                             providers=["CPUExecutionProvider"])
    except Exception as e:
        assert op in NO_FLOAT64_KERNELS, f"{op} has no float64 kernel: add it to the table ({kernel_gap(e)})"
        assert is_runtime_error(e) and kernel_gap(e).startswith("onnxruntime has no kernel for "), kernel_gap(e)
        return
    assert op not in NO_FLOAT64_KERNELS, f"onnxruntime {ort.__version__} runs {op} in float64: drop it from the table"


# ---------------------------------------------------------------------------- info
def test_info_text(cli: Cli) -> None:
    r = cli("info", MODELS / "cnn.onnx")
    assert r.code == 0, r.err
    out = r.out
    assert "opsets: ai.onnx 17" in out
    assert "image   float32[batch,1,8,8]" in out and "labels  int64[batch]" in out
    assert "loss    float32[]" in out and "logits  float32[batch,3]" in out
    assert "weights: 11 tensors" in out and "(10 float)" in out and "... and 3 more" in out
    assert "ops (10 nodes): Conv 2, Relu 2, AveragePool 1" in out
    assert f"float inputs ({INPUTS}): image" in out and f"float weights ({WEIGHTS}): 8 trainable, 2 left out" in out
    assert "left out: bn1.running_mean (running mean of BatchNormalization (a statistic, not trained))" in out
    assert "loss: depends on image, 8 weights" in out
    assert f"--ys loss --xs {WEIGHTS} --xs {INPUTS}" in out


def test_info_json(cli: Cli) -> None:
    r = cli("info", MLP, "--json")
    assert r.code == 0, r.err
    info = json.loads(r.out)
    assert info["opsets"] == {"ai.onnx": 17}
    assert info["inputs"] == [{"name": "x", "dtype": "float32", "shape": ["batch", 4]},
                              {"name": "target", "dtype": "float32", "shape": ["batch", 3]}]
    assert info["outputs"][0] == {"name": "loss", "dtype": "float32", "shape": []}
    assert info["weights"]["count"] == 4 and info["weights"]["bytes"] == (32 + 8 + 24 + 3) * 4
    assert [w["name"] for w in info["weights"]["items"]] == ["W1", "b1", "W2", "b2"]
    assert info["ops"] == {"Add": 2, "MatMul": 2, "Mul": 1, "ReduceMean": 1, "Sub": 1, "Tanh": 1}
    diff = info["differentiable"]
    assert diff["inputs"] == ["x", "target"] and diff["weights"] == ["W1", "b1", "W2", "b2"]
    pred = next(o for o in diff["outputs"] if o["name"] == "pred")
    assert pred["inputs"] == ["x"] and pred["weights"] == 4 and pred["missing_rules"] == []
    assert diff["missing_rules"] == []


def test_info_names_ops_without_rules(cli: Cli, tmp_path: Path) -> None:
    # an op of a custom domain on the path from x to y blocks it; one on an integer path does not matter
    nodes = [
        oh.make_node("Mystery", ["x"], ["m"], domain="example.custom", name="mystery1"),
        oh.make_node("Tanh", ["m"], ["y"]),
        oh.make_node("Shape", ["x"], ["s"]),
        oh.make_node("Riddle", ["s"], ["k"], domain="example.custom", name="riddle1"),
        oh.make_node("Tanh", ["x"], ["z"]),
    ]
    graph = oh.make_graph(
        nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
        [oh.make_tensor_value_info("y", TensorProto.FLOAT, [3]), oh.make_tensor_value_info("k", TensorProto.INT64, [1]),
         oh.make_tensor_value_info("z", TensorProto.FLOAT, [3])],
        value_info=[oh.make_tensor_value_info("m", TensorProto.FLOAT, [3])],
    )
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17), oh.make_opsetid("example.custom", 1)],
                          ir_version=8)
    path = tmp_path / "custom.onnx"
    path.write_bytes(model.SerializeToString())
    r = cli("info", path, "--json")
    assert r.code == 0, r.err
    diff = json.loads(r.out)["differentiable"]
    rows = {o["name"]: o for o in diff["outputs"]}
    assert rows["y"]["missing_rules"] == ["example.custom::Mystery"]
    assert rows["k"]["float"] is False
    assert rows["z"]["missing_rules"] == [] and rows["z"]["inputs"] == ["x"]
    assert diff["missing_rules"] == [{"domain": "example.custom", "op_type": "Mystery", "opset": 1,
                                      "nodes": ["mystery1"]}]
    r = cli("info", path)
    assert "y: depends on x; blocked: no rule for example.custom::Mystery" in r.out
    assert "no gradient rule: Mystery (example.custom, opset 1) at 'mystery1'" in r.out


def test_info_errors(cli: Cli, tmp_path: Path) -> None:
    r = cli("info", tmp_path / "missing.onnx")
    assert r.code == 1 and "not found" in r.err
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model at all")
    r = cli("info", bad)
    assert r.code == 1 and "not a valid ONNX model" in r.err


# ---------------------------------------------------------------------------- @weights / @inputs
def test_expand_xs() -> None:
    model = onnx.load(MODELS / "cnn.onnx")
    weights = [t.name for t in model.graph.initializer if t.data_type == TensorProto.FLOAT]
    weights = [w for w in weights if "running" not in w]  # BatchNorm's statistics are not trained
    assert expand_xs(model, [WEIGHTS]) == weights and "flat_shape" not in weights
    assert expand_xs(model, [INPUTS]) == ["image"]  # labels are int64
    assert expand_xs(model, ["image", WEIGHTS, INPUTS, "conv1.bias"]) == ["image", *weights]
    assert expand_xs(model, ["anything"]) == ["anything"]  # plain names pass through
    with pytest.raises(ValueError, match="unknown shorthand '@all'"):
        expand_xs(model, ["@all"])
    no_inputs = one_op_model("Relu", [2])
    no_inputs.graph.initializer.append(numpy_helper.from_array(np.zeros(2), "x"))
    with pytest.raises(ValueError, match="no float graph inputs"):
        expand_xs(no_inputs, [INPUTS])
    with pytest.raises(ValueError, match="no trainable float weights"):
        expand_xs(one_op_model("Relu", [2]), [WEIGHTS])
    with pytest.warns(GradientNote, match="@weights stands for nothing: the model has no trainable float weights"):
        assert expand_xs(one_op_model("Relu", [2]), [WEIGHTS, INPUTS]) == ["x"]  # a note, the other finds xs


def test_expand_xs_on_ir_model_and_describe() -> None:
    import onnx_ir as ir

    m = ir.load(str(MODELS / "lj_energy.onnx"))
    assert expand_xs(m, [WEIGHTS, INPUTS]) == ["sigma", "epsilon", "positions"]
    info = describe(m)
    assert info["weights"]["float_count"] == 2 and info["weights"]["trainable"] == 2
    assert info["suggestion"] == f"--ys energy --xs {WEIGHTS} --xs {INPUTS}"


# ---------------------------------------------------------------------------- the @weights selection rule
def _roles_model() -> onnx.ModelProto:
    """One float initializer in each role ``@weights`` tells apart."""
    f32 = TensorProto.FLOAT
    inits = {
        "W": np.ones((4, 3)), "b": np.zeros(3), "gamma": np.ones(3), "beta": np.zeros(3), "mean": np.zeros(3),
        "var": np.ones(3), "exponent": np.array(2.0), "lo": np.array(-1.0), "hi": np.array(1.0),
        "mask": np.triu(np.full((3, 3), -np.inf), 1), "huge": np.full(3, -1e9), "table": np.ones((5, 3)),
        "temperature": np.array(0.5), "unused": np.ones(2), "Wt": np.ones((3, 4)), "shaped": np.ones((3, 3)),
    }
    nodes = [
        oh.make_node("Transpose", ["Wt"], ["Wt_T"], perm=[1, 0]),  # read through: a MatMul operand
        oh.make_node("MatMul", ["x", "Wt_T"], ["h0"]),
        oh.make_node("MatMul", ["x", "W"], ["h1"]),
        oh.make_node("Add", ["h1", "b"], ["h2"]),
        oh.make_node("Add", ["h2", "h0"], ["h3"]),
        oh.make_node("Unsqueeze", ["h3", "axes"], ["h4"]),
        oh.make_node("Unsqueeze", ["h4", "axes2"], ["h5"]),
        oh.make_node("BatchNormalization", ["h5", "gamma", "beta", "mean", "var"], ["h6"]),
        oh.make_node("Squeeze", ["h6", "axes3"], ["h7"]),
        oh.make_node("Pow", ["h7", "exponent"], ["h8"]),
        oh.make_node("Clip", ["h8", "lo", "hi"], ["h9"]),
        oh.make_node("MatMul", ["h9", "mask"], ["h10"]),  # a MatMul operand is a weight, whatever it holds
        oh.make_node("Add", ["h10", "huge"], ["h11"]),
        oh.make_node("Gather", ["table", "ids"], ["e"]),
        oh.make_node("Add", ["h11", "e"], ["h12"]),
        oh.make_node("Mul", ["h12", "temperature"], ["y"]),
        oh.make_node("Shape", ["shaped"], ["shape_only"]),  # read for its shape alone (tf2onnx writes these)
    ]
    i64 = [numpy_helper.from_array(np.array(v, np.int64), n) for n, v in
           (("axes", [2]), ("axes2", [3]), ("axes3", [2, 3]))]
    graph = oh.make_graph(
        nodes, "g", [oh.make_tensor_value_info("x", f32, [2, 4]), oh.make_tensor_value_info("ids", TensorProto.INT64,
                                                                                           [2])],
        [oh.make_tensor_value_info("y", f32, [2, 3])],
        initializer=[numpy_helper.from_array(v.astype(np.float32), k) for k, v in inits.items()] + i64)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def test_weights_selection_rule() -> None:
    from onnxgrad.shorthands import select_weights

    weights, left = select_weights(_roles_model())
    assert weights == ["W", "b", "gamma", "beta", "mask", "table", "temperature", "Wt"]
    reasons = {w.name: w.reason for w in left}
    assert reasons == {
        "mean": "running mean of BatchNormalization (a statistic, not trained)",
        "var": "running variance of BatchNormalization (a statistic, not trained)",
        "exponent": "exponent of Pow", "lo": "lower bound of Clip", "hi": "upper bound of Clip",
        "huge": "a mask (holds -inf, NaN or values of magnitude 1e+08 or more) read by Add",
        "unused": "read by no node", "shaped": "read only for its shape (Shape)",
    }


def test_info_lists_what_weights_leaves_out(cli: Cli, tmp_path: Path) -> None:
    path = save(_roles_model(), tmp_path / "roles.onnx")
    r = cli("info", path)
    assert r.code == 0, r.err
    assert f"float weights ({WEIGHTS}): 8 trainable, 8 left out" in r.out
    assert "    left out: exponent (exponent of Pow)" in r.out and "    left out: unused (read by no node)" in r.out
    info = json.loads(cli("info", path, "--json").out)
    assert {w["name"] for w in info["differentiable"]["left_out"]} == {
        "mean", "var", "exponent", "lo", "hi", "huge", "shaped", "unused"}
    r = cli("check", path, "--ys", "y", "--xs", WEIGHTS, "--json")  # no NaN from an exponent, no false alarm
    assert r.code == 0, r.err
    assert [row["x"] for row in json.loads(r.out)["rows"]] == ["W", "b", "gamma", "beta", "mask", "table",
                                                                "temperature", "Wt"]


# ---------------------------------------------------------------------------- info reads subgraphs
def _if_model(branch_op: str, domain: str = "") -> onnx.ModelProto:
    """y = If(c, then: Mul(x, w) -> branch_op, else: Sin(x)); x and w are read from the outer scope."""
    f32 = TensorProto.FLOAT
    then = oh.make_graph([oh.make_node("Mul", ["x", "w"], ["t0"]), oh.make_node(branch_op, ["t0"], ["t1"],
                                                                                 domain=domain, name="inner")],
                         "then", [], [oh.make_tensor_value_info("t1", f32, [2])])
    other = oh.make_graph([oh.make_node("Sin", ["x"], ["e0"])], "else", [], [oh.make_tensor_value_info("e0", f32, [2])])
    graph = oh.make_graph(
        [oh.make_node("If", ["c"], ["y"], then_branch=then, else_branch=other, name="branch"),
         oh.make_node("Cos", ["x"], ["z"])], "g",
        [oh.make_tensor_value_info("c", TensorProto.BOOL, []), oh.make_tensor_value_info("x", f32, [2])],
        [oh.make_tensor_value_info("y", f32, [2]), oh.make_tensor_value_info("z", f32, [2])],
        initializer=[numpy_helper.from_array(np.ones(2, np.float32), "w")])
    imports = [oh.make_opsetid("", 17), *([oh.make_opsetid(domain, 1)] if domain else [])]
    return oh.make_model(graph, opset_imports=imports, ir_version=8)


def test_info_sees_outer_values_that_subgraphs_read(cli: Cli, tmp_path: Path) -> None:
    path = save(_if_model("Tanh"), tmp_path / "if.onnx")
    diff = json.loads(cli("info", path, "--json").out)["differentiable"]
    y = next(o for o in diff["outputs"] if o["name"] == "y")
    assert y["inputs"] == ["x"] and y["weights"] == 1 and y["missing_rules"] == []  # x and w, read by the branches


def test_info_names_ops_without_rules_inside_subgraphs(cli: Cli, tmp_path: Path) -> None:
    path = save(_if_model("Mystery", "example.custom"), tmp_path / "if_custom.onnx")
    r = cli("info", path, "--json")
    info = json.loads(r.out)
    rows = {o["name"]: o for o in info["differentiable"]["outputs"]}
    assert rows["y"]["missing_rules"] == ["example.custom::Mystery"]
    assert info["differentiable"]["missing_rules"] == [
        {"domain": "example.custom", "op_type": "Mystery", "opset": 1, "nodes": ["If 'branch' / then: inner"]}]
    assert info["suggestion"] == f"--ys z --xs {INPUTS}"  # y is blocked: the grad line suggested works
    r = cli("info", path)
    assert "y: depends on x, 1 weights; blocked: no rule for example.custom::Mystery" in r.out
    out = tmp_path / "out.onnx"
    assert cli("grad", path, "-o", out, *info["suggestion"].split()).code == 0
    r = cli("grad", path, "-o", out, "--ys", "y", "--xs", "x")
    assert r.code == 1 and "Mystery" in r.err


def test_check_accepts_stop_gradients(cli: Cli) -> None:
    """With h stopped, W1 (behind h) has no gradient, and the differences hold h at its value too: both agree."""
    r = cli("check", MLP, "--ys", "loss", "--xs", "W1", "--xs", "W2", "--stop-gradients", "h", "--json")
    assert r.code == 0, r.err
    rows = {row["x"]: row for row in json.loads(r.out)["rows"]}
    assert rows["W1"]["analytic"] == 0.0 and abs(rows["W1"]["numeric"]) < 1e-12 and rows["W1"]["status"] == OK
    assert rows["W2"]["status"] == OK and rows["W2"]["analytic"] != 0.0
    r = cli("check", MLP, "--ys", "loss", "--xs", "W1", "--stop-gradients", "hh")
    assert r.code == 1 and "stop_gradients: no value named 'hh'" in r.err


def test_seeds_of_inputs_directions_and_output_weights_are_independent() -> None:
    """u was once drawn from the inputs' generator: with x and y of one shape, u == x, and InstanceNormalization's
    gradient of sum(x * IN(x)) read as a mismatch. Now the three streams differ."""
    from onnxgrad.check import DIRECTION_STREAM, U_STREAM

    x = np.random.default_rng(0).standard_normal((2, 3))
    u = np.random.default_rng([0, U_STREAM]).standard_normal((2, 3))
    v = np.random.default_rng([0, DIRECTION_STREAM]).standard_normal((2, 3))
    assert not np.allclose(x, u) and not np.allclose(u, v) and not np.allclose(x, v)
    nodes = [oh.make_node("InstanceNormalization", ["x", "s", "b"], ["y"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 4])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3, 4])],
                          initializer=[numpy_helper.from_array(np.array([1.0, 2.0, 0.5], np.float32), "s"),
                                       numpy_helper.from_array(np.array([0.1, 0.0, -0.2], np.float32), "b")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    for seed in range(3):
        report = check_model(model, ["y"], ["x", "s", "b"], seed=seed)
        assert report.ok and all(r.status == OK for r in report.rows), [(r.x, r.rel_error) for r in report.rows]


def test_precision_float64_falls_back_to_the_reference_evaluator(cli: Cli) -> None:
    """--precision float64 on a Conv model once failed with onnxruntime's raw NotImplemented; it now runs in float64
    on the reference evaluator and says why."""
    r = cli("check", MODELS / "cnn.onnx", "--ys", "loss", "--xs", "conv1.weight", "--precision", "float64")
    assert r.code == 0, r.err
    assert ("precision: float64 (converted from float32) in onnx ReferenceEvaluator, rtol 1e-05; onnxruntime in "
            "float64 not used: onnxruntime has no kernel for Conv-11 (node 'conv1') in this type") in r.out


def test_a_float32_mismatch_names_float64_as_the_next_step(cli: Cli, broken_tanh: None) -> None:
    r = cli("check", MLP, "--ys", "loss", "--xs", "b1", "--precision", "float32")
    assert r.code == 1
    assert "next: mismatch (b1) in float32: round-off may explain it; settle it in float64 with --precision " \
           "float64 --provider reference" in r.out
    assert r.err == "onnxgrad: error: gradient check failed for 1 of 1 xs: b1 (float32; run it in float64: " \
                    "--precision float64 --provider reference)\n"


def test_info_residuals_lists_what_the_backward_keeps(cli: Cli) -> None:
    """mlp.onnx: the backward of loss w.r.t. the weights reads the Tanh output h (batch, 8) and the error
    (batch, 3) of the forward; with --dim batch=64 that is 64*8*4 and 64*3*4 bytes, largest first."""
    r = cli("info", MLP, "--residuals", "--ys", "loss", "--xs", "@weights", "--dim", "batch=64", "--json")
    assert r.code == 0, r.err
    rows = json.loads(r.out)["residuals"]
    assert [(row["name"], row["op"], row["bytes"]) for row in rows] == [("h", "Tanh", 2048), ("err", "Sub", 768)]
    bad = cli("info", MLP, "--residuals")
    assert bad.code == 2 and "--residuals needs --ys and --xs" in bad.err


FUNCTION_BODIES = [  # (op, opset, attributes, per-channel params (count) or None)
    ("Gelu", 20, {"approximate": "none"}, None),
    ("Gelu", 20, {"approximate": "tanh"}, None),
    ("GroupNormalization", 18, {"num_groups": 2}, 2),
    ("GroupNormalization", 21, {"num_groups": 2}, 4),
    ("MeanVarianceNormalization", 13, {}, None),
]


@pytest.mark.parametrize(("op", "opset", "attrs", "params"), FUNCTION_BODIES,
                         ids=["gelu-erf", "gelu-tanh", "groupnorm-18", "groupnorm-21", "mvn-13"])
def test_float64_check_through_function_body_ops_has_no_false_alarm(op: str, opset: int, attrs: dict[str, Any],
                                                                      params: int | None) -> None:
    """Ops that onnx's reference evaluator runs as their schemas' function bodies, checked in float64 after a Conv:
    there Gelu's Erf rounds to float32 (a false mismatch of 5e-5 on a dynamo-exported LayerNorm + GELU model),
    GroupNormalization-21 takes its statistics in float32 (dx read as a kink, 2e-2 off) and
    MeanVarianceNormalization adds a float32 epsilon to float64 (an error), until the evaluator got kernels of its
    own. Every row now agrees within 1e-8, and onnxruntime's float32 output agrees with the kernel."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((4, 3, 1, 1)).astype(np.float32), "w")]
    inputs, xs = ["h"], ["x", "w"]
    if params is not None:
        inits += [numpy_helper.from_array((1 + 0.1 * rng.standard_normal(params)).astype(np.float32), "s"),
                  numpy_helper.from_array(rng.standard_normal(params).astype(np.float32), "b")]
        inputs, xs = ["h", "s", "b"], [*xs, "s", "b"]
    nodes = [oh.make_node("Conv", ["x", "w"], ["h"]), oh.make_node(op, inputs, ["y"], **attrs)]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 5])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=10)
    x = rng.standard_normal((2, 3, 5, 5)).astype(np.float32)
    ours, theirs = (runtime.run(model, {"x": x}, provider=p)["y"] for p in ("reference", "cpu"))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
    report = check_model(model, ["y"], xs, precision="float64", provider="reference")
    assert report.ok and all(r.status == OK and r.rel_error < 1e-8 for r in report.rows), \
        [(r.x, r.status, r.rel_error) for r in report.rows]


# ---------------------------------------------------------------------------- random draws, non-finite xs
def _drawing_model(kind: str) -> onnx.ModelProto:
    """x -> Gemm(w) -> a node that draws anew every run -> Tanh -> y."""
    draw = {
        # a model exported for training (TrainingMode.TRAINING): Dropout with training_mode true, no mask output
        "dropout": [oh.make_node("Constant", [], ["r"], value=numpy_helper.from_array(np.array(0.3, np.float32))),
                    oh.make_node("Constant", [], ["t"], value=numpy_helper.from_array(np.array(True))),
                    oh.make_node("Dropout", ["h", "r", "t"], ["d"])],
        # the same with the mask as an output the gradient reads, and training_mode fed at run time
        "dropout-mask-fed": [oh.make_node("Dropout", ["h", "", "train"], ["d", "mask"])],
        # a random weight drawn in the graph (torch.rand in a forward, exported as RandomUniformLike)
        "random-like": [oh.make_node("RandomUniformLike", ["h"], ["u"]), oh.make_node("Mul", ["h", "u"], ["d"])],
    }[kind]
    inputs = [oh.make_tensor_value_info("x", TensorProto.FLOAT, [3, 4])]
    if kind == "dropout-mask-fed":
        inputs.append(oh.make_tensor_value_info("train", TensorProto.BOOL, []))
    w = numpy_helper.from_array(np.random.default_rng(1).standard_normal((4, 5)).astype(np.float32), "w")
    graph = oh.make_graph([oh.make_node("MatMul", ["x", "w"], ["h"]), *draw, oh.make_node("Tanh", ["d"], ["y"])],
                          "g", inputs, [oh.make_tensor_value_info("y", TensorProto.FLOAT, [3, 5])], [w])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


@pytest.mark.parametrize("kind", ["dropout", "dropout-mask-fed", "random-like"])
def test_check_holds_random_draws(kind: str) -> None:
    """Each run of a model with Dropout in training mode draws a new mask, so central differences compared noise: a
    model exported for training read MISMATCH on every x (rel. error 0.15-0.57). One sample of the draws is now held
    in both the differences and the gradient model, where the Dropout rule still reads the mask."""
    feeds = {"train": np.array(True)} if kind == "dropout-mask-fed" else None
    report = check_model(_drawing_model(kind), ["y"], ["x", "w"], feeds)
    assert report.ok and all(r.status == OK for r in report.rows), [(r.x, r.status, r.rel_error) for r in report.rows]
    assert len(report.held) == 1 and report.held[0].split()[0] in ("Dropout", "RandomUniformLike")


def test_check_holds_dropout_and_says_so(cli: Cli, tmp_path: Path) -> None:
    model = save(_drawing_model("dropout"), tmp_path / "dropout.onnx")
    r = cli("check", model, "--ys", "y", "--xs", "x", "--xs", "w")
    assert r.code == 0, r.out + r.err
    assert "random draws sampled once and held for every run: Dropout 'd'" in r.out
    r = cli("check", model, "--ys", "y", "--xs", "w", "--json")
    assert r.code == 0 and json.loads(r.out)["held_draws"] == ["Dropout 'd'"]


def test_check_an_x_with_infinite_entries() -> None:
    """An attention mask (0 and -inf) as an x: the -inf entries stay put and the finite ones are checked (each row
    read ``kink`` with a NaN error before)."""
    mask = np.where(np.tril(np.ones((4, 4))) > 0, 0.0, -np.inf).astype(np.float32)
    graph = oh.make_graph([oh.make_node("Add", ["s", "m"], ["a"]), oh.make_node("Softmax", ["a"], ["y"])], "g",
                          [oh.make_tensor_value_info("s", TensorProto.FLOAT, [4, 4])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(mask, "m")])
    report = check_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8), ["y"], ["s", "m"])
    assert [(r.x, r.status) for r in report.rows] == [("s", OK), ("m", OK)]
    assert all(np.isfinite(r.rel_error) and r.rel_error < 1e-6 for r in report.rows)


def _resize_then_slice() -> onnx.ModelProto:
    """x (run-time batch) -> Resize (linear, scales and an empty roi as initializers, as tf2onnx writes Keras'
    UpSampling2D) -> Slice (Keras' Cropping2D) -> y."""
    inits = [numpy_helper.from_array(np.array([1, 1, 2, 2], np.float32), "scales"),
             numpy_helper.from_array(np.zeros(0, np.float32), "roi"),
             numpy_helper.from_array(np.array([1, 0], np.int64), "starts"),
             numpy_helper.from_array(np.array([8, 7], np.int64), "ends"),
             numpy_helper.from_array(np.array([2, 3], np.int64), "axes")]
    nodes = [oh.make_node("Resize", ["x", "roi", "scales"], ["r"], mode="linear"),
             oh.make_node("Slice", ["r", "starts", "ends", "axes"], ["y"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 2, 4, 4])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2, 7, 7])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def test_float64_conversion_keeps_float32_only_inputs() -> None:
    """Resize's scales take float32 alone: converted to float64 they made the model invalid, inference gave no type
    to anything after the Resize, and ``check`` of a Keras UpSampling2D + Cropping2D export stopped with the Slice
    rule's "a filled tensor needs a dtype". The converted model now casts them back, and an empty x (the roi) gets
    a row without differences."""
    model = _resize_then_slice()
    converted = convert_floats(model)
    onnx.checker.check_model(onnx.shape_inference.infer_shapes(converted, strict_mode=True), full_check=True)
    report = check_model(model, ["y"], ["x", "roi"])
    assert [(r.x, r.status) for r in report.rows] == [("x", OK), ("roi", OK)] and report.precision == "float64"
    assert report.rows[1].note == "no elements: nothing to compare" and not report.next_steps()


def test_an_exponent_that_moves_off_its_integer_is_a_kink_that_says_why() -> None:
    """Pow(x, 2) with 2 an initializer (PyTorch's dynamo export of ``d ** 2``) and x < 0: moving the exponent makes
    the loss NaN at every step, a ``kink`` whose next step now says the function is undefined there (it read as a
    kink with a NaN error and the advice to try another seed)."""
    graph = oh.make_graph([oh.make_node("Pow", ["x", "p"], ["y"])], "g",
                          [oh.make_tensor_value_info("x", TensorProto.FLOAT, [3])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [3])],
                          [numpy_helper.from_array(np.array(2.0, np.float32), "p")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    report = check_model(model, ["y"], ["x", "p"], {"x": np.array([-1.5, 0.5, -2.0], np.float32)})
    assert [(r.x, r.status) for r in report.rows] == [("x", OK), ("p", KINK)] and report.ok
    assert report.next_steps() == [f"p: {report.rows[1].note}"] and "undefined next to x" in report.rows[1].note


EXPERIMENTAL_OPS = [("ImageScaler", {"scale": 0.7, "bias": [0.1, -0.2, 0.3]}), ("Scale", {"scale": -1.5}),
                    ("Affine", {"alpha": 2.5, "beta": -0.4}), ("ScaledTanh", {"alpha": 1.7, "beta": 0.6}),
                    ("ParametricSoftplus", {"alpha": 0.8, "beta": 1.3}), ("Crop", {"border": [1, 2, 0, 1]}),
                    ("Crop", {"border": [2, 1, 0, 0], "scale": [3, 2]})]


@pytest.mark.parametrize(("op", "attrs"), EXPERIMENTAL_OPS, ids=[f"{o}-{len(a)}" for o, a in EXPERIMENTAL_OPS])
def test_reference_kernels_of_removed_experimental_ops(op: str, attrs: dict[str, Any]) -> None:
    """onnx's evaluator has no kernel for the experimental ops ONNX removed, onnxruntime only float32 ones: the
    kernels given to the evaluator agree with onnxruntime, and a check after a Conv runs in float64."""
    rng = np.random.default_rng(0)
    nodes = [oh.make_node("Conv", ["x", "w"], ["h"]), oh.make_node(op, ["h"], ["y"], **attrs)]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 6, 7])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(rng.standard_normal((3, 3, 1, 1)).astype(np.float32), "w")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 8)], ir_version=3)
    model.graph.input.append(oh.make_tensor_value_info("w", TensorProto.FLOAT, [3, 3, 1, 1]))
    x = rng.standard_normal((2, 3, 6, 7)).astype(np.float32)
    ours, theirs = (runtime.run(model, {"x": x}, provider=p)["y"] for p in ("reference", "cpu"))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    report = check_model(model, ["y"], ["x", "w"], {"x": x})
    assert report.precision == "float64" and report.ok, [(r.x, r.status) for r in report.rows]
    assert all(r.status == OK and r.rel_error < 1e-8 for r in report.rows), [(r.x, r.rel_error) for r in report.rows]


def _rms_norm_model() -> onnx.ModelProto:
    """x -> MatMul -> T5's RMS norm as PyTorch exports it (Cast, Pow, ReduceMean, Add, Sqrt, Div, Mul) -> y."""
    rng = np.random.default_rng(0)
    inits = [numpy_helper.from_array(rng.standard_normal((8, 8)).astype(np.float32), "w"),
             numpy_helper.from_array(np.array(2.0, np.float32), "two"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(1e-6, np.float32), "eps"),
             numpy_helper.from_array((1 + 0.1 * rng.standard_normal(8)).astype(np.float32), "scale")]
    nodes = [oh.make_node("MatMul", ["x", "w"], ["h0"]), oh.make_node("Cast", ["h0"], ["h"], to=TensorProto.FLOAT),
             oh.make_node("Pow", ["h", "two"], ["p"]), oh.make_node("ReduceMean", ["p"], ["v"], axes=[-1]),
             oh.make_node("Add", ["v", "eps"], ["ve"]), oh.make_node("Sqrt", ["ve"], ["s"]),
             oh.make_node("Div", ["one", "s"], ["r"]), oh.make_node("Mul", ["h", "r"], ["n"]),
             oh.make_node("Mul", ["scale", "n"], ["y"])]
    graph = oh.make_graph(nodes, "rms", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 5, 8])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 5, 8])], inits)
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)


def test_float64_check_runs_the_nodes_as_written() -> None:
    """onnxruntime's SimplifiedLayerNormFusion (T5's RMS norm) moves float64 results by ~1e-6 (a T5 encoder's weights
    read MISMATCH at 1e-5); a float64 check's sessions now run at the basic optimization level, and agree to 1e-10.
    So does any session onnxgrad opens for a float64 model (1e-16 from the reference evaluator, 1.4e-6 before)."""
    report = check_model(_rms_norm_model(), ["y"], ["x", "w", "scale"])
    assert report.precision == "float64" and "onnxruntime" in report.runner
    assert all(r.status == OK and r.rel_error < 1e-8 for r in report.rows), [(r.x, r.rel_error) for r in report.rows]
    model = convert_floats(_rms_norm_model())
    x = np.random.default_rng(1).standard_normal((2, 5, 8))
    ours, reference = (runtime.run(model, {"x": x}, provider=p)["y"] for p in ("cpu", "reference"))
    np.testing.assert_allclose(ours, reference, rtol=1e-13)


def test_a_gradient_too_steep_for_differences_is_a_kink_that_says_so() -> None:
    """Hugging Face's attention mask, (1 - mask) * finfo(float32).min, with its 1 an initializer (as PyTorch's
    dynamo exporter stores it, so @weights takes it): d/d 1 is ~1e40, and any step throws the softmax into
    saturation. It read MISMATCH; it is a kink whose next step says why."""
    mask = np.array([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]], np.float32)
    inits = [numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(np.finfo(np.float32).min, np.float32), "low"),
             numpy_helper.from_array(mask, "mask")]
    nodes = [oh.make_node("Sub", ["one", "mask"], ["off"]), oh.make_node("Mul", ["off", "low"], ["bias"]),
             oh.make_node("Add", ["s", "bias"], ["a"]), oh.make_node("Softmax", ["a"], ["y"], axis=-1)]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("s", TensorProto.FLOAT, [2, 3])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    report = check_model(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8), ["y"],
                         ["s", "one"])
    assert report.ok and [(r.x, r.status) for r in report.rows] == [("s", OK), ("one", KINK)]
    assert "too steep for differences" in report.rows[1].note and report.next_steps()[0].startswith("one: too steep")


def test_float64_conversion_casts_a_shared_scale_once() -> None:
    """Two Resizes reading one scales initializer: one Cast back to float32 (two would define one value twice)."""
    model = _resize_then_slice()
    model.graph.node.append(oh.make_node("Resize", ["x", "roi", "scales"], ["r2"], mode="nearest"))
    model.graph.output.append(oh.make_tensor_value_info("r2", TensorProto.FLOAT, ["n", 2, 8, 8]))
    converted = convert_floats(model)
    onnx.checker.check_model(converted, full_check=True)
    assert [n.op_type for n in converted.graph.node].count("Cast") == 1


def test_info_says_which_inputs_reach_an_output_through_integers_only(cli: Cli, tmp_path: Path) -> None:
    """A quantized input (QuantizeLinear -> DequantizeLinear) is no float dependence: ``info`` said "y: depends on x"
    where ``grad`` gives x no gradient; now it says why, points to --straight-through, and suggests no @inputs."""
    inits = [numpy_helper.from_array(np.array(0.05, np.float32), "s"), numpy_helper.from_array(np.array(0, np.int8),
             "zp"), numpy_helper.from_array(np.ones((4, 3), np.float32), "W")]
    nodes = [oh.make_node("QuantizeLinear", ["x", "s", "zp"], ["q"]), oh.make_node("DequantizeLinear", ["q", "s", "zp"],
             ["dq"]), oh.make_node("MatMul", ["dq", "W"], ["y"])]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 4])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [2, 3])], inits)
    model = save(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8), tmp_path / "qdq.onnx")
    r = cli("info", model)
    assert r.code == 0, r.err
    assert "y: depends on 1 weights\n    and on x only through values that are not float: no gradient (grad " \
           "--straight-through passes one through fake quantisation)" in r.out
    assert f"--ys y --xs {WEIGHTS}\n" in r.out + "\n" and INPUTS not in r.out.split("try:")[1]
    (row,) = describe(model)["differentiable"]["outputs"]
    assert row["through_integers"] == ["x"] and row["quantized"] and row["inputs"] == []


def _box_head(opset: int) -> onnx.ModelProto:
    """x -> scaled per channel -> RoiAlign over run-time boxes (a detector's box head, sampling ratio 2, scale 1/2)
    -> Flatten -> Gemm -> y: R boxes in, R rows out, R = 0 where an image has no proposal on this level."""
    rng = np.random.default_rng(3)
    nodes = [oh.make_node("Mul", ["x", "w"], ["f"]),
             oh.make_node("RoiAlign", ["f", "boxes", "batch"], ["pooled"], output_height=3, output_width=2,
                          sampling_ratio=2, spatial_scale=0.5),
             oh.make_node("Flatten", ["pooled"], ["flat"]),
             oh.make_node("Gemm", ["flat", "fc"], ["y"], transB=1)]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 8, 9]),
                                       oh.make_tensor_value_info("boxes", TensorProto.FLOAT, ["r", 4]),
                                       oh.make_tensor_value_info("batch", TensorProto.INT64, ["r"])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, ["r", 5])],
                          [numpy_helper.from_array(rng.standard_normal((3, 1, 1)).astype(np.float32), "w"),
                           numpy_helper.from_array(rng.standard_normal((5, 18)).astype(np.float32), "fc")])
    return oh.make_model(graph, opset_imports=[oh.make_opsetid("", opset)], ir_version=8)


@pytest.mark.parametrize("opset", [11, 16])
def test_box_head_gradients_with_and_without_boxes(opset: int) -> None:
    """A box head's gradient runs when no box reaches it (a -1 beside a run-time 0 is ambiguous: the one-hot
    scatter of opsets before 16 reshaped to [0, -1] and [-1, 0]) and, with boxes, matches central differences in
    float64 for the image, the weights and the boxes themselves (RoiAlign's samples move with each box's edges)."""
    model = _box_head(opset)
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2, 3, 8, 9)).astype(np.float32)
    empty = {"x": x, "boxes": np.zeros((0, 4), np.float32), "batch": np.zeros(0, np.int64)}
    aug = add_gradients(model, ["y"], ["x", "w", "boxes"])
    out = runtime.run(aug.model, empty)
    dx, dw, dboxes = (out[aug.gradients[n]] for n in ("x", "w", "boxes"))  # type: ignore[index]
    assert (dx.shape, dw.shape, dboxes.shape) == ((2, 3, 8, 9), (3, 1, 1), (0, 4))
    assert not np.any(dx) and not np.any(dw)
    boxes = np.array([[1.3, 0.7, 13.1, 9.6], [4.2, 5.1, 9.9, 15.3], [-2.6, 3.3, 6.1, 8.2]], np.float32)
    report = check_model(model, ["y"], ["x", "w", "boxes"], {**empty, "boxes": boxes, "batch": np.array([0, 1, 1])})
    assert report.precision == "float64" and report.ok, [(r.x, r.status, r.rel_error) for r in report.rows]


def test_reference_roi_align_before_opset_16_has_no_half_pixel_shift() -> None:
    """onnx's evaluator runs every RoiAlign with the latest schema's half-pixel default; before opset 16 the op has
    no shift (onnxruntime agrees), so a float64 check of an older detector (torchvision's at opset 11) differenced
    another function than its gradient's."""
    model = _box_head(11)
    rng = np.random.default_rng(5)
    feeds = {"x": rng.standard_normal((2, 3, 8, 9)), "boxes": rng.uniform(0, 16, (6, 4)).astype(np.float64),
             "batch": np.array([0, 1, 0, 1, 1, 0])}
    feeds["boxes"] = np.concatenate([np.minimum(feeds["boxes"][:, :2], feeds["boxes"][:, 2:]),
                                     np.maximum(feeds["boxes"][:, :2], feeds["boxes"][:, 2:])], axis=1)
    wide = convert_floats(model)
    ours, theirs = (runtime.run(wide, feeds, provider=p)["y"] for p in ("reference", "cpu"))
    np.testing.assert_allclose(ours, theirs, rtol=1e-10, atol=1e-12)


def test_check_between_intermediate_values_of_an_untyped_export() -> None:
    """An exporter writes no value_info: checking from an intermediate x (cut loose as a graph input, which needs a
    type) to an intermediate y (which the differenced model must output) works all the same: Mask R-CNN's
    boxes checked from its region proposals stopped there."""
    rng = np.random.default_rng(6)
    nodes = [oh.make_node("MatMul", ["x", "w"], ["h"]), oh.make_node("Tanh", ["h"], ["t"]),
             oh.make_node("Mul", ["t", "t"], ["s"]), oh.make_node("ReduceSum", ["s"], ["y"], keepdims=0)]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [])],
                          [numpy_helper.from_array(rng.standard_normal((3, 4)).astype(np.float32), "w")])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=8)
    report = check_model(model, ["s"], ["h", "w"], {"x": rng.standard_normal((2, 3)).astype(np.float32)},
                         precision="float32")  # onnxruntime alone (the reference evaluator outputs any value)
    assert report.ok and [r.x for r in report.rows] == ["h", "w"], [(r.x, r.status) for r in report.rows]


def test_reference_loop_runs_as_onnxruntime_does() -> None:
    """A Loop whose condition input is left out runs its trip count, and its scan outputs of rank 2 stack along a
    new axis, as onnxruntime does (onnx's evaluator ran no iteration at all, so a float64 check of a gradient's
    reverse Loop read 0, and it concatenated tf2onnx's crops of crop_and_resize instead of stacking them)."""
    body = oh.make_graph([oh.make_node("Identity", ["c_in"], ["c_out"]), oh.make_node("Mul", ["h", "h"], ["h2"]),
                          oh.make_node("Add", ["h2", "one"], ["h_out"]), oh.make_node("Mul", ["h_out", "grid"], ["s"])],
                         "body",
                         [oh.make_tensor_value_info("i", TensorProto.INT64, []),
                          oh.make_tensor_value_info("c_in", TensorProto.BOOL, []),
                          oh.make_tensor_value_info("h", TensorProto.DOUBLE, [2])],
                         [oh.make_tensor_value_info("c_out", TensorProto.BOOL, []),
                          oh.make_tensor_value_info("h_out", TensorProto.DOUBLE, [2]),
                          oh.make_tensor_value_info("s", TensorProto.DOUBLE, [3, 2])],
                         [numpy_helper.from_array(np.ones(2), "one"),
                          numpy_helper.from_array(np.arange(6.0).reshape(3, 2), "grid")])
    graph = oh.make_graph([oh.make_node("Loop", ["n", "", "x"], ["y", "scans"], body=body)], "g",
                          [oh.make_tensor_value_info("n", TensorProto.INT64, []),
                           oh.make_tensor_value_info("x", TensorProto.DOUBLE, [2])],
                          [oh.make_tensor_value_info("y", TensorProto.DOUBLE, [2]),
                           oh.make_tensor_value_info("scans", TensorProto.DOUBLE, [None, 3, 2])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=8)
    feeds = {"n": np.array(3), "x": np.array([0.5, -0.2])}
    ours, theirs = (runtime.run(model, feeds, provider=p) for p in ("reference", "cpu"))
    assert ours["scans"].shape == theirs["scans"].shape == (3, 3, 2)
    for name in ("y", "scans"):
        np.testing.assert_allclose(ours[name], theirs[name])
    assert not np.allclose(ours["y"], feeds["x"])


def test_float64_conversion_keeps_an_empty_scales_empty() -> None:
    """Resize with sizes and an empty scales initializer (tf2onnx's): the float64 copy gives Resize an empty float32
    constant, which inference still sees is empty (a Cast of it read as a second target: 'Either sizes or scales
    must be provided, but not both', and the whole float64 check fell back to float32)."""
    nodes = [oh.make_node("Resize", ["x", "", "scales", "sizes"], ["y"], mode="linear")]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 1, 3, 4])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, None)],
                          [numpy_helper.from_array(np.zeros(0, np.float32), "scales"),
                           numpy_helper.from_array(np.array([1, 1, 5, 6], np.int64), "sizes")])
    wide = convert_floats(oh.make_model(graph, opset_imports=[oh.make_opsetid("", 13)], ir_version=8))
    inferred = onnx.shape_inference.infer_shapes(wide, strict_mode=True)
    assert [d.dim_value for d in inferred.graph.output[0].type.tensor_type.shape.dim] == [1, 1, 5, 6]


@pytest.mark.parametrize("mode", ["bilinear", "bicubic", "nearest"])
def test_reference_grid_sample_and_gather_elements_agree_with_onnxruntime(mode: str) -> None:
    """onnx's evaluator knows GridSample's modes by opset 20's names alone (RAFT exports opset 16's 'bilinear'),
    and its GatherElements takes at most 64 entries along the axis (a gradient's gathers take more): float64
    checks of such models fell back to float32."""
    rng = np.random.default_rng(7)
    nodes = [oh.make_node("GridSample", ["x", "grid"], ["s"], mode=mode, align_corners=1),
             oh.make_node("Flatten", ["s"], ["f"]),
             oh.make_node("GatherElements", ["f", "i"], ["y"], axis=1)]
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", TensorProto.FLOAT, [1, 2, 9, 10]),
                                       oh.make_tensor_value_info("grid", TensorProto.FLOAT, [1, 8, 9, 2]),
                                       oh.make_tensor_value_info("i", TensorProto.INT64, [1, 100])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [1, 100])])
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 16)], ir_version=8)
    feeds = {"x": rng.standard_normal((1, 2, 9, 10)).astype(np.float32),
             "grid": rng.uniform(-1.1, 1.1, (1, 8, 9, 2)).astype(np.float32),
             "i": rng.integers(-144, 144, (1, 100))}
    ours, theirs = (runtime.run(model, feeds, provider=p)["y"] for p in ("reference", "cpu"))
    np.testing.assert_allclose(ours, theirs, rtol=1e-5, atol=1e-5)
