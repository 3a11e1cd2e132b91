"""``onnxgrad ops``: the table of registered gradient rules."""

from __future__ import annotations

import json
from typing import Any

import click

import onnxgrad.rules  # noqa: F401  (registers every rule)
from onnxgrad.cli.common import cli
from onnxgrad.registry import Rule, all_rules


def active_at(rule: Rule, opset: int) -> bool:
    """Whether ``rule`` is the one lookup picks at ``opset``."""
    return rule.since <= opset and (rule.until is None or opset <= rule.until)


def row(rule: Rule) -> dict[str, Any]:
    """One rule as a plain dict (the --json form)."""
    return {
        "op": rule.op_type,
        "domain": rule.domain or "ai.onnx",
        "since": rule.since,
        "until": rule.until,
        "differentiable": rule.differentiable,
        "notes": rule.notes,
    }


def opsets(r: dict[str, Any]) -> str:
    return f"{r['since']}..{r['until']}" if r["until"] is not None else f"{r['since']}+"


@cli.command("ops")
@click.option("--opset", type=click.IntRange(min=1), default=None, help="Only the rules active at this opset.")
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON list on stdout.")
def ops(opset: int | None, as_json: bool) -> None:
    """List the gradient rules: op, domain, opsets covered, differentiable or not, notes."""
    rows = [row(r) for r in all_rules() if opset is None or active_at(r, opset)]
    if as_json:
        click.echo(json.dumps(rows))
        return
    table = [("op", "domain", "opsets", "differentiable", "notes")]
    table += [(r["op"], r["domain"], opsets(r), "yes" if r["differentiable"] else "no", r["notes"]) for r in rows]
    widths = [max(len(t[i]) for t in table) for i in range(4)]
    for t in table:
        click.echo("  ".join([*(f"{c:<{w}}" for c, w in zip(t[:4], widths, strict=True)), t[4]]).rstrip())
    n_diff = sum(r["differentiable"] for r in rows)
    where = f" at opset {opset}" if opset is not None else ""
    click.echo(f"{len(rows)} rules{where}: {n_diff} differentiable, {len(rows) - n_diff} not")
