"""The table of gradient rules, looked up by (domain, op_type, opset)."""

from __future__ import annotations

import bisect
import dataclasses
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import onnx_ir as ir

    from onnxgrad.emitter import Emitter

    RuleFn = Callable[[Emitter, ir.Node, Sequence[ir.Value | None]], Sequence[ir.Value | None]]
else:
    RuleFn = Callable

DEFAULT_DOMAIN = ""


class Undefined:
    """The gradient of an input that does affect the output, but that no rule gives (PyTensor's NullType).

    Apart from ``None`` ("not connected": the input does not affect the output, or only piecewise-constantly):
    the walk carries it to the xs and never turns it into zeros."""

    _instance: Undefined | None = None

    def __new__(cls) -> Undefined:
        if cls._instance is None:
            cls._instance = super().__new__(cls)
        return cls._instance

    def __repr__(self) -> str:
        return "UNDEFINED"


UNDEFINED = Undefined()


def normalize_domain(domain: str) -> str:
    """'ai.onnx' and '' name the same default domain."""
    return DEFAULT_DOMAIN if domain in ("", "ai.onnx") else domain


def opset_of(imports: Mapping[str, int], domain: str = DEFAULT_DOMAIN) -> int:
    """The opset a model (or graph) imports for ``domain`` ('' and 'ai.onnx' alike; 1 when not imported)."""
    if normalize_domain(domain) == DEFAULT_DOMAIN:
        return int(imports.get("", imports.get("ai.onnx", 1)))
    return int(imports.get(domain, 1))


@dataclass(frozen=True)
class Rule:
    """One registered gradient rule, valid from opset ``since`` until the next rule of the same op."""

    op_type: str
    domain: str
    since: int
    fn: RuleFn | None
    broadcast: tuple[int, ...] | bool = ()
    dense: bool = False
    notes: str = ""
    until: int | None = field(default=None, compare=False)
    undefined: bool = False  # a non-differentiable declaration whose float inputs do affect the outputs
    wrt: int | None = None  # the rule answers for the first ``wrt`` inputs only: the later ones are data (axes...)
    captures: bool = False  # the rule also answers for the outer-scope values its node's subgraphs read

    def arity(self, node: ir.Node) -> int:
        """How many gradients the rule returns for ``node``: one per input, or per input before the data ones."""
        n = len(node.inputs)
        return n if self.wrt is None else min(n, self.wrt)

    @property
    def differentiable(self) -> bool:
        return self.fn is not None

    def unbroadcast_input(self, index: int) -> bool:
        if self.broadcast is True:
            return True
        if self.broadcast is False:
            return False
        return index in self.broadcast


_RULES: dict[tuple[str, str], list[Rule]] = {}


def _add(rule: Rule) -> None:
    key = (rule.domain, rule.op_type)
    table = _RULES.setdefault(key, [])
    table[:] = [r for r in table if r.since != rule.since]
    bisect.insort(table, rule, key=lambda r: r.since)


def register(
    op_type: str,
    *,
    domain: str = DEFAULT_DOMAIN,
    since: int = 1,
    broadcast: Sequence[int] | bool = (),
    dense: bool = False,
    notes: str = "",
    wrt: int | None = None,
    captures: bool = False,
) -> Callable[[RuleFn], RuleFn]:
    """Register ``fn(em, node, grads) -> grads_of_inputs`` for ``op_type`` from opset ``since`` on.

    ``broadcast``: the inputs (indices, or True for all) whose gradients the walk reduces back to
    the input's shape. ``dense``: the walk hands the rule zeros instead of ``None`` for outputs that
    receive no gradient. ``wrt``: the rule returns gradients for the first ``wrt`` inputs only, the later
    inputs being data that no gradient reaches (axes, lengths, indices); otherwise exactly one per input.
    ``captures``: for ops with subgraphs (If, Loop, Scan): after the entries for the inputs, the rule returns
    one entry per implicit input, the outer-scope values that the node's subgraphs read, in the order of
    ``emitter.implicit_inputs`` (first use in a depth-first walk of the bodies, attributes in node order).
    """

    def deco(fn: RuleFn) -> RuleFn:
        bc = broadcast if isinstance(broadcast, bool) else tuple(broadcast)
        _add(Rule(op_type, normalize_domain(domain), since, fn, bc, dense, notes, wrt=wrt, captures=captures))
        return fn

    return deco


def register_nondifferentiable(
    *op_types: str, domain: str = DEFAULT_DOMAIN, since: int = 1, notes: str = "", undefined: bool = False
) -> None:
    """Declare ops whose outputs are constant with respect to their inputs (Floor, ArgMax, Shape...).

    ``undefined``: the float inputs do affect the outputs, but onnxgrad gives no gradient for them (OneHot's
    values, DequantizeLinear's scale): a gradient through them is undefined, never zero."""
    for op_type in op_types:
        _add(Rule(op_type, normalize_domain(domain), since, None, (), False, notes or "not differentiable",
                  undefined=undefined))


def lookup(domain: str, op_type: str, opset: int) -> Rule | None:
    """The rule for ``op_type`` with the greatest ``since`` not above ``opset``."""
    table = _RULES.get((normalize_domain(domain), op_type))
    if not table:
        return None
    i = bisect.bisect_right([r.since for r in table], opset)
    return table[i - 1] if i else None


Fallback = Callable[[str, str, int], "Rule | None"]
_FALLBACKS: list[Fallback] = []


def register_fallback(fallback: Fallback) -> Fallback:
    """Add a source of rules for ops without a registered one (the schema's function body, say)."""
    _FALLBACKS.append(fallback)
    return fallback


def rule_for(domain: str, op_type: str, opset: int) -> Rule | None:
    """The rule the walk uses: the registered one, else the first fallback's (None when there is neither)."""
    rule = lookup(domain, op_type, opset)
    if rule is None:
        rule = next((r for f in _FALLBACKS if (r := f(domain, op_type, opset)) is not None), None)
    return rule


def all_rules() -> Iterator[Rule]:
    """Every registered rule in a stable order, each with ``until`` filled in."""
    for key in sorted(_RULES):
        table = _RULES[key]
        for rule, nxt in zip(table, [*table[1:], None], strict=True):
            yield dataclasses.replace(rule, until=None if nxt is None else nxt.since - 1)
