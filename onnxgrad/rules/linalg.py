"""Matrix products."""

from __future__ import annotations

from collections.abc import Sequence

import onnx_ir as ir

from onnxgrad.emitter import Emitter, attr, rank_of
from onnxgrad.registry import register

Grads = Sequence[ir.Value | None]
Out = list[ir.Value | None]


def _as_matrix(em: Emitter, v: ir.Value, axis: int) -> ir.Value:
    """A 1-D MatMul operand promoted to 2-D as numpy does (axis 0 for the left, 1 for the right)."""
    out = em.unsqueeze(v, [axis])
    if v.shape is not None:
        dims = list(v.shape)
        dims.insert(axis, 1)
        out.shape = ir.Shape(dims)
    return out


@register("MatMul")
def matmul(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """da = dy @ b^T, db = a^T @ dy (1-D operands promoted, batch axes summed)"""
    a, b = node.inputs
    assert a is not None and b is not None
    ra, rb = rank_of(a), rank_of(b)
    if ra is None or rb is None:
        raise ValueError(f"MatMul '{node.name}': the gradient needs the operands' ranks")
    a2 = a if ra >= 2 else _as_matrix(em, a, 0)
    b2 = b if rb >= 2 else _as_matrix(em, b, 1)
    r = max(ra if ra >= 2 else 2, rb if rb >= 2 else 2)
    restore = ([r - 2] if ra == 1 else []) + ([r - 1] if rb == 1 else [])
    g = em.unsqueeze(dy[0], restore)
    da = em.unbroadcast(_typed(em.MatMul(g, em.transpose_last2(b2)), r), a2)
    db = em.unbroadcast(_typed(em.MatMul(em.transpose_last2(a2), g), r), b2)
    if ra == 1:
        da = em.squeeze(da, [0])
    if rb == 1:
        db = em.squeeze(db, [1])
    return [da, db]


def _typed(v: ir.Value, rank: int) -> ir.Value:
    """Record that a MatMul result has ``rank`` axes (dims unknown) so unbroadcast can reason."""
    if v.shape is None:
        v.shape = ir.Shape([None] * rank)
    return v


@register("Gemm", broadcast=(2,))
def gemm(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """Y = alpha*op(A)op(B) + beta*C: dA = alpha*dY op(B)^T, dB = alpha*op(A)^T dY, dC = beta*dY"""
    a, b = node.inputs[0], node.inputs[1]
    alpha, beta = attr(node, "alpha", 1.0), attr(node, "beta", 1.0)
    ta, tb = attr(node, "transA", 0), attr(node, "transB", 0)
    g = dy[0]
    assert a is not None and b is not None and g is not None
    zero = em.const(0.0, like=a) if em.opset < 11 else None

    def gemm2(p: ir.Value, q: ir.Value, tp: int, tq: int) -> ir.Value:
        return em.Gemm(p, q, zero, alpha=float(alpha), beta=0.0, transA=tp, transB=tq)

    da = gemm2(g, b, 0, 1 - tb) if not ta else gemm2(b, g, tb, 1)
    db = gemm2(a, g, 1 - ta, 0) if not tb else gemm2(g, a, 1, ta)
    out: Out = [da, db]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        out.append(g if beta == 1.0 else em.Mul(g, em.const(beta, like=g)))
    return out

