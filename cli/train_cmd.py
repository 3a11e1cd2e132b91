"""``onnxgrad train-step`` (build a train-step model: ``onnxgrad.train.make_train_step``) and ``onnxgrad train``
(drive one over a data file: ``onnxgrad.trainer.train``)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import click
import onnx

from onnxgrad import runtime
from onnxgrad.cli.common import ModelError, cli
from onnxgrad.io import one_line
from onnxgrad.optim import OPTIMIZERS
from onnxgrad.train import MODES, make_train_step
from onnxgrad.trainer import SCHEDULES, TrainConfig, train


def _fail(e: BaseException) -> ModelError:
    return ModelError(one_line(e))


@cli.command("train-step")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Where to write the train-step model (written atomically).")
@click.option("--loss", required=True, metavar="NAME|cross_entropy:LOGITS:LABELS|mse:PRED:TARGET",
              help="The scalar loss, or a loss to append (mean reduction, as torch's).")
@click.option("--params", multiple=True, metavar="NAME|@weights",
              help="Weights to train (default @weights: every float initializer but BatchNorm statistics).")
@click.option("--freeze", multiple=True, metavar="NAME", help="A weight to leave as it is.")
@click.option("--optimizer", type=click.Choice(list(OPTIMIZERS)), default="sgd", show_default=True)
@click.option("--lr", type=float, help="The default learning rate (an input of the step: `train --lr` overrides).")
@click.option("--momentum", type=float, help="sgd: momentum.")
@click.option("--dampening", type=float, help="sgd: dampening.")
@click.option("--nesterov", is_flag=True, default=None, help="sgd: Nesterov momentum.")
@click.option("--weight-decay", type=float, help="L2 penalty (adamw: decoupled weight decay).")
@click.option("--betas", nargs=2, type=float, help="adam, adamw: the two betas.")
@click.option("--eps", type=float, help="adam, adamw, adagrad: epsilon.")
@click.option("--amsgrad", is_flag=True, default=None, help="adam, adamw: the AMSGrad variant.")
@click.option("--lr-decay", type=float, help="adagrad: learning-rate decay.")
@click.option("--initial-accumulator-value", type=float, help="adagrad: the sum's starting value.")
@click.option("--clip-grad-norm", type=float, metavar="MAX_NORM", help="Clip gradients by their global norm.")
@click.option("--batchnorm", type=click.Choice(MODES), default="train", show_default=True,
              help="BatchNormalization: batch statistics, running statistics as state (train), or as exported.")
@click.option("--dropout", type=click.Choice(MODES), default="train", show_default=True,
              help="Dropout: a mask from a seed input (train), or none (eval).")
@click.option("--accumulate", is_flag=True, help="Accumulate gradients over micro-batches (an `apply` input).")
@click.option("--output-value", "outputs", multiple=True, metavar="NAME", help="Also output this value.")
@click.option("--straight-through", is_flag=True,
              help="Train through the QuantizeLinear -> DequantizeLinear pairs of a quantized model (quantisation-"
              "aware training with torch's fake-quantisation estimator).")
@click.option("--initial", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.npz",
              help="Where to write the starting params and state (default: OUT's stem + .initial.npz).")
@click.option("--json", "as_json", is_flag=True, help="Print only where everything is in OUT, as JSON.")
def train_step(model: Path, out: Path, loss: str, params: tuple[str, ...], freeze: tuple[str, ...], optimizer: str,
               lr: float | None, momentum: float | None, dampening: float | None, nesterov: bool | None,
               weight_decay: float | None, betas: tuple[float, float] | None, eps: float | None,
               amsgrad: bool | None, lr_decay: float | None, initial_accumulator_value: float | None,
               clip_grad_norm: float | None, batchnorm: str, dropout: str, accumulate: bool, outputs: tuple[str, ...],
               straight_through: bool, initial: Path | None, as_json: bool) -> None:
    """Write the train-step model of MODEL: inputs the batch, the params, the optimizer state, lr and step;
    outputs the loss, the new params and the new state. Standard ONNX ops only: it runs on stock onnxruntime."""
    if out.exists() and out.resolve() == model.resolve():
        raise click.BadParameter("OUT is the input model; choose another path", param_hint="'-o'")
    hyper: dict[str, Any] = {"lr": lr, "momentum": momentum, "dampening": dampening, "nesterov": nesterov,
                             "weight_decay": weight_decay, "betas": betas or None, "eps": eps, "amsgrad": amsgrad,
                             "lr_decay": lr_decay, "initial_accumulator_value": initial_accumulator_value}
    if not model.exists():
        raise ModelError(f"model file '{model}' not found")
    try:
        step = make_train_step(model, loss, list(params) or None, optimizer, frozen=freeze, outputs=outputs,
                               clip_grad_norm=clip_grad_norm, batchnorm=batchnorm, dropout=dropout,
                               accumulate=accumulate, straight_through=straight_through,
                               **{k: v for k, v in hyper.items() if v is not None})
        init = step.save(out, initial)
    except (LookupError, ValueError, TypeError, onnx.checker.ValidationError) as e:
        raise _fail(e) from None
    layout = step.layout(os.fspath(init))
    if as_json:
        click.echo(json.dumps(layout))
        return
    n_params = sum(int(v.size) for k, v in step.initial.items() if k in step.params)
    click.echo(f"wrote {out}: {step.optimizer.name}, {len(step.params)} params ({n_params:,} numbers), "
               f"{len(step.state)} state tensors; initial values in {init}")
    click.echo(f"inputs: data {', '.join(step.data) or '(none)'}; lr {step.lr}"
               + (f"; step {step.step}" if step.step else "") + (f"; seed {step.seed}" if step.seed else "")
               + (f"; apply {step.apply}" if step.apply else ""))
    click.echo(f"outputs: loss {step.loss}" + (f"; {', '.join(step.outputs)}" if step.outputs else "")
               + "; new params and state (new/<input name>)")


@cli.command("train")
@click.argument("step_model", metavar="STEP.onnx", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--data", required=True, type=click.Path(dir_okay=False, path_type=Path), metavar="DATA.npz",
              help="The training data: one array per data input, samples along the first axis.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True)
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True)
@click.option("--lr", type=float, help="Base learning rate (default: the one given to train-step).")
@click.option("--schedule", type=click.Choice(SCHEDULES), default="constant", show_default=True,
              help="Learning-rate schedule over the whole run.")
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True,
              help="Updates of linear warm-up.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the shuffle and the dropout masks.")
@click.option("--no-shuffle", is_flag=True, help="Keep the samples in file order.")
@click.option("--drop-last", is_flag=True, help="Skip each epoch's last, smaller batch.")
@click.option("--accumulate", type=click.IntRange(min=1), default=1, show_default=True,
              help="Micro-batches per optimizer update (the step must be built with --accumulate).")
@click.option("--checkpoint", type=click.Path(dir_okay=False, path_type=Path), metavar="CKPT.npz",
              help="Write params and state here (atomically) at each epoch's end.")
@click.option("--checkpoint-every", type=click.IntRange(min=1), metavar="N", help="... and every N updates.")
@click.option("--resume", is_flag=True, help="Continue from --checkpoint.")
@click.option("--metrics", type=click.Path(dir_okay=False, path_type=Path), metavar="LOG.csv",
              help="Append one row per update: loss, lr, samples/s...")
@click.option("--export", type=click.Path(dir_okay=False, path_type=Path), metavar="OUT.onnx",
              help="Write the inference model with the trained weights.")
@click.option("--model", "source", type=click.Path(dir_okay=False, path_type=Path), metavar="SOURCE.onnx",
              help="The inference model for --export (default: the one train-step read).")
@click.option("--initial", type=click.Path(dir_okay=False, path_type=Path), metavar="FILE.npz",
              help="Starting params and state (default: the file train-step wrote).")
@click.option("--provider", type=click.Choice(list(runtime.PROVIDERS)), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), help="onnxruntime intra-op threads.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary at the end.")
def train_cmd(step_model: Path, data: Path, epochs: int, batch_size: int, lr: float | None, schedule: str,
              warmup: int, seed: int, no_shuffle: bool, drop_last: bool, accumulate: int, checkpoint: Path | None,
              checkpoint_every: int | None, resume: bool, metrics: Path | None, export: Path | None,
              source: Path | None, initial: Path | None, provider: str, threads: int | None, progress: bool | None,
              as_json: bool) -> None:
    """Train with a train-step model (from `onnxgrad train-step`) on DATA.npz."""
    if not step_model.exists():
        raise ModelError(f"model file '{step_model}' not found")
    if resume and checkpoint is None:
        raise click.UsageError("--resume needs --checkpoint CKPT.npz")
    config = TrainConfig(
        epochs=epochs, batch_size=batch_size, lr=lr, schedule=schedule, warmup=warmup, seed=seed,
        shuffle=not no_shuffle, drop_last=drop_last, accumulate=accumulate, checkpoint=checkpoint,
        checkpoint_every=checkpoint_every, resume=resume, metrics=metrics, export=export, source=source,
        initial=initial, provider=provider, progress=progress, threads=threads,
        log=None if as_json else (lambda line: click.echo(line, err=True)),
    )
    try:
        result = train(step_model, data, config)
    except (LookupError, ValueError, TypeError, onnx.checker.ValidationError) as e:
        raise _fail(e) from None
    summary = {"updates": result.updates, "epoch_losses": result.epoch_losses, "seconds": round(result.seconds, 3),
               "samples_per_s": round(result.samples_per_s, 1), "checkpoint": None if checkpoint is None
               else os.fspath(checkpoint), "export": None if export is None else os.fspath(export)}
    if as_json:
        click.echo(json.dumps(summary))
        return
    final = f"{result.epoch_losses[-1]:.6g}" if result.epoch_losses else "n/a"
    click.echo(f"trained {result.updates} updates in {result.seconds:.2f} s ({result.samples_per_s:,.0f} samples/s); "
               f"last epoch's loss {final}"
               + (f"; checkpoint {checkpoint}" if checkpoint else "") + (f"; exported {export}" if export else ""))
