"""A trainable version of the graph executor, for fine-tuning the folded graph while packing.

Each conv/linear weight becomes a small module whose ``forward`` returns the weight the file
will hold, so training sees exactly the model that gets written:

- ``FloatWeight``: float weights (float16 ones rounded through a straight-through estimator)
  under an optional keep-mask;
- ``CodebookWeight``: k-means QAT, ``codebook[indices]`` with trainable centroids (Deep
  Compression's centroid fine-tuning) and latent float weights, each position taking the
  centroid nearest to its latent weight in every forward pass, so weights can move between
  centroids (centroid fine-tuning alone rarely beat its post-training start on the CIFAR-10
  fragment); the latent weights get the gradient straight through, and autograd sums the
  gradients of all the weights that share a centroid into it, divided by their number, so a
  centroid steps as far as the average of its weights would; ``ScaledCodebookWeight`` and
  ``IntCodebookWeight`` the same with per-channel scales and float16 or int8 centroids;
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


def _cells(centroids: np.ndarray, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The unscaled bounds each weight stays within so that it is nearest to its own centroid
    ``centroids[indices]``: 0.49 of the way to the neighbouring centroid on either side
    (infinite beyond the smallest and the largest)."""
    order = np.argsort(centroids, kind="stable")
    ranked = np.concatenate(([-np.inf], centroids[order].astype(np.float64), [np.inf]))
    rank = np.empty(order.size, np.int64)
    rank[order] = np.arange(order.size)
    own = ranked[rank[indices] + 1]
    below, above = ranked[rank[indices]], ranked[rank[indices] + 2]
    low = np.where(np.isfinite(below), own - 0.49 * (own - below), -np.inf)
    top = np.where(np.isfinite(above), own + 0.49 * (above - own), np.inf)
    return low, top


def _latent_in_cells(
    latent: np.ndarray,
    levels: np.ndarray,
    scale: np.ndarray,
    cells: tuple[np.ndarray, np.ndarray],
) -> np.ndarray:
    """The float weights ``latent`` placed so that they quantize to what the stored tensor
    holds, ``scale * levels`` (per channel ``scale``, broadcast; bias correction may have
    changed it, ``mbz.correct``): each channel is multiplied by its stored scale over the
    least-squares scale of its weights against ``levels``, then every weight is held in its
    own cell ``scale * cells`` (unscaled lower and upper bounds). float32."""
    view = scale.shape
    axes = tuple(i for i, size in enumerate(view) if size == 1)
    energy = (levels**2).sum(axis=axes, keepdims=True)
    fitted = (latent * levels).sum(axis=axes, keepdims=True) / np.where(energy > 0, energy, 1)
    ratio = np.where(fitted > 0, scale / np.where(fitted > 0, fitted, 1), 1.0)  # 0: no levels
    low, top = cells
    return np.clip(latent * ratio, low * scale, top * scale).astype(np.float32)


def _nearest(values: torch.Tensor, centroids: torch.Tensor) -> torch.Tensor:
    """The index of the centroid nearest to each of ``values`` (int64)."""
    order = torch.argsort(centroids, stable=True)
    ranked = centroids[order]
    return order[torch.bucketize(values.contiguous(), (ranked[1:] + ranked[:-1]) / 2)]


class CodebookWeight(nn.Module):
    """k-means QAT of ``codebook[indices]``: trainable centroids shared by the weights that
    index them, and latent float weights; each position's index is that of the centroid
    nearest to its latent weight, recomputed every forward pass, so weights can move to
    another centroid. The latent weights get the decoded weight's gradient straight through,
    the centroids the mean gradient of the weights they hold."""

    mask: torch.Tensor | None
    zero: torch.Tensor  # True for a centroid 0.0, held there
    scale: torch.Tensor  # each channel's scale, broadcast over the weight (here 1.0)

    def __init__(self, tensor: CodebookTensor, latent: np.ndarray) -> None:
        super().__init__()
        self.codebook = nn.Parameter(torch.from_numpy(np.array(tensor.codebook, np.float32)))
        self.register_buffer("mask", _buffer(tensor.mask))
        self.register_buffer("zero", torch.from_numpy(np.asarray(tensor.codebook) == 0))
        self.register_buffer("scale", torch.from_numpy(self._scales(tensor)))
        # the latent weights start in the cells of the stored indices: the start is the file
        scale = self.scale.numpy().astype(np.float64)
        centroids = self.stored().detach().numpy()
        levels = centroids.astype(np.float64)[tensor.indices]
        placed = _latent_in_cells(latent, levels, scale, _cells(centroids, tensor.indices))
        self.weight = nn.Parameter(torch.from_numpy(placed))

    @classmethod
    def of(cls, latent: np.ndarray, tensor: Tensor) -> nn.Module:
        """The module for ``tensor`` (of this class's encoding) training ``latent`` weights."""
        return cls(cast(CodebookTensor, tensor), latent)

    @staticmethod
    def _scales(tensor: Tensor) -> np.ndarray:
        """The per-channel scales of ``tensor`` shaped to broadcast over its indices."""
        indices: np.ndarray = cast(CodebookTensor, tensor).indices
        return np.ones([1] * indices.ndim, np.float32)

    def _share(self, indices: torch.Tensor) -> torch.Tensor:
        """1 / the sum of the squared scales of the kept weights at each centroid: a
        centroid's summed gradient times this steps it as far as the least-squares fit of its
        weights' own steps (a plain sum makes a centroid shared by 10^4 weights take 10^4
        weight steps: one epoch at learning rate 0.01 took a k-means conv=4,fc=2 MobileNet-v2
        from 36% to 10% on the CIFAR-10 fragment)."""
        squares = (self.scale**2).expand(indices.shape)
        kept = indices if self.mask is None else indices[self.mask]
        squares = squares if self.mask is None else squares[self.mask]
        energy = torch.bincount(kept.ravel(), squares.ravel(), minlength=self.codebook.numel())
        return 1.0 / torch.where(energy > 0, energy, 1.0).float()

    def stored(self) -> torch.Tensor:
        """The centroids as the file stores them (float32 here)."""
        return self.codebook

    def assigned(self) -> torch.Tensor:
        """Each position's centroid index: the nearest centroid to its latent weight."""
        with torch.no_grad():
            return _nearest(self.weight / self.scale, self.stored())

    def forward(self) -> torch.Tensor:
        """The decoded weight, ``scale * centroid`` as the file computes it in float32, zero
        where masked (see the class docstring for the gradients)."""
        indices = self.assigned()
        rounded = straight_through(self.stored(), self.codebook)
        weight = self.scale * scaled_gradient(rounded, self._share(indices))[indices]
        weight = straight_through(weight, self.weight) + (weight - weight.detach())
        return _masked(weight, self.mask)

    def apply_mask(self) -> None:
        """Hold a centroid 0.0 at exactly 0.0: pruned weights may be stored as its symbol
        (``mbz.quantize.smallest_layout``); masked positions are zero by construction."""
        with torch.no_grad():
            self.codebook.masked_fill_(self.zero, 0.0)

    def exported_indices(self, template: Tensor) -> np.ndarray:
        """The indices the forward uses (``template``'s at masked positions)."""
        stored: np.ndarray = cast(CodebookTensor, template).indices
        indices = self.assigned().cpu().numpy().astype(stored.dtype)
        return indices if self.mask is None else np.where(template.mask, indices, stored)

    def export(self, template: CodebookTensor) -> CodebookTensor:
        """``template`` (bits, mask, entropy coding) with the fine-tuned codebook and
        indices."""
        return CodebookTensor(
            codebook=_numpy(self.codebook),
            indices=self.exported_indices(template),
            bits=template.bits,
            mask=template.mask,
            entropy=template.entropy,
            lean=template.lean,
        )


class ScaledCodebookWeight(CodebookWeight):
    """``scale[c] * codebook[indices]`` (SPEC.md 3.6): trainable centroids, rounded to float16
    in the forward pass (straight through), fixed per-channel float16 scales.

    A centroid's gradient is ``sum(scale_i * g_i)`` over its weights; it is divided by
    ``sum(scale_i**2)``, so one step moves the centroid to the least-squares fit of the weights'
    own steps (with a plain mean, a centroid of channels scaled by 0.1 would learn 100x slower
    than its weights)."""

    @staticmethod
    def _scales(tensor: Tensor) -> np.ndarray:
        channel = cast(ChannelCodebookTensor, tensor)
        view = [1] * channel.indices.ndim
        view[channel.axis] = channel.scale.size
        return channel.scale.astype(np.float32).reshape(view)

    def stored(self) -> torch.Tensor:
        """The centroids as the file stores them (rounded to float16), as float32."""
        return self.codebook.half().float()

    def export(self, template: ChannelCodebookTensor) -> ChannelCodebookTensor:  # type: ignore[override]
        """``template`` (scales, bits, mask, entropy coding) with the fine-tuned codebook,
        stored as the template's centroids are, and indices."""
        return type(template)(
            codebook=_numpy(self.stored()).astype(template.codebook_dtype),
            scale=template.scale,
            indices=self.exported_indices(template),
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
        zero_point = tensor.zero_point.astype(np.float64).reshape(view)
        levels = tensor.qdata.astype(np.float64) - zero_point
        cells = (  # a code at either end of the range may lie beyond it
            np.where(tensor.qdata > self.low, levels - 0.49, -np.inf),
            np.where(tensor.qdata < self.top, levels + 0.49, np.inf),
        )
        scale = tensor.scale.astype(np.float64).reshape(view)
        latent = _latent_in_cells(latent, levels, scale, cells)
        self.weight = nn.Parameter(torch.from_numpy(latent))
        self.scale = nn.Parameter(torch.from_numpy(tensor.scale.astype(np.float32)).view(view))
        self.register_buffer("zero_point", torch.from_numpy(zero_point.astype(np.float32)))
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
    Encoding.CODEBOOK: Trainable(CodebookWeight.of, "k-means QAT"),
    Encoding.UNIFORM: Trainable(UniformWeight, "uniform QAT (LSQ scales)"),
    Encoding.SCALED_CODEBOOK: Trainable(ScaledCodebookWeight.of, "scaled k-means QAT"),
    Encoding.INT_CODEBOOK: Trainable(IntCodebookWeight.of, "integer k-means QAT"),
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
