"""The four examples of tf.gradients' documentation (SEMANTICS.md's last table), as ONNX graphs.

Each runs three ways: ``onnxgrad.gradients`` on an ``onnx_ir.Model``, ``onnxgrad.add_gradients`` on a
ModelProto, and the command line (``onnxgrad grad ... --json``); onnxruntime must then give exactly the
documented values (float32, as in the documentation)."""

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
import onnx_ir as ir
import pytest

import onnxgrad
from onnxgrad.cli import main as cli_main
from tests.graphs import Graph, N, build, run, with_outputs

f32 = np.float32
ZERO, TWO = f32(0.0), f32(2.0)


def _two_a(a: str, b: str, s: str, kind: str) -> Graph:
    """``a = 0.; b = 2 * a; s = a + b`` with ``a`` a Constant node, an initializer or a graph input."""
    nodes = [N(b, "Mul", "two", a), N(s, "Add", a, b)]
    where: dict[str, dict[str, np.ndarray]] = {"consts": {}, "inits": {}, "inputs": {}}
    where[kind][a] = ZERO
    where["consts"]["two"] = TWO
    return Graph(nodes, inputs=where["inputs"], inits=where["inits"], consts=where["consts"], outputs=[s])


ONES = Graph([], consts={"a": np.ones((1, 2), f32), "b": np.ones((3, 1), f32)}, outputs=["b"])


@dataclass
class Example:
    """One documented example: the graph, the gradients() arguments, the documented result."""

    id: str
    graph: Graph
    ys: list[str]
    xs: list[str]
    expected: list[np.ndarray | None]
    kwargs: dict[str, Any] = field(default_factory=dict)
    markers: tuple[str, ...] = ()  # values routed through onnxgrad.stop_gradient first (tf.stop_gradient)

    def model(self) -> onnx.ModelProto:
        proto = build(self.graph)
        if not self.markers:
            return proto
        m = ir.serde.deserialize_model(proto)
        for v in self.markers:
            onnxgrad.stop_gradient(m, v)
        return ir.serde.serialize_model(m)


EXAMPLES = [
    *(Example(f"total-derivative-a-{kind}", _two_a("a", "b", "s", kind), ["s"], ["a", "b"], [f32(3.0), f32(1.0)])
      for kind in ("consts", "inits", "inputs")),
    *(Example(f"stop-gradients-a-{kind}", _two_a("a", "b", "s", kind), ["s"], ["a", "b"], [f32(1.0), f32(1.0)],
              {"stop_gradients": ["a", "b"]})
      for kind in ("consts", "inits", "inputs")),
    # "Note that the above is equivalent to": a = stop_gradient(0.), b = stop_gradient(2a)
    Example("stop-gradient-markers", _two_a("a", "b", "s", "consts"), ["s"], ["a/stop_gradient", "b/stop_gradient"],
            [f32(1.0), f32(1.0)], markers=("a", "b")),
    Example("unconnected-none", ONES, ["b"], ["a"], [None], {"unconnected_gradients": "none"}),
    Example("unconnected-zero", ONES, ["b"], ["a"], [np.zeros((1, 2), f32)], {"unconnected_gradients": "zero"}),
    Example("cost-Ws-bs", _two_a("Ws", "bs", "cost", "consts"), ["cost"], ["Ws", "bs"], [f32(3.0), f32(1.0)]),
]


def assert_documented(ex: Example, got: list[np.ndarray | None]) -> None:
    assert len(got) == len(ex.expected)
    for x, g, want in zip(ex.xs, got, ex.expected, strict=True):
        if want is None:
            assert g is None, f"{ex.id}: d/d{x} should be None, got {g}"
            continue
        assert g is not None, f"{ex.id}: d/d{x} is None, documented {want}"
        assert g.dtype == want.dtype and g.shape == want.shape, f"{ex.id}: d/d{x} is {g.dtype}{g.shape}"
        np.testing.assert_array_equal(g, want)


def via_gradients(ex: Example) -> list[np.ndarray | None]:
    m = ir.serde.deserialize_model(ex.model())
    names = onnxgrad.gradients(m, ex.ys, ex.xs, **ex.kwargs)
    assert len(names) == len(ex.xs)
    if all(n is None for n in names):
        return [None] * len(names)
    results = run(with_outputs(m, names), ex.graph.feeds)
    return [None if n is None else results[n] for n in names]


def via_add_gradients(ex: Example) -> list[np.ndarray | None]:
    proto = ex.model()
    aug = onnxgrad.add_gradients(proto, ex.ys, ex.xs, **ex.kwargs)
    onnx.checker.check_model(aug.model, full_check=True)
    assert [o.name for o in aug.model.graph.output[: len(proto.graph.output)]] == [o.name for o in proto.graph.output]
    results = run(aug.model, ex.graph.feeds)
    return [None if aug.gradients[x] is None else results[aug.gradients[x]] for x in ex.xs]


def cli_args(ex: Example, src: Path, out: Path) -> list[str]:
    args = ["grad", str(src), "-o", str(out), "--json"]
    args += [a for y in ex.ys for a in ("--ys", y)] + [a for x in ex.xs for a in ("--xs", x)]
    args += [a for s in ex.kwargs.get("stop_gradients", []) for a in ("--stop-gradients", s)]
    if "unconnected_gradients" in ex.kwargs:
        args += ["--unconnected-gradients", ex.kwargs["unconnected_gradients"]]
    return args


def cli_results(ex: Example, stdout: str, out: Path) -> list[np.ndarray | None]:
    payload = json.loads(stdout)
    assert set(payload) == {"gradients", "new_inputs"} and payload["new_inputs"] == []
    assert list(payload["gradients"]) == ex.xs
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    results = run(model, ex.graph.feeds)
    return [None if payload["gradients"][x] is None else results[payload["gradients"][x]] for x in ex.xs]


def via_cli(ex: Example, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> list[np.ndarray | None]:
    src, out = tmp_path / "model.onnx", tmp_path / "grad.onnx"
    onnx.save(ex.model(), str(src))
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        cli_main(cli_args(ex, src, out))
    captured = capsys.readouterr()
    assert exit_info.value.code == 0, captured.err
    return cli_results(ex, captured.out, out)


WAYS: dict[str, Callable[..., list[np.ndarray | None]]] = {
    "gradients": via_gradients,
    "add_gradients": via_add_gradients,
}


@pytest.mark.parametrize("ex", EXAMPLES, ids=lambda e: e.id)
@pytest.mark.parametrize("way", list(WAYS))
def test_python_api_gives_documented_values(way: str, ex: Example) -> None:
    assert_documented(ex, WAYS[way](ex))


@pytest.mark.parametrize("ex", EXAMPLES, ids=lambda e: e.id)
def test_cli_gives_documented_values(ex: Example, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert_documented(ex, via_cli(ex, tmp_path, capsys))


@pytest.mark.parametrize("ex", [e for e in EXAMPLES if e.id in ("total-derivative-a-consts", "unconnected-none")],
                         ids=lambda e: e.id)
def test_cli_entry_point_end_to_end(ex: Example, tmp_path: Path) -> None:
    """The installed ``onnxgrad`` script, in its own process."""
    src, out = tmp_path / "model.onnx", tmp_path / "grad.onnx"
    onnx.save(ex.model(), str(src))
    exe = Path(sys.executable).with_name("onnxgrad")
    proc = subprocess.run([str(exe), *cli_args(ex, src, out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert_documented(ex, cli_results(ex, proc.stdout, out))


# ---------------------------------------------------------------------------- the README's expose example
def test_readme_expose_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The README shows one way to make what gradients / hessian_vector_product / jacobian return into outputs."""
    root = Path(__file__).resolve().parents[1]
    blocks = [b for b in re.findall(r"```python\n(.*?)```", (root / "README.md").read_text(), re.S)
              if "onnxgrad.expose(" in b]
    assert len(blocks) == 1, "the README's API text shows onnxgrad.expose in one example"
    (tmp_path / "models").mkdir()
    shutil.copy(root / "models" / "mlp.onnx", tmp_path / "models" / "mlp.onnx")
    monkeypatch.chdir(tmp_path)
    scope: dict[str, Any] = {"__name__": "readme"}
    exec(compile(blocks[0], "README.md", "exec"), scope)
    model, results = scope["model"], scope["results"]
    assert [v.name for v in model.graph.outputs] == ["loss", "pred", "hvp/W1_grad", "hvp/b1_grad"]
    assert list(results) == ["loss", "pred", "hvp/W1_grad", "hvp/b1_grad"]
    assert onnxgrad.expose(model, scope["hv"]) == scope["hv"]  # exposing again adds nothing
    assert len(model.graph.outputs) == 4
