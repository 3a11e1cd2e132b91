"""Rule cases: fused ops (Attention, RotaryEmbedding, TensorScatter), losses, Dropout, DFT and STFT."""

from __future__ import annotations

import numpy as np

from tests.gradcheck import Case, Const
from tests.gradcheck import rng_array as r

CASES: list[Case] = []


def F(a: np.ndarray) -> np.ndarray:
    """float32 copy, for kernels onnxruntime has no float64 for."""
    return a.astype(np.float32)


# ----------------------------------------------------------------------------------------- Attention
# Q (B, Hq, Sq, D) / K (B, Hkv, T, D) / V (B, Hkv, T, Dv), or 3-D (B, S, H*D) with q/kv_num_heads.
Q4, K4, V4 = r(2, 2, 3, 4, seed=1), r(2, 2, 5, 4, seed=2), r(2, 2, 5, 3, seed=3)
GQ4 = r(2, 4, 3, 4, seed=4)  # four query heads over two KV heads
Q3, K3, V3 = r(2, 3, 8, seed=5), r(2, 5, 4, seed=6), r(2, 5, 6, seed=7)  # Hq=4, Hkv=2, D=2, Dv=3
PK, PV = r(2, 2, 2, 4, seed=8), r(2, 2, 2, 3, seed=9)  # two cached positions
HEADS = {"q_num_heads": 4, "kv_num_heads": 2}
CASES += [
    Case("Attention", [Q4, K4, V4], opset=23, id="mha"),
    Case("Attention", [GQ4, K4, V4, r(3, 5, seed=10)], opset=23, id="gqa-float-mask"),
    Case("Attention", [GQ4, K4, V4, Const(r(2, 1, 3, 5, seed=11) > -0.5)], attrs={"scale": 0.3}, opset=23,
         id="gqa-bool-mask-scale"),
    Case("Attention", [Q3, K3, V3], attrs=HEADS, opset=23, id="3d-gqa"),
    # onnxruntime 1.31 cannot run a float64 Attention with is_causal and a float mask (its function body
    # mixes float and double): float32, with the checker's float32 steps and tolerance.
    Case("Attention", [F(Q3), F(K3), F(V3), r(1, 4, 3, 5, seed=12, dtype=np.float32)],
         attrs={**HEADS, "is_causal": 1}, opset=23, id="3d-causal-mask-f32"),
    Case("Attention", [Q4, K4, V4, None, PK, PV], attrs={"is_causal": 1}, opset=23, n_outputs=3,
         id="past-causal"),
    Case("Attention", [Q3, K3, V3, r(3, 7, seed=13), PK[:, :, :, :2], PV], attrs=HEADS, opset=23, n_outputs=3,
         id="3d-past-mask"),
    Case("Attention", [GQ4, K4, V4], attrs={"softcap": 1.5, "scale": 0.8}, opset=23, id="softcap"),
    Case("Attention", [r(2, 3, 3, 4, seed=14), r(2, 1, 5, 4, seed=15), r(2, 1, 5, 3, seed=16)], opset=23,
         id="mqa"),
    *[Case("Attention", [GQ4, K4, V4, r(3, 5, seed=17)], attrs={"qk_matmul_output_mode": m, "softcap": 2.0},
           opset=23, n_outputs=4, ys=[0, 3], id=f"qk-mode{m}") for m in range(4)],
    Case("Attention", [F(Q4), F(K4), F(V4), r(2, 2, 3, 5, seed=18, dtype=np.float32)], attrs={"is_causal": 1},
         opset=24, id="v24-causal-mask-f32"),
    Case("Attention", [GQ4, K4, V4, r(3, 3, seed=19)], opset=24, id="v24-short-mask"),
    Case("Attention", [Q4, K4, V4, None, None, None, np.array([5, 3])], attrs={"is_causal": 1}, opset=24,
         id="v24-nonpad"),
    Case("Attention", [Q3, K3, V3, None, PK[:, :, :, :2], PV], attrs={**HEADS, "is_causal": 1}, opset=25,
         n_outputs=3, id="v25-3d-past-causal"),
]

# ----------------------------------------------------------------------------------- RotaryEmbedding
# onnxruntime has RotaryEmbedding for float32/float16 only: float32 with the checker's float32 tolerance.
X4, X3 = r(2, 2, 3, 8, seed=20, dtype=np.float32), r(2, 3, 16, seed=21, dtype=np.float32)
COS3, SIN3 = r(2, 3, 4, seed=22, dtype=np.float32), r(2, 3, 4, seed=23, dtype=np.float32)
COS2, SIN2 = r(6, 4, seed=24, dtype=np.float32), r(6, 4, seed=25, dtype=np.float32)
PIDS = np.array([[0, 1, 2], [2, 3, 5]])  # position 2 used twice: the cache gradients accumulate
CASES += [
    Case("RotaryEmbedding", [X4, COS3, SIN3], opset=23, id="4d"),
    Case("RotaryEmbedding", [X4, COS2, SIN2, PIDS], attrs={"interleaved": 1}, opset=23, id="4d-interleaved-pids"),
    Case("RotaryEmbedding", [X3, COS2[:, :2], SIN2[:, :2], PIDS],
         attrs={"num_heads": 2, "rotary_embedding_dim": 4, "interleaved": 1}, opset=23, id="3d-partial-pids"),
    Case("RotaryEmbedding", [X3, COS3[..., :3], SIN3[..., :3]], attrs={"num_heads": 2, "rotary_embedding_dim": 6},
         opset=23, id="3d-partial"),
]

# ------------------------------------------------------------------------------------- TensorScatter
# The KV-cache writer that feeds Attention; its rule lives in shape.py. 4-D caches, circular wrap-around.
CACHE, UPD = r(2, 3, 6, 4, seed=26), r(2, 3, 2, 4, seed=27)
CASES += [
    Case("TensorScatter", [CACHE, UPD], opset=24, id="prefill"),
    Case("TensorScatter", [CACHE, UPD, np.array([1, 4])], opset=24, id="write-indices"),
    Case("TensorScatter", [CACHE, r(2, 3, 3, 4, seed=28), np.array([5, 2])], attrs={"mode": "circular"}, opset=24,
         id="circular"),
    Case("TensorScatter", [r(2, 6, 3, seed=29), r(2, 2, 3, seed=30), np.array([3, 0])], attrs={"axis": 1},
         opset=24, id="axis1"),
]

# ---------------------------------------------------------------------------------------------- losses
LOGITS2, LOGITS4 = r(4, 5, seed=31), r(2, 4, 3, 2, seed=32)  # (N, C) and (N, C, d1, d2)
LABELS2 = np.array([0, 2, 4, 2])
LABELS4 = np.array([[[0, 1], [3, 1], [2, 2]], [[1, 0], [3, 3], [0, 1]]])
CLASS_W = r(4, seed=33, low=0.5, high=2.0)
for op in ["NegativeLogLikelihoodLoss", "SoftmaxCrossEntropyLoss"]:
    sce = op == "SoftmaxCrossEntropyLoss"
    CASES += [
        Case(op, [LOGITS2, LABELS2], opset=12, id="2d-mean"),
        Case(op, [LOGITS4, LABELS4, CLASS_W], attrs={"reduction": "sum", "ignore_index": 1}, opset=12,
             id="nd-w-sum-ignore"),
        Case(op, [LOGITS4, LABELS4, CLASS_W], attrs={"ignore_index": 3}, opset=13, n_outputs=1 + sce,
             id="nd-w-mean-ignore"),
        Case(op, [LOGITS4, LABELS4.astype(np.int32), CLASS_W], attrs={"reduction": "none"}, opset=13,
             n_outputs=1 + sce, id="nd-w-none-int32"),
        Case(op, [LOGITS4, np.where(LABELS4 == 2, -100, LABELS4)], attrs={"ignore_index": -100}, opset=13,
             id="nd-mean-ignore-outside"),
    ]
CASES += [
    Case("NegativeLogLikelihoodLoss", [LOGITS2, LABELS2, CLASS_W[[0, 1, 2, 3, 0]]], opset=22, id="v22-w-mean"),
    Case("SoftmaxCrossEntropyLoss", [LOGITS4, LABELS4, CLASS_W], attrs={"reduction": "none"}, opset=12,
         n_outputs=2, ys=[1], id="log-prob-only"),
]

# --------------------------------------------------------------------------------------------- Dropout
# Training-mode comparisons must be deterministic: ratio 0 keeps every lane (mask all true, scale 1); the
# mask itself is checked by tests that run one training-mode pass and compare dx with dy * mask / (1 - ratio).
XD = r(3, 4, seed=34)
TRUE, FALSE = np.array(True), np.array(False)
CASES += [
    Case("Dropout", [XD], attrs={"ratio": 0.3}, opset=7, id="v7"),
    Case("Dropout", [XD], attrs={"ratio": 0.3}, opset=10, n_outputs=2, id="v10-mask"),
    Case("Dropout", [XD, Const(np.array(0.3))], opset=12, id="v12-inference"),
    Case("Dropout", [XD, Const(np.array(0.0)), Const(TRUE)], opset=12, n_outputs=2, id="v12-train-mask"),
    Case("Dropout", [XD, Const(np.array(0.0)), Const(TRUE)], opset=13, id="v13-train-nomask"),
    Case("Dropout", [XD, Const(np.array(0.0)), TRUE], opset=13, n_outputs=2, id="v13-runtime-train"),
    Case("Dropout", [XD, Const(np.array(0.4)), FALSE], opset=13, n_outputs=2, id="v13-runtime-inference"),
    Case("Dropout", [XD, Const(np.array(0.0, dtype=np.float32)), Const(TRUE)], opset=22, id="v22-train"),
]

# ------------------------------------------------------------------------------------------ DFT, STFT
# (..., n, 1) real or (..., n, 2) complex signals; every DFT form is linear, so central differences are exact.
SIG_R, SIG_C = r(2, 6, 1, seed=35), r(2, 6, 2, seed=36)
SIG4_R, SIG4_C = r(2, 5, 6, 1, seed=37), r(2, 3, 6, 2, seed=38)
SPEC = r(2, 4, 2, seed=39)  # a one-sided spectrum of 4 bins: IRFFT of length 6 (default) or 7
N = lambda n: Const(np.array(n))  # noqa: E731
CASES += [
    Case("DFT", [SIG_R], attrs={"axis": 1}, opset=17, id="real"),
    Case("DFT", [SIG_C, N(8)], attrs={"axis": 1}, opset=17, id="complex-pad"),
    Case("DFT", [SIG4_C, N(4)], attrs={"axis": 2}, opset=17, id="complex-truncate-axis2"),
    Case("DFT", [SIG_C], attrs={"axis": 1, "inverse": 1}, opset=17, id="inverse"),
    Case("DFT", [SIG_R, N(8)], attrs={"axis": -2, "inverse": 1}, opset=17, id="inverse-real-pad"),
    Case("DFT", [SIG_R], attrs={"axis": 1, "onesided": 1}, opset=17, id="rfft"),
    Case("DFT", [SIG_R, N(9)], attrs={"axis": 1, "onesided": 1}, opset=17, id="rfft-pad-odd"),
    Case("DFT", [SIG4_R, N(4)], attrs={"axis": 2, "onesided": 1}, opset=17, id="rfft-truncate"),
    Case("DFT", [SPEC], attrs={"axis": 1, "onesided": 1, "inverse": 1}, opset=17, id="irfft"),
    Case("DFT", [SPEC, N(7)], attrs={"axis": 1, "onesided": 1, "inverse": 1}, opset=17, id="irfft-odd"),
    # Along the batch axis, the dynamic-batch run exercises the run-time length forms.
    Case("DFT", [SIG4_C], attrs={"axis": 0}, opset=17, id="batch-axis"),
    Case("DFT", [SPEC], attrs={"axis": 0, "onesided": 1, "inverse": 1}, opset=17, id="irfft-batch-axis"),
    Case("DFT", [SIG4_R], attrs={"axis": 0, "onesided": 1}, opset=17, id="rfft-batch-axis"),
    Case("DFT", [SIG4_R], opset=20, id="default-axis"),
    Case("DFT", [SIG4_C, None, N(1)], attrs={"inverse": 1}, opset=20, id="axis-input-inverse"),
    Case("DFT", [SIG4_C, N(3), N(0)], opset=20, id="batch-axis-truncate"),
    Case("DFT", [SIG4_R, N(7), N(-3)], attrs={"onesided": 1}, opset=20, id="rfft-neg-axis"),
    Case("DFT", [r(2, 3, 4, 2, seed=40), None, N(2)], attrs={"onesided": 1, "inverse": 1}, opset=20,
         id="irfft"),
]
SIGNAL_R, SIGNAL_C, WIN = r(2, 16, 1, seed=41), r(2, 16, 2, seed=42), r(6, seed=43)
CASES += [
    # onnx shape inference takes STFT's onesided default as 0 (the schema and onnxruntime say 1): spell it out.
    # With only the window giving the frame length, a symbolic window length leaves the output unshaped,
    # which the one-node harness cannot declare: those cases run with static shapes only. The run-time
    # forms are exercised by "full-window-length" (its window length is symbolic in the dynamic run).
    Case("STFT", [SIGNAL_R, N(3), WIN], attrs={"onesided": 1}, opset=17, id="window", dynamic=False),
    Case("STFT", [SIGNAL_R, N(4), WIN, N(6)], attrs={"onesided": 0}, opset=17, id="full-window-length"),
    Case("STFT", [SIGNAL_R, N(5), None, N(5)], attrs={"onesided": 1}, opset=17, id="rect-odd"),
    Case("STFT", [SIGNAL_C, N(3), Const(WIN)], attrs={"onesided": 0}, opset=17, id="complex-const-window"),
    Case("STFT", [SIGNAL_R, N(3), WIN], attrs={"onesided": 1}, opset=20, id="v20-model", dynamic=False),
]

# ------------------------------------------------------------- function-bodied ops (onnxgrad.rules.functions)
# Differentiated through the schema's function body (Scan unrolled), run on onnx's reference evaluator (opset 27).
# Both schemas allow float32/float16/bfloat16 only: float32, with the checker's float32 steps and tolerance.
LQ, LK, LV = F(r(2, 3, 4, seed=40)), F(r(2, 3, 4, seed=41)), F(r(2, 3, 4, seed=42))  # H=2, d_k=d_v=2, T=3
LS = F(r(2, 2, 2, 2, seed=43, low=-0.5, high=0.5))  # past state (B, H_kv, d_k, d_v)
LG = F(r(2, 3, 2, seed=44, low=-0.5, high=0.0))  # decay (log space), one per KV head
LB = F(r(2, 3, 2, seed=45, low=0.2, high=0.8))  # beta, one per KV head
LA = {"q_num_heads": 2, "kv_num_heads": 2}
CASES += [
    Case("LinearAttention", [LQ, LK, LV, LS], attrs={**LA, "update_rule": "linear"}, opset=27, n_outputs=2,
         id="linear"),
    Case("LinearAttention", [LQ, LK, LV, LS, LG], attrs={**LA, "update_rule": "gated"}, opset=27, n_outputs=2,
         id="gated"),
    Case("LinearAttention", [LQ, LK, LV, LS, None, LB], attrs={**LA, "update_rule": "delta"}, opset=27,
         n_outputs=2, id="delta"),
    Case("LinearAttention", [LQ, LK, LV, LS, LG, LB], attrs=LA, opset=27, n_outputs=2, id="gated-delta"),
    Case("LinearAttention", [LQ, LK[:, :, :2], LV[:, :, :2]],
         attrs={"q_num_heads": 2, "kv_num_heads": 1, "update_rule": "linear", "scale": 0.3}, opset=27,
         n_outputs=2, id="gqa-no-past-scale"),
]
CX, CW = F(r(2, 3, 5, seed=46)), F(r(3, 1, 3, seed=47))  # (B, C, L), depthwise weight (C, 1, k)
CB, CP = F(r(3, seed=48)), F(r(2, 3, 2, seed=49))  # bias (C), past state (B, C, k-1)
# second_order=False: the second-order graph holds a grouped ConvTranspose whose weight has M/group > 1, which onnx
# 1.23's reference evaluator slices wrongly (by output channels: "cannot reshape array"); onnxruntime computes the
# same graph right (the Conv group cases in conv.py pass the second-order check on it).
CC = {"opset": 27, "n_outputs": 2, "second_order": False}
CASES += [
    Case("CausalConvWithState", [CX, CW], id="plain", **CC),
    Case("CausalConvWithState", [CX, CW, CB, CP], id="bias-past", **CC),
    Case("CausalConvWithState", [CX, CW, None, CP], attrs={"activation": "silu"}, id="past-silu", **CC),
    Case("CausalConvWithState", [CX, CW, CB], attrs={"activation": "swish"}, id="bias-swish", **CC),
]
