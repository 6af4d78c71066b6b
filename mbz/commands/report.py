"""``mbz report``: the compression analysis of a sweep, from the files on disk."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mbz.report import build_report, format_markdown


@click.command("report")
@click.argument("results", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--baseline",
    required=True,
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="The uncompressed model checkpoint the sweep started from (its FP32 bytes and "
    "conv/linear weights are the 'before' of every ratio).",
)
@click.option(
    "--max-drop",
    type=click.FloatRange(min=0.0),
    default=1.0,
    show_default=True,
    help="Largest accepted top-1 accuracy drop from the baseline, in percentage points.",
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow --baseline to be a whole pickled nn.Module (runs code from the file).",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--markdown", "as_markdown", is_flag=True, help="Print Markdown (the default).")
def report_command(results, baseline, max_drop, trust_pickle, as_json, as_markdown):
    """Compression report of the sweep in RESULTS (its folder or its results.jsonl).

    For the smallest run within --max-drop of the baseline's accuracy: the model compression
    ratio (FP32 model bytes / .mbz bytes), the weights-only ratio (FP32 conv/linear weight
    bytes / their payload, with codebooks, scales, masks, metadata and other bytes listed
    separately), the activation compression ratio (peak live activation bytes per image
    measured by the numpy runtime, float vs the stored bits) and the final size in MB. Every
    .mbz file is re-read and validated.
    """
    if as_json and as_markdown:
        raise click.UsageError("give --json or --markdown, not both")
    report = build_report(results, baseline, max_drop, trust_pickle)
    if as_json:
        click.echo(json.dumps(report, indent=2))
    else:
        click.echo(format_markdown(report), nl=False)
