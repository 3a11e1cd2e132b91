"""Is it a model at all: checks that name what is wrong with a model before any work starts (versions this onnx
does not know, values defined twice or nowhere, cycles, nodes out of order)."""

from __future__ import annotations

import onnx
import onnx_ir as ir

from onnxgrad.registry import opset_of

# the oldest ai.onnx opset onnxgrad emits ops for (add_gradients upgrades older models to it)
MIN_OPSET = 7


def check_versions(model: ir.Model) -> None:
    """A ``ValueError`` when the model's IR version or ai.onnx opset is one this onnx does not know."""
    if model.ir_version is not None and model.ir_version > onnx.IR_VERSION:
        raise ValueError(
            f"the model has IR version {model.ir_version}, newer than onnx {onnx.__version__} knows "
            f"(up to {onnx.IR_VERSION}): upgrade onnx, or save the model with an older exporter"
        )
    imports = model.opset_imports
    if "" not in imports and "ai.onnx" not in imports:
        raise ValueError(
            "the model imports no ai.onnx opset, and the gradient uses ai.onnx ops: "
            f"add one ({MIN_OPSET} or newer) to its opset_import"
        )
    newest = onnx.defs.onnx_opset_version()
    opset = opset_of(model.opset_imports)
    if opset > newest:
        raise ValueError(
            f"the model imports ai.onnx opset {opset}, newer than onnx {onnx.__version__} knows "
            f"(up to {newest}): upgrade onnx, or export the model at opset {newest} or older"
        )


def _node_label(name: str | None, op_type: str, k: int) -> str:
    return f"node '{name}' ({op_type})" if name else f"node #{k} ({op_type}, unnamed)"


def check_names(graph: onnx.GraphProto, outer: frozenset[str] = frozenset()) -> None:
    """A ``ValueError`` naming the first value defined twice, node input defined nowhere (a dangling
    input) or graph output defined nowhere; subgraphs see the names of the graphs around them.

    Runs on the protobuf, before onnx_ir's deserializer (which fails on the first and only warns on
    the others)."""
    where = f" in subgraph '{graph.name}'" if outer else ""
    defined: dict[str, str] = {}

    def define(name: str, what: str) -> None:
        if name in defined:
            raise ValueError(
                f"value '{name}' is defined twice{where}, by {defined[name]} and by {what}: "
                "every value of an ONNX graph must have exactly one producer"
            )
        defined[name] = what

    for v in graph.input:
        define(v.name, "a graph input")
    inputs = set(defined)
    for name in [t.name for t in graph.initializer] + [t.values.name for t in graph.sparse_initializer]:
        if name not in inputs:  # an initializer may give a graph input its default value
            define(name, "an initializer")
    for k, node in enumerate(graph.node):
        for out in node.output:
            if out:
                define(out, _node_label(node.name, node.op_type, k))
    visible = outer | defined.keys()
    for k, node in enumerate(graph.node):
        for name in node.input:
            if name and name not in visible:
                raise ValueError(
                    f"{_node_label(node.name, node.op_type, k)}{where} reads '{name}', which no node, graph input "
                    "or initializer defines (a dangling input)"
                )
        for a in node.attribute:
            for sub in [*([a.g] if a.HasField("g") else []), *a.graphs]:
                check_names(sub, frozenset(visible))
    for v in graph.output:
        if v.name and v.name not in visible:
            raise ValueError(
                f"graph output '{v.name}'{where} is defined by no node, graph input or initializer (a dangling output)"
            )


def check_graph(graph: ir.Graph) -> None:
    """A ``ValueError`` for an empty graph, or a node that reads a value defined nowhere or not yet:
    a cycle (named value by value) or nodes out of topological order."""
    if not len(graph) and not graph.inputs and not graph.initializers:
        raise ValueError(
            f"the graph '{graph.name}' is empty (no nodes, inputs or initializers): nothing to differentiate"
        )
    position = {id(n): k for k, n in enumerate(graph)}
    for k, node in enumerate(graph):
        for v in node.inputs:
            if v is None:
                continue
            producer = v.producer()
            if producer is None and not (v.is_graph_input() or v.is_initializer()):
                raise ValueError(
                    f"{_node_label(node.name, node.op_type, k)} reads '{v.name}', which no node, graph input or "
                    "initializer defines (a dangling input)"
                )
            if producer is None or position.get(id(producer), -1) < k:
                continue
            cycle = _cycle_through(node, position)
            if cycle:
                raise ValueError(
                    f"the graph has a cycle: {' -> '.join(repr(n) for n in cycle)} (each value feeds the next): "
                    "an ONNX graph must be acyclic"
                )
            raise ValueError(
                f"{_node_label(node.name, node.op_type, k)} reads '{v.name}' before "
                f"{_node_label(producer.name, producer.op_type, position[id(producer)])} computes it: the nodes are "
                "not in topological order (onnx_ir's Graph.sort() orders them)"
            )


def _cycle_through(start: ir.Node, position: dict[int, int]) -> list[str]:
    """The value names around a cycle upstream of ``start``, in data-flow order (first = last), or []."""
    state = {id(start): 1}  # 1: on the depth-first path, 2: done
    stack = [(start, iter(start.inputs))]
    via: list[ir.Value] = []  # via[i]: the value stack[i] reads from stack[i + 1]
    while stack:
        node, inputs = stack[-1]
        for v in inputs:
            producer = None if v is None else v.producer()
            if producer is None or id(producer) not in position or state.get(id(producer)) == 2:
                continue
            if state.get(id(producer)) == 1:
                i = next(j for j, (n, _) in enumerate(stack) if n is producer)
                ring = [v, *reversed(via[i:]), v]
                return [r.name or "?" for r in ring]
            state[id(producer)] = 1
            via.append(v)
            stack.append((producer, iter(producer.inputs)))
            break
        else:
            state[id(node)] = 2
            stack.pop()
            if via:
                via.pop()
    return []
