"""Running models in onnxruntime: providers, sessions, feeds."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
import onnxruntime as ort

from onnxgrad.io import one_line

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}
# onnx's reference evaluator: slow, but it knows every opset onnx does (onnxruntime 1.31 stops at 26)
REFERENCE = "reference"
CHOICES = (*PROVIDERS, REFERENCE)  # what the command line offers


@dataclass(frozen=True)
class ValueArg:
    """A graph input or output as onnxruntime's NodeArg shows it: name, 'tensor(float)'-style type, shape."""

    name: str
    type: str
    shape: list[int | str | None]

    @staticmethod
    def of(info: onnx.ValueInfoProto) -> ValueArg:
        t = info.type.tensor_type
        if not info.type.HasField("tensor_type"):
            return ValueArg(info.name, info.type.WhichOneof("value") or "unknown", [])
        name = onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).name
        dims = [d.dim_value if d.HasField("dim_value") else d.dim_param or None for d in t.shape.dim]
        return ValueArg(info.name, f"tensor({_ORT_TYPE_NAMES.get(name, name)})", dims)


_ORT_TYPE_NAMES = {"float32": "float", "float64": "double"}


class ReferenceSession:
    """onnx.reference.ReferenceEvaluator behind the slice of InferenceSession's interface used here."""

    def __init__(self, model: onnx.ModelProto) -> None:
        from onnx.reference import ReferenceEvaluator

        self._model = model
        self._eval = ReferenceEvaluator(model)

    def get_inputs(self) -> list[ValueArg]:
        init = {i.name for i in self._model.graph.initializer}
        return [ValueArg.of(i) for i in self._model.graph.input if i.name not in init]

    def get_outputs(self) -> list[ValueArg]:
        return [ValueArg.of(o) for o in self._model.graph.output]

    def run(self, names: Sequence[str] | None, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        return [np.asarray(v) for v in self._eval.run(list(names) if names else None, dict(feeds))]


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


def provider_label(provider: str) -> str:
    """The name of what runs a model for ``provider`` ('cpu', 'cuda', 'reference'), as shown to users; raises
    like ``providers_for`` when that is not available."""
    return "onnx ReferenceEvaluator" if provider == REFERENCE else providers_for(provider)[0]


def explain(e: BaseException) -> str:
    """onnxruntime's error on one line, without its status-code framing; a model stamped with a newer opset
    than this onnxruntime runs gets told how to run it anyway."""
    text = one_line(e)
    newest = re.search(r"official support for domain (\S+) is till opset (\d+)", text)
    if newest:
        used = re.search(r"Opset (\d+) is under development", text)
        return (f"onnxruntime {ort.__version__} runs {newest[1]} opsets up to {newest[2]}"
                + (f" and this model uses opset {used[1]}" if used else "")
                + ": run it with --provider reference (onnx's reference evaluator, slower)")
    text = re.sub(r"^\[ONNXRuntimeError\] : \d+ : \w+ : ", "", text)
    return re.sub(r"^Load model from .*? failed: ?", "", text)


def session(
    model: onnx.ModelProto | str, provider: str = "cpu", threads: int | None = None
) -> ort.InferenceSession:
    """An InferenceSession for a ModelProto or a path ('reference': onnx's reference evaluator)."""
    if provider == REFERENCE:
        return ReferenceSession(onnx.load(model) if isinstance(model, str) else model)  # type: ignore[return-value]
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
    live = isinstance(model, ort.InferenceSession | ReferenceSession)
    sess = model if live else session(model, provider)  # type: ignore[arg-type]
    names = list(outputs) if outputs is not None else [o.name for o in sess.get_outputs()]
    return dict(zip(names, sess.run(names, dict(feeds)), strict=True))
