"""The fine-tuning options of ``mbz pack`` and the training data they need."""

from __future__ import annotations

from collections.abc import Callable

import click

from mbz.commands.progress import EpochBars
from mbz.config import PackConfig
from mbz.finetune import Tuning, load_training


def finetune_options(command: Callable) -> Callable:
    """``--finetune-epochs``, ``--finetune-lr``, ``--l1``, ``--prune-steps``, ``--val-fraction``
    and ``--seed``, passed to the command under the PackConfig field names."""
    options = [
        click.option(
            "--finetune-epochs",
            type=click.IntRange(min=0),
            default=PackConfig.finetune_epochs,
            show_default=True,
            help="Fine-tune on --data's train split after each compression step: channel "
            "pruning in --prune-steps rounds of this many epochs each (network slimming), weight "
            "pruning gradually (cubic schedule), then the quantized model (k-means centroids, "
            "uniform QAT with learned scales, quantized activations in place) for this many "
            "epochs. 0 packs post-training only.",
        ),
        click.option(
            "--finetune-lr",
            type=click.FloatRange(min=0, min_open=True),
            default=PackConfig.finetune_lr,
            show_default=True,
            help="Peak learning rate of each fine-tuning run (SGD, cosine decay to 0).",
        ),
        click.option(
            "--l1",
            type=click.FloatRange(min=0),
            default=PackConfig.l1,
            show_default=True,
            help="L1 penalty on BatchNorm gammas while fine-tuning channel pruning (network "
            "slimming used 1e-4).",
        ),
        click.option(
            "--prune-steps",
            type=click.IntRange(min=1),
            default=PackConfig.prune_steps,
            show_default=True,
            help="Channel pruning with fine-tuning: rounds that each prune a further "
            "--prune/N of the weights, then fine-tune.",
        ),
        click.option(
            "--val-fraction",
            type=click.FloatRange(0, 1, min_open=True, max_open=True),
            default=PackConfig.val_fraction,
            show_default=True,
            help="Share of the train split held out to pick the best fine-tuning epoch (the "
            "test split only reports).",
        ),
        click.option(
            "--seed",
            type=int,
            default=PackConfig.seed,
            show_default=True,
            help="Seed of the held-out split, shuffling and augmentation of fine-tuning; the "
            "same seed packs the same file twice on the CPU.",
        ),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def open_tuning(
    config: PackConfig, data_source: str | None, data_root: str | None, progress: bool
) -> Tuning | None:
    """The fine-tuning data ``config`` needs (None without ``finetune_epochs``); a usage
    error without ``--data``. With ``progress``, fine-tuning shows itself on stderr."""
    if not config.finetune_epochs:
        return None
    if not data_source:
        raise click.UsageError("--finetune-epochs needs --data with a train split to train on")
    callbacks = finetune_progress() if progress else {}
    return Tuning.of(load_training(data_source, data_root), config, **callbacks)


def finetune_progress() -> dict[str, Callable]:
    """The ``on_stage`` and ``on_step`` callbacks that show fine-tuning on stderr."""
    return {"on_stage": echo_stage, "on_step": EpochBars()}


def echo_stage(stage: str) -> None:
    """The line that starts a fine-tuning stage, on stderr."""
    click.echo(f"fine-tuning: {stage}", err=True)


def finetune_summary(history: list[dict]) -> str:
    """One line per fine-tuning stage: the held-out accuracy of the epoch it kept."""
    lines = []
    for stage in dict.fromkeys(row["stage"] for row in history):
        rows = [row for row in history if row["stage"] == stage]
        kept = next(row for row in rows if row["packed"])
        lines.append(
            f"fine-tuned {stage}: held-out accuracy {100 * kept['val_accuracy']:.2f}% "
            f"(epoch {kept['epoch']} of {len(rows)} kept)"
        )
    return "\n".join(lines)
