"""Rule test tables, one module per rule family; ``ALL`` gathers them."""

from tests.cases import (
    activations,
    control_flow,
    conv,
    core,
    experimental,
    fused,
    linalg,
    movement,
    normalization,
    recurrent,
    reductions,
    sampling,
    unary,
)

ALL = [
    *core.CASES,
    *unary.CASES,
    *activations.CASES,
    *reductions.CASES,
    *linalg.CASES,
    *normalization.CASES,
    *conv.CASES,
    *sampling.CASES,
    *movement.CASES,
    *fused.CASES,
    *recurrent.CASES,
    *control_flow.CASES,
    *experimental.CASES,
]
