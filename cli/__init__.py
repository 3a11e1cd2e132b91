"""The ``onnxgrad`` command line: a thin layer over the Python API.

Each command lives in its own module and registers itself on ``cli``. Errors become one line on
stderr: exit code 2 for usage errors, 1 for errors in the model or its data."""

from __future__ import annotations

import sys

import click

from onnxgrad.io import one_line


class ModelError(click.ClickException):
    """An error in the model or its data (exit code 1)."""

    exit_code = 1


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="onnxgrad")
def cli() -> None:
    """tf.gradients for ONNX: emit, run and check gradient graphs."""


def _register() -> None:
    from onnxgrad.cli import grad_cmd  # noqa: F401

    for name in ("run", "check", "info", "ops", "lower"):
        try:
            __import__(f"onnxgrad.cli.{name}_cmd")
        except ModuleNotFoundError as e:
            if e.name != f"onnxgrad.cli.{name}_cmd":
                raise


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the group, turning every error into one line on stderr."""
    _register()
    try:
        cli.main(args=argv, prog_name="onnxgrad", standalone_mode=False)
    except click.UsageError as e:
        click.echo(f"onnxgrad: error: {e.format_message()}", err=True)
        sys.exit(2)
    except click.ClickException as e:
        click.echo(f"onnxgrad: error: {e.format_message()}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("onnxgrad: aborted", err=True)
        sys.exit(1)
    except (LookupError, ValueError, TypeError, OSError, RuntimeError) as e:
        click.echo(f"onnxgrad: error: {one_line(e)}", err=True)
        sys.exit(1)
    except Exception as e:  # anything else still gets one line, never a traceback
        click.echo(f"onnxgrad: error: {type(e).__name__}: {one_line(e)}", err=True)
        sys.exit(1)
    sys.exit(0)
