"""Fusions of activations that exporters write out op by op, differentiated as one function of their input.

PyTorch's TorchScript exporter (opsets before 20, which have no Gelu) writes ``nn.GELU()`` as
y = (x * (erf(x / c) + b)) * h with c = sqrt(2), b = 1, h = 0.5. Differentiated node by node, the gradient reads the
pattern's inner values (x / c, erf), and onnxruntime then cannot fuse the forward pattern into its Gelu kernel: a
raw ConvNeXt-T export spends 31 ms per run in the unfused forward ops of its gradient graph against 6.5 ms in Gelu in
the forward-only run. Differentiated as one function, the gradient reads x alone and the forward keeps its fusion:

    dy/dx = h (erf(u) + b) + h x (2 / sqrt(pi)) exp(-u^2) / c,   u = x / c.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import Emitter
from onnxgrad.plans.base import Fusion, NotApplicable, own_rule

if TYPE_CHECKING:
    from onnxgrad.backprop import WalkContext


def _scalar(v: ir.Value | None) -> float | None:
    """The number a one-element constant holds, else None."""
    array = Emitter.constant_value(v)
    return float(array.reshape(-1)[0]) if array is not None and array.size == 1 else None


def _split(node: ir.Node) -> tuple[ir.Value, float] | None:
    """(the other input, the number) of a binary node one of whose inputs is a one-element constant."""
    if len(node.inputs) != 2 or node.inputs[0] is None or node.inputs[1] is None:
        return None
    for k in (1, 0):
        number = _scalar(node.inputs[k])
        if number is not None and _scalar(node.inputs[1 - k]) is None:
            return node.inputs[1 - k], number  # type: ignore[return-value]
    return None


def _made_by(v: ir.Value | None, op: str) -> ir.Node | None:
    node = None if v is None else v.producer()
    return node if node is not None and node.op_type == op and node.domain in ("", "ai.onnx") else None


def gelu_erf(ctx: WalkContext, last: ir.Node, on_path: set[int]) -> Fusion | NotApplicable:
    """y = (x * (erf(x / c) + b)) * h (or x * (1 / c) inside erf, factors in either order), every inner value read
    by the next node alone: one gradient from x."""
    outer = _split(last)
    prod = None if outer is None else _made_by(outer[0], "Mul")
    if outer is None or prod is None:
        return NotApplicable("not a GELU: not a product by a number of a product")
    for k in (0, 1):
        x, shifted = prod.inputs[k], _made_by(prod.inputs[1 - k], "Add")
        add = None if shifted is None else _split(shifted)
        erf = None if add is None else _made_by(add[0], "Erf")
        scaled = None if erf is None else erf.inputs[0]
        inner = _made_by(scaled, "Div") or _made_by(scaled, "Mul")
        split = None if inner is None else _split(inner)
        if x is not None and split is not None and split[0] is x and split[1] > 0:
            break
    else:
        return NotApplicable("not a GELU: no x * (erf(x / c) + b) in the product")
    assert add is not None and shifted is not None and erf is not None and inner is not None
    c = split[1] if inner.op_type == "Div" else 1.0 / split[1]
    nodes = (inner, erf, shifted, prod, last)
    if any(id(n) not in on_path for n in nodes) or x not in ctx.wanted:
        return NotApplicable("the pattern is not all differentiated, or x's gradient is not wanted")
    for node, reader in itertools.pairwise(nodes):
        v = node.outputs[0]
        if v.is_graph_output() or v in ctx.xs or v in ctx.ys or v in ctx.stop:
            return NotApplicable("an inner value is a graph output, an x, a y or stopped")
        if [u.node for u in v.uses() if u.node.graph is not None] != [reader]:
            return NotApplicable("an inner value has other readers")
    if not all(own_rule(ctx, op) for op in ("Mul", "Add", "Erf", inner.op_type)):
        return NotApplicable("a gradient rule registered by the user replaces onnxgrad's own")
    rank = None if x.shape is None else x.shape.rank()
    if rank is None or any(v is not None and (v.shape is None or v.shape.rank() > rank)
                           for n in nodes for v in n.inputs if _scalar(v) is not None):
        return NotApplicable("x's rank is not known, or a number has more axes than x (it would broadcast x)")
    b, h = add[1], outer[1]

    def grad(em: Emitter, dy: Sequence[ir.Value | None]) -> list[tuple[ir.Value, ir.Value | None]]:
        g = dy[0]
        assert g is not None and x is not None
        # u by the other op than the forward's, so that onnxruntime's common-subexpression pass does not merge
        # the two (the forward's inner values would have readers again, and no Gelu kernel)
        u = em.Mul(x, em.const(1.0 / c, like=x)) if inner.op_type == "Div" else em.Div(x, em.const(c, like=x))
        bell = em.Exp(em.Neg(em.Mul(u, u)))
        slope = em.Add(em.Mul(em.Add(em.Erf(u), em.const(b, like=x)), em.const(h, like=x)),
                       em.Mul(em.Mul(x, bell), em.const(np.float64(h * 2 / (math.sqrt(math.pi) * c)), like=x)))
        return [(x, em.Mul(g, slope))]

    return Fusion(nodes, grad)
