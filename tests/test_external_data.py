"""Models over 2 GB: weights in external data load lazily, differentiate, save with external data
(``<out>.data`` beside the model) and run, without Python ever holding all the weights at once."""

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

from onnxgrad.inspect import add_gradients_lazy, describe, has_external_data, load_lazy, save_external
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
from onnxgrad.inspect import add_gradients_lazy, describe, load_lazy
src, dst = sys.argv[1], sys.argv[2]
info = describe(load_lazy(src))
grads, new_inputs = add_gradients_lazy(src, dst, ["y"], ["@inputs"])
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
    grads, new_inputs = add_gradients_lazy(src, tmp_path / "g.onnx", ["y"], ["x"])
    assert grads == {"x": "gradients/x_grad"} and new_inputs == []
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
