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

from onnxgrad import registry
from onnxgrad.check import KINK, MISMATCH, OK, check_gradients, check_model, convert_floats
from onnxgrad.info import describe
from onnxgrad.shorthands import INPUTS, WEIGHTS, expand_xs
from onnxgrad.workarounds import NO_FLOAT64_KERNELS, is_runtime_error, kernel_gap
from tests.conftest import Cli

ROOT = Path(__file__).resolve().parents[1]
MODELS = ROOT / "models"
MLP = MODELS / "mlp.onnx"
HAS_CUDA = "CUDAExecutionProvider" in ort.get_available_providers()

# example model -> (y, precision expected for `check`)
EXAMPLES = {
    "mlp_classifier.onnx": ("loss", "float64"),
    "cnn.onnx": ("loss", "float32"),  # onnxruntime's CPU Conv has no float64 kernel
    "transformer_block.onnx": ("loss", "float32"),  # ... nor Erf
    "lj_energy.onnx": ("energy", "float64"),
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
    y, precision = EXAMPLES[name]
    r = cli("check", MODELS / name, "--ys", y, "--xs", WEIGHTS, "--xs", INPUTS, "--json")
    assert r.code == 0, r.err
    payload = json.loads(r.out)
    assert payload["ok"] and payload["precision"] == precision
    assert payload["source_types"] == ["float32"]
    assert payload["converted"] == (precision == "float64")
    if precision == "float32":
        assert payload["fallback"] and "no kernel" in payload["fallback"]
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
    assert "precision: float64 (converted from float32), rtol 1e-05" in lines[1]
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
    assert row.status == OK and row.step == 1e-8 and row.tries > 1


def test_smooth_disagreement_is_a_mismatch_not_a_kink(broken_tanh: None) -> None:
    model = one_op_model("Tanh", [3, 2])
    x = np.random.default_rng(1).standard_normal((3, 2))
    report = check_model(model, ["y"], ["x"], {"x": x})
    (row,) = report.rows
    assert not report.ok and row.status == MISMATCH and row.tries == 1


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
    assert f"float inputs ({INPUTS}): image" in out and f"float weights ({WEIGHTS}): 10" in out
    assert "loss: depends on image, 10 weights" in out
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
    with pytest.raises(ValueError, match="no float initializers"):
        expand_xs(one_op_model("Relu", [2]), [WEIGHTS])


def test_expand_xs_on_ir_model_and_describe() -> None:
    import onnx_ir as ir

    m = ir.load(str(MODELS / "lj_energy.onnx"))
    assert expand_xs(m, [WEIGHTS, INPUTS]) == ["sigma", "epsilon", "positions"]
    info = describe(m)
    assert info["weights"]["float_count"] == 2 and info["suggestion"] == f"--ys energy --xs {WEIGHTS} --xs {INPUTS}"
