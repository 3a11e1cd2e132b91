"""Optimizers as standard ONNX ops, with ``torch.optim``'s semantics, and the lowering of ONNX's own
``ai.onnx.preview.training`` optimizer ops (Adam, Momentum, Adagrad), which no runtime runs, to the same ops.

An optimizer here is a small frozen dataclass holding its hyperparameters. ``update`` emits, for one param, the
ops that take the param, its gradient and its state slots to their new values, through an ``Emitter``; the
learning rate and the step number are graph values (``lr``: a float scalar, ``step``: an int64 scalar counting
updates from 1), so any schedule works. Scalar arithmetic on ``lr`` and ``step`` (bias corrections, learning-rate
decay) runs in float64, as torch.optim does it in Python floats, and is cast to the param's dtype once.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, ClassVar

import onnx.defs
import onnx_ir as ir

from onnxgrad.emitter import Emitter
from onnxgrad.registry import opset_of
from onnxgrad.values import unique_scope

TRAINING_DOMAIN = "ai.onnx.preview.training"
F64 = ir.DataType.DOUBLE
DEFAULT_OPSET = 17  # the ai.onnx opset a lowered model gets when it imported none


class Scalars:
    """The step's scalar inputs as float64 values, shared by every param's update."""

    def __init__(self, em: Emitter, lr: ir.Value, step: ir.Value | None) -> None:
        self.em = em
        self.lr = em.Cast(lr, to=int(F64))
        self._step = step
        self._step64: ir.Value | None = None

    @property
    def step(self) -> ir.Value:
        """The 1-based update count, as float64."""
        if self._step is None:
            raise ValueError("this optimizer needs the step number, but the train step has no step input")
        if self._step64 is None:
            self._step64 = self.em.Cast(self._step, to=int(F64))
        return self._step64

    def d(self, value: float) -> ir.Value:
        """A float64 constant."""
        return self.em.const(value, dtype=F64)

    def to(self, v64: ir.Value, like: ir.Value) -> ir.Value:
        """A float64 scalar cast to ``like``'s dtype."""
        assert like.dtype is not None
        return self.em.Cast(v64, to=int(like.dtype))


@dataclass(frozen=True)
class Optimizer:
    """Hyperparameters of one optimizer; subclasses emit its update."""

    name: ClassVar[str] = ""
    lr: float = 1e-3

    def slots(self) -> list[tuple[str, float]]:
        """The state tensors each param gets (torch.optim's names) and the value they start at."""
        return []

    def needs_step(self) -> bool:
        """True when the update reads the step number."""
        return False

    def update(self, s: Scalars, p: ir.Value, g: ir.Value, state: dict[str, ir.Value],
               scale: ir.Value | None = None) -> tuple[ir.Value, dict[str, ir.Value]]:
        """The new param and the new state slots. ``scale``: a float scalar the gradient is multiplied by first
        (the clipping coefficient of ``clip_coefficient``), or None."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """The optimizer as JSON-able data (``from_config`` reads it back)."""
        return {"name": self.name, **asdict(self)}

    def _check(self) -> None:
        for key, value in asdict(self).items():
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{self.name}: {key} must be a finite number, got {value}")
        if self.lr < 0:
            raise ValueError(f"{self.name}: invalid learning rate {self.lr} (it must be >= 0)")
        if getattr(self, "weight_decay", 0.0) < 0:
            raise ValueError(f"{self.name}: invalid weight_decay {getattr(self, 'weight_decay', 0.0)} (>= 0)")


def _scaled(s: Scalars, g: ir.Value, scale: ir.Value | None) -> ir.Value:
    """g * scale (the clipped gradient), or g."""
    if scale is None:
        return g
    return s.em.Mul(g, scale if scale.dtype == g.dtype else s.em.Cast(scale, to=int(g.dtype or ir.DataType.FLOAT)))


def _decayed(s: Scalars, p: ir.Value, g: ir.Value, weight_decay: float) -> ir.Value:
    """g + weight_decay * p (L2 regularization added to the gradient)."""
    em = s.em
    return g if not weight_decay else em.Add(g, em.Mul(p, em.const(weight_decay, like=p)))


@dataclass(frozen=True)
class SGD(Optimizer):
    """torch.optim.SGD: buf = momentum buf + (1 - dampening) g (buf = g at step 1); p -= lr (g + momentum buf
    with nesterov, else buf); g includes weight_decay p."""

    name: ClassVar[str] = "sgd"
    momentum: float = 0.0
    dampening: float = 0.0
    nesterov: bool = False
    weight_decay: float = 0.0

    def __post_init__(self) -> None:
        self._check()
        if self.momentum < 0:
            raise ValueError(f"sgd: invalid momentum {self.momentum} (it must be >= 0)")
        if self.nesterov and (self.momentum <= 0 or self.dampening != 0):
            raise ValueError("sgd: nesterov momentum requires a momentum and zero dampening")

    def slots(self) -> list[tuple[str, float]]:
        return [("momentum_buffer", 0.0)] if self.momentum else []

    def needs_step(self) -> bool:
        return bool(self.momentum and self.dampening)

    def update(self, s: Scalars, p: ir.Value, g: ir.Value, state: dict[str, ir.Value],
               scale: ir.Value | None = None) -> tuple[ir.Value, dict[str, ir.Value]]:
        em = s.em
        g = _decayed(s, p, _scaled(s, g, scale), self.weight_decay)
        new: dict[str, ir.Value] = {}
        if self.momentum:
            buf = em.Add(em.Mul(state["momentum_buffer"], em.const(self.momentum, like=p)),
                         em.Mul(g, em.const(1.0 - self.dampening, like=p)))
            if self.dampening:  # torch starts the buffer at g itself, undamped; a zero buffer gives that otherwise
                buf = em.Where(em.Equal(s.step, s.d(1.0)), g, buf)
            new["momentum_buffer"] = buf
            g = em.Add(g, em.Mul(buf, em.const(self.momentum, like=p))) if self.nesterov else buf
        return em.Sub(p, em.Mul(g, s.to(s.lr, p))), new


@dataclass(frozen=True)
class Adam(Optimizer):
    """torch.optim.Adam: m = lerp(m, g, 1 - b1); v = b2 v + (1 - b2) g^2;
    p -= lr / (1 - b1^t) * m / (sqrt(v) / sqrt(1 - b2^t) + eps); g includes weight_decay p (L2).
    Emitted with the scalar factors folded first (float64): m b1 + g (1 - b1) (times the clipping scale c, as
    v's factor by c^2); p -= m / (sqrt(v) + eps sqrt(1 - b2^t)) (lr sqrt(1 - b2^t) / (1 - b1^t)): AdamW with
    clipping is 13 ops over each tensor, where scaling g first and dividing sqrt(v) by sqrt(1 - b2^t) made 15."""

    name: ClassVar[str] = "adam"
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    amsgrad: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "betas", tuple(float(b) for b in self.betas))
        self._check()
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"{self.name}: invalid betas {self.betas} (two numbers in [0, 1))")
        if self.eps < 0:
            raise ValueError(f"{self.name}: invalid eps {self.eps} (it must be >= 0)")

    def slots(self) -> list[tuple[str, float]]:
        extra = [("max_exp_avg_sq", 0.0)] if self.amsgrad else []
        return [("exp_avg", 0.0), ("exp_avg_sq", 0.0), *extra]

    def needs_step(self) -> bool:
        return True

    def _decoupled(self, s: Scalars, p: ir.Value) -> ir.Value:
        return p

    def _adds_l2(self) -> bool:
        return bool(self.weight_decay)

    def _gradient(self, s: Scalars, p: ir.Value, g: ir.Value) -> ir.Value:
        return _decayed(s, p, g, self.weight_decay)

    def update(self, s: Scalars, p: ir.Value, g: ir.Value, state: dict[str, ir.Value],
               scale: ir.Value | None = None) -> tuple[ir.Value, dict[str, ir.Value]]:
        em = s.em
        b1, b2 = self.betas
        # the clipping scale c goes into the scalar factors, m b1 + g (c (1 - b1)) and v b2 + g^2 (c^2 (1 - b2)),
        # unless an L2 term is added to the clipped gradient: one pass over the tensors fewer
        fold = scale is not None and not self._adds_l2()
        g = self._gradient(s, p, g if fold else _scaled(s, g, scale))
        p = self._decoupled(s, p)
        k1, k2 = s.d(1.0 - b1), s.d(1.0 - b2)
        if fold:
            assert scale is not None
            c = em.Cast(scale, to=int(F64))
            k1, k2 = em.Mul(k1, c), em.Mul(k2, em.Mul(c, c))
        m, v = state["exp_avg"], state["exp_avg_sq"]
        m = em.Add(em.Mul(m, em.const(b1, like=p)), em.Mul(g, s.to(k1, p)))
        # (g k2) g, as torch's addcmul orders it; g g first would be a Mul of one value by itself, which
        # onnxruntime's transpose optimizer answers by moving a Transpose that ends g (the dW of a Conv) past
        # it while g still needs the Transpose elsewhere: one Transpose of dW more per param (1.3 ms per CNN step)
        v = em.Add(em.Mul(v, em.const(b2, like=p)), em.Mul(em.Mul(g, s.to(k2, p)), g))
        new = {"exp_avg": m, "exp_avg_sq": v}
        if self.amsgrad:
            v = new["max_exp_avg_sq"] = em.Max(state["max_exp_avg_sq"], v)
        # m / (sqrt(v) / c2 + eps) lr / c1 as m / (sqrt(v) + eps c2) (lr c2 / c1): one pass fewer again
        bias1 = em.Sub(s.d(1.0), em.Pow(s.d(b1), s.step))
        bias2_sqrt = em.Sqrt(em.Sub(s.d(1.0), em.Pow(s.d(b2), s.step)))
        step_size = s.to(em.Div(em.Mul(s.lr, bias2_sqrt), bias1), p)
        denom = em.Add(em.Sqrt(v), s.to(em.Mul(bias2_sqrt, s.d(self.eps)), p))
        return em.Sub(p, em.Mul(em.Div(m, denom), step_size)), new


@dataclass(frozen=True)
class AdamW(Adam):
    """torch.optim.AdamW: Adam with decoupled weight decay, p *= 1 - lr weight_decay before the update."""

    name: ClassVar[str] = "adamw"
    weight_decay: float = 1e-2

    def _adds_l2(self) -> bool:
        return False

    def _gradient(self, s: Scalars, p: ir.Value, g: ir.Value) -> ir.Value:
        return g

    def _decoupled(self, s: Scalars, p: ir.Value) -> ir.Value:
        if not self.weight_decay:
            return p
        keep = s.em.Sub(s.d(1.0), s.em.Mul(s.lr, s.d(self.weight_decay)))
        return s.em.Mul(p, s.to(keep, p))


@dataclass(frozen=True)
class Adagrad(Optimizer):
    """torch.optim.Adagrad: sum += g^2; p -= lr / (1 + (t - 1) lr_decay) * g / (sqrt(sum) + eps);
    g includes weight_decay p."""

    name: ClassVar[str] = "adagrad"
    lr: float = 1e-2
    lr_decay: float = 0.0
    weight_decay: float = 0.0
    initial_accumulator_value: float = 0.0
    eps: float = 1e-10

    def __post_init__(self) -> None:
        self._check()
        if self.lr_decay < 0 or self.initial_accumulator_value < 0 or self.eps < 0:
            raise ValueError("adagrad: lr_decay, initial_accumulator_value and eps must be >= 0")

    def slots(self) -> list[tuple[str, float]]:
        return [("sum", self.initial_accumulator_value)]

    def needs_step(self) -> bool:
        return bool(self.lr_decay)

    def update(self, s: Scalars, p: ir.Value, g: ir.Value, state: dict[str, ir.Value],
               scale: ir.Value | None = None) -> tuple[ir.Value, dict[str, ir.Value]]:
        em = s.em
        g = _decayed(s, p, _scaled(s, g, scale), self.weight_decay)
        clr = s.lr
        if self.lr_decay:
            clr = em.Div(s.lr, em.Add(s.d(1.0), em.Mul(em.Sub(s.step, s.d(1.0)), s.d(self.lr_decay))))
        total = em.Add(state["sum"], em.Mul(g, g))
        std = em.Add(em.Sqrt(total), em.const(self.eps, like=p))
        return em.Sub(p, em.Mul(s.to(clr, p), em.Div(g, std))), {"sum": total}


OPTIMIZERS: dict[str, type[Optimizer]] = {c.name: c for c in (SGD, Adam, AdamW, Adagrad)}


def make_optimizer(optimizer: str | Optimizer, **hyper: Any) -> Optimizer:
    """An optimizer by name (``sgd``, ``adam``, ``adamw``, ``adagrad``) with torch.optim's keyword arguments,
    or the instance given (then no keywords)."""
    if isinstance(optimizer, Optimizer):
        if hyper:
            raise ValueError(f"hyperparameters {sorted(hyper)} given with an optimizer instance: set them on it")
        return optimizer
    cls = OPTIMIZERS.get(str(optimizer).lower())
    if cls is None:
        raise ValueError(f"unknown optimizer {optimizer!r}; choose one of {', '.join(OPTIMIZERS)}")
    known = set(cls.__dataclass_fields__)
    unknown = sorted(k for k, v in hyper.items() if k not in known and v is not None)
    if unknown:
        raise ValueError(f"{cls.name} takes no {', '.join(unknown)} (it takes {', '.join(sorted(known))})")
    return cls(**{k: v for k, v in hyper.items() if v is not None})


def from_config(config: dict[str, Any]) -> Optimizer:
    """The optimizer that ``Optimizer.config`` described."""
    config = dict(config)
    return make_optimizer(config.pop("name"), **config)


def clip_coefficient(em: Emitter, grads: Sequence[ir.Value], max_norm: float) -> ir.Value:
    """torch.nn.utils.clip_grad_norm_'s scale (float32): min(max_norm / (n + 1e-6), 1), n = ||(||g_1||, ...)||."""
    if max_norm <= 0 or not math.isfinite(max_norm):
        raise ValueError(f"clip_grad_norm must be a positive number, got {max_norm}")
    f32 = int(ir.DataType.FLOAT)
    norms = [em.Cast(em.reduce("ReduceL2", g, None, keepdims=False), to=f32) for g in grads]
    total = em.reduce("ReduceL2", em.Concat(*[em.unsqueeze(n, [0]) for n in norms], axis=0), None, keepdims=False)
    f = ir.DataType.FLOAT
    return em.Min(em.Div(em.const(max_norm, dtype=f), em.Add(total, em.const(1e-6, dtype=f))), em.const(1.0, dtype=f))


# ------------------------------------------------------------------ lowering ai.onnx.preview.training ops
def _attrs(node: ir.Node) -> dict[str, Any]:
    """The node's attributes, with the schema's defaults for those it leaves out."""
    schema = onnx.defs.get_schema(node.op_type, 1, TRAINING_DOMAIN)
    out: dict[str, Any] = {}
    for name, a in schema.attributes.items():
        if name in node.attributes:
            out[name] = node.attributes[name].value
        elif a.default_value is not None and a.default_value.type:
            out[name] = onnx.helper.get_attribute_value(a.default_value)
        else:
            raise ValueError(f"{node.op_type} node '{node.name}': attribute {name!r} is required")
    return out


def _groups(node: ir.Node, k: int) -> tuple[ir.Value, ir.Value, list[list[ir.Value]]]:
    """R, T and the k groups of n tensors (X..., G..., then the state tensors) of an optimizer node."""
    ins = list(node.inputs)
    if len(ins) < 2 or (len(ins) - 2) % k or any(v is None for v in ins):
        raise ValueError(f"{node.op_type} node '{node.name}': expected R, T and {k} groups of tensors, "
                         f"got {len(ins)} inputs")
    n = (len(ins) - 2) // k
    return ins[0], ins[1], [ins[2 + i * n: 2 + (i + 1) * n] for i in range(k)]  # type: ignore[misc]


def _lower_adam(em: Emitter, node: ir.Node) -> list[ir.Value]:
    """X_new = (1 - ncp) (X - R' V_new / (sqrt(H_new) + eps)), R' = R sqrt(1 - beta^T) / (1 - alpha^T) when T > 0."""
    a = _attrs(node)
    r, t, (xs, gs, vs, hs) = _groups(node, 4)
    alpha, beta, eps = a["alpha"], a["beta"], a["epsilon"]
    t64 = em.Cast(t, to=int(F64))
    one = em.const(1.0, dtype=F64)
    corrected = em.Div(em.Mul(em.Cast(r, to=int(F64)), em.Sqrt(em.Sub(one, em.Pow(em.const(beta, dtype=F64), t64)))),
                       em.Sub(one, em.Pow(em.const(alpha, dtype=F64), t64)))
    r_adj = em.Where(em.Greater(t, em.const(0, like=t)), corrected, em.Cast(r, to=int(F64)))
    new_x, new_v, new_h = [], [], []
    for x, g, v, h in zip(xs, gs, vs, hs, strict=True):
        g = em.Add(em.Mul(em.const(a["norm_coefficient"], like=x), x), g)
        v2 = em.Add(em.Mul(em.const(alpha, like=v), v), em.Mul(em.const(1.0 - alpha, like=v), g))
        h2 = em.Add(em.Mul(em.const(beta, like=h), h), em.Mul(em.const(1.0 - beta, like=h), em.Mul(g, g)))
        step = em.Mul(em.Cast(r_adj, to=int(x.dtype)), em.Div(v2, em.Add(em.Sqrt(h2), em.const(eps, like=h))))
        x2 = em.Mul(em.const(1.0 - a["norm_coefficient_post"], like=x), em.Sub(x, step))
        new_x.append(x2)
        new_v.append(v2)
        new_h.append(h2)
    return new_x + new_v + new_h


def _lower_momentum(em: Emitter, node: ir.Node) -> list[ir.Value]:
    """V_new = alpha V + beta' G' (beta' = 1 at T = 0); X_new = X - R V_new, or X - R (G' + alpha V_new) (nesterov)."""
    a = _attrs(node)
    r, t, (xs, gs, vs) = _groups(node, 3)
    mode = a["mode"].decode() if isinstance(a["mode"], bytes) else str(a["mode"])
    if mode not in ("standard", "nesterov"):
        raise ValueError(f"Momentum node '{node.name}': unknown mode {mode!r} (standard or nesterov)")
    first = em.Greater(t, em.const(0, like=t))
    new_x, new_v = [], []
    for x, g, v in zip(xs, gs, vs, strict=True):
        g = em.Add(em.Mul(em.const(a["norm_coefficient"], like=x), x), g)
        beta = em.Where(first, em.const(a["beta"], like=v), em.const(1.0, like=v))
        v2 = em.Add(em.Mul(em.const(a["alpha"], like=v), v), em.Mul(beta, g))
        rx = em.Cast(r, to=int(x.dtype))
        direction = v2 if mode == "standard" else em.Add(g, em.Mul(em.const(a["alpha"], like=v), v2))
        new_x.append(em.Sub(x, em.Mul(rx, direction)))
        new_v.append(v2)
    return new_x + new_v


def _lower_adagrad(em: Emitter, node: ir.Node) -> list[ir.Value]:
    """R' = R / (1 + T decay); H_new = H + G'^2; X_new = X - R' G' / (sqrt(H_new) + eps)."""
    a = _attrs(node)
    r, t, (xs, gs, hs) = _groups(node, 3)
    decay = em.Mul(em.Cast(t, to=int(F64)), em.const(a["decay_factor"], dtype=F64))
    r64 = em.Div(em.Cast(r, to=int(F64)), em.Add(em.const(1.0, dtype=F64), decay))
    new_x, new_h = [], []
    for x, g, h in zip(xs, gs, hs, strict=True):
        g = em.Add(em.Mul(em.const(a["norm_coefficient"], like=x), x), g)
        h2 = em.Add(h, em.Mul(g, g))
        step = em.Div(em.Mul(em.Cast(r64, to=int(x.dtype)), g), em.Add(em.Sqrt(h2), em.const(a["epsilon"], like=h)))
        new_x.append(em.Sub(x, step))
        new_h.append(h2)
    return new_x + new_h


_LOWERINGS = {"Adam": _lower_adam, "Momentum": _lower_momentum, "Adagrad": _lower_adagrad}


def lower_optimizer_ops(model: ir.Model) -> int:
    """Replace every ai.onnx.preview.training Adam, Momentum and Adagrad node of the main graph by standard ops
    computing the same (ONNX's reference semantics). Returns how many were lowered."""
    graph = model.graph
    nodes = [n for n in graph if n.domain == TRAINING_DOMAIN and n.op_type in _LOWERINGS]
    if not nodes:
        return 0
    if not any(d in model.opset_imports for d in ("", "ai.onnx")):
        # ONNX's own node tests import only the training domain: standard ops need an ai.onnx import
        model.opset_imports[""] = DEFAULT_OPSET
        model.ir_version = max(model.ir_version or 0, onnx.helper.find_min_ir_version_for(
            [onnx.helper.make_opsetid("", DEFAULT_OPSET)]))
    opset = opset_of(model.opset_imports)
    for node in nodes:
        for v in node.inputs:
            if v is not None and v.dtype is None:
                raise ValueError(f"{node.op_type} node '{node.name}': the dtype of input '{v.name}' is unknown")
        em = Emitter(graph, opset, unique_scope(graph, f"{node.name or node.op_type}/lowered"),
                     model.ir_version or 8)
        try:
            new = _LOWERINGS[node.op_type](em, node)
        except BaseException:
            em.rollback()
            raise
        if len(new) != len(node.outputs):
            em.rollback()
            raise ValueError(f"{node.op_type} node '{node.name}' has {len(node.outputs)} outputs; "
                             f"its inputs call for {len(new)}")
        em.commit(new)
        for out, value in zip(node.outputs, new, strict=True):
            ident = ir.Node("", "Identity", [value], num_outputs=1, name=f"{em.scope}/{out.name}")
            replacement = ident.outputs[0]
            replacement.dtype, replacement.shape = out.dtype or value.dtype, out.shape or value.shape
            graph.append(ident)
            out.replace_all_uses_with(replacement, replace_graph_outputs=True)
            name = out.name
            out.name = f"{name}/removed"
            replacement.name = name
        graph.remove(node, safe=True)
    if not any(n.domain == TRAINING_DOMAIN for n in ir.traversal.RecursiveGraphIterator(graph)):
        model.opset_imports.pop(TRAINING_DOMAIN, None)
    ir.passes.common.TopologicalSortPass()(model)
    return len(nodes)
