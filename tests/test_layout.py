"""The layout: onnxgrad's modules import one another without a cycle.

The import graph is read from the source with ``ast``: every ``import`` and ``from ... import`` of every module
under ``onnxgrad/`` and ``cli/`` (installed as ``onnxgrad.cli``), those inside functions included, those under
``if TYPE_CHECKING:`` left out (they never run). A package's ``__init__`` counts only for what it imports itself:
``onnxgrad.rules`` importing every rule module, and rule modules importing ``onnxgrad.registry``, is no cycle."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TREES = {"onnxgrad": ROOT / "onnxgrad", "onnxgrad.cli": ROOT / "cli"}


def module_files() -> dict[str, Path]:
    """Every module's dotted name and file (a package is its ``__init__.py``)."""
    found: dict[str, Path] = {}
    for prefix, folder in TREES.items():
        for path in sorted(folder.rglob("*.py")):
            parts = list(path.relative_to(folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join([prefix, *parts])] = path
    return found


def _type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _statements(tree: ast.AST) -> Iterable[ast.Import | ast.ImportFrom]:
    """Every import statement of ``tree``, at any depth, except in the body of ``if TYPE_CHECKING:``."""
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            yield node
        if isinstance(node, ast.If) and _type_checking(node.test):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def imports_of(source: str, module: str, is_package: bool, known: Iterable[str]) -> set[str]:
    """The modules among ``known`` that ``module`` (its source) imports."""
    known = set(known)
    package = module if is_package else module.rpartition(".")[0]
    found: set[str] = set()
    for stmt in _statements(ast.parse(source)):
        if isinstance(stmt, ast.Import):
            names = [alias.name for alias in stmt.names]
        else:
            base = stmt.module or ""
            if stmt.level:
                anchor = package.split(".")[: len(package.split(".")) - (stmt.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in stmt.names]
        for name in names:
            while name and name not in known:  # `import a.b.c` names a.b.c, or the deepest package above it
                name = name.rpartition(".")[0]
            if name and name != module:
                found.add(name)
    return found


def import_graph() -> dict[str, set[str]]:
    files = module_files()
    return {name: imports_of(path.read_text(), name, path.name == "__init__.py", files)
            for name, path in files.items()}


def find_cycle(graph: Mapping[str, Iterable[str]]) -> list[str]:
    """One cycle of ``graph`` as ``[a, b, ..., a]`` (each imports the next), or [] when there is none."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    for start in sorted(graph):
        if start in state:
            continue
        path = [start]
        todo = [iter(sorted(graph[start]))]
        state[start] = 1
        while todo:
            nxt = next(todo[-1], None)
            if nxt is None:
                state[path.pop()] = 2
                todo.pop()
            elif state.get(nxt) == 1:
                return [*path[path.index(nxt):], nxt]
            elif nxt not in state:
                state[nxt] = 1
                path.append(nxt)
                todo.append(iter(sorted(graph.get(nxt, ()))))
    return []


def test_there_are_no_import_cycles() -> None:
    graph = import_graph()
    cycle = find_cycle(graph)
    assert not cycle, "import cycle: " + " -> ".join(cycle)


def test_the_graph_covers_the_layers() -> None:
    """Not an empty graph passing by accident: the modules and edges the layout is built on are there."""
    graph = import_graph()
    assert {"onnxgrad", "onnxgrad.api", "onnxgrad.higher", "onnxgrad.augment", "onnxgrad.rules",
            "onnxgrad.rules.markers", "onnxgrad.cli", "onnxgrad.cli.grad_cmd", "onnxgrad.cli.common"} <= set(graph)
    assert "onnxgrad.api" in graph["onnxgrad.higher"]  # the higher orders are built on gradients()
    assert {"onnxgrad.api", "onnxgrad.higher"} <= graph["onnxgrad.augment"]  # add_gradients sits above both
    assert "onnxgrad.cli.common" in graph["onnxgrad.cli.grad_cmd"]
    assert "onnxgrad.cli.grad_cmd" in graph["onnxgrad.cli"]  # imported inside _register(): counted
    assert not any(m.endswith(".inspect") for m in graph)  # it shadowed the standard library's inspect


KNOWN = {"p", "p.a", "p.b", "p.sub", "p.sub.c"}


@pytest.mark.parametrize(
    ("source", "module", "is_package", "expected"),
    [
        ("import p.a", "p.b", False, {"p.a"}),
        ("import p.a.x.y", "p.b", False, {"p.a"}),  # the deepest known module
        ("from p import a, b", "p.sub.c", False, {"p.a", "p.b"}),  # submodules by name
        ("from p.a import thing", "p.b", False, {"p.a"}),
        ("from p import thing", "p.b", False, {"p"}),  # a name in the package itself
        ("from . import a", "p.b", False, {"p.a"}),
        ("from .sub import c", "p", True, {"p.sub.c"}),
        ("from .. import a", "p.sub.c", False, {"p.a"}),
        ("def f():\n    from p import a", "p.b", False, {"p.a"}),  # inside a function: counted
        ("from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from p import a\nelse:\n    from p import b",
         "p.sub.c", False, {"p.b"}),
        ("import typing\nif typing.TYPE_CHECKING:\n    import p.a", "p.b", False, set()),
        ("import numpy\nimport p.b", "p.b", False, set()),  # itself and outside modules are no edges
    ],
    ids=["import", "import-deep", "from-package-submodules", "from-module", "from-package-name", "relative",
         "relative-package", "relative-up", "in-function", "type-checking", "typing-type-checking", "self-and-outside"],
)
def test_imports_of(source: str, module: str, is_package: bool, expected: set[str]) -> None:
    assert imports_of(source, module, is_package, KNOWN) == expected


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": {"b"}, "b": {"c"}, "c": set()}, []),
        ({"a": {"b"}, "b": {"a"}}, ["a", "b", "a"]),
        ({"a": {"b"}, "b": {"c"}, "c": {"b"}}, ["b", "c", "b"]),
        ({"a": {"a"}}, ["a", "a"]),
        ({"a": {"b", "c"}, "b": {"d"}, "c": {"d"}, "d": set()}, []),  # a diamond is no cycle
    ],
    ids=["chain", "two", "downstream", "self", "diamond"],
)
def test_find_cycle(graph: dict[str, set[str]], expected: list[str]) -> None:
    assert find_cycle(graph) == expected


def opset_comparisons(source: str) -> list[int]:
    """Lines of ``source`` that compare something named ``opset`` (``em.opset >= 11``, ``opset < 13``...)."""
    lines = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Compare):
            sides = [node.left, *node.comparators]
            if any((isinstance(s, ast.Attribute) and s.attr == "opset") or (isinstance(s, ast.Name) and s.id == "opset")
                   for s in sides):
                lines.append(node.lineno)
    return lines


def test_rules_never_compare_opsets() -> None:
    """Opset forms belong to the emitter (its helpers answer them); a rule states the math only."""
    found = {p.name: lines for p in sorted((ROOT / "onnxgrad" / "rules").glob("*.py"))
             if (lines := opset_comparisons(p.read_text()))}
    assert not found, f"opset comparisons in rules (move them into an emitter helper): {found}"


@pytest.mark.parametrize(("source", "expected"), [
    ("x = em.Clip(a) if em.opset >= 11 else b", [1]),
    ("if opset < 13:\n    pass", [1]),
    ("n = em.opset + 1\nok = em.has_op('Range')", []),
], ids=["attribute", "name", "no-comparison"])
def test_opset_comparisons(source: str, expected: list[int]) -> None:
    assert opset_comparisons(source) == expected
