"""``onnxgrad check``: build the gradients and compare them with central differences along random
directions, in float64 (the model converted; onnx's reference evaluator where onnxruntime lacks a float64
kernel), else in float32 with a looser tolerance. Exit code 1 when some x disagrees; a kink (ReLU, max-pool) or
a flat loss is reported, not failed. Each verdict names the next step."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import click
from tqdm import tqdm

from onnxgrad import runtime
from onnxgrad.check import CHECK_DIM, MISMATCH, check_model
from onnxgrad.cli.common import ModelError, cli, feed_options, parse_dims, parse_inputs, provider_option
from onnxgrad.io import ModelFileError, load_model, one_line
from onnxgrad.shorthands import expand_xs

PROGRESS_AFTER_S = 2.0  # show a progress bar once the check has run this long


class LazyProgress:
    """A tqdm progress bar on stderr that appears only once the work has taken ``PROGRESS_AFTER_S`` seconds (a
    check that falls back to another precision starts the bar again)."""

    def __init__(self, label: str, after: float | None = None) -> None:
        self.label = label
        self.after = PROGRESS_AFTER_S if after is None else after
        self.bar: Any = None
        self.done = 0

    def __call__(self, done: int, total: int, name: str) -> None:
        if self.bar is None or done <= self.done:
            self.close()
            self.bar = tqdm(total=total, desc=self.label, file=sys.stderr, delay=self.after, leave=False,
                            unit="x", dynamic_ncols=True)
            self.done = 0
        self.bar.set_postfix_str(name, refresh=False)
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@cli.command("check")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--ys", multiple=True, required=True, metavar="NAME", help="A value to differentiate (repeatable).")
@click.option("--xs", multiple=True, required=True, metavar="NAME",
              help="A value to check the gradient for (repeatable); '@weights' = every float weight, "
                   "'@inputs' = every float graph input.")
@feed_options
@click.option("--seed", type=int, default=0, show_default=True,
              help="Seed of the random inputs, directions and output weights.")
@click.option("--precision", type=click.Choice(["auto", "float64", "float32", "model"]), default="auto",
              show_default=True, help="auto and float64: the model converted to float64, run by onnxruntime or, where "
              "it lacks a float64 kernel, by onnx's reference evaluator (auto: else float32).")
@click.option("--rtol", type=float, default=None,
              help="Relative tolerance (default: 1e-5 in float64, 1e-2 in float32), on top of the round-off allowed.")
@click.option("--stop-gradients", "stop_gradients", multiple=True, metavar="NAME",
              help="A value to treat as constant (repeatable), as grad does.")
@provider_option
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON object on stdout.")
def check(
    model: Path,
    ys: tuple[str, ...],
    xs: tuple[str, ...],
    input_files: tuple[str, ...],
    feeds_file: Path | None,
    dim_items: tuple[str, ...],
    seed: int,
    precision: str,
    rtol: float | None,
    stop_gradients: tuple[str, ...],
    provider: str,
    as_json: bool,
) -> None:
    """Compare the gradients of sum(u * ys) (u random) with central differences, one row per x.

    Inputs not given are drawn at random as in run (seeded), but symbolic dimensions default to 2, not 1."""
    dims = {"*": CHECK_DIM, **parse_dims(dim_items)}
    files = parse_inputs(input_files)
    try:
        runtime.provider_label(provider)  # raises where the provider is not available
        proto = load_model(model)
        x_names = expand_xs(proto, xs)
    except ModelFileError as e:
        raise ModelError(one_line(e)) from None
    except (ValueError, RuntimeError) as e:
        raise ModelError(one_line(e)) from None
    try:
        feeds = runtime.make_feeds(runtime.model_inputs(proto), runtime.read_feeds(feeds_file, files), seed=seed,
                                   dims=dims)
    except runtime.FeedError as e:
        raise ModelError(str(e)) from None
    progress = LazyProgress(f"checking {len(x_names)} gradients")
    try:
        report = check_model(proto, list(ys), x_names, feeds.arrays, seed=seed, precision=precision, provider=provider,
                             rtol=rtol, progress=progress, stop_gradients=list(stop_gradients))
    except click.ClickException:
        raise
    except Exception as e:
        known = (LookupError, ValueError, TypeError, OSError)
        raise ModelError(one_line(e) if isinstance(e, known) else f"{type(e).__name__}: {one_line(e)}") from None
    finally:
        progress.close()
    bad = [r for r in report.rows if r.status == MISMATCH]
    if as_json:
        click.echo(json.dumps(payload(model, ys, report, seed)))
    else:
        show(model, ys, report, seed)
    if bad:
        raise ModelError(f"gradient check failed for {len(bad)} of {len(report.rows)} xs: "
                         + ", ".join(r.x for r in bad) + f" ({report.precision}; {hint(report)})")


def hint(report: Any) -> str:
    """The next step after a mismatch, short enough for the one error line."""
    if report.precision != "float64":
        return "run it in float64: --precision float64 --provider reference"
    return "a gradient rule on their path is wrong"


def _num(x: float) -> float | str:
    return float(x) if math.isfinite(x) else str(float(x))


def payload(model: Path, ys: tuple[str, ...], report: Any, seed: int) -> dict[str, Any]:
    """The JSON object of ``check --json``."""
    return {
        "model": str(model),
        "ys": list(ys),
        "precision": report.precision,
        "source_types": report.source,
        "converted": report.converted,
        "fallback": report.fallback,
        "runner": report.runner,
        "held_draws": report.held,
        "rtol": report.rtol,
        "flat": report.flat,
        "next_steps": report.next_steps(),
        "seed": seed,
        "ok": report.ok,
        "rows": [
            {"x": r.x, "shape": list(r.shape), "dtype": r.dtype, "analytic": _num(r.analytic),
             "numeric": _num(r.numeric), "rel_error": _num(r.rel_error), "step": r.step, "tries": r.tries,
             "status": r.status, "noise": _num(r.noise), "note": r.note,
             "one_sided": None if r.one_sided is None else [_num(v) for v in r.one_sided]}
            for r in report.rows
        ],
    }


def precision_line(report: Any) -> str:
    """``precision: float64 (converted from float32) in onnxruntime (CPUExecutionProvider), rtol 1e-05`` and, after
    a fallback, why."""
    source = ", ".join(report.source) or "no float"
    how = f"converted from {source}" if report.converted else "the model's own"
    line = f"precision: {report.precision} ({how}) in {report.runner}, rtol {report.rtol:.0e}"
    if report.fallback:
        line += f"; onnxruntime in float64 not used: {report.fallback}"
    return line


def show(model: Path, ys: tuple[str, ...], report: Any, seed: int) -> None:
    """The human-readable table."""
    click.echo(f"{model}: d({' + '.join(ys)})/dx along random directions, seed {seed}")
    click.echo(precision_line(report))
    if report.held:
        click.echo(f"random draws sampled once and held for every run: {', '.join(report.held)}")
    header = ["x", "shape", "analytic", "numeric", "rel err", "step", "result"]
    table = [header]
    for r in report.rows:
        result = {"ok": "ok", "kink": "kink", "flat": "flat", "mismatch": "MISMATCH"}[r.status]
        table.append([r.x, "[" + ",".join(str(d) for d in r.shape) + "]", f"{r.analytic:.9g}", f"{r.numeric:.9g}",
                      f"{r.rel_error:.1e}", f"{r.step:.0e}", result])
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        click.echo("  " + "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip())
    counts = {s: sum(1 for r in report.rows if r.status == s) for s in ("ok", "kink", "flat", "mismatch")}
    flat = f", {counts['flat']} flat" if counts["flat"] else ""
    click.echo(f"{counts['ok']} ok, {counts['kink']} kink{flat}, {counts['mismatch']} mismatch")
    if counts["kink"]:
        click.echo("kink: no step agreed, but the one-sided differences show the slope jumping within every step "
                   "tried (ReLU, max-pool, abs at ties): not counted as a failure")
    for step in report.next_steps():
        click.echo(f"next: {step}")
