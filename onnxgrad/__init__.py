"""onnxgrad: tf.gradients for ONNX graphs."""

from onnxgrad.api import (
    NEW_INPUT,
    AggregationMethod,
    Augmented,
    GradInput,
    UnconnectedGradients,
    add_gradients,
    gradients,
    stop_gradient,
)
from onnxgrad.higher import hessian_vector_product, higher_order_gradients, jacobian, lower_gradient_ops
from onnxgrad.registry import register as register_gradient
from onnxgrad.registry import register_nondifferentiable

__all__ = [
    "NEW_INPUT",
    "AggregationMethod",
    "Augmented",
    "GradInput",
    "UnconnectedGradients",
    "add_gradients",
    "gradients",
    "hessian_vector_product",
    "higher_order_gradients",
    "jacobian",
    "lower_gradient_ops",
    "register_gradient",
    "register_nondifferentiable",
    "stop_gradient",
]
__version__ = "0.1.0"
