"""The tensor classes the writer takes and the reader returns (SPEC.md section 3).

``validate()`` raises ValueError/TypeError when a tensor cannot be written; ``decode()`` gives
the float32 array the file means, exactly 0.0 wherever the mask is False.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import numpy as np

from .constants import MAX_BITS, MAX_CODEBOOK, MIN_BITS, Entropy


@dataclass(eq=False)
class DenseTensor:
    """Plain floats: float32 values are stored as f32, float16 values as f16."""

    values: np.ndarray
    mask: np.ndarray | None = None

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's full shape."""
        return tuple(int(d) for d in self.values.shape)

    def validate(self) -> None:
        """Raise if this tensor cannot be written."""
        _check_array("values", self.values, (np.float32, np.float16))
        _check_mask(self.mask, self.shape)

    def decode(self) -> np.ndarray:
        """The float32 array (0.0 at pruned positions)."""
        return _apply_mask(self.values.astype(np.float32), self.mask)


@dataclass(eq=False)
class CodebookTensor:
    """Shared-weight (k-means) codes: ``decode() = codebook[indices]``."""

    codebook: np.ndarray
    indices: np.ndarray
    bits: int
    mask: np.ndarray | None = None
    entropy: Entropy | None = Entropy.FIXED
    lean: bool = False  # side information in its compact forms where exact (SPEC.md 3.1, 1.3)

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's full shape."""
        return tuple(int(d) for d in self.indices.shape)

    def validate(self) -> None:
        """Raise if this tensor cannot be written."""
        _check_indexed(self, np.float32)

    def decode(self) -> np.ndarray:
        """The float32 array (0.0 at pruned positions)."""
        safe = _kept_or_zero(self.indices, self.mask)
        return _apply_mask(self.codebook.astype(np.float32)[safe], self.mask)


@dataclass(eq=False)
class UniformTensor:
    """Integer codes with DequantizeLinear semantics: ``(float32(q) - zero_point) * scale``."""

    qdata: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray
    bits: int
    axis: int | None = None
    mask: np.ndarray | None = None
    entropy: Entropy | None = Entropy.FIXED
    lean: bool = False  # side information in its compact forms where exact (SPEC.md 3.1, 1.3)

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's full shape."""
        return tuple(int(d) for d in self.qdata.shape)

    @property
    def channels(self) -> int:
        """Number of (scale, zero_point) pairs: 1 per tensor, ``shape[axis]`` per channel."""
        return 1 if self.axis is None else self.shape[self.axis]

    def validate(self) -> None:
        """Raise if this tensor cannot be written."""
        _check_bits(self.bits)
        _check_entropy(self.entropy)
        _check_lean(self.lean)
        _check_array("qdata", self.qdata, (np.uint8,))
        _check_mask(self.mask, self.shape)
        if self.axis is not None:
            _check_axis(self.axis, self.qdata.ndim)
        _check_array("scale", self.scale, (np.float32,), shape=(self.channels,))
        _check_array("zero_point", self.zero_point, (np.uint8,), shape=(self.channels,))
        if not (np.isfinite(self.scale) & (self.scale > 0)).all():
            raise ValueError("every scale must be finite and > 0")
        limit = 2**self.bits
        if (
            self.zero_point.max(initial=0) >= limit
            or _kept(self.qdata, self.mask).max(initial=0) >= limit
        ):
            raise ValueError(f"a code or zero point is >= 2**bits = {limit}")

    def decode(self) -> np.ndarray:
        """The float32 array (0.0 at pruned positions), computed in float32."""
        view = [1] * self.qdata.ndim
        if self.axis is not None:
            view[self.axis] = self.channels
        scale = self.scale.astype(np.float32).reshape(view)
        zero_point = self.zero_point.astype(np.float32).reshape(view)
        values = (self.qdata.astype(np.float32) - zero_point) * scale
        return _apply_mask(values.astype(np.float32), self.mask)


@dataclass(eq=False)
class ChannelCodebookTensor:
    """What the scaled and the integer codebook share: one codebook for the layer and one
    float16 scale per channel, ``decode() = float32(scale[c]) * float32(codebook[indices])``,
    ``c`` the index along ``axis``. Subclasses fix the centroids' dtype."""

    codebook: np.ndarray
    scale: np.ndarray
    indices: np.ndarray
    bits: int
    axis: int = 0
    mask: np.ndarray | None = None
    entropy: Entropy | None = Entropy.FIXED
    lean: bool = False  # side information in its compact forms where exact (SPEC.md 3.1, 1.3)
    codebook_dtype: ClassVar[type] = np.float16

    @property
    def shape(self) -> tuple[int, ...]:
        """The tensor's full shape."""
        return tuple(int(d) for d in self.indices.shape)

    def validate(self) -> None:
        """Raise if this tensor cannot be written."""
        _check_indexed(self, self.codebook_dtype)
        _check_axis(self.axis, self.indices.ndim)
        _check_array("scale", self.scale, (np.float16,), shape=(self.shape[self.axis],))
        if not (np.isfinite(self.scale) & (self.scale > 0)).all():
            raise ValueError("every scale must be finite and > 0")

    def decode(self) -> np.ndarray:
        """The float32 array (0.0 at pruned positions): ``float32(scale) * float32(centroid)``."""
        view = [1] * self.indices.ndim
        view[self.axis] = self.scale.size
        centroids = self.codebook.astype(np.float32)[_kept_or_zero(self.indices, self.mask)]
        values = self.scale.astype(np.float32).reshape(view) * centroids
        return _apply_mask(values.astype(np.float32), self.mask)


class ScaledCodebookTensor(ChannelCodebookTensor):
    """One codebook for the layer, scaled per channel: ``decode() = scale[c] * codebook[indices]``
    computed in float32 from the float16 ``scale`` and ``codebook`` (SPEC.md 3.6). It keeps a
    shared codebook useful after BatchNorm folding has given every output channel its own
    range."""

    codebook_dtype = np.float16


class IntCodebookTensor(ChannelCodebookTensor):
    """A scaled codebook of int8 centroids (SPEC.md 3.7): ``decode() = float32(scale[c]) *
    float32(codebook[indices])``, so each weight is an integer times its channel's float16
    scale, which lets a runtime accumulate a layer over quantized activations exactly."""

    codebook_dtype = np.int8


Tensor = DenseTensor | CodebookTensor | UniformTensor | ScaledCodebookTensor | IntCodebookTensor


def _apply_mask(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    if mask is not None:
        values = np.where(mask, values, np.float32(0.0)).astype(np.float32)
    return values


def _kept(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return values if mask is None else values[mask]


def _kept_or_zero(values: np.ndarray, mask: np.ndarray | None) -> np.ndarray:
    return values if mask is None else np.where(mask, values, 0)


def _check_bits(bits: int) -> None:
    if not isinstance(bits, int) or isinstance(bits, bool) or not MIN_BITS <= bits <= MAX_BITS:
        raise ValueError(f"bits must be an int in {MIN_BITS}..{MAX_BITS}, got {bits!r}")


def _check_entropy(entropy: Entropy | None) -> None:
    if entropy is not None and not isinstance(entropy, Entropy):
        raise TypeError(f"entropy must be an Entropy or None, got {entropy!r}")


def _check_lean(lean: object) -> None:
    if not isinstance(lean, bool):
        raise TypeError(f"lean must be a bool, got {lean!r}")


def _check_array(
    name: str, array: object, dtypes: tuple, ndim: int | None = None, shape: tuple | None = None
) -> None:
    if not isinstance(array, np.ndarray):
        raise TypeError(f"{name} must be a numpy array, got {type(array).__name__}")
    if array.dtype not in [np.dtype(d) for d in dtypes]:
        names = ", ".join(np.dtype(d).name for d in dtypes)
        raise TypeError(f"{name} must have dtype {names}, got {array.dtype}")
    if ndim is not None and array.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimension(s), got shape {array.shape}")
    if shape is not None and array.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {array.shape}")


def _check_axis(axis: object, ndim: int) -> None:
    if not (isinstance(axis, int) and not isinstance(axis, bool) and 0 <= axis < ndim):
        raise ValueError(f"axis {axis!r} is not an int in [0, {ndim})")


def _check_indexed(tensor: CodebookTensor | ChannelCodebookTensor, dtype: type) -> None:
    """The checks every codebook tensor shares: bits, entropy, ``dtype`` centroids, indices."""
    _check_bits(tensor.bits)
    _check_entropy(tensor.entropy)
    _check_lean(tensor.lean)
    _check_array("codebook", tensor.codebook, (dtype,), ndim=1)
    _check_array("indices", tensor.indices, (np.uint8,))
    _check_mask(tensor.mask, tensor.shape)
    _check_centroids(tensor.codebook, tensor.bits, _kept(tensor.indices, tensor.mask))


def _check_centroids(codebook: np.ndarray, bits: int, indices: np.ndarray) -> None:
    k = codebook.size
    if not 1 <= k <= min(MAX_CODEBOOK, 2**bits):
        raise ValueError(f"codebook has {k} entries; needs 1..{min(MAX_CODEBOOK, 2**bits)}")
    if not np.isfinite(codebook).all():
        raise ValueError("codebook entries must be finite")
    if indices.max(initial=0) >= k:
        raise ValueError(f"an index is >= k = {k}")


def _check_mask(mask: np.ndarray | None, shape: tuple[int, ...]) -> None:
    if mask is not None:
        _check_array("mask", mask, (np.bool_,), shape=shape)
