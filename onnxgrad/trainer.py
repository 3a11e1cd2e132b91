"""The loop that drives a train-step model (``onnxgrad train``): batches from a ``.npz`` file, shuffled each epoch,
params and state kept in place between steps with onnxruntime's IOBinding (on the GPU under CUDA), a learning-rate
schedule, a progress bar, a CSV metrics log, checkpoints written atomically, ``resume``, and the export of the
trained inference model.

Everything that decides a run is a function of the seed, the epoch and the position in it (the shuffle, the dropout
seeds, the learning rate), so a run resumed from a checkpoint computes what the uninterrupted run would have."""

from __future__ import annotations

import contextlib
import csv
import io
import json
import math
import os
import signal
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

from onnxgrad import runtime
from onnxgrad.io import atomic_write, load_model, one_line, save_model
from onnxgrad.train import read_layout, save_npz

CHECKPOINT_KEY = "__onnxgrad_checkpoint__"
SCHEDULES = ("constant", "cosine", "linear")
METRICS_COLUMNS = ("update", "epoch", "batch", "loss", "lr", "samples", "samples_per_s", "elapsed_s")


@dataclass
class TrainConfig:
    """How to train: ``lr`` None takes the optimizer's own from the train step; ``checkpoint_every`` counts
    optimizer updates (None: at the end of each epoch); ``progress`` None shows the bar on a terminal only."""

    epochs: int = 1
    batch_size: int = 32
    lr: float | None = None
    schedule: str = "constant"
    warmup: int = 0
    seed: int = 0
    shuffle: bool = True
    drop_last: bool = False
    accumulate: int = 1
    checkpoint: str | os.PathLike[str] | None = None
    checkpoint_every: int | None = None
    resume: bool = False
    metrics: str | os.PathLike[str] | None = None
    export: str | os.PathLike[str] | None = None
    source: str | os.PathLike[str] | None = None  # the inference model to export (default: the one recorded)
    initial: str | os.PathLike[str] | None = None  # the initial params and state (default: the one recorded)
    provider: str = "cpu"
    progress: bool | None = None
    threads: int | None = None
    log: Callable[[str], None] | None = None  # one line per epoch, and notes
    on_update: Callable[[int, float], None] | None = None  # called after each optimizer update (update, loss)


@dataclass
class TrainResult:
    """What a run did: optimizer updates made, the mean loss of each epoch trained, time, the final values."""

    updates: int
    epoch_losses: list[float]
    seconds: float
    samples_per_s: float
    values: dict[str, np.ndarray] = field(default_factory=dict)  # every param and state input, by name


class Interrupted(KeyboardInterrupt):
    """Training stopped by Ctrl-C (SIGINT) between two steps; the checkpoint, if any, holds the last update."""


# --------------------------------------------------------------------------------------------- the data
def read_data(path: str | os.PathLike[str]) -> dict[str, np.ndarray]:
    """The arrays of a ``.npz`` data file."""
    return runtime.read_feeds(npz=path)


def check_data(arrays: Mapping[str, np.ndarray], inputs: Mapping[str, runtime.InputArg], names: list[str],
               where: str) -> dict[str, np.ndarray]:
    """The data arrays the train step takes, cast within their kind (float64 to float32, int32 to int64); a
    ValueError for a missing array, a dtype of another kind, a shape that does not fit, unequal sample counts."""
    out: dict[str, np.ndarray] = {}
    have = ", ".join(sorted(arrays)) or "no arrays"
    for name in names:
        if name not in arrays:
            raise ValueError(f"the data file '{where}' has no array for input {name!r} (it has {have}); "
                             f"the train step takes {', '.join(names)}")
        a = np.asarray(arrays[name])
        arg = inputs[name]
        want = runtime.numpy_dtype(arg.type)
        if want is not None and _kind(a.dtype) != _kind(want):
            raise ValueError(f"the data file '{where}': array {name!r} is {a.dtype.name}, but the train step's input "
                             f"{name!r} is {want.name}: convert it (e.g. numpy's .astype('{want.name}'))")
        dims = list(arg.shape)
        if a.ndim != len(dims) or any(isinstance(d, int) and d != s for d, s in zip(dims[1:], a.shape[1:],
                                                                                     strict=False)):
            shape = "[" + ", ".join(str(d) for d in dims) + "]"
            raise ValueError(f"the data file '{where}': array {name!r} has shape {list(a.shape)}, but the train "
                             f"step's input {name!r} has shape {shape} (the first axis indexes samples)")
        out[name] = a.astype(want) if want is not None and a.dtype != want else a
    counts = {name: len(a) for name, a in out.items()}
    if len(set(counts.values())) > 1:
        raise ValueError(f"the data file '{where}': the arrays hold different numbers of samples: "
                         + ", ".join(f"{k} {v}" for k, v in counts.items()))
    return out


def _kind(dtype: np.dtype[Any]) -> str:
    return {"f": "float", "i": "integer", "u": "integer", "b": "bool"}.get(dtype.kind, dtype.kind)


# -------------------------------------------------------------------------------------- the schedule
def learning_rate(base: float, schedule: str, warmup: int, update: int, total: int) -> float:
    """The learning rate of the ``update``-th update (0-based) of ``total``: linear warm-up over ``warmup`` updates,
    then constant, cosine (to 0 at the end) or linear (to 0 at the end)."""
    if warmup and update < warmup:
        return base * (update + 1) / warmup
    if schedule == "constant":
        return base
    span = max(total - warmup, 1)
    t = min(max(update - warmup, 0) / span, 1.0)
    if schedule == "cosine":
        return base * 0.5 * (1.0 + math.cos(math.pi * t))
    if schedule == "linear":
        return base * (1.0 - t)
    raise ValueError(f"unknown schedule {schedule!r}; choose one of {', '.join(SCHEDULES)}")


# ------------------------------------------------------------------------------------------ checkpoints
def save_checkpoint(path: str | os.PathLike[str], values: Mapping[str, np.ndarray], meta: dict[str, Any]) -> None:
    """Write every param and state value and where the run stands, atomically (all of it or the old file)."""
    arrays = dict(values)
    arrays[CHECKPOINT_KEY] = np.asarray(json.dumps(meta, sort_keys=True))
    save_npz(path, arrays)


def load_checkpoint(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The values and the position a checkpoint holds."""
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except FileNotFoundError:
        raise ValueError(f"--resume: checkpoint '{os.fspath(path)}' not found") from None
    except (OSError, ValueError) as e:
        raise ValueError(f"cannot read checkpoint '{os.fspath(path)}' ({one_line(e)})") from None
    if CHECKPOINT_KEY not in arrays:
        raise ValueError(f"'{os.fspath(path)}' is not an onnxgrad checkpoint (no '{CHECKPOINT_KEY}' entry)")
    meta = json.loads(str(arrays.pop(CHECKPOINT_KEY)))
    return arrays, meta


def _trim_metrics(path: Path, last_update: int) -> None:
    """Drop the metrics rows of updates after ``last_update`` (made after the checkpoint a run resumes from)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or tuple(rows[0]) != METRICS_COLUMNS:
        raise ValueError(f"--metrics: '{path}' is not an onnxgrad metrics log (its header differs); choose another "
                         "file")
    keep = [rows[0]] + [r for r in rows[1:] if r and int(r[0]) <= last_update]
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(keep)
    atomic_write(path, lambda f: f.write(text.getvalue().encode()))


# ----------------------------------------------------------------------------------------------- export
def export_model(source: str | os.PathLike[str], values: Mapping[str, np.ndarray], out: str | os.PathLike[str],
                 names: list[str]) -> None:
    """Write ``source`` (the inference model) with the initializers ``names`` set to their trained ``values``."""
    model = load_model(source)
    inits = {t.name: t for t in model.graph.initializer}
    missing = [n for n in names if n not in inits]
    if missing:
        raise ValueError(f"--export: the model '{os.fspath(source)}' has no weight named {missing[0]!r}: is it the "
                         "model the train step was built from? (--model SOURCE.onnx names it)")
    for name in names:
        t = inits[name]
        array = np.asarray(values[name]).astype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type))
        t.CopyFrom(numpy_helper.from_array(array, name))
    save_model(model, out)


# -------------------------------------------------------------------------------------------- the loop
def open_session(model: str | os.PathLike[str] | bytes, provider: str = "cpu", threads: int | None = None
                 ) -> ort.InferenceSession:
    """An InferenceSession for a train step. onnxruntime's memory pattern (one block planned for every
    intermediate of a run) is off: with it a train step's peak memory is about twice PyTorch's, without it the
    same as PyTorch's, at the same speed (bench/RESULTS.md)."""
    opts = ort.SessionOptions()
    opts.log_severity_level = 3
    opts.enable_mem_pattern = False
    if threads is not None:
        opts.intra_op_num_threads = threads
        opts.inter_op_num_threads = 1
    source = model if isinstance(model, bytes) else os.fspath(model)
    return ort.InferenceSession(source, opts, providers=runtime.providers_for(provider))


def in_place(model: onnx.ModelProto, pairs: list[tuple[str, str]]) -> set[str]:
    """The inputs of ``pairs`` (input, new value) whose new value may be written over them: every node that reads
    the input is the node that computes the new value or one of its ancestors, so in any order onnxruntime runs
    the graph every read is done before that write, and the node that writes it, if it reads it too, is
    elementwise. (With clipping by global norm every param qualifies: each update waits for every gradient;
    without it, a weight that an input gradient reads does not.)"""
    nodes = list(model.graph.node)
    producer = {o: i for i, n in enumerate(nodes) for o in n.output if o}
    reads = [_reads(n) for n in nodes]
    paired = {name for name, _ in pairs}
    readers: dict[str, list[int]] = {}
    bit: dict[int, int] = {}  # the nodes that read a paired value, numbered: the bits of the sets below
    for i, names in enumerate(reads):
        for name in names & paired:
            readers.setdefault(name, []).append(i)
            bit.setdefault(i, len(bit))
    below: list[int] = []  # which of those nodes are node i or its ancestors (the nodes are in topological order)
    for i, names in enumerate(reads):
        bits = 1 << bit[i] if i in bit else 0
        for name in names:
            if name in producer:
                bits |= below[producer[name]]
        below.append(bits)
    out = set()
    for name, new in pairs:
        writer = producer.get(new)
        if writer is None or (name in nodes[writer].input and nodes[writer].op_type not in _ELEMENTWISE):
            continue  # a kernel that reads the value it overwrites must take each element before writing it
        if all(below[writer] >> bit[r] & 1 for r in readers.get(name, [])):
            out.add(name)
    return out


_ELEMENTWISE = frozenset({"Add", "Sub", "Mul", "Div", "Max", "Min", "Where"})  # the optimizers' last ops


def _reads(node: onnx.NodeProto) -> set[str]:
    """The values a node reads: its inputs, and every name its subgraphs use (more than they capture: safe)."""
    names = {n for n in node.input if n}
    for a in node.attribute:
        for g in [a.g] if a.type == onnx.AttributeProto.GRAPH else list(a.graphs):
            for inner in g.node:
                names |= _reads(inner)
    return names


class _Bindings:
    """Two IOBindings that read params and state from one set of device buffers and write the next into the
    other, used in turn: nothing is copied between steps, on the CPU or the GPU. The values in ``shared`` (see
    ``in_place``) have one buffer, which each step overwrites: half the memory traffic of the update."""

    def __init__(self, sess: ort.InferenceSession, pairs: list[tuple[str, str]], values: Mapping[str, np.ndarray],
                 device: str, outputs: list[str], shared: Collection[str] = ()) -> None:
        self.sess = sess
        self.pairs = pairs
        self.n_outputs = len(outputs)
        def copy(name: str) -> ort.OrtValue:  # on the CPU an OrtValue wraps the array it is given: the caller's
            return ort.OrtValue.ortvalue_from_numpy(np.array(values[name], order="C", copy=True), device, 0)  # stay

        first = {name: copy(name) for name, _ in pairs}
        buffers = [first, {name: first[name] if name in shared else copy(name) for name, _ in pairs}]
        self.buffers = buffers
        self.bindings = []
        for k in range(2):
            b = sess.io_binding()
            for name in outputs:  # first: get_outputs() lists them in binding order
                b.bind_output(name, "cpu")
            for name, new in pairs:
                b.bind_ortvalue_input(name, buffers[k][name])
                b.bind_ortvalue_output(new, buffers[1 - k][name])
            self.bindings.append(b)
        self.current = 0

    def run(self, feeds: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        """One step; the outputs asked for (the loss first) as arrays."""
        b = self.bindings[self.current]
        for name, value in feeds.items():
            b.bind_cpu_input(name, value)
        self.sess.run_with_iobinding(b)
        outs = [v.numpy() for v in b.get_outputs()[: self.n_outputs]]
        self.current = 1 - self.current
        return outs

    def values(self) -> dict[str, np.ndarray]:
        """The params and state as they are now."""
        return {name: self.buffers[self.current][name].numpy().copy() for name, _ in self.pairs}


@contextlib.contextmanager
def _sigint_stops() -> Iterator[list[bool]]:
    """Ctrl-C sets a flag the loop checks between steps (a second one interrupts at once)."""
    flag = [False]
    try:
        previous = signal.getsignal(signal.SIGINT)

        def handler(signum: int, frame: Any) -> None:
            if flag[0]:
                raise KeyboardInterrupt
            flag[0] = True

        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: Ctrl-C stays as it was
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def train(step_model: str | os.PathLike[str], data: str | os.PathLike[str] | Mapping[str, np.ndarray],
          config: TrainConfig) -> TrainResult:
    """Train with the train-step model at ``step_model`` on ``data`` (a ``.npz`` path or arrays by input name)."""
    c = config
    if c.epochs < 1 or c.batch_size < 1 or c.accumulate < 1 or c.warmup < 0:
        raise ValueError("epochs, batch size and accumulate must be 1 or more, warmup 0 or more")
    if c.schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {c.schedule!r}; choose one of {', '.join(SCHEDULES)}")
    if c.resume and c.checkpoint is None:
        raise ValueError("--resume needs --checkpoint PATH (the checkpoint to resume from)")
    if c.checkpoint_every is not None and c.checkpoint_every < 1:
        raise ValueError("checkpoint_every must be 1 or more updates")
    step_path = Path(step_model)
    proto = load_model(step_path)
    layout = read_layout(proto)
    if c.accumulate > 1 and layout.get("apply") is None:
        raise ValueError("--accumulate needs a train step built for it (train-step --accumulate)")
    here = step_path.parent
    initial_path = Path(c.initial) if c.initial is not None else (
        here / layout["initial"] if layout.get("initial") else None)
    if initial_path is None:
        raise ValueError("the train step records no initial values file: pass --initial FILE.npz")
    values = runtime.read_feeds(npz=initial_path)
    pairs = [tuple(v) for v in [*layout["params"].values(), *layout["state"].values()]]
    missing = [name for name, _ in pairs if name not in values]
    if missing:
        raise ValueError(f"the initial values file '{initial_path}' has no {missing[0]!r}")
    source = Path(c.source) if c.source is not None else (here / layout["source"] if layout.get("source") else None)
    if c.export is not None and source is None:
        raise ValueError("--export needs the inference model the train step was built from: pass --model SOURCE.onnx")

    try:
        sess = open_session(step_path, c.provider, c.threads)
    except Exception as e:
        if isinstance(e, runtime.ProviderUnavailable):
            raise
        raise ValueError(f"onnxruntime cannot load '{step_path}': {runtime.explain(e)}") from None
    inputs = {i.name: i for i in sess.get_inputs()}
    where = os.fspath(data) if isinstance(data, str | os.PathLike) else "data"
    arrays = check_data(read_data(data) if isinstance(data, str | os.PathLike) else data, inputs, layout["data"],
                        where)
    n = len(next(iter(arrays.values()))) if arrays else 0
    if n == 0:
        raise ValueError(f"the data file '{where}' holds no samples")
    per_epoch = n // c.batch_size if c.drop_last else math.ceil(n / c.batch_size)
    if per_epoch == 0:
        raise ValueError(f"--drop-last with {n} samples and batches of {c.batch_size}: no batch to train on")
    updates_per_epoch = math.ceil(per_epoch / c.accumulate)
    total_updates = c.epochs * updates_per_epoch
    base_lr = c.lr if c.lr is not None else float(layout.get("optimizer", {}).get("lr", 1e-3))
    lr_dtype = runtime.numpy_dtype(inputs[layout["lr"]].type) or np.dtype(np.float32)

    meta = {"update": 0, "epoch": 0, "batch": 0, "seed": c.seed, "batch_size": c.batch_size,
            "accumulate": c.accumulate, "samples": n, "shuffle": c.shuffle, "drop_last": c.drop_last, "elapsed": 0.0}
    if c.resume:
        assert c.checkpoint is not None
        saved, was = load_checkpoint(c.checkpoint)
        for key in ("seed", "batch_size", "accumulate", "samples", "shuffle", "drop_last"):
            if was.get(key) != meta[key]:
                raise ValueError(f"--resume: the checkpoint was made with {key} {was.get(key)!r}, this run has "
                                 f"{meta[key]!r}: resume with the same settings")
        lost = [name for name, _ in pairs if name not in saved]
        if lost:
            raise ValueError(f"--resume: the checkpoint has no {lost[0]!r}: was it made with this train step?")
        values = saved
        meta.update({k: was[k] for k in ("update", "epoch", "batch", "elapsed")})
    if c.metrics is not None:
        _trim_metrics(Path(c.metrics), int(meta["update"]) if c.resume else -1)

    out_names = [layout["loss"]]
    device = "cuda" if c.provider == "cuda" else "cpu"
    bindings = _Bindings(sess, pairs, values, device, out_names, in_place(proto, pairs))  # type: ignore[arg-type]
    log = c.log or (lambda line: None)
    epoch_losses: list[float] = []
    start_update = int(meta["update"])
    update, epoch0, batch0 = start_update, int(meta["epoch"]), int(meta["batch"])
    t_start = time.perf_counter()
    elapsed_before = float(meta["elapsed"])
    samples_done = 0

    def position_meta(epoch: int, batch: int) -> dict[str, Any]:
        return {**meta, "update": update, "epoch": epoch, "batch": batch,
                "elapsed": elapsed_before + time.perf_counter() - t_start}

    def checkpoint(epoch: int, batch: int) -> None:
        if c.checkpoint is not None:
            save_checkpoint(c.checkpoint, bindings.values(), position_meta(epoch, batch))

    metrics_file = None
    if c.metrics is not None:
        fresh = not Path(c.metrics).exists()
        Path(c.metrics).parent.mkdir(parents=True, exist_ok=True)
        metrics_file = open(c.metrics, "a", newline="")  # closed in the finally below
        writer = csv.writer(metrics_file, lineterminator="\n")
        if fresh:
            writer.writerow(METRICS_COLUMNS)
    from tqdm import tqdm

    consistent = True
    epoch, batch = epoch0, batch0
    try:
        with _sigint_stops() as stop:
            for epoch in range(epoch0, c.epochs):
                order = (np.random.default_rng([c.seed, epoch]).permutation(n) if c.shuffle else np.arange(n))
                first = batch0 if epoch == epoch0 else 0
                losses: list[float] = []
                bar = tqdm(total=per_epoch, initial=first, desc=f"epoch {epoch + 1}/{c.epochs}", unit="batch",
                           disable=None if c.progress is None else not c.progress, leave=False, dynamic_ncols=True)
                t_epoch, seen = time.perf_counter(), 0
                group_losses: list[float] = []
                group_samples = 0
                with bar:
                    for batch in range(first, per_epoch):
                        idx = order[batch * c.batch_size:(batch + 1) * c.batch_size]
                        feeds = {name: a[idx] for name, a in arrays.items()}
                        lr = learning_rate(base_lr, c.schedule, c.warmup, update, total_updates)
                        feeds[layout["lr"]] = np.asarray(lr, lr_dtype)
                        if layout.get("step"):
                            feeds[layout["step"]] = np.asarray(update + 1, np.int64)
                        if layout.get("seed"):
                            micro = epoch * per_epoch + batch
                            feeds[layout["seed"]] = np.asarray((c.seed * 1_000_003 + micro) % (1 << 62), np.int64)
                        last_of_group = (batch + 1) % c.accumulate == 0 or batch + 1 == per_epoch
                        if layout.get("apply"):
                            feeds[layout["apply"]] = np.asarray(last_of_group)
                        consistent = False
                        (loss,) = bindings.run(feeds)
                        consistent = True
                        group_losses.append(float(loss))
                        group_samples += len(idx)
                        seen += len(idx)
                        samples_done += len(idx)
                        rate = seen / max(time.perf_counter() - t_epoch, 1e-9)
                        bar.set_postfix(loss=f"{float(loss):.4g}", samples_s=f"{rate:,.0f}", refresh=False)
                        bar.update(1)
                        if not last_of_group:
                            continue
                        update += 1
                        mean = float(np.mean(group_losses))
                        losses.append(mean)
                        if metrics_file is not None:
                            writer.writerow([update, epoch + 1, batch + 1, f"{mean:.9g}", f"{lr:.9g}", group_samples,
                                             f"{rate:.1f}", f"{elapsed_before + time.perf_counter() - t_start:.3f}"])
                            metrics_file.flush()
                        group_losses, group_samples = [], 0
                        if c.on_update is not None:
                            c.on_update(update, mean)
                        at_end = batch + 1 == per_epoch
                        if c.checkpoint_every is not None and update % c.checkpoint_every == 0 and not at_end:
                            checkpoint(epoch, batch + 1)
                        if stop[0]:
                            raise Interrupted
                epoch_losses.append(float(np.mean(losses)) if losses else float("nan"))
                checkpoint(epoch + 1, 0)
                log(f"epoch {epoch + 1}/{c.epochs}: loss {epoch_losses[-1]:.6g}, "
                    f"{seen / max(time.perf_counter() - t_epoch, 1e-9):,.0f} samples/s, "
                    f"{time.perf_counter() - t_epoch:.2f} s")
                batch0 = 0
    except KeyboardInterrupt:
        if consistent and c.checkpoint is not None:  # between steps: the values are those of update ``update``
            position = (epoch, batch + 1) if batch + 1 < per_epoch else (epoch + 1, 0)
            save_checkpoint(c.checkpoint, bindings.values(), position_meta(*position))
            log(f"interrupted after update {update}; checkpoint written to '{os.fspath(c.checkpoint)}'")
        raise
    finally:
        if metrics_file is not None:
            metrics_file.close()
    seconds = time.perf_counter() - t_start
    final = bindings.values()
    if c.export is not None:
        assert source is not None
        export_model(source, final, c.export, [*layout["params"], *layout.get("buffers", [])])
    return TrainResult(update - start_update, epoch_losses, seconds, samples_done / max(seconds, 1e-9), final)
