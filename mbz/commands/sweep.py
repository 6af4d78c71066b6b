"""``mbz sweep``: pack and evaluate a grid of compression settings, resumably, and chart it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mbz.charts import write_charts
from mbz.commands.params import data_options, import_wandb, progress_bar
from mbz.sweep import (
    RESULTS_CSV,
    RESULTS_JSONL,
    SweepSettings,
    expand_grid,
    load_grid,
    parse_pack_args,
    run_sweep,
)
from mbz.verify import RUNTIMES


def _wandb_logger(project: str, out_dir: Path):
    """A callback logging each new run to W&B in offline mode (no network needed)."""
    wandb = import_wandb()

    def log(record: dict) -> None:
        run = wandb.init(
            project=project, name=record["key"], config=record["config"], mode="offline",
            dir=str(out_dir), group="mbz-sweep", job_type=record["kind"],
        )  # fmt: skip
        run.log({
            "file_bytes": record["file_bytes"], "ratio": record["ratio"],
            "accuracy": record["accuracy"], "act_peak_bytes": record["act_peak_bytes"],
            "pack_seconds": record["pack_seconds"],
            **{f"accuracy_{k}": v for k, v in record["accuracy_by_runtime"].items()},
        })  # fmt: skip
        run.finish()

    return log


@click.command("sweep")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@data_options(required=True)
@click.option(
    "--grid",
    required=True,
    help="The settings to combine, e.g. 'bits=8,4,3,2 act_bits=32,8,4 prune=0,0.36,0.5 "
    'method=kmeans,uniform\', or a .json file such as {"bits": [8, 4], "prune": [0, 0.5]} '
    "(YAML is not read). Keys: bits (conv and fc), act_bits (32: float), prune, method, "
    "prune_mode, finetune_epochs, calib.",
)
@click.option(
    "-o",
    "--out",
    "out_dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Folder for the runs, results.jsonl/.csv, the charts and sweep.html "
    "[default: MODEL's name + '-sweep', next to it]. Runs already there are not redone.",
)
@click.option(
    "--runtime",
    type=click.Choice([*RUNTIMES, "all"]),
    default="numpy",
    show_default=True,
    help="`mbz eval` runtime(s) measuring each run's accuracy; the first one is the accuracy "
    "charted and reported. The torch accuracy stored at pack time is kept as well.",
)
@click.option(
    "--peak-images",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Test images the numpy runtime runs to measure each run's peak activation bytes.",
)
@click.option(
    "--pack-args",
    default=None,
    metavar="OPTIONS",
    help="Further `mbz pack` options for every run, quoted as one string, "
    "e.g. '--calib-images 256 --huffman'.",
)
@click.option("--wandb", "use_wandb", is_flag=True, help="Log every new run to W&B, offline "
              "(needs `pip install wandb`; `wandb sync` uploads later).")  # fmt: skip
@click.option("--wandb-project", default="mbz-sweep", show_default=True, help="W&B project.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def sweep_command(
    model, data_source, data_root, limit, grid, out_dir, runtime, peak_images, pack_args,
    use_wandb, wandb_project, as_json,
):  # fmt: skip
    """Pack and evaluate MODEL at every combination of --grid, plus a float32 baseline.

    Each run records its settings, the real .mbz size and its ratio to FP32, the accuracy per
    runtime, the pack time and the measured activation memory, appended to results.jsonl as it
    finishes; rerunning the same command skips finished runs, so an interrupted sweep
    continues. Writes results.csv, parallel.png, pareto.png, sparsity.png and sweep.html (one
    self-contained page that works offline).

    \b
    Example:
      mbz sweep model.pt --data cifar10 --grid "bits=8,4,2 prune=0,0.36 method=kmeans,uniform"
      mbz report model-sweep --baseline model.pt --max-drop 1.0
    """
    grid = load_grid(grid)
    out_dir = out_dir or model.with_name(model.stem + "-sweep")
    settings = SweepSettings(
        model, data_source, out_dir, data_root, limit, runtime, peak_images,
        parse_pack_args(pack_args),
    )  # fmt: skip
    on_record = _wandb_logger(wandb_project, out_dir) if use_wandb else (lambda record: None)
    total = 1 + len(expand_grid(grid))
    with progress_bar(total, "sweeping", enabled=not as_json) as update:
        outcome = run_sweep(grid, settings, update, on_record)
    charts = write_charts(out_dir, outcome.records, f"mbz sweep of {model.name}")
    summary = {
        "out_dir": str(out_dir),
        "ran": outcome.ran,
        "skipped": outcome.skipped,
        "runs": len(outcome.records),
        "results": [str(out_dir / RESULTS_JSONL), str(out_dir / RESULTS_CSV)],
        "charts": [str(path) for path in charts],
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
        return
    click.echo(
        f"{outcome.ran} run(s) done, {outcome.skipped} already finished; "
        f"{len(outcome.records)} in {out_dir / RESULTS_CSV}; charts: {out_dir / 'sweep.html'}"
    )
