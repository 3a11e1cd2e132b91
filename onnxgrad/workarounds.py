"""What each runtime gets wrong or lacks, and what onnxgrad does about it: one place for all of them.

Every entry is a section headed by the runtime, its version and the symptom, then the function (or the
facts) the rest of onnxgrad uses. A workaround here changes how the output is spelled, never what it
computes: the augmented model is valid ONNX with or without it. When a runtime fixes its bug, the
section says from which version, and the workaround can go.

To add one: append a section below, in the same form.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import numpy as np
import onnx_ir as ir

# ----------------------------------------------------------------------------------------------------------
# onnxruntime 1.31: EliminateIdentity together with DivMulFusion builds an invalid graph.
#
# When a forward value ``t`` feeds both the gradient part and an ``Identity`` whose output is a graph output,
# onnxruntime's graph optimizer (EliminateIdentity, then DivMulFusion on the gradient's ``Div(1, t) * v``
# patterns around ``t``) builds an invalid graph. Reading the Identity's output instead of ``t`` (the same
# tensor) avoids it. The graph that found it is kept in tests/test_fuzz.py (REGRESSIONS).


def read_through_output_identities(graph: ir.Graph, live: Iterable[ir.Node], keep: set[int]) -> None:
    """Where a forward value also feeds an Identity that is an output of ``graph``, make the new nodes ``live``
    (those whose ids are in ``keep``) read that Identity's output instead (the same tensor)."""
    live = list(live)
    alias: dict[ir.Value, ir.Value] = {}
    for node in live:
        for v in node.inputs:
            if v is None or v in alias or (p := v.producer()) is None or id(p) in keep:
                continue
            for use in v.uses():
                u = use.node
                if (u.op_type == "Identity" and not u.domain and id(u) not in keep
                        and u.outputs[0].is_graph_output() and u.graph is graph):
                    alias[v] = u.outputs[0]
                    break
    if not alias:
        return
    for node in live:
        for i, v in enumerate(node.inputs):
            if v is not None and v in alias:
                node.replace_input_with(i, alias[v])


# ----------------------------------------------------------------------------------------------------------
# onnxruntime 1.31, CPU: ScatterND with reduction='add' races on repeated indices.
#
# Its kernel adds the update slices in parallel (intra-op threads > 1), so two slices bound for the same row may
# lose one another: 1,024 rows of 256 added into row 0 of a (2, 256) table came out 70% off at 2 threads, and
# differently each run (exact at 1 thread; ScatterElements with reduction='add' is exact at any count). An
# embedding's gradient is that scatter wherever a token repeats (BERT's token-type table: 15-33% off). The
# rows' scatter (``Emitter.scatter_add_rows``) therefore writes ScatterND only where its indices are
# constants without repeats (a split into q, k and v), and ScatterElements along the rows otherwise (its
# indices spread over the update's shape: int64 memory of the update's element count). The graph that found
# it: tests/test_rules.py (test_repeated_rows_accumulate_at_every_thread_count).


def scatter_nd_is_safe(indices: object) -> bool:
    """Whether onnxruntime's ScatterND may add at these row indices: a constant (numpy array) without repeats."""
    return isinstance(indices, np.ndarray) and np.unique(indices.reshape(-1)).size == indices.size


# ----------------------------------------------------------------------------------------------------------
# onnxruntime 1.31, CPU: no float64 kernel for some ops.
#
# A float64 model with one of these ops fails when its session is created ("Could not find an implementation
# for Conv(11) node with name ..."). ``onnxgrad check`` computes in float64 where it can: it tries, reads the
# gap from the error (``kernel_gap``) and falls back to float32, saying which kernel was missing. The rule
# tests feed these ops float32 for the same reason, and onnxgrad's own gradients avoid emitting them where a
# float64 form exists (Softplus: log(1 + exp(x)) instead). tests/test_check_info.py checks the table below
# against the onnxruntime installed, at opset 17, so it cannot go stale silently.

NO_FLOAT64_KERNELS = frozenset({
    "Acos", "Acosh", "Asin", "Asinh", "Atan", "Atanh", "AveragePool", "Conv", "ConvTranspose", "Cosh", "Det", "Elu",
    "Erf", "GlobalAveragePool", "GlobalLpPool", "GlobalMaxPool", "GridSample", "HardSigmoid", "HardSwish", "Hardmax",
    "InstanceNormalization", "LRN", "LpPool", "Mean", "MeanVarianceNormalization", "Selu", "Sinh", "Softplus",
    "Softsign", "Tan", "ThresholdedRelu",
})


def is_runtime_error(e: BaseException) -> bool:
    """An error raised by onnxruntime itself (a missing kernel, a type its schema refuses)."""
    return type(e).__module__.startswith("onnxruntime")


def kernel_gap(e: BaseException) -> str:
    """One line saying which kernel onnxruntime lacks, read from its error message."""
    text = str(e)
    m = re.search(r"implementation for (\w+)\((\d+)\) node with name '([^']*)'", text)
    if m:
        return f"onnxruntime has no kernel for {m.group(1)}-{m.group(2)} (node '{m.group(3)}') in this type"
    first = text.strip().splitlines()[0] if text.strip() else type(e).__name__
    return first[:200]


# ----------------------------------------------------------------------------------------------------------
# onnxruntime 1.31: its default session settings undo rematerialisation.
#
# A gradient model with recomputed segments (``onnxgrad.remat``) frees memory only if each segment runs right
# before the backward that reads it and its buffers go back when it is done. Three defaults work against that:
#
# * the DEFAULT execution order is a reverse depth-first walk from the leaf nodes, highest index first: a weight
#   gradient that feeds no later node is computed only when the walk reaches its leaf, so the recomputed values it
#   reads stay alive to the end (transformer, sequence 512: peak 147 MiB with nothing-saveable against 124 MiB
#   without remat). PRIORITY_BASED runs nodes in the graph's own order, where onnxgrad puts each segment;
# * the allocation planner's buffer reuse hands a buffer freed in the forward to a later value of the same size,
#   which can be a recomputed value far into the backward, so the buffer is held in between (enable_mem_reuse);
# * fusions beyond the basic level replace nodes by new ones with the highest indices, which the priority order
#   then runs late (nothing-saveable: peak 84 MiB with ORT_ENABLE_ALL against 55 MiB with ORT_ENABLE_BASIC).
#
# ``onnxgrad.runtime.session`` applies these settings to a model whose metadata carries REMAT_KEY; the numbers and
# the time they cost are in bench/RESULTS.md (bench/remat.py).

REMAT_KEY = "onnxgrad.remat"


def remat_session_options(opts: object) -> None:
    """Set an onnxruntime SessionOptions for a gradient model with recomputed segments (see above)."""
    import onnxruntime as ort

    assert isinstance(opts, ort.SessionOptions)
    opts.execution_order = ort.ExecutionOrder.PRIORITY_BASED
    opts.enable_mem_reuse = False
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


def has_remat(model: object) -> bool:
    """True when an onnx ModelProto's metadata says onnxgrad recomputed forward values in it."""
    return any(p.key == REMAT_KEY for p in getattr(model, "metadata_props", ()))


# ------------------------------------------------------------------------ a Conv over zero input channels
# onnxruntime 1.31's CPU Conv never returns when its input has 0 channels (a (1, 0, 7, 18) input with a (4, 0, 7, 6)
# kernel: killed after 10 s; 2 channels: 1 ms). The weight-gradient Convs of plans/conv.py take the batch as their
# channels (the interleaved form: X as (1, N, ...), dY^T as the kernel; the grouped form: X^T as (C, N, ...)), so a
# fwd+bwd run fed an empty batch would hang. ``runtime.session`` marks the CPU sessions of models with a Conv whose
# kernel is a run-time value, and ``runtime.run`` refuses such a session an input with a zero-size dimension, with
# this message, instead of hanging.

# ----------------------------------------------------------------------------------------------------------
# onnxruntime 1.31: its extended graph optimizations change float64 results.
#
# Beyond the basic level (constant folding, redundant nodes: exact), onnxruntime fuses patterns into contrib
# kernels whose float64 forms do not compute as the nodes they replace: SimplifiedLayerNormFusion (T5's RMS norm,
# Pow -> ReduceMean -> Add -> Sqrt -> Div -> Mul) moves a T5 encoder's float64 output by 6e-6 relative, and
# ``check`` in float64 read MISMATCH (1e-5) on its weights though onnxgrad agreed with the reference evaluator to
# 3e-9. Every session ``onnxgrad.runtime`` opens for a model with float64 inputs or outputs (``computes_in_float64``)
# runs at the basic level (``exact_session_options``): a float64 check's, and forces and Hessian-vector products in
# float64, which kept 6 digits otherwise.


def computes_in_float64(model: object) -> bool:
    """True when an onnx ModelProto has a float64 graph input or output."""
    graph = getattr(model, "graph", None)
    double = int(ir.DataType.DOUBLE)
    return graph is not None and any(v.type.tensor_type.elem_type == double for v in [*graph.input, *graph.output])


def exact_session_options(opts: object) -> None:
    """Set an onnxruntime SessionOptions to run each node as written (graph optimizations at the basic level)."""
    import onnxruntime as ort

    assert isinstance(opts, ort.SessionOptions)
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC


EMPTY_CONV_MESSAGE = ("input {name!r} has a zero-size dimension {shape}: onnxruntime's Conv hangs over zero input "
                      "channels, which the weight gradients of this model's convolutions (the batch as channels) "
                      "would get; run it with at least one sample")


def has_run_time_kernel_conv(model: object) -> bool:
    """True when an onnx ModelProto's main graph has a Conv or ConvTranspose whose kernel is not an initializer."""
    graph = getattr(model, "graph", None)
    if graph is None:
        return False
    fixed = {i.name for i in graph.initializer} | {o for n in graph.node if n.op_type == "Constant" for o in n.output}
    return any(n.op_type in ("Conv", "ConvTranspose") and len(n.input) > 1 and n.input[1] not in fixed
               for n in graph.node)


def empty_input(feeds: object) -> tuple[str, tuple[int, ...]] | None:
    """The name and shape of a feed with a zero-size dimension, or None."""
    for name, value in dict(feeds).items():  # type: ignore[call-overload]
        shape = tuple(getattr(value, "shape", ()))
        if 0 in shape:
            return name, shape
    return None
