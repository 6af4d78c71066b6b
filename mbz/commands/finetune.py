"""What ``mbz pack`` prints about fine-tuning: each stage's name and a progress bar per epoch
on stderr while it runs (the library's ``on_stage``/``on_step`` callbacks), a summary after."""

from __future__ import annotations

from collections.abc import Callable

import click

from mbz.commands.progress import EpochBars


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
