"""``onnxgrad jvp``: append forward-mode derivatives (Jacobian-vector products) to a model file."""

from __future__ import annotations

import json
from pathlib import Path

import click
import onnx_ir as ir

from onnxgrad.api import GradInput
from onnxgrad.cli.common import cli
from onnxgrad.cli.grad_cmd import model_errors, same_file, seed_spec, type_string
from onnxgrad.forward import TangentSpec, jvp
from onnxgrad.io import load_model, save_model
from onnxgrad.shorthands import expand_xs
from onnxgrad.upgrade import upgrade
from onnxgrad.validate import check_names
from onnxgrad.values import expose


def parse_tangents(specs: tuple[str, ...], xs: list[str]) -> list[TangentSpec]:
    """One tangent per x from ``X=SPEC`` options (a new graph input where no SPEC names that x)."""
    chosen: dict[str, TangentSpec] = {}
    for item in specs:
        x, sep, spec = item.partition("=")
        if not sep or not x or not spec:
            raise click.BadParameter(f"expected X=SPEC, got {item!r}", param_hint="'--tangent'")
        if x not in xs:
            raise click.BadParameter(f"{x!r} is not one of the --xs", param_hint="'--tangent'")
        found = seed_spec(spec)
        chosen[x] = None if isinstance(found, GradInput) else found  # type: ignore[assignment]
    return [chosen.get(x) for x in xs]


@cli.command("jvp")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the model with JVP outputs (written atomically).")
@click.option("--xs", multiple=True, required=True, metavar="NAME",
              help="A primal: a value given a tangent (repeatable); @weights and @inputs name every float weight / "
              "float graph input.")
@click.option("--ys", multiple=True, metavar="NAME",
              help="A value whose JVP to add (repeatable; default: the graph outputs).")
@click.option("--tangent", "tangents", multiple=True, metavar="X=SPEC",
              help="Tangent of x: a value name in the graph, a .npy file, or the word 'input' (a new graph input, "
              "the default, named <scope>/<x>_tangent).")
@click.option("--stop-gradients", "stop_gradients", multiple=True, metavar="NAME",
              help="A value treated as constant (repeatable).")
@click.option("--unconnected-gradients", type=click.Choice(["none", "zero"]), default="none", show_default=True,
              help="What a y that no x reaches gets.")
@click.option("--name", "scope", default="jvp", show_default=True, metavar="SCOPE",
              help="Prefix of every new node and value name (uniquified).")
@click.option("--json", "as_json", is_flag=True,
              help='Print only {"tangents": {X: INPUT}, "jvps": {Y: OUTPUT|null}} on stdout.')
def jvp_command(model: Path, out: Path, xs: tuple[str, ...], ys: tuple[str, ...], tangents: tuple[str, ...],
                stop_gradients: tuple[str, ...], unconnected_gradients: str, scope: str, as_json: bool) -> None:
    """Append to MODEL the derivative of each y along the tangents of the xs (forward mode), as outputs of OUT.

    OUT keeps every output of MODEL first, unchanged, then one output per y that an x reaches."""
    if same_file(model, out):
        raise click.BadParameter("OUT is the input model; choose another path", param_hint="'-o'")
    with model_errors(model):
        proto = load_model(model)
        check_names(proto.graph)
        m = ir.serde.deserialize_model(upgrade(proto))
        x_list = expand_xs(m, list(xs)) if any(x.startswith("@") for x in xs) else list(xs)
        specs = parse_tangents(tangents, x_list)
        y_list = list(ys) or [o.name or "" for o in m.graph.outputs]
        before = len(m.graph)
        t_names, found = jvp(m, x_list, tangents=specs, ys=y_list, name=scope,
                             stop_gradients=list(stop_gradients) or None, unconnected_gradients=unconnected_gradients)
        expose(m, found)
        result = ir.serde.serialize_model(m)
        save_model(result, out)
    tangent_map = dict(zip(x_list, t_names, strict=True))
    jvp_map = dict(zip(y_list, found, strict=True))
    if as_json:
        click.echo(json.dumps({"tangents": tangent_map, "jvps": jvp_map}))
        return
    click.echo(f"wrote {out} ({len(result.graph.node) - before} tangent nodes, {len(result.graph.output)} outputs)")
    for x, t in tangent_map.items():
        click.echo(f"  tangent of {x}  <-  {t}  {type_string(result, t)}")
    for y, name in jvp_map.items():
        target = "none (no x reaches it)" if name is None else f"{name}  {type_string(result, name)}"
        click.echo(f"  jvp of {y}  ->  {target}")
