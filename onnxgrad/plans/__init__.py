"""Speed plans: which of several equivalent gradient forms runs fastest on the target runtime.

Rules state the math; where a gradient has more than one exact form and onnxruntime runs them at very different
speeds, the choice lives here. A plan is a function that returns its value or ``NotApplicable(reason)``; a
table of plans (name -> plan, in order of preference) is tried by ``choose``, and ``explain`` says, plan by plan,
why each does or does not apply. ``fusions`` names groups of nodes that the walk differentiates together
(``plans/fusions.py``: a Conv and the per-channel factor after it, an exported GELU).
"""

from onnxgrad.plans.base import Fusion, NotApplicable, Plan, choose, explain
from onnxgrad.plans.conv import INPUT_GRAD, WEIGHT_GRAD, conv_input_grad, conv_weight_grad
from onnxgrad.plans.fusions import explain as explain_fusions
from onnxgrad.plans.fusions import fusions
from onnxgrad.plans.pool import MAX_POOL, SPREAD, max_pool_input_grad, spread

__all__ = [
    "INPUT_GRAD", "MAX_POOL", "SPREAD", "WEIGHT_GRAD", "Fusion", "NotApplicable", "Plan", "choose",
    "conv_input_grad", "conv_weight_grad", "explain", "explain_fusions", "fusions", "max_pool_input_grad", "spread",
]
