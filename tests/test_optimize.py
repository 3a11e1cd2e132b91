"""The clean-up of gradient graphs (onnxgrad.optimize): every rewrite keeps the values, shrinks the graph,
and never touches the forward part."""

from __future__ import annotations

import dataclasses
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import onnx
import onnx_ir as ir
import pytest

import onnxgrad
import onnxgrad.emitter
from onnxgrad import optimize
from onnxgrad.emitter import Emitter
from tests.graphs import Graph, N, build, run

RNG = np.random.default_rng(7)


def _u(*shape: int) -> np.ndarray:
    return RNG.uniform(-1, 1, shape)


@contextmanager
def plain() -> Iterator[None]:
    """gradients() without the clean-up (the emitter asks a simplify that never simplifies)."""
    saved = onnxgrad.emitter.simplify
    onnxgrad.emitter.simplify = lambda *args: None  # type: ignore[assignment]
    try:
        yield
    finally:
        onnxgrad.emitter.simplify = saved


def _grads(g: Graph, ys: list[str], xs: list[str], **kwargs: object) -> tuple[onnx.ModelProto, dict[str, np.ndarray]]:
    aug = onnxgrad.add_gradients(build(g), ys, xs, **kwargs)  # type: ignore[arg-type]
    onnx.checker.check_model(aug.model, full_check=True)
    names = [n for n in aug.gradients.values() if n is not None]
    return aug.model, run(aug.model, g.feeds, names)


def _ops(model: onnx.ModelProto) -> Counter[str]:
    return Counter(n.op_type for n in model.graph.node if n.name.startswith("gradients"))


# A tensor split along its first axis with Gathers (PyTorch's q/k/v), a bias added over a batch, Reshape and
# Transpose chains, Squeeze/Unsqueeze pairs, a no-op Slice, a ones seed of a large output.
QKV = Graph(
    [N("p", "MatMul", "x", "w"), N("r", "Reshape", "p", "shape3"), N("t", "Transpose", "r", perm=[2, 0, 1]),
     N("q", "Gather", "t", "i0", axis=0), N("k", "Gather", "t", "i1", axis=0), N("v", "Gather", "t", "i2", axis=0),
     N("qk", "Mul", "q", "k"), N("s", "Add", "qk", "v"), N("y", "Add", "s", "b")],
    inputs={"x": _u(4, 5)}, inits={"w": _u(5, 6), "b": _u(2)},
    consts={"shape3": np.array([4, 2, 3]), "i0": np.array(0), "i1": np.array(1), "i2": np.array(2)},
)
CHAINS = Graph(
    [N("a", "Reshape", "x", "s1"), N("b", "Reshape", "a", "s2"), N("c", "Transpose", "b", perm=[1, 0, 2]),
     N("d", "Transpose", "c", perm=[2, 1, 0]), N("e", "Unsqueeze", "d", "ax"), N("f", "Squeeze", "e", "ax"),
     N("g", "Slice", "f", "st", "en"), N("h", "Tanh", "g"), N("y", "Mul", "h", "w")],
    inputs={"x": _u(2, 3, 4)}, inits={"w": _u(4, 2, 3)},
    consts={"s1": np.array([6, 4]), "s2": np.array([2, 3, 4]), "ax": np.array([1]), "st": np.array([0]),
            "en": np.array([100])},
)
BIAS = Graph([N("h", "MatMul", "x", "w"), N("z", "Add", "h", "b"), N("y", "Relu", "z")],
             inputs={"x": _u(8, 5)}, inits={"w": _u(5, 7), "b": _u(7)})
# a split with Slices (rotary embeddings' halves: the first half negated and moved) and one with Gathers along
# an inner axis (BLOOM's fused q/k/v): the gradient's pieces are placed into zeros and summed
HALVES = Graph([N("a", "Slice", "x", "s0", "s1", "ax"), N("b", "Slice", "x", "s1", "s2", "ax"), N("na", "Neg", "a"),
                N("r", "Concat", "b", "na", axis=1), N("xc", "Mul", "x", "w"), N("y", "Add", "xc", "r")],
               inputs={"x": _u(3, 8)}, inits={"w": _u(8)},
               consts={"s0": np.array([0]), "s1": np.array([4]), "s2": np.array([8]), "ax": np.array([1])})
INNER = Graph([N("p", "MatMul", "x", "w"), N("r", "Reshape", "p", "shape3"), N("q", "Gather", "r", "i0", axis=1),
               N("k", "Gather", "r", "i1", axis=1), N("v", "Gather", "r", "i2", axis=1), N("qk", "Mul", "q", "k"),
               N("y", "Add", "qk", "v")],
              inputs={"x": _u(4, 5)}, inits={"w": _u(5, 6)},
              consts={"shape3": np.array([4, 3, 2]), "i0": np.array(0), "i1": np.array(1), "i2": np.array(2)})
# the power rule's x^(e-1) for constant exponents: RMSNorm's square (x^1), gelu_new's cube (x^2), x^0 (x^-1)
POWERS = Graph([N("s", "Pow", "x", "two"), N("c", "Pow", "x", "three"), N("z", "Pow", "x", "zero"),
                N("sc", "Add", "s", "c"), N("scz", "Add", "sc", "z"), N("y", "Mul", "scz", "w")],
               inputs={"x": _u(3, 4) + 2.0}, inits={"w": _u(4)},
               consts={"two": np.array(2.0), "three": np.array(3.0), "zero": np.array(0.0)})


@pytest.mark.parametrize(("g", "ys", "xs"), [
    (QKV, ["y"], ["x", "w", "b"]),
    (CHAINS, ["y"], ["x", "w"]),
    (BIAS, ["y"], ["x", "w", "b"]),
    (POWERS, ["y"], ["x", "w"]),
    (HALVES, ["y"], ["x", "w"]),
    (INNER, ["y"], ["x", "w"]),
], ids=["qkv", "chains", "bias", "powers", "halves", "inner-axis-gathers"])
def test_clean_up_keeps_values_and_shrinks_the_graph(g: Graph, ys: list[str], xs: list[str]) -> None:
    with plain():
        before, expected = _grads(g, ys, xs)
    after, got = _grads(g, ys, xs)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-12, atol=1e-12, err_msg=name)
    assert len(after.graph.node) < len(before.graph.node)


def test_powers_of_constant_exponents_are_products() -> None:
    """x^1 is x, x^2 is x * x, x^-1 is 1 / x: onnxruntime's Pow computes std::pow per element for any exponent but 2
    (RMSNorm's x^2 gave each layer of a Llama export a 1.2 ms x^1 in its gradient)."""
    model, _ = _grads(POWERS, ["y"], ["x"])
    ops = _ops(model)
    assert ops["Pow"] == 0 and ops["Reciprocal"] == 1, ops


@pytest.mark.parametrize(("g", "gone"), [(HALVES, "Pad"), (INNER, "ScatterND")], ids=["halves", "inner-axis-gathers"])
def test_pieces_placed_into_zeros_are_concatenated(g: Graph, gone: str) -> None:
    """The gradient of a split is its pieces' Concat, not a sum of zero-padded (or scattered, then transposed)
    copies: a Llama layer's rotary halves gave four Pads, a BLOOM layer's q/k/v three ScatterNDs and Transposes."""
    model, _ = _grads(g, ["y"], ["x"])
    ops = _ops(model)
    assert ops[gone] == 0 and ops["Concat"] >= 1, ops


def test_gather_split_gradient_is_a_concat() -> None:
    model, _ = _grads(QKV, ["y"], ["x"])
    ops = _ops(model)
    assert ops["Concat"] == 1 and ops["ScatterND"] == 0
    assert ops["Transpose"] == 1  # W's: the pieces are stacked along the axis the Transpose moves them to


@pytest.mark.parametrize(("rows", "form"), [(8, "ReduceSum"), (512, "MatMul")])
def test_bias_gradient_is_one_sum(rows: int, form: str) -> None:
    """Summed over the rows by one node, no Squeeze: a ReduceSum for a small gradient (8 x 40), one MatMul of
    ones for a large one (512 x 40; plans/reduce.py); the value is numpy's."""
    g = dataclasses.replace(BIAS, inputs={"x": _u(rows, 5)}, inits={"w": _u(5, 40), "b": _u(40)})
    model, got = _grads(g, ["y"], ["b"])
    ops = _ops(model)
    assert ops["MatMul"] + ops["ReduceSum"] == 1 and ops[form] == 1 and ops["Squeeze"] == 0, ops
    z = g.inputs["x"] @ g.inits["w"] + g.inits["b"]
    np.testing.assert_allclose(got["gradients/b_grad"], (z > 0).sum(axis=0), rtol=1e-12)


def test_bias_gradient_over_a_symbolic_batch_is_one_matmul() -> None:
    """A run-time row count: the ones of the MatMul are built at run time (plans/reduce.py, ``gemv_run_time``), not
    a ReduceSum over the leading axes (HF BERT with dynamic batch and length: 9.3 ms of ReduceSum where the static
    export's MatMuls of ones take 3.8); the value is numpy's."""
    g = dataclasses.replace(BIAS, inputs={"x": _u(96, 5)}, inits={"w": _u(5, 80), "b": _u(80)}, dynamic=True)
    model, got = _grads(g, ["y"], ["b"])
    ops = _ops(model)
    assert ops["MatMul"] == 1 and ops["ReduceSum"] == 0, ops
    z = g.inputs["x"] @ g.inits["w"] + g.inits["b"]
    np.testing.assert_allclose(got["gradients/b_grad"], (z > 0).sum(axis=0), rtol=1e-12)


# Scaled dot-product scores with K transposed first (PyTorch's attention export), float32: dK^T comes out of a
# MatMul and a scalar Mul, then a Transpose that the clean-up moves onto the MatMul's inputs.
SCORES = Graph([N("q", "MatMul", "x", "wq"), N("k", "MatMul", "x", "wk"), N("kt", "Transpose", "k", perm=[0, 2, 1]),
                N("s", "MatMul", "q", "kt"), N("z", "Mul", "s", "c"), N("y", "Softmax", "z", axis=-1)],
               inputs={"x": _u(2, 3, 4).astype(np.float32)},
               inits={"wq": _u(4, 4).astype(np.float32), "wk": _u(4, 4).astype(np.float32),
                      "c": np.array([0.5], np.float32)})


def test_transposed_matmul_gradient_moves_the_transpose_inside() -> None:
    seed = RNG.uniform(-1, 1, (2, 3, 3)).astype(np.float32)
    with plain():
        before, expected = _grads(SCORES, ["y"], ["x", "wk"], grad_ys=[seed])
    after, got = _grads(SCORES, ["y"], ["x", "wk"], grad_ys=[seed])
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-6, err_msg=name)
    torch = pytest.importorskip("torch")  # and against autograd, in float64
    x, wq, wk = (torch.tensor(a, dtype=torch.float64, requires_grad=name != "wq")
                 for name, a in (("x", SCORES.feeds["x"]), ("wq", SCORES.inits["wq"]), ("wk", SCORES.inits["wk"])))
    q, k = x @ wq, x @ wk
    torch.softmax(q @ k.transpose(1, 2) * 0.5, -1).backward(torch.tensor(seed, dtype=torch.float64))
    for name, ref in (("gradients/x_grad", x.grad), ("gradients/wk_grad", wk.grad)):
        np.testing.assert_allclose(got[name], ref.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    made = {o: n for n in after.graph.node if n.name.startswith("gradients") for o in n.output}

    def source(name: str) -> str:  # through a Mul by a single number
        node = made.get(name)
        if node is not None and node.op_type == "Mul" and node.input[1] == "c":
            node = made.get(node.input[0])
        return "" if node is None else node.op_type

    outputs = [n for n in after.graph.node if n.op_type == "Transpose" and n.name.startswith("gradients")]
    assert outputs and not any(source(n.input[0]) == "MatMul" for n in outputs)
    made = {o: n for n in before.graph.node if n.name.startswith("gradients") for o in n.output}
    assert any(source(n.input[0]) == "MatMul" for n in before.graph.node if n.op_type == "Transpose")


# As PyTorch's nn.MultiheadAttention exports it: K transposed, then scaled by a number the walk does not
# differentiate. The Mul rule's gradient for that number (dY * K^T, no path needs it) is taken back at once, so the
# dK^T MatMul has one reader and its Transpose still moves inside.
SCALED_K = dataclasses.replace(SCORES, nodes=[*SCORES.nodes[:3], N("ks", "Mul", "kt", "c"),
                                               N("s", "MatMul", "q", "ks"), N("y", "Softmax", "s", axis=-1)])


def test_a_gradient_no_path_needs_does_not_block_the_clean_up() -> None:
    seed = RNG.uniform(-1, 1, (2, 3, 3)).astype(np.float32)
    after, got = _grads(SCALED_K, ["y"], ["x", "wk"], grad_ys=[seed])
    torch = pytest.importorskip("torch")  # against autograd, in float64
    x, wq, wk = (torch.tensor(a, dtype=torch.float64, requires_grad=name != "wq")
                 for name, a in (("x", SCALED_K.feeds["x"]), ("wq", SCALED_K.inits["wq"]),
                                 ("wk", SCALED_K.inits["wk"])))
    torch.softmax((x @ wq) @ ((x @ wk).transpose(1, 2) * 0.5), -1).backward(torch.tensor(seed, dtype=torch.float64))
    for name, ref in (("gradients/x_grad", x.grad), ("gradients/wk_grad", wk.grad)):
        np.testing.assert_allclose(got[name], ref.numpy(), rtol=1e-4, atol=1e-5, err_msg=name)
    made = {o: n for n in after.graph.node if n.name.startswith("gradients") for o in n.output}
    for node in after.graph.node:
        if node.op_type == "Transpose" and node.name.startswith("gradients"):
            inner = made.get(node.input[0])
            if inner is not None and inner.op_type == "Mul":
                inner = made.get(inner.input[0])
            assert inner is None or inner.op_type != "MatMul", node.name


def test_no_op_shape_chains_leave_nothing() -> None:
    model, _ = _grads(CHAINS, ["y"], ["x"])
    ops = _ops(model)
    assert ops["Slice"] == 0 and ops["Squeeze"] == 0 and ops["Unsqueeze"] == 0
    assert ops["Reshape"] <= 1 and ops["Transpose"] <= 1



@pytest.mark.parametrize("dynamic", [False, True], ids=["static", "symbolic-batch"])
def test_batched_matmul_gradient_needs_no_run_time_shapes(dynamic: bool) -> None:
    """y = tanh(x @ W), x of shape (batch, 3, 5): dx is one MatMul whose shape the folder knows (MatMul, the ones
    seed of y's run-time shape), so no run-time unbroadcast follows it under a symbolic batch; dW one Gemm (the
    MatMul rule); the values are numpy's."""
    g = Graph([N("h", "MatMul", "x", "w"), N("y", "Tanh", "h")], inputs={"x": _u(4, 3, 5)}, inits={"w": _u(5, 6)},
              dynamic=dynamic)
    model, grads = _grads(g, ["y"], ["x", "w"])
    ops = _ops(model)
    assert ops["Gemm"] == 1 and ops["MatMul"] == 1 and ops["ReduceSum"] == 0 and ops["NonZero"] == 0, ops
    assert ops["Mul"] == 1, ops  # y * y of 1 - y^2: the ones seed (of y's run-time shape) is not multiplied in
    x, w = g.inputs["x"], g.inits["w"]
    dh = 1 - np.tanh(x @ w) ** 2
    np.testing.assert_allclose(grads["gradients/w_grad"], x.reshape(-1, 5).T @ dh.reshape(-1, 6), rtol=1e-12)
    np.testing.assert_allclose(grads["gradients/x_grad"], dh @ w.T, rtol=1e-12)


# The same split under a symbolic batch: the reshape keeps the batch (0), the gradient's zeros, seed and reshape
# targets are run-time shapes whose dims the graph knows (ints and the symbol ``batch``).
DYN_QKV = Graph(
    [N("p", "MatMul", "x", "w"), N("r", "Reshape", "p", "shape3"), N("t", "Transpose", "r", perm=[2, 0, 1]),
     N("q", "Gather", "t", "i0", axis=0), N("k", "Gather", "t", "i1", axis=0), N("v", "Gather", "t", "i2", axis=0),
     N("qk", "Mul", "q", "k"), N("s", "Add", "qk", "v"), N("flat", "Reshape", "s", "m1"),
     N("back", "Reshape", "flat", "sh2"), N("y", "Add", "back", "b")],
    inputs={"x": _u(4, 5)}, inits={"w": _u(5, 6), "b": _u(2)}, dynamic=True,
    consts={"shape3": np.array([0, 2, 3]), "i0": np.array(0), "i1": np.array(1), "i2": np.array(2),
            "m1": np.array([-1]), "sh2": np.array([-1, 2])},
)


def test_symbolic_batch_shape_arithmetic_is_folded() -> None:
    """Under a symbolic batch the gradient needs no run-time shape arithmetic where the graph knows the dims: the
    ones seed (the one Shape left) is not multiplied in, the split's gradient is a Concat, Reshape targets are
    constants, no run-time unbroadcast (NonZero) is left; the values are those of the unsimplified gradient graph
    and of numpy."""
    with plain():
        before, expected = _grads(DYN_QKV, ["y"], ["x", "w", "b"])
    after, got = _grads(DYN_QKV, ["y"], ["x", "w", "b"])
    for name, value in expected.items():
        np.testing.assert_allclose(got[name], value, rtol=1e-12, atol=1e-12, err_msg=name)
    ops = _ops(after)
    assert ops["ScatterND"] == 0 and ops["NonZero"] == 0 and ops["Gather"] == 0, ops
    assert ops["Shape"] == 1 and ops["ConstantOfShape"] == 1 and ops["Mul"] == 2, ops  # the seed; dq, dk
    assert len(after.graph.node) < len(before.graph.node)
    x, w = DYN_QKV.inputs["x"], DYN_QKV.inits["w"]
    p = (x @ w).reshape(4, 2, 3)
    dp = np.stack([p[..., 1], p[..., 0], np.ones((4, 2))], axis=-1).reshape(4, 6)
    np.testing.assert_allclose(got["gradients/x_grad"], dp @ w.T, rtol=1e-12)
    np.testing.assert_allclose(got["gradients/w_grad"], x.T @ dp, rtol=1e-12)
    np.testing.assert_allclose(got["gradients/b_grad"], np.full(2, 4.0), rtol=1e-12)

def test_large_ones_seed_does_not_stay_in_the_model() -> None:
    g = Graph([N("y", "Mul", "x", "w")], inputs={"x": _u(64, 128)}, inits={"w": _u(128)})
    model, grads = _grads(g, ["y"], ["x", "w"])
    big = [n for n in model.graph.node if n.op_type == "Constant"
           and np.asarray(onnx.numpy_helper.to_array(n.attribute[0].t)).size >= 64 * 128]
    assert not big
    np.testing.assert_allclose(grads["gradients/x_grad"], np.broadcast_to(g.inits["w"], (64, 128)))
    np.testing.assert_allclose(grads["gradients/w_grad"], g.inputs["x"].sum(axis=0))


def test_forward_part_is_untouched() -> None:
    proto = build(QKV)
    aug = onnxgrad.add_gradients(proto, ["y"], ["x", "w", "b"])
    forward = list(proto.graph.node)
    assert [n.SerializeToString() for n in aug.model.graph.node[: len(forward)]] == \
        [n.SerializeToString() for n in forward]
    assert not any(n.name.startswith("gradients") for n in aug.model.graph.node[: len(forward)])


def test_forward_values_are_never_returned_in_place_of_a_gradient() -> None:
    """dz/dx of z = x * w with a ones seed is w itself: the gradient must be a new value (an Expand or an
    Identity), not the forward value renamed."""
    g = Graph([N("z", "Mul", "x", "w")], inputs={"x": _u(3, 4), "w": _u(3, 4)})
    model, grads = _grads(g, ["z"], ["x"])
    assert any(v.name == "w" for v in model.graph.input)
    np.testing.assert_array_equal(grads["gradients/x_grad"], g.inputs["w"])


def test_second_order_through_cleaned_graphs() -> None:
    """Hessian-vector products differentiate cleaned gradient graphs (folded constants included)."""
    g = Graph([N("h", "MatMul", "x", "w"), N("t", "Tanh", "h"), N("y", "ReduceSum", "t", keepdims=0)],
              inputs={"x": _u(3, 4)}, inits={"w": _u(4, 2)})
    m = ir.serde.deserialize_model(build(g))
    v = _u(4, 2)
    (hv,) = onnxgrad.hessian_vector_product(m, "y", ["w"], v=[v])
    m.graph.outputs.append(next(val for n in m.graph for val in n.outputs if val.name == hv))
    got = run(ir.serde.serialize_model(m), g.feeds, [hv])[hv]  # type: ignore[list-item]
    x, w = g.inputs["x"], g.inits["w"]
    t = np.tanh(x @ w)
    expected = x.T @ (-2 * t * (1 - t**2) * (x @ v))
    np.testing.assert_allclose(got, expected, rtol=1e-10)


# ------------------------------------------------------------------------------------------ unit level
def _emitter(opset: int = 17) -> tuple[Emitter, ir.Value]:
    x = ir.Value(name="x", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape([2, 3]))
    graph = ir.Graph([x], [], nodes=[], opset_imports={"": opset})
    return Emitter(graph, opset, "gradients"), x


def test_folding_of_constant_only_ops() -> None:
    em, _ = _emitter()
    ones = em.const(np.ones((2, 3)), dtype=ir.DataType.FLOAT)
    total = em.op("ReduceSum", ones, em.ints([0]), keepdims=0)
    np.testing.assert_array_equal(em.constant_value(total), [2.0, 2.0, 2.0])
    idx = em.Unsqueeze(em.Reshape(em.ints([2]), em.ints([])), em.ints([0]))
    np.testing.assert_array_equal(em.constant_value(idx), [2])
    assert all(n.op_type == "Constant" for n in em.nodes)


def test_identities_with_fills_return_only_new_values() -> None:
    em, x = _emitter()
    ones = em.const(np.ones((1, 3)), dtype=ir.DataType.FLOAT)
    zeros = em.const(np.zeros(()), dtype=ir.DataType.FLOAT)
    assert em.Mul(x, ones) is not x  # x is a graph input: kept apart from the gradient
    t = em.Tanh(x)
    assert em.Mul(ones, t) is t and em.Div(t, ones) is t and em.Add(zeros, t) is t and em.Sub(t, zeros) is t
    wide = em.const(np.ones((4, 2, 3)), dtype=ir.DataType.FLOAT)
    expanded = em.Mul(t, wide)
    assert expanded.producer().op_type == "Expand"


def test_shape_rewrites() -> None:
    em, x = _emitter()
    t = em.Tanh(x)
    t.shape = ir.Shape([2, 3])
    assert em.Transpose(em.Transpose(t, perm=[1, 0]), perm=[1, 0]) is t
    assert em.Reshape(t, em.ints([2, 3])) is t
    assert em.Squeeze(em.Unsqueeze(t, em.ints([0])), em.ints([0])) is t
    assert em.Cast(t, to=ir.DataType.FLOAT) is t
    assert em.Neg(em.Neg(t)) is t
    twice = em.Reshape(em.Reshape(t, em.ints([6])), em.ints([3, 2]))
    assert twice.producer().inputs[0] is t
    assert optimize.simplify(em, "Tanh", [t], {}) is None



def test_shape_arithmetic_of_known_dims_is_folded() -> None:
    """Shape of a static value, of a Reshape to -1 of one, Gather of its static dims from a partly symbolic shape
    are constants; a Reshape to Shape(u) with u partly symbolic gets a constant target; a symbolic dim is left to
    the runtime."""
    em, x = _emitter()
    t = em.Tanh(x)
    np.testing.assert_array_equal(em.constant_value(em.Shape(t)), [2, 3])
    np.testing.assert_array_equal(em.constant_value(em.Shape(em.Reshape(t, em.ints([-1])))), [6])
    np.testing.assert_array_equal(em.constant_value(em.Shape(t, start=-1)), [3])
    u = ir.Value(name="u", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 4, 5]))
    shape = em.Shape(em.Tanh(u))
    assert shape.producer().op_type == "Shape"  # type: ignore[union-attr]
    np.testing.assert_array_equal(em.constant_value(em.Gather(shape, em.ints([2, 1]), axis=0)), [5, 4])
    assert em.constant_value(em.Gather(shape, em.ints([0]), axis=0)) is None
    g = em.Tanh(ir.Value(name="g", type=ir.TensorType(ir.DataType.FLOAT), shape=ir.Shape(["batch", 20])))
    back = em.Reshape(g, shape)
    np.testing.assert_array_equal(em.constant_value(back.producer().inputs[1]), [0, 4, 5])  # type: ignore[union-attr]
    assert [str(d) for d in back.shape] == ["batch", "4", "5"]  # type: ignore[union-attr]
    zeros = em.zeros(shape, like=g)
    assert zeros.producer().op_type == "ConstantOfShape"  # type: ignore[union-attr]
    assert [str(d) for d in zeros.shape] == ["batch", "4", "5"]  # type: ignore[union-attr]

# ------------------------------------------------------------------------------------ the one folder
_I = np.array([[3, -1], [0, 2]], np.int64)
FOLDS = [  # (op, inputs, attrs, opset): each is folded by numpy, and must match onnx's reference evaluator
    ("Add", [_I, np.array(5, np.int64)], {}, 17),
    ("Sub", [_I, _I.T], {}, 17),
    ("Mul", [_I, np.array([2, -3], np.int64)], {}, 17),
    ("Div", [np.array([1.5, -3.0], np.float32), np.array([0.5, 4.0], np.float32)], {}, 17),
    ("Neg", [_I], {}, 17),
    ("Sqrt", [np.array([4.0, 2.0])], {}, 17),
    ("Reciprocal", [np.array([4.0, -0.5], np.float32)], {}, 17),
    ("Cast", [np.array([1.7, -2.2], np.float32)], {"to": int(ir.DataType.INT64)}, 17),
    ("Cast", [_I], {"to": int(ir.DataType.BOOL)}, 17),
    ("Reshape", [np.arange(6, dtype=np.int64), np.array([0, -1], np.int64)], {}, 17),
    ("Reshape", [np.zeros((3, 2), np.int64), np.array([0, 2], np.int64)], {"allowzero": 0}, 17),
    ("Squeeze", [np.zeros((1, 3, 1), np.int64), np.array([-1], np.int64)], {}, 17),
    ("Squeeze", [np.zeros((1, 3, 1), np.int64)], {"axes": [0]}, 11),
    ("Unsqueeze", [np.array([4, 5], np.int64), np.array([0, -1], np.int64)], {}, 17),
    ("Unsqueeze", [np.array(4, np.int64)], {"axes": [0]}, 11),
    ("Transpose", [_I], {"perm": [1, 0]}, 17),
    ("Transpose", [np.zeros((2, 3, 4), np.int64)], {}, 17),
    ("Concat", [np.array([1], np.int64), np.array([2, 3], np.int64)], {"axis": 0}, 17),
    ("ReduceSum", [_I, np.array([1], np.int64)], {"keepdims": 0}, 17),
    ("ReduceSum", [_I], {"axes": [0]}, 11),
    ("ReduceSum", [_I, np.array([], np.int64)], {"noop_with_empty_axes": 1}, 17),
    ("Gather", [np.array([7, 8, 9], np.int64), np.array([-1, 0], np.int64)], {}, 17),
    ("Gather", [_I, np.array(1, np.int64)], {"axis": 1}, 17),
]


@pytest.mark.parametrize(("op", "arrays", "attrs", "opset"), FOLDS, ids=[f"{f[0]}-{i}" for i, f in enumerate(FOLDS)])
def test_one_folder_for_emission_and_shape_inference(op: str, arrays: list[np.ndarray], attrs: dict[str, object],
                                                       opset: int) -> None:
    """``fold`` without an opset (numpy only: the emitter) and with one (shapes.py) agree with onnx's reference
    evaluator, value and dtype."""
    fast = optimize.fold(op, arrays, attrs)
    assert fast is not None, f"{op} is meant to be folded by numpy"
    reference = optimize._reference_fold(op, arrays, attrs, opset, 1)
    assert reference is not None
    assert fast[0].dtype == reference[0].dtype and fast[0].shape == reference[0].shape
    np.testing.assert_array_equal(fast[0], reference[0])
    assert optimize.fold(op, arrays, attrs, opset)[0].tolist() == reference[0].tolist()  # type: ignore[index]


def test_fold_falls_back_to_the_reference_evaluator_only_when_given_an_opset() -> None:
    arrays = [np.array([7, -7], np.int64), np.array([3, 3], np.int64)]
    assert optimize.fold("Mod", arrays, {}) is None  # not a numpy op: the emitter leaves it to the runtime
    assert optimize.fold("Div", arrays, {}) is None  # integer Div is not numpy's
    assert optimize.fold("Mod", arrays, {}, opset=17)[0].tolist() == [1, 2]  # type: ignore[index]
    assert optimize.fold("Div", arrays, {}, opset=17)[0].tolist() == [2, -2]  # type: ignore[index]
    assert optimize.fold("Gather", [np.arange(3), np.array([5])], {}, opset=17) is None  # malformed: not folded


def test_shape_inference_sees_through_constant_shape_arithmetic() -> None:
    """A Reshape target computed from constants (an export without constant folding: Mod, Range, Unsqueeze, Concat,
    of a length onnx's inference cannot tell) is folded by shapes.py, so the MatMul after it gets a rank and has
    a gradient."""
    from onnx import helper as oh

    from onnxgrad.shapes import infer_missing_types

    nodes = [oh.make_node("Mod", ["fifteen", "four"], ["three"]),
             oh.make_node("Mod", ["four", "four"], ["nought"]),
             oh.make_node("Range", ["minus1", "nought", "one"], ["tail"]),  # [-1]
             oh.make_node("Unsqueeze", ["three", "zero"], ["head"]),
             oh.make_node("Concat", ["head", "tail"], ["target"], axis=0),
             oh.make_node("Reshape", ["x", "target"], ["r"]),
             oh.make_node("MatMul", ["r", "w"], ["y"])]
    inits = [onnx.numpy_helper.from_array(np.array(v, np.int64), n)
             for n, v in (("fifteen", 15), ("four", 4), ("zero", [0]), ("minus1", -1), ("one", 1))]
    inits.append(onnx.numpy_helper.from_array(_u(4, 2).astype(np.float32), "w"))
    graph = oh.make_graph(nodes, "g", [oh.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [12])],
                          [oh.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)], inits)
    proto = oh.make_model(graph, opset_imports=[oh.make_opsetid("", 17)], ir_version=8)
    model = ir.serde.deserialize_model(proto)
    infer_missing_types(model)
    reshaped = next(n for n in model.graph if n.op_type == "Reshape").outputs[0]
    assert reshaped.shape is not None and list(reshaped.shape) == [3, 4]
    x = _u(12).astype(np.float32)
    aug = onnxgrad.add_gradients(proto, ["y"], ["x"])
    got = run(aug.model, {"x": x}, [aug.gradients["x"]])[aug.gradients["x"]]  # type: ignore[index]
    np.testing.assert_allclose(got, np.tile(onnx.numpy_helper.to_array(inits[-1]).sum(axis=1), 3), rtol=1e-6)
