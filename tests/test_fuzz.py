"""Generated graphs against PyTorch autograd and central differences.

CI runs the 'ci' hypothesis profile (a few hundred graphs); ``make fuzz`` runs the 'long' profile.
Failures hypothesis finds shrink to a minimal spec; keep them in ``REGRESSIONS`` below."""

from __future__ import annotations

import os

from hypothesis import HealthCheck, given, settings

from tests.fuzz import GraphSpec, check_spec, graph_specs

settings.register_profile("ci", max_examples=300, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("long", max_examples=20000, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("ONNXGRAD_FUZZ_PROFILE", "ci"))

# minimal graphs that once failed, kept so they never fail again
REGRESSIONS: list[GraphSpec] = [
    # a forward value read by the gradient and by an Identity that is a graph output: onnxruntime 1.31's
    # EliminateIdentity + DivMulFusion built an invalid graph until the emitter read the Identity's output
    GraphSpec(opset=11, inputs=[(), (), ()], nodes=[("DivP", (1, 0), {}), ("Identity", (3,), {}), ("Tanh", (0,), {}),
              ("Tanh", (0,), {})], ys=[4], xs=[0], stop=[], seed=0),
    # a Loop carry that grows by Concat (onnxruntime refused the saving Loop's scan output of changing shape), read
    # after the Loop and, through its start, before it; 0 and 3 trips, Unsqueeze's two forms
    *(GraphSpec(opset=o, inputs=[(2, 3), (3,)], nodes=[("LoopCat", (0, 1), {"shape": [2, 3], "trips": k}),
                                                       ("Mul", (2, 0), {})], ys=[3], xs=[0, 1], stop=[], seed=1)
      for o, k in ((11, 3), (13, 0), (17, 3))),
]


@given(graph_specs())
def test_generated_graph(spec: GraphSpec) -> None:
    check_spec(spec)


def test_regressions() -> None:
    for spec in REGRESSIONS:
        check_spec(spec)
