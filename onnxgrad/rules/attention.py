"""Gradient rules: attention and its companion RotaryEmbedding (TensorScatter, the KV-cache writer, is in shape.py).

Attention's rule is closed-form: it takes the softmax probabilities P from the forward node when that node
already outputs them (``qk_matmul_output_mode=3``), else from one twin ``Attention`` node with mode 3, which
reproduces every masking rule of the op (causal offset, padded masks, ``nonpad_kv_seqlen``, windows) exactly.
Grouped heads (GQA/MQA) are handled by folding the query heads of a group into the sequence axis,
``(B, Hq, S, X) -> (B, Hkv, G*S, X)``, so every product is one batched MatMul against the shared K/V head.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import Emitter, attr, rank, rank_of, static_dims
from onnxgrad.registry import register

Grads = Sequence[ir.Value | None]
Out = list[ir.Value | None]
Dim = int | ir.Value  # a static size, or a 1-element int64 tensor holding it

_ATTENTION_ATTRS = (
    "is_causal", "kv_num_heads", "q_num_heads", "scale", "softcap", "softmax_precision",
    "left_window_size", "right_window_size",
)


def _shape(em: Emitter, *parts: Dim | Sequence[int]) -> ir.Value:
    """A Reshape target from ints and 1-element tensors: a Constant when all are static."""
    flat: list[int | ir.Value] = []
    for p in parts:
        flat.extend(p if isinstance(p, Sequence) else [p])
    if all(isinstance(p, int) for p in flat):
        return em.ints(flat)  # type: ignore[arg-type]
    return em.Concat(*[em.ints([p]) if isinstance(p, int) else p for p in flat], axis=0)


def _to_bhsd(em: Emitter, x: ir.Value, heads: int) -> ir.Value:
    """(B, S, H*D) -> (B, H, S, D)."""
    return em.Transpose(em.Reshape(x, em.ints([0, 0, heads, -1])), perm=[0, 2, 1, 3])


def _from_bhsd(em: Emitter, x: ir.Value) -> ir.Value:
    """(B, H, S, D) -> (B, S, H*D)."""
    return em.Reshape(em.Transpose(x, perm=[0, 2, 1, 3]), em.ints([0, 0, -1]))


def _scale(em: Emitter, node: ir.Node, q4: ir.Value) -> ir.Value:
    """The scores' scale: the attribute, else 1/sqrt(head_size)."""
    scale = attr(node, "scale")
    if scale is not None:
        return em.const(scale, like=q4)
    d = em.dim(q4, 3, keepdims=True)
    if isinstance(d, int):
        return em.const(1.0 / np.sqrt(d), like=q4)
    return em.Reciprocal(em.Sqrt(em.CastLike(d, q4)))


def _forward_parts(
    em: Emitter, node: ir.Node, k4: ir.Value, v4: ir.Value
) -> tuple[ir.Value, ir.Value, ir.Value]:
    """(P, K_total, V_total): P = softmax(scores + bias) as (B, Hq, Sq, T) from the forward node's mode-3
    output, else from a twin node; K/V_total = concat(past, new) from the same node's present outputs.

    With a past cache the twin keeps (and the rule uses) its present outputs: onnxruntime infers the
    mode-3 output's length from them and gets it wrong when they are absent."""
    outs: Sequence[ir.Value] = node.outputs
    if not (attr(node, "qk_matmul_output_mode", 0) == 3 and len(outs) > 3 and outs[3].name):
        attrs = {name: attr(node, name) for name in _ATTENTION_ATTRS}
        outs = em.op("Attention", *node.inputs, _outputs=4, qk_matmul_output_mode=3, **attrs)
        outs[3].dtype = outs[0].dtype
        if len(node.inputs) < 5 or node.inputs[4] is None:  # present_* only go with past_*
            outs[1].name = outs[2].name = ""
    past_k, past_v = [*node.inputs, None, None, None, None, None][4:6]
    if past_k is None:
        return outs[3], k4, v4
    kt = outs[1] if len(outs) > 1 and outs[1].name else em.Concat(past_k, k4, axis=2)
    vt = outs[2] if len(outs) > 2 and outs[2].name else em.Concat(past_v, v4, axis=2)
    return outs[3], kt, vt


def _total_length(k: ir.Value, past_k: ir.Value | None) -> int | None:
    """past_sequence_length + kv_sequence_length when both are static."""
    dims = static_dims(k)
    past = (0,) * 4 if past_k is None else static_dims(past_k)
    if dims is None or past is None:
        return None
    return dims[-2 if len(dims) == 4 else 1] + past[2]


_NOTES = "P from the forward node (qk_matmul_output_mode=3) or a twin Attention node"


@register("Attention", since=23, broadcast=(3,), notes=_NOTES)
def attention_v23(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dV = P^T dY, dP = dY V^T, dS = P * (dP - sum(dP * P)); dQ = scale dS' K, dK = scale dS'^T Q with
    dS' = dS * (1 - tanh^2) under softcap; dmask = dS (float mask)"""
    return _attention(em, node, dy, padded_mask=False)


@register("Attention", since=24, broadcast=(3,), wrt=6, notes=_NOTES)
def attention_v24(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """as opset 23; a float mask shorter than the total length gets dS's leading columns"""
    return _attention(em, node, dy, padded_mask=True)


def _attention(em: Emitter, node: ir.Node, dy: Grads, padded_mask: bool) -> Out:
    """The closed-form Attention backward shared by every opset form."""
    q, k, v, mask, past_k, past_v = [*node.inputs, None, None, None][:6]
    g_y, g_pk, g_pv, g_qk = [*dy, None, None, None][:4]
    assert q is not None and k is not None and v is not None
    mode = attr(node, "qk_matmul_output_mode", 0)
    q_heads, kv_heads = attr(node, "q_num_heads"), attr(node, "kv_num_heads")
    q3, k3, v3 = rank_of(q) == 3, rank_of(k) == 3, rank_of(v) == 3
    q4 = _to_bhsd(em, q, q_heads) if q3 else q
    k4 = _to_bhsd(em, k, kv_heads) if k3 else k
    v4 = _to_bhsd(em, v, kv_heads) if v3 else v
    p, kt, vt = _forward_parts(em, node, k4, v4)

    # Fold the G query heads of each KV head into the sequence axis: (B, Hq, S, X) -> (B, Hkv, G*S, X).
    hq, hkv = q_heads or em.dim(q4, 1, keepdims=True), kv_heads or em.dim(k4, 1, keepdims=True)
    grouped = not (isinstance(hq, int) and isinstance(hkv, int) and hq == hkv)

    def fold(x: ir.Value) -> ir.Value:
        return em.Reshape(x, _shape(em, [0], hkv, [-1, 0])) if grouped else x

    def unfold(x: ir.Value) -> ir.Value:
        return em.Reshape(x, _shape(em, [0], hq, [-1, 0])) if grouped else x

    p = fold(p)
    qk = fold(g_qk) if g_qk is not None else None
    d_p = qk if mode == 3 else None
    d_vt = g_pv
    if g_y is not None:
        dy4 = fold(_to_bhsd(em, g_y, q_heads) if q3 else g_y)
        d_p = em.add_all(d_p, em.MatMul(dy4, em.Transpose(vt, perm=[0, 1, 3, 2])))
        d_vt = em.add_all(d_vt, em.MatMul(em.Transpose(p, perm=[0, 1, 3, 2]), dy4))
    d_s = None
    if d_p is not None:
        d_s = em.Mul(p, em.Sub(d_p, em.ReduceSum(em.Mul(d_p, p), em.ints([-1]), keepdims=1)))
    d_s = em.add_all(d_s, qk if mode == 2 else None)
    d_mask = None
    if d_s is not None and mask is not None and mask.dtype is not None and mask.dtype.is_floating_point():
        d_mask = unfold(d_s)
        last = em.dim(mask, rank(mask) - 1, keepdims=True)
        if padded_mask and not (isinstance(last, int) and last == _total_length(k, past_k)):
            # a mask shorter than the total length is padded with -inf
            d_mask = em.Slice(d_mask, em.ints([0]), em.ints([last]) if isinstance(last, int) else last,
                              em.ints([3]))
        d_mask.shape = ir.Shape([q.shape[0] if q.shape is not None else None, None, None, None])
    d_s = em.add_all(d_s, qk if mode == 1 else None)
    softcap = attr(node, "softcap", 0.0)
    scale = _scale(em, node, q4)
    qr = fold(q4)
    if d_s is not None and softcap:
        c = em.const(softcap, like=q4)
        t = em.Tanh(em.Div(em.Mul(em.MatMul(qr, em.Transpose(kt, perm=[0, 1, 3, 2])), scale), c))
        d_s = em.Mul(d_s, em.Sub(em.const(1.0, like=q4), em.Mul(t, t)))
    d_s = em.add_all(d_s, qk if mode == 0 else None)
    d_q = d_kt = None
    if d_s is not None:
        d_s = em.Mul(d_s, scale)
        d_q = unfold(em.MatMul(d_s, kt))
        d_kt = em.MatMul(em.Transpose(d_s, perm=[0, 1, 3, 2]), qr)
    d_kt = em.add_all(d_kt, g_pk)
    d_pk, d_k4 = _split_cache(em, d_kt, past_k)
    d_pv, d_v4 = _split_cache(em, d_vt, past_v)
    return [
        None if d_q is None else (_from_bhsd(em, d_q) if q3 else d_q),
        None if d_k4 is None else (_from_bhsd(em, d_k4) if k3 else d_k4),
        None if d_v4 is None else (_from_bhsd(em, d_v4) if v3 else d_v4),
        d_mask, d_pk, d_pv,
    ][: len(node.inputs)]


def _split_cache(
    em: Emitter, g: ir.Value | None, past: ir.Value | None
) -> tuple[ir.Value | None, ir.Value | None]:
    """Split the gradient of concat(past, new) along the sequence axis into (d_past, d_new)."""
    if g is None or past is None:
        return None, g
    n = em.dim(past, 2, keepdims=True)
    cut = em.ints([n]) if isinstance(n, int) else n
    return (em.Slice(g, em.ints([0]), cut, em.ints([2])),
            em.Slice(g, cut, em.ints([np.iinfo(np.int64).max]), em.ints([2])))


# ----------------------------------------------------------------------------------- RotaryEmbedding
def _rope_halves(em: Emitter, x: ir.Value, half: Dim, interleaved: bool) -> tuple[ir.Value, ir.Value]:
    """The two rotated halves (x1, x2) of the last axis: even/odd lanes, or the first/second half."""
    h = em.ints([half]) if isinstance(half, int) else half
    two_h = em.ints([2 * half]) if isinstance(half, int) else em.Add(half, half)
    last = em.ints([-1])
    if interleaved:
        step = em.ints([2])
        return (em.Slice(x, em.ints([0]), two_h, last, step), em.Slice(x, em.ints([1]), two_h, last, step))
    return em.Slice(x, em.ints([0]), h, last), em.Slice(x, h, two_h, last)


def _rope_half(em: Emitter, node: ir.Node) -> Dim:
    """rotary_embedding_dim / 2 (or head_size / 2): from the attribute, else the cache's last axis."""
    rot = attr(node, "rotary_embedding_dim", 0)
    if rot:
        return rot // 2
    cos = node.inputs[1]
    assert cos is not None
    return em.dim(cos, rank(cos) - 1, keepdims=True)


@register("RotaryEmbedding", since=23, wrt=3)
def rotary_embedding(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = RoPE(dy, cos, -sin) (the transposed rotation); dcos = sum_h(dy1 x1 + dy2 x2),
    dsin = sum_h(dy2 x1 - dy1 x2), scatter-added over position_ids"""
    x, cos, sin, pos = [*node.inputs, None][:4]
    assert x is not None and cos is not None and sin is not None
    g = dy[0]
    attrs = {n: attr(node, n) for n in ("interleaved", "num_heads", "rotary_embedding_dim")}
    dx = em.op("RotaryEmbedding", g, cos, em.Neg(sin), pos, **attrs)
    heads = attr(node, "num_heads")

    def bshd(t: ir.Value) -> ir.Value:  # (B, S, H, D)
        if rank_of(x) == 4:
            return em.Transpose(t, perm=[0, 2, 1, 3])
        return em.Reshape(t, em.ints([0, 0, heads, -1]))

    half = _rope_half(em, node)
    interleaved = bool(attr(node, "interleaved", 0))
    x1, x2 = _rope_halves(em, bshd(x), half, interleaved)
    g1, g2 = _rope_halves(em, bshd(g), half, interleaved)
    axes = em.ints([2])
    d_cos = em.ReduceSum(em.Add(em.Mul(g1, x1), em.Mul(g2, x2)), axes, keepdims=0)
    d_sin = em.ReduceSum(em.Sub(em.Mul(g2, x1), em.Mul(g1, x2)), axes, keepdims=0)
    if pos is not None:  # (B, S, D/2) added into rows pos of the (positions, D/2) caches
        idx, rows, width = em.Reshape(pos, em.ints([-1])), em.dim(cos, 0), em.dims(cos, [1])
        d_cos = em.scatter_add_rows(em.Reshape(d_cos, em.cat_ints([-1], width)), idx, rows, width)
        d_sin = em.scatter_add_rows(em.Reshape(d_sin, em.cat_ints([-1], width)), idx, rows, width)
    return [dx, d_cos, d_sin][: len(node.inputs)]
