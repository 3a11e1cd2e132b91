"""Running models in onnxruntime: providers, sessions, feeds."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import onnx
import onnxruntime as ort

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}


class ProviderUnavailable(RuntimeError):
    """The asked-for execution provider is not in this onnxruntime build."""


def providers_for(provider: str) -> list[str]:
    """onnxruntime provider names for 'cpu' or 'cuda'; never a silent fallback."""
    if provider not in PROVIDERS:
        raise ValueError(f"unknown provider {provider!r}; choose one of {', '.join(PROVIDERS)}")
    name = PROVIDERS[provider]
    if name not in ort.get_available_providers():
        raise ProviderUnavailable(
            f"onnxruntime {ort.__version__} here has no {name} (available: "
            f"{', '.join(ort.get_available_providers())}); install the GPU build with "
            "'pip uninstall onnxruntime && pip install onnxruntime-gpu' on a machine with CUDA"
        )
    return [name] if provider == "cpu" else [name, "CPUExecutionProvider"]


def session(
    model: onnx.ModelProto | str, provider: str = "cpu", threads: int | None = None
) -> ort.InferenceSession:
    """An InferenceSession for a ModelProto or a path."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    source = model if isinstance(model, str) else model.SerializeToString()
    return ort.InferenceSession(source, opts, providers=providers_for(provider))


def run(
    model: onnx.ModelProto | str | ort.InferenceSession,
    feeds: Mapping[str, np.ndarray],
    outputs: Sequence[str] | None = None,
    provider: str = "cpu",
) -> dict[str, np.ndarray]:
    """Run and return the named outputs (all outputs by default)."""
    sess = model if isinstance(model, ort.InferenceSession) else session(model, provider)
    names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds)), strict=True))
