"""The torch side's encoders: a float weight (and an optional keep-mask from weight pruning)
becomes the container's tensor object of its encoding, so the bytes written are exactly what
the quantizer decided. ``ENCODERS`` has one per ``Encoding`` (see ``mbz.encodings``): floats,
per-layer codebooks fitted by k-means, and uniform integer codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from mbz.config import PackConfig
from mbz.encodings import weight_encoding
from mbz.format import CodebookTensor, DenseTensor, Encoding, Entropy, Tensor, UniformTensor


@dataclass(frozen=True)
class Coding:
    """How one weight is stored: its encoding and bits, and the encoders' options."""

    encoding: Encoding
    bits: int
    symmetric: bool = False  # uniform: codes symmetric around zero
    per_channel: bool = True  # uniform: one scale per output channel
    huffman: bool = False  # index streams Huffman-coded when that is smaller
    kmeans_iters: int = 30  # codebook: Lloyd iterations

    @classmethod
    def of(cls, config: PackConfig, bits: int) -> Coding:
        """The coding ``config`` gives a weight of ``bits`` bits."""
        return cls(
            weight_encoding(bits, config.method),
            bits,
            config.symmetric,
            config.per_channel,
            config.huffman,
            config.kmeans_iters,
        )

    @property
    def entropy(self) -> Entropy | None:
        """The index streams' entropy coding (None: the writer picks the smaller)."""
        return None if self.huffman else Entropy.FIXED


Encoder = Callable[[np.ndarray, Coding, np.ndarray | None], Tensor]


def kmeans_1d(values: np.ndarray, k: int, iters: int = 30) -> np.ndarray:
    """Lloyd's k-means on scalars with linear initialisation (Deep Compression).

    Works on the sorted values with prefix sums, so one iteration costs O(k log n).
    Returns sorted float32 centroids: ``k``, or fewer when there are fewer distinct values.
    """
    v = np.sort(values.astype(np.float64).ravel())
    distinct = np.unique(v)
    if distinct.size <= k:
        return distinct.astype(np.float32)
    prefix = np.concatenate([[0.0], np.cumsum(v)])
    centroids = np.linspace(v[0], v[-1], k)
    for _ in range(iters):
        bounds = np.searchsorted(v, (centroids[1:] + centroids[:-1]) / 2)
        edges = np.concatenate([[0], bounds, [v.size]])
        counts = np.diff(edges)
        sums = prefix[edges[1:]] - prefix[edges[:-1]]
        updated = np.where(counts > 0, sums / np.maximum(counts, 1), centroids)
        updated.sort()
        if np.array_equal(updated, centroids):
            break
        centroids = updated
    return centroids.astype(np.float32)


def nearest_index(values: np.ndarray, centroids: np.ndarray) -> np.ndarray:
    """Index of the nearest centroid (sorted centroids) for every value, as uint8."""
    mids = (centroids[1:].astype(np.float64) + centroids[:-1]) / 2
    return np.searchsorted(mids, values.astype(np.float64)).astype(np.uint8)


def codebook_quantize(
    weight: np.ndarray, bits: int, mask: np.ndarray | None = None, iters: int = 30
) -> CodebookTensor:
    """A per-layer k-means codebook of at most ``2**bits`` centroids over the kept weights."""
    kept = weight[mask] if mask is not None else weight
    source = kept if kept.size else np.zeros(1, np.float32)
    centroids = kmeans_1d(source, 2**bits, iters)
    indices = nearest_index(weight, centroids)
    if mask is not None:
        indices[~mask] = 0
    return CodebookTensor(codebook=centroids, indices=indices, bits=bits, mask=mask)


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
    ``zero_point = 2**(bits-1)``. Ranges are taken over kept weights only.
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
    scale = np.where(scale > 0, scale, np.float32(1.0)).astype(np.float32)
    if not symmetric:
        zero_point = np.clip(np.round(-lo / scale), 0, qmax)
    codes = np.clip(np.round(rows / scale[:, None]) + zero_point[:, None], 0, qmax)
    qdata = codes.astype(np.uint8).reshape(weight.shape)
    if mask is not None:
        qdata[~mask] = 0
    return UniformTensor(
        qdata=qdata,
        scale=scale,
        zero_point=zero_point.astype(np.uint8),
        bits=bits,
        axis=0 if per_channel else None,
        mask=mask,
    )


def _encode_codebook(weight: np.ndarray, coding: Coding, mask: np.ndarray | None) -> Tensor:
    tensor = codebook_quantize(weight, coding.bits, mask, coding.kmeans_iters)
    tensor.entropy = coding.entropy
    return tensor


def _encode_uniform(weight: np.ndarray, coding: Coding, mask: np.ndarray | None) -> Tensor:
    tensor = uniform_quantize(
        weight, coding.bits, symmetric=coding.symmetric, per_channel=coding.per_channel, mask=mask
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
}


def quantize_weight(weight: np.ndarray, coding: Coding, mask: np.ndarray | None = None) -> Tensor:
    """Encode one weight array (zero where ``mask`` is False) as ``coding`` says."""
    return ENCODERS[coding.encoding](weight, coding, mask)
