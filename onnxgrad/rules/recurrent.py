"""LSTM, GRU and RNN: back-propagation through time, in standard ops, the forward node left untouched.

Every attribute (directions, layout, ``linear_before_reset``, activations with alpha/beta, ``clip``,
``input_forget``, ragged ``sequence_lens``, initial states, peepholes) is stated once, in the forward cell
(``_cell``), and the reverse walk differentiates it; what is hand-written is only the order of the work:

- ``gradient_from_y`` (LSTM, RNN, GRU with ``linear_before_reset``; whenever the node outputs Y): h_{t-1} is read
  from the node's own Y, so the gates of every step come at once (X W^T and h_{t-1} R^T one product each over
  all steps); an LSTM's c_t is recomputed by an elementwise recurrence (f_t c_{t-1} + i_t g_t); the cell's local
  partial derivatives come as tensors over all steps (the cell is elementwise in each hidden unit, so a reverse
  walk seeded with ones gives them); a reverse recurrence of one product and a few elementwise ops per step
  gives the gradients of every step's state; one reverse walk over all steps then gives the gradients of X, W,
  R, B, P and the initial states (dW, dR: one product each, O(|w|) memory). Both recurrences are unrolled when
  the sequence length is static (onnxruntime runs that faster than a Loop, bench/RESULTS.md; and the gradient
  graph is differentiable again by the ordinary rules alone) and are Loops (bodies built with an Emitter of their
  own) when it is known at run time only (opset 11 on; differentiable again through the Loop rule).
- ``expand`` (GRU without ``linear_before_reset``, whose candidate reads r_t before its recurrent product; or a
  node without Y): the forward recomputed step by step, unrolled over a static sequence length, and walked in
  reverse; the recurrent weight's gradient is still one product over all steps.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx_ir as ir

from onnxgrad.backprop import Request, backprop
from onnxgrad.emitter import Emitter, attr
from onnxgrad.registry import register

Grads = Sequence[ir.Value | None]
Out = list[ir.Value | None]

GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}
DEFAULT_ACTS = {"LSTM": ["Sigmoid", "Tanh", "Tanh"], "GRU": ["Sigmoid", "Tanh"], "RNN": ["Tanh"]}
# activation -> (uses alpha, default alpha, uses beta, default beta), as onnxruntime consumes the lists
ACT_PARAMS = {
    "relu": (False, 0.0, False, 0.0), "tanh": (False, 0.0, False, 0.0), "sigmoid": (False, 0.0, False, 0.0),
    "softsign": (False, 0.0, False, 0.0), "softplus": (False, 0.0, False, 0.0),
    "leakyrelu": (True, 0.01, False, 0.0), "thresholdedrelu": (True, 1.0, False, 0.0), "elu": (True, 1.0, False, 0.0),
    "hardsigmoid": (True, 0.2, True, 0.5), "affine": (True, 1.0, True, 0.0), "scaledtanh": (True, 1.0, True, 1.0),
}
NOTES = ("back-propagation through time, h_t read from Y; unrolled for a static sequence length, Loops for a "
         "run-time one (opset >= 11); GRU without linear_before_reset, or no Y: static sequence length only")


@dataclass(frozen=True)
class Act:
    name: str  # lower case
    alpha: float
    beta: float


@dataclass
class Spec:
    """What a recurrent node computes, read from its attributes."""

    op: str
    hidden: int
    directions: list[str]  # 'forward' / 'reverse', one per direction index
    layout: int
    acts: list[list[Act]]  # per direction: f, g, h (LSTM), f, g (GRU), f (RNN)
    clip: float | None
    input_forget: bool
    linear_before_reset: bool

    @property
    def gates(self) -> int:
        return GATES[self.op]


def read_spec(node: ir.Node) -> Spec:
    """The node's attributes, with onnx's defaults, and the activations paired with their alpha/beta."""
    op = node.op_type
    direction = attr(node, "direction", "forward")
    directions = ["forward", "reverse"] if direction == "bidirectional" else [direction]
    names = [str(n) for n in (attr(node, "activations") or [])]
    per = len(DEFAULT_ACTS[op])
    if not names:
        names = DEFAULT_ACTS[op] * len(directions)
    elif len(names) == per and len(directions) == 2:
        names = names * 2
    alphas = list(attr(node, "activation_alpha") or [])
    betas = list(attr(node, "activation_beta") or [])
    acts: list[Act] = []
    for name in names:
        key = name.lower()
        if key not in ACT_PARAMS:
            raise ValueError(f"{op} '{node.name}': activation '{name}' is not one onnxgrad differentiates")
        uses_a, def_a, uses_b, def_b = ACT_PARAMS[key]
        alpha = float(alphas.pop(0)) if uses_a and alphas else def_a
        beta = float(betas.pop(0)) if uses_b and betas else def_b
        acts.append(Act(key, alpha, beta))
    clip = attr(node, "clip")
    return Spec(op, int(attr(node, "hidden_size")), directions, int(attr(node, "layout", 0)),
                [acts[d * per:(d + 1) * per] for d in range(len(directions))],
                None if clip is None else float(clip), bool(attr(node, "input_forget", 0)),
                bool(attr(node, "linear_before_reset", 0)))


def activate(em: Emitter, x: ir.Value, act: Act, clip: float | None) -> ir.Value:
    """One activation of the recurrent ops' list, on x clipped to [-clip, clip] when a clip is set."""
    out = _activate(em, x, act, clip)
    if x.shape is not None:
        out.shape = x.shape
    return out


def _activate(em: Emitter, x: ir.Value, act: Act, clip: float | None) -> ir.Value:
    if clip is not None:
        x = em.clip(x, -clip, clip)
    a, b = act.alpha, act.beta
    name = act.name
    if name == "relu":
        return em.Relu(x)
    if name == "tanh":
        return em.Tanh(x)
    if name == "sigmoid":
        return em.Sigmoid(x)
    if name == "softsign":
        return em.Softsign(x)
    if name == "softplus":
        return em.Softplus(x)
    if name == "leakyrelu":
        return em.LeakyRelu(x, alpha=a)
    if name == "elu":
        return em.Elu(x, alpha=a)
    if name == "hardsigmoid":
        return em.HardSigmoid(x, alpha=a, beta=b)
    if name == "thresholdedrelu":
        return em.Mul(x, em.indicator(em.Greater(x, em.const(a, like=x)), x))
    if name == "affine":
        return em.Add(em.Mul(x, em.const(a, like=x)), em.const(b, like=x))
    assert name == "scaledtanh"
    return em.Mul(em.Tanh(em.Mul(x, em.const(b, like=x))), em.const(a, like=x))


Dim = int | ir.SymbolicDim | None


def _shaped(v: ir.Value, *dims: Dim) -> ir.Value:
    """v, its shape recorded (the rules downstream lean on ranks and static sizes)."""
    v.shape = ir.Shape(list(dims))
    return v


def _row(em: Emitter, v: ir.Value, d: int) -> ir.Value:
    """v[d] of a tensor whose axis 0 is the direction."""
    out = em.squeeze(em.slice(v, [d], [d + 1], [0]), [0])
    return out if v.shape is None else _shaped(out, *list(v.shape)[1:])


def _named(d: Dim, node: ir.Node, what: str) -> Dim:
    """d, or a symbol of its own for an unnamed run-time length of a named node (every value recorded with it has
    that length)."""
    if isinstance(d, int) or (isinstance(d, ir.SymbolicDim) and d.value) or not node.name:
        return d
    return ir.SymbolicDim(f"{node.name}_{what}")


def _like(v: ir.Value, other: ir.Value) -> ir.Value:
    """v, with other's shape recorded."""
    if other.shape is not None:
        v.shape = other.shape
    return v


def _cut(em: Emitter, v: ir.Value, sizes: list[int], axis: int) -> list[ir.Value]:
    """v split along ``axis`` into pieces of static ``sizes``, each with its shape."""
    dims = list(v.shape) if v.shape is not None else None
    if dims is not None:
        axis %= len(dims)
    pieces = list(em.split(v, sizes, axis=axis)) if len(sizes) > 1 else [v]
    for piece, size in zip(pieces, sizes, strict=True):
        if dims is not None:
            _shaped(piece, *dims[:axis], size, *dims[axis + 1:])
    return pieces


def _product(em: Emitter, a: ir.Value, b: ir.Value) -> ir.Value:
    """a @ b for a of rank 2 or 3 and b of rank 2, with its shape."""
    assert a.shape is not None and b.shape is not None
    return _shaped(em.MatMul(a, b), *list(a.shape)[:-1], b.shape[1])


def _time(em: Emitter, steps: int | None, tdim: int | ir.Value, like: ir.Value) -> ir.Value:
    """0, 1, ..., T-1 in like's dtype."""
    if steps is not None:
        return em.const(np.arange(steps, dtype=np.float64), like=like)
    return em.Cast(em.arange(tdim), to=like.dtype)


def _reverse_index(em: Emitter, lens: ir.Value, steps: int | None, tdim: int | ir.Value, batch: int | ir.Value,
                   like: ir.Value) -> ir.Value:
    """[T, B] int64 rows of a [T*B, ...] tensor that reverse each sequence within its own length (rows past
    it stay in place): t -> len_b - 1 - t where t < len_b."""
    lens_f = em.Cast(lens, to=like.dtype)
    t = em.unsqueeze(_time(em, steps, tdim, like), [1])
    valid = em.indicator(em.Less(t, em.unsqueeze(lens_f, [0])), like)
    one, two = em.const(1.0, like=like), em.const(2.0, like=like)
    row = em.Add(t, em.Mul(valid, em.Sub(em.Sub(lens_f, one), em.Mul(two, t))))
    b = em.Cast(em.arange(batch), to=like.dtype)
    size = em.Cast(batch, to=like.dtype) if isinstance(batch, ir.Value) else em.const(float(batch), like=like)
    return _shaped(em.Cast(em.Add(em.Mul(row, size), em.unsqueeze(b, [0])), to=ir.DataType.INT64), steps,
                   batch if isinstance(batch, int) else None)


Taps = list[tuple[ir.Value, ir.Value, ir.Value]]  # (a, a @ b, b) of the steps' recurrent products


def _step(em: Emitter, spec: Spec, acts: list[Act], xw: ir.Value, h: ir.Value, c: ir.Value | None,
          rt: ir.Value, rb: ir.Value | None, p: list[ir.Value] | None, taps: Taps
          ) -> tuple[ir.Value, ir.Value | None]:
    """One time step: (h_t, c_t) from x_t W^T + Wb (xw, [B, G*H]), h_{t-1}, c_{t-1} and R^T. Each product with a
    recurrent weight is noted in ``taps``, so that its weight gradient can be one product over all steps."""
    hid = spec.hidden

    def _matmul(em: Emitter, a: ir.Value, b: ir.Value) -> ir.Value:
        out = _product(em, a, b)
        taps.append((a, out, b))
        return out

    if spec.op == "GRU" and not spec.linear_before_reset:
        rt_zr, rt_n = _cut(em, rt, [2 * hid, hid], axis=1)
        rb_zr, rb_n = _cut(em, rb, [2 * hid, hid], axis=0) if rb is not None else (None, None)
        hr = _matmul(em, h, rt_zr)
        hr = hr if rb_zr is None else em.Add(hr, rb_zr)

        def n_part(rh: ir.Value) -> ir.Value:
            out = _matmul(em, rh, rt_n)
            return out if rb_n is None else em.Add(out, rb_n)

        return _cell(em, spec, acts, xw, hr, h, c, p, n_part)
    hr = _matmul(em, h, rt)
    return _cell(em, spec, acts, xw, hr if rb is None else em.Add(hr, rb), h, c, p)


def _lstm_gates(em: Emitter, spec: Spec, acts: list[Act], pre: ir.Value, c: ir.Value | None,
                p: list[ir.Value] | None) -> tuple[ir.Value, ir.Value, ir.Value, ir.Value]:
    """An LSTM's gates i, f, g and the output gate's input from the pre-activations (c_{t-1} for peepholes)."""
    i_pre, o_pre, f_pre, g_pre = _cut(em, pre, [spec.hidden] * 4, axis=-1)
    if p is not None:
        assert c is not None
        i_pre, f_pre = _like(em.Add(i_pre, em.Mul(p[0], c)), c), _like(em.Add(f_pre, em.Mul(p[2], c)), c)
    i = activate(em, i_pre, acts[0], spec.clip)
    f = em.Sub(em.const(1.0, like=i), i) if spec.input_forget else activate(em, f_pre, acts[0], spec.clip)
    return i, _like(f, i), activate(em, g_pre, acts[1], spec.clip), o_pre


def _cell(em: Emitter, spec: Spec, acts: list[Act], xw: ir.Value, hr: ir.Value, h: ir.Value, c: ir.Value | None,
          p: list[ir.Value] | None, n_part: Callable[[ir.Value], ir.Value] | None = None
          ) -> tuple[ir.Value, ir.Value | None]:
    """(h_t, c_t) from x_t W^T + Wb (xw), h_{t-1} R^T + Rb (hr), h_{t-1} and c_{t-1}: elementwise in each hidden
    unit (one step [B, ...], or every step at once [T, B, ...]). GRU without linear_before_reset: ``hr`` holds
    the z and r parts only, and ``n_part(r * h)`` gives the candidate's recurrent term."""
    hid = spec.hidden
    if spec.op == "GRU":
        rz_w, n_w = _cut(em, xw, [2 * hid, hid], axis=-1)
        rz_h, n_h = _cut(em, hr, [2 * hid, hid], axis=-1) if n_part is None else (hr, None)
        z_pre, r_pre = _cut(em, _like(em.Add(rz_w, rz_h), rz_w), [hid, hid], axis=-1)
        z, r = activate(em, z_pre, acts[0], spec.clip), activate(em, r_pre, acts[0], spec.clip)
        if n_part is None:
            n_pre = em.Add(n_w, _like(em.Mul(r, n_h), r))
        else:
            n_pre = em.Add(n_w, n_part(_like(em.Mul(r, h), h)))
        n = activate(em, _like(n_pre, n_w), acts[1], spec.clip)
        # every operand is [.., B, hid]: the shapes recorded, so the walk needs no run-time unbroadcast
        return _like(em.Add(n, _like(em.Mul(z, _like(em.Sub(h, n), h)), h)), h), None  # (1 - z) n + z h
    pre = _like(em.Add(xw, hr), xw)
    if spec.op == "RNN":
        return activate(em, pre, acts[0], spec.clip), None
    assert c is not None
    i, f, g, o_pre = _lstm_gates(em, spec, acts, pre, c, p)
    c_new = _like(em.Add(_like(em.Mul(f, c), c), _like(em.Mul(i, g), c)), c)
    if p is not None:
        o_pre = em.Add(o_pre, _like(em.Mul(p[1], c_new), c_new))
    o = activate(em, _like(o_pre, c), acts[0], spec.clip)
    return _like(em.Mul(o, activate(em, c_new, acts[2], None)), c), c_new


def expand(em: Emitter, node: ir.Node, taps: Taps | None = None) -> list[ir.Value | None]:
    """The node's outputs (Y, Y_h[, Y_c]) recomputed in standard ops, unrolled over its static length (the
    recurrent products noted in ``taps``)."""
    taps = [] if taps is None else taps
    spec = read_spec(node)
    ins = [*node.inputs, *[None] * (8 - len(node.inputs))]
    x, w, r, b, lens, h0, c0, peep = ins[:8]
    assert x is not None and w is not None and r is not None
    if spec.layout == 1:
        h0 = None if h0 is None else em.Transpose(h0, perm=[1, 0, 2])
        c0 = None if c0 is None else em.Transpose(c0, perm=[1, 0, 2])
        x = em.Transpose(x, perm=[1, 0, 2])
    dims = x.shape
    if dims is None or len(dims) != 3 or not isinstance(dims[0], int):
        raise ValueError(f"{spec.op} '{node.name}': the gradient needs a static sequence length (it unrolls the "
                         f"recurrence), '{node.inputs[0].name}' has shape {node.inputs[0].shape}")
    steps, hid, gates = int(dims[0]), spec.hidden, spec.gates
    bdim, idim = dims[1], dims[2]
    batch = em.dim(x, 1)
    state_shape = em.cat_ints(em._as_vector(batch), [hid])
    lstm = spec.op == "LSTM"
    ys, hs, cs = [], [], []
    for d, direction in enumerate(spec.directions):
        wt = _shaped(em.Transpose(_row(em, w, d)), idim, gates * hid)
        rt = _shaped(em.Transpose(_row(em, r, d)), hid, gates * hid)
        wb = rb = None
        if b is not None:
            wb, rb = _cut(em, _shaped(_row(em, b, d), 2 * gates * hid), [gates * hid, gates * hid], axis=0)
            if spec.op != "GRU":
                wb, rb = em.Add(wb, rb), None
        ragged = lens is not None and direction == "reverse"
        xd = x
        if ragged:
            index = _reverse_index(em, lens, steps, steps, batch, x)
            flat = em.Reshape(x, em.cat_ints([-1], em._as_vector(em.dim(x, 2))))
            xd = _shaped(em.Gather(flat, index, axis=0), steps, bdim, idim)
        x2 = _shaped(em.Reshape(xd, em.cat_ints([-1], em._as_vector(em.dim(x, 2)))), None, idim)
        xw = _product(em, x2, wt)  # [T*B, G*H]: one product for all steps, and a bias gradient over one axis
        if wb is not None:
            xw = _shaped(em.Add(xw, wb), None, gates * hid)
        xw = _shaped(em.Reshape(xw, em.ints([steps, -1, gates * hid])), steps, bdim, gates * hid)
        xws = [_shaped(em.squeeze(s_, [0]), bdim, gates * hid) for s_ in _cut(em, xw, [1] * steps, axis=0)]
        order = list(range(steps))
        if direction == "reverse" and not ragged:
            order.reverse()
        masks: list[ir.Value] = []
        if lens is not None:
            t = em.const(np.arange(steps, dtype=np.float64).reshape(steps, 1, 1), like=x)
            mask = em.indicator(em.Less(t, em.unsqueeze(em.Cast(lens, to=x.dtype), [0, 2])), x)
            masks = [_shaped(em.squeeze(s_, [0]), bdim, 1)
                     for s_ in _cut(em, _shaped(mask, steps, bdim, 1), [1] * steps, axis=0)]
        h = _row(em, h0, d) if h0 is not None else em.zeros(state_shape, like=x)
        c = (_row(em, c0, d) if c0 is not None else em.zeros(state_shape, like=x)) if lstm else None
        for v in (h, c):
            if v is not None:
                _shaped(v, bdim, hid)
        p = _cut(em, _shaped(_row(em, peep, d), 3 * hid), [hid] * 3, axis=0) if lstm and peep is not None else None
        outs: dict[int, ir.Value] = {}
        for t_ in order:
            h_new, c_new = _step(em, spec, spec.acts[d], xws[t_], h, c, rt, rb, p, taps)
            if masks:
                m = masks[t_]
                outs[t_] = em.Mul(h_new, m)
                h = em.Add(h, em.Mul(m, em.Sub(h_new, h)))
                if c is not None and c_new is not None:
                    c = em.Add(c, em.Mul(m, em.Sub(c_new, c)))
            else:
                outs[t_], h, c = h_new, h_new, c_new
            for v in (outs[t_], h, c):
                if v is not None:
                    _shaped(v, bdim, hid)
        parts = [_shaped(em.unsqueeze(outs[t_], [0]), 1, bdim, hid) for t_ in range(steps)]
        yd = _shaped(em.Concat(*parts, axis=0), steps, bdim, hid) if steps > 1 else parts[0]
        if ragged:
            yd = _shaped(em.Gather(em.Reshape(yd, em.ints([-1, hid])), index, axis=0), steps, bdim, hid)
        ys.append(_shaped(em.unsqueeze(yd, [1]), steps, 1, bdim, hid))
        hs.append(_shaped(em.unsqueeze(h, [0]), 1, bdim, hid))
        if c is not None:
            cs.append(_shaped(em.unsqueeze(c, [0]), 1, bdim, hid))
    n_dir = len(spec.directions)
    y = _shaped(em.Concat(*ys, axis=1), steps, n_dir, bdim, hid) if n_dir > 1 else ys[0]
    y_h = _shaped(em.Concat(*hs, axis=0), n_dir, bdim, hid) if n_dir > 1 else hs[0]
    y_c = (_shaped(em.Concat(*cs, axis=0), n_dir, bdim, hid) if n_dir > 1 else cs[0]) if lstm else None
    if spec.layout == 1:
        y = em.Transpose(y, perm=[2, 0, 1, 3])
        y_h = em.Transpose(y_h, perm=[1, 0, 2])
        y_c = None if y_c is None else em.Transpose(y_c, perm=[1, 0, 2])
    return [y, y_h, y_c][:len(node.outputs)]


# ------------------------------------------------------------------------- from the node's own Y
def _not_from_y(spec: Spec, node: ir.Node) -> str | None:
    """Why the gradient cannot start from the node's own Y (h_t of every step), or None when it can."""
    if not node.outputs or not node.outputs[0].name:
        return "the node does not output Y"
    if spec.op == "GRU" and not spec.linear_before_reset:
        return "GRU without linear_before_reset: the candidate's recurrent product reads r_t inside the step"
    return None


def _walk(em: Emitter, nodes: list[ir.Node], ys: list[ir.Value | None], seeds: list[ir.Value | None],
          xs: list[ir.Value], where: str, stop: set[ir.Value] | None = None) -> list[ir.Value | None]:
    """The reverse walk over ``nodes`` from the seeded ys; one entry per x (None where nothing reaches it)."""
    pairs = [(y, g) for y, g in zip(ys, seeds, strict=True) if y is not None and g is not None]
    if not pairs:
        return [None] * len(xs)
    found, _ = backprop(em, nodes, Request([y for y, _ in pairs], xs, [g for _, g in pairs], stop or set()),
                        {"": em.opset}, where)
    return [g if isinstance(g, ir.Value) else None for g in found]


def _reorder(em: Emitter, v: ir.Value, steps: int | None, tdim: int | ir.Value, index: ir.Value | None,
             reverse: bool) -> ir.Value:
    """v [T, B, ...] in the processing order of a direction (an involution): each sequence reversed within its
    length (``index``), or the whole time axis reversed, or as it is."""
    if index is not None:
        rest = [int(d) if isinstance(d, int) else 0 for d in list(v.shape or [])[2:]]
        return _like(em.Gather(em.Reshape(v, em.ints([-1, *rest])), index, axis=0), v)
    if reverse and steps != 1:
        order = em.ints(range(steps - 1, -1, -1)) if steps is not None else em.Sub(
            em.Sub(tdim, em.const(np.array(1), dtype=ir.DataType.INT64)), em.arange(tdim))
        return _like(em.Gather(v, _shaped(order, steps), axis=0), v)
    return v


Step = Callable[[Emitter, list[ir.Value], list[ir.Value]], tuple[list[ir.Value], list[ir.Value]]]


def _recur(em: Emitter, steps: int | None, tdim: int | ir.Value, seqs: list[ir.Value], state: list[ir.Value],
           step: Step, backward: bool) -> list[ir.Value]:
    """A recurrence over the time axis of ``seqs`` ([T, ...] each): ``step(em, [s[t] ...], state)`` gives the
    next state and what to keep of step t (each [1, ...]); returns the kept values stacked in time order
    ([T, ...]). Unrolled over a static T; a Loop (its body a graph of its own) over a run-time T. ``backward``:
    t = T-1 down to 0."""
    if steps is not None:
        pieces = [_cut(em, v, [1] * steps, axis=0) for v in seqs]
        kept: dict[int, list[ir.Value]] = {}
        for t in range(steps - 1, -1, -1) if backward else range(steps):
            state, kept[t] = step(em, [p_[t] for p_ in pieces], state)
        return [_shaped(em.Concat(*[kept[t][k] for t in range(steps)], axis=0), steps,
                        *list(kept[0][k].shape or [None, None, None])[1:]) if steps > 1 else kept[0][k]
                for k in range(len(kept[0]))]
    if not em.has_op("Range"):
        raise ValueError(f"a recurrent gradient over a run-time sequence length needs opset >= 11 (a Loop with "
                         f"Range), the model has opset {em.opset}")
    scope = em.fresh_name("loop")
    i = ir.Value(name=f"{scope}/i", type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    cond = ir.Value(name=f"{scope}/cond", type=ir.TensorType(ir.DataType.BOOL), shape=ir.Shape([]))
    carried = [ir.Value(name=f"{scope}/state{k}", type=ir.TensorType(v.dtype), shape=v.shape)  # type: ignore[arg-type]
               for k, v in enumerate(state)]
    body = ir.Graph([i, cond, *carried], [], nodes=[], name=scope)
    inner = Emitter(body, em.opset, scope, em.ir_version, em.aggregation)
    t = i if not backward else inner.Sub(inner.Sub(tdim, inner.const(np.array(1), dtype=ir.DataType.INT64)), i)
    t1 = _shaped(inner.Reshape(t, inner.ints([1])), 1)
    slices = [_like(inner.Gather(v, t1, axis=0), v) for v in seqs]
    for v, sl in zip(seqs, slices, strict=True):
        if v.shape is not None:
            sl.shape = ir.Shape([1, *list(v.shape)[1:]])
    new_state, keep = step(inner, slices, carried)
    flag = inner.Identity(cond)
    outs = [flag, *[inner.Identity(v) for v in new_state], *[inner.Identity(v) for v in keep]]
    inner.commit(outs)
    body.outputs.extend(outs)
    for v in outs:
        v.shape = None
    true = em.const(np.array(True), dtype=ir.DataType.BOOL)
    results = em.op("Loop", em.Reshape(tdim, em.ints([])) if isinstance(tdim, ir.Value) else em.const(
        np.array(tdim), dtype=ir.DataType.INT64), true, *state, body=body, _outputs=len(state) + len(keep))
    results = [results] if not isinstance(results, tuple) else list(results)
    for v, like in zip(results, [*state, *keep], strict=True):
        v.dtype = like.dtype
    for v, like in zip(results, state, strict=False):
        v.shape = like.shape
    stacked = []
    for v, like in zip(results[len(state):], keep, strict=True):
        v.shape = None if like.shape is None else ir.Shape([None, *list(like.shape)])
        v = em.squeeze(v, [1])  # [T, 1, B, ...] -> [T, B, ...] in iteration order
        if backward:
            v = _reorder(em, v, None, tdim, None, True)
        stacked.append(_like(v, seqs[0]) if like.shape is None else _shaped(v, None, *list(like.shape)[1:]))
    return stacked


def gradient_from_y(em: Emitter, node: ir.Node, grads: Grads, spec: Spec) -> Out:
    """Back-propagation through time that reads h_{t-1} from the node's own Y: every step's gates at once
    (one product for h_{t-1} R^T over all steps), c_t of an LSTM recomputed by an elementwise recurrence, the
    cell's local derivatives as tensors over all steps (reverse walks seeded with ones: the cell is elementwise
    in each hidden unit), and a reverse recurrence of a few products per step for the state gradients; then one
    reverse walk over all steps gives the gradients of every input."""
    ins = [*node.inputs, *[None] * (8 - len(node.inputs))]
    x, w, r, b, lens, h0, c0, peep = ins[:8]
    assert x is not None and w is not None and r is not None
    y_all = node.outputs[0]
    start = len(em.nodes)
    if spec.layout == 1:
        h0 = None if h0 is None else em.Transpose(h0, perm=[1, 0, 2])
        c0 = None if c0 is None else em.Transpose(c0, perm=[1, 0, 2])
        x = em.Transpose(x, perm=[1, 0, 2])
        y_all = em.Transpose(y_all, perm=[1, 2, 0, 3])
    dims = x.shape
    if dims is None or len(dims) != 3:
        raise ValueError(f"{spec.op} '{node.name}': the gradient needs the rank of '{node.inputs[0].name}'")
    steps = int(dims[0]) if isinstance(dims[0], int) else None  # None: known at run time only
    tdim = em.dim(x, 0)
    hid, gates = spec.hidden, spec.gates
    # the recorded shapes name run-time lengths, so the walks see equal dims and unbroadcast nothing at run time
    tsz, bdim, idim = _named(dims[0], node, "steps"), _named(dims[1], node, "batch"), dims[2]
    batch = em.dim(x, 1)
    state_shape = em.cat_ints(em._as_vector(batch), [hid])
    by_step = em.cat_ints(em._as_vector(tdim), [-1, gates * hid])
    lstm = spec.op == "LSTM"
    where = f" in the gradient of {spec.op} '{node.name}'"
    one = em.const(1.0, like=x)

    @dataclass
    class Direction:
        xw: ir.Value
        hr: ir.Value
        h_prev: ir.Value
        c_prev: ir.Value | None
        y: ir.Value
        h: ir.Value
        c: ir.Value | None
        r_d: ir.Value
        index: ir.Value | None

    dirs: list[Direction] = []
    stop: set[ir.Value] = set()
    for d, direction in enumerate(spec.directions):
        wt = _shaped(em.Transpose(_row(em, w, d)), idim, gates * hid)
        r_d = _shaped(_row(em, r, d), gates * hid, hid)
        rt = _shaped(em.Transpose(r_d), hid, gates * hid)
        wb = rb = None
        if b is not None:
            wb, rb = _cut(em, _shaped(_row(em, b, d), 2 * gates * hid), [gates * hid, gates * hid], axis=0)
            if spec.op != "GRU":
                wb, rb = em.Add(wb, rb), None
        reverse = direction == "reverse"
        index = None
        if lens is not None and reverse:
            index = _reverse_index(em, lens, steps, tdim, batch, x)
        xd = _shaped(_reorder(em, x, steps, tdim, index, reverse), tsz, bdim, idim)
        x2 = _shaped(em.Reshape(xd, em.cat_ints([-1], em._as_vector(em.dim(x, 2)))), None, idim)
        xw = _product(em, x2, wt)
        if wb is not None:
            xw = _shaped(em.Add(xw, wb), None, gates * hid)
        xw = _shaped(em.Reshape(xw, by_step), tsz, bdim, gates * hid)
        mask = None
        if lens is not None:
            t = em.Reshape(_time(em, steps, tdim, x), em.ints([-1, 1, 1]))
            mask = _shaped(em.indicator(em.Less(t, em.unsqueeze(em.Cast(lens, to=x.dtype), [0, 2])), x),
                           tsz, bdim, 1)
        h_first = _shaped(_row(em, h0, d) if h0 is not None else em.zeros(state_shape, like=x), bdim, hid)
        h_first = _shaped(em.unsqueeze(h_first, [0]), 1, bdim, hid)
        y_d = _shaped(em.squeeze(em.slice(y_all, [d], [d + 1], [1]), [1]), tsz, bdim, hid)
        y_d = _reorder(em, y_d, steps, tdim, index, reverse)
        h_prev = h_first
        if steps != 1:
            h_prev = _shaped(em.Concat(h_first, em.slice(y_d, [0], [-1], [0]), axis=0), tsz, bdim, hid)
        h2 = _shaped(em.Reshape(h_prev, em.ints([-1, hid])), None, hid)
        hr = _shaped(em.Reshape(_product(em, h2, rt), by_step), tsz, bdim, gates * hid)
        if rb is not None:
            hr = _like(em.Add(hr, rb), hr)
        p = _cut(em, _shaped(_row(em, peep, d), 3 * hid), [hid] * 3, axis=0) if lstm and peep is not None else None
        c_prev = None
        if lstm:  # c_t: an elementwise recurrence over the steps (the cell's h_t part is not kept)
            c_first = _shaped(em.unsqueeze(_shaped(_row(em, c0, d) if c0 is not None else em.zeros(
                state_shape, like=x), bdim, hid), [0]), 1, bdim, hid)
            acts = spec.acts[d]
            if p is None:  # c_t = f_t c_{t-1} + i_t g_t, the gates of every step at once
                i, f, g, _ = _lstm_gates(em, spec, acts, _like(em.Add(xw, hr), xw), None, None)
                ig = _like(em.Mul(i, g), i)
                if mask is not None:  # c_t = c_{t-1} past the length: f -> 1, i g -> 0
                    f = _like(em.Add(em.Mul(mask, em.Sub(f, one)), one), f)
                    ig = _like(em.Mul(ig, mask), ig)

                def c_step(e: Emitter, at: list[ir.Value], st: list[ir.Value]) -> tuple[list[ir.Value],
                                                                                         list[ir.Value]]:
                    c_new = _like(e.Add(e.Mul(at[0], st[0]), at[1]), st[0])
                    return [c_new], [c_new]

                seqs = [f, ig]
            else:  # peepholes: the gates read c_{t-1}
                def c_step(e: Emitter, at: list[ir.Value], st: list[ir.Value], acts: list[Act] = acts,
                           h_first: ir.Value = h_first, p: list[ir.Value] = p) -> tuple[list[ir.Value],
                                                                                       list[ir.Value]]:
                    _, c_new = _cell(e, spec, acts, at[0], at[1], h_first, st[0], p)
                    assert c_new is not None
                    if len(at) > 2:
                        c_new = e.Add(st[0], e.Mul(at[2], e.Sub(c_new, st[0])))
                    c_new = _like(c_new, st[0])
                    return [c_new], [c_new]

                seqs = [xw, hr] + ([mask] if mask is not None else [])
            c_prev = c_first
            if steps != 1:
                cs = _recur(em, steps, tdim, seqs, [c_first], c_step, backward=False)[0]
                later = _shaped(em.slice(cs, [0], [-1], [0]), None if steps is None else steps - 1, bdim, hid)
                stop.add(later)
                c_prev = _shaped(em.Concat(c_first, later, axis=0), tsz, bdim, hid)
        h_new, c_new = _cell(em, spec, spec.acts[d], xw, hr, h_prev, c_prev, p)
        y_v, h_v, c_v = h_new, h_new, c_new
        if mask is not None:
            y_v = _like(em.Mul(h_new, mask), h_new)
            h_v = _like(em.Add(h_prev, em.Mul(mask, em.Sub(h_new, h_prev))), h_new)
            if c_new is not None and c_prev is not None:
                c_v = _like(em.Add(c_prev, em.Mul(mask, em.Sub(c_new, c_prev))), c_new)
        dirs.append(Direction(xw, hr, h_prev, c_prev, y_v, h_v, c_v, r_d, index))

    # the outputs, from every step at once: the seeds of Y, Y_h and Y_c reach y, h and c of the steps
    post = len(em.nodes)
    parts, lasts_h, lasts_c = [], [], []
    big = 2 ** 62
    for dd, direction in zip(dirs, spec.directions, strict=True):
        y_orig = _reorder(em, dd.y, steps, tdim, dd.index, direction == "reverse")
        parts.append(_shaped(em.unsqueeze(y_orig, [1]), tsz, 1, bdim, hid))
        lasts_h.append(_shaped(em.slice(dd.h, [-1], [big], [0]), 1, bdim, hid))
        if dd.c is not None:
            lasts_c.append(_shaped(em.slice(dd.c, [-1], [big], [0]), 1, bdim, hid))
    y_out = _shaped(em.Concat(*parts, axis=1), tsz, len(dirs), bdim, hid) if len(parts) > 1 else parts[0]
    yh_out = em.Concat(*lasts_h, axis=0) if len(lasts_h) > 1 else lasts_h[0]
    yc_out = (em.Concat(*lasts_c, axis=0) if len(lasts_c) > 1 else lasts_c[0]) if lstm else None
    if spec.layout == 1:
        y_out = em.Transpose(y_out, perm=[2, 0, 1, 3])
        yh_out = em.Transpose(yh_out, perm=[1, 0, 2])
        yc_out = None if yc_out is None else em.Transpose(yc_out, perm=[1, 0, 2])
    post_nodes = em.nodes[post:]
    cell_nodes = em.nodes[start:post]  # the cells' ops, some of them shared with c's recurrence (CSE)
    forward_nodes = em.nodes[start:]
    outs = [y_out, yh_out, yc_out][:len(node.outputs)]
    seeds = [*grads, *[None] * 3][:len(outs)]
    dy_v = _walk(em, post_nodes, outs[:1], seeds[:1], [dd.y for dd in dirs], where)
    dh_last = _walk(em, post_nodes, outs[1:2], seeds[1:2], lasts_h, where)
    dc_last = _walk(em, post_nodes, outs[2:3], seeds[2:3], lasts_c, where) if lstm else [None] * len(dirs)

    # per direction, the state gradients of every step by a reverse recurrence over the cell's local derivatives
    ys_final: list[ir.Value | None] = [outs[0]]
    seeds_final: list[ir.Value | None] = [seeds[0]]
    zero = _shaped(em.unsqueeze(em.zeros(state_shape, like=x), [0]), 1, bdim, hid)
    for k, dd in enumerate(dirs):
        local = stop | {dd.hr}  # the partials of one step: not through h_{t-1} R^T, nor through c's recurrence
        xs_local = [dd.hr, dd.h_prev] + ([dd.c_prev] if dd.c_prev is not None else [])
        # y_t is h_t without a sequence_lens mask: Y's seed joins h_t's at each step (no partials of its own)
        joins = dd.y is dd.h and dy_v[k] is not None
        from_y = [None] * 3 if joins else _walk(em, cell_nodes, [dd.y], [dy_v[k]], xs_local, where, local)
        ones = em.ones_like(dd.h)
        from_h = _walk(em, cell_nodes, [dd.h], [ones], xs_local, where, local)
        from_c = _walk(em, cell_nodes, [dd.c], [ones], xs_local, where, local) if dd.c is not None else [None] * 3
        # what varies per step, in a fixed order: (from_y, from_h, from_c) x (hr, h_prev, c_prev), where present
        table = [[*vs, None, None, None][:3] for vs in (from_y, from_h, from_c)]
        seqs = [v for row in table for v in row if v is not None]
        slot = {(a_, j): n for n, (a_, j) in enumerate((a_, j) for a_ in range(3) for j in range(3)
                                                        if table[a_][j] is not None)}
        if joins:
            slot[-1, -1] = len(seqs)
            seqs.append(dy_v[k])  # type: ignore[arg-type]
        r_d = dd.r_d

        def back_step(e: Emitter, at: list[ir.Value], st: list[ir.Value], slot: dict[tuple[int, int], int] = slot,
                      r_d: ir.Value = r_d) -> tuple[list[ir.Value], list[ir.Value]]:
            dh, dc = st[0], (st[1] if len(st) > 1 else None)
            if (-1, -1) in slot:
                dh = _like(e.Add(dh, at[slot[-1, -1]]), dh)

            def part(col: int, tiled: bool) -> ir.Value | None:
                terms = []
                if (0, col) in slot:
                    terms.append(at[slot[0, col]])
                for row, v in ((1, dh), (2, dc)):
                    if v is not None and (row, col) in slot:
                        seed = _shaped(e.Concat(*[v] * gates, axis=2), 1, bdim, gates * hid) if tiled else v
                        terms.append(e.Mul(seed, at[slot[row, col]]))
                return e.add_all(*terms)

            d_hr = part(0, True)
            dh_prev = e.add_all(part(1, False), None if d_hr is None else e.MatMul(d_hr, r_d))
            new = [_like(dh_prev, zero) if dh_prev is not None else zero]
            if dc is not None:
                dc_prev = part(2, False)
                new.append(_like(dc_prev, zero) if dc_prev is not None else zero)
            return new, list(st)

        init = [dh_last[k] if dh_last[k] is not None else zero]
        if lstm:
            init.append(dc_last[k] if dc_last[k] is not None else zero)
        stacked = _recur(em, steps, tdim, seqs, init, back_step, backward=True)  # type: ignore[arg-type]
        ys_final.append(dd.h)
        seeds_final.append(_shaped(stacked[0], tsz, bdim, hid))
        if dd.c is not None:
            ys_final.append(dd.c)
            seeds_final.append(_shaped(stacked[1], tsz, bdim, hid))

    inputs = list(dict.fromkeys(v for k, v in enumerate(node.inputs) if v is not None and k != 4))
    found = _walk(em, forward_nodes, ys_final, seeds_final, inputs, where, stop)
    totals = dict(zip(inputs, found, strict=True))
    return [None if v is None or k == 4 or v in node.inputs[:k] else totals[v]  # type: ignore[misc]
            for k, v in enumerate(node.inputs)]


def recurrent_gradient(em: Emitter, node: ir.Node, grads: Grads) -> Out:
    """d(inputs) = back-propagation through time over the recurrence restated in standard ops (module docstring)"""
    with em.own_nodes():  # the walks below go over the nodes emitted here: none may be another node's
        return _recurrent_gradient(em, node, grads)


def _recurrent_gradient(em: Emitter, node: ir.Node, grads: Grads) -> Out:
    spec = read_spec(node)
    if _not_from_y(spec, node) is None:
        return gradient_from_y(em, node, grads, spec)
    start = len(em.nodes)
    taps: Taps = []
    outs = expand(em, node, taps)
    mine = em.nodes[start:]
    seeded = [(o, g) for o, g in zip(outs, grads, strict=False) if o is not None and g is not None]
    inputs = list(dict.fromkeys(v for k, v in enumerate(node.inputs) if v is not None and k != 4))
    where = f" in the expansion of {node.op_type} '{node.name}'"
    # walk 1: the steps, the recurrent weights held constant; the gradients of their per-step products kept
    weights = list(dict.fromkeys(b for _, _, b in taps))
    products = [out for _, out, _ in taps]
    found, _ = backprop(em, mine, Request([o for o, _ in seeded], [*inputs, *products], [g for _, g in seeded],
                                          stop=set(weights)), {"": em.opset}, where)
    totals = dict(zip(inputs, found[:len(inputs)], strict=True))
    d_out = dict(zip(products, found[len(inputs):], strict=True))
    # each recurrent weight's gradient: one product over all steps, sum_t a_t^T d(a_t @ b)
    d_weights: list[tuple[ir.Value, ir.Value]] = []
    for b in weights:
        pairs = [(a, d_out[out]) for a, out, b_ in taps if b_ is b and isinstance(d_out[out], ir.Value)]
        if not pairs:
            continue
        lhs = em.Concat(*[a for a, _ in pairs], axis=0) if len(pairs) > 1 else pairs[0][0]
        rhs = em.Concat(*[g for _, g in pairs], axis=0) if len(pairs) > 1 else pairs[0][1]
        d_weights.append((b, _shaped(em.MatMul(em.Transpose(lhs), rhs), *(b.shape or [None, None]))))
    if d_weights:  # walk 2: from the recurrent weights back to R (and B) through their slicing
        more, _ = backprop(em, mine, Request([b for b, _ in d_weights], inputs, [g for _, g in d_weights]),
                           {"": em.opset}, where)
        for v, g in zip(inputs, more, strict=True):
            if g is not None:
                totals[v] = g if totals[v] is None else em.Add(totals[v], g)  # type: ignore[arg-type]
    return [None if v is None or k == 4 or v in node.inputs[:k] else totals[v]  # type: ignore[misc]
            for k, v in enumerate(node.inputs)]


for _op in ("LSTM", "GRU", "RNN"):
    for _since in (7, 14, 22):
        register(_op, since=_since, notes=NOTES)(recurrent_gradient)
