"""mbz's Python API, which ``mbz pack`` calls too: ``pack`` a model into a .mbz file, ``load``
one back as a numpy program.

    import mbz
    result = mbz.pack(model, "model.mbz", bits="conv=4,fc=2", prune=0.36, data="cifar10")
    logits = mbz.load(result.path).predict(images_uint8_nhwc)
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from torch import nn

from mbz import budget
from mbz.budget import PROBE_IMAGES
from mbz.calibrate import activation_points, load_calibration
from mbz.capture import capture
from mbz.checkpoint import LoadedModel, load_model
from mbz.config import (
    ACT_GROUPS,
    GROUPS,
    PRUNE_AUTO,
    PackConfig,
    check_selectors,
    config_from_options,
)
from mbz.data import Dataset, check_image_shape, load_split
from mbz.errors import MbzError
from mbz.evaluate import Progress, evaluate_torch
from mbz.finetune import Tuning, load_training
from mbz.fold import fold_batchnorm
from mbz.graph_ops import weight_nodes
from mbz.pack import PackResult
from mbz.pack import pack as pack_model
from mbz.runtime import Program, load_program
from mbz.training import StepReport

_CHANCE_SIGMAS = 2  # a float accuracy within this many binomial sigmas of 1/classes is chance


@dataclass
class _Probe:
    """The model captured once up front: its float graph (BatchNorm folded) and parameters."""

    graph: dict
    params: dict

    @classmethod
    def of(cls, module: nn.Module) -> _Probe:
        captured = capture(module)
        graph, params = copy.deepcopy(captured.graph), dict(captured.params)
        fold_batchnorm(graph, params)
        return cls(graph, params)

    def weights(self) -> int:
        """How many conv and linear weights the model has."""
        return sum(self.params[n["params"]["weight"]].size for n in weight_nodes(self.graph))

    def check(self, config: PackConfig) -> None:
        """SelectorError for a ``--bits``/``--act-bits`` selector matching nothing here."""
        layers = [node["name"] for node in weight_nodes(self.graph)]
        check_selectors(config.bits, GROUPS, layers, "--bits")
        points = [point.name for point in activation_points(self.graph).values()]
        check_selectors(config.act_bits, ACT_GROUPS, points, "--act-bits")


@dataclass
class PackJob:
    """Everything a pack needs, loaded and checked: ``run`` does the work."""

    loaded: LoadedModel
    config: PackConfig
    output: Path
    probe: _Probe
    dataset: Dataset | None = None  # test images: accuracies of the float and packed models
    calibration: Dataset | None = None  # train images for --act-bits
    tuning: Tuning | None = None  # train images for --finetune-epochs

    @property
    def images(self) -> int:
        """How many images ``run`` reports to its progress callback in all."""
        test = 2 * len(self.dataset) if self.dataset is not None else 0
        test += self._probe_images()
        passes = bool(self.config.act_bits) + self.config.budgeted + self.config.bias_correction
        return test + (passes * len(self.calibration) if self.calibration is not None else 0)

    def _probe_images(self) -> int:
        """Images the byte budget's per-layer probes report (``mbz.budget.probe_kl``)."""
        if not self.config.budgeted or self.calibration is None:
            return 0
        return len(weight_nodes(self.probe.graph)) * min(PROBE_IMAGES, len(self.calibration))

    def run(self, progress: Progress = None) -> PackResult:
        """Measure the float model, then compress, evaluate and write (``mbz.pack.pack``)."""
        baseline = None
        if self.dataset is not None:
            baseline = float_accuracy(self.probe, self.config, self.dataset, progress)
        return pack_model(
            self.loaded,
            self.config,
            self.output,
            self.dataset,
            progress,
            self.calibration,
            self.tuning,
            baseline,
        )


def prepare_pack(
    model: nn.Module | str | Path,
    output: str | Path | None = None,
    *,
    data: str | None = None,
    data_root: str | None = None,
    limit: int | None = None,
    limit_train: int | None = None,
    arch: str | None = None,
    trust_pickle: bool = False,
    on_stage: Callable[[str], None] | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    **options: Any,
) -> PackJob:
    """Load and check everything ``pack`` needs (see ``pack``), before any slow work.

    Raises ValueError for invalid options or combinations, SelectorError for ``bits`` or
    ``act_bits`` selectors that match nothing in the model, MbzError for unusable files.
    """
    auto = options.get("prune") == PRUNE_AUTO
    config = config_from_options(**({**options, "prune": 0.0} if auto else options))
    if auto and not config.budgeted:
        raise ValueError(
            "--prune auto sizes the pruning to a byte budget: add --target-ratio or "
            "--target-size, or give a fraction (--prune 0.36)"
        )
    _check_data_needs(config, data, limit_train)
    output = _output(model, output)
    loaded = _loaded(model, arch, trust_pickle)
    probe = _Probe.of(loaded.module)
    probe.check(config)
    if auto:
        config = _auto_pruned(config, loaded.fp32_bytes, probe)
    shape = probe.graph["input_shape"]
    job = PackJob(loaded, config, output, probe)
    if data is None:
        return job
    job.dataset = _checked(load_split(data, "test", data_root=data_root), limit, shape)
    ranks_channels = config.prune > 0 and config.prune_mode == "channel"
    if config.act_bits or config.budgeted or config.bias_correction or ranks_channels:
        job.calibration = _calibration(data, data_root, config, shape)
    if config.finetuning:
        teacher = loaded.module if config.distill_weight else None  # labels unlabelled images
        train = load_training(data, data_root, teacher, config)
        train = _checked(train, limit_train, shape)
        job.tuning = Tuning.of(train, config, None, on_stage, on_step, on_epoch)
    return job


def pack(
    model: nn.Module | str | Path,
    output: str | Path | None = None,
    *,
    progress: Callable[[int], None] | None = None,
    **options: Any,
) -> PackResult:
    """Compress ``model`` into the .mbz file ``output``, as ``mbz pack`` does.

    ``model`` is an ``nn.Module`` (captured as it is, any network mbz can capture) or the path
    of a model file (``arch`` names the network of a bare MobileNet-v2 state_dict,
    ``trust_pickle`` allows whole pickled modules). ``output`` defaults to the model file with
    the suffix .mbz, or ``<class name>.mbz`` in the current folder for a module.

    Keyword ``options`` are named like ``mbz pack``'s flags (and PackConfig's fields): ``bits``
    ("conv=4,fc=2" or a dict, overlaid on conv=4,fc=4), ``method``, ``prune`` (a fraction, or
    "auto" with a byte budget: ``mbz.budget.auto_prune``), ``prune_mode``,
    ``symmetric``, ``per_channel``, ``huffman``, ``act_bits`` ("8", "relu=4,add=8" or a dict),
    ``calib``, ``calib_images``, ``calib_percentile``, ``mean``, ``std``, ``finetune_epochs``,
    ``finetune_steps``, ``finetune_lr``, ``quantized_lr``, ``distill_weight``, ``temperature``,
    ``l1``, ``prune_steps``, ``val_fraction``, ``seed``,
    ``target_ratio``, ``target_size``.

    ``data`` (``"cifar10"``, an .npz or a cifar-10-batches-py folder; ``data_root`` for
    cifar10) works as ``--data``: the float model and
    the packed one are evaluated on the first ``limit`` test images; ``act_bits`` calibrates on
    its train split and ``finetune_epochs`` fine-tunes on it (its first ``limit_train`` images).
    ``progress`` is called with the number of images done; fine-tuning calls ``on_stage(name)``
    as each stage starts, ``on_step(report)`` after every step (``mbz.training.StepReport``)
    and ``on_epoch(stats)`` with each epoch's loss and held-out accuracy.
    Returns the PackResult: ``path``, ``file_bytes``, ``ratio``,
    ``accuracy`` (packed, stored in the file), ``float_accuracy``.
    """
    return prepare_pack(model, output, **options).run(progress)


def load(path: str | Path) -> Program:
    """The numpy program of a .mbz file: ``load(path).predict(uint8 NHWC images)`` -> logits."""
    return load_program(path)


def float_accuracy(
    probe: _Probe, config: PackConfig, dataset: Dataset, progress: Progress = None
) -> dict:
    """Top-1 of the model before compression on ``dataset``, and whether it is at chance (no
    better than 1/classes by more than the sampling noise of that many images)."""
    preprocess = {"layout": "NHWC", "dtype": "uint8", "mean": config.mean, "std": config.std}
    top1 = evaluate_torch(probe.graph, probe.params, preprocess, dataset, progress=progress)
    chance = 1.0 / len(dataset.classes)
    noise = _CHANCE_SIGMAS * math.sqrt(chance * (1.0 - chance) / len(dataset))
    return {
        "top1": top1.accuracy,
        "images": len(dataset),
        "data": dataset.source,
        "chance": chance,
        "at_chance": top1.accuracy <= chance + noise,
    }


def float_model_accuracy(module: nn.Module, config: PackConfig, dataset: Dataset) -> dict:
    """Top-1 of ``module`` before compression (BatchNorm folded, as packing captures it) on
    ``dataset``, with ``config``'s normalisation; see ``float_accuracy``."""
    return float_accuracy(_Probe.of(module), config, dataset)


def chance_warning(result: PackResult) -> str | None:
    """What to tell the user when the float model is at chance on the data; else None."""
    measured = result.float_accuracy
    if not measured or not measured["at_chance"]:
        return None
    return (
        f"warning: the model before compression scores {100 * measured['top1']:.2f}% on "
        f"{measured['images']} images of {measured['data']}, no better than chance "
        f"({100 * measured['chance']:.0f}%): is it trained, is --arch its network (strides), "
        "and are --mean/--std its input normalisation?"
    )


def _calibration(
    data: str, data_root: str | None, config: PackConfig, shape: list[int]
) -> Dataset | None:
    """The calibration images of ``data``'s train split; None when only the bias correction or
    the channel ranking would read them and ``data`` has no train split (the correction is
    then skipped, channels ranked by BatchNorm gamma)."""
    try:
        calibration = load_calibration(data, data_root, config.calib_images)
    except MbzError:
        if config.act_bits or config.budgeted:
            raise
        return None
    return _checked(calibration, None, shape)


def _auto_pruned(config: PackConfig, fp32_bytes: int, probe: _Probe) -> PackConfig:
    """``config`` pruning the share ``--prune auto`` gives its byte budget."""
    target = budget.target_bytes(config, fp32_bytes) or 0
    return replace(config, prune=budget.auto_prune(target, probe.weights()))


def _check_data_needs(config: PackConfig, data: str | None, limit_train: int | None) -> None:
    """ValueError for options that need --data (or fine-tuning) without it."""
    if config.act_bits and data is None:
        raise ValueError("--act-bits needs --data with a train split to calibrate on")
    if config.budgeted and data is None:
        raise ValueError(
            "--target-ratio/--target-size need --data: the bits per layer are chosen by "
            "their effect on the loss over its train split"
        )
    if config.finetuning and data is None:
        raise ValueError("--finetune-epochs needs --data with a train split to train on")
    if limit_train is not None and not config.finetuning:
        raise ValueError("--limit-train limits the images of fine-tuning: add --finetune-epochs")


def _loaded(model: nn.Module | str | Path, arch: str | None, trust_pickle: bool) -> LoadedModel:
    """The model to compress, from a module in memory or a file."""
    if isinstance(model, nn.Module):
        if arch is not None:
            raise ValueError("arch names the network of a state_dict file; a module needs none")
        return LoadedModel.of(model)
    return load_model(model, trust_pickle=trust_pickle, arch=arch)


def _output(model: nn.Module | str | Path, output: str | Path | None) -> Path:
    """Where to write: ``output``, else next to the model file, in a folder that exists."""
    if isinstance(model, nn.Module):
        default = Path(f"{type(model).__name__.lower()}.mbz")
    else:
        default = Path(model).with_suffix(".mbz")
    output = default if output is None else Path(output)
    if not output.parent.is_dir():
        raise MbzError(f"cannot write {output}: the directory {output.parent} does not exist")
    return output


def _checked(dataset: Dataset, limit: int | None, input_shape: list[int]) -> Dataset:
    """``dataset`` cut to ``limit`` images, checked to have the model's input size."""
    dataset = dataset if limit is None else dataset.head(limit)
    check_image_shape(dataset, input_shape, "the model")
    return dataset
