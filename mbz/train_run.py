"""What a ``mbz train`` run leaves behind: the resumable checkpoint, the per-epoch CSV, the
curves and confusion matrix, and the W&B log (the command in ``mbz.commands.train`` is a thin
layer over this)."""

from __future__ import annotations

import csv
import os
import platform
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torchvision
from torch import nn

from mbz import __version__
from mbz.charts import confusion_matrix_chart, line_chart, save
from mbz.checkpoint import save_checkpoint
from mbz.data import Dataset
from mbz.models import ArchConfig
from mbz.train_recipe import Recipe
from mbz.training import FitResult, confusion_matrix, evaluate_model

OUTPUTS = {
    "csv": ".history.csv",
    "loss": ".loss.png",
    "accuracy": ".accuracy.png",
    "confusion": ".confusion.png",
}


@dataclass
class TrainStart:
    """Where training starts: a fresh model, or the state of a saved run."""

    model: nn.Module
    arch: ArchConfig
    recipe: Recipe
    epoch: int = 0
    history: list[dict] = field(default_factory=list)
    optimizer_state: dict | None = None


def versions() -> dict:
    """Versions of mbz, torch, torchvision, numpy and Python, as plain strings."""
    versions = {
        "mbz": __version__,
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
    return {name: str(version) for name, version in versions.items()}  # plain str for pickling


def device_name(device: torch.device | None) -> str:
    """The GPU's name, or "cpu"."""
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def to_cpu(value):
    """``value`` with every tensor inside moved to the CPU (an optimizer state, say)."""
    if isinstance(value, torch.Tensor):
        return value.cpu()
    if isinstance(value, dict):
        return {key: to_cpu(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(to_cpu(item) for item in value)
    return value


class RunRecorder:
    """Rank 0's side of a run: per-epoch CSV, log line, W&B and resumable checkpoint."""

    def __init__(
        self,
        output: Path,
        start: TrainStart,
        data: dict,
        device: str,
        log: Callable[[str], None] | None,
        wandb_run,
    ) -> None:
        self.output, self.start, self.data, self.device = output, start, data, device
        self.history = list(start.history)
        self.log, self.wandb_run = log, wandb_run

    def path(self, kind: str) -> Path:
        """Where an output of ``kind`` (see ``OUTPUTS``) goes, next to the checkpoint."""
        return self.output.with_name(self.output.stem + OUTPUTS[kind])

    def on_epoch(self, stats: dict) -> None:
        self.history.append(stats)
        with self.path("csv").open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(stats))
            writer.writeheader()
            writer.writerows(self.history)
        if self.log is not None:
            self.log(epoch_line(stats, self.start.recipe.epochs))
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
            versions=versions(),
            optimizer=to_cpu(optimizer_state),
        )
        os.replace(partial, self.output)


def epoch_line(stats: dict, epochs: int) -> str:
    """One epoch's statistics as a log line."""
    return (
        f"epoch {stats['epoch']}/{epochs}: train loss {stats['train_loss']:.4f} "
        f"acc {100 * stats['train_accuracy']:.2f}% | test loss {stats['val_loss']:.4f} "
        f"acc {100 * stats['val_accuracy']:.2f}% | {stats['images_per_s']:,.0f} img/s, "
        f"{stats['seconds']:.1f} s"
    )


def write_plots(recorder: RunRecorder, test: Dataset, predictions: np.ndarray) -> list[str]:
    """Loss and accuracy curves and the confusion matrix (PNG); their paths."""
    history = recorder.history
    epochs = [row["epoch"] for row in history]

    def curves(key: str, scale: float) -> dict:
        return {
            name: (epochs, [scale * row[f"{prefix}_{key}"] for row in history])
            for name, prefix in (("train", "train"), ("test", "val"))
        }

    classes = recorder.start.arch.num_classes
    names = test.classes if len(test.classes) == classes else tuple(map(str, range(classes)))
    accuracy = float((predictions == test.labels).mean())
    figures = {
        "loss": line_chart(curves("loss", 1), "Loss per epoch", "epoch", "cross-entropy"),
        "accuracy": line_chart(
            curves("accuracy", 100), "Top-1 accuracy per epoch", "epoch", "accuracy (%)"
        ),
        "confusion": confusion_matrix_chart(
            confusion_matrix(test.labels, predictions, classes),
            names,
            f"Confusion matrix: {100 * accuracy:.2f}% on {len(test)} test images",
        ),
    }
    return [str(save(figure, recorder.path(kind))[0]) for kind, figure in figures.items()]


def finish_run(recorder: RunRecorder, test: Dataset, result: FitResult, began: float) -> dict:
    """Final test evaluation, plots and W&B summary; the run's summary."""
    loss, accuracy, predictions = evaluate_model(recorder.start.model, test)
    plots = write_plots(recorder, test, predictions)
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
