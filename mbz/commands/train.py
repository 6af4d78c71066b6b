"""``mbz train``: train mbz's CIFAR MobileNet-v2 (or resume a run), with its curves."""

from __future__ import annotations

import csv
import json
import os
import platform
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import click
import numpy as np
import torch
import torchvision
from click.core import ParameterSource
from torch import nn

from mbz import __version__
from mbz.checkpoint import load_model, save_checkpoint
from mbz.data import Dataset, load_split
from mbz.errors import MbzError
from mbz.models import ArchConfig
from mbz.plot import confusion_matrix_png, line_chart
from mbz.training import (
    FitResult,
    Recipe,
    confusion_matrix,
    evaluate_model,
    fit,
    is_main_process,
)

# Type and help of each Recipe field's flag; the defaults come from Recipe itself.
_RECIPE_FLAGS: dict[str, tuple[click.ParamType | None, str]] = {
    "epochs": (click.IntRange(min=1), "Passes over the training images."),
    "batch_size": (
        click.IntRange(min=1),
        "Images per optimizer step (all processes together under torchrun).",
    ),
    "lr": (
        click.FloatRange(min=0, min_open=True),
        "Peak learning rate, reached at the end of the warm-up (for batch 128).",
    ),
    "momentum": (click.FloatRange(0, 1, max_open=True), "SGD momentum."),
    "nesterov": (None, "Nesterov momentum."),
    "weight_decay": (click.FloatRange(min=0), "L2 weight decay on every parameter."),
    "warmup_epochs": (
        click.FloatRange(min=0),
        "Epochs of linear warm-up from 0 to --lr; a cosine decay to 0 follows (per step).",
    ),
    "label_smoothing": (
        click.FloatRange(0, 1, max_open=True),
        "Label smoothing of the cross-entropy (the reference reports used 0.1).",
    ),
    "mixup": (
        click.FloatRange(min=0),
        "Mixup alpha: each batch is blended with a shuffled copy of itself by a "
        "Beta(alpha, alpha) weight; 0 turns it off (the reference reports used 0.2).",
    ),
    "augment": (None, "Random crop 32 with zero padding 4 and horizontal flip."),
    "seed": (
        int,
        "Seed of the initial weights, shuffling, augmentation, mixup and dropout; the same "
        "seed gives the same model twice on the CPU.",
    ),
}
# What --resume takes from the checkpoint (all but --epochs, which may grow).
_FROM_CHECKPOINT = ("width", "dropout", "num_classes", *(n for n in _RECIPE_FLAGS if n != "epochs"))
_OUTPUTS = {
    "csv": ".history.csv",
    "loss": ".loss.png",
    "accuracy": ".accuracy.png",
    "confusion": ".confusion.png",
}


def recipe_options(command):
    """One flag per ``Recipe`` field (``--batch-size``, ``--nesterov/--no-nesterov``, ...)."""
    defaults = Recipe()
    for recipe_field in reversed(fields(Recipe)):
        name = recipe_field.name
        kind, text = _RECIPE_FLAGS[name]
        flag = "--" + name.replace("_", "-")
        default = getattr(defaults, name)
        declaration = f"{flag}/--no-{flag[2:]}" if isinstance(default, bool) else flag
        command = click.option(
            declaration, name, type=kind, default=default, show_default=True, help=text
        )(command)
    return command


def _parse_device(ctx, param, value: str) -> torch.device | None:
    """None for 'auto' (CUDA when present), else the named device, which must exist."""
    if value == "auto":
        return None
    try:
        device = torch.device(value)
    except RuntimeError:
        raise click.BadParameter(
            f"'{value}' is not a device: use auto, cpu, cuda or cuda:N"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise click.BadParameter("CUDA is not available here: use --device cpu (or auto)")
    return device


@dataclass
class _Start:
    """Where training starts: a fresh model, or the state of a saved run."""

    model: nn.Module
    arch: ArchConfig
    recipe: Recipe
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    optimizer_state: dict | None = None


def _fresh_start(arch: ArchConfig, recipe_fields: dict) -> _Start:
    try:
        recipe = Recipe(**recipe_fields)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    torch.manual_seed(recipe.seed)
    return _Start(arch.build(), arch, recipe)


def _resumed_start(ctx: click.Context, checkpoint: Path, epochs: int) -> _Start:
    """The run saved in ``checkpoint``; refuses flags that the checkpoint fixes."""
    given = [
        "--" + name.replace("_", "-")
        for name in _FROM_CHECKPOINT
        if ctx.get_parameter_source(name) is not ParameterSource.DEFAULT
    ]
    if given:
        raise click.UsageError(
            f"--resume continues with the architecture and recipe saved in {checkpoint}; "
            f"drop {', '.join(given)} (only --epochs may change, to train longer)"
        )
    if not checkpoint.is_file():
        raise click.UsageError(f"--resume: there is no checkpoint {checkpoint} to continue")
    loaded = load_model(checkpoint)
    saved = torch.load(checkpoint, map_location="cpu", weights_only=True)
    if loaded.arch is None or not {"recipe", "epoch", "history", "optimizer"} <= set(saved):
        raise MbzError(
            f"{checkpoint} was not written by mbz train (it lacks the recipe, epoch, history "
            "or optimizer state); start a new run without --resume"
        )
    recipe = Recipe.from_dict(saved["recipe"])
    if ctx.get_parameter_source("epochs") is not ParameterSource.DEFAULT:
        recipe = replace(recipe, epochs=epochs)
    return _Start(
        loaded.module, loaded.arch, recipe, saved["epoch"], saved["history"], saved["optimizer"]
    )


def _datasets(
    source: str, root: str | None, limits: tuple[int | None, int | None]
) -> tuple[Dataset, Dataset]:
    """The train and test splits, cut to their first N images when limits are given."""
    train, test = (load_split(source, split, data_root=root) for split in ("train", "test"))
    return tuple(
        data if limit is None else data.head(limit)
        for data, limit in zip((train, test), limits, strict=True)
    )


def _check_classes(arch: ArchConfig, *datasets: Dataset) -> None:
    """UsageError when a label is beyond the model's classes."""
    top = max(int(data.labels.max()) for data in datasets)
    if top >= arch.num_classes:
        raise click.UsageError(
            f"the data has labels up to {top}, but the model has {arch.num_classes} classes; "
            f"use --num-classes {top + 1} or more"
        )


def _versions() -> dict:
    versions = {
        "mbz": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    return {name: str(version) for name, version in versions.items()}  # plain str for pickling


def _device_name(device: torch.device | None) -> str:
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _to_cpu(value):
    """``value`` with every tensor inside moved to the CPU (an optimizer state, say)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: _to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_to_cpu(item) for item in value)
    return value


def _wandb_run(project: str, config: dict):
    """A W&B run (WANDB_MODE=offline logs without network); a clear error without wandb."""
    try:
        import wandb  # optional dependency
    except ImportError:
        raise click.ClickException(
            "--wandb needs the wandb package: pip install wandb (and set WANDB_MODE=offline "
            "to log without a network)"
        ) from None
    return wandb.init(project=project, config=config)


class _Recorder:
    """Rank 0's side of a run: per-epoch CSV, log line, W&B and resumable checkpoint."""

    def __init__(
        self, output: Path, start: _Start, data: dict, device: str, echo: bool, wandb_run
    ) -> None:
        self.output, self.start, self.data, self.device = output, start, data, device
        self.history = list(start.history)
        self.echo, self.wandb_run = echo, wandb_run

    def path(self, kind: str) -> Path:
        """Where an output of ``kind`` (see ``_OUTPUTS``) goes, next to the checkpoint."""
        return self.output.with_name(self.output.stem + _OUTPUTS[kind])

    def on_epoch(self, stats: dict) -> None:
        self.history.append(stats)
        with self.path("csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(stats))
            writer.writeheader()
            writer.writerows(self.history)
        if self.echo:
            click.echo(_epoch_line(stats, self.start.recipe.epochs), err=True)
        if self.wandb_run is not None:
            logged = {key: value for key, value in stats.items() if value is not None}
            self.wandb_run.log(logged, step=stats["epoch"])

    def on_checkpoint(self, optimizer_state: dict) -> None:
        """Save the model as it is now, atomically (a crash keeps the previous epoch's)."""
        last = self.history[-1]
        partial = self.output.with_name(self.output.name + ".partial")
        save_checkpoint(
            partial,
            self.start.model,
            self.start.arch,
            recipe=self.start.recipe.to_dict(),
            seed=self.start.recipe.seed,
            epoch=last["epoch"],
            accuracy=last["val_accuracy"],
            history=self.history,
            data=self.data,
            device=self.device,
            world_size=int(os.environ.get("WORLD_SIZE", "1")),
            versions=_versions(),
            optimizer=_to_cpu(optimizer_state),
        )
        os.replace(partial, self.output)


def _epoch_line(stats: dict, epochs: int) -> str:
    return (
        f"epoch {stats['epoch']}/{epochs}: train loss {stats['train_loss']:.4f} "
        f"acc {100 * stats['train_accuracy']:.2f}% | test loss {stats['val_loss']:.4f} "
        f"acc {100 * stats['val_accuracy']:.2f}% | {stats['images_per_s']:,.0f} img/s, "
        f"{stats['seconds']:.1f} s"
    )


def _write_plots(recorder: _Recorder, test: Dataset, predictions: np.ndarray) -> list[str]:
    """Loss and accuracy curves and the confusion matrix; their paths."""
    history = recorder.history
    epochs = [row["epoch"] for row in history]
    line_chart(
        recorder.path("loss"),
        {
            "train": (epochs, [row["train_loss"] for row in history]),
            "test": (epochs, [row["val_loss"] for row in history]),
        },
        "Loss per epoch",
        "epoch",
        "cross-entropy",
    )
    line_chart(
        recorder.path("accuracy"),
        {
            "train": (epochs, [100 * row["train_accuracy"] for row in history]),
            "test": (epochs, [100 * row["val_accuracy"] for row in history]),
        },
        "Top-1 accuracy per epoch",
        "epoch",
        "accuracy (%)",
    )
    classes = recorder.start.arch.num_classes
    names = test.classes if len(test.classes) == classes else tuple(map(str, range(classes)))
    accuracy = float((predictions == test.labels).mean())
    confusion_matrix_png(
        recorder.path("confusion"),
        confusion_matrix(test.labels, predictions, classes),
        names,
        f"Confusion matrix: {100 * accuracy:.2f}% on {len(test)} test images",
    )
    return [str(recorder.path(kind)) for kind in ("loss", "accuracy", "confusion")]


def _finish(recorder: _Recorder, test: Dataset, result: FitResult, began: float) -> dict:
    """Final test evaluation, plots and W&B summary; the run's summary."""
    loss, accuracy, predictions = evaluate_model(recorder.start.model, test)
    plots = _write_plots(recorder, test, predictions)
    speeds = [row["images_per_s"] for row in result.history]
    if recorder.wandb_run is not None:
        recorder.wandb_run.summary.update({"test_accuracy": accuracy, "test_loss": loss})
        recorder.wandb_run.finish()
    return {
        "checkpoint": str(recorder.output),
        "epochs": recorder.start.recipe.epochs,
        "epochs_run": len(result.history),
        "test_accuracy": accuracy,
        "test_loss": loss,
        "test_images": len(test),
        "test_data": test.source,
        "images_per_s": float(np.median(speeds)) if speeds else None,
        "device": recorder.device,
        "seconds": time.perf_counter() - began,
        "history_csv": str(recorder.path("csv")),
        "plots": plots,
    }


def _report(summary: dict, as_json: bool) -> None:
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(
        f"wrote {summary['checkpoint']}: test accuracy {100 * summary['test_accuracy']:.2f}% "
        f"on {summary['test_images']} images of {summary['test_data']} after "
        f"{summary['epochs']} epochs"
    )
    speed = summary["images_per_s"]
    rate = "no epochs run" if speed is None else f"{speed:,.0f} images/s (median epoch)"
    click.echo(f"training: {rate} on {summary['device']}, {summary['seconds']:.1f} s")
    click.echo(f"curves: {', '.join(summary['plots'])}; history: {summary['history_csv']}")


@click.command("train")
@click.option(
    "--data",
    "data_source",
    required=True,
    metavar="SOURCE",
    help="Training and test images: 'cifar10' (torchvision, downloaded to --data-root), an "
    ".npz with x_train/y_train/x_test/y_test, or a cifar-10-batches-py folder.",
)
@click.option(
    "--data-root",
    type=click.Path(file_okay=False),
    default=None,
    help="Folder holding (or to download) torchvision's CIFAR-10 [default: ~/.cache/mbz].",
)
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=Path("model.pt"),
    show_default=True,
    help="The checkpoint to write; the CSV and PNGs go next to it (see above).",
)
@click.option(
    "--limit-train", type=click.IntRange(min=1), default=None, help="Use the first N train images."
)
@click.option(
    "--limit-test", type=click.IntRange(min=1), default=None, help="Use the first N test images."
)
@click.option(
    "--width",
    type=click.FloatRange(min=0, min_open=True),
    default=1.0,
    show_default=True,
    help="Width multiplier of MobileNet-v2's channels.",
)
@click.option(
    "--dropout",
    type=click.FloatRange(0, 1, max_open=True),
    default=0.2,
    show_default=True,
    help="Dropout before the classifier.",
)
@click.option(
    "--num-classes",
    type=click.IntRange(min=2),
    default=None,
    help="Classifier outputs [default: the number of class names of the data, 10 for CIFAR-10].",
)
@recipe_options
@click.option(
    "--resume",
    is_flag=True,
    help="Continue the run saved in --output (weights, optimizer, epoch, history) with its "
    "architecture and recipe; --epochs may be raised to train longer (the cosine then "
    "stretches over the new total).",
)
@click.option(
    "--device",
    default="auto",
    show_default=True,
    callback=_parse_device,
    help="auto (CUDA when present), cpu, cuda or cuda:N. Under torchrun each process takes "
    "the GPU of its local rank.",
)
@click.option(
    "--wandb",
    "use_wandb",
    is_flag=True,
    help="Log to Weights & Biases (needs `pip install "
    "wandb`; WANDB_MODE=offline logs without network).",
)
@click.option("--wandb-project", default="mbz", show_default=True, help="W&B project name.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@click.pass_context
def train_command(
    ctx,
    data_source,
    data_root,
    output,
    limit_train,
    limit_test,
    width,
    dropout,
    num_classes,
    resume,
    device,
    use_wandb,
    wandb_project,
    as_json,
    **recipe_fields,
):
    """Train mbz's CIFAR-10 MobileNet-v2 on the train split of --data; the test split is
    evaluated after every epoch.

    \b
    Written next to the checkpoint, e.g. for -o runs/model.pt:
      runs/model.history.csv    per-epoch lr, loss and accuracy (val_* = test split), images/s
      runs/model.loss.png       train and test loss per epoch
      runs/model.accuracy.png   train and test accuracy per epoch
      runs/model.confusion.png  confusion matrix of the final model on the test split

    The checkpoint, rewritten after every epoch, holds the weights and the architecture (so
    `mbz pack model.pt` needs no flags), the recipe, seed, versions, history, optimizer state
    (for --resume) and the final test accuracy. The defaults follow the reference reports;
    on a GPU training uses mixed precision and channels_last. For several GPUs, or CPU
    processes, launch the same command with torchrun:

    \b
      mbz train --data cifar10 -o model.pt --label-smoothing 0.1 --mixup 0.2
      torchrun --nproc_per_node 4 $(which mbz) train --data cifar10 -o model.pt
    """
    train, test = _datasets(data_source, data_root, (limit_train, limit_test))
    if resume:
        start = _resumed_start(ctx, output, recipe_fields["epochs"])
    else:
        arch = ArchConfig(
            num_classes=num_classes or len(train.classes), width_mult=width, dropout=dropout
        )
        start = _fresh_start(arch, recipe_fields)
    _check_classes(start.arch, train, test)
    main = is_main_process()
    config = {"recipe": start.recipe.to_dict(), "arch": start.arch.to_dict()}
    recorder = _Recorder(
        output,
        start,
        {"source": data_source, "train_images": len(train), "test_images": len(test)},
        _device_name(device),
        echo=not as_json,
        wandb_run=_wandb_run(wandb_project, config) if use_wandb and main else None,
    )
    output.parent.mkdir(parents=True, exist_ok=True)
    began = time.perf_counter()
    result = fit(
        start.model,
        train,
        start.recipe,
        val=test,
        device=device,
        on_epoch=recorder.on_epoch,
        on_checkpoint=recorder.on_checkpoint,
        start_epoch=start.epoch,
        optimizer_state=start.optimizer_state,
        progress=not as_json,
    )
    if main:
        _report(_finish(recorder, test, result, began), as_json)
