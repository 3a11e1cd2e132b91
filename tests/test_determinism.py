"""Same input and arguments, same bytes: across calls and across processes (different hash seeds)."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys

import onnx

from onnxgrad import add_gradients
from tests.cases import ALL
from tests.gradcheck import build

SCRIPT = """
import hashlib, sys
sys.path.insert(0, {root!r})
from onnxgrad import add_gradients
from tests.cases import ALL
from tests.gradcheck import build
h = hashlib.sha256()
for case in ALL[::7]:
    model, ys, xs, _ = build(case, dynamic=case.dynamic)
    h.update(add_gradients(model, ys, xs, aggregation_method="experimental_tree").model.SerializeToString())
print(h.hexdigest())
"""


def _digest_here() -> str:
    h = hashlib.sha256()
    for case in ALL[::7]:
        model, ys, xs, _ = build(case, dynamic=case.dynamic)
        h.update(add_gradients(model, ys, xs, aggregation_method="experimental_tree").model.SerializeToString())
    return h.hexdigest()


def test_same_bytes_across_calls() -> None:
    model, ys, xs, _ = build(ALL[0])
    first = add_gradients(model, ys, xs).model.SerializeToString()
    again = add_gradients(model, ys, xs).model.SerializeToString()
    assert first == again


def test_same_bytes_across_processes() -> None:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    digests = set()
    for seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": seed}
        done = subprocess.run([sys.executable, "-c", SCRIPT.format(root=root)], env=env, check=True,
                              capture_output=True, text=True, cwd=root)
        digests.add(done.stdout.strip())
    digests.add(_digest_here())
    assert len(digests) == 1, digests


def test_input_model_object_untouched() -> None:
    model, ys, xs, _ = build(ALL[3])
    before = model.SerializeToString()
    add_gradients(model, ys, xs)
    assert model.SerializeToString() == before
    assert isinstance(model, onnx.ModelProto)
