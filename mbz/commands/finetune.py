"""What ``mbz pack`` prints about fine-tuning: each stage's name, a progress bar per epoch and a
line with each epoch's loss and held-out accuracy on stderr while it runs (the library's
``on_stage``/``on_step``/``on_epoch`` callbacks), a summary after."""

from __future__ import annotations

from collections.abc import Callable

import click

from mbz.commands.progress import EpochBars


def finetune_progress() -> dict[str, Callable]:
    """The ``on_stage``, ``on_step`` and ``on_epoch`` callbacks that show fine-tuning."""
    return {"on_stage": echo_stage, "on_step": EpochBars(), "on_epoch": echo_epoch}


def echo_stage(stage: str) -> None:
    """The line that starts a fine-tuning stage, on stderr."""
    click.echo(f"fine-tuning: {stage}", err=True)


def echo_epoch(stats: dict) -> None:
    """One epoch's line (epoch 0: the start, before training), on stderr."""
    held_out = f"held-out accuracy {100 * stats['val_accuracy']:.2f}%"
    if stats["train_loss"] is None:
        click.echo(f"  start: {held_out}", err=True)
        return
    click.echo(
        f"  epoch {stats['epoch']}: loss {stats['train_loss']:.3f}, {held_out}, "
        f"{stats['images_per_s']:,.0f} img/s",
        err=True,
    )


def finetune_summary(history: list[dict]) -> str:
    """One line per fine-tuning stage: the held-out accuracy of the state it kept."""
    lines = []
    for stage in dict.fromkeys(row["stage"] for row in history):
        rows = [row for row in history if row["stage"] == stage]
        kept = next(row for row in rows if row["packed"])
        trained = sum(row["train_loss"] is not None for row in rows)
        beaten = "its epoch did not" if trained == 1 else f"none of its {trained} epochs"
        which = (
            f"the start kept: {beaten} beat it"
            if kept["train_loss"] is None
            else f"epoch {kept['epoch']} of {trained} kept"
        )
        lines.append(
            f"fine-tuned {stage}: held-out accuracy {100 * kept['val_accuracy']:.2f}% ({which})"
        )
    return "\n".join(lines)
