"""Model files: loading with clear errors, and atomic saving (a temp file in the same folder, then
``os.replace``), checked by ``onnx.checker`` before anything lands at the destination. Models whose weights
live in external data (over 2 GB) are loaded lazily with onnx_ir and saved by streaming their tensors."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO

import onnx
import onnx_ir as ir

from onnxgrad.validate import check_graph, check_names

# protobuf cannot serialise one message of 2 GiB or more: above this, tensors go to an external data file
PROTOBUF_LIMIT = 2**31 - 1


class ModelFileError(ValueError):
    """A model file that is missing, unreadable or not an ONNX model."""


def one_line(message: object) -> str:
    """``message`` on one line (runtimes and checkers like multi-line messages; the CLI prints one)."""
    return re.sub(r"\s*\n\s*", " ", str(message)).strip()


def load_model(path: str | os.PathLike[str], load_external_data: bool = True) -> onnx.ModelProto:
    """Read an ONNX model, raising ``ModelFileError`` with one clear line when it cannot be had."""
    p = Path(path)
    if not p.exists():
        raise ModelFileError(f"model file '{p}' not found")
    if p.is_dir():
        raise ModelFileError(f"'{p}' is a directory, not an ONNX model file")
    try:
        model = onnx.load(os.fspath(p), load_external_data=load_external_data)
    except OSError as e:
        raise ModelFileError(f"cannot read model '{p}': {one_line(e.strerror or e)}") from None
    except Exception as e:  # protobuf DecodeError, or missing/broken external data
        if (kind := _other_format(p)) is not None:
            raise ModelFileError(f"'{p}' is not a valid ONNX model (it is {kind})") from None
        raise ModelFileError(f"'{p}' is not a valid ONNX model (truncated or corrupt: {one_line(e)})") from None
    if not model.HasField("graph") or model.ir_version <= 0:
        what = "an empty file" if p.stat().st_size == 0 else _other_format(p) or "no graph or IR version"
        raise ModelFileError(f"'{p}' is not a valid ONNX model ({what})")
    if model.ir_version >= 3 and not model.opset_import:  # required from IR 3 on: what a cut after the graph leaves
        raise ModelFileError(f"'{p}' is not a valid ONNX model (no opset_import: truncated?)")
    _check_structure(p, model)
    return model


def _check_structure(p: Path, model: onnx.ModelProto) -> None:
    """A ``ModelFileError`` with the invalid-model prefix for a value defined twice or nowhere, a cycle or nodes out
    of order (``onnxgrad.validate``'s checks, run on the file before any command works on it)."""
    try:
        check_names(model.graph)
        if len(model.graph.node):  # an empty graph is a valid model: commands that need nodes say so themselves
            check_graph(ir.serde.deserialize_graph(model.graph))
    except ValueError as e:
        raise ModelFileError(f"'{p}' is not a valid ONNX model: {one_line(e)}") from None


# the first bytes of files people mistake for ONNX models
_MAGIC = [
    (b"\x93NUMPY", "a NumPy .npy file"),
    (b"PK\x03\x04", "a zip archive (.npz, PyTorch .pt, Keras .keras?)"),
    (b"\x89HDF\r\n\x1a\n", "an HDF5 file (Keras .h5?)"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    *((b"\x80" + bytes([v]), "a Python pickle (PyTorch .pt?)") for v in (2, 3, 4, 5)),
    (b"\x1f\x8b", "a gzip file"),
]


def file_kind(path: str | os.PathLike[str]) -> str | None:
    """What the file at ``path`` is when its first bytes say so (``a text file``, ``a NumPy .npy file``...); None
    when they do not, or it cannot be read."""
    return _other_format(Path(path))


def _other_format(p: Path) -> str | None:
    """What ``p`` is when its first bytes say it is another well-known format, else None."""
    try:
        with open(p, "rb") as f:
            head = f.read(512)
    except OSError:
        return None
    if head[4:8] == b"ORTM":
        return "an onnxruntime .ort model, not an ONNX protobuf"
    for magic, kind in _MAGIC:
        if head.startswith(magic):
            return kind
    text = head.lstrip()
    if text and all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return "a JSON text file" if text[:1] in (b"{", b"[") else "a text file"
    return None


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """A temporary path in ``path``'s folder that replaces ``path`` when the block ends without error.

    On error the temporary file is removed and ``path`` is left as it was."""
    dest = Path(path)
    with _cannot_write(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=suffix + ".tmp", dir=dest.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the mode open() would
    try:
        yield Path(tmp)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def _cannot_write(dest: Path) -> Iterator[None]:
    """Turn an OSError from making ``dest``'s folder or temporary file into one line naming ``dest``."""
    try:
        yield
    except OSError as e:
        why = e.strerror or str(e)
        if isinstance(e, FileExistsError | NotADirectoryError) and e.filename:
            why = f"'{e.filename}' is not a folder"
        raise OSError(f"cannot write '{dest}': {why}") from None


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: str | os.PathLike[str], write: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` atomically with ``write(file)``."""
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        write(f)
        f.flush()
        os.fsync(f.fileno())


def save_model(
    model: onnx.ModelProto, path: str | os.PathLike[str], check: bool = True, external_threshold: int = PROTOBUF_LIMIT
) -> None:
    """Save ``model`` to ``path`` atomically, after ``onnx.checker.check_model(full_check=True)``.

    Models of ``external_threshold`` bytes or more are written with their tensors in ``<name>.data``
    beside the model (and checked by path, as the checker requires for them)."""
    dest = Path(path)
    if model.ByteSize() < external_threshold:
        if check:
            onnx.checker.check_model(model, full_check=True)
        data = model.SerializeToString()
        atomic_write(dest, lambda f: f.write(data))
        return
    # large model: tensors go to <name>.data beside it
    with staged_with_data(dest, check) as staged:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(copy, os.fspath(staged), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=f"{dest.name}.data", size_threshold=1024)


@contextlib.contextmanager
def staged_with_data(dest: Path, check: bool = True) -> Iterator[Path]:
    """A path in a private folder beside ``dest`` to write the model (and its ``<name>.data``) to.

    When the block ends without error the model is checked by path (as onnx.checker requires for
    models over 2 GB) and both files are moved into place; on any error nothing at ``dest`` changes."""
    location = f"{dest.name}.data"
    with _cannot_write(dest):
        dest.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield staging / dest.name
        if check:
            onnx.checker.check_model(os.fspath(staging / dest.name), full_check=True)
        if (staging / location).exists():
            os.replace(staging / location, dest.parent / location)
        os.replace(staging / dest.name, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


# ---------------------------------------------------------------------------- large models
def has_external_data(path: str | os.PathLike[str]) -> bool:
    """Whether the model file keeps some tensor in external data (reads the graph, not the data)."""
    try:
        proto = onnx.load(os.fspath(path), load_external_data=False)
    except Exception:  # not a model: the loader proper says why
        return False
    return any(t.data_location == onnx.TensorProto.EXTERNAL for t in _all_tensors(proto.graph))


def _all_tensors(graph: onnx.GraphProto) -> Iterable[onnx.TensorProto]:
    yield from graph.initializer
    for node in graph.node:
        for a in node.attribute:
            if a.HasField("t"):
                yield a.t
            yield from a.tensors
            if a.HasField("g"):
                yield from _all_tensors(a.g)
            for g in a.graphs:
                yield from _all_tensors(g)


def load_lazy(path: str | os.PathLike[str]) -> ir.Model:
    """Load a model with onnx_ir, leaving external tensors on disk (read on use, memory-mapped).

    Raises ``ModelFileError`` with one clear line when the file cannot be had."""
    load_model(path, load_external_data=False)  # the graph alone: its errors, in the loader's words
    try:
        return ir.load(os.fspath(path))
    except Exception as e:  # e.g. unreadable external data
        raise ModelFileError(f"'{path}' is not a valid ONNX model ({one_line(e)})") from None


def external_locations(model: ir.Model) -> set[Path]:
    """Absolute paths of the external data files the model's tensors point into."""
    out: set[Path] = set()
    for g in model.graphs():
        for v in g.initializers.values():
            t = v.const_value
            if isinstance(t, ir.ExternalTensor):
                out.add((Path(t.base_dir) / t.location).resolve())
    return out


def save_external(model: ir.Model, path: str | os.PathLike[str], check: bool = True) -> Path:
    """Save ``model`` to ``path`` with every tensor over 1 kB in ``<name>.data`` beside it.

    Tensors are streamed from wherever they live (an external file of the source model is read one
    tensor at a time). Both files are built in a private folder beside ``path``, checked with
    ``onnx.checker`` (by path, as it must for large models), then moved into place; on error nothing
    at the destination changes. Returns the data file's path."""
    dest = Path(path)
    location = f"{dest.name}.data"
    data = (dest.parent / location).resolve()
    if data in external_locations(model):
        raise ValueError(
            f"'{data}' holds the source model's weights; saving there would overwrite them: choose another output name"
        )
    with staged_with_data(dest, check) as staged:
        ir.save(model, os.fspath(staged), external_data=location, size_threshold_bytes=1024)
    return dest.parent / location
