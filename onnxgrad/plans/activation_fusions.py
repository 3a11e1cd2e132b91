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
gradient, which reads the inner values instead of recomputing them, is the cheaper one.

The tanh approximation, y = (x * 0.5) * (tanh(k (x + a x^3)) + 1) with a = 0.044715 and k = sqrt(2 / pi), is fused
into FastGelu in one form only: Hugging Face's ``gelu_new`` (GPT-2 and its kin), whose export writes x^3 as
``Pow(x, 3)`` and multiplies x by 0.5 first (onnxruntime then fuses it wherever y is not a graph output; PyTorch's
``F.gelu(approximate="tanh")`` writes x * (x * x) and multiplies by 0.5 last, which it does not fuse). A raw GPT-2
export's gradient graph spent 13 ms per run in that unfused forward against 1.6 ms in FastGelu. Its gradient,

    dy/dx = 0.5 (1 + t) + 0.5 k x (1 + 3 a x^2) (1 - t^2),   t = tanh(k (x + a x^3)),

computes the tanh's argument as x (k + k a x^2), which no forward node computes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
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


A_TANH = 0.044715  # the tanh approximation's numbers: t = tanh(k (x + a x^3))
K_TANH = math.sqrt(2.0 / math.pi)


def _tanh_nodes(x: ir.Value, s: ir.Value) -> list[ir.Node] | None:
    """The nodes of s = tanh((x + x^3 * a) * k) + 1 (Pow, Mul, Add, Mul, Tanh, Add; either operand order) with a, k
    the approximation's numbers and the cube a Pow: the form onnxruntime fuses."""
    shifted = _made_by(s, "Add")
    one = None if shifted is None else _split(shifted)
    tanh = None if one is None or one[1] != 1.0 else _made_by(one[0], "Tanh")
    scaled = None if tanh is None else _made_by(tanh.inputs[0], "Mul")
    k = None if scaled is None else _split(scaled)
    inner = None if k is None or abs(k[1] - K_TANH) > 1e-6 else _made_by(k[0], "Add")
    if inner is None or None in inner.inputs or x not in inner.inputs:
        return None
    cubed = _made_by(inner.inputs[1] if inner.inputs[0] is x else inner.inputs[0], "Mul")
    a = None if cubed is None else _split(cubed)
    power = None if a is None or abs(a[1] - A_TANH) > 1e-6 else _made_by(a[0], "Pow")
    three = None if power is None else _split(power)
    if three is None or three[0] is not x or three[1] != 3.0:
        return None
    assert shifted is not None and tanh is not None and scaled is not None and cubed is not None
    return [power, cubed, inner, scaled, tanh, shifted]


def gelu(ctx: WalkContext, last: ir.Node, on_path: set[int]) -> Fusion | NotApplicable:
    """y = x (erf(x / c) + 1) * 0.5, or (x * 0.5) (tanh(k (x + a x^3)) + 1), as onnxruntime fuses them, every inner
    value read inside the pattern alone: one gradient from x."""
    for u, v, h, mid in _products(last):
        for x, s in ((u, v), (v, u)):
            found = _erf_nodes(x, s) if h == 0.5 else None
            if found is not None:
                return _fused(ctx, x, [*found[0], mid, last], lambda em, x, c=found[1]: _erf_slope(em, x, c), on_path)
            # the tanh form only as x * 0.5 first (then mid holds the number), then times s
            tanh = _tanh_nodes(x, s) if h == 0.5 and _split(mid) is not None else None
            if tanh is not None:
                return _fused(ctx, x, [*tanh, mid, last], _tanh_slope, on_path)
    return NotApplicable("not a GELU onnxruntime fuses: no x * (erf(x / sqrt(2)) + 1) * 0.5 and no "
                         "(x * 0.5) * (tanh((x + x^3 * 0.044715) * sqrt(2 / pi)) + 1) with x^3 a Pow")


def _erf_slope(em: Emitter, x: ir.Value, c: float) -> ir.Value:
    """dy/dx = 0.5 (erf(u) + 1) + x exp(-u^2) / (c sqrt(pi)), u = x / c, computed as x * (1 / c)"""
    u = em.Mul(x, em.const(1.0 / c, like=x))
    bell = em.Exp(em.Neg(em.Mul(u, u)))
    return em.Add(em.Mul(em.Add(em.Erf(u), em.const(1.0, like=x)), em.const(0.5, like=x)),
                  em.Mul(em.Mul(x, bell), em.const(1.0 / (math.sqrt(math.pi) * c), like=x)))


def _tanh_slope(em: Emitter, x: ir.Value) -> ir.Value:
    """dy/dx = 0.5 (1 + t) + 0.5 k x (1 + 3 a x^2) (1 - t^2), t = tanh(x (k + k a x^2))"""
    x2 = em.Mul(x, x)
    t = em.Tanh(em.Mul(x, em.Add(em.Mul(x2, em.const(K_TANH * A_TANH, like=x)), em.const(K_TANH, like=x))))
    w = em.Mul(x, em.Add(em.Mul(x2, em.const(1.5 * A_TANH * K_TANH, like=x)), em.const(0.5 * K_TANH, like=x)))
    one = em.const(1.0, like=x)
    return em.Add(em.Mul(em.Add(t, one), em.const(0.5, like=x)), em.Mul(w, em.Sub(one, em.Mul(t, t))))


def _fused(ctx: WalkContext, x: ir.Value, nodes: list[ir.Node], slope: Callable[[Emitter, ir.Value], ir.Value],
           on_path: set[int]) -> Fusion | NotApplicable:
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
        """dx = dy * dy/dx"""
        assert dy[0] is not None
        return [(x, em.Mul(dy[0], slope(em, x)))]

    return Fusion(tuple(nodes), grad)  # only the last node's output gets gradient from outside
