"""``mbz pack``: compress a PyTorch model into a .mbz file."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mbz.calibrate import load_calibration
from mbz.checkpoint import load_model
from mbz.commands.dataset import open_test_split
from mbz.commands.finetune import finetune_options, finetune_summary, open_tuning
from mbz.commands.params import BitsType, TripleType, data_options, progress_bar
from mbz.config import CALIB_METHODS, PackConfig, parse_act_bits
from mbz.data import CIFAR10_MEAN, CIFAR10_STD
from mbz.pack import PackResult, pack


def _act_bits(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, int]:
    """``--act-bits`` text -> {selector: bits}; no option: {} (float activations)."""
    try:
        return parse_act_bits(value) if value is not None else {}
    except ValueError as error:
        raise click.BadParameter(str(error), ctx, param) from None


@click.command("pack")
@click.argument("model", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Where to write the .mbz file [default: MODEL with the suffix .mbz].",
)
@click.option(
    "--bits",
    type=BitsType(),
    default="conv=4,fc=4",
    show_default=True,
    help="Weight bits per group: conv, fc, dw (depthwise), pw (1x1), first (first conv), or a "
    "layer-name glob such as 'features.18.*=8'. 1-8 quantize, 16 keeps float16, 32 float32. "
    "The most specific rule wins: glob > first > dw/pw > conv/fc.",
)
@click.option(
    "--method",
    type=click.Choice(["kmeans", "uniform"]),
    default="kmeans",
    show_default=True,
    help="kmeans: a per-layer codebook of 2^bits centroids (Deep Compression, linear init); "
    "uniform: integer codes with a scale and zero point.",
)
@click.option(
    "--symmetric/--asymmetric",
    default=False,
    show_default=True,
    help="Uniform only: ranges symmetric around zero, or from min to max.",
)
@click.option(
    "--per-channel/--per-tensor",
    default=True,
    show_default=True,
    help="Uniform only: one scale and zero point per output channel, or one per layer.",
)
@click.option(
    "--prune",
    type=click.FloatRange(0.0, 1.0, max_open=True),
    default=0.0,
    show_default=True,
    help="Fraction of conv and linear weights to remove.",
)
@click.option(
    "--prune-mode",
    type=click.Choice(["channel", "weight"]),
    default="channel",
    show_default=True,
    help="channel (default): remove whole channels with the smallest BatchNorm gamma (network "
    "slimming); layers become physically smaller, so the file needs no masks and every runtime "
    "gets faster. weight: remove the smallest weights anywhere (global magnitude) and store "
    "bitmap/CSR masks; keeps more accuracy at the same fraction but saves less and runs no faster.",
)
@click.option(
    "--huffman/--no-huffman",
    default=False,
    show_default=True,
    help="Huffman-code each layer's index stream where that is smaller.",
)
@click.option(
    "--act-bits",
    callback=_act_bits,
    metavar="BITS",
    help="Quantize activations (default: float). A number sets every relu/relu6 output, "
    "residual add output and block-ending projection output; rules pick per group: relu, add, "
    "proj, input (the network input, only when named), or a node-name glob, e.g. "
    "'relu=4,add=8,input=8'. 1-8 bits, 32 keeps float. Needs --data with a train split.",
)
@click.option(
    "--calib",
    type=click.Choice(CALIB_METHODS),
    default=PackConfig.calib,
    show_default=True,
    help="How --act-bits ranges are calibrated: min-max covers every value seen; percentile "
    "clips to the --percentile; mse picks the clipping range with the least quantization "
    "error. mse is the default because it worked best on the CIFAR-10 fragment: as good as "
    "the others at 8 bits, and at 4 bits 0.7 points below float activations where "
    "percentile lost 5 and min-max 8 (examples/bench_actquant.py).",
)
@click.option(
    "--calib-images",
    type=click.IntRange(min=1),
    default=PackConfig.calib_images,
    show_default=True,
    help="Training images (the first N of --data's train split) to calibrate activations on.",
)
@click.option(
    "--percentile",
    type=click.FloatRange(50.0, 100.0, min_open=True),
    default=PackConfig.calib_percentile,
    show_default=True,
    help="--calib percentile: clip activations to this percentile (and 100 minus it below).",
)
@click.option(
    "--mean",
    type=TripleType(),
    default=",".join(map(str, CIFAR10_MEAN)),
    show_default=True,
    help="Input normalisation mean per RGB channel (0-1 scale).",
)
@click.option(
    "--std",
    type=TripleType(),
    default=",".join(map(str, CIFAR10_STD)),
    show_default=True,
    help="Input normalisation std per RGB channel (0-1 scale).",
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow MODEL to be a whole pickled nn.Module. Unpickling runs code from the file: "
    "use only for files you trust.",
)
@data_options(required=False)
@finetune_options
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def pack_command(
    model,
    output,
    bits,
    method,
    symmetric,
    per_channel,
    prune,
    prune_mode,
    huffman,
    act_bits,
    calib,
    calib_images,
    percentile,
    mean,
    std,
    trust_pickle,
    data_source,
    data_root,
    limit,
    as_json,
    **finetune,
):
    """Prune and quantize MODEL (a .pt checkpoint) into a .mbz file.

    With --data, the packed model (exactly what the file encodes) is evaluated in PyTorch and
    its accuracy is stored in the file, for `mbz eval` to check against. With --act-bits, the
    activations are calibrated on --data's train split (never its test split) after the
    weights are quantized, so the stored accuracy is the fully quantized model's.

    \b
    Examples:
      mbz pack model.pt --prune 0.36 --bits conv=4,fc=2 -o model.mbz
      mbz pack model.pt --bits conv=8,fc=8 --act-bits 8 --data cifar10 -o w8a8.mbz
      mbz pack model.pt --prune 0.36 --data cifar10 --finetune-epochs 2 -o tuned.mbz
    """
    try:
        config = PackConfig(
            bits=bits,
            method=method,
            prune=prune,
            prune_mode=prune_mode,
            symmetric=symmetric,
            per_channel=per_channel,
            huffman=huffman,
            act_bits=act_bits,
            calib=calib,
            calib_images=calib_images,
            calib_percentile=percentile,
            mean=mean,
            std=std,
            **finetune,
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    if act_bits and not data_source:
        raise click.UsageError("--act-bits needs --data with a train split to calibrate on")
    output = output or model.with_suffix(".mbz")
    loaded = load_model(model, trust_pickle=trust_pickle)
    dataset = open_test_split(data_source, data_root, limit) if data_source else None
    calibration = load_calibration(data_source, data_root, calib_images) if act_bits else None
    tuning = open_tuning(config, data_source, data_root, progress=not as_json)
    total = sum(len(d) for d in (dataset, calibration) if d is not None)
    with progress_bar(total, "packing", enabled=total > 0 and not as_json) as update:
        result = pack(loaded, config, output, dataset, update, calibration, tuning)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return
    _echo_summary(result)


def _echo_summary(result: PackResult) -> None:
    """The human-readable summary of ``mbz pack``."""
    click.echo(
        f"wrote {result.path}: {result.file_bytes:,} bytes, "
        f"{result.ratio:.2f}x smaller than FP32 ({result.fp32_bytes:,} bytes)"
    )
    if result.accuracy:
        acc = result.accuracy
        click.echo(
            f"accuracy (torch fake-quant): {100 * acc['top1']:.2f}% "
            f"on {acc['images']} images of {acc['data']}"
        )
    if result.activation_peak_bytes:
        peaks = result.activation_peak_bytes
        click.echo(
            f"activation peak per image (numpy runtime): {peaks['float32']:,} bytes float32, "
            f"{peaks['quantized']:,} bytes quantized "
            f"({peaks['float32'] / peaks['quantized']:.2f}x smaller)"
        )
    if result.finetune:
        click.echo(finetune_summary(result.finetune))
    click.echo(f"packed in {result.seconds:.1f} s")
