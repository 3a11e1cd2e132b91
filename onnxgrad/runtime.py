"""Running models in onnxruntime: providers, sessions, and feeds (arrays read from ``.npy`` / ``.npz`` files,
the rest drawn at random, seeded), the same for ``onnxgrad run`` and ``onnxgrad check``."""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

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


# ---------------------------------------------------------------------------- feeds
DEFAULT_DIM = 1  # size of a symbolic dimension of a random input, unless told otherwise
# random integer inputs: small non-negative values, valid as indices into most axes (class labels of the bundled
# models/cnn.onnx, which has 3 classes, among them)
INT_RANGE = (0, 3)


class InputArg(Protocol):
    """A graph input as onnxruntime lists it (its NodeArg, or a ``ValueArg``): name, ``tensor(float)`` type, shape."""

    @property
    def name(self) -> str: ...
    @property
    def type(self) -> str: ...
    @property
    def shape(self) -> Sequence[Any]: ...


class FeedError(ValueError):
    """A feed that cannot be had: an unreadable file, an input the model lacks, a type with no random values."""


@dataclass
class Feeds:
    """The arrays to feed, how each was made (``given``, ``random normal, seed 0``...), and the size given to
    each symbolic dimension of the random ones (``?`` for unnamed dimensions)."""

    arrays: dict[str, np.ndarray]
    sources: dict[str, str] = field(default_factory=dict)
    dims: dict[str, int] = field(default_factory=dict)


def model_inputs(model: onnx.ModelProto) -> list[ValueArg]:
    """The graph inputs a caller feeds (initializers left out), as onnxruntime lists them."""
    init = {i.name for i in model.graph.initializer}
    return [ValueArg.of(i) for i in model.graph.input if i.name not in init]


def numpy_dtype(type_name: str) -> np.dtype[Any] | None:
    """The numpy dtype of onnxruntime's ``tensor(float)`` style type names (``bfloat16`` and the float8 types as
    ml_dtypes has them); None for sequences, maps, strings and the like."""
    m = re.fullmatch(r"tensor\((\w+)\)", type_name)
    if m is None:
        return None
    try:
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(onnx.TensorProto.DataType.Value(m.group(1).upper())))
    except (KeyError, TypeError, ValueError):
        return None
    return dtype if dtype.kind in "fiub" or _is_float(dtype) else None


def _is_float(dtype: np.dtype[Any]) -> bool:
    return dtype.kind == "f" or dtype.name.startswith(("bfloat", "float"))


def read_feeds(npz: str | os.PathLike[str] | None = None,
               npy: Iterable[tuple[str, str | os.PathLike[str]]] = ()) -> dict[str, np.ndarray]:
    """Arrays from a ``.npz`` file (its keys are input names), then from ``(input name, .npy file)`` pairs, which
    win. A ``FeedError`` names the file that cannot be read."""
    feeds: dict[str, np.ndarray] = {}
    if npz is not None:
        try:
            with np.load(npz, allow_pickle=False) as archive:
                feeds.update({k: archive[k] for k in archive.files})
        except FileNotFoundError:
            raise FeedError(f"feeds file '{os.fspath(npz)}' not found") from None
        except (OSError, ValueError) as e:
            raise FeedError(f"cannot read '{os.fspath(npz)}' as .npz ({one_line(e)})") from None
    for name, path in npy:
        try:
            feeds[name] = np.load(path, allow_pickle=False)
        except FileNotFoundError:
            raise FeedError(f"input {name!r}: file '{os.fspath(path)}' not found") from None
        except (OSError, ValueError) as e:
            raise FeedError(f"input {name!r}: cannot read '{os.fspath(path)}' as .npy ({one_line(e)})") from None
    return feeds


def make_feeds(
    inputs: Sequence[InputArg],
    given: Mapping[str, np.ndarray] | None = None,
    *,
    seed: int = 0,
    dims: int | Mapping[str, int] | None = None,
) -> Feeds:
    """Feeds for every input: the ``given`` arrays, cast to the input's dtype where they differ, and random values
    for the rest, from ``numpy.random.default_rng(seed)`` in input order: floats standard normal, integers in
    ``INT_RANGE``, bools fair coins. A symbolic dimension gets ``dims[name]``, else ``dims['*']``, else
    ``DEFAULT_DIM`` (an int ``dims`` sizes them all). A given name that is no input is a ``FeedError``."""
    given = dict(given or {})
    names = [i.name for i in inputs]
    for name in given:
        if name not in names:
            close = difflib.get_close_matches(name, names, n=3)
            hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else f"; inputs: {', '.join(names)}"
            raise FeedError(f"the model has no input named {name!r}{hint}")
    sizes = {"*": dims} if isinstance(dims, int) else dict(dims or {})
    rng = np.random.default_rng(seed)
    out = Feeds({})
    for arg in inputs:
        want = numpy_dtype(arg.type)
        if arg.name in given:
            have = np.asarray(given[arg.name])
            out.sources[arg.name] = "given"
            if want is not None and have.dtype != want:
                out.sources[arg.name] = f"given (cast from {have.dtype.name})"
                have = have.astype(want)
            out.arrays[arg.name] = have
            continue
        out.arrays[arg.name], how = _random(arg, rng, sizes, out.dims)
        out.sources[arg.name] = f"{how}, seed {seed}"
    return out


def _random(arg: InputArg, rng: np.random.Generator, sizes: Mapping[str, int], used: dict[str, int]
            ) -> tuple[np.ndarray, str]:
    """Random values for one input, and how they were drawn; records each symbolic dimension's size in ``used``."""
    dtype = numpy_dtype(arg.type)
    if dtype is None:
        raise FeedError(f"cannot make random values for input {arg.name!r} of type {arg.type}; give it a value "
                        f"(on the command line: --input {arg.name}=FILE.npy)")
    shape = []
    for d in arg.shape:
        if isinstance(d, int) and d >= 0:
            shape.append(d)
            continue
        key = d if isinstance(d, str) and d else "?"
        used[key] = sizes.get(key, sizes.get("*", DEFAULT_DIM))
        shape.append(used[key])
    if _is_float(dtype):
        return rng.standard_normal(shape).astype(dtype), "random normal"
    if dtype.kind == "b":
        return rng.random(shape) < 0.5, "random bool"
    low, high = INT_RANGE
    return rng.integers(low, high, size=shape).astype(dtype), f"random integers in [{low}, {high})"


def random_feeds(model: onnx.ModelProto, rng: np.random.Generator, dims: int | Mapping[str, int] = DEFAULT_DIM
                 ) -> dict[str, np.ndarray]:
    """Random values for every input of ``model``, drawn from ``rng`` as ``make_feeds`` draws them."""
    sizes = {"*": dims} if isinstance(dims, int) else dict(dims)
    return {arg.name: _random(arg, rng, sizes, {})[0] for arg in model_inputs(model)}


def complete_feeds(model: onnx.ModelProto, feeds: Mapping[str, np.ndarray] | None = None, seed: int = 0,
                   dims: int | Mapping[str, int] = DEFAULT_DIM) -> dict[str, np.ndarray]:
    """``feeds`` (cast to the dtypes of the inputs they feed) plus seeded random values for the inputs they leave
    out: ``make_feeds`` on ``model``'s inputs."""
    return make_feeds(model_inputs(model), feeds, seed=seed, dims=dims).arrays
