"""``model.pt`` -> ``.mbz``: capture, prune, fold BatchNorm, quantize, evaluate, write."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mbz import __version__
from mbz.capture import capture
from mbz.checkpoint import LoadedModel
from mbz.config import LayerInfo, PackConfig, bits_for
from mbz.data import Dataset
from mbz.evaluate import Progress, data_fingerprint, evaluate_torch
from mbz.fold import fold_batchnorm
from mbz.format import DenseTensor, write_mbz
from mbz.graph_ops import is_depthwise, is_pointwise, weight_nodes
from mbz.prune import magnitude_masks, prune_channels
from mbz.quantize import Tensor, quantize_weight


@dataclass
class PackResult:
    """What ``mbz pack`` made."""

    path: Path
    file_bytes: int
    fp32_bytes: int
    accuracy: dict | None
    seconds: float

    @property
    def ratio(self) -> float:
        """FP32 model bytes / .mbz file bytes."""
        return self.fp32_bytes / self.file_bytes

    def to_dict(self) -> dict:
        """JSON-ready summary."""
        return {
            "path": str(self.path),
            "file_bytes": self.file_bytes,
            "fp32_bytes": self.fp32_bytes,
            "ratio": self.ratio,
            "accuracy": self.accuracy,
            "seconds": self.seconds,
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
) -> tuple[dict[str, Tensor], dict[str, dict]]:
    """Encode every parameter; returns the tensors and per-layer facts for ``mbz inspect``."""
    tensors: dict[str, Tensor] = {}
    layers: dict[str, dict] = {}
    for node in weight_nodes(graph):
        name = node["params"]["weight"]
        bits = bits_for(config.bits, layer_info(graph, node, params), config.default_bits)
        mask = masks.get(name)
        tensors[name] = quantize_weight(
            params[name],
            bits,
            config.method,
            symmetric=config.symmetric,
            per_channel=config.per_channel,
            mask=mask,
            huffman=config.huffman,
            kmeans_iters=config.kmeans_iters,
        )
        method = "float" if bits in (16, 32) else config.method
        sparsity = 0.0 if mask is None else float(1.0 - mask.mean())
        layers[node["name"]] = {
            "weight": name,
            "bits": bits,
            "method": method,
            "sparsity": sparsity,
        }
    for name, value in params.items():
        tensors.setdefault(name, DenseTensor(values=value.astype(np.float32)))
    return tensors, layers


def _shapes(graph: dict, params: dict[str, np.ndarray]) -> dict[str, list[int]]:
    return {n["name"]: list(params[n["params"]["weight"]].shape) for n in weight_nodes(graph)}


def compress(loaded: LoadedModel, config: PackConfig) -> tuple[dict, dict[str, Tensor], dict]:
    """Capture and compress a model: returns (graph, tensors, per-layer facts)."""
    captured = capture(loaded.module)
    graph, params, gamma = captured.graph, captured.params, captured.bn_gamma
    before = _shapes(graph, params)
    if config.prune_mode == "channel":
        prune_channels(graph, params, gamma, config.prune)
    fold_batchnorm(graph, params)
    masks = {}
    if config.prune_mode == "weight" and config.prune > 0:
        masks = magnitude_masks(graph, params, config.prune)
    tensors, layers = quantize_graph(graph, params, config, masks)
    after = _shapes(graph, params)
    for name, facts in layers.items():
        facts.update(shape_before=before[name], shape_after=after[name])
    return graph, tensors, layers


def build_metadata(
    loaded: LoadedModel, config: PackConfig, graph: dict, layers: dict, accuracy: dict | None
) -> dict:
    """The metadata object of the .mbz file (SPEC.md section 2)."""
    return {
        "mbz": {"tool_version": __version__},
        "source": {"sha256": loaded.source_sha256, "fp32_bytes": loaded.fp32_bytes},
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
    """Torch fake-quant accuracy of exactly the encoded tensors, with the data's identity."""
    params = {name: tensor.decode() for name, tensor in tensors.items()}
    result = evaluate_torch(graph, params, preprocess, dataset, progress=progress)
    return {
        "top1": result.accuracy,
        "images": int(dataset.labels.size),
        "data": dataset.source,
        "data_sha256": data_fingerprint(dataset),
        "runtime": "torch",
    }


def pack(
    loaded: LoadedModel,
    config: PackConfig,
    output: Path,
    dataset: Dataset | None = None,
    progress: Progress = None,
) -> PackResult:
    """Compress ``loaded`` with ``config``, write ``output``, evaluate on ``dataset`` if given."""
    start = time.perf_counter()
    graph, tensors, layers = compress(loaded, config)
    metadata = build_metadata(loaded, config, graph, layers, None)
    if dataset is not None:
        metadata["accuracy"] = measure_accuracy(
            graph, tensors, metadata["preprocess"], dataset, progress
        )
    size = write_mbz(output, metadata, tensors)
    seconds = time.perf_counter() - start
    return PackResult(output, size, loaded.fp32_bytes, metadata["accuracy"], seconds)
