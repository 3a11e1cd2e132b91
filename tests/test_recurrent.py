"""LSTM, GRU and RNN gradients beyond the float32 table cases (tests/cases/recurrent.py):

- the expansion the rule walks computes what onnxruntime's kernel computes, for every attribute;
- float64: onnxgrad's gradient of the node against central differences, with the node itself (whose Y the
  gradient reads) computed by the recompute above in standard ops: onnxruntime's recurrent kernels are float32
  only, and onnx's reference evaluator ignores sequence_lens, clip, activations and input_forget;
- layout 1 (onnxruntime has no kernel for it) against layout 0;
- second order through an LSTM, in float64;
- PyTorch's nn.LSTM / nn.GRU / nn.RNN exported at opsets 11, 14 and 17 against torch autograd."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from onnxgrad import NEW_INPUT, add_gradients, registry
from onnxgrad.check import cast_feeds, check_gradients, convert_floats
from onnxgrad.emitter import Emitter
from onnxgrad.rules.recurrent import expand
from onnxgrad.runtime import run
from tests.cases.recurrent import BI, CASES, RAGGED, rc
from tests.gradcheck import Case, build
from tests.graphs import only

RECURRENT = ("LSTM", "GRU", "RNN")


def expanded(model: onnx.ModelProto) -> onnx.ModelProto:
    """The model with its recurrent node replaced by the recompute of the fallback gradient (standard ops, which
    onnxruntime runs in float64 too): the node's outputs and every use of them (gradient graphs read Y)."""
    m = ir.serde.deserialize_model(model)
    g = m.graph
    node = next(n for n in g if n.op_type in RECURRENT)
    em = Emitter(g, int(m.opset_imports[""]), "expanded", m.ir_version)
    outs = expand(em, node)
    roots = [o for o in outs if o is not None]
    live = em.live_nodes(roots)
    em.rollback([n for n in em.nodes if n not in live])
    g.insert_after(node, live)
    for init in em.initializers:
        g.register_initializer(init)
        if m.ir_version < 4:  # initializers were graph inputs too then
            g.inputs.append(init)
    for old, new in zip(node.outputs, outs, strict=False):
        if new is None:
            continue
        if old.is_graph_output():
            k = list(g.outputs).index(old)
            ident = ir.Node("", "Identity", [new], num_outputs=1, name=f"{old.name}__identity")
            g.insert_after(live[-1], ident)
            name, old.name = old.name, f"{old.name}__node"
            ident.outputs[0].name = name
            ident.outputs[0].dtype, ident.outputs[0].shape = old.dtype, old.shape
            g.outputs[k] = ident.outputs[0]
        old.replace_all_uses_with(new)
    g.remove(node, safe=False)
    return ir.serde.serialize_model(m)


def run_float64(model: onnx.ModelProto, feeds: dict[str, np.ndarray], outputs: list[str]) -> dict[str, np.ndarray]:
    """onnxruntime where it has every float64 kernel the model uses (not HardSigmoid, Elu, LeakyRelu...), else
    onnx's reference evaluator."""
    pruned = only(model, outputs)
    try:
        return run(pruned, feeds, outputs)
    except Exception:  # a kernel onnxruntime lacks in float64
        return run(pruned, feeds, outputs, provider="reference")


PERM1 = {"in0": (1, 0, 2), "in5": (1, 0, 2), "in6": (1, 0, 2), "out0": (2, 0, 1, 3), "out1": (1, 0, 2),
         "out2": (1, 0, 2)}  # layout 0 -> layout 1


def build1(case: Case) -> tuple[onnx.ModelProto, list[str], list[str], dict[str, np.ndarray]]:
    """The case's model with layout 1 (X [B, T, I], Y [B, T, D, H], states [B, D, H]), its inputs transposed
    (built from layout 0: onnx's shape inference and onnxruntime do not know layout 1 for all three ops)."""
    model, ys, xs, feeds = build(case)
    model.graph.node[0].attribute.append(onnx.helper.make_attribute("layout", 1))
    del model.graph.value_info[:]
    for vi in [*model.graph.input, *model.graph.output]:
        if vi.name in PERM1:
            dims = list(vi.type.tensor_type.shape.dim)
            copies = [onnx.TensorShapeProto.Dimension() for _ in dims]
            for c, k in zip(copies, PERM1[vi.name], strict=True):
                c.CopyFrom(dims[k])
            del vi.type.tensor_type.shape.dim[:]
            vi.type.tensor_type.shape.dim.extend(copies)
    feeds = {k: np.ascontiguousarray(np.transpose(v, PERM1[k])) if k in PERM1 else v for k, v in feeds.items()}
    return model, ys, xs, feeds


LAYOUT1 = [c for c in CASES if c.id in ("bidirectional-states", "reverse-ragged-states")]


# activations with kinks (no central-difference case): their forward semantics, alpha and beta included
KINKED = [rc("RNN", 14, "relu-thresholded", {**BI, "activations": ["Relu", "ThresholdedRelu"],
                                             "activation_alpha": [0.1]}),
          rc("GRU", 14, "thresholded-lbr", {"activations": ["ThresholdedRelu", "Relu"], "activation_alpha": [-0.2],
                                            "linear_before_reset": 1})]


@pytest.mark.parametrize("case", [*CASES, *KINKED], ids=lambda c: c.name)
def test_expansion_matches_onnxruntime(case: Case) -> None:
    """The recompute is the op: every attribute as onnxruntime's float32 kernel reads it."""
    model, ys, _, feeds = build(case)
    want = run(model, feeds, ys)
    got = run(expanded(model), feeds, ys)
    for y in ys:
        np.testing.assert_allclose(got[y], want[y], rtol=1e-4, atol=1e-5, err_msg=f"{case.name}: {y}")


@pytest.mark.parametrize("case", LAYOUT1, ids=lambda c: c.name)
def test_layout1_expansion_matches_layout0(case: Case) -> None:
    model0, ys, _, feeds0 = build(case)
    model1, _, _, feeds1 = build1(case)
    want = run(model0, feeds0, ys)
    got = run(expanded(model1), feeds1, ys)
    for y in ys:
        np.testing.assert_allclose(got[y], np.transpose(want[y], PERM1[y]), rtol=1e-4, atol=1e-5, err_msg=y)


def _float64(case: Case, layout: int = 0) -> tuple[onnx.ModelProto, list[str], list[str], dict[str, np.ndarray]]:
    model, ys, xs, feeds = build1(case) if layout else build(case)
    model = convert_floats(model)
    return model, ys, xs, cast_feeds(model, feeds)


@pytest.mark.parametrize("case, layout", [*((c, 0) for c in CASES), *((c, 1) for c in LAYOUT1)],
                         ids=lambda c: c.name if isinstance(c, Case) else f"layout{c}")
def test_float64_against_central_differences(case: Case, layout: int) -> None:
    """d<u, y>/dx along a random direction: onnxgrad's rule (float64) vs central differences of the op."""
    model, ys, xs, feeds = _float64(case, layout)
    rng = np.random.default_rng(case.seed + 3)
    reference = expanded(model)
    ys_val = run_float64(reference, feeds, ys)
    us = [rng.standard_normal(ys_val[y].shape) for y in ys]
    aug = add_gradients(model, ys, xs, grad_ys=us)
    grads = run_float64(expanded(aug.model), feeds, [aug.gradients[x] for x in xs])  # type: ignore[misc]

    def loss(point: dict[str, np.ndarray]) -> float:
        outs = run_float64(reference, {**feeds, **point}, ys)
        return float(sum(np.sum(u * outs[y]) for u, y in zip(us, ys, strict=True)))

    for x in xs:
        g = grads[aug.gradients[x]]
        v = rng.standard_normal(feeds[x].shape)
        h = 1e-5
        numeric = (loss({x: feeds[x] + h * v}) - loss({x: feeds[x] - h * v})) / (2 * h)
        analytic = float(np.sum(g * v))
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), f"{case.name}: {x}: {analytic} {numeric}"


SECOND = [c for c in CASES if c.op == "LSTM" and c.id in ("peepholes-bidirectional", "reverse-ragged-states")]


@pytest.mark.parametrize("case", SECOND, ids=lambda c: c.name)
def test_second_order_through_lstm_float64(case: Case) -> None:
    """The gradient graph differentiated again: d<w, dL/dx>/dx' against central differences of dL/dx."""
    model, ys, xs, feeds = _float64(case)
    rng = np.random.default_rng(case.seed + 5)
    shapes = run_float64(expanded(model), feeds, ys)
    us = [rng.standard_normal(shapes[y].shape) for y in ys]
    first = add_gradients(model, ys, xs, grad_ys=us)
    gx: list[str] = [first.gradients[x] for x in xs]  # type: ignore[misc]
    first_run = only(expanded(first.model), gx)
    gvals = run(first_run, feeds, gx)
    ws = [rng.standard_normal(gvals[g].shape) for g in gx]
    second = add_gradients(first.model, gx, xs, grad_ys=ws)  # through the LSTM node again, its rule included
    got = run_float64(expanded(second.model), feeds, [second.gradients[x] for x in xs])  # type: ignore[misc]

    def loss(point: dict[str, np.ndarray]) -> float:
        outs = run(first_run, {**feeds, **point}, gx)
        return float(sum(np.sum(w * outs[g]) for w, g in zip(ws, gx, strict=True)))

    for x in xs:
        v = rng.standard_normal(feeds[x].shape)
        h = 1e-5
        numeric = (loss({x: feeds[x] + h * v}) - loss({x: feeds[x] - h * v})) / (2 * h)
        analytic = float(np.sum(got[second.gradients[x]] * v))
        assert abs(analytic - numeric) <= 1e-6 * max(1.0, abs(numeric)), f"{case.name}: {x}: {analytic} {numeric}"


# ----------------------------------------------------------------------------------------------- PyTorch
TORCH_CASES = [  # (module, opset, layers, bidirectional, batch_first, initial states)
    ("LSTM", 11, 1, False, False, False),
    ("LSTM", 14, 2, True, True, True),
    ("LSTM", 17, 2, True, False, False),
    ("LSTM", 17, 1, False, True, True),
    ("GRU", 11, 2, True, True, True),
    ("GRU", 14, 1, False, False, False),
    ("GRU", 17, 1, True, False, True),
    ("RNN", 11, 1, True, False, True),
    ("RNN", 14, 2, False, True, False),
    ("RNN", 17, 2, True, True, True),
]


TORCH_GATES = {"LSTM": [0, 3, 1, 2], "GRU": [1, 0, 2], "RNN": [0]}  # torch's gate blocks in onnx's order


def _torch_model(kind: str, opset: int, layers: int, bidir: bool, batch_first: bool, states: bool,
                 steps: int = 5, dynamic: bool = False
                 ) -> tuple[Any, onnx.ModelProto, dict[str, np.ndarray], tuple[Any, ...]]:
    """The module, its export by the default (TorchScript) exporter, the feeds and the torch arguments."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(opset * 10 + layers)
    inp, hid, batch = 3, 4, 2
    module = getattr(torch.nn, kind)(inp, hid, num_layers=layers, bidirectional=bidir, batch_first=batch_first)
    dirs = 2 if bidir else 1
    x = torch.randn((batch, steps, inp) if batch_first else (steps, batch, inp))
    args: tuple[Any, ...] = (x,)
    names = ["x"]
    flat = [x]
    if states:
        h0 = torch.randn(layers * dirs, batch, hid)
        if kind == "LSTM":
            c0 = torch.randn(layers * dirs, batch, hid)
            args, names, flat = (x, (h0, c0)), ["x", "h0", "c0"], [x, h0, c0]
        else:
            args, names, flat = (x, h0), ["x", "h0"], [x, h0]
    f = io.BytesIO()
    axes = {"x": {1 if batch_first else 0: "T"}} if dynamic else None
    torch.onnx.export(module, args, f, dynamo=False, opset_version=opset, input_names=names, output_names=["y"],
                      dynamic_axes=axes)
    return module, onnx.load_from_string(f.getvalue()), {n: t.numpy() for n, t in zip(names, flat, strict=True)}, args


def _in_onnx_layout(kind: str, module: Any, layer: int) -> dict[int, np.ndarray]:
    """The gradients of torch's parameters of one layer as the node's W (1), R (2) and B (3) inputs hold them."""
    dirs = ["", "_reverse"] if module.bidirectional else [""]
    order = TORCH_GATES[kind]

    def blocks(a: np.ndarray) -> np.ndarray:
        return np.concatenate([np.split(a, len(order))[k] for k in order])

    def grad(name: str) -> np.ndarray:
        return getattr(module, name).grad.numpy()

    return {
        1: np.stack([blocks(grad(f"weight_ih_l{layer}{d}")) for d in dirs]),
        2: np.stack([blocks(grad(f"weight_hh_l{layer}{d}")) for d in dirs]),
        3: np.stack([np.concatenate([blocks(grad(f"bias_ih_l{layer}{d}")), blocks(grad(f"bias_hh_l{layer}{d}"))])
                     for d in dirs]),
    }


@pytest.mark.parametrize("spec", TORCH_CASES, ids=lambda s: "-".join(map(str, s)))
def test_torch_modules_against_autograd(spec: tuple[Any, ...]) -> None:
    """The input, initial states and every weight (W, R, B of every layer and direction) against autograd."""
    _against_autograd(*spec)


@pytest.mark.parametrize("kind", ["LSTM", "GRU"])
def test_torch_run_time_sequence_length(kind: str) -> None:
    """Exported with a dynamic sequence axis: the gradient's recurrences are Loops over the run-time length."""
    _against_autograd(kind, 14, 2, True, True, True, steps=8, dynamic=True)


def _against_autograd(kind: str, opset: int, layers: int, bidir: bool, batch_first: bool, states: bool,
                      steps: int = 5, dynamic: bool = False) -> None:
    torch = pytest.importorskip("torch")
    module, model, feeds, args = _torch_model(kind, opset, layers, bidir, batch_first, states, steps, dynamic)
    if dynamic:
        assert not model.graph.input[0].type.tensor_type.shape.dim[1 if batch_first else 0].HasField("dim_value")
    flat = [args[0], *((args[1] if isinstance(args[1], tuple) else (args[1],)) if states else ())]
    for a in flat:
        a.requires_grad_(True)
    y = module(*args)[0]
    u = np.random.default_rng(opset).standard_normal(tuple(y.shape)).astype(np.float32)
    (y * torch.tensor(u)).sum().backward()
    want = {n: t.grad.numpy() for n, t in zip(feeds, flat, strict=True)}
    nodes = [n for n in model.graph.node if n.op_type == kind]
    assert len(nodes) == layers
    for layer, node in enumerate(nodes):
        for k, g in _in_onnx_layout(kind, module, layer).items():
            want[node.input[k]] = g
    xs = list(want)
    aug = add_gradients(model, ["y"], xs, grad_ys=[u])
    got = run(aug.model, feeds, [aug.gradients[x] for x in xs])  # type: ignore[misc]
    for x in xs:
        np.testing.assert_allclose(got[aug.gradients[x]], want[x], rtol=1e-4, atol=1e-5, err_msg=x)


def test_bidirectional_ragged_layout1_gradients_match_layout0() -> None:
    """Layout 1 against layout 0, gradients included (onnxruntime runs only layout 0: the reference evaluator
    runs the layout-1 gradient model, where only its own node, whose outputs the gradient never reads, is off)."""
    case = rc("LSTM", 14, "l1", BI, lens=RAGGED, h0=True, c0=True, peep=True)
    model0, ys, xs, feeds0 = build(case)
    model1, _, _, feeds1 = build1(case)
    rng = np.random.default_rng(4)
    y0 = run(model0, feeds0, ys)
    us0 = [rng.standard_normal(y0[y].shape).astype(np.float32) for y in ys]
    us1 = [np.ascontiguousarray(np.transpose(u, PERM1[y])) for u, y in zip(us0, ys, strict=True)]
    a0, a1 = add_gradients(model0, ys, xs, grad_ys=us0), add_gradients(model1, ys, xs, grad_ys=us1)
    g0 = run(a0.model, feeds0, [a0.gradients[x] for x in xs])
    g1 = run(a1.model, feeds1, [a1.gradients[x] for x in xs], provider="reference")
    for x in xs:
        want = g0[a0.gradients[x]]
        want = np.transpose(want, PERM1[x]) if x in PERM1 else want
        np.testing.assert_allclose(g1[a1.gradients[x]], want, rtol=1e-4, atol=1e-5, err_msg=x)


# ------------------------------------------------------------------------------------------- Keras / tf2onnx
KERAS_GATES = [0, 3, 1, 2]  # Keras LSTM's kernel blocks (i, f, c, o) in onnx's order (i, o, f, c)


@pytest.mark.parametrize("opset, go_backwards", [(11, False), (14, True), (17, False)])
def test_keras_lstm_through_tf2onnx_against_tensorflow(opset: int, go_backwards: bool) -> None:
    """Keras 3's LSTM, converted by tf2onnx to one LSTM node: the input and kernel, recurrent kernel and bias
    gradients against tf.GradientTape. (tf2onnx 1.17 turns Keras 3's GRU and SimpleRNN into a Loop of the
    cell, not a GRU/RNN node: those are Loop gradients.)"""
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    tf2onnx = pytest.importorskip("tf2onnx")
    keras.utils.set_random_seed(opset)
    batch, steps, inp, hid = 2, 5, 3, 4
    layer = keras.layers.LSTM(hid, return_sequences=True, go_backwards=go_backwards, bias_initializer="random_normal")
    x = keras.Input((steps, inp), batch_size=batch)
    net = keras.Model(x, layer(x))
    spec = (tf.TensorSpec((batch, steps, inp), tf.float32, name="x"),)
    model, _ = tf2onnx.convert.from_function(tf.function(lambda v: net(v)), input_signature=spec, opset=opset)
    nodes = [n for n in model.graph.node if n.op_type == "LSTM"]
    assert len(nodes) == 1, [n.op_type for n in model.graph.node]
    rng = np.random.default_rng(opset)
    xv = rng.standard_normal((batch, steps, inp)).astype(np.float32)
    u = rng.standard_normal((batch, steps, hid)).astype(np.float32)
    xt = tf.constant(xv)
    kernel, recurrent, bias = layer.cell.kernel, layer.cell.recurrent_kernel, layer.cell.bias
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(net(xt) * u)
    dx, dk, dr, db = (np.asarray(g) for g in tape.gradient(loss, [xt, kernel.value, recurrent.value, bias.value]))

    def blocks(a: np.ndarray) -> np.ndarray:
        return np.concatenate([np.split(a, 4)[k] for k in KERAS_GATES])

    w, r, b = nodes[0].input[1:4]
    want = {"x": dx, w: blocks(dk.T)[None], r: blocks(dr.T)[None]}
    aug = add_gradients(model, [model.graph.output[0].name], [*want, b], grad_ys=[u])
    got = run(aug.model, {"x": xv}, [aug.gradients[k] for k in [*want, b]])  # type: ignore[misc]
    for k, v in want.items():
        np.testing.assert_allclose(got[aug.gradients[k]], v, rtol=1e-4, atol=1e-5, err_msg=k)
    gb = got[aug.gradients[b]][0]
    np.testing.assert_allclose(gb[:4 * hid], blocks(db), rtol=1e-4, atol=1e-5)  # Wb; Rb holds the same sum
    np.testing.assert_allclose(gb[4 * hid:], blocks(db), rtol=1e-4, atol=1e-5)


def test_second_order_through_lstm_loops() -> None:
    """A run-time sequence length: the gradient's recurrences are Loops, differentiated again by the Loop rule
    (float32, onnxruntime)."""
    if registry.lookup("", "Loop", 14) is None:
        pytest.skip("no Loop gradient rule registered")
    case = next(c for c in CASES if c.name == "LSTM-v14-clip")
    model, ys, xs, feeds = build(case, dynamic=True)
    first = add_gradients(model, ys, xs, [NEW_INPUT] * len(ys))
    assert any(n.op_type == "Loop" for n in first.model.graph.node)
    rng = np.random.default_rng(1)
    outs = run(model, feeds, ys)
    feeds = {**feeds, **{s: rng.standard_normal(outs[y].shape).astype(np.float32)
                         for s, y in zip(first.new_inputs, ys, strict=True)}}
    rows = check_gradients(first.model, [g for g in first.gradients.values() if g], xs, feeds, seed=2)
    assert all(r.ok for r in rows), [(r.x, r.analytic, r.numeric) for r in rows if not r.ok]


@pytest.mark.parametrize("kind", ["GRU", "SimpleRNN"])
def test_keras_gru_and_simple_rnn_through_tf2onnx_loops(kind: str) -> None:
    """tf2onnx 1.17 converts Keras 3's GRU and SimpleRNN to a Loop over the cell (its GRU/RNN rewriters do not
    match Keras 3's graphs): the input and weight gradients come from the Loop rule, against tf.GradientTape."""
    if registry.lookup("", "Loop", 14) is None:
        pytest.skip("no Loop gradient rule registered")
    tf = pytest.importorskip("tensorflow")
    keras = pytest.importorskip("keras")
    tf2onnx = pytest.importorskip("tf2onnx")
    keras.utils.set_random_seed(3)
    batch, steps, inp, hid = 2, 5, 3, 4
    layer = getattr(keras.layers, kind)(hid, return_sequences=True, bias_initializer="random_normal")
    x = keras.Input((steps, inp), batch_size=batch)
    net = keras.Model(x, layer(x))
    spec = (tf.TensorSpec((batch, steps, inp), tf.float32, name="x"),)
    model, _ = tf2onnx.convert.from_function(tf.function(lambda v: net(v)), input_signature=spec, opset=14)
    rng = np.random.default_rng(3)
    xv = rng.standard_normal((batch, steps, inp)).astype(np.float32)
    u = rng.standard_normal((batch, steps, hid)).astype(np.float32)
    xt = tf.constant(xv)
    weights = [layer.cell.kernel, layer.cell.recurrent_kernel, layer.cell.bias]
    with tf.GradientTape() as tape:
        tape.watch(xt)
        loss = tf.reduce_sum(net(xt) * u)
    grads = [np.asarray(g) for g in tape.gradient(loss, [xt, *[w.value for w in weights]])]
    values = {t.name: onnx.numpy_helper.to_array(t) for t in model.graph.initializer}
    names = [next(n for n, v in values.items() if v.shape == tuple(w.shape) and np.array_equal(v, np.asarray(w)))
             for w in weights]
    xs = ["x", *names]
    aug = add_gradients(model, [model.graph.output[0].name], xs, grad_ys=[u])
    got = run(aug.model, {"x": xv}, [aug.gradients[k] for k in xs])  # type: ignore[misc]
    for k, want in zip(xs, grads, strict=True):
        np.testing.assert_allclose(got[aug.gradients[k]], want, rtol=1e-4, atol=1e-5, err_msg=k)


def _onnx_weights(module: Any, layer: int, tag: str) -> list[onnx.TensorProto]:
    """W, R and B (named W<tag>, R<tag>, B<tag>) of one layer of a torch LSTM or GRU, in ONNX's layout: gates
    reordered (torch's ifgo -> iofc, rzn -> zrh), directions stacked, the two biases concatenated."""
    order = [0, 3, 1, 2] if type(module).__name__ == "LSTM" else [1, 0, 2]
    dirs = ["", "_reverse"] if module.bidirectional else [""]

    def stacked(names: list[str]) -> np.ndarray:
        def gates(a: np.ndarray) -> np.ndarray:
            parts = np.split(a, len(order), axis=0)
            return np.concatenate([parts[k] for k in order], axis=0)
        return np.stack([np.concatenate([gates(getattr(module, f"{n}_l{layer}{d}").detach().numpy()) for n in names])
                         for d in dirs])

    return [onnx.numpy_helper.from_array(stacked(names), f"{kind}{tag}")
            for kind, names in (("W", ["weight_ih"]), ("R", ["weight_hh"]), ("B", ["bias_ih", "bias_hh"]))]


def test_layers_sharing_one_initial_state_against_torch() -> None:
    """PyTorch's dynamo exporter folds a stacked LSTM's zero initial states into one initializer that both layers
    read as initial_h and initial_c. Each layer's gradient re-emits its cell and walks the nodes it emitted; a row of
    the shared state that the first layer had emitted was shared with the second (common subexpressions), off the
    second layer's walk, and its gradient lost that layer's part (32% off torch). Here the state is an input."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    lstm = torch.nn.LSTM(5, 6, num_layers=2, bidirectional=True).double()
    rng = np.random.default_rng(0)
    x, z = rng.standard_normal((4, 2, 5)), rng.standard_normal((2, 2, 6))
    nodes, inits = [], []
    for layer in range(2):
        inits += _onnx_weights(lstm, layer, str(layer))
        src = "x" if layer == 0 else "h"
        nodes += [onnx.helper.make_node("LSTM", [src, f"W{layer}", f"R{layer}", f"B{layer}", "", "z", "z"],
                                        [f"y{layer}"], hidden_size=6, direction="bidirectional")]
        if layer == 0:  # (T, 2, B, H) -> (T, B, 2H), the next layer's input
            nodes += [onnx.helper.make_node("Transpose", ["y0"], ["yt"], perm=[0, 2, 1, 3]),
                      onnx.helper.make_node("Reshape", ["yt", "shape"], ["h"])]
    inits.append(onnx.numpy_helper.from_array(np.array([4, 2, 12], np.int64), "shape"))
    f64 = onnx.TensorProto.DOUBLE
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", f64, [4, 2, 5]),
                                                onnx.helper.make_tensor_value_info("z", f64, [2, 2, 6])],
                                   [onnx.helper.make_tensor_value_info("y1", f64, None)], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    u = rng.standard_normal((4, 2, 2, 6))
    aug = add_gradients(model, ["y1"], ["x", "z"], grad_ys=[u])
    got = run_float64(expanded(aug.model), {"x": x, "z": z}, [aug.gradients["x"], aug.gradients["z"]])
    xt, zt = torch.tensor(x, requires_grad=True), torch.tensor(z, requires_grad=True)
    out = lstm(xt, (torch.cat([zt, zt]), torch.cat([zt, zt])))[0]
    out.backward(torch.tensor(u).permute(0, 2, 1, 3).reshape(4, 2, 12))
    np.testing.assert_allclose(got[aug.gradients["x"]], xt.grad.numpy(), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(got[aug.gradients["z"]], zt.grad.numpy(), rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("op", ["LSTM", "GRU"])
def test_two_recurrent_nodes_reading_one_input_against_torch(op: str) -> None:
    """Two recurrent nodes over the same x (parallel branches; forward and reverse written as two nodes): the
    second node's re-emitted cell shared the first one's nodes that read x (common subexpressions), off its own
    walk, and dx lost that node's part (75% off torch for two LSTMs)."""
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    layers = [getattr(torch.nn, op)(4, 5).double() for _ in range(2)]
    nodes, inits = [], []
    for k, layer in enumerate(layers):
        inits += _onnx_weights(layer, 0, str(k))
        extra = {"linear_before_reset": 1} if op == "GRU" else {}
        nodes.append(onnx.helper.make_node(op, ["x", f"W{k}", f"R{k}", f"B{k}"], [f"y{k}"], hidden_size=5, **extra))
    nodes.append(onnx.helper.make_node("Add", ["y0", "y1"], ["y"]))
    f64 = onnx.TensorProto.DOUBLE
    graph = onnx.helper.make_graph(nodes, "g", [onnx.helper.make_tensor_value_info("x", f64, [3, 2, 4])],
                                   [onnx.helper.make_tensor_value_info("y", f64, None)], inits)
    model = onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)], ir_version=8)
    rng = np.random.default_rng(0)
    x, u = rng.standard_normal((3, 2, 4)), rng.standard_normal((3, 1, 2, 5))
    aug = add_gradients(model, ["y"], ["x"], grad_ys=[u])
    got = run_float64(expanded(aug.model), {"x": x}, [aug.gradients["x"]])[aug.gradients["x"]]  # type: ignore[index]
    xt = torch.tensor(x, requires_grad=True)
    (layers[0](xt)[0] + layers[1](xt)[0]).backward(torch.tensor(u[:, 0]))
    np.testing.assert_allclose(got, xt.grad.numpy(), rtol=1e-9, atol=1e-10)
