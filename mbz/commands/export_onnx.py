"""``mbz export-onnx``: the .mbz file as an ONNX model, for onnxruntime and Netron."""

from __future__ import annotations

import json
from pathlib import Path

import click
import onnx

from mbz.commands.limits import limits_option
from mbz.format import Limits, read_mbz
from mbz.onnx.export import IR_VERSION, OPSET, export_onnx, onnx_bytes


@click.command("export-onnx")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the ONNX model [default: FILE with the suffix .onnx].",
)
@click.option(
    "--dense",
    is_flag=True,
    help="Store every weight as plain float32 (larger), for tools that cannot follow the "
    "in-graph decoding. Default: weights stay compressed and the graph decodes them.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
@limits_option()
def export_onnx_command(
    file: Path, output: Path | None, dense: bool, as_json: bool, limits: Limits
) -> None:
    """Export FILE (a .mbz) to ONNX (opset 21), without PyTorch.

    The model takes raw uint8 images [N, H, W, C] (normalisation is in the graph) and returns
    logits [N, classes]. Codebook indices and integer codes stay 4- or 8-bit and are decoded by
    Gather / DequantizeLinear; pruned weights are restored from a bitmap; quantized activations
    are QuantizeLinear/DequantizeLinear pairs. The model is checked with onnx.checker (full
    check) before it is written.

    \b
    Example:
      mbz export-onnx model.mbz -o model.onnx
    """
    output = output or file.with_suffix(".onnx")
    mbz = read_mbz(file, limits)
    model = export_onnx(mbz, dense=dense, limits=limits)
    try:
        onnx.checker.check_model(model, full_check=True)
    except onnx.checker.ValidationError as error:
        raise click.ClickException(
            f"the exported model fails onnx.checker (a bug in mbz, please report it): {error}"
        ) from error
    output.write_bytes(model.SerializeToString())
    summary = {
        "path": str(output),
        "onnx_bytes": onnx_bytes(model),
        "mbz_bytes": mbz.file_size,
        "onnx_to_mbz": onnx_bytes(model) / mbz.file_size,
        "dense": dense,
        "opset": OPSET,
        "ir_version": IR_VERSION,
        "checker": "ok",
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2, sort_keys=True))
        return
    weights = "dense float32 weights" if dense else "weights decoded in-graph"
    click.echo(
        f"wrote {output}: {summary['onnx_bytes']:,} bytes ONNX (opset {OPSET}, {weights}); "
        f".mbz {summary['mbz_bytes']:,} bytes; ONNX/.mbz {summary['onnx_to_mbz']:.2f}x; "
        "onnx.checker (full) passed"
    )
