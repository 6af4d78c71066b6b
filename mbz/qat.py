"""A trainable version of the graph executor, for fine-tuning the folded graph while packing.

Each conv/linear weight becomes a small module whose ``forward`` returns the weight the file
will hold, so training sees exactly the model that gets written:

- ``FloatWeight``: float weights (float16 ones rounded through a straight-through estimator)
  under an optional keep-mask;
- ``CodebookWeight``: Deep Compression's centroid fine-tuning, ``codebook[indices]`` with
  trainable centroids and fixed indices, so autograd sums the gradients of all the weights that
  share a centroid into it; the sum is divided by their number, so a centroid steps as far as
  the average of its weights would (a plain sum makes a centroid shared by 10^4 weights take
  10^4 weight steps: one epoch at learning rate 0.01 took a k-means conv=4,fc=2 MobileNet-v2
  from 36% to 10% on the CIFAR-10 fragment); ``ScaledCodebookWeight`` and ``IntCodebookWeight``
  the same with per-channel scales and float16 or int8 centroids;
- ``UniformWeight``: quantization-aware training with a straight-through estimator and LSQ
  (Esser et al. 2020) learnable scales (per channel or per tensor) on fixed zero points.

Biases (and the scale/shift of unfolded BatchNorms) are trainable parameters, and the graph's
activation ``quantize`` nodes stay in place (PyTorch's fake-quantize passes gradients straight
through inside its range). ``export()`` gives the container tensors of what the forward uses:
their ``decode()`` equals, bit for bit, the weights the module computed with.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, cast

import numpy as np
import torch
from torch import nn

from mbz.format import (
    CodebookTensor,
    DenseTensor,
    Encoding,
    ScaledCodebookTensor,
    Tensor,
    UniformTensor,
)
from mbz.format.encodings import encoding_of
from mbz.format.tensors import ChannelCodebookTensor
from mbz.graph_ops import weight_nodes
from mbz.quantize import F16_TINY
from mbz.torch_graph import GraphModule

MIN_SCALE = 1e-8  # learned scales are clamped to at least this, so codes stay finite
INT8_MIN, INT8_MAX = -128, 127  # the range of an int_codebook centroid
F16_MAX = float(np.finfo(np.float16).max)


def straight_through(value: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, the identity's gradient to ``source`` in the backward.

    Written as ``value + (source - source)`` so the forward result is ``value`` exactly."""
    return value.detach() + (source - source.detach())


def scaled_gradient(value: torch.Tensor, factor: float | torch.Tensor) -> torch.Tensor:
    """``value`` in the forward pass, its gradient multiplied by ``factor`` (LSQ's g, or one
    factor per element)."""
    scaled = value * factor
    return value.detach() + (scaled - scaled.detach())


def float16_rounded(value: torch.Tensor) -> torch.Tensor:
    """``value`` rounded to float16 (clamped to its finite range), as float32, with the
    identity's gradient: what a float16 tensor of the file decodes to."""
    return straight_through(value.clamp(-F16_MAX, F16_MAX).half().float(), value)


def _buffer(mask: np.ndarray | None) -> torch.Tensor | None:
    return None if mask is None else torch.from_numpy(np.array(mask, dtype=bool))


def _masked(weight: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """``weight`` with exactly 0.0 where ``mask`` is False (as the container decodes)."""
    return weight if mask is None else torch.where(mask, weight, 0.0)


def _numpy(tensor: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(tensor.detach().cpu().numpy(), dtype=np.float32)


class FloatWeight(nn.Module):
    """A float weight under an optional keep-mask (weight pruning); float16 when ``float16``."""

    mask: torch.Tensor | None

    def __init__(self, value: np.ndarray, mask: np.ndarray | None, float16: bool = False) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.from_numpy(np.array(value, np.float32)))
        self.register_buffer("mask", _buffer(mask))
        self.float16 = float16  # not ``half``, which would hide ``nn.Module.half()``

    def forward(self) -> torch.Tensor:
        """The weight as stored: float16-rounded when ``float16``, zero where masked."""
        weight: torch.Tensor = self.weight
        if self.float16:
            weight = float16_rounded(weight)
        return _masked(weight, self.mask)

    @torch.no_grad()
    def apply_mask(self) -> None:
        """Set the masked weights themselves to zero (after each optimizer step)."""
        if self.mask is not None:
            self.weight.masked_fill_(~self.mask, 0.0)

    def set_mask(self, mask: np.ndarray) -> None:
        """Replace the keep-mask (gradual magnitude pruning) and zero what it drops."""
        self.mask = torch.from_numpy(np.array(mask, dtype=bool)).to(self.weight.device)
        self.apply_mask()

    def export(self, template: Tensor | None = None) -> DenseTensor:
        """The container tensor (float16 or float32) of the weight as the forward uses it."""
        values = self.forward()
        mask = None if self.mask is None else self.mask.cpu().numpy()
        stored = _numpy(values).astype(np.float16) if self.float16 else _numpy(values)
        return DenseTensor(values=stored, mask=mask)


class CodebookWeight(nn.Module):
    """``codebook[indices]``: trainable centroids shared by the weights that index them."""

    indices: torch.Tensor
    mask: torch.Tensor | None
    share: torch.Tensor
    zero: torch.Tensor  # True for a centroid 0.0, held there

    def __init__(self, tensor: CodebookTensor) -> None:
        super().__init__()
        self.codebook = nn.Parameter(torch.from_numpy(np.array(tensor.codebook, np.float32)))
        self.register_buffer("indices", torch.from_numpy(tensor.indices.astype(np.int64)))
        self.register_buffer("mask", _buffer(tensor.mask))
        kept = tensor.indices if tensor.mask is None else tensor.indices[tensor.mask]
        sharing = np.bincount(kept.ravel(), minlength=tensor.codebook.size)
        self.register_buffer("share", torch.from_numpy(1.0 / np.maximum(sharing, 1)).float())
        self.register_buffer("zero", torch.from_numpy(np.asarray(tensor.codebook) == 0))

    def forward(self) -> torch.Tensor:
        """The decoded weight: each position's centroid, zero where masked; each centroid's
        gradient is the mean of the gradients of the weights that share it."""
        codebook = scaled_gradient(self.codebook, self.share)
        return _masked(codebook[self.indices], self.mask)

    def apply_mask(self) -> None:
        """Hold a centroid 0.0 at exactly 0.0: pruned weights may be stored as its symbol
        (``mbz.quantize.smallest_layout``); masked positions are zero by construction."""
        with torch.no_grad():
            self.codebook.masked_fill_(self.zero, 0.0)

    def export(self, template: CodebookTensor) -> CodebookTensor:
        """``template`` (indices, bits, mask, entropy coding) with the fine-tuned codebook."""
        return CodebookTensor(
            codebook=_numpy(self.codebook),
            indices=template.indices,
            bits=template.bits,
            mask=template.mask,
            entropy=template.entropy,
            lean=template.lean,
        )


class ScaledCodebookWeight(CodebookWeight):
    """``scale[c] * codebook[indices]`` (SPEC.md 3.6): trainable centroids, rounded to float16
    in the forward pass (straight through), fixed per-channel float16 scales and indices.

    A centroid's gradient is ``sum(scale_i * g_i)`` over its weights; it is divided by
    ``sum(scale_i**2)``, so one step moves the centroid to the least-squares fit of the weights'
    own steps (with a plain mean, a centroid of channels scaled by 0.1 would learn 100x slower
    than its weights)."""

    scale: torch.Tensor

    def __init__(self, tensor: ScaledCodebookTensor) -> None:
        super().__init__(tensor)  # type: ignore[arg-type]
        view = [1] * tensor.indices.ndim
        view[tensor.axis] = tensor.scale.size
        scale = tensor.scale.astype(np.float64).reshape(view)
        squares = np.broadcast_to(scale**2, tensor.indices.shape)
        keep = np.ones(tensor.indices.shape, bool) if tensor.mask is None else tensor.mask
        energy = np.bincount(
            tensor.indices[keep], weights=squares[keep], minlength=tensor.codebook.size
        )
        share = 1.0 / np.where(energy > 0, energy, 1.0)
        self.share.copy_(torch.from_numpy(share).float())
        self.register_buffer("scale", torch.from_numpy(scale.astype(np.float32)))

    def stored(self) -> torch.Tensor:
        """The centroids as the file stores them (rounded to float16), as float32."""
        return self.codebook.half().float()

    def forward(self) -> torch.Tensor:
        """The decoded weight, exactly as SPEC.md 3.6 computes it in float32."""
        rounded = straight_through(self.stored(), self.codebook)
        codebook = scaled_gradient(rounded, self.share)
        return _masked(self.scale * codebook[self.indices], self.mask)

    def export(self, template: ChannelCodebookTensor) -> ChannelCodebookTensor:  # type: ignore[override]
        """``template`` (scales, indices, bits, mask, entropy coding) with the fine-tuned
        codebook, stored as the template's centroids are."""
        return type(template)(
            codebook=_numpy(self.stored()).astype(template.codebook_dtype),
            scale=template.scale,
            indices=template.indices,
            bits=template.bits,
            axis=template.axis,
            mask=template.mask,
            entropy=template.entropy,
            lean=template.lean,
        )


class IntCodebookWeight(ScaledCodebookWeight):
    """``scale[c] * codebook[indices]`` with int8 centroids (SPEC.md 3.7): as the scaled
    codebook, the trainable centroids rounded to integers (half to even, straight through) and
    clamped to int8 in the forward pass, so that what trains is what the file stores."""

    def stored(self) -> torch.Tensor:
        """The centroids as the file stores them (int8), as float32."""
        return torch.round(self.codebook).clamp(INT8_MIN, INT8_MAX)


def _latent_in_codes(
    latent: np.ndarray, tensor: UniformTensor, view: list[int], codes: tuple[float, float]
) -> np.ndarray:
    """The float weights ``latent`` placed so that they quantize to the codes ``tensor``
    stores, whose scales bias correction may have changed (``mbz.correct``): each channel is
    multiplied by its stored scale over the least-squares scale of its weights against its
    codes, then every weight is held within 0.49 steps of its own code (inside the range of
    ``codes``, the smallest and largest, it may lie beyond). float32."""
    scale = tensor.scale.astype(np.float64).reshape(view)
    levels = tensor.qdata.astype(np.float64) - tensor.zero_point.astype(np.float64).reshape(view)
    axes = tuple(i for i, size in enumerate(view) if size == 1)
    energy = (levels**2).sum(axis=axes, keepdims=True)
    fitted = (latent * levels).sum(axis=axes, keepdims=True) / np.where(energy > 0, energy, 1)
    ratio = np.where(fitted > 0, scale / np.where(fitted > 0, fitted, 1), 1.0)  # 0: no codes
    low = np.where(tensor.qdata > codes[0], (levels - 0.49) * scale, -np.inf)
    top = np.where(tensor.qdata < codes[1], (levels + 0.49) * scale, np.inf)
    return np.clip(latent * ratio, low, top).astype(np.float32)


class UniformWeight(nn.Module):
    """LSQ fake quantization ``(clamp(round(w / s) + z, low, top) - z) * s`` of trainable
    float weights ``w``, learnable scales ``s`` and fixed integer zero points ``z``; ``low`` and
    ``top`` are the smallest and largest code the stored tensor starts with."""

    zero_point: torch.Tensor
    mask: torch.Tensor | None

    def __init__(self, latent: np.ndarray, tensor: UniformTensor) -> None:
        super().__init__()
        view = [1] * latent.ndim
        if tensor.axis is not None:
            view[tensor.axis] = tensor.channels
        # the codes keep the range they start in (step-size codes use -m..m of 2**bits), so
        # training does not spread them over codes that cost more bytes once entropy-coded
        kept = tensor.qdata if tensor.mask is None else tensor.qdata[tensor.mask]
        self.low = float(kept.min()) if kept.size else 0.0
        self.top = float(kept.max()) if kept.size else float(2**tensor.bits - 1)
        latent = _latent_in_codes(latent, tensor, view, (self.low, self.top))
        self.weight = nn.Parameter(torch.from_numpy(latent))
        self.scale = nn.Parameter(torch.from_numpy(tensor.scale.astype(np.float32)).view(view))
        zero_point = torch.from_numpy(tensor.zero_point.astype(np.float32)).view(view)
        self.register_buffer("zero_point", zero_point)
        self.register_buffer("mask", _buffer(tensor.mask))
        # lean files store float16 scales: training then uses float16 values too, so that the
        # exported scales keep their 2 bytes and decode to what was trained
        with np.errstate(over="ignore"):
            half = tensor.scale.astype(np.float16).astype(np.float32)
        self.float16 = tensor.lean and np.array_equal(half, tensor.scale)
        per_scale = latent.size // tensor.channels
        levels = max(self.top - self.low, 1.0)
        self.gradient_factor = 1.0 / math.sqrt(per_scale * levels)  # LSQ's g

    def _scale(self) -> torch.Tensor:
        if not self.float16:
            return self.scale.clamp_min(MIN_SCALE)
        scale = self.scale.clamp(F16_TINY, F16_MAX)
        return straight_through(scale.half().float(), scale)

    def codes(self) -> torch.Tensor:
        """The integer codes (as floats) of the current weights and scales."""
        with torch.no_grad():
            levels = torch.round(self.weight / self._scale()) + self.zero_point
            return levels.clamp(self.low, self.top)

    def forward(self) -> torch.Tensor:
        """The dequantized weight; straight-through gradients to ``w`` inside the range, LSQ's
        gradient (scaled by g) to ``s``."""
        scale = scaled_gradient(self._scale(), self.gradient_factor)
        scaled = self.weight / scale
        levels = straight_through(torch.round(scaled), scaled) + self.zero_point
        weight = (levels.clamp(self.low, self.top) - self.zero_point) * scale
        return _masked(weight, self.mask)

    def apply_mask(self) -> None:
        """Nothing to do: masked positions are zero by construction."""

    def export(self, template: UniformTensor) -> UniformTensor:
        """The codes and scales the forward uses, with ``template``'s layout and coding."""
        qdata = self.codes().cpu().numpy().astype(np.uint8)
        if template.mask is not None:
            qdata[~template.mask] = 0
        return UniformTensor(
            qdata=qdata,
            scale=_numpy(self._scale()).reshape(-1),
            zero_point=self.zero_point.cpu().numpy().reshape(-1).astype(np.uint8),
            bits=template.bits,
            axis=template.axis,
            mask=template.mask,
            entropy=template.entropy,
            lean=template.lean,
        )


class WeightModule(Protocol):
    """What every weight module above offers. ``export`` takes the stored tensor of the
    module's own encoding, a pairing the type of ``TRAINABLE`` cannot express: hence Any."""

    def __call__(self) -> torch.Tensor: ...

    def apply_mask(self) -> None: ...

    def export(self, template: Any) -> Tensor: ...


@dataclass(frozen=True)
class Trainable:
    """How fine-tuning trains the weights of one encoding."""

    build: Callable[[np.ndarray, Tensor], nn.Module]  # (latent float weight, stored tensor)
    stage: str | None  # what fine-tuning does to them, as its stage says; None: nothing new


# One entry per encoding, in the order a fine-tuning stage's name lists them.
TRAINABLE: dict[Encoding, Trainable] = {
    Encoding.CODEBOOK: Trainable(lambda _, t: CodebookWeight(t), "k-means centroid fine-tuning"),
    Encoding.UNIFORM: Trainable(UniformWeight, "uniform QAT (LSQ scales)"),
    Encoding.SCALED_CODEBOOK: Trainable(
        lambda _, t: ScaledCodebookWeight(t), "scaled k-means centroid fine-tuning"
    ),
    Encoding.INT_CODEBOOK: Trainable(
        lambda _, t: IntCodebookWeight(t), "integer k-means centroid fine-tuning"
    ),
    Encoding.F16: Trainable(lambda v, t: FloatWeight(v, t.mask, float16=True), "float16 weights"),
    Encoding.F32: Trainable(lambda v, t: FloatWeight(v, t.mask), None),
}


def weight_module(
    value: np.ndarray, tensor: Tensor | None, mask: np.ndarray | None = None
) -> nn.Module:
    """The trainable module for one conv/linear weight: float ``value`` (the latent weight of
    uniform QAT), stored as ``tensor`` (None: float32 under ``mask``)."""
    if tensor is None:
        return FloatWeight(value, mask)
    return TRAINABLE[encoding_of(tensor)].build(value, tensor)


class TrainableGraph(GraphModule):
    """The graph IR as a trainable torch module (see the module docstring).

    ``params`` are the float tensors (weights before quantization, biases); ``tensors``, when
    given, the container tensors the weights will be stored as (post-training quantized: their
    codebooks, codes, scales and masks are the starting point) and the biases as stored (bias
    correction included; float16 ones train rounded to float16 and export as float16, so the
    start is the packed model and the export keeps its bytes); ``masks`` keep-masks for float
    weights without ``tensors``.
    """

    def __init__(
        self,
        graph: dict,
        params: dict[str, np.ndarray],
        tensors: dict[str, Tensor] | None = None,
        masks: dict[str, np.ndarray] | None = None,
    ) -> None:
        super().__init__(graph, params)
        tensors, masks = tensors or {}, masks or {}
        self.weights = nn.ModuleDict()
        self.names = {slot: name for name, slot in self.slots.items()}
        self.float16: set[str] = set()  # slots of parameters stored as float16
        weight_names = {node["params"]["weight"] for node in weight_nodes(graph)}
        for name, slot in self.slots.items():
            value, stored = self.get_buffer(slot), tensors.get(name)
            delattr(self, slot)
            if name in weight_names:
                self.weights[slot] = weight_module(params[name], stored, masks.get(name))
                continue
            if isinstance(stored, DenseTensor):
                value = torch.from_numpy(stored.decode())
                if stored.values.dtype == np.float16:
                    self.float16.add(slot)
            self.register_parameter(slot, nn.Parameter(value))

    def node_tensors(self, node: dict) -> dict[str, torch.Tensor]:
        """The tensors ``node`` reads: the weight modules' outputs and the parameters."""
        return {role: self._value(self.slots[name]) for role, name in node["params"].items()}

    def _value(self, slot: str) -> torch.Tensor:
        if slot in self.weights:
            return self._weight(slot)()
        value = getattr(self, slot)
        return float16_rounded(value) if slot in self.float16 else value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a preprocessed batch, always in float32 (no autocast), as the file runs."""
        with torch.autocast(x.device.type, enabled=False):
            return super().forward(x.float())

    def weight(self, name: str) -> WeightModule:
        """The module of the conv/linear weight named ``name`` in the tensor table."""
        return self._weight(self.slots[name])

    def _weight(self, slot: str) -> WeightModule:
        # ModuleDict items are typed nn.Module; ``weights`` holds only weight modules
        return cast(WeightModule, self.weights[slot])

    def weight_names(self) -> list[str]:
        """Tensor names of the conv/linear weights, in graph order."""
        return [self.names[slot] for slot in self.weights]

    def apply_masks(self) -> None:
        """Zero every masked weight (call after each optimizer step)."""
        for slot in self.weights:
            self._weight(slot).apply_mask()

    @torch.no_grad()
    def float_values(self) -> dict[str, np.ndarray]:
        """Every tensor as the forward uses it, as float32 arrays by tensor name."""
        return {name: _numpy(self._value(slot)) for name, slot in self.slots.items()}

    @torch.no_grad()
    def export(self, tensors: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
        """The container tensors of the current model: each weight as its module stores it
        (``tensors`` supply the layout, bits and entropy coding), the rest as float32, or as
        float16 where they were stored so."""
        tensors = tensors or {}
        exported: dict[str, Tensor] = {}
        for name, slot in self.slots.items():
            if slot in self.weights:
                exported[name] = self._weight(slot).export(tensors.get(name))
            else:
                values = _numpy(self._value(slot))
                dtype = np.float16 if slot in self.float16 else np.float32
                exported[name] = DenseTensor(values=values.astype(dtype))
        return exported
