"""``onnxgrad lower``: replace ONNX's Gradient operator by explicit gradient subgraphs."""

from __future__ import annotations

from pathlib import Path

import click
import onnx_ir as ir

from onnxgrad.cli.common import ModelError, cli
from onnxgrad.higher import lower_gradient_ops
from onnxgrad.io import load_model, one_line, save_model
from onnxgrad.optim import lower_optimizer_ops
from onnxgrad.upgrade import upgrade


@cli.command("lower")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the lowered model (written atomically).")
def lower(model: Path, out: Path) -> None:
    """Replace every ai.onnx.preview.training Gradient node of MODEL by the explicit gradient subgraph, and its
    Adam, Momentum and Adagrad nodes by standard ops, so the model runs in runtimes that have no kernel for them
    (onnxruntime among them)."""
    proto = load_model(model)
    try:
        m = ir.serde.deserialize_model(upgrade(proto))
        count = lower_gradient_ops(m)
        optimizers = lower_optimizer_ops(m)  # Adam, Momentum, Adagrad: standard ops (onnxgrad/optim.py)
        save_model(ir.serde.serialize_model(m), out)
    except (LookupError, ValueError, TypeError) as e:
        raise ModelError(one_line(e)) from None
    also = f" and {optimizers} optimizer node{'s' if optimizers != 1 else ''}" if optimizers else ""
    click.echo(f"lowered {count} Gradient node{'s' if count != 1 else ''}{also}; wrote {out}")
