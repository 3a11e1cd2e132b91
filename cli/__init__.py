"""The ``onnxgrad`` command line: a thin layer over the Python API.

Each command lives in its own module and registers itself on the group in ``common``. Errors become one line on
stderr: exit code 2 for usage errors, 1 for errors in the model or its data. Warnings become one line too:
``onnxgrad: note: ...`` for onnxgrad's own (an integer x taken as unconnected, say)."""

from __future__ import annotations

import os
import sys
import warnings
from typing import TextIO

import click

from onnxgrad import api
from onnxgrad.cli.common import ModelError, cli
from onnxgrad.io import one_line

__all__ = ["ModelError", "cli", "main"]

# the folders of onnxgrad's own modules: a UserWarning raised there is a note to the user
_OURS = tuple(os.path.dirname(os.path.abspath(p)) + os.sep for p in (api.__file__, __file__))


def _register() -> None:
    """Import every command module; each adds its command to ``cli``."""
    from onnxgrad.cli import check_cmd, grad_cmd, info_cmd, jvp_cmd, lower_cmd, ops_cmd, run_cmd, train_cmd  # noqa: F401


def _show_warning(message: Warning | str, category: type[Warning], filename: str, lineno: int,
                  file: TextIO | None = None, line: str | None = None) -> None:
    """A warning as one line on stderr: a note for onnxgrad's own, the category's name for anything else."""
    ours = issubclass(category, api.GradientNote) or (
        issubclass(category, UserWarning) and os.path.abspath(filename).startswith(_OURS))
    label = "note" if ours else f"warning: {category.__name__}"
    click.echo(f"onnxgrad: {label}: {one_line(message)}", err=True)


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the group, turning every error and warning into one line on stderr."""
    _register()
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning
        code = _run(argv)
    sys.exit(code)


def _run(argv: list[str] | None) -> int:
    """The exit code of one command, its error (if any) written on stderr."""
    try:
        cli.main(args=argv, prog_name="onnxgrad", standalone_mode=False)
    except click.UsageError as e:
        click.echo(f"onnxgrad: error: {e.format_message()}", err=True)
        return 2
    except click.ClickException as e:
        click.echo(f"onnxgrad: error: {e.format_message()}", err=True)
        return e.exit_code
    except click.exceptions.Abort:
        click.echo("onnxgrad: aborted", err=True)
        return 1
    except (LookupError, ValueError, TypeError, OSError, RuntimeError) as e:
        click.echo(f"onnxgrad: error: {one_line(e)}", err=True)
        return 1
    except Exception as e:  # anything else still gets one line, never a traceback
        click.echo(f"onnxgrad: error: {type(e).__name__}: {one_line(e)}", err=True)
        return 1
    return 0
