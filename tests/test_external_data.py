"""Models over 2 GB: weights in external data load lazily, differentiate, save with external data
(``<out>.data`` beside the model) and run, without Python ever holding all the weights at once.

``add_gradients`` decides that path itself (``external_data``), for every order; the command line only calls it."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, numpy_helper
from onnx import helper as oh

import onnxgrad
from onnxgrad import augment
from onnxgrad.cli import main as cli_main
from onnxgrad.info import describe
from onnxgrad.io import has_external_data, load_lazy, save_external
from onnxgrad.runtime import run

ROOT = Path(__file__).resolve().parents[1]
# three float32 weights of 18000 x 10000 (720 MB each): 2.16 GB, the least above protobuf's 2 GiB in round numbers
ROWS, COLS, COUNT = 18_000, 10_000, 3
WEIGHT_BYTES = ROWS * COLS * 4
TOTAL = COUNT * WEIGHT_BYTES
HEAD = [np.arange(4, dtype=np.float32) + 10 * k + 1 for k in range(COUNT)]  # W_k[0, :4]; the rest is zeros


def big_model(folder: Path, rows: int = ROWS, cols: int = COLS) -> Path:
    """y = sum(x * (W1[0:1, 0:4] + W2[0:1, 0:4] + W3[0:1, 0:4])) with W_k external, in one sparse data file
    (only the first bytes of each weight are written; the file system stores the zeros as holes)."""
    size = rows * cols * 4
    data = "big.onnx.data"
    with open(folder / data, "wb") as f:
        for k in range(COUNT):
            f.seek(k * size)
            f.write(HEAD[k].tobytes())
        f.truncate(COUNT * size)
    inits = []
    for k in range(COUNT):
        t = TensorProto(name=f"W{k + 1}", data_type=TensorProto.FLOAT, dims=[rows, cols],
                        data_location=TensorProto.EXTERNAL)
        for key, value in (("location", data), ("offset", str(k * size)), ("length", str(size))):
            t.external_data.add(key=key, value=value)
        inits.append(t)
    inits += [numpy_helper.from_array(np.array([0, 0], np.int64), "starts"),
              numpy_helper.from_array(np.array([1, 4], np.int64), "ends")]
    nodes = []
    for k in range(COUNT):
        nodes += [oh.make_node("Slice", [f"W{k + 1}", "starts", "ends"], [f"head{k}"], name=f"slice{k}"),
                  oh.make_node("Mul", ["x", f"head{k}"], [f"part{k}"], name=f"mul{k}")]
    nodes += [oh.make_node("Sum", [f"part{k}" for k in range(COUNT)], ["s"], name="sum"),
              oh.make_node("ReduceSum", ["s"], ["y"], name="total", keepdims=0)]
    graph = oh.make_graph(nodes, "big", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [])], initializer=inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    path = folder / "big.onnx"
    onnx.save(model, path)
    return path


# run in a fresh interpreter, so its peak resident memory is this flow's alone
FLOW = """
import json, sys, numpy as np
import onnxgrad
from onnxgrad.info import describe
from onnxgrad.io import load_lazy
src, dst = sys.argv[1], sys.argv[2]
info = describe(load_lazy(src))
aug = onnxgrad.add_gradients(src, ["y"], ["@inputs"], output=dst)  # weights in external data: they stay on disk
grads, new_inputs = aug.gradients, aug.new_inputs
# VmHWM is this process's own high-water mark (ru_maxrss would carry the forking parent's over exec)
peak = next(int(line.split()[1]) * 1024 for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"grads": grads, "new_inputs": new_inputs, "peak": peak, "weight_bytes": info["weights"]["bytes"],
                  "external": info["weights"]["external"]}))
"""

RUN = """
import json, sys, numpy as np, onnxruntime as ort
opts = ort.SessionOptions(); opts.log_severity_level = 3
sess = ort.InferenceSession(sys.argv[1], opts, providers=["CPUExecutionProvider"])
x = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]], np.float32)
y, g = sess.run(["y", sys.argv[2]], {"x": x})
print(json.dumps({"y": float(y), "grad": g.tolist()}))
"""


def _python(code: str, *args: str | Path) -> dict[str, object]:
    proc = subprocess.run([sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_model_over_2gb_differentiates_with_external_data(tmp_path_factory: pytest.TempPathFactory) -> None:
    folder = tmp_path_factory.mktemp("big")
    try:
        need = TOTAL + 512 * 2**20  # the output's data file (the source is sparse) and some room
        free = shutil.disk_usage(folder).free
        if free < need:
            pytest.skip(f"needs {need / 1e9:.1f} GB of free disk in {folder}, has {free / 1e9:.1f} GB")
        src = big_model(folder)
        assert TOTAL > 2**31 and os.path.getsize(folder / "big.onnx.data") == TOTAL
        assert has_external_data(src)
        dst = folder / "out" / "big_grad.onnx"
        result = _python(FLOW, src, dst)
        assert result["grads"] == {"x": "gradients/x_grad"} and result["new_inputs"] == []
        assert result["weight_bytes"] == TOTAL + 32 and result["external"] == COUNT
        # the weights are streamed from one file to the other, never all in memory at once
        assert result["peak"] < WEIGHT_BYTES, f"peak resident memory {result['peak'] / 1e9:.2f} GB"

        out = onnx.load(dst, load_external_data=False)
        external = [t for t in out.graph.initializer if t.data_location == TensorProto.EXTERNAL]
        assert sorted(t.name for t in external) == ["W1", "W2", "W3"]
        assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"big_grad.onnx.data"}
        assert os.path.getsize(dst.parent / "big_grad.onnx.data") >= TOTAL
        assert [o.name for o in out.graph.output] == ["y", "gradients/x_grad"]
        onnx.checker.check_model(str(dst), full_check=True)

        ran = _python(RUN, dst, "gradients/x_grad")
        head = sum(HEAD)
        x = np.array([[1.0, 2.0, 3.0, 4.0], [0.5, 0.0, -1.0, 2.0]])
        assert ran["y"] == pytest.approx(float(np.sum(x * head)))
        np.testing.assert_allclose(ran["grad"], np.broadcast_to(head, (2, 4)))
    finally:
        shutil.rmtree(folder, ignore_errors=True)  # pytest keeps old tmp folders: do not leave 4 GB behind


def test_small_model_with_external_data_round_trip(tmp_path: Path) -> None:
    src = big_model(tmp_path, rows=64, cols=32)
    info = describe(src)
    assert info["weights"]["external"] == COUNT and info["weights"]["bytes"] == COUNT * 64 * 32 * 4 + 32
    aug = onnxgrad.add_gradients(src, ["y"], ["x"], output=tmp_path / "g.onnx")
    assert aug.gradients == {"x": "gradients/x_grad"} and aug.new_inputs == []
    assert (tmp_path / "g.onnx.data").exists()
    x = np.ones((3, 4), np.float32)
    got = run(str(tmp_path / "g.onnx"), {"x": x})
    np.testing.assert_allclose(got["gradients/x_grad"], np.broadcast_to(sum(HEAD), (3, 4)))


def test_save_external_refuses_to_overwrite_its_source(tmp_path: Path) -> None:
    src = big_model(tmp_path, rows=8, cols=8)
    model = load_lazy(src)
    (tmp_path / "w").mkdir()
    with pytest.raises(ValueError, match="holds the source model's weights"):
        save_external(model, tmp_path / "big.onnx")  # its data file would be big.onnx.data, the source's
    save_external(model, tmp_path / "w" / "copy.onnx")
    again = onnx.load(tmp_path / "w" / "copy.onnx")
    np.testing.assert_array_equal(numpy_helper.to_array(again.graph.initializer[0])[0, :4], HEAD[0])


# ---------------------------------------------------------------------------- add_gradients decides the path
CURVED_W = np.linspace(-1.0, 1.0, 16 * 20, dtype=np.float32).reshape(16, 20)  # 1280 bytes: over 1 kB
CURVED_X = np.array([[0.3, -1.2, 0.8, 2.0], [1.5, 0.1, -0.4, -0.9]], np.float32)
CURVED_V = np.array([[1.0, -0.5, 2.0, 0.25], [-1.5, 0.75, 0.5, 1.0]], np.float32)


def curved_model(folder: Path, external: bool = True) -> Path:
    """y = sum(tanh(x * W[0:1, 0:4])): curved in x, so its second derivative is not zero; W (and the slice bounds)
    in external data ``curved.onnx.data`` when ``external``."""
    inits = [numpy_helper.from_array(CURVED_W, "W"), numpy_helper.from_array(np.array([0, 0], np.int64), "starts"),
             numpy_helper.from_array(np.array([1, 4], np.int64), "ends")]
    nodes = [oh.make_node("Slice", ["W", "starts", "ends"], ["head"], name="slice"),
             oh.make_node("Mul", ["x", "head"], ["z"], name="mul"), oh.make_node("Tanh", ["z"], ["t"], name="tanh"),
             oh.make_node("ReduceSum", ["t"], ["y"], name="total", keepdims=0)]
    graph = oh.make_graph(nodes, "curved", [oh.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
                          [oh.make_tensor_value_info("y", TensorProto.FLOAT, [])], initializer=inits)
    model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    path = folder / "curved.onnx"
    onnx.save_model(model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
                    location="curved.onnx.data", size_threshold=0)
    return path


def curved_expected() -> dict[str, np.ndarray]:
    """By hand: dy/dx = (1 - t^2) w and (H v)_x = -2 t (1 - t^2) w^2 v, with w = W[0, :4], t = tanh(x w)."""
    x, v, w = CURVED_X.astype(np.float64), CURVED_V.astype(np.float64), CURVED_W[0, :4].astype(np.float64)
    t = np.tanh(x * w)
    return {"first": (1 - t * t) * w, "second": -2 * t * (1 - t * t) * w * w * v}


def assert_order_two(out: Path, higher: dict[str, dict[str, str | None]] | dict[int, dict[str, str | None]]) -> None:
    """OUT has the first- and second-order outputs, written with its tensors in OUT.data, and they are right."""
    second = {str(k): found for k, found in higher.items()}
    assert second == {"2": {"x": "gradients_order2/x_grad"}}
    written = onnx.load(str(out), load_external_data=False)
    assert [o.name for o in written.graph.output] == ["y", "gradients/x_grad", "gradients_order2/x_grad"]
    assert [i.name for i in written.graph.input] == ["x", "gradients_order2/x_v"]
    assert {t.name for t in written.graph.initializer if t.data_location == TensorProto.EXTERNAL} >= {"W"}
    assert (out.parent / f"{out.name}.data").exists()
    got = run(str(out), {"x": CURVED_X, "gradients_order2/x_v": CURVED_V})
    want = curved_expected()
    np.testing.assert_allclose(got["gradients/x_grad"], want["first"], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got["gradients_order2/x_grad"], want["second"], rtol=1e-5, atol=1e-6)


def test_cli_order_2_on_a_model_with_external_data(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``grad --order 2`` once took the external-data path and dropped the order: exit 0, first order only."""
    src, out = curved_model(tmp_path), tmp_path / "out" / "g.onnx"
    assert has_external_data(src)
    with pytest.raises(SystemExit) as code:
        cli_main(["grad", str(src), "-o", str(out), "--ys", "y", "--xs", "x", "--order", "2", "--json"])
    captured = capsys.readouterr()
    assert code.value.code == 0, captured.err
    payload = json.loads(captured.out)
    assert payload["gradients"] == {"x": "gradients/x_grad"}
    assert payload["new_inputs"] == ["gradients_order2/x_v"]
    assert_order_two(out, payload["higher"])


@pytest.mark.parametrize(
    ("source", "external_data", "lazy", "data_file"),
    [
        ("external-file", "auto", True, True),  # a file with external data, and an output: weights stay on disk
        ("external-file", True, True, True),
        ("external-file", False, False, False),  # read whole; a small result is written in one file
        ("plain-file", "auto", False, False),
        ("plain-file", True, True, True),  # forced: read lazily (nothing to leave on disk), written with OUT.data
        ("proto", "auto", False, False),
        ("proto", True, False, True),  # a ModelProto is in memory already; its result still goes to OUT.data
    ],
)
def test_add_gradients_decides_the_path_for_every_order(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, source: str, external_data: bool | str, lazy: bool,
    data_file: bool,
) -> None:
    loaded: list[object] = []
    real = augment.load_lazy
    monkeypatch.setattr(augment, "load_lazy", lambda path: loaded.append(path) or real(path))
    path = curved_model(tmp_path, external=source == "external-file")
    model: Path | onnx.ModelProto = onnx.load(str(path)) if source == "proto" else path
    out = tmp_path / "g.onnx"
    aug = onnxgrad.add_gradients(model, "y", "x", order=2, external_data=external_data, output=out)  # type: ignore[arg-type]
    assert bool(loaded) == lazy
    assert (tmp_path / "g.onnx.data").exists() == data_file
    assert aug.gradients == {"x": "gradients/x_grad"} and aug.new_inputs == ["gradients_order2/x_v"]
    if data_file:
        assert_order_two(out, aug.higher or {})
    got = run(str(out), {"x": CURVED_X, "gradients_order2/x_v": CURVED_V})
    np.testing.assert_allclose(got["gradients_order2/x_grad"], curved_expected()["second"], rtol=1e-5, atol=1e-6)


def test_add_gradients_without_output_keeps_the_result_in_memory(tmp_path: Path) -> None:
    src = curved_model(tmp_path)
    aug = onnxgrad.add_gradients(src, "y", "x", order=2)  # "auto" and no output: every weight read into memory
    assert not any(t.data_location == TensorProto.EXTERNAL for t in aug.model.graph.initializer)
    got = run(aug.model, {"x": CURVED_X, "gradients_order2/x_v": CURVED_V})
    np.testing.assert_allclose(got["gradients_order2/x_grad"], curved_expected()["second"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="pass output=PATH"):
        onnxgrad.add_gradients(src, "y", "x", external_data=True)
    with pytest.raises(ValueError, match="external_data must be"):
        onnxgrad.add_gradients(src, "y", "x", external_data="yes", output=tmp_path / "g.onnx")  # type: ignore[arg-type]
    assert not (tmp_path / "g.onnx").exists()
