"""onnxgrad's own marker ops (defined as model-local functions, so any runtime inlines them)."""

from __future__ import annotations

from onnxgrad.registry import register_nondifferentiable

MARKER_DOMAIN = "onnxgrad"

register_nondifferentiable("StopGradient", domain=MARKER_DOMAIN, notes="stops the walk; runs as Identity")
