"""``onnxgrad run``: evaluate a model in onnxruntime and summarise every output.

Inputs come from ``--input NAME=FILE.npy`` and ``--inputs FEEDS.npz``; the rest are drawn at random
(seeded) with symbolic dimensions set by ``--dim NAME=SIZE`` (``onnxgrad.runtime.make_feeds``)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import click
import numpy as np

from onnxgrad import runtime
from onnxgrad.cli.common import ModelError, cli, feed_options, parse_dims, parse_inputs, provider_option
from onnxgrad.io import atomic_write, load_model, one_line


def stats(value: Any) -> dict[str, Any]:
    """Shape, dtype, norm, min/max and the first few values of one output."""
    if not isinstance(value, np.ndarray):
        kind = type(value).__name__
        return {"kind": kind, "length": len(value) if hasattr(value, "__len__") else None}
    row: dict[str, Any] = {"shape": list(value.shape), "dtype": value.dtype.name}
    flat = value.reshape(-1)
    if value.dtype.kind in "fiub" and flat.size:
        as_float = flat.astype(np.float64)
        row.update(norm=plain(np.linalg.norm(as_float)), min=plain(as_float.min()), max=plain(as_float.max()))
    row["values"] = [plain(v) for v in flat[:6].tolist()]
    return row


def plain(x: Any) -> Any:
    """A JSON-safe scalar: floats stay floats unless nan/inf, which become strings."""
    if isinstance(x, float | np.floating):
        return float(x) if math.isfinite(x) else str(float(x))
    if isinstance(x, np.integer | np.bool_):
        return x.item()
    return x


def type_of(row: dict[str, Any]) -> str:
    """``float32[3,4]`` for a tensor row, ``list of length 2`` for a sequence."""
    if "shape" not in row:
        return f"{row['kind']} of length {row['length']}"
    return f"{row['dtype']}[{','.join(str(d) for d in row['shape'])}]"


def fmt(x: Any) -> str:
    return f"{x:.6g}" if isinstance(x, float) else str(x)


@cli.command("run")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@feed_options
@provider_option
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the random inputs.")
@click.option("-o", "--output", "results", type=click.Path(dir_okay=False, path_type=Path), metavar="RESULTS.npz",
              help="Save every output into a .npz file.")
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON object on stdout.")
def run(
    model: Path,
    input_files: tuple[str, ...],
    feeds_file: Path | None,
    dim_items: tuple[str, ...],
    provider: str,
    seed: int,
    results: Path | None,
    as_json: bool,
) -> None:
    """Evaluate MODEL in onnxruntime and summarise each output (shape, dtype, norm, min/max, values)."""
    dims = parse_dims(dim_items)
    files = parse_inputs(input_files)
    try:
        label = runtime.provider_label(provider)  # no silent fallback to the CPU
        load_model(model, load_external_data=False)  # clear errors for missing or corrupt files
    except ModelError:
        raise
    except Exception as e:
        raise ModelError(one_line(e)) from None
    try:
        sess = runtime.session(str(model), provider)
    except Exception as e:
        raise ModelError(f"{runner(label)} cannot load '{model}': {runtime.explain(e)}") from None
    try:
        feeds = runtime.make_feeds(sess.get_inputs(), runtime.read_feeds(feeds_file, files), seed=seed, dims=dims)
    except runtime.FeedError as e:
        raise ModelError(str(e)) from None
    try:
        outputs = runtime.run(sess, feeds.arrays)
    except Exception as e:
        raise ModelError(f"{runner(label)} failed: {runtime.explain(e)}") from None
    if results is not None:
        save_results(results, outputs)
    in_rows = {n: {"shape": list(a.shape), "dtype": a.dtype.name, "source": feeds.sources[n]}
               for n, a in feeds.arrays.items()}
    out_rows = {n: stats(v) for n, v in outputs.items()}
    if as_json:
        payload = {"provider": label, "inputs": in_rows, "dims": feeds.dims, "outputs": out_rows}
        click.echo(json.dumps(payload))
        return
    show(model, label, in_rows, feeds.dims, out_rows, results)


def runner(label: str) -> str:
    """Who ran the model, for error messages."""
    return label if label.startswith("onnx ") else f"onnxruntime ({label})"


def save_results(path: Path, outputs: dict[str, Any]) -> None:
    """Every tensor output into one .npz (written atomically); other outputs are named on stderr."""
    arrays = {n: v for n, v in outputs.items() if isinstance(v, np.ndarray) and v.dtype != object}
    for n in outputs:
        if n not in arrays:
            click.echo(f"onnxgrad: note: output {n!r} is not a numeric tensor; not saved in {path}", err=True)
    try:
        atomic_write(path, lambda f: np.savez(f, **arrays))
    except OSError as e:
        raise ModelError(f"cannot write '{path}': {one_line(e.strerror or e)}") from None


def show(
    model: Path, provider: str, inputs: dict[str, dict[str, Any]], dims: dict[str, int],
    outputs: dict[str, dict[str, Any]], results: Path | None,
) -> None:
    """The human-readable summary."""
    click.echo(f"{model} on {provider}")
    if dims:
        click.echo("dims: " + ", ".join(f"{k}={v}" for k, v in dims.items()))
    width = max([len(n) for n in [*inputs, *outputs]] or [0])
    types = {n: type_of(r) for n, r in [*inputs.items(), *outputs.items()]}
    twidth = max([len(t) for t in types.values()] or [0])
    click.echo("inputs:")
    for name, row in inputs.items():
        click.echo(f"  {name:<{width}}  {types[name]:<{twidth}}  {row['source']}")
    click.echo("outputs:")
    for name, row in outputs.items():
        parts = [f"  {name:<{width}}  {types[name]:<{twidth}}"]
        if "norm" in row:
            parts.append(f"norm {fmt(row['norm'])}  min {fmt(row['min'])}  max {fmt(row['max'])}")
        if "values" in row:
            more = ", ..." if math.prod(row["shape"]) > len(row["values"]) else ""
            parts.append("[" + ", ".join(fmt(v) for v in row["values"]) + more + "]")
        click.echo("  ".join(parts).rstrip())
    if results is not None:
        click.echo(f"wrote {results}")
