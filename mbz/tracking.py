"""Experiment tracking with W&B for ``mbz sweep``: one W&B run per sweep run (its grid point as
the config, its size and accuracies as the summary, which W&B's parallel-coordinates panel
reads), and a table of every run, the data behind mbz's own parallel-coordinates chart.

``wandb`` is the imported package (an optional dependency the commands import); W&B's own
settings apply, so ``WANDB_MODE=offline`` logs to files without a network.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mbz.charts import parallel_columns

GROUP = "mbz-sweep"
TABLE = "sweep"  # the key of the table of runs


def run_metrics(record: dict) -> dict[str, float]:
    """What a sweep run logs: size, ratio, accuracies, activation peak and pack time."""
    return {
        "file_bytes": record["file_bytes"],
        "ratio": record["ratio"],
        "accuracy": record["accuracy"],
        "act_peak_bytes": record["act_peak_bytes"],
        "pack_seconds": record["pack_seconds"],
        **{f"accuracy_{k}": v for k, v in record["accuracy_by_runtime"].items()},
    }


def sweep_run_logger(wandb, project: str, out_dir: Path) -> Callable[[dict], None]:
    """A callback logging each new sweep record as one W&B run, files under ``out_dir``."""

    def log(record: dict) -> None:
        run = wandb.init(
            project=project, name=record["key"], config=record["config"], dir=str(out_dir),
            group=GROUP, job_type=record["kind"],
        )  # fmt: skip
        run.log(run_metrics(record))
        run.finish()

    return log


def log_sweep_table(wandb, project: str, out_dir: Path, records: list[dict]) -> None:
    """Log the parallel-coordinates table of ``records`` (one row per run) as one W&B run."""
    columns = parallel_columns(records)
    rows = [list(row) for row in zip(*columns.values(), strict=True)]
    run = wandb.init(
        project=project, name="sweep-table", dir=str(out_dir), group=GROUP,
        job_type="table",
    )  # fmt: skip
    run.log({TABLE: wandb.Table(columns=list(columns), data=rows)})
    run.finish()
