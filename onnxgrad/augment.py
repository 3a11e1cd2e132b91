"""``add_gradients``: the one entry point for model files and protos. It decides how the model is read (in memory,
or lazily with its external weights left on disk), upgrades models older than opset 7, builds gradients of any
order, exposes them as outputs, and writes the result when asked.

It sits above both ``api`` (first order) and ``higher`` (orders 2 and up), which is why it is not in ``api``:
``higher`` is built on ``api.gradients``."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal, NamedTuple

import onnx
import onnx_ir as ir

from onnxgrad.api import GradY, gradients
from onnxgrad.higher import higher_order_gradients
from onnxgrad.io import has_external_data, load_lazy, load_model, save_external, save_model
from onnxgrad.remat import Residual, residual_rows
from onnxgrad.shorthands import expand_xs
from onnxgrad.upgrade import ai_onnx_opset, upgrade
from onnxgrad.validate import MIN_OPSET, check_names
from onnxgrad.values import as_list, expose

ExternalData = Literal["auto"] | bool
ModelSource = onnx.ModelProto | ir.Model | str | os.PathLike[str]


class Augmented(NamedTuple):
    """A model with gradients appended as outputs, and what was added."""

    model: onnx.ModelProto  # written with external data: the graph as saved, its tensors left in the data file
    gradients: dict[str, str | None]  # x -> output name (None where unconnected)
    new_inputs: list[str]
    higher: dict[int, dict[str, str | None]] | None = None  # order (2, 3...) -> x -> output name, order > 1


def add_gradients(
    model: ModelSource,
    ys: str | Sequence[str],
    xs: str | Sequence[str],
    grad_ys: GradY | Sequence[GradY] = None,
    order: int = 1,
    external_data: ExternalData = "auto",
    output: str | os.PathLike[str] | None = None,
    hvp_mode: str = "auto",
    **kwargs: Any,
) -> Augmented:
    """A new model: the original outputs first, unchanged, then one output per x with a gradient.

    ``model`` is a path, an ``onnx.ModelProto`` or an ``onnx_ir.Model`` (none is modified). ``xs`` may use
    ``@weights`` (every float initializer) and ``@inputs`` (every float graph input). ``order`` > 1 also appends
    the derivatives of order 2..order (``onnxgrad.higher_order_gradients``: Hessian-vector products and beyond,
    each with its vector as a new graph input); ``hvp_mode`` picks how order 2 is built ('auto',
    'forward-over-reverse', 'reverse-over-reverse': ``onnxgrad.higher.choose_hvp_mode``). Other keyword arguments
    go to ``onnxgrad.gradients``.

    ``output``: where to write the result (checked by ``onnx.checker``, written atomically). ``external_data``:
    ``True`` writes its tensors to ``<output>.data`` and, for a path, reads the model lazily, its weights left on
    disk and streamed from file to file (the way for models over 2 GB); ``"auto"`` does so when ``model`` is a
    file that keeps weights in external data and ``output`` is given; ``False`` holds every weight in memory
    (results of 2 GB or more still go to ``<output>.data``, protobuf cannot hold them)."""
    if isinstance(order, bool) or not isinstance(order, int) or order < 1:
        raise ValueError(f"order must be an integer of 1 or more, got {order!r}")
    if external_data not in ("auto", True, False):
        raise ValueError(f"external_data must be 'auto', True or False, got {external_data!r}")
    path = model if isinstance(model, str | os.PathLike) else None
    external = external_data is True or (
        external_data == "auto" and output is not None and path is not None and has_external_data(path)
    )
    if external and output is None:
        raise ValueError("external_data=True writes the result's tensors to '<output>.data': pass output=PATH")
    m = _lazy(path) if external and path is not None else _in_memory(model)

    x_list = _expand(m, as_list(xs))
    before = {v.name for v in m.graph.inputs}
    if order == 1:
        orders = [gradients(m, ys, x_list, grad_ys, **kwargs)]
    else:
        orders = higher_order_gradients(m, ys, x_list, order, grad_ys, hvp_mode=hvp_mode, **kwargs)  # type: ignore[arg-type]
    expose(m, [n for names in orders for n in names])
    new_inputs = [v.name or "" for v in m.graph.inputs if v.name not in before and not v.is_initializer()]

    if output is None:
        proto = ir.serde.serialize_model(m)
    elif external:
        save_external(m, output)
        proto = onnx.load(os.fspath(output), load_external_data=False)
    else:
        proto = ir.serde.serialize_model(m)
        save_model(proto, output)
    x_names = [x if isinstance(x, str) else x.name for x in x_list]
    by_x = [dict(zip(x_names, names, strict=True)) for names in orders]
    return Augmented(proto, by_x[0], new_inputs, {k: found for k, found in enumerate(by_x[1:], start=2)})


def _in_memory(model: ModelSource) -> ir.Model:
    """A private onnx_ir copy of ``model`` with every weight in memory, checked and upgraded to opset 7 or later."""
    if isinstance(model, ir.Model):
        model = ir.serde.serialize_model(model)
    if not isinstance(model, onnx.ModelProto):
        if not isinstance(model, str | os.PathLike):
            raise TypeError(
                "add_gradients() takes a path, an onnx.ModelProto or an onnx_ir.Model, "
                f"got {type(model).__module__}.{type(model).__name__}"
            )
        model = load_model(model)
    check_names(model.graph)
    return ir.serde.deserialize_model(upgrade(model))


def _lazy(path: str | os.PathLike[str]) -> ir.Model:
    """The model at ``path``, its external tensors left on disk (read on use, memory-mapped), checked."""
    graph = load_model(path, load_external_data=False)
    check_names(graph.graph)
    opset = ai_onnx_opset(graph)
    if opset is not None and opset < MIN_OPSET:
        raise ValueError(
            f"'{Path(path)}' keeps its weights in external data and imports ai.onnx opset {opset}: upgrading it to "
            f"opset {MIN_OPSET} takes every weight into memory; pass external_data=False to do that"
        )
    return load_lazy(path)


def _expand(model: ir.Model, xs: list[Any]) -> list[Any]:
    """``xs`` with the ``@weights`` / ``@inputs`` shorthands replaced by the names they stand for."""
    if not any(isinstance(x, str) and x.startswith("@") for x in xs):
        return xs
    return expand_xs(model, [x if isinstance(x, str) else x.name for x in xs])


def residuals(model: ModelSource, ys: str | Sequence[str], xs: str | Sequence[str],
              dims: Mapping[str, int] | None = None, default: int = 1, **kwargs: Any) -> list[Residual]:
    """Which forward values the gradient of ys with respect to xs keeps alive for its backward part, largest first,
    with their sizes at ``dims`` (``onnxgrad info --residuals``). ``kwargs`` go to ``gradients`` (with ``recompute``,
    ``remat`` or ``memory_budget``: what stays saved then)."""
    m = _in_memory(model)
    before = {id(n) for n in m.graph}
    gradients(m, ys, _expand(m, as_list(xs)), **kwargs)
    return residual_rows(m.graph, [n for n in m.graph if id(n) not in before], dims, default)
