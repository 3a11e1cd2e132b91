"""The train-step model: one ONNX model that takes a batch, the params, the optimizer state, the learning rate and
the step number, and returns the loss, the new params and the new state, in standard ``ai.onnx`` ops only.

``make_train_step`` builds it from an inference model: it appends a loss if asked (``cross_entropy:LOGITS:LABELS``,
``mse:PRED:TARGET``), puts BatchNormalization and Dropout into training mode as PyTorch has them (batch statistics
with the running statistics as state, a dropout mask drawn from a seed input), turns the params from initializers
into graph inputs, differentiates the loss with ``onnxgrad.gradients`` and appends the optimizer
(``onnxgrad.optim``). Where every input and output went is recorded in the model's metadata (``layout``), so that
``onnxgrad.trainer`` (``onnxgrad train``) or any other runtime can drive it.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Collection, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir as ir

from onnxgrad import plans
from onnxgrad.api import GradientNote, gradients, running_statistics
from onnxgrad.emitter import FLOAT_TYPES, Emitter, attr, rank_of
from onnxgrad.geometry import conv_window, padded
from onnxgrad.io import atomic_path, load_model, save_model
from onnxgrad.optim import Optimizer, Scalars, clip_coefficient, make_optimizer
from onnxgrad.plans.conv_fusions import kernel_fold
from onnxgrad.registry import Rule, opset_of, register_fallback
from onnxgrad.shapes import infer_missing_types
from onnxgrad.shorthands import expand_xs
from onnxgrad.upgrade import upgrade
from onnxgrad.validate import check_names
from onnxgrad.values import unique_scope, value_table

METADATA_KEY = "onnxgrad.train_step"
LOSSES = {"cross_entropy": "cross_entropy:LOGITS:LABELS", "mse": "mse:PRED:TARGET"}
MODES = ("train", "eval")
_PRIME = 2147483647  # 2^31 - 1: the dropout hash works modulo this prime, in int64 without overflow


@dataclass
class TrainStep:
    """A train-step model and where everything is in it.

    ``params`` and ``state`` map a name to its (input, output) pair; ``initial`` holds the starting value of every
    param and state input; ``data`` are the inputs a batch feeds. ``seed`` (dropout in training mode) and ``apply``
    (gradient accumulation: True on the micro-batch that ends an optimizer step) are inputs too, or None."""

    model: onnx.ModelProto
    loss: str
    lr: str
    step: str | None
    data: list[str]
    params: dict[str, tuple[str, str]]
    state: dict[str, tuple[str, str]]
    initial: dict[str, np.ndarray]
    optimizer: Optimizer
    outputs: list[str] = field(default_factory=list)
    seed: str | None = None
    apply: str | None = None
    clip_grad_norm: float | None = None
    buffers: list[str] = field(default_factory=list)  # state that belongs to the model: BatchNorm running statistics
    source: str | None = None  # the path of the inference model it was built from, when it came from a file

    def layout(self, initial: str | None = None) -> dict[str, Any]:
        """Where everything is: ``{"loss", "lr", "step", "data", "params", "state", "initial", ...}``."""
        return {
            "loss": self.loss, "lr": self.lr, "step": self.step, "data": list(self.data),
            "params": {k: list(v) for k, v in self.params.items()},
            "state": {k: list(v) for k, v in self.state.items()},
            "initial": initial, "outputs": list(self.outputs), "seed": self.seed, "apply": self.apply,
            "buffers": list(self.buffers),
        }

    def save(self, path: str | os.PathLike[str], initial: str | os.PathLike[str] | None = None) -> Path:
        """Write the model (checked, atomically) and its initial params and state (``.npz``, default beside it as
        ``<stem>.initial.npz``); returns the path of the ``.npz``."""
        dest = Path(path)
        init = Path(initial) if initial is not None else dest.with_name(dest.stem + ".initial.npz")
        model = onnx.ModelProto()
        model.CopyFrom(self.model)
        meta = json.loads(next(p.value for p in model.metadata_props if p.key == METADATA_KEY))
        meta["initial"] = _relative(init, dest.parent)
        if self.source is not None:
            meta["source"] = _relative(Path(self.source), dest.parent)
        _set_metadata(model, meta)
        save_npz(init, self.initial)
        save_model(model, dest)
        return init


def _relative(path: Path, start: Path) -> str:
    return os.path.relpath(path.resolve(), start.resolve())


def _set_metadata(model: onnx.ModelProto, meta: dict[str, Any]) -> None:
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            p.value = json.dumps(meta, sort_keys=True)
            return
    model.metadata_props.add(key=METADATA_KEY, value=json.dumps(meta, sort_keys=True))


def read_layout(model: onnx.ModelProto) -> dict[str, Any]:
    """The layout ``make_train_step`` recorded in a train-step model's metadata."""
    for p in model.metadata_props:
        if p.key == METADATA_KEY:
            return dict(json.loads(p.value))
    raise ValueError(f"the model has no '{METADATA_KEY}' metadata: it is not a train-step model "
                     "(make one with 'onnxgrad train-step')")


def save_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray]) -> None:
    """Write ``arrays`` to a ``.npz`` atomically: a reader sees the old file or the whole new one, never a part."""
    with atomic_path(path, ".npz") as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------------------------- building
def make_train_step(
    model: onnx.ModelProto | ir.Model | str | os.PathLike[str],
    loss: str,
    params: str | Sequence[str] | None = None,
    optimizer: str | Optimizer = "sgd",
    *,
    frozen: Sequence[str] = (),
    outputs: Sequence[str] = (),
    clip_grad_norm: float | None = None,
    batchnorm: str = "train",
    dropout: str = "train",
    accumulate: bool = False,
    straight_through: bool = False,
    **hyper: Any,
) -> TrainStep:
    """Build the train-step model of ``model`` (a path, ``onnx.ModelProto`` or ``onnx_ir.Model``; not modified).

    ``loss``: the name of a scalar value, or ``cross_entropy:LOGITS:LABELS`` / ``mse:PRED:TARGET`` to append one
    (mean reduction, torch's semantics; LABELS / TARGET become inputs unless the graph has them). ``params``: the
    float initializers to train (default ``@weights``, every one but BatchNorm running statistics); ``frozen``:
    ones left as they are. ``optimizer``: ``sgd``, ``adam``, ``adamw``, ``adagrad`` or an ``onnxgrad.optim``
    instance; ``hyper``: its torch.optim keyword arguments. ``clip_grad_norm``: clip the gradients by their global
    norm first. ``batchnorm`` / ``dropout``: ``train`` (PyTorch's training mode) or ``eval`` (as exported).
    ``accumulate``: add each micro-batch's gradient into state and step only when the ``apply`` input is True,
    with the mean of the gradients accumulated. ``outputs``: values to output beside the loss.
    ``straight_through``: train through fake quantisation (QuantizeLinear -> DequantizeLinear) as ``gradients``
    does with it: quantisation-aware training."""
    for what, mode in (("batchnorm", batchnorm), ("dropout", dropout)):
        if mode not in MODES:
            raise ValueError(f"{what} must be 'train' or 'eval', got {mode!r}")
    opt = make_optimizer(optimizer, **hyper)
    source = os.fspath(model) if isinstance(model, str | os.PathLike) else None
    m = _load(model)
    infer_missing_types(m)
    graph = m.graph
    opset = opset_of(m.opset_imports)
    table = value_table(graph)
    for name in outputs:
        _find(table, name, "outputs")

    _untie_running_statistics(graph)
    table = value_table(graph)
    running = {v.name for n in graph if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")
               for v in n.inputs[3:5] if v is not None}
    readers = {name: len({id(u.node) for u in v.uses()}) for name, v in graph.initializers.items()}  # as exported
    fwd = Emitter(graph, opset, unique_scope(graph, "train"), m.ir_version or 8)
    new_inputs: list[ir.Value] = []
    kept: list[ir.Value] = []  # the training-mode forms of the nodes replaced
    loss_v = _loss(fwd, graph, table, loss, new_inputs)
    stats = _batchnorms(fwd, graph, kept) if batchnorm == "train" else []
    seed = _dropouts(fwd, graph, opset, dropout == "train", kept)
    if seed is not None:
        new_inputs.append(seed)
    _drop_replaced(graph)
    fwd.commit([loss_v, *kept, *[v for s in stats for v in s[2:]]])
    graph.inputs.extend(new_inputs)
    _check_loss(loss_v)
    table = value_table(graph)
    extra = [table[name] for name in outputs]  # after the training-mode forms replaced what they compute

    trainable = _params(m, params, frozen, running)
    _note_shared(trainable, readers)
    _note_folded(trainable)
    initial: dict[str, np.ndarray] = {}
    for v in [*trainable, *[v for s in stats for v in s[:2]]]:
        initial[v.name or ""] = _to_input(graph, v)
    graph.outputs.clear()
    graph.outputs.extend([loss_v, *extra])
    ir.passes.common.TopologicalSortPass()(m)

    try:
        names = gradients(m, loss_v.name or "", [p.name or "" for p in trainable], name=unique_scope(graph, "grad"),
                          straight_through=straight_through)
    finally:
        _lower_batchnorms(m)
    _share_max_pools(m)
    table = value_table(graph)
    pairs = []
    for p, g in zip(trainable, names, strict=True):
        if g is None:
            warnings.warn(GradientNote(f"params: the loss does not depend on {p.name!r}: it is left as it is"),
                          stacklevel=2)
            _to_initializer(graph, p, initial.pop(p.name or ""))
            continue
        pairs.append((p, table[g]))
    if not pairs:
        raise ValueError("no param affects the loss: there is nothing to train")
    return _finish(m, source, opt, pairs, stats, loss_v, extra, seed, new_inputs, initial,
                   clip_grad_norm, accumulate)


_EMBEDDING = re.compile(r"aten\.embedding\.default\]?\(args = \(%\w+, %\w+, (\d+)")


def padding_rows(p: ir.Value) -> list[int]:
    """The rows of p that an ``nn.Embedding(padding_idx=...)`` keeps out of training: PyTorch's dynamo exporter
    writes it as a plain Gather, and only the node's metadata (``pkg.torch.onnx.fx_node``) still names the index
    (the TorchScript exporter keeps nothing)."""
    rows = set()
    for use in p.uses():
        node = use.node
        if node.op_type == "Gather" and node.domain in ("", "ai.onnx") and use.idx == 0 \
                and node.attributes.get_int("axis", 0) == 0:
            found = _EMBEDDING.search(node.metadata_props.get("pkg.torch.onnx.fx_node", ""))
            if found is not None:
                rows.add(int(found.group(1)))
    return sorted(rows)


def _without_padding_rows(em: Emitter, p: ir.Value, g: ir.Value) -> ir.Value:
    """g with the padding rows of p (``padding_rows``) zeroed, as PyTorch's embedding gradient has them."""
    rows = padding_rows(p)
    shape = shape_of(p)
    if not rows or not shape:
        return g
    keep = np.ones([shape[0]] + [1] * (len(shape) - 1), dtype_of(p).numpy())
    keep[[r for r in rows if r < shape[0]]] = 0
    return em.Mul(g, em.const(keep, like=g))


def _finish(m: ir.Model, source: str | None, opt: Optimizer, pairs: list[tuple[ir.Value, ir.Value]],
            stats: list[tuple[ir.Value, ...]], loss_v: ir.Value, extra: list[ir.Value], seed: ir.Value | None,
            new_inputs: list[ir.Value], initial: dict[str, np.ndarray], clip: float | None, accumulate: bool
            ) -> TrainStep:
    """Append the optimizer to the differentiated model, then order its inputs and outputs and record them."""
    graph = m.graph
    dtype = pairs[0][0].dtype
    assert dtype is not None
    em = Emitter(graph, opset_of(m.opset_imports), unique_scope(graph, "optim"), m.ir_version or 8)
    taken = set(value_table(graph))

    def fresh(name: str, dtype: ir.DataType, shape: Sequence[int]) -> ir.Value:
        k, base = 0, name
        while name in taken:
            k += 1
            name = f"{base}_{k}"
        taken.add(name)
        return ir.Value(name=name, type=ir.TensorType(dtype), shape=ir.Shape(list(shape)))

    lr = fresh("lr", dtype, [])
    step = fresh("step", ir.DataType.INT64, []) if opt.needs_step() else None
    apply = fresh("apply", ir.DataType.BOOL, []) if accumulate else None
    scalars = Scalars(em, lr, step)
    state_pairs = [p for s in stats for p in ((s[0], s[2]), (s[1], s[3]))]
    grads = [_without_padding_rows(em, p, g) for p, g in pairs]
    if accumulate:
        count = fresh("accum/count", ir.DataType.FLOAT, [])
        initial[count.name or ""] = np.zeros((), np.float32)
        n = em.Add(count, em.const(1.0, dtype=ir.DataType.FLOAT))
        totals = []
        for p, g in pairs:
            acc = fresh(f"accum/{p.name}", dtype_of(p), shape_of(p))
            initial[acc.name or ""] = np.zeros(shape_of(p), dtype_of(p).numpy())
            totals.append((acc, em.Add(acc, g)))
        assert apply is not None
        zero = em.const(0.0, dtype=ir.DataType.FLOAT)
        state_pairs += [(acc, em.Where(apply, em.const(0.0, like=acc), total)) for acc, total in totals]
        state_pairs.append((count, em.Where(apply, zero, n)))
        grads = [em.Div(total, em.Cast(n, to=int(dtype_of(acc)))) for acc, total in totals]
    scale = None if clip is None else clip_coefficient(em, grads, clip)  # the optimizers apply it
    param_pairs = []
    opt_pairs = []
    for (p, _), g in zip(pairs, grads, strict=True):
        slots = {name: fresh(f"optim/{p.name}/{name}", dtype_of(p), shape_of(p)) for name, _ in opt.slots()}
        for (_, fill), v in zip(opt.slots(), slots.values(), strict=True):
            initial[v.name or ""] = np.full(shape_of(p), fill, dtype_of(p).numpy())
        new_p, new_slots = opt.update(scalars, p, g, slots, scale)
        if apply is not None:
            new_p = em.Where(apply, new_p, p)
            new_slots = {k: em.Where(apply, v, slots[k]) for k, v in new_slots.items()}
        param_pairs.append((p, new_p))
        opt_pairs += [(slots[k], new_slots[k]) for k in slots]
    state_pairs = opt_pairs + state_pairs
    outs: list[ir.Value] = []
    for old, new in [*param_pairs, *state_pairs]:
        name = fresh(f"new/{old.name}", dtype_of(old), shape_of(old)).name or ""
        outs.append(_named_output(em, new, old, name, {id(v) for v in outs}))
    em.commit(outs)
    scalar_inputs = [v for v in (lr, step, apply) if v is not None]
    params = [p for p, _ in param_pairs]
    states = [s for s, _ in state_pairs]
    moved = {id(v) for v in [*params, *states, *scalar_inputs, *new_inputs]}
    data = [v for v in graph.inputs if id(v) not in moved] + [v for v in new_inputs if v is not seed]
    ordered = [*data, *params, *states, *scalar_inputs, *([seed] if seed is not None else [])]
    graph.inputs.clear()
    graph.inputs.extend(ordered)
    graph.outputs.extend(outs)
    ir.passes.common.RemoveUnusedNodesPass()(m)
    by_old = {id(old): out for (old, _), out in zip([*param_pairs, *state_pairs], outs, strict=True)}
    result = TrainStep(
        model=onnx.ModelProto(), loss=loss_v.name or "", lr=lr.name or "", step=None if step is None else step.name,
        data=[v.name or "" for v in data],
        params={p.name or "": (p.name or "", by_old[id(p)].name or "") for p in params},
        state={s.name or "": (s.name or "", by_old[id(s)].name or "") for s in states},
        initial={k: initial[k] for k in [*(p.name for p in params), *(s.name for s in states)] if k is not None},
        optimizer=opt, outputs=[v.name or "" for v in extra], seed=None if seed is None else seed.name,
        apply=None if apply is None else apply.name, clip_grad_norm=clip,
        buffers=[v.name or "" for s in stats for v in s[:2]], source=source,
    )
    meta = {**result.layout(), "optimizer": opt.config(), "clip_grad_norm": clip}
    m.metadata_props[METADATA_KEY] = json.dumps(meta, sort_keys=True)
    proto = ir.serde.serialize_model(m)
    onnx.checker.check_model(proto, full_check=True)
    result.model = proto
    return result


def dtype_of(v: ir.Value) -> ir.DataType:
    assert v.dtype is not None, v.name
    return v.dtype


def shape_of(v: ir.Value) -> list[int]:
    dims = [] if v.shape is None else list(v.shape)
    if not all(isinstance(d, int) for d in dims):
        raise ValueError(f"the shape of {v.name!r} is not static ({v.shape}): params and state need static shapes")
    return [int(d) for d in dims]  # type: ignore[arg-type]


def _named_output(em: Emitter, v: ir.Value, like: ir.Value, name: str, taken: set[int]) -> ir.Value:
    """``v`` as a graph output named ``name``, typed like ``like`` (through an Identity when it is some other
    value already: a graph input, another output, a constant, a value of the graph before)."""
    node = v.producer()
    if id(v) in taken or v.is_graph_input() or v.is_graph_output() or node is None or node.graph is not None \
            or node.op_type == "Constant":
        v = em.Identity(v)
    v.name = name
    v.dtype, v.shape = like.dtype, like.shape
    return v


def _load(model: onnx.ModelProto | ir.Model | str | os.PathLike[str]) -> ir.Model:
    """A private onnx_ir copy of ``model``, checked and brought to opset 7 or later."""
    if isinstance(model, ir.Model):
        proto = ir.serde.serialize_model(model)
    elif isinstance(model, onnx.ModelProto):
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
    elif isinstance(model, str | os.PathLike):
        proto = load_model(model)
    else:
        raise TypeError(f"make_train_step() takes a path, an onnx.ModelProto or an onnx_ir.Model, "
                        f"got {type(model).__module__}.{type(model).__name__}")
    check_names(proto.graph)
    return ir.serde.deserialize_model(upgrade(proto))


def _find(table: dict[str, ir.Value], name: str, role: str) -> ir.Value:
    import difflib

    if name not in table:
        close = difflib.get_close_matches(name, list(table), n=3)
        hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
        raise ValueError(f"{role}: no value named {name!r} in the graph{hint}")
    return table[name]


# ---------------------------------------------------------------------------------------------- the loss
def _loss(em: Emitter, graph: ir.Graph, table: dict[str, ir.Value], spec: str, new_inputs: list[ir.Value]
          ) -> ir.Value:
    """The loss value: the one named, or a new one appended as ``cross_entropy:LOGITS:LABELS`` / ``mse:PRED:TARGET``
    asks (new graph inputs for LABELS / TARGET go to ``new_inputs``)."""
    kind, sep, rest = spec.partition(":")
    if not sep or kind not in LOSSES:
        return _find(table, spec, "loss")
    parts = rest.split(":")
    if len(parts) != 2 or not all(parts):
        raise ValueError(f"loss: expected {LOSSES[kind]}, got {spec!r}")
    pred = _find(table, parts[0], "loss")
    if pred.dtype is not None and pred.dtype not in FLOAT_TYPES:
        raise ValueError(f"loss: {pred.name!r} is {pred.dtype.name}; the loss needs float predictions")
    rank = rank_of(pred)
    if kind == "cross_entropy":
        if rank is not None and rank < 2:
            raise ValueError(f"loss: cross_entropy needs logits of shape [batch, classes, ...]; {pred.name!r} "
                             f"has shape {pred.shape}")
        dims = None if pred.shape is None else _dims([pred.shape[0], *list(pred.shape)[2:]])
        target = _target(table, parts[1], ir.DataType.INT64, dims, new_inputs)
        if target.dtype not in (ir.DataType.INT64, ir.DataType.INT32):
            raise ValueError(f"loss: the labels {target.name!r} are {target.dtype.name if target.dtype else '?'}; "
                             "cross_entropy takes integer class indices (int64)")
        out = em.SoftmaxCrossEntropyLoss(pred, target, reduction="mean")
    else:
        target = _target(table, parts[1], dtype_of(pred), None if pred.shape is None else _dims(list(pred.shape)),
                         new_inputs)
        if target.dtype != pred.dtype:
            raise ValueError(f"loss: the target {target.name!r} is {target.dtype.name if target.dtype else '?'}, "
                             f"the prediction {pred.name!r} is {dtype_of(pred).name}")
        err = em.Sub(pred, target)
        out = em.reduce("ReduceMean", em.Mul(err, err), None, keepdims=False)
    out.name = _unused(table, "loss")
    out.dtype, out.shape = pred.dtype, ir.Shape([])
    return out


def _dims(dims: list[Any]) -> list[int | str | None]:
    """Dimensions as onnx_ir.Shape takes them: ints, symbol names, or None."""
    return [d if isinstance(d, int) else getattr(d, "value", None) for d in dims]


def _target(table: dict[str, ir.Value], name: str, dtype: ir.DataType, dims: list[Any] | None,
            new_inputs: list[ir.Value]) -> ir.Value:
    """The value named ``name``, or a new graph input of that name."""
    if name in table:
        return table[name]
    v = ir.Value(name=name, type=ir.TensorType(dtype), shape=None if dims is None else ir.Shape(dims))
    new_inputs.append(v)
    table[name] = v
    return v


def _unused(table: Collection[str | None], base: str) -> str:
    name, k = base, 0
    while name in table:
        k += 1
        name = f"{base}_{k}"
    return name


def _check_loss(loss: ir.Value) -> None:
    """The loss must be one float number."""
    if loss.dtype is not None and loss.dtype not in FLOAT_TYPES:
        raise ValueError(f"the loss {loss.name!r} is {loss.dtype.name}; a loss must be a float scalar")
    if loss.shape is not None and not all(d == 1 for d in loss.shape):
        dims = "[" + ", ".join(str(d) for d in loss.shape) + "]"
        raise ValueError(f"the loss {loss.name!r} has shape {dims}; a loss must be a scalar: reduce it to one "
                         f"number (ReduceMean), or append one with --loss mse:PRED:TARGET or "
                         f"cross_entropy:LOGITS:LABELS")


# ---------------------------------------------------------------------------------------------- the params
def _note_shared(trainable: Sequence[ir.Value], readers: dict[str, int]) -> None:
    """A note for each param that several nodes of the model read: its one gradient sums over them, so they train
    as one tied weight. Meant where the model ties them; not where an exporter merged parameters of equal value
    (PyTorch's does in eval mode: the layers nn.TransformerEncoder copies, every zero bias of a fresh model)."""
    for p in trainable:
        count = readers.get(p.name or "", 0)
        if count > 1:
            warnings.warn(GradientNote(
                f"params: {p.name!r} is read by {count} nodes, which train it as one tied weight; if they were "
                "separate parameters, which PyTorch's exporters merge when their values are equal, export with "
                "training=torch.onnx.TrainingMode.TRAINING (dynamo=False) or optimize=False (dynamo=True) to keep "
                "them apart"), stacklevel=3)


# PyTorch's dynamo exporter records on each tensor it lifted into an initializer what torch.export made of it
# (PARAMETER, BUFFER, CONSTANT_TENSOR), and onnxscript's optimizer, which it runs by default, records on each
# initializer it computed which tensors it folded in (a transposed weight, BatchNorm folded into a conv, a table)
_TORCH_KIND = "pkg.torch.export.graph_signature.InputSpec.kind"
_FOLDED_FROM = "pkg.onnxscript.optimizer.folded_from"


def _not_params(graph: ir.Graph) -> dict[str, str]:
    """The initializers that PyTorch's dynamo exporter marks as a buffer or a constant of the module (not a
    parameter), with that kind."""
    out = {}
    for name, v in graph.initializers.items():
        kind = v.metadata_props.get(_TORCH_KIND)
        if kind is not None and kind != "PARAMETER":
            out[name] = kind
    return out


def _note_folded(trainable: Sequence[ir.Value]) -> None:
    """One note where params are values onnxscript's optimizer folded from the module's tensors: each trains as a
    weight of its own (a transposed copy as the weight it copies, but also a folded table or constant)."""
    folded = [p for p in trainable if _FOLDED_FROM in p.metadata_props]
    if folded:
        shown = ", ".join(f"{p.name!r} from {p.metadata_props[_FOLDED_FROM]}" for p in folded[:3])
        more = f" and {len(folded) - 3} more" if len(folded) > 3 else ""
        warnings.warn(GradientNote(
            f"params: {len(folded)} weights are values that the exporter's optimizer folded from the module's "
            f"tensors ({shown}{more}); each trains as a weight of its own; to train the module's parameters as "
            "they are, export with torch.onnx.export(..., dynamo=True, optimize=False)"), stacklevel=3)


def _params(m: ir.Model, params: str | Sequence[str] | None, frozen: Sequence[str], running: set[str | None]
            ) -> list[ir.Value]:
    """The initializers to train, checked: float weights, not BatchNorm statistics in training mode."""
    graph = m.graph
    asked = ["@weights"] if params is None else [params] if isinstance(params, str) else list(params)
    names = expand_xs(m, asked)
    if "@weights" in asked:
        names = [n for n in names if n not in running]
        others = _not_params(graph)
        left = [n for n in names if n in others]
        if left:
            warnings.warn(GradientNote(
                "params: @weights leaves out what PyTorch's exporter marks as no parameter of the module: "
                + ", ".join(f"{n!r} ({others[n].lower().replace('_', ' ')})" for n in left)
                + "; name them in params to train them"), stacklevel=3)
            names = [n for n in names if n not in others]
    table = value_table(graph)
    for name in frozen:
        if name not in graph.initializers:
            _find(table, name, "frozen")
            raise ValueError(f"frozen: {name!r} is not a weight (an initializer)")
    out = []
    for name in names:
        if name in frozen:
            continue
        v = _find(table, name, "params")
        if name in running:
            raise ValueError(f"params: {name!r} is a BatchNormalization running statistic, not a param: in "
                             "training mode it is state that each batch updates, in eval mode a constant")
        if not v.is_initializer():
            raise ValueError(f"params: {name!r} is not a weight (an initializer); only weights can be trained")
        dtype = v.dtype or (v.const_value.dtype if v.const_value is not None else None)
        if dtype not in FLOAT_TYPES:
            raise ValueError(f"params: {name!r} is {dtype.name if dtype else 'of unknown type'}; only float weights "
                             "(float16, bfloat16, float32, float64) can be trained")
        out.append(v)
    if not out:
        raise ValueError("params: nothing to train (every param is frozen)")
    return out


def _to_input(graph: ir.Graph, v: ir.Value) -> np.ndarray:
    """Turn the initializer ``v`` into a graph input; returns its value."""
    tensor = v.const_value
    assert tensor is not None and v.name is not None
    array = np.array(tensor.numpy(), copy=True)
    v.dtype, v.shape = tensor.dtype, ir.Shape(list(array.shape))
    graph.initializers.pop(v.name)
    v.const_value = None
    graph.inputs.append(v)
    return array


def _to_initializer(graph: ir.Graph, v: ir.Value, array: np.ndarray) -> None:
    """Undo ``_to_input``."""
    graph.inputs.remove(v)
    v.const_value = ir.tensor(array, dtype=v.dtype)
    graph.register_initializer(v)


# ----------------------------------------------------------------------------------- training-mode forward
_REPLACED = "_onnxgrad_replaced"  # node metadata: its outputs now come from elsewhere; the node goes at commit


def _replace(graph: ir.Graph, node: ir.Node, news: Sequence[ir.Value | None], kept: list[ir.Value]) -> None:
    """Make ``news[i]`` stand for ``node.outputs[i]`` everywhere, under the same name (kept in ``kept``); the node
    is marked for removal."""
    for out, new in zip(node.outputs, news, strict=False):
        if new is None:
            if out.uses() or out.is_graph_output():
                raise ValueError(f"{node.op_type} node '{node.name}': its output {out.name!r} is used, and its "
                                 "training-mode form does not compute it")
            continue
        name = out.name
        out.replace_all_uses_with(new, replace_graph_outputs=True)
        out.name = f"{name}/eval"
        new.name = name
        new.dtype, new.shape = out.dtype or new.dtype, out.shape or new.shape
        kept.append(new)
    node.meta[_REPLACED] = True


def _drop_replaced(graph: ir.Graph) -> None:
    """Remove the nodes ``_replace`` marked."""
    for node in [n for n in graph if n.meta.get(_REPLACED)]:
        for i in range(len(node.inputs)):
            node.replace_input_with(i, None)
        graph.remove(node, safe=True)


def _batchnorms(em: Emitter, graph: ir.Graph, kept: list[ir.Value]
                ) -> list[tuple[ir.Value, ir.Value, ir.Value, ir.Value]]:
    """Every BatchNormalization in PyTorch's training mode: y = (x - mean) / sqrt(var + eps) scale + bias with the
    batch's mean and (biased) variance; running = m running + (1 - m) batch statistic, with the UNBIASED batch
    variance, m being ONNX's momentum (PyTorch's is 1 - m). Returns (mean, var, new mean, new var) per node.

    The normalization itself is a private ``BatchNormTrain`` node while the loss is differentiated, so that its
    gradient is the closed form of ``_batchnorm_train_grad`` (not the chain rule through the statistics), and then
    a BatchNormalization in inference mode fed the batch statistics (``_lower_batchnorms``). After a Conv that
    only it reads, the node is ``ConvBatchNormTrain``, differentiated together with the Conv
    (``_conv_batchnorm_train_grad``)."""
    found = []
    seen: set[str | None] = set()
    for node in [n for n in graph if n.op_type == "BatchNormalization" and n.domain in ("", "ai.onnx")]:
        x, scale, bias, mean, var = node.inputs[:5]
        label = f"BatchNormalization node '{node.name}'"
        assert x is not None and scale is not None and bias is not None and mean is not None and var is not None
        if not (mean.is_initializer() and var.is_initializer()):
            raise ValueError(f"{label}: its running mean and variance must be initializers to become state")
        if mean.name in seen or var.name in seen:
            raise ValueError(f"{label}: its running statistics are shared with another BatchNormalization")
        seen |= {mean.name, var.name}
        if attr(node, "spatial", 1) != 1:
            raise ValueError(f"{label}: spatial=0 is not supported in training mode")
        r = rank_of(x)
        if r is None or r < 2:
            raise ValueError(f"{label}: the rank of its input {x.name!r} is unknown; training mode needs it")
        eps, mom = float(attr(node, "epsilon", 1e-5)), float(attr(node, "momentum", 0.9))
        conv = _conv_to_fold(node, x)
        count = em.Div(em.Cast(em.Size(x), to=int(dtype_of(var))), em.Cast(em.Size(scale), to=int(dtype_of(var))))
        axes = [0, *range(2, r)]
        batch_mean = em.reduce("ReduceMean", x, axes, keepdims=True)
        d = em.Sub(x, batch_mean)
        squares = em.reduce_sum(em.Mul(d, d), axes, keepdims=True)  # ReduceSumSquare sums less accurately
        n = _like(em, count, x)
        flat = em.ints([-1])
        mean_c, var_c = em.Reshape(batch_mean, flat), em.Reshape(em.Div(squares, n), flat)
        if conv is None:
            y = em.op(_BN_TRAIN, x, scale, bias, mean_c, var_c, d, n, _domain=_PRIVATE, epsilon=eps)
        else:
            y = em.op(_CONV_BN_TRAIN, conv.inputs[0], conv.inputs[1], scale, bias, mean_c, var_c, d, n, x,
                      _domain=_PRIVATE, epsilon=eps)
        y.dtype, y.shape = x.dtype, x.shape
        unbiased = em.Div(squares, em.Sub(n, em.const(1.0, like=x)))
        new_mean = em.Add(em.Mul(mean, em.const(mom, like=mean)),
                          em.Mul(_like(em, mean_c, mean), em.const(1.0 - mom, like=mean)))
        new_var = em.Add(em.Mul(var, em.const(mom, like=var)),
                         em.Mul(_like(em, em.Reshape(unbiased, flat), var), em.const(1.0 - mom, like=var)))
        _replace(graph, node, [y], kept)
        found.append((mean, var, new_mean, new_var))
    return found


def _untie_running_statistics(graph: ir.Graph) -> None:
    """Give each BatchNormalization's running mean and variance an initializer of its own where the exporter tied
    it to another tensor of equal value: PyTorch's exporter writes a fresh model's running mean (zeros) and
    variance (ones) as Identities of the bias and scale, or one initializer for several BatchNorms. Tied, the
    statistics would train with the param (or be state twice); a note says where."""
    names = {v.name for n in graph for v in n.outputs} | set(graph.initializers) | {v.name for v in graph.inputs}
    for node, index, what, v, source in running_statistics(graph):
        if not source.is_initializer() or source.const_value is None:
            continue
        if v is source and len(v.uses()) == 1 and not v.is_graph_output():
            continue  # its own already
        name = v.name or f"{node.name}_running_{what}"
        if v is not source:
            v.name = f"{name}/tied"  # the Identity's value keeps on under another name
        else:
            name = _unused(names, name)
        names.add(name)
        array = np.array(source.const_value.numpy(), copy=True)
        own = ir.Value(name=name, type=ir.TensorType(source.dtype or ir.DataType.FLOAT),
                       shape=ir.Shape(array.shape), const_value=ir.tensor(array, name=name))
        graph.register_initializer(own)
        node.replace_input_with(index, own)
        warnings.warn(GradientNote(
            f"BatchNormalization node '{node.name}': its running {what} was tied to {source.name!r} (the "
            f"exporter merges tensors of equal value): it gets its own copy, {name!r}"), stacklevel=4)
        while v is not source and not v.uses() and not v.is_graph_output():  # the Identities left unread
            producer = v.producer()
            assert producer is not None
            v = producer.inputs[0]  # type: ignore[assignment]
            graph.remove(producer, safe=True)


def _like(em: Emitter, v: ir.Value, like: ir.Value) -> ir.Value:
    return v if v.dtype == like.dtype else em.Cast(v, to=int(dtype_of(like)))


_PRIVATE = "onnxgrad.train"  # a domain that lives only inside make_train_step: no model ever leaves with it
_BN_TRAIN = "BatchNormTrain"  # (x, scale, bias, batch mean, batch var, x - mean, count) -> y, attribute epsilon
_CONV_BN_TRAIN = "ConvBatchNormTrain"  # (x, W, scale, bias, mean, var, z - mean, count, z = Conv(x, W)) -> y


def _batchnorm_train_grad(em: Emitter, node: ir.Node, dy: Sequence[ir.Value | None]) -> list[ir.Value | None]:
    """dx = k dy - k sum(dy)/n - d k inv^2 sum(dy d)/n, k = scale inv; dscale = inv sum(dy d); dbias = sum(dy)."""
    # y = d inv scale + bias with the batch's statistics: d = x - mean(x), inv = 1/sqrt(var(d) + eps), n per channel
    x, scale, bias, _, var, d, n = node.inputs
    g = dy[0]
    assert x is not None and scale is not None and bias is not None and var is not None and d is not None
    assert n is not None
    if g is None:
        return [None, None, None]
    r = rank_of(x)
    assert r is not None
    axes = [0, *range(2, r)]

    def view(v: ir.Value) -> ir.Value:
        return em.unsqueeze(v, list(range(1, r - 1)))

    inv, sum_dy, d_scale = _batch_sums(em, node, g, var, d, axes)
    k_n = em.Div(em.Mul(_like(em, scale, x), inv), n)
    c1 = em.Neg(em.Mul(em.Mul(k_n, inv), d_scale))
    c2 = em.Neg(em.Mul(k_n, sum_dy))
    dx = em.Add(em.Mul(g, view(em.Mul(k_n, n))), _channel_affine(em, d, c1, c2, scale))
    return [dx, _like(em, d_scale, scale), _like(em, sum_dy, bias)]


def _channel_affine(em: Emitter, d: ir.Value, a: ir.Value, b: ir.Value, scale: ir.Value) -> ir.Value:
    """d a + b per channel (a, b like scale) in one pass: BatchNormalization in inference mode with mean 0,
    variance 1 and epsilon 0 is exactly (d - 0) / sqrt(1) a + b (16% faster than a Mul and an Add over d)."""
    zeros, ones = (em.full_like(scale, fill, dtype_of(a)) for fill in (0.0, 1.0))
    return em.BatchNormalization(d, a, b, zeros, ones, epsilon=0.0)


def _batch_sums(em: Emitter, node: ir.Node, g: ir.Value, var: ir.Value, d: ir.Value, axes: list[int]
                ) -> tuple[ir.Value, ir.Value, ir.Value]:
    """inv = 1/sqrt(var + eps), sum(dy) and dscale = inv sum(dy d), per channel."""
    inv = em.Reciprocal(em.Sqrt(em.Add(var, em.const(float(attr(node, "epsilon", 1e-5)), like=var))))
    sum_dy = em.reduce_sum(g, axes, keepdims=False)
    return inv, sum_dy, em.Mul(em.reduce_sum(em.Mul(g, d), axes, keepdims=False), inv)


def _conv_to_fold(bn: ir.Node, z: ir.Value) -> ir.Node | None:
    """The Conv (no bias) whose output z only ``bn`` reads, where the per-channel factor of the BatchNorm gradient
    is better moved onto W and dW than applied to dz (``plans.conv_fusions.kernel_fold``); else None."""
    conv = z.producer()
    if conv is None or conv.op_type != "Conv" or conv.domain not in ("", "ai.onnx") or len(conv.inputs) < 2:
        return None
    if (len(conv.inputs) > 2 and conv.inputs[2] is not None) or conv.inputs[1] is None:
        return None
    if z.is_graph_output() or [u for u in z.uses() if u.node.graph is not None] != [(bn, 0)]:
        return None
    return conv if kernel_fold(conv) is None else None


def _conv_batchnorm_train_grad(em: Emitter, node: ir.Node, dy: Sequence[ir.Value | None]
                               ) -> list[ir.Value | None]:
    """z = Conv(x, W), y the training BatchNorm of z: dz = k u, u = dy - sum(dy)/n - d inv^2 sum(dy d)/n,
    k = scale inv, with k moved onto W and dW (dX = dX_conv(u, W k), dW = dW_conv(x, u) k): u is never scaled;
    dscale = inv sum(dy d); dbias = sum(dy)."""
    x, w, scale, bias, _, var, d, n, z = node.inputs
    g = dy[0]
    assert x is not None and w is not None and scale is not None and bias is not None and var is not None
    assert d is not None and n is not None and z is not None
    if g is None:
        return [None, None, None, None]
    conv = z.producer()
    r = rank_of(z)
    assert conv is not None and r is not None
    inv, sum_dy, d_scale = _batch_sums(em, node, g, var, d, [0, *range(2, r)])
    a = em.Neg(em.Div(em.Mul(inv, d_scale), n))
    b = em.Neg(em.Div(sum_dy, n))
    u = em.Add(g, _channel_affine(em, d, a, b, scale))  # u = dy + d a + b
    u.dtype, u.shape = z.dtype, z.shape
    win, group = conv_window(conv, x, w, em), attr(conv, "group", 1)
    k = em.Reshape(_like(em, em.Mul(_like(em, scale, z), inv), w), em.ints([-1, *[1] * (win.rank + 1)]))
    kernel = em.Mul(w, k)
    kernel.shape = w.shape
    dx = plans.conv_input_grad(em, u, kernel, win, group)
    dw = em.Mul(plans.conv_weight_grad(em, padded(em, x, win), u, win, group, w), k)
    return [dx, dw, _like(em, d_scale, scale), _like(em, sum_dy, bias)]


_BN_TRAIN_RULE = Rule(_BN_TRAIN, _PRIVATE, 1, _batchnorm_train_grad, wrt=3,
                      notes="make_train_step's BatchNorm in training mode, while it differentiates")


_CONV_BN_TRAIN_RULE = Rule(_CONV_BN_TRAIN, _PRIVATE, 1, _conv_batchnorm_train_grad, wrt=4,
                           notes="make_train_step's Conv and BatchNorm in training mode, while it differentiates")


@register_fallback
def _private_rules(domain: str, op_type: str, opset: int) -> Rule | None:
    """The rules of the private BatchNormTrain and ConvBatchNormTrain nodes (no registered rule: ``onnxgrad ops``
    never lists them)."""
    if domain != _PRIVATE:
        return None
    return {_BN_TRAIN: _BN_TRAIN_RULE, _CONV_BN_TRAIN: _CONV_BN_TRAIN_RULE}.get(op_type)


def _lower_batchnorms(m: ir.Model) -> None:
    """Replace every private BatchNormTrain node by BatchNormalization in inference mode fed the batch mean and
    (biased) variance: y = (x - mean) / sqrt(var + eps) scale + bias, as PyTorch computes it (x alpha + beta)."""
    graph = m.graph
    nodes = [n for n in graph if n.domain == _PRIVATE]
    if not nodes:
        return
    em = Emitter(graph, opset_of(m.opset_imports), unique_scope(graph, "train_bn"), m.ir_version or 8)
    news = []
    for node in nodes:
        if node.op_type == _CONV_BN_TRAIN:
            x, (scale, bias, mean, var) = node.inputs[8], node.inputs[2:6]
        else:
            x, scale, bias, mean, var = node.inputs[:5]
        y = em.BatchNormalization(x, scale, bias, mean, var, epsilon=float(attr(node, "epsilon", 1e-5)))
        old = node.outputs[0]
        name = old.name
        y.dtype, y.shape = old.dtype, old.shape
        old.replace_all_uses_with(y, replace_graph_outputs=True)
        old.name = f"{name}/private"
        y.name = name
        news.append(y)
        for i in range(len(node.inputs)):
            node.replace_input_with(i, None)
        graph.remove(node, safe=True)
    em.commit(news)
    ir.passes.common.TopologicalSortPass()(m)


def _share_max_pools(m: ir.Model) -> None:
    """A MaxPool of the forward whose gradient recomputed it for its Indices gives way to that twin: one pool
    computes Y and the Indices (onnxruntime ran the forward one in its blocked layout, with two reorders)."""
    graph = m.graph
    shared = False
    for node in [n for n in graph if n.op_type == "MaxPool" and n.domain in ("", "ai.onnx")]:
        x = node.inputs[0]
        if node.meta.get(_REPLACED) or x is None or (len(node.outputs) > 1 and node.outputs[1].uses()):
            continue
        twins = [u for u, _ in x.uses() if u is not node and u.op_type == "MaxPool" and u.domain == node.domain
                 and len(u.outputs) > 1 and _same_attributes(u, node)]
        if not twins:
            continue
        y = node.outputs[0]
        name, twin_y = y.name, twins[0].outputs[0]
        if twin_y.is_graph_output():
            continue
        y.replace_all_uses_with(twin_y, replace_graph_outputs=True)
        y.name, twin_y.name = f"{name}/shared", name
        twin_y.dtype, twin_y.shape = y.dtype or twin_y.dtype, y.shape or twin_y.shape
        node.meta[_REPLACED] = True
        shared = True
    if shared:
        _drop_replaced(graph)
        ir.passes.common.TopologicalSortPass()(m)


def _same_attributes(a: ir.Node, b: ir.Node) -> bool:
    """Whether two MaxPools have the same attributes (ceil_mode, storage_order and auto_pad left out or given as
    their defaults alike; any other one given in only one of them differs)."""
    defaults = {"ceil_mode": 0, "storage_order": 0, "auto_pad": "NOTSET"}
    names = set(a.attributes) | set(b.attributes)
    return all(attr(a, k, defaults.get(k)) == attr(b, k, defaults.get(k)) for k in names)


def _dropouts(em: Emitter, graph: ir.Graph, opset: int, train: bool, kept: list[ir.Value]) -> ir.Value | None:
    """Every Dropout in training mode (``train``): y = x mask / (1 - ratio), mask = (u >= ratio) with u uniform in
    [0, 1) from a hash of the element's index and a new int64 ``seed`` input (returned); else as identities."""
    nodes = [n for n in graph if n.op_type == "Dropout" and n.domain in ("", "ai.onnx")]
    if not nodes:
        return None
    if not train:
        for node in nodes:
            x = node.inputs[0]
            assert x is not None
            keep = None
            if len(node.outputs) > 1:
                keep = em.ConstantOfShape(em.shape_of(x), value=ir.tensor(np.ones(1, np.bool_)))
                keep.dtype = ir.DataType.BOOL
            _replace(graph, node, [em.Identity(x), keep], kept)
        return None
    if opset < 11:
        raise ValueError(f"Dropout in training mode needs opset 11 or newer (Range), the model has opset {opset}; "
                         "convert it (onnx.version_converter) or pass dropout='eval'")
    table = value_table(graph)
    seed = ir.Value(name=_unused(table, "seed"), type=ir.TensorType(ir.DataType.INT64), shape=ir.Shape([]))
    for salt, node in enumerate(nodes):
        x = node.inputs[0]
        assert x is not None
        if opset >= 12:
            ratio = node.inputs[1] if len(node.inputs) > 1 and node.inputs[1] is not None else None
            r = em.const(0.5, like=x) if ratio is None else _like(em, ratio, x)
        else:
            r = em.const(float(attr(node, "ratio", 0.5)), like=x)
        keep = em.Not(em.Less(_uniform(em, x, seed, salt), r))
        scale = em.Div(em.const(1.0, like=x), em.Sub(em.const(1.0, like=x), r))
        y = em.Mul(x, em.Mul(em.Cast(keep, to=int(dtype_of(x))), scale))
        _replace(graph, node, [y, keep], kept)
    return seed


def _uniform(em: Emitter, x: ir.Value, seed: ir.Value, salt: int) -> ir.Value:
    """Numbers in [0, 1), one per element of x, from a hash of (element index, seed, salt) modulo 2^31 - 1:
    multiply-add and squaring rounds, every product below 2^62 (int64 never overflows)."""
    i64 = ir.DataType.INT64

    def k(value: int) -> ir.Value:
        return em.const(np.int64(value), dtype=i64)

    def mod(v: ir.Value) -> ir.Value:
        return em.Mod(v, k(_PRIME))

    n = em.Size(x)
    index = em.Reshape(em.Range(k(0), n, k(1)), em.shape_of(x))
    s = mod(seed)
    h = mod(em.Add(index, k((salt * 2654435761) % _PRIME)))
    h = mod(em.Add(em.Mul(h, k(48271)), s))
    h = mod(em.Add(em.Mul(h, h), k(1013904223)))
    h = mod(em.Add(em.Mul(h, k(69621)), s))
    h = mod(em.Add(em.Mul(h, h), k(12345)))
    h = mod(em.Mul(h, k(16807)))
    u = em.Div(em.Cast(h, to=int(ir.DataType.DOUBLE)), em.const(float(_PRIME), dtype=ir.DataType.DOUBLE))
    return em.Cast(u, to=int(dtype_of(x)))
