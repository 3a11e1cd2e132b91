"""Rule cases: LSTM, GRU and RNN, every attribute (directions, layout, linear_before_reset, activations with
alpha/beta, clip, input_forget, ragged sequence_lens, initial states, peepholes) at opsets 7, 14 and 22.

onnxruntime 1.31 has float32 kernels only for the three (its LSTM and GRU reject float64 at run time), and
none for layout 1: these cases are float32, with the checker's float32 steps and tolerance; float64 and layout 1
are checked in tests/test_recurrent.py. The dynamic variant makes the sequence length a run-time size (the
gradient's recurrences become Loops) where the gradient supports it."""

from __future__ import annotations

from typing import Any

import numpy as np

from tests.gradcheck import Case, Const
from tests.gradcheck import rng_array as r

CASES: list[Case] = []

T, B, IN, H = 3, 2, 3, 2
GATES = {"LSTM": 4, "GRU": 3, "RNN": 1}


def rnn_inputs(op: str, dirs: int = 1, *, bias: bool = True, lens: list[int] | None = None, h0: bool = False,
               c0: bool = False, peep: bool = False, layout: int = 0, dtype: Any = np.float64,
               seed: int = 0) -> list[Any]:
    """X, W, R[, B, sequence_lens, initial_h, initial_c, P] for a small recurrent node (None for absent ones)."""
    g = GATES[op]

    def a(*shape: int, k: int) -> np.ndarray:
        return r(*shape, seed=seed + k, dtype=dtype) * 0.7

    x = a(B, T, IN, k=1) if layout else a(T, B, IN, k=1)
    state = (B, dirs, H) if layout else (dirs, B, H)
    ins: list[Any] = [x, a(dirs, g * H, IN, k=2), a(dirs, g * H, H, k=3),
                      a(dirs, 2 * g * H, k=4) if bias else None,
                      None if lens is None else Const(np.array(lens, np.int32)),
                      a(*state, k=5) if h0 else None, a(*state, k=6) if c0 else None,
                      a(dirs, 3 * H, k=7) if peep else None]
    while ins[-1] is None:
        ins.pop()
    return ins


def rc(op: str, opset: int, id: str, attrs: dict[str, Any] | None = None, outs: list[int] | None = None,
       **kw: Any) -> Case:
    dirs = 2 if (attrs or {}).get("direction") == "bidirectional" else 1
    layout = (attrs or {}).get("layout", 0)
    dtype = np.float32
    n_out = 3 if op == "LSTM" else 2
    # a run-time sequence length (the leading axis) is a Loop from opset 11, where the gradient reads h_{t-1} from
    # the node's Y (all but GRU without linear_before_reset)
    dynamic = layout == 1 or (opset >= 11 and (op != "GRU" or bool((attrs or {}).get("linear_before_reset"))))
    return Case(op, rnn_inputs(op, dirs, layout=layout, dtype=dtype, **kw), {"hidden_size": H, **(attrs or {})},
                opset=opset, id=id, n_outputs=n_out, ys=outs, dynamic=dynamic)


BI = {"direction": "bidirectional"}
REV = {"direction": "reverse"}
RAGGED = [3, 1]
for op in ("LSTM", "GRU", "RNN"):
    c0 = op == "LSTM"
    CASES += [
        rc(op, 7, "forward", {}),
        rc(op, 14, "bidirectional-states", BI, h0=True, c0=c0),
        rc(op, 22, "reverse-ragged-states", REV, lens=RAGGED, h0=True, c0=c0),
        rc(op, 14, "no-bias-Yh-only", {}, outs=[1], bias=False, h0=True),
        rc(op, 7, "ragged-Y-only", {}, outs=[0], lens=RAGGED),
        rc(op, 14, "clip", {"clip": 0.4}, h0=True),
    ]
CASES += [
    rc("LSTM", 14, "peepholes-bidirectional", BI, lens=[2, 3], h0=True, c0=True, peep=True),
    rc("LSTM", 7, "input-forget-peepholes", {"input_forget": 1}, peep=True, c0=True),
    rc("LSTM", 14, "Yc-only", {}, outs=[2], c0=True, peep=True),
    rc("LSTM", 14, "activations-alpha-beta", {"activations": ["HardSigmoid", "LeakyRelu", "ScaledTanh"],
                                              "activation_alpha": [0.3, 0.2, 0.9], "activation_beta": [0.4, 1.1]}),
    rc("LSTM", 14, "activations-bidirectional",
       {**BI, "activations": ["Sigmoid", "Elu", "Softsign", "Affine", "Tanh", "Softplus"],
        "activation_alpha": [0.8, 0.7], "activation_beta": [0.2]}),
    rc("GRU", 14, "linear-before-reset", {"linear_before_reset": 1}, h0=True),
    rc("GRU", 22, "linear-before-reset-bidirectional-ragged", {**BI, "linear_before_reset": 1}, lens=RAGGED),
    rc("GRU", 14, "activations", {"activations": ["HardSigmoid", "Softsign"], "activation_alpha": [0.25],
                                  "activation_beta": [0.45]}),
    rc("RNN", 14, "activations-bidirectional", {**BI, "activations": ["Affine", "LeakyRelu"],
                                                "activation_alpha": [0.9, 0.1], "activation_beta": [0.3]}),
]
