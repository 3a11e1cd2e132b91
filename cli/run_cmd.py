"""``onnxgrad run``: evaluate a model in onnxruntime and summarise every output.

Inputs come from ``--input NAME=FILE.npy`` and ``--inputs FEEDS.npz``; the rest are drawn at random
(seeded) with symbolic dimensions set by ``--dim NAME=SIZE`` (default 1)."""

from __future__ import annotations

import difflib
import json
import math
import re
from pathlib import Path
from typing import Any

import click
import numpy as np
from onnxgrad.cli import ModelError, cli

from onnxgrad import runtime
from onnxgrad.io import atomic_write, load_model, one_line

DEFAULT_DIM = 1
INT_RANGE = (0, 4)  # random integer inputs: small non-negative values, valid as indices into most axes
ORT_TYPES = {"float": "float32", "double": "float64", "bool": "bool"}


# what runs the model: `run` and `check` take the same choices
provider_option = click.option(
    "--provider", type=click.Choice(runtime.CHOICES), default="cpu", show_default=True,
    help="cpu or cuda (onnxruntime), or reference (onnx's reference evaluator: every opset, slow).",
)


def numpy_dtype(ort_type: str) -> np.dtype[Any] | None:
    """numpy dtype for onnxruntime's ``tensor(float)`` style type names (None for non-tensors, bfloat16...)."""
    m = re.fullmatch(r"tensor\((\w+)\)", ort_type)
    if m is None:
        return None
    try:
        dtype = np.dtype(ORT_TYPES.get(m.group(1), m.group(1)))
    except TypeError:
        return None
    return dtype if dtype.kind in "fiub" else None


def parse_dims(items: tuple[str, ...]) -> dict[str, int]:
    """``NAME=SIZE`` options as a dict (``*`` sets the size of every dimension not named)."""
    dims: dict[str, int] = {}
    for item in items:
        name, sep, size = item.partition("=")
        if not sep or not name or not size.isdigit():
            raise click.BadParameter(f"expected NAME=SIZE with SIZE >= 0, got {item!r}", param_hint="'--dim'")
        dims[name] = int(size)
    return dims


def close_hint(name: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(name, choices, n=3)
    return f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f"; inputs: {', '.join(choices)}"


def given_feeds(input_files: tuple[str, ...], feeds_file: Path | None, names: list[str]) -> dict[str, np.ndarray]:
    """Arrays from ``--inputs`` then ``--input`` (which wins), checked against the model's input names."""
    feeds: dict[str, np.ndarray] = {}
    if feeds_file is not None:
        try:
            with np.load(feeds_file, allow_pickle=False) as npz:
                feeds.update({k: npz[k] for k in npz.files})
        except FileNotFoundError:
            raise ModelError(f"--inputs: file '{feeds_file}' not found") from None
        except (OSError, ValueError) as e:
            raise ModelError(f"--inputs: cannot read '{feeds_file}' as .npz ({one_line(e)})") from None
    for item in input_files:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            raise click.BadParameter(f"expected NAME=FILE.npy, got {item!r}", param_hint="'--input'")
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise ModelError(f"--input {name}: file '{path}' not found") from None
        except (OSError, ValueError) as e:
            raise ModelError(f"--input {name}: cannot read '{path}' as .npy ({one_line(e)})") from None
    for name in feeds:
        if name not in names:
            raise ModelError(f"the model has no input named {name!r}{close_hint(name, names)}")
    return feeds


def random_input(
    name: str, ort_type: str, shape: list[Any], dims: dict[str, int], used: dict[str, int], rng: np.random.Generator
) -> tuple[np.ndarray, str]:
    """A seeded random array for an input not given, and how it was made."""
    dtype = numpy_dtype(ort_type)
    if dtype is None:
        raise ModelError(f"cannot make random values for input {name!r} of type {ort_type}; pass it with --input")
    sizes = []
    for d in shape:
        if isinstance(d, int) and d >= 0:
            sizes.append(d)
            continue
        key = d if isinstance(d, str) and d else "?"
        size = dims.get(key, dims.get("*", DEFAULT_DIM))
        used[key] = size
        sizes.append(size)
    if dtype.kind == "f":
        return rng.standard_normal(sizes).astype(dtype), "random normal"
    if dtype.kind == "b":
        return rng.random(sizes) < 0.5, "random bool"
    return rng.integers(*INT_RANGE, size=sizes).astype(dtype), f"random integers in [{INT_RANGE[0]}, {INT_RANGE[1]})"


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
@click.option("--input", "input_files", multiple=True, metavar="NAME=FILE.npy", help="Feed an input from a .npy file.")
@click.option("--inputs", "feeds_file", type=click.Path(dir_okay=False, path_type=Path), metavar="FEEDS.npz",
              help="Feed inputs from the arrays of a .npz file (keys are input names).")
@click.option("--dim", "dim_items", multiple=True, metavar="NAME=SIZE",
              help=f"Size of a symbolic dimension for random inputs (default {DEFAULT_DIM}; '*=SIZE' for all).")
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
    inputs = sess.get_inputs()
    names = [i.name for i in inputs]
    feeds = given_feeds(input_files, feeds_file, names)
    rng = np.random.default_rng(seed)
    used: dict[str, int] = {}
    sources: dict[str, str] = {}
    for inp in inputs:
        if inp.name in feeds:
            want = numpy_dtype(inp.type)
            have = feeds[inp.name]
            sources[inp.name] = "given"
            if want is not None and have.dtype != want:
                feeds[inp.name] = have.astype(want)
                sources[inp.name] = f"given (cast from {have.dtype.name})"
            continue
        feeds[inp.name], sources[inp.name] = random_input(inp.name, inp.type, list(inp.shape), dims, used, rng)
        sources[inp.name] += f", seed {seed}"
    try:
        outputs = runtime.run(sess, feeds)
    except Exception as e:
        raise ModelError(f"{runner(label)} failed: {runtime.explain(e)}") from None
    if results is not None:
        save_results(results, outputs)
    in_rows = {n: {"shape": list(feeds[n].shape), "dtype": feeds[n].dtype.name, "source": sources[n]} for n in names}
    out_rows = {n: stats(v) for n, v in outputs.items()}
    if as_json:
        payload = {"provider": label, "inputs": in_rows, "dims": used, "outputs": out_rows}
        click.echo(json.dumps(payload))
        return
    show(model, label, in_rows, used, out_rows, results)


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
