"""What the commands share: the ``onnxgrad`` click group they register on, the model error, and the options of
``run`` and ``check`` (what runs the model, where its inputs come from)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import click

from onnxgrad import runtime

F = TypeVar("F", bound=Callable[..., Any])


class ModelError(click.ClickException):
    """An error in the model or its data (exit code 1)."""

    exit_code = 1


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxgrad")
def cli() -> None:
    """tf.gradients for ONNX: emit, run and check gradient graphs."""


# what runs the model: `run` and `check` take the same choices
provider_option = click.option(
    "--provider", type=click.Choice(runtime.CHOICES), default="cpu", show_default=True,
    help="cpu or cuda (onnxruntime), or reference (onnx's reference evaluator: every opset, slow).",
)


def feed_options(fn: F) -> F:
    """``--input NAME=FILE.npy``, ``--inputs FEEDS.npz`` and ``--dim NAME=SIZE``: where the inputs come from."""
    options = [
        click.option("--input", "input_files", multiple=True, metavar="NAME=FILE.npy",
                     help="Feed an input from a .npy file."),
        click.option("--inputs", "feeds_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FEEDS.npz",
                     help="Feed inputs from the arrays of a .npz file (keys are input names)."),
        click.option("--dim", "dim_items", multiple=True, metavar="NAME=SIZE",
                     help=f"Size of a symbolic dimension for random inputs (default {runtime.DEFAULT_DIM}; "
                     "'*=SIZE' for all)."),
    ]
    for option in reversed(options):
        fn = option(fn)
    return fn


def parse_dims(items: tuple[str, ...]) -> dict[str, int]:
    """``NAME=SIZE`` options as a dict (``*`` sets the size of every dimension not named)."""
    dims: dict[str, int] = {}
    for item in items:
        name, sep, size = item.partition("=")
        if not sep or not name or not size.isdigit():
            raise click.BadParameter(f"expected NAME=SIZE with SIZE >= 0, got {item!r}", param_hint="'--dim'")
        dims[name] = int(size)
    return dims


def parse_inputs(items: tuple[str, ...]) -> list[tuple[str, str]]:
    """``NAME=FILE.npy`` options as (name, path) pairs."""
    pairs = []
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=FILE.npy, got {item!r}", param_hint="'--input'")
        pairs.append((name, path))
    return pairs
