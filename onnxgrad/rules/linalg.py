"""Matrix products."""

from __future__ import annotations

import string
from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import Emitter, attr, rank_of, static_dims
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
    db = _shared_right(em, a2, g, b2) if ra > 2 and rb == 2 else None
    if db is None:
        db = em.unbroadcast(_typed(em.MatMul(em.transpose_last2(a2), g), r), b2)
    if ra == 1:
        da = em.squeeze(da, [0])
    if rb == 1:
        db = em.squeeze(db, [1])
    return [da, db]


def _shared_right(em: Emitter, a: ir.Value, g: ir.Value, b: ir.Value) -> ir.Value | None:
    """db = sum over a's batch of a_i^T g_i = A^T G, A and G with every row of the batch stacked: one (K x rows)
    (rows x N) product instead of one product per batch entry and a sum over them."""
    if a.dtype not in (ir.DataType.FLOAT, ir.DataType.DOUBLE):
        return None  # Gemm's float16 kernels are not everywhere; the batched form stays
    rows_a = em.Reshape(a, em.cat_ints([-1], em.dims(b, [0])))
    rows_g = em.Reshape(g, em.cat_ints([-1], em.dims(b, [1])))
    return em.gemm(rows_a, rows_g, 1, 0)


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
    scale = float(alpha)
    da = em.gemm(g, b, 0, 1 - tb, scale) if not ta else em.gemm(b, g, tb, 1, scale)
    db = em.gemm(a, g, 1 - ta, 0, scale) if not tb else em.gemm(g, a, 1, ta, scale)
    out: Out = [da, db]
    if len(node.inputs) > 2 and node.inputs[2] is not None:
        out.append(g if beta == 1.0 else em.Mul(g, em.const(beta, like=g)))
    return out



# ------------------------------------------------------------------------------------------- Einsum


def _einsum_terms(equation: str, ranks: Sequence[int | None], name: str) -> tuple[list[str], str]:
    """Each operand's subscripts and the output's, with every ellipsis spelled out in fresh letters."""
    lhs, arrow, rhs = equation.replace(" ", "").partition("->")
    terms = lhs.split(",")
    if len(terms) != len(ranks):
        raise ValueError(f"Einsum '{name}': equation '{equation}' names {len(terms)} operands, has {len(ranks)}")
    spans = []
    for term, rank in zip(terms, ranks, strict=True):
        if "..." not in term:
            spans.append(0)
        elif rank is None:
            raise ValueError(f"Einsum '{name}': the gradient needs the rank of every operand under '...'")
        else:
            spans.append(rank - (len(term) - 3))
    width = max(spans, default=0)
    used = set(equation)
    ell = "".join([c for c in string.ascii_letters if c not in used][:width])
    if len(ell) < width:
        raise ValueError(f"Einsum '{name}': not enough free letters to spell out '...'")
    full = [t.replace("...", ell[width - k:]) for t, k in zip(terms, spans, strict=True)]
    if arrow:
        out = rhs.replace("...", ell)
    else:
        letters = "".join(t.replace("...", "") for t in terms)
        out = ell + "".join(sorted(c for c in set(letters) if letters.count(c) == 1))
    return full, out


def _filled(em: Emitter, x: ir.Value, positions: Sequence[int], eye: bool) -> ir.Value:
    """Ones (or an identity matrix, for two positions) sized like x's axes at ``positions``, x's dtype."""
    shape = em.dims(x, positions)
    if eye and isinstance(shape, list):
        return em.const(np.eye(shape[0]), like=x)
    out = em.full(shape, 0.0 if eye else 1.0, like=x)
    return em.EyeLike(out) if eye else out


def _einsum_operand_grad(
    em: Emitter, node: ir.Node, g: ir.Value, terms: list[str], out: str, k: int
) -> ir.Value:
    """d operand_k = einsum(dy, other operands -> operand_k's subscripts), with ones for letters only
    operand k has (summed there, so broadcast back), identity matrices for its repeated letters
    (diagonals), and a sum over its size-1 axes that other operands broadcast."""
    x = node.inputs[k]
    assert x is not None
    term = terms[k]
    others = set(out).union(*(terms[j] for j in range(len(terms)) if j != k))
    free = iter(c for c in string.ascii_letters if c not in others and c not in term)
    args: list[ir.Value] = [g, *(node.inputs[j] for j in range(len(terms)) if j != k)]  # type: ignore[list-item]
    subs = [out, *(terms[j] for j in range(len(terms)) if j != k)]
    target, first = [], {}
    for pos, c in enumerate(term):
        if c in first:  # a repeated letter: a diagonal of x
            fresh = next(free, None)
            if fresh is None:
                raise ValueError(f"Einsum '{node.name}': too many repeated subscripts for the gradient")
            target.append(fresh)
            args.append(_filled(em, x, [first[c], pos], eye=True))
            subs.append(c + fresh)
        else:
            first[c] = pos
            target.append(c)
    alone = [c for c in first if c not in others]
    if alone:
        args.append(_filled(em, x, [first[c] for c in alone], eye=False))
        subs.append("".join(alone))
    equation = ",".join(subs) + "->" + "".join(target)
    dx = g if len(args) == 1 and out == "".join(target) else em.Einsum(*args, equation=equation)
    dims = static_dims(x)
    if dims is not None:
        sized = [(terms[j], node.inputs[j]) for j in range(len(terms)) if j != k] + [(out, node.outputs[0])]
        spread = [p for p, c in enumerate(term) if dims[p] == 1 and c in others and not _all_ones(c, sized)]
        if spread:
            dx = em.reduce_sum(dx, spread, keepdims=True)
    return dx


def _all_ones(letter: str, sized: Sequence[tuple[str, ir.Value | None]]) -> bool:
    """True when every other operand (and the output) is known to have size 1 wherever it uses ``letter``."""
    for term, v in sized:
        shape = None if v is None else v.shape
        for p, c in enumerate(term):
            if c == letter and (shape is None or len(shape) != len(term) or shape[p] != 1):
                return False
    return True


@register("Einsum", since=12, notes="any equation: diagonals (repeated subscripts), '...', broadcasting; "
          "an operand's size-1 axis is taken as broadcast only when its size is static")
def einsum(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """d operand_k = einsum(dy, other operands -> subscripts of operand k)"""
    assert dy[0] is not None
    terms, out = _einsum_terms(attr(node, "equation"), [rank_of(v) for v in node.inputs if v is not None],
                               node.name or "")
    return [_einsum_operand_grad(em, node, dy[0], terms, out, k) for k in range(len(terms))]


# ---------------------------------------------------------------------------------------------- Det


@register("Det", since=11, notes="cofactors as the determinants of the n^2 minors (no Inverse in ai.onnx): "
          "exact for singular matrices too; needs the matrix size n static; n^2 determinants of order n-1")
def det(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dA = dy * cofactor(A) (= dy * det(A) * inv(A)^T when A is invertible)"""
    a = node.inputs[0]
    assert a is not None and dy[0] is not None
    rank, dims = rank_of(a), a.shape
    if rank is None or dims is None or not isinstance(dims[-1], int):
        raise ValueError(f"Det '{node.name}': the gradient needs the rank and the (static) matrix size")
    n, b = int(dims[-1]), rank - 2
    g = em.unsqueeze(dy[0], [b, b + 1])
    if n == 1:
        return [g]
    rest = em.const(np.array([[j for j in range(n) if j != i] for i in range(n)]), dtype=ir.DataType.INT64)
    minors = em.Gather(em.Gather(a, rest, axis=b), rest, axis=b + 2)  # [*, i, n-1, j, n-1]
    minors = em.Transpose(minors, perm=[*range(b), b, b + 2, b + 1, b + 3])
    signs = em.const((-1.0) ** np.add.outer(np.arange(n), np.arange(n)), like=a)
    return [em.Mul(em.Mul(em.Det(minors), signs), g)]
