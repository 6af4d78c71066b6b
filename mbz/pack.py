"""``model.pt`` -> ``.mbz``: capture, prune, fold BatchNorm, quantize weights, calibrate
activations, evaluate, write."""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from mbz import __version__, budget
from mbz.calibrate import calibrate
from mbz.capture import capture
from mbz.checkpoint import LoadedModel
from mbz.config import LayerInfo, PackConfig, bits_for
from mbz.correct import correct_quantization, restore_statistics
from mbz.data import Dataset
from mbz.encodings import METHODS
from mbz.errors import MbzError
from mbz.evaluate import Progress, data_fingerprint, evaluate_torch
from mbz.finetune import Tuning, finetune_quantized, prune_weights, slim, taylor_importance
from mbz.fold import fold_batchnorm
from mbz.format import DenseTensor, Tensor, encode_mbz, write_mbz
from mbz.format.encodings import encoding_of
from mbz.graph_ops import is_depthwise, is_pointwise, weight_nodes
from mbz.prune import magnitude_masks, prune_channels, prune_zeroed_channels
from mbz.quantize import Coding, bias_tensor, quantize_weight, smallest_layout
from mbz.runtime import Program
from mbz.runtime.exact import exact_layers


@dataclass
class PackResult:
    """What ``mbz pack`` made."""

    path: Path
    file_bytes: int
    fp32_bytes: int
    accuracy: dict | None
    seconds: float
    activation_peak_bytes: dict[str, int] | None = None  # per image: float32 vs quantized
    finetune: list[dict] | None = None  # per fine-tuning epoch: stage, loss, accuracies
    float_accuracy: dict | None = None  # the model before compression, on the same images
    prune: float = 0.0  # the share of conv and linear weights pruned (--prune, auto resolved)

    @property
    def ratio(self) -> float:
        """FP32 model bytes / .mbz file bytes."""
        return self.fp32_bytes / self.file_bytes

    @property
    def drop_points(self) -> float | None:
        """Top-1 of the packed model minus the float model's, in percentage points (None
        unless both were measured)."""
        if not self.accuracy or not self.float_accuracy:
            return None
        return 100 * (self.accuracy["top1"] - self.float_accuracy["top1"])

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        return {
            "drop_points": self.drop_points,
            "path": str(self.path),
            "file_bytes": self.file_bytes,
            "fp32_bytes": self.fp32_bytes,
            "ratio": self.ratio,
            "accuracy": self.accuracy,
            "seconds": self.seconds,
            "activation_peak_bytes": self.activation_peak_bytes,
            "finetune": self.finetune,
            "float_accuracy": self.float_accuracy,
            "prune": self.prune,
        }


def layer_info(graph: dict, node: dict, params: dict[str, np.ndarray]) -> LayerInfo:
    """Describe a conv2d/linear node for the ``--bits`` rules."""
    return LayerInfo(
        name=node["name"],
        op=node["op"],
        depthwise=is_depthwise(node, params),
        pointwise=is_pointwise(node, params),
        first=node["inputs"] == [graph["input"]],
    )


def quantize_graph(
    graph: dict,
    params: dict[str, np.ndarray],
    config: PackConfig,
    masks: dict[str, np.ndarray],
    planned: budget.Choice | None = None,
) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """Encode every parameter; returns the tensors and per-layer facts for ``mbz inspect``.
    A weight in ``planned`` (a byte budget's choice) gets the candidate planned for it."""
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict] = {}
    for node in weight_nodes(graph):
        name = node["params"]["weight"]
        bits = bits_for(config.bits, layer_info(graph, node, params), config.default_bits)
        bits = planned[name].bits if planned else bits
        mask, coding = masks.get(name), Coding.of(config, bits)
        tensors[name] = (
            planned[name].tensor if planned else quantize_weight(params[name], coding, mask)
        )
        kept = tensors[name].mask  # a budget's choice may prune more than ``masks`` do
        sparsity = 0.0 if kept is None else float(1.0 - kept.mean())
        layers[node["name"]] = {
            "weight": name,
            "bits": bits,
            "method": METHODS[encoding_of(tensors[name])],  # a budget may mix methods
            "sparsity": sparsity,
        }
    biases = {node["params"]["bias"] for node in weight_nodes(graph)}
    for name, value in params.items():
        stored = bias_tensor(value) if name in biases else DenseTensor(value.astype(np.float32))
        tensors.setdefault(name, stored)
    return tensors, layers


def stored_layouts(tensors: dict[str, Tensor], layers: dict[str, dict]) -> dict[str, Tensor]:
    """``tensors`` with each weight in the layout the file stores, the smaller of its mask and
    its zero symbol (``mbz.quantize.smallest_layout``; both decode alike); the facts of a
    pruned layer that stores its zeros as a symbol say ``zero_symbol: true``."""
    stored = dict(tensors)
    for facts in layers.values():
        name = facts["weight"]
        stored[name], mask = smallest_layout(tensors[name]), tensors[name].mask
        if stored[name] is not tensors[name] and mask is not None and not mask.all():
            facts["zero_symbol"] = True
    return stored


def _shapes(graph: dict, params: dict[str, np.ndarray]) -> dict[str, list[int]]:
    return {n["name"]: list(params[n["params"]["weight"]].shape) for n in weight_nodes(graph)}


def compress(
    loaded: LoadedModel,
    config: PackConfig,
    tuning: Tuning | None = None,
    calibration: Dataset | None = None,
    progress: Progress = None,
) -> tuple[dict, dict[str, np.ndarray], dict[str, Tensor], dict]:
    """Capture and compress a model: returns (graph, float params as pruned and folded,
    tensors, per-layer facts). With ``tuning``, pruning is fine-tuned (``mbz.finetune``).
    With a byte budget, the bits per layer are chosen on ``calibration`` (``mbz.budget``)."""
    slimmed = tuning is not None and config.prune_mode == "channel" and config.prune > 0
    captured = capture(slim(loaded.module, tuning) if tuning and slimmed else loaded.module)
    graph, params, gamma = captured.graph, captured.params, captured.bn_gamma
    before = _shapes(graph, params)
    if slimmed:
        prune_zeroed_channels(graph, params, gamma)
    elif config.prune_mode == "channel" and config.prune > 0:
        reference = (copy.deepcopy(graph), dict(params))
        preprocess = {"mean": list(config.mean), "std": list(config.std)}
        importance = _importance(loaded, calibration, preprocess)
        kept = prune_channels(graph, params, gamma, config.prune, importance)
        if config.bias_correction and calibration is not None:
            restore_statistics(reference, (graph, params), kept, preprocess, calibration.images)
    gains = fold_batchnorm(graph, params)
    masks = {}
    if config.prune_mode == "weight" and config.prune > 0 and tuning is not None:
        masks = prune_weights(graph, params, tuning)
    elif config.prune_mode == "weight" and config.prune > 0:
        masks = magnitude_masks(graph, params, config.prune)
    encode = _Encode(graph, params, config, masks, before, gains)
    planned = _planned(loaded, encode, calibration, progress) if config.budgeted else None
    tensors, layers = encode(planned)
    return graph, params, tensors, layers


@dataclass
class _Encode:
    """A pruned, folded graph's weights to encode: ``encode(planned)`` -> tensors, facts."""

    graph: dict
    params: dict[str, np.ndarray]
    config: PackConfig
    masks: dict[str, np.ndarray]
    before: dict[str, list[int]]  # each layer's weight shape before pruning
    gains: dict[str, np.ndarray]  # each folded weight's BatchNorm gain per output channel

    def __call__(self, planned: budget.Choice | None) -> tuple[dict[str, Tensor], dict]:
        tensors, layers = quantize_graph(self.graph, self.params, self.config, self.masks, planned)
        after = _shapes(self.graph, self.params)
        for name, facts in layers.items():
            facts.update(shape_before=self.before[name], shape_after=after[name])
        return tensors, layers


FINETUNE_SLACK = 0.03  # share of a byte budget kept free for the entropy of fine-tuned codes


def _importance(
    loaded: LoadedModel, calibration: Dataset | None, preprocess: dict
) -> dict[str, np.ndarray] | None:
    """Channel importance for post-training channel pruning: ``taylor_importance`` on the
    labelled ``calibration`` images; None (rank by BatchNorm gamma) without them or for a
    TorchScript model, whose BatchNorm modules are not exposed."""
    module = loaded.module
    if calibration is None or not len(calibration) or isinstance(module, torch.jit.ScriptModule):
        return None
    device = next(module.parameters()).device
    return taylor_importance(module, calibration, preprocess, device)


def _planned(
    loaded: LoadedModel, encode: _Encode, calibration: Dataset | None, progress: Progress
) -> budget.Choice:
    """The encodings that fit the byte budget of ``encode.config`` (``mbz.budget.choose``),
    each choice measured as the file it makes."""
    if calibration is None or not len(calibration):
        raise MbzError("a byte budget needs calibration images: pass --data with a train split")
    graph, params, config = encode.graph, encode.params, encode.config

    def size_of(choice: budget.Choice) -> int:
        tensors, layers = encode(choice)
        tensors = stored_layouts(tensors, layers)
        return len(encode_mbz(build_metadata(loaded, config, graph, layers, None), tensors))

    layers = {n["params"]["weight"]: layer_info(graph, n, params) for n in weight_nodes(graph)}
    target = budget.target_bytes(config, loaded.fp32_bytes) or 0
    slack = FINETUNE_SLACK if config.finetuning else 0.0  # fine-tuned codes entropy-code anew
    try:
        return budget.choose(
            graph,
            params,
            layers,
            config,
            encode.masks,
            calibration,
            math.floor(target * (1 - slack)),
            size_of,
            encode.gains,
            progress,
        )
    except budget.BudgetError as error:
        raise budget.BudgetError(math.ceil(error.smallest / (1 - slack))) from None


def build_metadata(
    loaded: LoadedModel, config: PackConfig, graph: dict, layers: dict, accuracy: dict | None
) -> dict:
    """The metadata object of the .mbz file (SPEC.md section 2)."""
    source = {"sha256": loaded.source_sha256, "fp32_bytes": loaded.fp32_bytes}
    if loaded.arch is not None:
        source["arch"] = loaded.arch.to_dict()
    return {
        "mbz": {"tool_version": __version__},
        "source": source,
        "pack_config": config.to_dict(),
        "preprocess": {
            "layout": "NHWC",
            "dtype": "uint8",
            "mean": list(config.mean),
            "std": list(config.std),
        },
        "graph": graph,
        "layers": layers,
        "accuracy": accuracy,
    }


def measure_accuracy(
    graph: dict,
    tensors: dict[str, Tensor],
    preprocess: dict,
    dataset: Dataset,
    progress: Progress = None,
) -> dict:
    """Torch fake-quant accuracy of exactly the encoded tensors, exact layers computed as every
    runtime computes them (SPEC.md 7.3), with the data's identity."""
    params = {name: tensor.decode() for name, tensor in tensors.items()}
    plan = exact_layers(graph, tensors)
    result = evaluate_torch(graph, params, preprocess, dataset, progress=progress, exact=plan)
    return {
        "top1": result.accuracy,
        "images": int(dataset.labels.size),
        "data": dataset.source,
        "data_sha256": data_fingerprint(dataset),
        "runtime": "torch",
    }


def activation_peaks(
    float_graph: dict,
    graph: dict,
    params: dict[str, np.ndarray],
    preprocess: dict,
    image: np.ndarray,
) -> dict[str, int]:
    """Peak bytes of live activations for one uint8 ``image`` [1, H, W, C], as the numpy
    runtime measures them while it runs ``float_graph`` and the activation-quantized ``graph``."""
    peaks = {}
    for key, each in (("float32", float_graph), ("quantized", graph)):
        program = Program(each, params, preprocess)
        program.predict(image, batch_size=1)
        peaks[key] = program.last_peak_bytes_per_image
    return peaks


def quantize_activations(
    graph: dict,
    tensors: dict[str, Tensor],
    preprocess: dict,
    config: PackConfig,
    calibration: Dataset | None,
    progress: Progress = None,
) -> dict[str, int]:
    """Insert and calibrate the quantize nodes ``config.act_bits`` asks for (``graph`` changes
    in place); returns the activation peak bytes per image, float32 vs quantized."""
    if calibration is None or not len(calibration):
        raise MbzError(
            "quantized activations need calibration images: pass --data with a train split"
        )
    params = {name: tensor.decode() for name, tensor in tensors.items()}
    float_graph = copy.deepcopy(graph)
    calibrate(graph, params, preprocess, calibration, config, progress)
    return activation_peaks(float_graph, graph, params, preprocess, calibration.images[:1])


def pack(
    loaded: LoadedModel,
    config: PackConfig,
    output: Path,
    dataset: Dataset | None = None,
    progress: Progress = None,
    calibration: Dataset | None = None,
    tuning: Tuning | None = None,
    float_accuracy: dict | None = None,
) -> PackResult:
    """Compress ``loaded`` with ``config``, write ``output``, evaluate on ``dataset`` if given.
    ``float_accuracy``, the model before compression measured on ``dataset``, is stored too.

    With ``config.bias_correction`` and ``calibration``, each output channel's mean and spread
    are restored after the weights are quantized (``mbz.correct``).
    With ``config.act_bits``, activations are calibrated on ``calibration`` (training images)
    after the weights are quantized, so the accuracy measured is the fully quantized model's.
    With ``config.finetune_epochs`` (or ``finetune_steps``), ``tuning`` (``Tuning.of(train
    split, config)``) fine-tunes the pruning and then the quantized model, activation
    quantization included, distilling from ``loaded`` (``config.distill_weight``).
    """
    start = time.perf_counter()
    tuning = _checked_tuning(config, tuning)
    if tuning is not None:
        tuning = tuning.taught_by(loaded.module)
    graph, params, tensors, layers = compress(loaded, config, tuning, calibration, progress)
    metadata = build_metadata(loaded, config, graph, layers, None)
    if config.bias_correction and calibration is not None:
        correct_quantization(
            graph, params, tensors, metadata["preprocess"], calibration.images, progress
        )
    peaks = None
    if config.act_bits:
        peaks = quantize_activations(
            graph, tensors, metadata["preprocess"], config, calibration, progress
        )
    if tuning is not None:
        tensors = finetune_quantized(graph, params, tensors, tuning)
    tensors = stored_layouts(tensors, metadata["layers"])
    if dataset is not None:
        metadata["accuracy"] = measure_accuracy(
            graph, tensors, metadata["preprocess"], dataset, progress
        )
    if float_accuracy is not None and metadata["accuracy"] is not None:
        metadata["float_accuracy"] = {
            "top1": float_accuracy["top1"],
            "data_sha256": metadata["accuracy"]["data_sha256"],
        }
    size = write_mbz(output, metadata, tensors)
    budget.check_written(output, size, config, loaded.fp32_bytes)
    seconds = time.perf_counter() - start
    history = tuning.history if tuning is not None else None
    return PackResult(
        output,
        size,
        loaded.fp32_bytes,
        metadata["accuracy"],
        seconds,
        peaks,
        history,
        float_accuracy,
        config.prune,
    )


def _checked_tuning(config: PackConfig, tuning: Tuning | None) -> Tuning | None:
    """``tuning`` when ``config`` asks for fine-tuning (MbzError if it is missing), else None."""
    if not config.finetuning:
        return None
    if tuning is None:
        raise MbzError(
            "fine-tuning (--finetune-epochs) needs training images: pass --data with a train split"
        )
    if tuning.config != config:
        raise ValueError("tuning was prepared for another pack config: use Tuning.of(..., config)")
    return tuning
