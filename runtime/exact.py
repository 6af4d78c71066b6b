"""Which layers of a graph compute exactly, and the integers and constants they use (SPEC.md 7.3).

A ``conv2d`` or ``linear`` is *exact* when it reads a ``quantize`` output (integer codes ``q``
with zero point ``z_a`` and scale ``s_a``) and its weight has an integer form ``w_int`` with one
float32 scale ``s_w[c]`` per output channel (``integer_weight``). Every runtime then computes
the accumulator ``acc = sum((q - z_a) * w_int)`` exactly (its value does not depend on the
order of the sum) and the one epilogue ``float32(acc) * multiplier[c] + bias[c]`` in float32,
with ``multiplier[c] = float32(s_a) * float32(s_w[c])`` (one float32 multiply). ``bound`` is
the largest magnitude any partial sum can reach; below ``2**24`` float32 sums are exact in any
order, below ``2**31`` an int32 accumulator is; a layer whose bound reaches ``2**31`` is not
exact. ``avgpool2d`` and ``global_avgpool`` over codes are exact as an integer sum ``S`` of
``q - z`` followed by ``(float32(S) * float32(scale)) / float32(window)``.

The torch and ONNX sides import this module, so the three runtimes share one plan.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mbz.format.constants import Op
from mbz.format.tensors import IntCodebookTensor, UniformTensor

F32 = np.float32
FLOAT32_EXACT = 2**24  # integers below this magnitude are exact in float32 (and their sums)
INT32_EXACT = 2**31  # an int32 accumulator holds every partial sum below this bound
REDUCING_OPS = frozenset({Op.CONV2D, Op.LINEAR})
POOLING_OPS = frozenset({Op.AVGPOOL2D, Op.GLOBAL_AVGPOOL})


@dataclass(frozen=True)
class IntegerWeight:
    """A weight as ``values * scale[c]``: int32 ``values`` (0 at pruned positions) in the
    weight's shape and a float32 ``scale`` per output channel (axis 0)."""

    values: np.ndarray
    scale: np.ndarray


@dataclass(frozen=True)
class ExactLayer:
    """What one exact ``conv2d``/``linear`` needs: the integer weight, the input's zero point
    and bits, the epilogue's float32 ``multiplier`` and ``bias`` per output channel, and the
    bound on every partial sum of the accumulator."""

    weight: np.ndarray  # int32, the weight's shape
    multiplier: np.ndarray  # float32 [out]
    bias: np.ndarray  # float32 [out]
    input_zero_point: int
    input_bits: int
    bound: int

    @property
    def fan_in(self) -> int:
        """Terms summed into one output: input channels per group times the kernel size."""
        return int(np.prod(self.weight.shape[1:]))

    @property
    def float32_exact(self) -> bool:
        """Whether float32 sums of the whole reduction are exact in any order."""
        return self.bound < FLOAT32_EXACT

    def chunk_channels(self) -> int:
        """The most input channels (per group) whose partial sums stay below ``2**24``: a
        runtime that sums in float32 splits the reduction into chunks of this many channels and
        adds the chunks' results in float64."""
        per_channel = max(self.bound // self.weight.shape[1], 1)
        return max(min((FLOAT32_EXACT - 1) // per_channel, self.weight.shape[1]), 1)


def integer_weight(tensor: Any) -> IntegerWeight | None:
    """The integer form of a stored weight, or None when its values are not integers times a
    per-output-channel scale (float, plain-codebook and scaled-codebook tensors, uniform codes
    and integer codebooks scaled along another axis)."""
    if isinstance(tensor, IntCodebookTensor) and tensor.axis == 0:
        values = tensor.codebook.astype(np.int32)[tensor.indices]
        if tensor.mask is not None:
            values = np.where(tensor.mask, values, 0).astype(np.int32)
        return IntegerWeight(values, tensor.scale.astype(F32))
    if isinstance(tensor, UniformTensor) and tensor.axis in (None, 0):
        channels = tensor.shape[0]
        view = (-1,) + (1,) * (tensor.qdata.ndim - 1)
        zero = tensor.zero_point.astype(np.int32).reshape(view)
        values = tensor.qdata.astype(np.int32) - zero
        if tensor.mask is not None:
            values = np.where(tensor.mask, values, 0).astype(np.int32)
        scale = np.broadcast_to(tensor.scale.astype(F32), (channels,)).copy()
        return IntegerWeight(values, scale)
    return None


def code_range(bits: int, zero_point: int) -> int:
    """The largest ``|q - zero_point|`` of ``bits``-bit codes."""
    return max(zero_point, 2**bits - 1 - zero_point)


def exact_layers(graph: dict, tensors: Mapping[str, Any]) -> dict[str, ExactLayer]:
    """The plan of every exact ``conv2d``/``linear`` of a validated graph, by node name."""
    quantizers = {n["output"]: n["attrs"] for n in graph["nodes"] if n["op"] == Op.QUANTIZE}
    plans = {}
    for node in graph["nodes"]:
        codes = quantizers.get(node["inputs"][0])
        if node["op"] not in REDUCING_OPS or codes is None:
            continue
        weight = integer_weight(tensors[node["params"]["weight"]])
        if weight is None:
            continue
        plan = _plan(weight, tensors[node["params"]["bias"]].decode(), codes)
        if plan.bound < INT32_EXACT:
            plans[node["name"]] = plan
    return plans


def _plan(weight: IntegerWeight, bias: np.ndarray, codes: dict) -> ExactLayer:
    zero_point, bits = int(codes["zero_point"]), int(codes["bits"])
    fan_in = int(np.prod(weight.values.shape[1:]))
    largest = int(np.abs(weight.values).max(initial=0))
    return ExactLayer(
        weight=weight.values,
        multiplier=(F32(codes["scale"]) * weight.scale).astype(F32),
        bias=np.asarray(bias, dtype=F32),
        input_zero_point=zero_point,
        input_bits=bits,
        bound=code_range(bits, zero_point) * largest * fan_in,
    )


def exact_nodes(graph: dict, tensors: Mapping[str, Any]) -> dict[str, bool]:
    """For every ``conv2d``, ``linear``, ``avgpool2d`` and ``global_avgpool`` node: whether
    every runtime computes it bit-identically (pooling: when it reads codes)."""
    exact = exact_layers(graph, tensors)
    coded = {n["output"] for n in graph["nodes"] if n["op"] == Op.QUANTIZE}
    status = {}
    for node in graph["nodes"]:
        if node["op"] in REDUCING_OPS:
            status[node["name"]] = node["name"] in exact
        elif node["op"] in POOLING_OPS:
            status[node["name"]] = node["inputs"][0] in coded
    return status


def all_exact(graph: dict, tensors: Mapping[str, Any]) -> bool:
    """Whether every reduction of the graph is exact, so that the runtimes' logits must be
    bit-identical (every other op is one IEEE-754 operation per element)."""
    return all(exact_nodes(graph, tensors).values())
