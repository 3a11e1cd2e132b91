"""Fusions of activations that exporters write out op by op, differentiated as one function of their input.

PyTorch's TorchScript exporter (opsets before 20, which have no Gelu) writes ``nn.GELU()`` as
y = (x * (erf(x / c) + b)) * h with c = sqrt(2), b = 1, h = 0.5 (or (x * h) * (erf(x / c) + b)). Differentiated node
by node, the gradient reads the pattern's inner values (x / c, erf), and onnxruntime then cannot fuse the forward
pattern into its Gelu kernel: a raw ConvNeXt-T export spends 31 ms per run in the unfused forward ops of its gradient
graph against 6.5 ms in Gelu in the forward-only run. Differentiated as one function, the gradient reads x alone and
the forward keeps its fusion:

    dy/dx = h (erf(u) + b) + h x (2 / sqrt(pi)) exp(-u^2) / c,   u = x / c.

The gradient computes u as x * (1 / c), not as the forward's x / c, or onnxruntime's common-subexpression pass would
merge the two and the forward's inner values would have readers again. Only the forms onnxruntime 1.31 fuses on CPU
are taken (c = sqrt(2), b = 1, h = 0.5, a Div): elsewhere the forward stays unfused either way, and the node-by-node
gradient, which reads the inner values instead of recomputing them, is the cheaper one. The tanh approximation is
one of those: onnxruntime's CPU provider fuses none of its exports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

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


def _products(last: ir.Node) -> list[tuple[ir.Value, ir.Value, float, ir.Node]]:
    """(u, v, h, the inner Mul) for ``last`` = (u * v) * h or (u * h) * v, h a number."""
    found = []
    outer = _split(last)
    mid = None if outer is None else _made_by(outer[0], "Mul")
    if outer is not None and mid is not None and _split(mid) is None and None not in mid.inputs:
        found.append((mid.inputs[0], mid.inputs[1], outer[1], mid))
    if outer is None and None not in last.inputs:
        for k in (0, 1):
            mid = _made_by(last.inputs[k], "Mul")
            inner = None if mid is None else _split(mid)
            if mid is not None and inner is not None:
                found.append((inner[0], last.inputs[1 - k], inner[1], mid))
    return found  # type: ignore[return-value]


def _erf_nodes(x: ir.Value, s: ir.Value) -> tuple[list[ir.Node], float] | None:
    """The nodes of s = erf(x / c) + 1 (Div, Erf, Add) and c, where c is sqrt(2): the form onnxruntime fuses."""
    shifted = _made_by(s, "Add")
    add = None if shifted is None else _split(shifted)
    erf = None if add is None else _made_by(add[0], "Erf")
    inner = None if erf is None else _made_by(erf.inputs[0], "Div")
    split = None if inner is None else _split(inner)
    if split is None or split[0] is not x or abs(split[1] - math.sqrt(2)) > 1e-6 or add[1] != 1.0:  # type: ignore[index]
        return None
    assert shifted is not None and erf is not None and inner is not None
    return [inner, erf, shifted], split[1]


def gelu(ctx: WalkContext, last: ir.Node, on_path: set[int]) -> Fusion | NotApplicable:
    """y = x (erf(x / c) + 1) * 0.5 as onnxruntime fuses it, every inner value read inside the pattern alone: one
    gradient from x."""
    for u, v, h, mid in _products(last):
        for x, s in ((u, v), (v, u)):
            found = _erf_nodes(x, s) if h == 0.5 else None
            if found is not None:
                return _fused(ctx, x, [*found[0], mid, last], found[1], on_path)
    return NotApplicable("not a GELU onnxruntime fuses: no x * (erf(x / sqrt(2)) + 1) * 0.5")


def _fused(ctx: WalkContext, x: ir.Value, nodes: list[ir.Node], c: float, on_path: set[int]
           ) -> Fusion | NotApplicable:
    """The fusion of the GELU ``nodes`` (x's readers first, the last Mul last), or why it does not apply."""
    if any(id(n) not in on_path for n in nodes) or x not in ctx.wanted:
        return NotApplicable("the pattern is not all differentiated, or x's gradient is not wanted")
    inside = {id(n) for n in nodes}
    for node in nodes[:-1]:
        v = node.outputs[0]
        if v.is_graph_output() or v in ctx.xs or v in ctx.ys or v in ctx.stop:
            return NotApplicable("an inner value is a graph output, an x, a y or stopped")
        if any(id(u.node) not in inside for u in v.uses() if u.node.graph is not None):
            return NotApplicable("an inner value has other readers")
    if any(v in ctx.wanted for n in nodes for v in n.inputs if _scalar(v) is not None):
        return NotApplicable("a number of the pattern is itself differentiated (PyTorch's dynamo exporter stores "
                             "them as initializers, which @weights takes): their gradients come node by node")
    if not all(own_rule(ctx, n.op_type) for n in nodes):
        return NotApplicable("a gradient rule registered by the user replaces onnxgrad's own")
    rank = None if x.shape is None else x.shape.rank()
    if rank is None or any(v is not None and (v.shape is None or v.shape.rank() > rank)
                           for n in nodes for v in n.inputs if _scalar(v) is not None):
        return NotApplicable("x's rank is not known, or a number has more axes than x (it would broadcast x)")

    def grad(em: Emitter, dy: Sequence[ir.Value | None]) -> list[tuple[ir.Value, ir.Value | None]]:
        """dx = dy (0.5 (erf(u) + 1) + x exp(-u^2) / (c sqrt(pi))), u = x / c, computed as x * (1 / c)"""
        assert dy[0] is not None
        u = em.Mul(x, em.const(1.0 / c, like=x))
        bell = em.Exp(em.Neg(em.Mul(u, u)))
        slope = em.Add(em.Mul(em.Add(em.Erf(u), em.const(1.0, like=x)), em.const(0.5, like=x)),
                       em.Mul(em.Mul(x, bell), em.const(1.0 / (math.sqrt(math.pi) * c), like=x)))
        return [(x, em.Mul(dy[0], slope))]

    return Fusion(tuple(nodes), grad)  # only the last node's output gets gradient from outside
