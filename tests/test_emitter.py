"""The emitter's opset forms: every helper computes the same values at every opset it supports (run in
onnxruntime, compared with numpy), an op too new for the model's opset is refused when it is emitted, and the
small helpers (rank, dim, dims, add_all, full) do what their names say."""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxgrad.emitter import Emitter, missing_op, rank
from onnxgrad.optimize import FOLD_LIMIT
from onnxgrad.runtime import run

RNG = np.random.default_rng(3)
I64 = ir.DataType.INT64

Build = Callable[[Emitter, dict[str, ir.Value]], "ir.Value | Sequence[ir.Value]"]


def _ir_version(opset: int) -> int:
    return 8 if opset <= 17 else 9 if opset <= 20 else 10 if opset <= 22 else 11


def _graph(opset: int, feeds: dict[str, np.ndarray], dynamic: bool) -> tuple[ir.Graph, Emitter, dict[str, ir.Value]]:
    values = {
        name: ir.Value(name=name, type=ir.TensorType(ir.DataType.from_numpy(a.dtype)),
                       shape=ir.Shape([None] * a.ndim if dynamic else list(a.shape)))
        for name, a in feeds.items()
    }
    graph = ir.Graph(list(values.values()), [], nodes=[], opset_imports={"": opset}, name="emitted")
    return graph, Emitter(graph, opset, "t"), values


def emit(opset: int, feeds: dict[str, np.ndarray], build: Build, dynamic: bool = True
         ) -> tuple[list[np.ndarray], onnx.ModelProto]:
    """Run what ``build`` emits over graph inputs ``feeds`` (shapes unknown when ``dynamic``) in onnxruntime, which
    also checks each op against its schema (types included) as it loads the model."""
    graph, em, values = _graph(opset, feeds, dynamic)
    built = build(em, values)
    outs = [built] if isinstance(built, ir.Value) else list(built)
    outs = [em.Identity(o) if o.is_graph_input() or o.is_initializer() else o for o in outs]
    em.commit(outs)
    graph.outputs.extend(outs)
    proto = ir.serde.serialize_model(ir.Model(graph, ir_version=_ir_version(opset)))
    got = run(proto, feeds, [o.name for o in outs])  # type: ignore[misc]
    return [got[o.name] for o in outs], proto  # type: ignore[index]


def _ops(proto: onnx.ModelProto) -> set[str]:
    return {n.op_type for n in proto.graph.node}


# ------------------------------------------------------------------------------ ops too new are refused
@pytest.mark.parametrize(("op", "opset", "message"), [
    ("ScatterND", 10, "ScatterND does not exist at ai.onnx opset 10 (it arrived in opset 11)"),
    ("ConstantOfShape", 8, "ConstantOfShape does not exist at ai.onnx opset 8 (it arrived in opset 9)"),
    ("Range", 10, "Range does not exist at ai.onnx opset 10 (it arrived in opset 11)"),
    ("Attention", 22, "Attention does not exist at ai.onnx opset 22 (it arrived in opset 23)"),
    ("Upsample", 10, "Upsample does not exist at ai.onnx opset 10 (it was removed in opset 10)"),
    ("Scatter", 11, "Scatter does not exist at ai.onnx opset 11 (it was removed in opset 11)"),
    ("NoSuchOp", 17, "NoSuchOp is not an ai.onnx operator"),
])
def test_an_op_the_opset_lacks_is_refused_when_emitted(op: str, opset: int, message: str) -> None:
    _, em, values = _graph(opset, {"x": np.zeros((2, 3), np.float32)}, dynamic=False)
    with pytest.raises(ValueError, match=rf"^{re.escape(message)}: .*opset {opset}"):
        em.op(op, values["x"])
    assert em.nodes == []


@pytest.mark.parametrize(("op", "opset"), [("ScatterND", 11), ("ConstantOfShape", 9), ("Upsample", 9), ("Add", 7),
                                           ("Attention", 23)])
def test_an_op_the_opset_has_is_accepted(op: str, opset: int) -> None:
    assert missing_op(op, opset) is None


def test_folded_ops_are_checked_too() -> None:
    """Range of constants would fold away; at opset 10 it is refused all the same (a rule bug shows at once)."""
    _, em, _ = _graph(10, {}, dynamic=False)
    with pytest.raises(ValueError, match=r"Range does not exist at ai\.onnx opset 10"):
        em.Range(em.ints([0]), em.ints([3]), em.ints([1]))


def test_other_domains_are_not_checked() -> None:
    _, em, values = _graph(17, {"x": np.zeros(2, np.float32)}, dynamic=False)
    em.op("StopGradient", values["x"], _domain="onnxgrad")
    assert [n.op_type for n in em.nodes] == ["StopGradient"]


# ------------------------------------------------------------------------ opset forms: same values
@dataclass(frozen=True)
class Form:
    """A helper at one opset: ``build`` over ``feeds``, expected outputs, an op its form must use."""

    name: str
    opset: int
    feeds: dict[str, np.ndarray]
    build: Build
    want: Callable[[dict[str, np.ndarray]], list[np.ndarray]]
    uses: str | None = None


A, B = RNG.standard_normal((2, 3)).astype(np.float32), RNG.standard_normal((3, 3)).astype(np.float32)
X = RNG.standard_normal((3, 4)).astype(np.float32)
IDX = np.array([[0, 3], [1, 1], [2, 0]], np.int64)  # a repeated index in row 1
UPD = RNG.standard_normal((3, 2)).astype(np.float32)
ROWS = np.array([2, 0, 2, 1], np.int64)
RUPD = RNG.standard_normal((4, 5)).astype(np.float32)


def _scatter_add(f: dict[str, np.ndarray]) -> list[np.ndarray]:
    out = np.zeros_like(f["x"])
    for i in range(f["i"].shape[0]):
        for j in range(f["i"].shape[1]):
            out[i, f["i"][i, j]] += f["u"][i, j]
    return [out]


def _rows_add(f: dict[str, np.ndarray]) -> list[np.ndarray]:
    out = np.zeros((3, 5), np.float32)
    np.add.at(out, f["i"], f["u"])
    return [out]


def _split(em: Emitter, v: dict[str, ir.Value]) -> Sequence[ir.Value]:
    g = em.Concat(v["a"], v["b"], axis=0)
    return em.split(g, [em.dim(v["a"], 0, keepdims=True), em.dim(v["b"], 0, keepdims=True)], 0)


def _rows(em: Emitter, v: dict[str, ir.Value]) -> ir.Value:
    return em.scatter_add_rows(v["u"], v["i"], 3, em.dims(v["u"], [1]))


FORMS = [
    *(Form(f"split-runtime-{o}", o, {"a": A, "b": B}, _split, lambda f: [f["a"], f["b"]], op)
      for o, op in ((10, "Slice"), (13, "Split"))),
    *(Form(f"zeros-runtime-{o}", o, {"x": X}, lambda em, v: em.zeros(em.shape_of(v["x"]), like=v["x"]),
           lambda f: [np.zeros_like(f["x"])], op) for o, op in ((9, "ConstantOfShape"),)),
    *(Form(f"ones-like-runtime-{o}", o, {"x": X}, lambda em, v: em.ones_like(v["x"]),
           lambda f: [np.ones_like(f["x"])], op) for o, op in ((7, "Tile"), (9, "ConstantOfShape"))),
    *(Form(f"scatter-add-{o}", o, {"x": X, "i": IDX, "u": UPD},
           lambda em, v: em.scatter_add(v["x"], v["i"], v["u"], 1), _scatter_add, op)
      for o, op in ((9, "ReduceSum"), (11, "ReduceSum"), (16, "ScatterElements"))),
    *(Form(f"scatter-add-unique-{o}", o, {"x": X, "i": IDX[:, :1], "u": UPD[:, :1]},
           lambda em, v: em.scatter_add(v["x"], v["i"], v["u"], 1, unique=True), _scatter_add, op)
      for o, op in ((9, "Scatter"), (11, "ScatterElements"))),
    # run-time rows: ScatterElements from opset 16 (onnxruntime's threaded ScatterND loses repeated rows' additions)
    *(Form(f"scatter-add-rows-{o}", o, {"u": RUPD, "i": ROWS}, _rows, _rows_add, op)
      for o, op in ((13, "MatMul"), (16, "ScatterElements"))),
    # constant rows without repeats: ScatterND (the clean-up joins such pieces into a Concat)
    Form("scatter-add-rows-distinct-constant-16", 16, {"u": RUPD[:3]},
         lambda em, v: em.scatter_add_rows(v["u"], em.ints([2, 0, 1]), 3, em.dims(v["u"], [1])),
         lambda f: [f["u"][[1, 2, 0]]], "ScatterND"),
    *(Form(f"gather-elements-{o}", o, {"x": X, "i": IDX},
           lambda em, v: em.gather_elements(v["x"], v["i"], 1),
           lambda f: [np.take_along_axis(f["x"], f["i"], 1)], op)
      for o, op in ((9, "ReduceSum"), (11, "GatherElements"))),
    *(Form(f"wrap-indices-{o}", o, {"x": X, "i": IDX - 4 * (IDX % 2)},
           lambda em, v: em.wrap_indices(v["i"], em.dim(v["x"], 1)),
           lambda f: [np.where(f["i"] < 0, f["i"] + 4, f["i"])], op) for o, op in ((11, "Less"),)),
]


@pytest.mark.parametrize("form", FORMS, ids=lambda f: f.name)
def test_each_opset_form_computes_the_same_values(form: Form) -> None:
    got, proto = emit(form.opset, form.feeds, form.build)
    for g, w in zip(got, form.want(form.feeds), strict=True):
        np.testing.assert_allclose(g, w, rtol=1e-6, atol=1e-6)
    if form.uses is not None:
        assert form.uses in _ops(proto), f"{form.name}: expected a {form.uses} in {sorted(_ops(proto))}"


@pytest.mark.parametrize(("opset", "build", "message"), [
    (9, _split, "cutting 't/Concat_1' into pieces of run-time sizes needs opset >= 10"),
    (8, lambda em, v: em.scatter_add(v["a"], v["i"], v["a"], 1, unique=True), "a range of run-time length"),
])
def test_a_form_no_op_of_the_opset_can_compute_is_a_clear_error(opset: int, build: Build, message: str) -> None:
    feeds = {"a": A, "b": B, "i": np.zeros((2, 3), np.int64)}
    with pytest.raises(ValueError, match=message):
        emit(opset, feeds, build)


# ------------------------------------------------------------------------------------ small helpers
def test_full_is_a_constant_only_when_small_and_static() -> None:
    small, big = (3, 4), (FOLD_LIMIT + 1,)
    _, em, _ = _graph(17, {}, dynamic=False)
    like = em.const(np.zeros(1, np.float32), dtype=ir.DataType.FLOAT)
    for shape, op in ((small, "Constant"), (big, "ConstantOfShape")):
        out = em.full(list(shape), 2.0, like=like)
        node = out.producer()
        assert node is not None and node.op_type == op
    unknown = ir.Value(name="u", type=ir.TensorType(ir.DataType.FLOAT))  # Shape of a static value folds
    dynamic = em.zeros(em.Shape(unknown), like=like)
    assert dynamic.producer().op_type == "ConstantOfShape"  # type: ignore[union-attr]


@pytest.mark.parametrize("dynamic", [False, True])
def test_dim_dims_and_cat_ints(dynamic: bool) -> None:
    x = np.zeros((2, 3, 5), np.float32)

    def build(em: Emitter, v: dict[str, ir.Value]) -> list[ir.Value]:
        d0, d2 = em.dim(v["x"], 0), em.dim(v["x"], 2, keepdims=True)
        sizes = em.dims(v["x"], [2, 1])
        assert all(isinstance(d, int) for d in (d0, d2)) != dynamic
        assert isinstance(sizes, list) != dynamic
        return [em.cat_ints([7], sizes), em.Reshape(d0 if isinstance(d0, ir.Value) else em.ints([d0]), em.ints([1]))]

    (cat, first), _ = emit(17, {"x": x}, build, dynamic=dynamic)
    assert cat.tolist() == [7, 5, 3] and first.tolist() == [2]


def test_add_all_sums_what_is_there() -> None:
    _, em, v = _graph(17, {"a": A, "b": A}, dynamic=False)
    assert em.add_all(None, None) is None
    assert em.add_all(None, v["a"], None) is v["a"]
    total = em.add_all(v["a"], None, v["b"])
    assert total is not None and total.producer().op_type == "Add"  # type: ignore[union-attr]


def test_rank_names_the_value_and_the_node() -> None:
    unknown = ir.Value(name="h", type=ir.TensorType(ir.DataType.FLOAT))
    node = ir.node("Gather", [unknown, unknown], name="g1")
    with pytest.raises(ValueError, match=r"Gather 'g1': the gradient needs the rank of 'h'"):
        rank(unknown, node)
    assert rank(ir.Value(name="k", shape=ir.Shape([2, None]))) == 2


def test_discard_takes_back_only_what_nothing_else_reads() -> None:
    """A gradient the walk does not need is taken back with what only it reads: a value kept (da) and the ones
    the caches hand out stay whole; an op asked for again after its discard is made anew, inputs and all."""
    feeds = {"a": RNG.uniform(1, 2, (2, 3)), "b": RNG.uniform(1, 2, (2, 3))}

    def build(em: Emitter, v: dict[str, ir.Value]) -> list[ir.Value]:
        out = em.Div(v["a"], v["b"])  # a forward value: made before the rule
        since = len(em.nodes)
        da = em.Div(em.Exp(v["a"]), v["b"])  # the rule's two results share da, as Div's rule does
        db = em.Neg(em.Mul(da, out))
        mul = db.producer().inputs[0].producer()  # type: ignore[union-attr]
        em.discard(db, since, keep={id(da)})
        assert not db.producer().inputs or db.producer().inputs[0] is None  # type: ignore[union-attr]
        assert mul.inputs[0] is None and len(da.uses()) == 0 and da.producer().inputs[0] is not None  # type: ignore
        again = em.Mul(da, out)
        assert again is not mul.outputs[0] and again.producer().inputs[0] is da  # type: ignore[union-attr]
        return [da, again]

    (da, again), _ = emit(17, feeds, build)
    a, b = feeds["a"], feeds["b"]
    np.testing.assert_allclose(da, np.exp(a) / b, rtol=1e-12)
    np.testing.assert_allclose(again, np.exp(a) / b * (a / b), rtol=1e-12)


def test_own_nodes_shares_only_what_it_emitted() -> None:
    """Inside ``own_nodes`` an op identical to one emitted before is emitted anew (a rule walking its own nodes
    finds it), but for Constants, which no walk goes through; inside, and after, the new node is shared."""
    _, em, v = _graph(17, {"x": np.ones((2, 3), np.float32)}, dynamic=False)
    before, one = em.Neg(v["x"]), em.const(1.0, like=v["x"])
    with em.own_nodes():
        inside = em.Neg(v["x"])
        assert inside is not before and em.const(1.0, like=v["x"]) is one
        assert em.Neg(v["x"]) is inside
        with em.own_nodes():
            assert em.Neg(v["x"]) is not inside
    assert em.Neg(v["x"]) is not before  # outside again: the newest is shared
