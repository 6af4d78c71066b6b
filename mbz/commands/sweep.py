"""``mbz sweep``: pack and evaluate a grid of compression settings, resumably, and chart it."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mbz.charts import write_charts
from mbz.commands.params import data_options, import_wandb, progress_bar
from mbz.config import PackConfig
from mbz.models import ARCHS
from mbz.sweep import (
    RESULTS_CSV,
    RESULTS_JSONL,
    SweepOutcome,
    SweepSettings,
    load_grid,
    parse_settings,
    plan,
    point_config,
    run_locally,
    run_sweep,
)
from mbz.tracking import log_sweep_table, sweep_run_logger
from mbz.verify import RUNTIMES


def _runner(use_ray: bool, ray_address: str | None, ray_cpus: int | None):
    """The local runner, or Ray's (imported only when asked for)."""
    if not use_ray:
        if ray_address or ray_cpus:
            raise click.UsageError("--ray-address and --ray-cpus need --ray")
        return run_locally
    if ray_address and ray_cpus:
        raise click.UsageError("--ray-cpus sizes a local Ray, not a cluster (--ray-address)")
    from mbz.ray_sweep import ray_runner

    return ray_runner(ray_address, ray_cpus)


@click.command("sweep")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@data_options(required=True)
@click.option(
    "--grid",
    required=True,
    help="The settings to combine, e.g. 'bits=8,4,3,2 act_bits=32,8,4 prune=0,0.36,0.5 "
    'method=kmeans,uniform\', or a .json file such as {"bits": [8, 4], "prune": [0, 0.5]} '
    "(YAML is not read). Keys are the pack config's fields (the `mbz pack` flags with _ for "
    "-): bits (a number sets conv and fc), act_bits (32: float), prune, method, prune_mode, "
    "finetune_epochs, calib, huffman, ...",
)
@click.option(
    "--set",
    "overrides",
    multiple=True,
    metavar="KEY=VALUE",
    help="A pack config field for every run (repeatable), e.g. --set calib_images=256 "
    "--set huffman=true --set bits=conv=4,fc=2; grid keys override it.",
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
    help="Runtime(s) measuring each run's accuracy, as `mbz eval`; the first one is the "
    "accuracy charted and reported. The torch accuracy measured at pack time is kept as well.",
)
@click.option(
    "--peak-images",
    type=click.IntRange(min=1),
    default=4,
    show_default=True,
    help="Test images the numpy runtime runs to measure each run's peak activation bytes.",
)
@click.option(
    "--arch",
    type=click.Choice(list(ARCHS)),
    default=None,
    help="The network of a MobileNet-v2 state_dict, as for `mbz pack` (not needed for mbz "
    "train's checkpoints).",
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow MODEL to be a whole pickled nn.Module. Unpickling runs code from the file: "
    "use only for files you trust.",
)
@click.option(
    "--ray",
    "use_ray",
    is_flag=True,
    help="Run the points as Ray tasks (needs `pip install 'mbz[ray]'`); a local Ray is started "
    "in this process unless --ray-address is given. Records and resuming are as without it.",
)
@click.option(
    "--ray-address",
    default=None,
    metavar="ADDRESS",
    help="A running Ray cluster ('auto' or host:port) for --ray; its workers need mbz installed.",
)
@click.option(
    "--ray-cpus",
    type=click.IntRange(min=1),
    default=None,
    help="CPUs of the local Ray that --ray starts [default: all].",
)
@click.option(
    "--wandb",
    "use_wandb",
    is_flag=True,
    help="Log every new run, and the table of all runs, to W&B (needs `pip install "
    "'mbz[wandb]'`; WANDB_MODE=offline logs without a network, `wandb sync` uploads later).",
)
@click.option("--wandb-project", default="mbz-sweep", show_default=True, help="W&B project.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def sweep_command(
    model, data_source, data_root, limit, grid, overrides, out_dir, runtime, peak_images,
    arch, trust_pickle, use_ray, ray_address, ray_cpus, use_wandb, wandb_project, as_json,
):  # fmt: skip
    """Pack and evaluate MODEL at every combination of --grid, plus a float32 baseline.

    Each run records its settings, the real .mbz size and its ratio to FP32, the accuracy per
    runtime, the pack time and the measured activation memory, appended to results.jsonl as it
    finishes; rerunning the same command skips finished runs, so an interrupted sweep
    continues (with or without --ray). Writes results.csv, parallel/pareto/sparsity .png and
    .svg, and sweep.html (one self-contained page that works offline).

    \b
    Example:
      mbz sweep model.pt --data cifar10 --grid "bits=8,4,2 prune=0,0.36 method=kmeans,uniform"
      mbz report model-sweep --baseline model.pt --max-drop 1.0
    """
    grid = load_grid(grid)
    out_dir = out_dir or model.with_name(model.stem + "-sweep")
    base = point_config(PackConfig(), parse_settings(overrides))
    settings = SweepSettings(
        model, data_source, out_dir, data_root, limit, runtime, peak_images, base, trust_pickle,
        arch,
    )  # fmt: skip
    runner = _runner(use_ray, ray_address, ray_cpus)
    wandb = import_wandb() if use_wandb else None
    on_record = sweep_run_logger(wandb, wandb_project, out_dir) if wandb else (lambda r: None)
    with progress_bar(len(plan(grid, settings)), "sweeping", enabled=not as_json) as update:
        outcome = run_sweep(grid, settings, update, on_record, runner)
    charts = write_charts(out_dir, outcome.records, f"mbz sweep of {model.name}")
    if wandb and outcome.ran:
        log_sweep_table(wandb, wandb_project, out_dir, outcome.records)
    _echo_summary(outcome, out_dir, charts, as_json)


def _echo_summary(outcome: SweepOutcome, out_dir: Path, charts: list[Path], as_json: bool) -> None:
    """The sweep's summary, as JSON or one line."""
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
