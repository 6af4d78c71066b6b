"""``mbz inspect``: where the bytes of a .mbz file go."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mbz.commands.limits import limits_option
from mbz.format import Limits
from mbz.inspect import describe, format_report


@click.command("inspect")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print everything as JSON.")
@click.option(
    "--wide",
    is_flag=True,
    help="Every column (shapes before and after, bytes per category, accumulator bound) and "
    "whole layer names, wider than 100 columns.",
)
@click.option(
    "--onnx",
    is_flag=True,
    help="Also export the file to ONNX in memory (as `mbz export-onnx` does) and give its size.",
)
@limits_option()
def inspect_command(file: Path, as_json: bool, wide: bool, onnx: bool, limits: Limits) -> None:
    """Validate FILE (a .mbz, every checksum) and show its bytes per layer.

    Per layer (within 100 columns; --wide for every column): weight shape before and after
    channel pruning, kept output channels, encoding (+h when Huffman-coded), bits it was
    quantized to, codebook size k, share of pruned weights and how their mask is stored
    (bitmap or csr). Byte columns: payload (values, indices or integer codes), codebook
    (centroids and Huffman code lengths), scales (scales and zero points), mask (bitmap or CSR
    positions of pruned tensors), then the file-level metadata, header and alignment padding,
    which add up to the file size. Index streams (codes plus Huffman code lengths, "index B")
    are set against their order-0 entropy ("H0 B": ceil(n * H / 8), H over the kept codes'
    frequencies), per layer in --wide and --json, in total in the summary. With --onnx the
    summary also gives the size of the file as ONNX.

    Column "exact" (SPEC.md 7.3): whether the layer reads integer activation codes and has
    integer weights, so that every runtime sums it exactly, and how: f32 (one float32 sum), f32
    chunks (float32 sums of chunks of input channels, added in float64), or no; --wide and
    --json add the bound on its partial sums. The summary says whether all layers are exact,
    so that numpy, torch and onnx logits are bit-identical, or how many are not and why.

    A file from elsewhere is untrusted: one that would cost more than the limits to read or run
    is refused (exit 1) unless --raise-limit raises them.
    """
    facts = describe(file, limits, onnx)
    text = json.dumps(facts, indent=2, sort_keys=True) if as_json else format_report(facts, wide)
    click.echo(text)
