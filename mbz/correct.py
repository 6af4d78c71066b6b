"""Post-training correction of what quantizing the weights shifted (Nagel et al. 2019).

The networks run in float64 here (the file's values are float32 and float16).
Quantization error is not zero-mean per output channel: a channel's outputs drift in mean and,
with coarse codes, shrink or grow in spread, and the drift compounds through the network.
Layer by layer in execution order, on calibration images, the float network and the quantized
one (with every earlier layer already corrected) are run side by side; each output channel's
mean is restored through its bias and, where the encoding stores a per-channel scale (scaled
codebooks, per-channel uniform codes), its spread through that scale. The corrected values are
stored in the file, so every runtime computes the corrected network.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import numpy as np
import torch

from mbz.format import Tensor, UniformTensor
from mbz.format.tensors import ChannelCodebookTensor
from mbz.graph_ops import weight_nodes
from mbz.quantize import bias_tensor, half_scales
from mbz.torch_graph import OPS, preprocess_images

SCALE_LIMITS = (0.5, 2.0)  # a spread correction outside this range is not trusted
MIN_STD = 1e-6


def _last_uses(graph: dict) -> dict[str, int]:
    """Value name -> index of the last node that reads it (so it can be dropped after)."""
    last = {}
    for index, node in enumerate(graph["nodes"]):
        for name in node["inputs"]:
            last[name] = index
    return last


def _channel_stats(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean and standard deviation per channel (axis 1) over every other axis, in float64."""
    flat = y.transpose(0, 1).reshape(y.shape[1], -1).double()
    return flat.mean(1), flat.std(1, unbiased=False)


def _rescale(tensor: ChannelCodebookTensor | UniformTensor, factor: np.ndarray) -> np.ndarray:
    """Multiply each output channel's stored scale by ``factor``, rounded to the stored
    precision (float16 for a lean uniform tensor's, where they fit); returns the factor that
    was applied."""
    old = tensor.scale.astype(np.float64)
    tensor.scale = (old * factor).astype(tensor.scale.dtype)
    if isinstance(tensor, UniformTensor) and tensor.lean:
        tensor.scale = half_scales(tensor.scale)
    return tensor.scale.astype(np.float64) / old


def _correct_node(
    node: dict, tensors: dict[str, Tensor], y_float: torch.Tensor, y_quant: torch.Tensor
) -> None:
    """Correct the weight scale (spread) and bias (mean) of one conv/linear node in place."""
    weight, bias_name = tensors[node["params"]["weight"]], node["params"]["bias"]
    bias = tensors[bias_name].decode().astype(np.float64)
    mean_f, std_f = (s.cpu().numpy() for s in _channel_stats(y_float))
    mean_q, std_q = (s.cpu().numpy() for s in _channel_stats(y_quant))
    factor = np.ones_like(bias)
    if isinstance(weight, ChannelCodebookTensor | UniformTensor) and weight.axis == 0:
        ratio = std_f / np.maximum(std_q, MIN_STD)
        factor = _rescale(weight, np.where(std_q > MIN_STD, np.clip(ratio, *SCALE_LIMITS), 1.0))
    # y' = factor * (y_q - bias) + bias' must have the float mean
    corrected = mean_f - factor * (mean_q - bias)
    tensors[bias_name] = bias_tensor(corrected)


def _restore_batchnorm(
    node: dict, params: dict[str, np.ndarray], x: torch.Tensor, target: torch.Tensor
) -> None:
    """Set a (pruned network's) batchnorm's scale and shift so that its output on ``x`` has,
    per channel, the mean and spread of ``target`` (the unpruned network's output there)."""
    scale_name, shift_name = node["params"]["scale"], node["params"]["shift"]
    mean_x, std_x = (s.cpu().numpy() for s in _channel_stats(x))
    mean_t, std_t = (s.cpu().numpy() for s in _channel_stats(target))
    old = params[scale_name].astype(np.float64)
    usable = std_x > MIN_STD
    scale = np.where(usable, np.sign(old) * std_t / np.where(usable, std_x, 1.0), old)
    shift = np.where(usable, mean_t - scale * mean_x, params[shift_name])
    params[scale_name], params[shift_name] = scale.astype(np.float32), shift.astype(np.float32)


@torch.no_grad()
def restore_statistics(
    reference: tuple[dict, dict[str, np.ndarray]],
    pruned: tuple[dict, dict[str, np.ndarray]],
    kept: dict[str, np.ndarray],
    preprocess: dict,
    images: np.ndarray,
) -> None:
    """After channel pruning (before BatchNorm folding): re-estimate every batchnorm of the
    ``pruned`` graph in place so that each kept channel's output has the mean and spread it has
    in the unpruned ``reference`` graph (same nodes) on the uint8 ``images``. ``kept`` maps a
    batchnorm's name to the reference channels it kept (all when absent)."""
    (graph, ref_params), (pruned_graph, params) = reference, pruned
    x = preprocess_images(images, preprocess, "cpu").double()
    last = _last_uses(graph)
    refs, outs = {graph["input"]: x}, {graph["input"]: x}
    for index, (old, node) in enumerate(zip(graph["nodes"], pruned_graph["nodes"], strict=True)):
        op = OPS[node["op"]]
        reference_params = _params(old, ref_params.__getitem__, x.device)
        y_ref = op([refs[v] for v in old["inputs"]], reference_params, old["attrs"])
        inputs = [outs[v] for v in node["inputs"]]
        if node["op"] == "batchnorm":
            keep = kept.get(node["name"])
            target = y_ref if keep is None else y_ref[:, torch.from_numpy(keep)]
            _restore_batchnorm(node, params, inputs[0], target)
        refs[node["output"]] = y_ref
        pruned_params = _params(node, params.__getitem__, x.device)
        outs[node["output"]] = op(inputs, pruned_params, node["attrs"])
        _drop(_dead(node["inputs"], last, index), refs, outs)


def _params(
    node: dict, value_of: Callable[[str], np.ndarray], device: torch.device
) -> dict[str, torch.Tensor]:
    """The tensors ``node`` reads, by role, each array given by ``value_of(tensor name)``."""
    return {role: _tensor(value_of(name), device) for role, name in node["params"].items()}


def _tensor(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """float64, so that the statistics, and the bytes written, do not depend on how many
    threads (and so which summation order) the convolutions use."""
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float64)).to(device)


@torch.no_grad()
def correct_quantization(
    graph: dict,
    params: dict[str, np.ndarray],
    tensors: dict[str, Tensor],
    preprocess: dict,
    images: np.ndarray,
    progress: Callable[[int], None] | None = None,
    device: torch.device | None = None,
) -> None:
    """Correct every conv/linear of ``graph`` in place in ``tensors`` (float ``params`` are the
    weights before quantization), using the uint8 calibration ``images``; ``progress`` is told
    the number of images once done."""
    device = device or torch.device("cpu")
    x = preprocess_images(images, preprocess, device).double()
    corrected = {node["name"] for node in weight_nodes(graph)}
    last = _last_uses(graph)
    floats = {graph["input"]: x}
    quants = {graph["input"]: x}
    for index, node in enumerate(graph["nodes"]):
        op = OPS[node["op"]]
        p_float = _params(node, params.__getitem__, device)
        y_float = op([floats[v] for v in node["inputs"]], p_float, node["attrs"])
        y_quant = _run_quantized(node, op, quants, tensors, device)
        if node["name"] in corrected:
            _correct_node(node, tensors, y_float, y_quant)
            y_quant = _run_quantized(node, op, quants, tensors, device)
        floats[node["output"]], quants[node["output"]] = y_float, y_quant
        _drop(_dead(node["inputs"], last, index), floats, quants)
    if progress:
        progress(len(images))


def _run_quantized(
    node: dict, op, values: dict[str, torch.Tensor], tensors: dict[str, Tensor], device
) -> torch.Tensor:
    params = _params(node, lambda name: tensors[name].decode(), device)
    return op([values[v] for v in node["inputs"]], params, node["attrs"])


def _dead(inputs: Iterable[str], last: dict[str, int], index: int) -> list[str]:
    return [name for name in inputs if last.get(name) == index]


def _drop(names: list[str], *stores: dict) -> None:
    for store in stores:
        for name in names:
            store.pop(name, None)
