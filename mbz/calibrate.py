"""Quantized activations: ``quantize`` nodes at the activation points (SPEC.md section 7), with
per-tensor scales and zero points calibrated on training images.

Statistics come from the float network: the graph, with its quantize nodes already in place, runs
in ``GraphModule`` on calibration batches while an observer turns every fake-quantize call into
the identity and records its input, so every point sees the activations of the unquantized
network (as PyTorch's observers do).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch.overrides import TorchFunctionMode

from mbz.config import (
    ACT_FLOAT,
    ACT_OPERAND_BITS,
    ACT_OPERANDS,
    ActPoint,
    PackConfig,
    act_bits_for,
)
from mbz.data import Dataset, load_split
from mbz.errors import MbzError
from mbz.evaluate import Progress, pick_device
from mbz.graph_ops import consumers
from mbz.torch_graph import GraphModule, image_batches

CALIB_BATCH = 64  # images per calibration forward pass
SAMPLE_PER_BATCH = 1 << 14  # values kept per point and batch for the percentile and mse methods
MSE_STEPS = 100  # candidate clipping ranges searched by the mse method: 1/100 .. 100/100 of min-max
_ACTIVATIONS = frozenset({"relu", "relu6"})
_WEIGHT_OPS = frozenset({"conv2d", "linear"})


@dataclass
class RangeStats:
    """What calibration saw at one point: the exact min and max, and a random sample."""

    lo: float = math.inf
    hi: float = -math.inf
    samples: list[torch.Tensor] = field(default_factory=list)

    def add(self, x: torch.Tensor, generator: torch.Generator) -> None:
        """Take in one batch of the point's float activations."""
        flat = x.detach().reshape(-1).float()
        lo, hi = torch.aminmax(flat)
        self.lo, self.hi = min(self.lo, float(lo)), max(self.hi, float(hi))
        picks = torch.randint(
            flat.numel(), (min(SAMPLE_PER_BATCH, flat.numel()),), generator=generator
        )  # index_select: many times faster than fancy indexing on the CPU
        self.samples.append(flat.index_select(0, picks.to(flat.device)).cpu())

    def sample(self) -> torch.Tensor:
        """Every sampled value, as one float32 CPU tensor."""
        return torch.cat(self.samples)


def activation_points(graph: dict) -> dict[str, ActPoint]:
    """Value name -> activation point, in execution order (the graph input first).

    Points: the input, every relu/relu6 output, every residual add output, every conv2d
    output that no activation reads but a conv2d/linear does (the projection that ends a block
    without a residual connection), and every other value a conv2d/linear reads (``operand``:
    the pooled features before the classifier). The graph output (the logits) is never a point.
    """
    readers = consumers(graph)
    points = {graph["input"]: ActPoint(graph["input"], "input")}
    for node in graph["nodes"]:
        read_by = {reader["op"] for reader in readers[node["output"]]}
        if node["op"] in _ACTIVATIONS:
            group = "relu"
        elif node["op"] == "add":
            group = "add"
        elif node["op"] == "conv2d" and not read_by & _ACTIVATIONS and read_by & _WEIGHT_OPS:
            group = "proj"
        elif read_by & _WEIGHT_OPS:
            group = "operand"
        else:
            continue
        points[node["output"]] = ActPoint(node["name"], group)
    points.pop(graph["output"], None)
    return points


def quant_params(lo: float, hi: float, bits: int) -> tuple[float, int]:
    """Scale and zero point (SPEC.md section 7) whose codes cover ``[min(lo, 0), max(hi, 0)]``.

    The scale is exactly representable in float32, so every runtime multiplies by the same
    float32 reciprocal; a range of zero width gets scale 1.
    """
    top = 2**bits - 1
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = float(np.float32((hi - lo) / top))
    if not scale > 0:
        return 1.0, 0
    return scale, int(np.clip(round(-lo / scale), 0, top))


def mse_range(sample: torch.Tensor, lo: float, hi: float, bits: int) -> tuple[float, float]:
    """The range ``(lo, hi) * k / MSE_STEPS`` whose quantization of ``sample`` has the least
    squared error (the widest, among equals): clipping a few outliers buys finer steps for
    everything else."""
    best, best_error = (lo, hi), math.inf
    for step in range(1, MSE_STEPS + 1):
        shrink = step / MSE_STEPS
        scale, zero_point = quant_params(lo * shrink, hi * shrink, bits)
        quantized = torch.fake_quantize_per_tensor_affine(sample, scale, zero_point, 0, 2**bits - 1)
        error = float(torch.sum((quantized - sample) ** 2))
        if error <= best_error:
            best, best_error = (lo * shrink, hi * shrink), error
    return best


def choose_range(
    stats: RangeStats, bits: int, method: str, percentile: float
) -> tuple[float, float]:
    """The clipping range of one point: ``min-max`` covers everything seen; ``percentile``
    clips to the ``100 - p`` and ``p`` percentiles of the sample; ``mse`` minimises the
    fake-quantization error of the sample."""
    if method == "min-max":
        return stats.lo, stats.hi
    sample = stats.sample()
    if method == "mse":
        return mse_range(sample, stats.lo, stats.hi, bits)
    tails = torch.tensor([1 - percentile / 100, percentile / 100], dtype=torch.float64)
    lo, hi = torch.quantile(sample.double(), tails).tolist()
    return lo, hi


class _Observer(TorchFunctionMode):
    """Inside it, every fake-quantize call returns its input unchanged, after adding it to the
    next of ``stats`` (the calls come in graph order, one per quantize node)."""

    def __init__(self, stats: list[RangeStats], generator: torch.Generator) -> None:
        super().__init__()
        self.pending = iter(stats)
        self.generator = generator

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func is torch.fake_quantize_per_tensor_affine:
            next(self.pending).add(args[0], self.generator)
            return args[0]
        return func(*args, **(kwargs or {}))


@torch.no_grad()
def collect_statistics(
    graph: dict,
    params: dict[str, np.ndarray],
    preprocess: dict,
    dataset: Dataset,
    progress: Progress = None,
) -> list[RangeStats]:
    """Float activation statistics at each quantize node of ``graph``, in graph order (each
    batch's activations are summarised as they are computed, never all held at once)."""
    stats = [RangeStats() for node in graph["nodes"] if node["op"] == "quantize"]
    generator = torch.Generator().manual_seed(0)
    device = pick_device()
    module = GraphModule(graph, params).to(device).eval()
    for _, x in image_batches(dataset.images, preprocess, device, CALIB_BATCH, progress):
        with _Observer(stats, generator) as observer:
            module(x)
        if next(observer.pending, None) is not None:
            raise MbzError("calibration did not see every activation point")
    return stats


def insert_quantize_nodes(graph: dict, bits: dict[str, int]) -> list[dict]:
    """Put a quantize node (scale 1, zero point 0 until calibrated) right after the definition
    of each value in ``bits`` (value name -> bits) and make the value's readers read it."""
    names = {node["name"] for node in graph["nodes"]}
    inserted = []
    for value, width in bits.items():
        name = f"{value}.quantize"
        if name in names:
            raise MbzError(f"cannot name the quantize node of {value!r}: {name!r} is taken")
        node = {
            "name": name,
            "op": "quantize",
            "inputs": [value],
            "output": name,
            "params": {},
            "attrs": {"bits": width, "scale": 1.0, "zero_point": 0},
        }
        for reader in graph["nodes"]:
            reader["inputs"] = [name if i == value else i for i in reader["inputs"]]
        defining = [i for i, n in enumerate(graph["nodes"]) if n["output"] == value]
        graph["nodes"].insert(defining[0] + 1 if defining else 0, node)
        inserted.append(node)
    return inserted


def point_bits(rules: dict[str, int], points: dict[str, ActPoint]) -> dict[str, int]:
    """Value name -> the bits of its point: what ``rules`` give it, except that the input and
    the other operands of conv2d/linear (ACT_OPERANDS) that no rule selects take
    ACT_OPERAND_BITS once any point is quantized, so that every conv2d/linear reads codes."""
    widths = {value: act_bits_for(rules, point) for value, point in points.items()}
    if all(bits == ACT_FLOAT for bits in widths.values()):
        return widths
    return {
        value: act_bits_for(rules, point, ACT_OPERAND_BITS)
        if point.group in ACT_OPERANDS
        else widths[value]
        for value, point in points.items()
    }


def calibrate(
    graph: dict,
    params: dict[str, np.ndarray],
    preprocess: dict,
    dataset: Dataset,
    config: PackConfig,
    progress: Progress = None,
) -> list[dict]:
    """Quantize the activations of ``graph`` (changed in place) as ``config.act_bits`` asks,
    calibrated with ``config.calib`` on ``dataset``; ``params`` are the decoded weights.

    Returns the quantize nodes in graph order (none when every point stays float).
    """
    widths = point_bits(config.act_bits, activation_points(graph))
    if not insert_quantize_nodes(graph, {v: b for v, b in widths.items() if b != ACT_FLOAT}):
        return []
    nodes = quantize_nodes(graph)
    stats = collect_statistics(graph, params, preprocess, dataset, progress)
    for node, seen in zip(nodes, stats, strict=True):
        bits = node["attrs"]["bits"]
        lo, hi = choose_range(seen, bits, config.calib, config.calib_percentile)
        scale, zero_point = quant_params(lo, hi, bits)
        node["attrs"].update(scale=scale, zero_point=zero_point)
    return nodes


def quantize_nodes(graph: dict) -> list[dict]:
    """The graph's quantize nodes, in execution order."""
    return [node for node in graph["nodes"] if node["op"] == "quantize"]


def load_calibration(source: str, data_root: str | None, images: int) -> Dataset:
    """The first ``images`` images of the train split of ``source``, for calibration; an
    MbzError that says so when ``source`` has no train split."""
    try:
        return load_split(source, "train", data_root=data_root).head(images)
    except MbzError as error:
        raise MbzError(
            f"--act-bits calibrates on the train split of --data, which could not be read: {error}"
        ) from error
