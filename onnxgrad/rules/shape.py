"""Data movement: reshapes and permutations."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import onnx_ir as ir

from onnxgrad.emitter import Emitter, attr
from onnxgrad.registry import register

Grads = Sequence[ir.Value | None]
Out = list[ir.Value | None]


@register("Reshape")
def reshape(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = reshape(dy, shape(x))"""
    x = node.inputs[0]
    assert x is not None and dy[0] is not None
    return [em.reshape_like(dy[0], x), None]


@register("Transpose")
def transpose(em: Emitter, node: ir.Node, dy: Grads) -> Out:
    """dx = transpose(dy, inverse(perm))"""
    perm = attr(node, "perm")
    if perm is None:
        return [em.Transpose(dy[0])]
    return [em.Transpose(dy[0], perm=[int(i) for i in np.argsort(perm)])]
