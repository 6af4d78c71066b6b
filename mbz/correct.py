"""Post-training correction of what quantizing the weights shifted (Nagel et al. 2019).

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

from mbz.format import DenseTensor, ScaledCodebookTensor, Tensor, UniformTensor
from mbz.graph_ops import weight_nodes
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


def _rescale(tensor: ScaledCodebookTensor | UniformTensor, factor: np.ndarray) -> np.ndarray:
    """Multiply each output channel's stored scale by ``factor``, rounded to the stored
    precision; returns the factor that was applied."""
    old = tensor.scale.astype(np.float64)
    tensor.scale = (old * factor).astype(tensor.scale.dtype)
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
    if isinstance(weight, ScaledCodebookTensor | UniformTensor) and weight.axis == 0:
        ratio = std_f / np.maximum(std_q, MIN_STD)
        factor = _rescale(weight, np.where(std_q > MIN_STD, np.clip(ratio, *SCALE_LIMITS), 1.0))
    # y' = factor * (y_q - bias) + bias' must have the float mean
    corrected = mean_f - factor * (mean_q - bias)
    tensors[bias_name] = DenseTensor(values=corrected.astype(np.float32))


def _tensor(values: np.ndarray, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(values, dtype=np.float32)).to(device)


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
    x = preprocess_images(images, preprocess, device)
    corrected = {node["name"] for node in weight_nodes(graph)}
    last = _last_uses(graph)
    floats = {graph["input"]: x}
    quants = {graph["input"]: x}
    for index, node in enumerate(graph["nodes"]):
        op = OPS[node["op"]]
        p_float = {role: _tensor(params[name], device) for role, name in node["params"].items()}
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
    roles = node["params"].items()
    params = {role: _tensor(tensors[name].decode(), device) for role, name in roles}
    return op([values[v] for v in node["inputs"]], params, node["attrs"])


def _dead(inputs: Iterable[str], last: dict[str, int], index: int) -> list[str]:
    return [name for name in inputs if last.get(name) == index]


def _drop(names: list[str], *stores: dict) -> None:
    for store in stores:
        for name in names:
            store.pop(name, None)
