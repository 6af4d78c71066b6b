"""The torch side's encoders: a float weight (and an optional keep-mask from weight pruning)
becomes the container's tensor object of its encoding, so the bytes written are exactly what
the quantizer decided. ``ENCODERS`` has one per ``Encoding`` (see ``mbz.encodings``): floats,
per-layer codebooks fitted by k-means (plain, scaled per channel, or scaled with integer
centroids), and uniform integer codes.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

from mbz.config import PackConfig
from mbz.encodings import weight_encoding
from mbz.format import (
    CodebookTensor,
    DenseTensor,
    Encoding,
    Entropy,
    IntCodebookTensor,
    ScaledCodebookTensor,
    Tensor,
    UniformTensor,
)
from mbz.format.constants import MAX_BITS
from mbz.format.container import encode_tensor

# step-size mode: the largest code of each step a budget may give uniform codes; neighbours are
# about half a bit apart (a step sqrt(2) smaller), from 3 levels (2 bits) to 255 (8 bits)
STEP_CODES = (1, 2, 3, 5, 7, 10, 15, 22, 31, 45, 63, 127)


@dataclass(frozen=True, eq=False)
class Coding:
    """How one weight is stored: its encoding and bits, and the encoders' options."""

    encoding: Encoding
    bits: int
    symmetric: bool = False  # uniform: codes symmetric around zero
    per_channel: bool = True  # uniform: one scale per output channel
    huffman: bool = False  # index streams Huffman-coded when that is smaller
    kmeans_iters: int = 30  # codebook: Lloyd iterations
    codebook: str = "auto"  # kmeans: scaled, plain, int, or auto (see PackConfig.codebook)
    zero_symbol: bool = False  # codebooks: one centroid held at 0.0, the code of pruned weights
    max_code: int | None = None  # uniform step-size mode: codes -max_code..max_code (step_quantize)
    gain: np.ndarray | None = None  # step-size mode: each output channel's folded BN gain

    @classmethod
    def of(cls, config: PackConfig, bits: int) -> Coding:
        """The coding ``config`` gives a weight of ``bits`` bits."""
        encoding = weight_encoding(bits, config.method)
        if encoding == Encoding.CODEBOOK and config.codebook != "plain":
            # auto: integer centroids once activations are codes, so the layers are exact
            auto_int = config.codebook == "auto" and bool(config.act_bits)
            integer = config.codebook == "int" or auto_int
            encoding = Encoding.INT_CODEBOOK if integer else Encoding.SCALED_CODEBOOK
        return cls(
            encoding,
            bits,
            config.symmetric,
            config.per_channel,
            config.huffman,
            config.kmeans_iters,
            config.codebook,
        )

    @property
    def entropy(self) -> Entropy | None:
        """The index streams' entropy coding (None: the writer picks the smaller)."""
        return None if self.huffman else Entropy.FIXED


Encoder = Callable[[np.ndarray, Coding, np.ndarray | None], Tensor]


def kmeans_1d(
    values: np.ndarray,
    k: int,
    iters: int = 30,
    weights: np.ndarray | None = None,
    pin_zero: bool = False,
) -> np.ndarray:
    """Lloyd's k-means on scalars with linear initialisation (Deep Compression), each value
    counted ``weights`` times (all once by default): it minimises ``sum(weights * error**2)``.
    With ``pin_zero``, one centroid is exactly 0.0 throughout (the symbol pruned weights take)
    and the others fit the values around it.

    Works on the sorted values with prefix sums, so one iteration costs O(k log n).
    Returns sorted float32 centroids: ``k``, or fewer when there are fewer distinct values.
    """
    flat = values.astype(np.float64).ravel()
    order = np.argsort(flat, kind="stable")
    v = flat[order]
    w = np.ones_like(v) if weights is None else weights.astype(np.float64).ravel()[order]
    distinct = np.union1d(v, [0.0]) if pin_zero else np.unique(v)
    if distinct.size <= k:
        return distinct.astype(np.float32)
    mass = np.concatenate([[0.0], np.cumsum(w)])
    moment = np.concatenate([[0.0], np.cumsum(w * v)])
    centroids = _pinned(np.linspace(v[0], v[-1], k), pin_zero)
    for _ in range(iters):
        bounds = np.searchsorted(v, (centroids[1:] + centroids[:-1]) / 2)
        edges = np.concatenate([[0], bounds, [v.size]])
        counts = mass[edges[1:]] - mass[edges[:-1]]
        sums = moment[edges[1:]] - moment[edges[:-1]]
        updated = np.where(counts > 0, sums / np.where(counts > 0, counts, 1), centroids)
        updated = _pinned(updated, pin_zero)
        updated.sort()
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    return centroids.astype(np.float32)


def _pinned(centroids: np.ndarray, pin_zero: bool) -> np.ndarray:
    """``centroids`` with the one nearest 0 set to 0.0 when ``pin_zero`` (a Lloyd step keeps
    each neighbour's mean on its side of the pinned centroid, so it stays the nearest)."""
    if pin_zero:
        centroids[np.argmin(np.abs(centroids))] = 0.0
    return centroids


def nearest_index(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (sorted centroids) for every value, as uint8."""
    mids = (centroids[1:].astype(np.float64) + centroids[:-1]) / 2
    return np.searchsorted(mids, values.astype(np.float64)).astype(np.uint8)


def pruned_index(codebook: np.ndarray) -> int:
    """The index pruned positions take: the centroid 0.0 where there is one (a pinned
    codebook, which may store them), else 0 (a mask leaves them out of the file)."""
    zeros = np.flatnonzero(codebook == 0)
    return int(zeros[0]) if zeros.size else 0


def centroid_count(bits: int, pin_zero: bool) -> int:
    """The centroids a ``bits``-bit codebook fits: ``2**bits``, and with ``pin_zero`` the
    centroid 0.0 on top where an index can hold it (below 8 bits), so the kept weights keep
    as many centroids as under a mask and the zero symbol costs accuracy nothing."""
    return 2**bits + (pin_zero and bits < MAX_BITS)


def index_bits(bits: int, codebook: np.ndarray) -> int:
    """The index width of ``codebook``: ``bits``, one more when a pinned 0.0 needs it."""
    return max(bits, int(codebook.size - 1).bit_length())


def codebook_quantize(
    weight: np.ndarray,
    bits: int,
    mask: np.ndarray | None = None,
    iters: int = 30,
    pin_zero: bool = False,
) -> CodebookTensor:
    """A per-layer k-means codebook of at most ``2**bits`` centroids over the kept weights
    (with ``pin_zero``, ``centroid_count`` of them, one 0.0)."""
    kept = weight[mask] if mask is not None else weight
    source = kept if kept.size else np.zeros(1, np.float32)
    centroids = kmeans_1d(source, centroid_count(bits, pin_zero), iters, pin_zero=pin_zero)
    indices = nearest_index(weight, centroids)
    if mask is not None:
        indices[~mask] = pruned_index(centroids)
    width = index_bits(bits, centroids)
    return CodebookTensor(codebook=centroids, indices=indices, bits=width, mask=mask, lean=True)


F16_TINY = float(np.finfo(np.float16).smallest_subnormal)
F16_MAX = float(np.finfo(np.float16).max)


@dataclass(frozen=True)
class ChannelFit:
    """A per-channel scaled codebook before it is stored: the weight (of ``shape``) as one row
    per output channel, each channel's float16 scale, and the float32 k-means centroids fitted
    to the rows divided by their scales."""

    shape: tuple[int, ...]
    rows: np.ndarray  # float32 [channels, rest]
    scale: np.ndarray  # float16 [channels]
    centroids: np.ndarray  # float32, sorted

    def indices(
        self, scale: np.ndarray, codebook: np.ndarray, mask: np.ndarray | None
    ) -> np.ndarray:
        """Each weight's nearest entry of ``codebook`` (sorted) once its channel is divided by
        ``scale``, in the weight's shape (0 where ``mask`` is False), as uint8."""
        normalised = self.rows / scale.astype(np.float32)[:, None]
        indices = nearest_index(normalised, codebook.astype(np.float32)).reshape(self.shape)
        if mask is not None:
            indices[~mask] = pruned_index(codebook)
        return indices


def fit_channel_codebook(
    weight: np.ndarray,
    bits: int,
    mask: np.ndarray | None = None,
    iters: int = 30,
    importance: np.ndarray | None = None,
    pin_zero: bool = False,
) -> ChannelFit | None:
    """One k-means codebook for the layer over each output channel divided by its own scale
    (its largest kept magnitude, as float16). The values are weighted by ``scale[c]**2`` times
    ``importance`` (default 1), so the error minimised is the weight's own; with ``pin_zero``,
    ``centroid_count`` centroids, one 0.0. None when a scale does not fit float16."""
    rows = weight.reshape(weight.shape[0], -1).astype(np.float32)
    keep = np.ones(rows.shape, bool) if mask is None else mask.reshape(rows.shape)
    peak = np.where(keep, np.abs(rows), 0).max(axis=1, initial=0.0)
    if peak.max(initial=0.0) > F16_MAX:
        return None
    scale = np.maximum(peak, F16_TINY).astype(np.float16)
    scale = np.where(scale > 0, scale, np.float16(F16_TINY))  # a peak that rounded down to 0
    normalised = rows / scale.astype(np.float32)[:, None]
    weights = np.broadcast_to(scale.astype(np.float64)[:, None] ** 2, rows.shape)
    if importance is not None:
        weights = weights * importance.reshape(rows.shape)
    source, counts = (normalised[keep], weights[keep]) if keep.any() else (np.zeros(1), None)
    centroids = kmeans_1d(source, centroid_count(bits, pin_zero), iters, counts, pin_zero)
    return ChannelFit(weight.shape, rows, scale, centroids)


def scaled_codebook_quantize(
    weight: np.ndarray,
    bits: int,
    mask: np.ndarray | None = None,
    iters: int = 30,
    importance: np.ndarray | None = None,
    pin_zero: bool = False,
) -> ScaledCodebookTensor | None:
    """``w ~ scale[c] * codebook[index]`` (SPEC.md 3.6): the fit of ``fit_channel_codebook``
    with float16 centroids. None when a scale does not fit float16."""
    fit = fit_channel_codebook(weight, bits, mask, iters, importance, pin_zero)
    if fit is None:
        return None
    codebook = np.unique(fit.centroids.astype(np.float16))  # float16 may merge centroids
    indices = fit.indices(fit.scale, codebook, mask)
    bits = index_bits(bits, codebook)  # one wider for a pinned 0.0 on top
    return ScaledCodebookTensor(
        codebook=codebook, scale=fit.scale, indices=indices, bits=bits, axis=0, mask=mask, lean=True
    )


INT8_TOP = 127  # the integer centroids lie in -127..127


def int_codebook_quantize(
    weight: np.ndarray,
    bits: int,
    mask: np.ndarray | None = None,
    iters: int = 30,
    importance: np.ndarray | None = None,
    pin_zero: bool = False,
) -> IntCodebookTensor | None:
    """``w ~ scale[c] * codebook[index]`` with int8 centroids (SPEC.md 3.7): the fit of
    ``fit_channel_codebook``, its centroids ``c`` rounded to ``round(c * 127 / m)`` (``m`` the
    largest ``|c|``) and every scale multiplied by ``m / 127`` (as float16), then each weight
    re-assigned to its nearest integer centroid. None when a scale does not fit float16."""
    fit = fit_channel_codebook(weight, bits, mask, iters, importance, pin_zero)
    if fit is None:
        return None
    largest = float(np.abs(fit.centroids).max(initial=0.0)) or 1.0
    integers = np.round(fit.centroids.astype(np.float64) * (INT8_TOP / largest))
    codebook = np.unique(integers).astype(np.int8)  # rounding may merge centroids
    scale = (fit.scale.astype(np.float64) * (largest / INT8_TOP)).astype(np.float16)
    scale = np.where(scale > 0, scale, np.float16(F16_TINY))
    indices = fit.indices(scale, codebook, mask)
    bits = index_bits(bits, codebook)  # one wider for a pinned 0.0 on top
    return IntCodebookTensor(
        codebook=codebook, scale=scale, indices=indices, bits=bits, axis=0, mask=mask, lean=True
    )


def weighted_error(weight: np.ndarray, tensor: Tensor, importance: np.ndarray | None) -> float:
    """``sum(importance * (weight - decoded)**2)``, importance 1 by default."""
    error = (weight.astype(np.float64) - tensor.decode()) ** 2
    return float(error.sum() if importance is None else (importance * error).sum())


def half_scales(scale: np.ndarray, up: bool = False) -> np.ndarray:
    """Positive float32 ``scale`` rounded to float16 values (nearest, or ``up``: the nearest at
    or above, so a range still fits), as float32, so the file can store them in half the
    bytes (SPEC.md 3.4); unchanged when one does not fit float16."""
    with np.errstate(over="ignore"):
        half = scale.astype(np.float16)
    if up:
        below = half.astype(np.float32) < scale
        half = np.where(below, np.nextafter(half, np.float16(np.inf)), half)
    half = np.where(half > 0, half, np.float16(F16_TINY))
    return half.astype(np.float32) if np.isfinite(half).all() else scale


def bias_tensor(values: np.ndarray) -> DenseTensor:
    """A conv/linear bias as stored: float16 when every value fits float16 (2**-11 relative;
    the logits of a MobileNet-v2 stay above 60 dB SQNR, SPEC.md 3.2), else float32."""
    with np.errstate(over="ignore"):
        half = values.astype(np.float16)
    return DenseTensor(values=half if np.isfinite(half).all() else values.astype(np.float32))


def _channel_view(weight: np.ndarray, mask: np.ndarray | None, per_channel: bool):
    """Rows to compute ranges over (one per output channel, or one) with pruned values masked."""
    rows = weight.reshape(weight.shape[0] if per_channel else 1, -1).astype(np.float32)
    if mask is None:
        return rows, np.ones_like(rows, dtype=bool)
    return rows, mask.reshape(rows.shape)


def uniform_quantize(
    weight: np.ndarray,
    bits: int,
    *,
    symmetric: bool = False,
    per_channel: bool = True,
    mask: np.ndarray | None = None,
) -> UniformTensor:
    """Uniform integer codes with DequantizeLinear semantics: ``w ~ (q - zero_point) * scale``.

    Asymmetric ranges always contain zero; symmetric codes are stored unsigned with
    ``zero_point = 2**(bits-1)``. Ranges are taken over kept weights only. Each scale is rounded
    up to a float16 value (where they all fit) before the codes are computed with it, so the
    file stores it exactly in 2 bytes.
    """
    if symmetric and bits < 2:
        raise ValueError("symmetric uniform quantization needs at least 2 bits")
    rows, keep = _channel_view(weight, mask, per_channel)
    qmax = 2**bits - 1
    hi = np.where(keep, rows, -np.inf).max(axis=1, initial=0.0).astype(np.float32)
    lo = np.where(keep, rows, np.inf).min(axis=1, initial=0.0).astype(np.float32)
    if symmetric:
        half = 2 ** (bits - 1) - 1
        scale = np.maximum(np.abs(lo), np.abs(hi)) / np.float32(half)
        zero_point = np.full(rows.shape[0], 2 ** (bits - 1), np.float32)
    else:
        scale = (hi - lo) / np.float32(qmax)
    scale = half_scales(np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32), up=True)
    if not symmetric:
        zero_point = np.clip(np.round(-lo / scale), 0, qmax)
    codes = np.clip(np.round(rows / scale[:, None]) + zero_point[:, None], 0, qmax)
    return _uniform(codes.reshape(weight.shape), scale, zero_point, bits, per_channel, mask)


def _uniform(
    codes: np.ndarray,
    scale: np.ndarray,
    zero_point: np.ndarray,
    bits: int,
    per_channel: bool,
    mask: np.ndarray | None,
) -> UniformTensor:
    """The lean UniformTensor of float ``codes`` (pruned positions stored as 0)."""
    qdata = codes.astype(np.uint8)
    if mask is not None:
        qdata[~mask] = 0
    return UniformTensor(
        qdata=qdata,
        scale=scale,
        zero_point=zero_point.astype(np.uint8),
        bits=bits,
        axis=0 if per_channel else None,
        mask=mask,
        lean=True,
    )


def _encode_codebook(weight: np.ndarray, coding: Coding, mask: np.ndarray | None) -> Tensor:
    tensor = codebook_quantize(weight, coding.bits, mask, coding.kmeans_iters, coding.zero_symbol)
    tensor.entropy = coding.entropy
    return tensor


ChannelQuantizer = Callable[
    [np.ndarray, int, np.ndarray | None, int, np.ndarray | None, bool],
    ScaledCodebookTensor | IntCodebookTensor | None,
]


def _encode_channel_codebook(quantize: ChannelQuantizer, versus_plain: bool) -> Encoder:
    """The encoder of a per-channel scaled codebook made by ``quantize``; a plain codebook
    instead when a scale does not fit float16, or (``versus_plain`` and ``auto``) when the
    plain one's error is smaller."""

    def encode(weight: np.ndarray, coding: Coding, mask: np.ndarray | None) -> Tensor:
        bits, iters, pin = coding.bits, coding.kmeans_iters, coding.zero_symbol
        fitted = quantize(weight, bits, mask, iters, None, pin)
        candidates: list[Tensor] = [] if fitted is None else [fitted]
        if fitted is None or (versus_plain and coding.codebook == "auto"):
            candidates.append(codebook_quantize(weight, bits, mask, iters, pin))
        tensor = min(candidates, key=lambda t: weighted_error(weight, t, None))
        tensor.entropy = coding.entropy  # type: ignore[union-attr]
        return tensor

    return encode


def step_bits(max_code: int) -> int:
    """The stored width of symmetric codes ``-max_code..max_code``."""
    return max(2, math.ceil(math.log2(2 * max_code + 1)))


def step_quantize(
    weight: np.ndarray, gain: np.ndarray | None, max_code: int, mask: np.ndarray | None = None
) -> UniformTensor:
    """Uniform symmetric codes with one step per tensor on the unfolded weights: ``scale[c] =
    step * |gain[c]|``, ``gain`` the output channel's folded BatchNorm gain (1 without one), and
    ``step`` such that the largest kept unfolded magnitude gets the code ``max_code``. Channels
    whose unfolded weights are small use few codes, which entropy coding stores in few bits, so
    neighbouring steps of STEP_CODES differ by about half a bit. Stored in ``step_bits`` bits
    with zero point ``2**(bits-1)``, scales rounded up to float16 values."""
    rows, keep = _channel_view(weight, mask, True)
    gains = np.ones(rows.shape[0], np.float32) if gain is None else np.abs(gain).astype(np.float32)
    gains = np.where(gains > 0, gains, np.float32(1.0))
    peak = float(np.where(keep, np.abs(rows) / gains[:, None], 0.0).max(initial=0.0))
    step = np.float32(peak / max_code if peak > 0 else 1.0)
    scale = half_scales((step * gains).astype(np.float32), up=True)
    bits = step_bits(max_code)
    zero = 2 ** (bits - 1)
    codes = np.clip(np.round(rows / scale[:, None]), -max_code, max_code) + zero
    zero_point = np.full(rows.shape[0], zero)
    return _uniform(codes.reshape(weight.shape), scale, zero_point, bits, True, mask)


def _encode_uniform(weight: np.ndarray, coding: Coding, mask: np.ndarray | None) -> Tensor:
    if coding.max_code is not None:
        tensor = step_quantize(weight, coding.gain, coding.max_code, mask)
    else:
        tensor = uniform_quantize(
            weight,
            coding.bits,
            symmetric=coding.symmetric,
            per_channel=coding.per_channel,
            mask=mask,
        )
    tensor.entropy = coding.entropy
    return tensor


def _encode_float(dtype: type) -> Encoder:
    def encode(weight: np.ndarray, _: Coding, mask: np.ndarray | None) -> Tensor:
        return DenseTensor(values=weight.astype(dtype), mask=mask)

    return encode


ENCODERS: dict[Encoding, Encoder] = {
    Encoding.F32: _encode_float(np.float32),
    Encoding.F16: _encode_float(np.float16),
    Encoding.CODEBOOK: _encode_codebook,
    Encoding.UNIFORM: _encode_uniform,
    Encoding.SCALED_CODEBOOK: _encode_channel_codebook(scaled_codebook_quantize, True),
    Encoding.INT_CODEBOOK: _encode_channel_codebook(int_codebook_quantize, False),
}


def quantize_weight(weight: np.ndarray, coding: Coding, mask: np.ndarray | None = None) -> Tensor:
    """Encode one weight array (zero where ``mask`` is False) as ``coding`` says. Under a mask,
    a codebook is fitted twice, as asked and with a centroid 0.0 added (``centroid_count``),
    and the fit whose ``smallest_layout`` has fewer bytes is kept (the first on a tie); the
    tensor keeps its mask (fine-tuning and corrections read it), the file stores its
    ``smallest_layout``."""
    tensor = ENCODERS[coding.encoding](weight, coding, mask)
    if (
        mask is None
        or coding.zero_symbol
        or not hasattr(tensor, "codebook")
        or zero_symbol_layout(tensor) is not None
    ):
        return tensor
    pinned = ENCODERS[coding.encoding](weight, replace(coding, zero_symbol=True), mask)
    return min((tensor, pinned), key=lambda t: section_bytes(smallest_layout(t)))


def zero_symbol_layout(tensor: Tensor) -> Tensor | None:
    """``tensor`` without its keep-mask, each pruned position storing the symbol that decodes
    to exactly 0.0 (uniform codes: the channel's zero point; codebooks: a centroid 0.0), so it
    decodes to the same values. None without a mask, or without such a symbol."""
    if tensor.mask is None:
        return None
    pruned = ~tensor.mask
    if not pruned.any():
        return replace(tensor, mask=None)
    if isinstance(tensor, UniformTensor):
        view = [1] * tensor.qdata.ndim
        if tensor.axis is not None:
            view[tensor.axis] = tensor.channels
        zero = tensor.zero_point.reshape(view)
        return replace(tensor, qdata=np.where(pruned, zero, tensor.qdata), mask=None)
    zeros = np.flatnonzero(getattr(tensor, "codebook", np.ones(1)) == 0)
    if not zeros.size or isinstance(tensor, DenseTensor):
        return None
    indices = np.where(pruned, zeros[0], tensor.indices).astype(np.uint8)
    return replace(tensor, indices=indices, mask=None)


def section_bytes(tensor: Tensor) -> int:
    """The bytes ``tensor``'s section holds in a file (index streams entropy-coded as its
    ``entropy`` says, mask included), alignment padding aside."""
    return len(encode_tensor("weight", tensor, 1)[1])


def smallest_layout(tensor: Tensor) -> Tensor:
    """``tensor`` or its ``zero_symbol_layout``, whichever section has fewer bytes (the mask
    on a tie): the layout a file stores a pruned weight in."""
    zeroed = zero_symbol_layout(tensor)
    if zeroed is None or section_bytes(zeroed) >= section_bytes(tensor):
        return tensor
    return zeroed
