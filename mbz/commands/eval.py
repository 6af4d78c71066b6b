"""``mbz eval``: reload a .mbz file and prove its accuracy with every runtime."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mbz.commands.dataset import open_test_split
from mbz.commands.limits import limits_option
from mbz.commands.params import data_options, progress_bar
from mbz.verify import RUNTIMES, open_checked, verify


@click.command("eval")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@data_options(required=True)
@click.option(
    "--runtime",
    type=click.Choice([*RUNTIMES, "all"]),
    default="numpy",
    show_default=True,
    help="numpy: mbz's torch-free runtime; torch: the fake-quant PyTorch model; onnx: the file "
    "exported in memory (as `mbz export-onnx` does) and run by onnxruntime on CPU, 1 thread; "
    "all: every runtime, and for each pair the per-image top-1 agreement and the largest "
    "absolute logit difference.",
)
@click.option(
    "--tolerance",
    type=click.FloatRange(min=0.0),
    default=0.1,
    show_default=True,
    help="Largest accepted accuracy difference, in percentage points, between runtimes and "
    "against the accuracy stored at pack time (when measured on the same images).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@limits_option()
def eval_command(file, data_source, data_root, limit, runtime, tolerance, as_json, limits):
    """Measure the top-1 accuracy of FILE (a .mbz) on --data.

    Exits with status 1 when runtimes disagree, or differ from the accuracy stored at pack
    time, by more than the tolerance, or when FILE is not a valid .mbz within the limits (it is
    validated before any image is read). When every layer of FILE is exact (SPEC.md 7.3; `mbz
    inspect` says so), any logit that differs between two runtimes is an error: they must be
    bit-identical. Only --runtime torch (or all) imports PyTorch.
    """
    mbz = open_checked(file, limits)
    input_shape = mbz.metadata["graph"]["input_shape"]
    dataset = open_test_split(data_source, data_root, limit, input_shape, str(file))
    runtimes = RUNTIMES if runtime == "all" else (runtime,)
    total = len(dataset.labels) * len(runtimes)
    with progress_bar(total, "evaluating", enabled=not as_json) as update:
        report = verify(mbz, dataset, runtimes, tolerance / 100, progress=update, limits=limits)
    if as_json:
        click.echo(json.dumps(report.to_dict(), indent=2, sort_keys=True))
    else:
        click.echo(report.to_text())
    if report.failures:
        raise click.ClickException("; ".join(report.failures))
