"""Hostile input to ``onnxgrad grad``: truncated, corrupt and non-ONNX files, graphs with a cycle, dangling
or doubly defined values, versions newer than onnx knows, an empty graph, a place OUT cannot be written.

One table, one row per case: the model file to write, the arguments, the exit code (2 for usage errors, 1 for
errors in the model) and a fragment of the one line on stderr. Every row also checks that stderr is that one
line with no traceback, stdout is empty, and the folder holding MODEL and OUT is exactly as before (MODEL's bytes
unchanged, no OUT, no temporary file, no new folder). Cases that only look hostile (a 0-sized tensor, an
unknown op off the path, a graph without nodes) must work, and run. The README's hostile-input table is
checked against these rows and ``tests/test_cli.py``'s error rows, so each of its lines has a test.
"""

from __future__ import annotations

import io
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto as TP
from onnx import helper as oh

import onnxgrad
from onnxgrad import augment
from onnxgrad.cli import grad_cmd, main
from onnxgrad.runtime import run
from tests.test_cli import ERROR_CASES, MLP, ROOT, console_script

IR = 8
Writer = Callable[[Path], None]


def model(nodes: list[onnx.NodeProto], inputs: list[onnx.ValueInfoProto], outputs: list[onnx.ValueInfoProto],
          inits: list[onnx.TensorProto] | None = None, opset: int = 17, ir_version: int = IR,
          functions: list[onnx.FunctionProto] | None = None, domains: dict[str, int] | None = None) -> onnx.ModelProto:
    graph = oh.make_graph(nodes, "g", inputs, outputs, initializer=inits or [])
    imports = [oh.make_opsetid("", opset), *(oh.make_opsetid(d, v) for d, v in (domains or {}).items())]
    return oh.make_model(graph, ir_version=ir_version, opset_imports=imports, functions=functions or [])


def f32(name: str, shape: list[int | str] | tuple[int, ...] = (2,)) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, TP.FLOAT, list(shape))


def node(op: str, inputs: list[str], outputs: list[str], name: str = "", **attrs: object) -> onnx.NodeProto:
    return oh.make_node(op, inputs, outputs, name=name, **attrs)


def proto(m: onnx.ModelProto) -> Writer:
    return lambda p: p.write_bytes(m.SerializeToString())


def raw(data: bytes) -> Writer:
    return lambda p: p.write_bytes(data)


def npy_bytes(savez: bool = False) -> bytes:
    buf = io.BytesIO()
    if savez:
        np.savez(buf, x=np.ones(3))
    else:
        np.save(buf, np.ones(3))
    return buf.getvalue()


def cut_after_graph() -> bytes:
    """MLP's bytes up to the end of its graph: what a copy cut short there leaves (it still parses)."""
    whole = MLP.read_bytes()
    head = onnx.ModelProto()
    head.CopyFrom(onnx.load(MLP))
    del head.opset_import[:], head.metadata_props[:], head.functions[:]
    cut = head.SerializeToString()
    assert whole.startswith(cut) and len(cut) < len(whole)
    return cut


def with_subgraph_dangling() -> onnx.ModelProto:
    then = oh.make_graph([node("Neg", ["ghost"], ["t"])], "then", [], [f32("t")])
    other = oh.make_graph([node("Neg", ["x"], ["e"])], "else", [], [f32("e")])
    return model([node("If", ["c"], ["y"], then_branch=then, else_branch=other)],
                 [f32("x"), oh.make_tensor_value_info("c", TP.BOOL, [])], [f32("y")])


def only_custom_domain() -> onnx.ModelProto:
    m = model([node("Neg", ["x"], ["y"])], [f32("x")], [f32("y")])
    m.opset_import[0].domain = "my.ops"
    return m


def my_foo() -> onnx.FunctionProto:
    """my.ops::Foo(a) = -a, a model-local function: onnxruntime runs it, onnxgrad has no rule for it."""
    return oh.make_function("my.ops", "Foo", ["a"], ["b"], [node("Neg", ["a"], ["b"])],
                            opset_imports=[oh.make_opsetid("", 17)])


def with_foo() -> onnx.ModelProto:
    """y = x * x and, beside it, f = Foo(x) from an unnamed node."""
    return model([node("Mul", ["x", "x"], ["y"]), node("Foo", ["x"], ["f"], domain="my.ops")],
                 [f32("x")], [f32("y"), f32("f")], functions=[my_foo()], domains={"my.ops": 1})


W = onnx.numpy_helper.from_array(np.ones((4, 3), np.float32), "W")
X_Y = ["--ys", "y", "--xs", "x"]
LOSS_W2 = ["--ys", "loss", "--xs", "W2"]


@dataclass
class Hostile:
    """``onnxgrad grad MODEL -o OUT ARGS`` on a hostile MODEL (``{model}`` in args: MODEL's path)."""

    id: str
    write: Writer
    args: list[str]
    code: int
    message: str


HOSTILE = [
    # files that are not (whole) ONNX models
    Hostile("truncated", raw(MLP.read_bytes()[:500]), LOSS_W2, 1,
            "is not a valid ONNX model (truncated or corrupt: "),
    Hostile("truncated-after-graph", raw(cut_after_graph()), LOSS_W2, 1,
            "is not a valid ONNX model (no opset_import: truncated?)"),
    Hostile("npy-file", raw(npy_bytes()), LOSS_W2, 1, "is not a valid ONNX model (it is a NumPy .npy file)"),
    Hostile("npz-file", raw(npy_bytes(savez=True)), LOSS_W2, 1, "is not a valid ONNX model (it is a zip archive"),
    Hostile("png-file", raw(b"\x89PNG\r\n\x1a\n" + bytes(range(256))), LOSS_W2, 1,
            "is not a valid ONNX model (it is a PNG image)"),
    Hostile("json-file", raw(b'{"graph": {"node": []}}\n'), LOSS_W2, 1,
            "is not a valid ONNX model (it is a JSON text file)"),
    Hostile("tensor-proto-file", raw(onnx.numpy_helper.from_array(np.ones((2, 3), np.float32)).SerializeToString()),
            LOSS_W2, 1, "is not a valid ONNX model (no graph or IR version)"),
    Hostile("model-is-a-folder", lambda p: p.mkdir(), LOSS_W2, 2, "is a directory"),
    # graphs that break ONNX's rules
    Hostile("cycle", proto(model([node("Add", ["x", "b"], ["a"]), node("Neg", ["a"], ["b"]),
                                  node("Mul", ["a", "x"], ["y"])], [f32("x")], [f32("y")])), X_Y, 1,
            "the graph has a cycle: 'a' -> 'b' -> 'a' (each value feeds the next): an ONNX graph must be acyclic"),
    Hostile("not-sorted", proto(model([node("Mul", ["a", "x"], ["y"], "mul"), node("Neg", ["x"], ["a"], "neg")],
                                      [f32("x")], [f32("y")])), X_Y, 1,
            "node 'mul' (Mul) reads 'a' before node 'neg' (Neg) computes it: the nodes are not in topological order"),
    Hostile("dangling-input", proto(model([node("Add", ["x", "ghost"], ["a"], "add"), node("Mul", ["a", "x"], ["y"])],
                                          [f32("x")], [f32("y")])), X_Y, 1,
            "node 'add' (Add) reads 'ghost', which no node, graph input or initializer defines (a dangling input)"),
    Hostile("dangling-input-unnamed-node-in-subgraph", proto(with_subgraph_dangling()), X_Y, 1,
            "node #0 (Neg, unnamed) in subgraph 'then' reads 'ghost', which no node"),
    Hostile("dangling-output", proto(model([node("Neg", ["x"], ["y"])], [f32("x")], [f32("y"), f32("nowhere")])),
            X_Y, 1, "graph output 'nowhere' is defined by no node, graph input or initializer (a dangling output)"),
    Hostile("duplicate-value", proto(model([node("Neg", ["x"], ["a"], "neg"), node("Exp", ["x"], ["a"], "exp"),
                                            node("Mul", ["a", "x"], ["y"])], [f32("x")], [f32("y")])), X_Y, 1,
            "value 'a' is defined twice, by node 'neg' (Neg) and by node 'exp' (Exp): every value of an ONNX graph "
            "must have exactly one producer"),
    Hostile("node-redefines-input", proto(model([node("Neg", ["x"], ["x"], "neg"), node("Mul", ["x", "x"], ["y"])],
                                                [f32("x")], [f32("y")])), X_Y, 1,
            "value 'x' is defined twice, by a graph input and by node 'neg' (Neg)"),
    Hostile("duplicate-initializer", proto(model([node("MatMul", ["x", "W"], ["y"])], [f32("x", [2, 4])],
                                                 [f32("y", [2, 3])], inits=[W, W])), ["--ys", "y", "--xs", "W"], 1,
            "value 'W' is defined twice, by an initializer and by an initializer"),
    Hostile("empty-graph", proto(model([], [], [])), X_Y, 1,
            "the graph 'g' is empty (no nodes, inputs or initializers): nothing to differentiate"),
    Hostile("checker-rejects-input", proto(model([node("Neg", ["x"], ["y"]), node("Frob", ["x"], ["z"])],
                                                 [f32("x")], [f32("y"), f32("z")])), X_Y, 1,
            "is not a valid ONNX model (onnx.checker: No Op registered for Frob with domain_version of 17"),
    # versions
    Hostile("opset-newer-than-onnx", proto(model([node("Neg", ["x"], ["y"])], [f32("x")], [f32("y")], opset=99)),
            X_Y, 1, f"the model imports ai.onnx opset 99, newer than onnx {onnx.__version__} knows "
                    f"(up to {onnx.defs.onnx_opset_version()})"),
    Hostile("ir-version-newer-than-onnx", proto(model([node("Neg", ["x"], ["y"])], [f32("x")], [f32("y")],
                                                      ir_version=99)), X_Y, 1,
            f"the model has IR version 99, newer than onnx {onnx.__version__} knows (up to {onnx.IR_VERSION})"),
    Hostile("no-ai-onnx-opset", proto(only_custom_domain()), X_Y, 1, "the model imports no ai.onnx opset"),
    Hostile("old-opset-converter-fails", proto(model([node("MatMul", ["x", "W"], ["y"])], [f32("x", [2, 4])],
                                                     [f32("y", [2, 3])], inits=[W], opset=6, ir_version=3)),
            X_Y, 1, "the model imports ai.onnx opset 6; onnx's version converter could not bring it to opset 7, "
                    "the oldest onnxgrad differentiates: Input W is undefined!"),
    # what to differentiate
    Hostile("no-rule-on-path-unnamed-node", proto(with_foo()), ["--ys", "f", "--xs", "x"], 1,
            "no gradient rule for node #1 (unnamed) (op_type 'Foo', domain 'my.ops', opset 1)"),
    Hostile("op-that-onnx-does-not-have-on-path", proto(model([node("Erfc", ["x"], ["y"], "erfc")], [f32("x")],
                                                              [f32("y")])), X_Y, 1,
            "'Erfc' is no operator of ONNX at any opset: no runtime runs this model as it is"),
    # tf2onnx's ComplexAbs before a Pow: the Pow's rule needs its base's type, which nothing could infer
    Hostile("op-that-onnx-does-not-have-before-a-typed-rule",
            proto(model([node("ComplexAbs", ["x"], ["a"], "abs"), node("Pow", ["a", "two"], ["y"], "pow")],
                        [f32("x")], [f32("y")], inits=[onnx.numpy_helper.from_array(np.array(2.0, np.float32),
                                                                                    "two")])), X_Y, 1,
            "no gradient rule for node 'abs' (op_type 'ComplexAbs'"),
    Hostile("removed-experimental-op-on-path", proto(model([node("ATen", ["x"], ["y"], "aten")], [f32("x")],
                                                           [f32("y")], opset=8)), X_Y, 1,
            "'ATen' is an experimental op ONNX has removed (onnxruntime still runs some)"),
    # where OUT goes
    Hostile("out-under-a-file", lambda p: shutil.copy(MLP, p), [*LOSS_W2, "-o", "{model}/out.onnx"], 1,
            "cannot write '{model}/out.onnx': '{model}' is not a folder"),
    Hostile("out-in-new-folder-model-error", proto(model([], [], [])), [*X_Y, "-o", "{tmp}/new/out.onnx"], 1,
            "is empty"),
    Hostile("out-is-a-folder", lambda p: shutil.copy(MLP, p), [*LOSS_W2, "-o", "{tmp}"], 2, "is a directory"),
]


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every file (with its bytes) and folder (None) under ``folder``."""
    return {str(p.relative_to(folder)): None if p.is_dir() else p.read_bytes() for p in sorted(folder.rglob("*"))}


def call(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exc:
        main(args)
    out, err = capsys.readouterr()
    code = exc.value.code
    return (code if isinstance(code, int) else 1), out, err


def prepare(case: Hostile, tmp_path: Path) -> tuple[Path, list[str]]:
    path = tmp_path / "model.onnx"
    case.write(path)
    args = [a.replace("{model}", str(path)).replace("{tmp}", str(tmp_path)) for a in case.args]
    if "-o" not in args:
        args += ["-o", str(tmp_path / "out.onnx")]
    return path, ["grad", str(path), *args]


@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.id)
def test_hostile_input(case: Hostile, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, args = prepare(case, tmp_path)
    before = tree(tmp_path)
    code, out, err = call(args, capsys)
    assert code == case.code, err
    assert out == ""
    assert len(err.splitlines()) == 1 and err.startswith("onnxgrad: error: "), err
    assert "Traceback" not in err
    assert case.message.replace("{model}", str(path)) in err
    if case.id in INVALID:  # a broken graph is named as an invalid model, then what is wrong with it
        assert err.startswith(f"onnxgrad: error: '{path}' is not a valid ONNX model: {case.message}"), err
    assert tree(tmp_path) == before  # MODEL unchanged; no OUT, no temporary file, no new folder


@pytest.mark.parametrize("case_id", ["truncated", "cycle", "dangling-input"])
def test_hostile_input_in_a_real_process(case_id: str, tmp_path: Path) -> None:
    """The installed command: nothing else reaches stderr (no library logging, no warnings)."""
    case = next(c for c in HOSTILE if c.id == case_id)
    _, args = prepare(case, tmp_path)
    before = tree(tmp_path)
    p = subprocess.run([*console_script(), *args], capture_output=True, text=True, timeout=300)
    assert p.returncode == case.code and p.stdout == ""
    assert p.stderr.splitlines() == [p.stderr.strip()] and case.message in p.stderr, p.stderr
    assert tree(tmp_path) == before


# ---------------------------------------------------------------------------- the same errors from the API
INVALID = {"cycle", "not-sorted", "dangling-input", "dangling-input-unnamed-node-in-subgraph", "dangling-output",
           "duplicate-value", "node-redefines-input", "duplicate-initializer"}
STRUCTURAL = [c for c in HOSTILE if c.id in {
    "cycle", "not-sorted", "dangling-input", "dangling-input-unnamed-node-in-subgraph", "dangling-output",
    "duplicate-value", "node-redefines-input", "duplicate-initializer", "empty-graph", "opset-newer-than-onnx",
    "ir-version-newer-than-onnx", "no-ai-onnx-opset"}]


@pytest.mark.parametrize("case", STRUCTURAL, ids=lambda c: c.id)
def test_add_gradients_raises_the_same_error(case: Hostile, tmp_path: Path) -> None:
    case.write(tmp_path / "m.onnx")
    m = onnx.load(tmp_path / "m.onnx")
    before = m.SerializeToString()
    ys, xs = case.args[1], case.args[3]
    with pytest.raises(ValueError, match=re.escape(case.message)):
        onnxgrad.add_gradients(m, ys, xs)
    assert m.SerializeToString() == before


@pytest.mark.parametrize("case_id", ["cycle", "not-sorted", "empty-graph", "opset-newer-than-onnx"])
def test_gradients_on_an_ir_model_raises_the_same_error(case_id: str, tmp_path: Path) -> None:
    """An onnx_ir.Model deserialized from a hostile file (onnx_ir builds these without complaint)."""
    case = next(c for c in HOSTILE if c.id == case_id)
    case.write(tmp_path / "m.onnx")
    m = ir.load(tmp_path / "m.onnx")
    before = ir.serde.serialize_model(m).SerializeToString()
    with pytest.raises(ValueError, match=re.escape(case.message)):
        onnxgrad.gradients(m, "y", "x")
    assert ir.serde.serialize_model(m).SerializeToString() == before


def test_dangling_input_in_a_hand_built_ir_model() -> None:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    ghost = ir.Value(name="ghost", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2]))
    add = ir.Node("", "Add", [x, ghost], num_outputs=1, name="add")
    add.outputs[0].name = "y"
    graph = ir.Graph([x], [add.outputs[0]], nodes=[add], opset_imports={"": 17}, name="g")
    with pytest.raises(ValueError, match="node 'add' \\(Add\\) reads 'ghost', which no node, graph input"):
        onnxgrad.gradients(ir.Model(graph, ir_version=IR), "y", "x")


# ---------------------------------------------------------------------------- hostile-looking, but fine
@dataclass
class Fine:
    """``onnxgrad grad`` succeeds; ``check`` runs the written model and looks at the gradient."""

    id: str
    model: onnx.ModelProto
    args: list[str]
    feeds: dict[str, np.ndarray]
    check: Callable[[dict[str, np.ndarray]], None]
    note: str = ""  # what the one line ``onnxgrad: note: ...`` on stderr says (nothing on stderr when empty)


def zero_sized(batch: int | str) -> onnx.ModelProto:
    """s = sum(tanh(x @ W)) with x of shape [batch, 4]: fed a [0, 4] tensor."""
    return model([node("MatMul", ["x", "W"], ["h"]), node("Tanh", ["h"], ["t"]),
                  node("ReduceSum", ["t"], ["s"], keepdims=0)], [f32("x", [batch, 4])], [f32("s", [])], inits=[W])


def empty_x_gradients(r: dict[str, np.ndarray]) -> None:
    assert r["gradients/x_grad"].shape == (0, 4) and r["gradients/x_grad"].dtype == np.float32
    np.testing.assert_array_equal(r["gradients/W_grad"], np.zeros((4, 3), np.float32))  # a sum over no rows


def times_cast(kind: int, name: str) -> onnx.ModelProto:
    """y = x * Cast(n) with n an integer or bool graph input: n carries no gradient."""
    return model([node("Cast", [name], ["nf"], to=TP.FLOAT), node("Mul", ["x", "nf"], ["y"])],
                 [f32("x"), oh.make_tensor_value_info(name, kind, [2])], [f32("y")])


X2 = {"x": np.array([0.5, -2.0], np.float32)}
N2 = {"n": np.array([3, -1], np.int64)}
EMPTY = {"x": np.zeros((0, 4), np.float32)}
FINE = [
    Fine("zero-sized-input-static", zero_sized(0), ["--ys", "s", "--xs", "x", "--xs", "W"], EMPTY,
         empty_x_gradients),
    Fine("zero-sized-input-symbolic", zero_sized("batch"), ["--ys", "s", "--xs", "x", "--xs", "W"], EMPTY,
         empty_x_gradients),
    Fine("unknown-op-off-the-path", with_foo(), X_Y, X2,
         lambda r: np.testing.assert_allclose(r["gradients/x_grad"], 2 * X2["x"])),
    Fine("graph-without-nodes", model([], [f32("x")], [f32("x")]), ["--ys", "x", "--xs", "x"], X2,
         lambda r: np.testing.assert_array_equal(r["gradients/x_grad"], np.ones(2, np.float32))),
    # an integer or bool x is unconnected (as in tf.gradients), with a note
    Fine("integer-xs", times_cast(TP.INT64, "n"), ["--ys", "y", "--xs", "x", "--xs", "n"], X2 | N2,
         lambda r: (np.testing.assert_array_equal(r["gradients/x_grad"], N2["n"].astype(np.float32)),
                    None if "gradients/n_grad" not in r else pytest.fail("n has a gradient")),
         note="xs: 'n' is INT64 (only float values carry gradients): unconnected, so None"),
    Fine("bool-xs", times_cast(TP.BOOL, "b"), ["--ys", "y", "--xs", "b"], X2 | {"b": np.array([True, False])},
         lambda r: None if not any(k.startswith("gradients/") for k in r) else pytest.fail("b has a gradient"),
         note="xs: 'b' is BOOL (only float values carry gradients): unconnected, so None"),
]


@pytest.mark.parametrize("case", FINE, ids=lambda c: c.id)
def test_hostile_looking_input_works(case: Fine, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path, out = tmp_path / "model.onnx", tmp_path / "out.onnx"
    onnx.save(case.model, path)
    before = path.read_bytes()
    code, _, err = call(["grad", str(path), "-o", str(out), *case.args], capsys)
    assert code == 0, err
    assert err.splitlines() == ([f"onnxgrad: note: {case.note}"] if case.note else []), err
    assert path.read_bytes() == before
    onnx.checker.check_model(str(out), full_check=True)
    case.check(run(onnx.load(out), case.feeds))


def test_a_note_is_one_line_in_a_real_process(tmp_path: Path) -> None:
    """The installed command shows onnxgrad's warnings as one line each, never Python's two-line warning."""
    case = next(c for c in FINE if c.id == "integer-xs")
    path = tmp_path / "model.onnx"
    onnx.save(case.model, path)
    p = subprocess.run([*console_script(), "grad", str(path), "-o", str(tmp_path / "out.onnx"), *case.args],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    assert p.stderr.splitlines() == [f"onnxgrad: note: {case.note}"]


# ---------------------------------------------------------------------------- the README's table
def readme_rows() -> list[tuple[str, str, str, str]]:
    """(input, message, exit code, test) for each row of the README's hostile-input table."""
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Hostile input\n", 1)[1].split("\n## ", 1)[0]
    rows = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 4 and cells[3].startswith("`test_"):
            rows.append((cells[0], cells[1], cells[2], cells[3].strip("`")))
    return rows


def loose(text: str) -> str:
    """``text`` with MODEL for the model's path and N for every number (versions change; the words stay)."""
    return re.sub(r"\d+(\.\d+)*", "N", text.replace("{model}", "MODEL"))


def test_readme_hostile_table_is_backed_by_tests() -> None:
    rows = readme_rows()
    assert rows, "no hostile-input table in README.md"
    errors = {f"test_hostile.py::{c.id}": (c.code, c.message) for c in HOSTILE}
    errors |= {f"test_cli.py::{c.id}": (c.code, c.message) for c in ERROR_CASES}
    fine = {f"test_hostile.py::{c.id}": c.note for c in FINE}
    for what, seen, code, test in rows:
        if test in fine:
            assert code == "0", what
            assert loose(fine[test]) in loose(seen), f"{what}: the README's {seen} lacks the note {fine[test]!r}"
            continue
        assert test in errors, f"README row {what!r} names {test!r}, which is no test case"
        want, message = errors[test]
        assert code == str(want), f"{what}: README says exit {code}, the test {want}"
        assert loose(message) in loose(seen), f"{what}: the README's {seen} lacks the test's {message!r}"
    named = {test for *_, test in rows}
    missing = [c.id for c in HOSTILE if f"test_hostile.py::{c.id}" not in named]
    missing += [c.id for c in FINE if f"test_hostile.py::{c.id}" not in named]
    assert not missing, f"hostile cases missing from the README's table: {missing}"


# ---------------------------------------------------------------------------- errors nobody planned for
def test_an_unexpected_error_is_still_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object) -> None:
        raise ZeroDivisionError("boom\nsecond line")

    monkeypatch.setattr(grad_cmd, "parse_grad_ys", boom)  # before the command's own error handling
    code, out, err = call(["grad", str(MLP), "-o", str(tmp_path / "o.onnx"), *LOSS_W2], capsys)
    assert (code, out, err) == (1, "", "onnxgrad: error: ZeroDivisionError: boom second line\n")
    assert list(tmp_path.iterdir()) == []


def test_a_wrapped_error_shows_its_cause() -> None:
    """onnx_ir wraps deserialization errors in a SerdeError that names only the graph."""
    wrapper = RuntimeError("Error calling _deserialize_graph with: g")
    wrapper.__cause__ = ValueError("Output 'a' is redeclared\nin the current graph scope")
    assert grad_cmd.fail(wrapper).message == "Output 'a' is redeclared in the current graph scope"
    assert grad_cmd.fail(RuntimeError("odd")).message == "RuntimeError: odd"


def test_an_invalid_gradient_model_is_blamed_on_onnxgrad(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The input passes onnx.checker and the output does not: say it is a bug, write nothing."""
    def broken_save(*args: object, **kwargs: object) -> None:
        raise onnx.checker.ValidationError("Nodes in a graph must be topologically sorted,\nhowever ...")

    monkeypatch.setattr(augment, "save_model", broken_save)
    code, out, err = call(["grad", str(MLP), "-o", str(tmp_path / "o.onnx"), *LOSS_W2], capsys)
    assert code == 1 and out == "" and len(err.splitlines()) == 1
    assert "the gradient model fails onnx.checker, a bug in onnxgrad (please report it): Nodes in a graph" in err
    assert list(tmp_path.iterdir()) == []


EMPTY_BATCH = """
import numpy as np
import onnxgrad
from onnx import TensorProto as TP, helper as oh, numpy_helper
from onnxgrad import runtime

w = numpy_helper.from_array(np.ones((4, 3, 3, 3), np.float32), "w")
graph = oh.make_graph([oh.make_node("Conv", ["x", "w"], ["y"], pads=[1, 1, 1, 1])], "g",
                      [oh.make_tensor_value_info("x", TP.FLOAT, ["n", 3, 7, 6])],
                      [oh.make_tensor_value_info("y", TP.FLOAT, ["n", 4, 7, 6])], [w])
model = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
empty = {"x": np.zeros((0, 3, 7, 6), np.float32)}
assert runtime.run(model, empty)["y"].shape == (0, 4, 7, 6)  # the forward alone runs an empty batch
grads = runtime.session(onnxgrad.add_gradients(model, ["y"], ["x", "w"]).model)
assert runtime.run(grads, {"x": np.ones((2, 3, 7, 6), np.float32)})["gradients/w_grad"].shape == (4, 3, 3, 3)
try:
    runtime.run(grads, empty)
except ValueError as e:
    print(e)
"""


def test_an_empty_batch_through_conv_weight_gradients_is_refused_not_hung() -> None:
    """onnxruntime's Conv hangs over zero input channels, which a weight gradient's Conv gets from an empty batch
    (onnxgrad/workarounds.py): runtime.run refuses that session the empty input in one line (in a subprocess, so
    that a regression fails on its timeout instead of hanging the suite)."""
    out = subprocess.run([sys.executable, "-c", EMPTY_BATCH], capture_output=True, text=True, timeout=120, check=True)
    assert "input 'x' has a zero-size dimension [0, 3, 7, 6]" in out.stdout
