"""``onnxgrad grad``: append gradient outputs to a model file (``onnxgrad.add_gradients`` on the command line)."""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import numpy as np
import onnx

from onnxgrad.api import NEW_INPUT, GradY
from onnxgrad.augment import add_gradients
from onnxgrad.cli.common import ModelError, cli
from onnxgrad.io import ModelFileError, load_model, one_line

AGGREGATION_CHOICES = ("add_n", "default", "experimental_tree", "experimental_accumulate_n")


def fail(e: BaseException) -> ModelError:
    """A model error (exit 1) with ``e``'s message on one line (or its root cause's, when ``e`` only wraps
    one, as onnx_ir's SerdeError does)."""
    known = (LookupError, ValueError, TypeError, OSError, onnx.checker.ValidationError)
    root = e
    while root.__cause__ is not None:
        root = root.__cause__
    if not isinstance(e, known) and isinstance(root, known):
        e = root
    message = one_line(e) if isinstance(e, known) else f"{type(e).__name__}: {one_line(e)}"
    return ModelError(message)


@contextlib.contextmanager
def model_errors(model: Path) -> Iterator[None]:
    """Whatever goes wrong while building from MODEL, as one ModelError line (a checker failure blamed on the input
    when the input fails the checker too, else on onnxgrad)."""
    try:
        yield
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as e:
        raise blame(model, e) from None
    except (ModelError, ModelFileError) as e:
        raise ModelError(one_line(e)) from None
    except click.ClickException:
        raise
    except Exception as e:
        raise fail(e) from None


def blame(path: Path, e: Exception) -> ModelError:
    """The output failed onnx.checker: the input's fault when the input fails it too, else onnxgrad's."""
    try:
        onnx.checker.check_model(os.fspath(path), full_check=True)  # by path: models of any size
    except Exception as own:
        return ModelError(f"'{path}' is not a valid ONNX model (onnx.checker: {one_line(own)})")
    return ModelError(f"the gradient model fails onnx.checker, a bug in onnxgrad (please report it): {one_line(e)}")


def parse_grad_ys(specs: tuple[str, ...], ys: tuple[str, ...]) -> list[GradY]:
    """One ``grad_ys`` entry per y from ``Y=SPEC`` options (ones where no SPEC names that y)."""
    chosen: dict[str, GradY] = {}
    for item in specs:
        y, sep, spec = item.partition("=")
        if not sep or not y or not spec:
            raise click.BadParameter(f"expected Y=SPEC, got {item!r}", param_hint="'--grad-ys'")
        if y not in ys:
            raise click.BadParameter(f"{y!r} is not one of the --ys ({', '.join(ys)})", param_hint="'--grad-ys'")
        if y in chosen:
            raise click.BadParameter(f"{y!r} is given twice", param_hint="'--grad-ys'")
        chosen[y] = seed_spec(spec)
    return [chosen.get(y) for y in ys]


def seed_spec(spec: str) -> GradY:
    """The word ``input`` (a new graph input), a ``.npy`` file, or a value name in the graph."""
    if spec == "input":
        return NEW_INPUT
    if spec.lower().endswith(".npy"):
        try:
            with open(spec, "rb") as f:
                if f.read(6) != b"\x93NUMPY":  # np.load would try it as a pickle and say so
                    raise ModelError(f"--grad-ys: cannot read '{spec}' as a .npy array (no NumPy .npy header)")
            return np.load(spec, allow_pickle=False)
        except FileNotFoundError:
            raise ModelError(f"--grad-ys: file '{spec}' not found") from None
        except (OSError, ValueError) as e:
            raise ModelError(f"--grad-ys: cannot read '{spec}' as a .npy array ({one_line(e)})") from None
    return spec


def same_file(a: Path, b: Path) -> bool:
    """Whether two paths name the same file (``b`` may not exist yet)."""
    try:
        return b.exists() and os.path.samefile(a, b)
    except OSError:
        return a.resolve() == b.resolve()


def dtype_name(elem_type: int) -> str:
    """numpy's name for an ONNX element type (``float32``), or ONNX's own where numpy has none."""
    try:
        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem_type)).name
    except (KeyError, TypeError, ValueError):
        return onnx.TensorProto.DataType.Name(elem_type).lower() if elem_type else "?"


def type_string(model: onnx.ModelProto, name: str) -> str:
    """``float32[batch,4]`` for a graph input or output of ``model``."""
    for vi in [*model.graph.output, *model.graph.input]:
        if vi.name == name and vi.type.HasField("tensor_type"):
            t = vi.type.tensor_type
            dtype = dtype_name(t.elem_type)
            if not t.HasField("shape"):
                return dtype
            dims = [str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in t.shape.dim]
            return f"{dtype}[{','.join(dims)}]"
    return "?"


@cli.command("grad")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the model with gradient outputs (written atomically).")
@click.option("--ys", multiple=True, required=True, metavar="NAME", help="A value to differentiate (repeatable).")
@click.option("--xs", multiple=True, required=True, metavar="NAME",
              help="A value to differentiate with respect to (repeatable); @weights and @inputs name every "
              "float weight / float graph input.")
@click.option("--grad-ys", "grad_ys", multiple=True, metavar="Y=SPEC",
              help="Seed for y: a value name in the graph, a .npy file, or the word 'input' (a new graph input).")
@click.option("--stop-gradients", "stop_gradients", multiple=True, metavar="NAME",
              help="A value treated as constant (repeatable).")
@click.option("--unconnected-gradients", type=click.Choice(["none", "zero"]), default="none", show_default=True,
              help="What an x that no y depends on gets.")
@click.option("--aggregation-method", type=click.Choice(AGGREGATION_CHOICES), default="default", show_default=True,
              help="How contributions to one gradient are added (values agree).")
@click.option("--gate-gradients", is_flag=True, help="Accepted for tf.gradients compatibility; no effect in ONNX.")
@click.option("--name", "scope", default="gradients", show_default=True, metavar="SCOPE",
              help="Prefix of every new node and value name (uniquified).")
@click.option("--order", type=click.IntRange(1, 8), default=1, show_default=True,
              help="Also append derivatives of order 2..N: order k differentiates <order k-1 gradient, v_k>, "
              "v_k a new input per x (order 2: Hessian-vector products).")
@click.option("--hvp-mode", type=click.Choice(["auto", "forward-over-reverse", "reverse-over-reverse"]),
              default="auto", show_default=True,
              help="How order 2 is built: auto takes forward-over-reverse where every node on the path has a forward "
              "rule (fewer nodes, faster), else reverse-over-reverse.")
@click.option("--recompute", multiple=True, metavar="NAME",
              help="A forward value (or fnmatch pattern) to recompute in the gradient part instead of keeping it "
              "alive (repeatable).")
@click.option("--remat", type=click.Choice(["nothing-saveable", "matmuls-only"]), default=None,
              help="Rematerialisation policy: recompute every forward value the gradient reads, or all but the "
              "products (MatMul, Gemm, Conv).")
@click.option("--memory-budget", metavar="BYTES",
              help="Recompute the largest forward values the gradient reads until the rest fits (512MB, 1.5GiB), "
              "sizes taken at the --dim sizes (symbolic dimensions not named: 1).")
@click.option("--dim", "dim_items", multiple=True, metavar="NAME=SIZE",
              help="Size of a symbolic dimension for --memory-budget.")
@click.option("--straight-through", is_flag=True,
              help="Pass gradients through each QuantizeLinear -> DequantizeLinear pair of a quantized model where x "
              "lies inside the integer grid (torch's fake-quantisation estimator); without it they pass none.")
@click.option("--json", "as_json", is_flag=True, help="Print only a JSON object on stdout.")
def grad(
    model: Path,
    out: Path,
    ys: tuple[str, ...],
    xs: tuple[str, ...],
    grad_ys: tuple[str, ...],
    stop_gradients: tuple[str, ...],
    unconnected_gradients: str,
    aggregation_method: str,
    gate_gradients: bool,
    scope: str,
    order: int,
    hvp_mode: str,
    recompute: tuple[str, ...],
    remat: str | None,
    memory_budget: str | None,
    dim_items: tuple[str, ...],
    straight_through: bool,
    as_json: bool,
) -> None:
    """Append the gradients of sum(grad_ys * ys) with respect to each x to MODEL, as outputs of OUT.

    OUT keeps every output of MODEL first, unchanged, then one output per x that has a gradient.
    MODEL itself is never written."""
    if same_file(model, out):
        raise click.BadParameter("OUT is the input model; choose another path", param_hint="'-o'")
    seeds = parse_grad_ys(grad_ys, ys)
    options: dict[str, Any] = dict(
        name=scope, gate_gradients=gate_gradients, aggregation_method=aggregation_method,
        stop_gradients=list(stop_gradients), unconnected_gradients=unconnected_gradients,
    )
    if order > 1:
        options["hvp_mode"] = hvp_mode
    if straight_through:
        options["straight_through"] = True
    if recompute:
        options["recompute"] = list(recompute)
    if remat:
        options["remat"] = remat
    if memory_budget is not None:
        from onnxgrad.cli.common import parse_dims
        from onnxgrad.remat import Budget

        options["memory_budget"] = Budget(memory_budget, parse_dims(dim_items))
    with model_errors(model):
        before = len(load_model(model, load_external_data=False).graph.node)  # the graph only: weights stay put
        # add_gradients decides how to read MODEL (weights in external data stay on disk) and writes OUT
        aug = add_gradients(model, list(ys), list(xs), seeds, order=order, output=out, **options)
    report(aug.model, out, aug.gradients, aug.new_inputs, before, as_json, aug.higher)


def report(
    model: onnx.ModelProto, out: Path, gradients: dict[str, str | None], new_inputs: list[str], before: int,
    as_json: bool, higher: dict[int, dict[str, str | None]] | None = None,
) -> None:
    """The JSON object, or a short human-readable summary."""
    if as_json:
        payload: dict[str, Any] = {"gradients": gradients, "new_inputs": new_inputs}
        if higher:
            payload["higher"] = {str(k): found for k, found in higher.items()}
        click.echo(json.dumps(payload))
        return
    opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), "?")
    added = len(model.graph.node) - before
    click.echo(f"wrote {out} (opset {opset}, {added} gradient nodes, {len(model.graph.output)} outputs)")
    width = max(len(x) for x in gradients)
    for x, name in gradients.items():
        target = "none (no float path to the ys)" if name is None else f"{name}  {type_string(model, name)}"
        click.echo(f"  d/d {x:<{width}}  ->  {target}")
    for k, found in (higher or {}).items():
        for x, name in found.items():
            target = "none" if name is None else f"{name}  {type_string(model, name)}"
            click.echo(f"  order {k}: d/d {x:<{width}}  ->  {target}")
    for name in new_inputs:
        click.echo(f"  new input: {name}  {type_string(model, name)}")

