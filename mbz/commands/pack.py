"""``mbz pack``: compress a PyTorch model into a .mbz file."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click

from mbz.api import chance_warning, prepare_pack
from mbz.budget import AUTO_PRUNE_BITS, MAX_AUTO_PRUNE
from mbz.commands.finetune import finetune_progress, finetune_summary
from mbz.commands.params import (
    Flag,
    FractionOrWord,
    RulesType,
    TripleType,
    data_options,
    field_options,
    progress_bar,
)
from mbz.config import (
    ACT_GROUPS,
    CALIB_METHODS,
    CODEBOOK_KINDS,
    DEFAULT_BITS,
    GROUPS,
    METHODS,
    PRUNE_AUTO,
    PRUNE_MODES,
    PackConfig,
    SelectorError,
    activation_bits,
    weight_bits,
)
from mbz.models import ARCHS, arch_choices
from mbz.pack import PackResult

_DEFAULTS = ",".join(f"{group}={bits}" for group, bits in DEFAULT_BITS.items())
# One option per PackConfig field (named like it); the defaults come from PackConfig itself.
_PACK_FLAGS: dict[str, Flag] = {
    "bits": Flag(
        f"Weight bits per group: {', '.join(GROUPS)} (conv, linear, depthwise, 1x1 and first "
        "conv layers), or a layer-name glob such as 'features.18.*=8'. 1-8 quantize, 16 keeps "
        "float16, 32 float32. The most specific rule wins: glob > first > dw/pw > conv/fc. "
        f"Rules overlay the defaults {_DEFAULTS}: a layer no rule of yours selects keeps them "
        "(--bits fc=2 gives every conv layer 4 bits). A selector given twice, or matching no "
        "group or layer, is an error.",
        RulesType(weight_bits),
    ),
    "method": Flag(
        "kmeans: a per-layer codebook of 2^bits centroids (Deep Compression, linear init); "
        "uniform: integer codes with a scale and zero point.",
        click.Choice(METHODS),
    ),
    "bias_correction": Flag(
        "With --data: after the weights are quantized, restore each output channel's mean "
        "(through its bias) and spread (through its scale, for scaled codebooks and per-channel "
        "uniform codes) to the float model's, layer by layer on --calib-images train images "
        "(Nagel et al. 2019); after channel pruning, each BatchNorm is re-estimated against the "
        "unpruned model first. Stored in the file: every runtime computes the corrected model. "
        "Skipped when --data has no train split."
    ),
    "codebook": Flag(
        "--method kmeans only: which codebook to fit per layer: scaled (SPEC 3.6), plain "
        "(SPEC 3.3), int (SPEC 3.7: int8 centroids times a float16 scale per channel, so a "
        "layer over quantized activations accumulates exactly in every runtime), or auto: int "
        "when --act-bits quantizes activations, else the one of scaled and plain with the "
        "smaller error.",
        click.Choice(CODEBOOK_KINDS),
    ),
    "prune": Flag(
        "Fraction of conv and linear weights to remove. auto, with --target-ratio or "
        f"--target-size: as much as leaves the kept weights {AUTO_PRUNE_BITS:g} bits each on "
        "average in the budget (0.6 at --target-ratio 30 on a CIFAR-10 MobileNet-v2, none "
        f"below about 12x), at most {MAX_AUTO_PRUNE:.0%}; with fine-tuning, heavier channel "
        "pruning at more bits loses less than light pruning at fewer (at 30x, fine-tuned "
        "three epochs: -0.2 and -0.8 points of test top-1 on average over three runs of two "
        "models at 0.59; -33.5 to -36.7 at 0.36 with batches of 128; README).",
        FractionOrWord(PRUNE_AUTO),
    ),
    "prune_mode": Flag(
        "channel (default): remove whole channels, those whose zeroing costs the least loss "
        "per weight removed, measured on training images (the calibration images, or before "
        "each cut when fine-tuning; by BatchNorm gamma without a train split in --data) "
        "(network slimming); layers become physically smaller, so the file needs no masks "
        "and every runtime gets faster. weight: remove the smallest weights anywhere (global "
        "magnitude), stored as a bitmap/CSR mask or, where smaller, as the code that decodes "
        "to 0.0; keeps more accuracy at the same fraction but saves less and runs no faster. "
        "A byte budget (--target-ratio/--target-size) may prune any layer further, in either "
        "mode.",
        click.Choice(PRUNE_MODES),
    ),
    "symmetric": Flag(
        "Uniform only: ranges symmetric around zero, or from min to max.", off="--asymmetric"
    ),
    "per_channel": Flag(
        "Uniform only: one scale and zero point per output channel, or one per layer.",
        off="--per-tensor",
    ),
    "huffman": Flag(
        "Huffman-code each layer's index stream where that makes it smaller (decided per "
        "tensor, so the file is never larger); --no-huffman keeps every stream fixed-width."
    ),
    "target_ratio": Flag(
        "Choose each layer's bits (2, 3, 4, 5, 6 or 8) and sparsity (0, 25, 50 or 75% of its "
        "smallest weights) so that the file is at least R times smaller than the FP32 model, in "
        "real file bytes, losing the least: each layer's sensitivity is measured on "
        "--calib-images images of --data's train split (Fisher information times quantization "
        "error), then a knapsack picks. Uniform step-size codes (one step per layer on the "
        "weights before BatchNorm folding, half a bit apart) give fine steps between whole "
        "bits. The knapsack runs with and without the pruned and the step-size candidates and "
        "keeps the choice whose logits on those images are nearest the float model's. --bits "
        "rules other than the defaults pin the layers they select. Fails, naming the smallest "
        "reachable size, when the budget cannot be met. Needs --data; 0: off.",
        click.FloatRange(min=0),
        metavar="R",
    ),
    "target_size": Flag(
        "As --target-ratio, for a file of at most this many bytes.",
        click.IntRange(min=0),
        metavar="BYTES",
    ),
    "mean": Flag("Input normalisation mean per RGB channel (0-1 scale).", TripleType()),
    "std": Flag("Input normalisation std per RGB channel (0-1 scale).", TripleType()),
    "act_bits": Flag(
        "Quantize activations [default: none, every activation float32]. A number sets every "
        "relu/relu6 output, residual add output and block-ending projection output; rules "
        f"pick per group: {', '.join(ACT_GROUPS)}, or a node-name glob, e.g. '8,relu=4' or "
        "'relu=4,add=8'. Once any activation is quantized, the network input (input) and every "
        "other value a conv/linear layer reads (operand: the pooled features) take 8 bits "
        "unless a rule names them, so that every layer accumulates exactly and the runtimes "
        "agree bit for bit (SPEC.md 7.3). Other activations no rule selects stay float32. "
        "1-8 bits, 32 keeps float. Needs --data with a train split.",
        RulesType(activation_bits),
        metavar="BITS",
    ),
    "calib": Flag(
        "How --act-bits ranges are calibrated: min-max covers every value seen; percentile "
        "clips to the --calib-percentile; mse picks the clipping range with the least "
        "quantization error. mse is the default because it worked best on the CIFAR-10 "
        "fragment: as good as the others at 8 bits, and at 4 bits 0.7 points below float "
        "activations where percentile lost 5 and min-max 8 (examples/bench_actquant.py).",
        click.Choice(CALIB_METHODS),
    ),
    "calib_images": Flag(
        "Training images (the first N of --data's train split) to calibrate activations on, "
        "and to measure the layers' sensitivities on for --target-ratio/--target-size.",
        click.IntRange(min=1),
    ),
    "calib_percentile": Flag(
        "--calib percentile: clip activations to this percentile (and 100 minus it below).",
        click.FloatRange(50.0, 100.0, min_open=True),
        aliases=("--percentile",),
    ),
    "finetune_epochs": Flag(
        "Fine-tune on --data's train split for this many epochs in all (fractions such as "
        "0.5 allowed), shared by one run after each compression step (run k of n gets "
        "k/(1+...+n) of it, the quantized model's run the most): channel "
        "pruning in --prune-steps rounds (network slimming, BatchNorm statistics re-estimated "
        "after each cut), weight pruning gradually (cubic schedule), then the quantized model "
        "(k-means QAT: centroids and which centroid each weight takes; uniform QAT with "
        "learned scales; quantized activations in place), which the last run trains. Each run "
        "keeps its best state on the held-out split, the state it started from when no epoch "
        "beats it. 0 packs post-training only.",
        click.FloatRange(min=0),
    ),
    "finetune_steps": Flag(
        "Fine-tune for this many optimizer steps (batches of 64) in all instead of "
        "--finetune-epochs, shared the same way.",
        click.IntRange(min=0),
    ),
    "finetune_lr": Flag(
        "Peak learning rate of each pruning run of fine-tuning (SGD, cosine decay to 0) "
        "[default: 0.04 for channel pruning, 0.01 for weight pruning, each chosen on the "
        "held-out split: slimming recovers more at 0.04, gradual weight pruning on the folded "
        "network falls apart there].",
        click.FloatRange(min=0, min_open=True),
    ),
    "quantized_lr": Flag(
        "Peak learning rate of the fine-tuning run that trains the quantized model (SGD, "
        "cosine decay to 0): it starts close to the float model, and steps as large as a "
        "pruning run's throw 2-bit codes off it.",
        click.FloatRange(min=0, min_open=True),
    ),
    "distill_weight": Flag(
        "Fine-tuning distils from the float model before compression (the teacher, in eval "
        "mode): the loss is (1 - W) x cross-entropy on the labels + W x KL divergence to the "
        "teacher's softened logits. 0 trains on the labels alone. With W > 0, an .npz with "
        "x_train but no y_train may be fine-tuned on (the teacher labels it).",
        click.FloatRange(0, 1),
    ),
    "temperature": Flag(
        "Softening of the student's and teacher's logits in the distillation loss.",
        click.FloatRange(min=0, min_open=True),
    ),
    "l1": Flag(
        "L1 penalty on BatchNorm gammas while fine-tuning channel pruning (network slimming "
        "used 1e-4).",
        click.FloatRange(min=0),
    ),
    "prune_steps": Flag(
        "Channel pruning with fine-tuning: rounds that each prune a further --prune/N of the "
        "weights, then fine-tune.",
        click.IntRange(min=1),
    ),
    "val_fraction": Flag(
        "Share of the train split held out to pick the best fine-tuning epoch (the test split "
        "only reports).",
        click.FloatRange(0, 1, min_open=True, max_open=True),
    ),
    "seed": Flag(
        "Seed of the held-out split, shuffling and augmentation of fine-tuning; the same seed "
        "packs the same file twice on the CPU.",
        int,
    ),
}
# PackConfig fields with no flag: set from Python (mbz.pack) only.
INTERNAL_FIELDS = ("default_bits", "kmeans_iters", "version")


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
    "--arch",
    type=click.Choice(list(ARCHS)),
    default=None,
    help="The network of a MobileNet-v2 state_dict, which its weights do not tell (the "
    f"strides): {arch_choices()}. The width multiplier and class count are read from the "
    "weights; all three are recorded in the .mbz file (metadata source.arch). Not needed for "
    "mbz train's checkpoints (which record it), TorchScript or whole pickled modules.",
)
@click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow MODEL to be a whole pickled nn.Module. Unpickling runs code from the file: "
    "use only for files you trust.",
)
@field_options(PackConfig, _PACK_FLAGS, INTERNAL_FIELDS)
@data_options(required=False)
@click.option(
    "--limit-train",
    type=click.IntRange(min=1),
    default=None,
    help="Fine-tune on only the first N images of --data's train split.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def pack_command(
    model: Path,
    output: Path | None,
    arch: str | None,
    trust_pickle: bool,
    data_source: str | None,
    data_root: str | None,
    limit: int | None,
    limit_train: int | None,
    as_json: bool,
    **options: Any,
) -> None:
    """Prune and quantize MODEL (a .pt checkpoint) into a .mbz file.

    With --data, the model before compression and the packed model (exactly what the file
    encodes) are evaluated in PyTorch; the packed model's accuracy is stored in the file, for
    `mbz eval` to check against, and a model before compression at chance is reported. With
    --act-bits, the activations are calibrated on --data's train split (never its test split)
    after the weights are quantized, so the stored accuracy is the fully quantized model's.

    \b
    Examples:
      mbz pack model.pt --prune 0.36 --bits conv=4,fc=2 -o model.mbz
      mbz pack model.pt --bits conv=8,fc=8 --act-bits 8 --data cifar10 -o w8a8.mbz
      mbz pack model.pt --prune 0.36 --data cifar10 --finetune-epochs 2 -o tuned.mbz
      mbz pack model.pt --target-ratio 30 --prune auto --data cifar10 --finetune-epochs 3
      mbz pack tv_state_dict.pt --arch torchvision --data cifar10
    """
    try:
        job = prepare_pack(
            model,
            output,
            data=data_source,
            data_root=data_root,
            limit=limit,
            limit_train=limit_train,
            arch=arch,
            trust_pickle=trust_pickle,
            **({} if as_json else finetune_progress()),
            **options,
        )
    except SelectorError as error:
        raise click.BadParameter(str(error), param_hint=f"'{error.option}'") from None
    except ValueError as error:
        raise click.UsageError(str(error)) from None
    if options.get("prune") == PRUNE_AUTO and not as_json:
        click.echo(
            f"--prune auto: removing {job.config.prune:.0%} of the conv and linear weights, "
            f"so the rest get about {AUTO_PRUNE_BITS:g} bits each",
            err=True,
        )
    with progress_bar(job.images, "packing", enabled=job.images > 0 and not as_json) as update:
        result = job.run(update)
    if as_json:  # float_accuracy.at_chance says what the warning would
        click.echo(json.dumps(result.to_dict(), indent=2, sort_keys=True))
        return
    warning = chance_warning(result)
    if warning:
        click.echo(warning, err=True)
    _echo_summary(result, job.config)


MAX_QUIET_DROP = 2.0  # points of top-1 lost before mbz pack suggests what helps


def accuracy_line(result: PackResult) -> str:
    """``top-1 52.90% (float 57.80%, -4.90 pt) on N images of DATA (torch fake-quant)``, or
    what to pass to measure it."""
    if not result.accuracy:
        return (
            "accuracy not measured: add --data (cifar10, an .npz or a cifar-10-batches-py "
            "folder) to measure the packed and the float model on the same images"
        )
    acc, line = result.accuracy, f"top-1 {100 * result.accuracy['top1']:.2f}%"
    if result.float_accuracy and result.drop_points is not None:
        line += f" (float {100 * result.float_accuracy['top1']:.2f}%, {result.drop_points:+.2f} pt)"
    return f"{line} on {acc['images']} images of {acc['data']} (torch fake-quant)"


def drop_advice(result: PackResult, config: PackConfig) -> str | None:
    """What helps when the packed model lost more than MAX_QUIET_DROP points (what
    ``config`` did not do already); else None."""
    drop = result.drop_points
    if drop is None or drop >= -MAX_QUIET_DROP:
        return None
    if config.finetuning:
        remedies = ["fine-tune longer (--finetune-epochs)"]
    else:
        remedies = ["fine-tune it (--finetune-epochs 3)"]
    if config.budgeted:
        remedies.append("allow a larger file (--target-ratio/--target-size)")
    else:
        remedies += [
            "give the most sensitive layers more bits (e.g. --bits conv=4,fc=8,first=8)",
            "let mbz choose the bits per layer for a size (--target-ratio R)",
        ]
    ways = f"{', '.join(remedies[:-1])}, or {remedies[-1]}"
    return f"the packed model lost {-drop:.1f} points: {ways}"


def _echo_summary(result: PackResult, config: PackConfig) -> None:
    """The human-readable summary of ``mbz pack``."""
    click.echo(
        f"wrote {result.path}: {result.file_bytes:,} bytes, "
        f"{result.ratio:.2f}x smaller than FP32 ({result.fp32_bytes:,} bytes)"
    )
    click.echo(accuracy_line(result))
    advice = drop_advice(result, config)
    if advice:
        click.echo(advice, err=True)
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
