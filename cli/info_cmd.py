"""``onnxgrad info``: what a model takes and gives, its weights, opsets and ops, and what can be
differentiated (so a user knows what to pass as ``--ys`` / ``--xs``). Weights in external data are
not read: a model of any size is described in moments."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import click

from onnxgrad.augment import residuals as residual_rows
from onnxgrad.cli.common import ModelError, cli, parse_dims
from onnxgrad.info import describe, format_description
from onnxgrad.io import ModelFileError, load_lazy, one_line
from onnxgrad.remat import format_residuals


@cli.command("info")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON object on stdout.")
@click.option("--residuals", is_flag=True,
              help="List the forward values the gradient of --ys w.r.t. --xs keeps alive, largest first.")
@click.option("--ys", multiple=True, help="With --residuals: the values to differentiate.")
@click.option("--xs", multiple=True, help="With --residuals: the values to differentiate with respect to.")
@click.option("--dim", "dim_items", multiple=True, metavar="NAME=SIZE",
              help="With --residuals: the size of a symbolic dimension for the byte counts ('*=N': all others).")
def info(model: Path, as_json: bool, residuals: bool, ys: tuple[str, ...], xs: tuple[str, ...],
         dim_items: tuple[str, ...]) -> None:
    """Describe MODEL: inputs, outputs, weights, opsets, op histogram and differentiable values.

    In --xs, '@weights' stands for every float weight and '@inputs' for every float graph input."""
    if residuals:
        _residuals(model, as_json, ys, xs, parse_dims(dim_items))
        return
    try:
        description = describe(load_lazy(model))
    except ModelFileError as e:
        raise ModelError(one_line(e)) from None
    except Exception as e:
        raise ModelError(f"cannot describe '{model}': {one_line(e)}") from None
    if as_json:
        click.echo(json.dumps(description))
        return
    click.echo(format_description(description, model))


def _residuals(model: Path, as_json: bool, ys: tuple[str, ...], xs: tuple[str, ...], dims: dict[str, int]) -> None:
    """``info --residuals``: what the backward part reads of the forward, with sizes at ``dims``."""
    if not ys or not xs:
        raise click.UsageError("--residuals needs --ys and --xs")
    try:
        rows = residual_rows(str(model), list(ys), list(xs), {k: v for k, v in dims.items() if k != "*"},
                             default=dims.get("*", 1))
    except ModelFileError as e:
        raise ModelError(one_line(e)) from None
    except (LookupError, ValueError, TypeError) as e:
        raise ModelError(one_line(e)) from None
    if as_json:
        click.echo(json.dumps({"residuals": [dataclasses.asdict(r) for r in rows]}))
        return
    click.echo(format_residuals(rows))
