"""Model files: loading with clear errors, and atomic saving (a temp file in the same folder, then
``os.replace``), checked by ``onnx.checker`` before anything lands at the destination."""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO

import onnx

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
        raise ModelFileError(f"'{p}' is not a valid ONNX model ({one_line(e)})") from None
    if not model.HasField("graph") or model.ir_version <= 0:
        what = "an empty file" if p.stat().st_size == 0 else "no graph or IR version"
        raise ModelFileError(f"'{p}' is not a valid ONNX model ({what})")
    return model


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str], suffix: str = "") -> Iterator[Path]:
    """A temporary path in ``path``'s folder that replaces ``path`` when the block ends without error.

    On error the temporary file is removed and ``path`` is left as it was."""
    dest = Path(path)
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
    # large model: build both files in a private folder beside the destination, check, then move
    dest.parent.mkdir(parents=True, exist_ok=True)
    location = f"{dest.name}.data"
    staging = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        copy = onnx.ModelProto()
        copy.CopyFrom(model)
        onnx.save_model(copy, os.fspath(staging / dest.name), save_as_external_data=True,
                        all_tensors_to_one_file=True, location=location, size_threshold=1024)
        if check:
            onnx.checker.check_model(os.fspath(staging / dest.name), full_check=True)
        if (staging / location).exists():
            os.replace(staging / location, dest.parent / location)
        os.replace(staging / dest.name, dest)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
