"""Ops whose outputs are constant with respect to their float inputs: the walk stops at them.

Most of these already have integer, bool or string outputs, which the walk prunes by dtype; declaring
them says so explicitly (and covers values whose dtype is unknown). The rest have float outputs that
are piecewise constant (Floor, Hardmax) or random. A few (``undefined=True``: Range, OneHot, MelWeightMatrix,
DequantizeLinear's scale) have float inputs that do change the output but get no rule here: a gradient
through them is undefined, which the walk keeps apart from "not connected" and never turns into zeros
(TensorFlow silently treats Range and OneHot as constants; stop_gradients does that here on request).
Every ai.onnx schema of onnx 1.23 was reviewed; differentiable ops live in the other rule modules.
"""

from __future__ import annotations

from onnxgrad.registry import register_nondifferentiable

register_nondifferentiable(
    "Equal", "Less", "Greater", "LessOrEqual", "GreaterOrEqual", "IsNaN", "IsInf",
    notes="bool output",
)
register_nondifferentiable("Not", "And", "Or", "Xor", notes="bool inputs and output")
register_nondifferentiable(
    "BitShift", "BitwiseAnd", "BitwiseOr", "BitwiseXor", "BitwiseNot", notes="integer inputs and output"
)
register_nondifferentiable(
    "Floor", "Ceil", "Round", "Sign",
    notes="piecewise constant: the derivative is 0 almost everywhere (TensorFlow gives None for "
    "Floor/Ceil/Round; pass the gradient straight through with x + stop_gradient(round(x) - x) if wanted)",
)
register_nondifferentiable(
    "Hardmax", notes="a one-hot of the argmax: piecewise constant (use Softmax for a differentiable relaxation)"
)
register_nondifferentiable("ArgMax", "ArgMin", "NonZero", "NonMaxSuppression", notes="integer (index) output")
register_nondifferentiable("Shape", "Size", notes="integer output: depends on the input's shape only")
register_nondifferentiable("EyeLike", notes="depends on the input's shape only")
register_nondifferentiable(
    "ConstantOfShape", "Constant", "SequenceEmpty", "BlackmanWindow", "HammingWindow", "HannWindow",
    notes="generated constants",
)
register_nondifferentiable(
    "Range", "MelWeightMatrix", "OneHot", undefined=True,
    notes="no gradient for its float inputs (Range's start and delta, MelWeightMatrix's edge frequencies, "
    "OneHot's values), which do change the output: a gradient through them is undefined (None with a note, "
    "an error under 'zero'); list the output in stop_gradients to treat it as a constant, as TensorFlow does",
)
register_nondifferentiable(
    "RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli",
    notes="random samples: no gradient w.r.t. the shape source or the distribution's parameters "
    "(reparameterise: mean + std * RandomNormalLike(x) differentiates through the Mul and Add)",
)
register_nondifferentiable(
    "QuantizeLinear", "ConvInteger", "MatMulInteger", "QLinearConv", "QLinearMatMul",
    notes="quantisation: integer data and rounding; scales and zero points get no gradient",
)
register_nondifferentiable(
    "DequantizeLinear", "DynamicQuantizeLinear", undefined=True,
    notes="undefined for the float scale (DequantizeLinear) and y_scale (DynamicQuantizeLinear), which do change "
    "the output. With straight_through=True (grad --straight-through) a QuantizeLinear -> DequantizeLinear pair "
    "passes dy to x inside the integer grid, torch's FakeQuantize estimator (per tensor or per axis; "
    "onnxgrad/plans/quantization.py)",
)
register_nondifferentiable("BitCast", notes="reinterprets bits: no derivative")
register_nondifferentiable(
    "StringNormalizer", "StringConcat", "StringSplit", "RegexFullMatch", "TfIdfVectorizer", "ImageDecoder",
    notes="string, byte or integer inputs",
)
register_nondifferentiable("OptionalHasElement", "SequenceLength", notes="bool / integer output")
