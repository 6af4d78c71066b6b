"""``mbz pack``: compress a PyTorch model into a .mbz file."""

from __future__ import annotations

import json
from pathlib import Path

import click

from mbz.checkpoint import load_model
from mbz.commands.dataset import open_test_split
from mbz.commands.params import BitsType, TripleType, data_options, progress_bar
from mbz.config import PackConfig
from mbz.data import CIFAR10_MEAN, CIFAR10_STD
from mbz.pack import pack


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
    mean,
    std,
    trust_pickle,
    data_source,
    data_root,
    limit,
    as_json,
):
    """Prune and quantize MODEL (a .pt checkpoint) into a .mbz file.

    With --data, the packed model (exactly what the file encodes) is evaluated in PyTorch and
    its accuracy is stored in the file, for `mbz eval` to check against.

    \b
    Example:
      mbz pack model.pt --prune 0.36 --bits conv=4,fc=2 -o model.mbz
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
            mean=mean,
            std=std,
        )
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    output = output or model.with_suffix(".mbz")
    loaded = load_model(model, trust_pickle=trust_pickle)
    dataset = open_test_split(data_source, data_root, limit) if data_source else None
    total = 0 if dataset is None else len(dataset.labels)
    with progress_bar(total, "evaluating", enabled=total > 0 and not as_json) as update:
        result = pack(loaded, config, output, dataset, progress=update)
    if as_json:
        click.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return
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
    click.echo(f"packed in {result.seconds:.1f} s")
