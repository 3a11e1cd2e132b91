"""``onnxgrad info``: what a model takes and gives, its weights, opsets and ops, and what can be
differentiated (so a user knows what to pass as ``--ys`` / ``--xs``). Weights in external data are
not read: a model of any size is described in moments."""

from __future__ import annotations

import json
from pathlib import Path

import click
from onnxgrad.cli.common import ModelError, cli

from onnxgrad.info import describe, format_description
from onnxgrad.io import ModelFileError, load_lazy, one_line


@cli.command("info")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON object on stdout.")
def info(model: Path, as_json: bool) -> None:
    """Describe MODEL: inputs, outputs, weights, opsets, op histogram and differentiable values.

    In --xs, '@weights' stands for every float weight and '@inputs' for every float graph input."""
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
