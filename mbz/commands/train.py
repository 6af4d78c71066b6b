"""``mbz train``: train mbz's CIFAR MobileNet-v2 (or resume a run), with its curves."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from functools import partial
from pathlib import Path

import click
import torch
from click.core import ParameterSource

from mbz.checkpoint import load_run
from mbz.commands.params import Flag, field_options, import_wandb
from mbz.commands.progress import EpochBars
from mbz.data import IMAGE_SHAPE, Dataset, check_image_shape, load_split
from mbz.models import ArchConfig
from mbz.train_dist import is_main_process
from mbz.train_recipe import Recipe
from mbz.train_run import RunRecorder, TrainStart, device_name, finish_run
from mbz.training import fit

# Help and type of each Recipe field's flag; the defaults come from Recipe itself.
_RECIPE_FLAGS: dict[str, Flag] = {
    "epochs": Flag("Passes over the training images.", click.IntRange(min=1)),
    "batch_size": Flag(
        "Images per optimizer step (all processes together under torchrun).",
        click.IntRange(min=1),
    ),
    "lr": Flag(
        "Peak learning rate, reached at the end of the warm-up (for batch 128).",
        click.FloatRange(min=0, min_open=True),
    ),
    "momentum": Flag("SGD momentum.", click.FloatRange(0, 1, max_open=True)),
    "nesterov": Flag("Nesterov momentum."),
    "weight_decay": Flag("L2 weight decay on every parameter.", click.FloatRange(min=0)),
    "warmup_epochs": Flag(
        "Epochs of linear warm-up from 0 to --lr; a cosine decay to 0 follows (per step).",
        click.FloatRange(min=0),
    ),
    "label_smoothing": Flag(
        "Label smoothing of the cross-entropy (the reference reports used 0.1).",
        click.FloatRange(0, 1, max_open=True),
    ),
    "mixup": Flag(
        "Mixup alpha: each batch is blended with a shuffled copy of itself by a "
        "Beta(alpha, alpha) weight; 0 turns it off (the reference reports used 0.2).",
        click.FloatRange(min=0),
    ),
    "augment": Flag("Random crop 32 with zero padding 4 and horizontal flip."),
    "seed": Flag(
        "Seed of the initial weights, shuffling, augmentation, mixup and dropout; the same "
        "seed gives the same model twice on the CPU.",
        int,
    ),
}
# What --resume takes from the checkpoint (all but --epochs, which may grow).
_FROM_CHECKPOINT = ("width", "dropout", "num_classes", *(n for n in _RECIPE_FLAGS if n != "epochs"))
recipe_options = field_options(Recipe, _RECIPE_FLAGS)


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


def _fresh_start(arch: ArchConfig, recipe_fields: dict) -> TrainStart:
    try:
        recipe = Recipe(**recipe_fields)
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    torch.manual_seed(recipe.seed)
    return TrainStart(arch.build(), arch, recipe)


def _resumed_start(ctx: click.Context, checkpoint: Path, epochs: int) -> TrainStart:
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
    saved = load_run(checkpoint)
    recipe = Recipe.from_dict(saved.recipe)
    if ctx.get_parameter_source("epochs") is not ParameterSource.DEFAULT:
        recipe = replace(recipe, epochs=epochs)
    model = saved.loaded.module
    return TrainStart(model, saved.arch, recipe, saved.epoch, saved.history, saved.optimizer)


def _datasets(
    source: str, root: str | None, limits: tuple[int | None, int | None]
) -> tuple[Dataset, Dataset]:
    """The train and test splits, cut to their first N images when limits are given, checked
    to be CIFAR-10-sized images."""
    train, test = (load_split(source, split, data_root=root) for split in ("train", "test"))
    train, test = (
        data if limit is None else data.head(limit)
        for data, limit in zip((train, test), limits, strict=True)
    )
    for data in (train, test):
        check_image_shape(data, IMAGE_SHAPE, "mbz's CIFAR-10 MobileNet-v2")
    return train, test


def _check_classes(arch: ArchConfig, *datasets: Dataset) -> None:
    """UsageError when a label is beyond the model's classes."""
    top = max(int(data.labels.max()) for data in datasets)
    if top >= arch.num_classes:
        raise click.UsageError(
            f"the data has labels up to {top}, but the model has {arch.num_classes} classes; "
            f"use --num-classes {top + 1} or more"
        )


def _wandb_run(project: str, config: dict):
    """A W&B run (WANDB_MODE=offline logs without network); a clear error without wandb."""
    return import_wandb().init(project=project, config=config)


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
    recorder = RunRecorder(
        output,
        start,
        {"source": data_source, "train_images": len(train), "test_images": len(test)},
        device_name(device),
        log=None if as_json else partial(click.echo, err=True),
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
        on_step=None if as_json else EpochBars(),
    )
    if main:
        _report(finish_run(recorder, test, result, began), as_json)
