"""Cases for If, Loop and Scan: one node whose bodies read outer values (``captured``), float64 throughout."""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto as TP
from onnx import helper as oh

from tests.gradcheck import Case, Const, Seq
from tests.gradcheck import rng_array as r

D = TP.DOUBLE


def vi(name: str, dims: list[Any] | None, elem: int = D) -> onnx.ValueInfoProto:
    return oh.make_tensor_value_info(name, elem, dims)


def body(nodes: list[tuple[str, str, list[str], dict[str, Any]]], inputs: list[onnx.ValueInfoProto],
         outputs: list[onnx.ValueInfoProto], name: str = "body") -> onnx.GraphProto:
    """A graph from (output, op, inputs, attributes) rows."""
    return oh.make_graph([oh.make_node(op, ins, [out], **kw) for out, op, ins, kw in nodes], name, inputs, outputs)


# If: then = sin(x * w), else = tanh(x) + b; w read by one branch only, b by the other
THEN = body([("t1", "Mul", ["x", "w"], {}), ("t2", "Sin", ["t1"], {})], [], [vi("t2", None)], "then")
ELSE = body([("e1", "Tanh", ["x"], {}), ("e2", "Add", ["e1", "b"], {})], [], [vi("e2", None)], "else")
IF_CAPTURED = {"x": r(2, 3, seed=1), "w": r(2, 3, seed=2), "b": r(3, seed=3)}

# Loop: h' = tanh(h * w + x), scan output h' * (i + 1), until sum(h') > limit (early exit) or M trips
LOOP_BODY = body([("one", "Constant", [], {"value": onnx.numpy_helper.from_array(np.array(1, np.int64))}),
                  ("hw", "Mul", ["h", "w"], {}), ("pre", "Add", ["hw", "x"], {}), ("h2", "Tanh", ["pre"], {}),
                  ("i1", "Add", ["i", "one"], {}), ("fi", "Cast", ["i1"], {"to": D}), ("so", "Mul", ["h2", "fi"], {}),
                  ("s", "ReduceSum", ["h2"], {"keepdims": 0}), ("go", "Less", ["s", "limit"], {})],
                 [vi("i", [], TP.INT64), vi("c", [], TP.BOOL), vi("h", [None])],
                 [vi("go", [], TP.BOOL), vi("h2", [None]), vi("so", [None])])


def loop_captured(limit: float) -> dict[str, Any]:
    return {"w": r(3, seed=2), "x": r(3, seed=3, low=0.2, high=0.6), "limit": np.array(limit)}


# Scan: h' = tanh(h @ w + x_t), scan output h' * z_t
SCAN_BODY = body([("hw", "MatMul", ["h", "w"], {}), ("pre", "Add", ["hw", "xt"], {}), ("h2", "Tanh", ["pre"], {}),
                  ("so", "Mul", ["h2", "zt"], {})],
                 [vi("h", [None, 3]), vi("xt", [None, 3]), vi("zt", [None, 3])],
                 [vi("h2", [None, 3]), vi("so", [None, 3])])

CASES: list[Case] = [
    Case("If", [np.array(True)], {"then_branch": THEN, "else_branch": ELSE}, captured=IF_CAPTURED, id="then"),
    Case("If", [np.array(False)], {"then_branch": THEN, "else_branch": ELSE}, captured=IF_CAPTURED, id="else",
         opset=11),
    Case("If", [Const(np.array(True))], {"then_branch": THEN, "else_branch": ELSE}, captured=IF_CAPTURED,
         id="const-cond", opset=13),
    Case("Loop", [Const(np.array(3)), Const(np.array(True)), r(3, seed=4)], {"body": LOOP_BODY}, n_outputs=2,
         captured=loop_captured(100.0), id="trips", dynamic=False),
    Case("Loop", [Const(np.array(5)), Const(np.array(True)), r(3, seed=4)], {"body": LOOP_BODY}, n_outputs=2,
         captured=loop_captured(1.0), id="early-exit", dynamic=False, opset=11),
    Case("Loop", [Const(np.array(0)), Const(np.array(True)), r(3, seed=4)], {"body": LOOP_BODY}, n_outputs=2,
         ys=[0], captured=loop_captured(100.0), id="zero-trips", dynamic=False, opset=14),
    Case("Scan", [r(2, 3, seed=1), r(4, 2, 3, seed=2), r(4, 2, 3, seed=3)], {"body": SCAN_BODY, "num_scan_inputs": 2},
         n_outputs=2, captured={"w": r(3, 3, seed=5)}, opset=9, dynamic=False),
    Case("Scan", [r(2, 3, seed=1), r(2, 4, 3, seed=2), r(4, 2, 3, seed=3)],
         {"body": SCAN_BODY, "num_scan_inputs": 2, "scan_input_axes": [1, 0], "scan_input_directions": [1, 0],
          "scan_output_axes": [1], "scan_output_directions": [1]},
         n_outputs=2, captured={"w": r(3, 3, seed=5)}, id="axes-directions", dynamic=False),
]

# the opset 8 form: batch axis 0, sequence axis 1, per-element bodies, ragged sequence_lens
SCAN8_BODY = body([("hw", "MatMul", ["h", "w"], {}), ("pre", "Add", ["hw", "xt"], {}), ("h2", "Tanh", ["pre"], {}),
                   ("so", "Mul", ["h2", "zt"], {})],
                  [vi("h", [1, 3]), vi("xt", [1, 3]), vi("zt", [1, 3])], [vi("h2", [1, 3]), vi("so", [1, 3])])
CASES += [
    Case("Scan", [None, r(2, 1, 3, seed=1), r(2, 4, 1, 3, seed=2), r(2, 4, 1, 3, seed=3)],
         {"body": SCAN8_BODY, "num_scan_inputs": 2}, n_outputs=2, captured={"w": r(3, 3, seed=5)}, opset=8,
         id="batched", dynamic=False),
    Case("Scan", [Const(np.array([4, 2, 1], np.int64)), r(3, 1, 3, seed=1), r(3, 4, 1, 3, seed=2),
                  r(3, 4, 1, 3, seed=3)],
         {"body": SCAN8_BODY, "num_scan_inputs": 2, "directions": [1, 0]}, n_outputs=2,
         captured={"w": r(3, 3, seed=5)}, opset=8, id="ragged-reverse", dynamic=False),
]

# sequence and Optional ops: sequences built from graph inputs (Seq), outputs turned back into tensors (finish)
STACK = {"op": "ConcatFromSequence", "axis": 0, "new_axis": 1}
CASES += [
    Case("SequenceConstruct", [r(2, 3, seed=1), r(2, 3, seed=2), r(2, 3, seed=3)], finish=STACK, opset=11),
    Case("SequenceAt", [Seq((r(2, 3, seed=1), r(2, 3, seed=2), r(2, 3, seed=3))), Const(np.array(-2))], opset=11),
    Case("SequenceAt", [Seq((r(2, 3, seed=1), r(2, 3, seed=2))), Const(np.array(1, np.int32))], id="int32-pos"),
    Case("SequenceInsert", [Seq((r(2, 3, seed=1), r(2, 3, seed=2))), r(2, 3, seed=3), Const(np.array(-1))],
         finish=STACK, opset=11),
    Case("SequenceInsert", [Seq((r(2, 3, seed=1), r(2, 3, seed=2))), r(2, 3, seed=3)], finish=STACK, id="at-end"),
    Case("SequenceErase", [Seq((r(2, 3, seed=1), r(2, 3, seed=2), r(2, 3, seed=3))), Const(np.array(-3))],
         finish=STACK, opset=11),
    Case("SequenceErase", [Seq((r(2, 3, seed=1), r(2, 3, seed=2)))], finish=STACK, id="last"),
    Case("ConcatFromSequence", [Seq((r(2, 3, seed=1), r(4, 3, seed=2)))], {"axis": 0}, opset=11, id="ragged"),
    Case("ConcatFromSequence", [Seq((r(2, 3, seed=1), r(2, 3, seed=2)))], {"axis": -1, "new_axis": 1}, id="stack"),
    Case("SplitToSequence", [r(4, 3, seed=1), Const(np.array([2, 2]))], {"axis": 0}, finish=STACK, opset=11),
    Case("SplitToSequence", [r(3, 2, seed=1)], {"axis": 1, "keepdims": 0}, finish=STACK, id="unbind"),
    Case("Optional", [r(2, 3, seed=1)], finish={"op": "OptionalGetElement"}, opset=15),
    Case("OptionalGetElement", [r(2, 3, seed=1)], opset=18, id="tensor-input"),
]
