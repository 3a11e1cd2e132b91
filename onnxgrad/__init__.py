"""onnxgrad: tf.gradients for ONNX graphs."""

import os as _os

from onnxgrad.api import NEW_INPUT, AggregationMethod, GradientNote, GradInput, UnconnectedGradients, gradients
from onnxgrad.augment import Augmented, add_gradients
from onnxgrad.forward import jvp
from onnxgrad.higher import hessian_vector_product, higher_order_gradients, jacobian, lower_gradient_ops
from onnxgrad.markers import stop_gradient
from onnxgrad.registry import register as register_gradient
from onnxgrad.registry import register_nondifferentiable
from onnxgrad.values import expose

__all__ = [
    "NEW_INPUT",
    "AggregationMethod",
    "Augmented",
    "GradInput",
    "GradientNote",
    "UnconnectedGradients",
    "add_gradients",
    "expose",
    "gradients",
    "hessian_vector_product",
    "higher_order_gradients",
    "jacobian",
    "jvp",
    "lower_gradient_ops",
    "register_gradient",
    "register_nondifferentiable",
    "stop_gradient",
]
__version__ = "0.1.0"


# The command line is the repository's top-level cli/ folder, installed as onnxgrad.cli (pyproject's package-dir).
# Imported from a source checkout (the repository root first on sys.path, as with PYTHONPATH=. or `python -c` run
# there), this package is the checkout's own onnxgrad/ folder: let onnxgrad.cli resolve to cli/ beside it too.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if all(_os.path.isfile(_os.path.join(_root, *p)) for p in (("cli", "__init__.py"), ("pyproject.toml",))):
    __path__.append(_root)
