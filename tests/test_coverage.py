"""The target operator set: every op with float gradients has a rule at every opset it exists in, 7 on."""

from __future__ import annotations

import onnx
import onnx.defs
import pytest

from onnxgrad import registry

TARGET = """
Abs Acos Acosh Asin Asinh Atan Atanh Cos Cosh Sin Sinh Tan Tanh Exp Log Sqrt Reciprocal Neg Erf Sigmoid
Add Sub Mul Div Pow Mod Max Min Mean Sum Where
Relu LeakyRelu PRelu Elu Selu Celu Gelu HardSigmoid HardSwish Mish Softplus Softsign ThresholdedRelu Shrink Swish
SwiGLU Clip Softmax LogSoftmax
ReduceL1 ReduceL2 ReduceLogSum ReduceLogSumExp ReduceMax ReduceMin ReduceMean ReduceProd ReduceSum ReduceSumSquare
CumSum CumProd
MatMul Gemm Einsum Det
Conv ConvTranspose AveragePool MaxPool LpPool GlobalAveragePool GlobalMaxPool GlobalLpPool MaxUnpool MaxRoiPool
RoiAlign Col2Im GridSample AffineGrid Resize Upsample LRN DeformConv
BatchNormalization InstanceNormalization LayerNormalization GroupNormalization RMSNormalization LpNormalization
MeanVarianceNormalization
Reshape Flatten Squeeze Unsqueeze Transpose Slice Gather GatherElements GatherND Concat Split Pad Expand Tile
DepthToSpace SpaceToDepth Trilu ReverseSequence Compress CenterCropPad ScatterElements ScatterND Scatter TensorScatter
TopK Identity Cast CastLike
Attention RotaryEmbedding SoftmaxCrossEntropyLoss NegativeLogLikelihoodLoss Dropout DFT STFT
LinearAttention CausalConvWithState
If Loop Scan LSTM GRU RNN
SequenceConstruct SequenceAt SequenceInsert SequenceErase ConcatFromSequence SplitToSequence Optional OptionalGetElement
""".split()

LATEST = onnx.defs.onnx_opset_version()


def _live_opsets(op: str) -> list[int]:
    """Opsets from 7 to the newest at which ``op`` exists and is not deprecated."""
    out = []
    for opset in range(7, LATEST + 1):
        try:
            schema = onnx.defs.get_schema(op, max_inclusive_version=opset)
        except onnx.defs.SchemaError:
            continue
        if not schema.deprecated:
            out.append(opset)
    return out


@pytest.mark.parametrize("op", TARGET)
def test_target_op_has_rule_at_every_opset(op: str) -> None:
    opsets = _live_opsets(op)
    assert opsets, f"{op} is not an ai.onnx schema in onnx {onnx.__version__}"
    missing = [n for n in opsets if (r := registry.lookup("", op, n)) is None or not r.differentiable]
    assert not missing, f"{op}: no gradient rule at opset(s) {missing}"


def test_nondifferentiable_declarations_are_not_targets() -> None:
    clash = [r.op_type for r in registry.all_rules() if not r.differentiable and r.op_type in TARGET]
    assert not clash, f"declared non-differentiable but in the target set: {clash}"
