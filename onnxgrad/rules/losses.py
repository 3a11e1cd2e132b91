"""Gradient rules: losses (NegativeLogLikelihoodLoss, SoftmaxCrossEntropyLoss) and Dropout.

Both losses pick one class per sample: with ``M[n, c, d...] = (c == target[n, d...]) and target != ignore_index``
and ``w_c`` the class weights (ones when absent), ``loss[n, d...] = -sum_c M * w_c * x``. The reduction
divides by ``sum(M * w_c)`` for ``mean`` (the count of kept samples without weights).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import Emitter, attr, rank_of
from onnxgrad.registry import register

Grads = Sequence[ir.Value | None]
Out = list[ir.Value | None]


def _picked(em: Emitter, node: ir.Node, x: ir.Value) -> ir.Value:
    """M: 1 where class c is the target of a kept sample, else 0; shaped like x (N, C, d...)."""
    target = node.inputs[1]
    assert target is not None and target.dtype is not None
    rank = rank_of(x)
    if rank is None:
        raise ValueError(f"{node.op_type} '{node.name}': the rank of its input is unknown")
    shape = x.shape
    assert shape is not None
    trail = [1] * (rank - 2)
    if isinstance(shape[1], int):
        classes = em.const(np.arange(shape[1]).reshape(-1, *trail), dtype=target.dtype)
    else:
        one = em.const(1, dtype=target.dtype)
        count = em.Cast(em.Gather(em.Shape(x), em.const(1, dtype=ir.DataType.INT64)), to=target.dtype)
        classes = em.Reshape(em.Range(em.const(0, dtype=target.dtype), count, one), em.ints([-1, *trail]))
    t = em.unsqueeze(target, [1])
    hit = em.Equal(t, classes)
    ignore = attr(node, "ignore_index")
    if ignore is not None:
        hit = em.And(hit, em.Not(em.Equal(t, em.const(ignore, dtype=target.dtype))))
    return em.indicator(hit, x)


def _class_weights(em: Emitter, node: ir.Node, x: ir.Value) -> ir.Value | None:
    """The weights input shaped (C, 1, ...) to broadcast against x, or None."""
    w = node.inputs[2] if len(node.inputs) > 2 else None
    if w is None:
        return None
    return em.Reshape(w, em.ints([-1] + [1] * (rank_of(x) - 2)))  # type: ignore[operator]


def _nll_backward(
    em: Emitter, node: ir.Node, x: ir.Value, g: ir.Value
) -> tuple[ir.Value, ir.Value | None]:
    """(dx, dweights) of loss = -x[target] * w[target], reduced as the node's ``reduction`` says."""
    m = _picked(em, node, x)
    w = _class_weights(em, node, x)
    mw = m if w is None else em.Mul(m, w)
    reduction = attr(node, "reduction", "mean")
    coef = em.unsqueeze(g, [1]) if reduction == "none" else g
    if reduction == "mean":
        coef = em.Div(coef, em.ReduceSum(mw, keepdims=0))
    dx = em.Neg(em.Mul(coef, mw))
    dw = None
    if w is not None:
        # d loss / d w_c = -x[c] over the samples of class c; mean also moves the denominator by one each.
        xl = x if reduction != "mean" else em.Add(x, node.outputs[0])
        per = em.Neg(em.Mul(em.Mul(coef, m), xl))
        dw = em.reduce_sum(per, [0, *range(2, rank_of(x))], keepdims=False)  # type: ignore[arg-type]
    return dx, dw


@register("NegativeLogLikelihoodLoss", since=12)
def negative_log_likelihood_loss(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = -dloss * M * w (/ sum(M * w) for mean); dw_c = -sum(dloss * M * (x (+ loss for mean)))"""
    x = node.inputs[0]
    assert x is not None and dy[0] is not None
    dx, dw = _nll_backward(em, node, x, dy[0])
    return [dx, None, dw][: len(node.inputs)]


@register("SoftmaxCrossEntropyLoss", since=12)
def softmax_cross_entropy_loss(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dlogp = NLL backward + dlog_prob; dscores = dlogp - softmax * sum_c(dlogp)"""
    scores = node.inputs[0]
    assert scores is not None
    outs = node.outputs
    log_prob = outs[1] if len(outs) > 1 and outs[1].name else None
    if log_prob is None:
        log_prob = em.Sub(scores, em.reduce("ReduceLogSumExp", scores, [1]))
        log_prob.shape = scores.shape
    d_logp, dw = (None, None) if dy[0] is None else _nll_backward(em, node, log_prob, dy[0])
    g_lp = dy[1] if len(dy) > 1 else None
    if g_lp is not None:
        d_logp = g_lp if d_logp is None else em.Add(d_logp, g_lp)
    if d_logp is None:
        return [None] * len(node.inputs)
    d_scores = em.Sub(d_logp, em.Mul(em.Exp(log_prob), em.reduce_sum(d_logp, [1])))
    return [d_scores, None, dw][: len(node.inputs)]


# ------------------------------------------------------------------------------------------- Dropout
@register("Dropout", since=7, notes="inference runtimes run Dropout-7/10 as identity (no training mode input)")
def dropout_v7(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy (inference mode)"""
    return [dy[0]]


@register("Dropout", since=12, wrt=1,
          notes="training mode: dx = dy * mask / (1 - ratio); mask = (y != 0) when the node has no mask output; "
          "ratio is a hyperparameter (no gradient)")
def dropout_v12(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = dy * mask / (1 - ratio) in training mode, dx = dy otherwise"""
    x, ratio, training = [*node.inputs, None, None][:3]
    assert x is not None
    g = dy[0]
    if g is None:
        return [None]
    known = em.constant_value(training)
    if training is None or (known is not None and not bool(known)):
        return [g]
    outs = node.outputs
    if len(outs) > 1 and outs[1].name:
        keep = em.indicator(outs[1], x)
    else:  # no mask output: the kept lanes are the nonzero ones (a kept exact zero gets no gradient)
        keep = em.indicator(em.Not(em.Equal(outs[0], em.const(0.0, like=x))), x)
    one = em.const(1.0, like=x)
    rate = em.constant_value(ratio)
    if ratio is None or rate is not None:
        scale = em.const(1.0 / (1.0 - (0.5 if ratio is None else float(rate))), like=x)  # type: ignore[arg-type]
    else:
        scale = em.Div(one, em.Sub(one, em.Cast(ratio, to=x.dtype)))
    dx = em.Mul(em.Mul(g, keep), scale)
    if known is None:  # training_mode decided at run time
        dx = em.where(training, dx, g)
    return [dx]
