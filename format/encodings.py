"""The registry: one codec per encoding id, each an encoder and a numpy decoder (SPEC.md 3.3).

Encoders take a validated tensor and the flat keep-mask (None when not sparse) and return the
descriptor fields and the parts' bytes in file order. Decoders take a validated descriptor and the
parts' bytes and rebuild the tensor, checking every value against the descriptor.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from .bits import pack_bits, packed_size, unpack_bits
from .constants import (
    CODE_LENGTH_BITS_KEY,
    COMMON_ZERO_POINT_KEY,
    PART_CODE_LENGTHS,
    PART_CODEBOOK,
    PART_INDICES,
    PART_QDATA,
    PART_SCALE,
    PART_VALUES,
    PART_ZERO_POINT,
    SCALE_DTYPE_KEY,
    Encoding,
    Entropy,
)
from .descriptor import Descriptor
from .errors import MbzFormatError
from .huffman import check_lengths, code_lengths, huffman_decode, huffman_encode
from .tensors import (
    ChannelCodebookTensor,
    CodebookTensor,
    DenseTensor,
    IntCodebookTensor,
    ScaledCodebookTensor,
    Tensor,
    UniformTensor,
)

Parts = list[tuple[str, bytes]]
PartSizes = list[tuple[str, int | None]]  # None: a variable-length (Huffman) stream


@dataclass(frozen=True)
class DenseCodec:
    """f32 / f16: the kept values, little-endian IEEE 754."""

    encoding: Encoding
    dtype: str

    def encode(self, tensor: DenseTensor, keep: np.ndarray | None) -> tuple[dict, Parts]:
        """Descriptor fields and parts of a dense tensor."""
        kept = _kept(tensor.values, keep)
        return {}, [(PART_VALUES, kept.astype(self.dtype).tobytes())]

    def part_sizes(self, desc: Descriptor) -> PartSizes:
        """The parts a descriptor implies, with their exact lengths."""
        return [(PART_VALUES, desc.nnz * np.dtype(self.dtype).itemsize)]

    def decode(self, desc: Descriptor, parts: dict, keep: np.ndarray | None) -> DenseTensor:
        """Rebuild the tensor from its parts."""
        kept = np.frombuffer(parts[PART_VALUES], self.dtype).astype(self.dtype[1:])
        return DenseTensor(values=_scatter(kept, desc, keep), mask=_full_mask(desc, keep))


@dataclass(frozen=True)
class CodebookCodec:
    """codebook: k float32 centroids, then the index stream (fixed width or Huffman)."""

    encoding: Encoding = Encoding.CODEBOOK

    def encode(self, tensor: CodebookTensor, keep: np.ndarray | None) -> tuple[dict, Parts]:
        """Descriptor fields and parts of a codebook tensor."""
        coded, stream = encode_stream(
            _kept(tensor.indices, keep), tensor.bits, tensor.entropy, PART_INDICES, tensor.lean
        )
        parts = [(PART_CODEBOOK, tensor.codebook.astype("<f4").tobytes()), *stream]
        return {"bits": tensor.bits, "k": tensor.codebook.size, **coded}, parts

    def part_sizes(self, desc: Descriptor) -> PartSizes:
        """The parts a descriptor implies, with their exact lengths."""
        return [(PART_CODEBOOK, 4 * desc.need("k")), *stream_sizes(desc, PART_INDICES)]

    def decode(self, desc: Descriptor, parts: dict, keep: np.ndarray | None) -> CodebookTensor:
        """Rebuild the tensor from its parts."""
        codebook = np.frombuffer(parts[PART_CODEBOOK], "<f4").astype(np.float32)
        if not np.isfinite(codebook).all():
            raise MbzFormatError("codebook holds a NaN or infinity")
        indices = decode_stream(desc, parts, PART_INDICES, desc.need("k"))
        return CodebookTensor(
            codebook=codebook,
            indices=_scatter(indices, desc, keep),
            bits=desc.need("bits"),
            mask=_full_mask(desc, keep),
            entropy=desc.entropy,
            lean=bool(desc.lean_keys()),
        )


@dataclass(frozen=True)
class UniformCodec:
    """uniform: C scales (float32, or float16 when lean and exact), C uint8 zero points (or,
    when lean and all equal, one in the descriptor), then the code stream."""

    encoding: Encoding = Encoding.UNIFORM

    def encode(self, tensor: UniformTensor, keep: np.ndarray | None) -> tuple[dict, Parts]:
        """Descriptor fields and parts of a uniform tensor."""
        coded, stream = encode_stream(
            _kept(tensor.qdata, keep), tensor.bits, tensor.entropy, PART_QDATA, tensor.lean
        )
        fields: dict = {"bits": tensor.bits, "axis": tensor.axis, **coded}
        half = tensor.scale.astype("<f2")
        if tensor.lean and np.array_equal(half.astype(np.float32), tensor.scale):
            fields[SCALE_DTYPE_KEY], parts = "f16", [(PART_SCALE, half.tobytes())]
        else:
            parts = [(PART_SCALE, tensor.scale.astype("<f4").tobytes())]
        common = np.unique(tensor.zero_point)
        if tensor.lean and common.size == 1:
            fields[COMMON_ZERO_POINT_KEY] = int(common[0])
        else:
            parts.append((PART_ZERO_POINT, tensor.zero_point.tobytes()))
        return fields, [*parts, *stream]

    def part_sizes(self, desc: Descriptor) -> PartSizes:
        """The parts a descriptor implies, with their exact lengths."""
        channels = _channels(desc)
        scale = [(PART_SCALE, (2 if desc.scale_dtype else 4) * channels)]
        zero_point = [(PART_ZERO_POINT, channels)] if desc.common_zero_point is None else []
        return [*scale, *zero_point, *stream_sizes(desc, PART_QDATA)]

    def decode(self, desc: Descriptor, parts: dict, keep: np.ndarray | None) -> UniformTensor:
        """Rebuild the tensor from its parts."""
        dtype = "<f2" if desc.scale_dtype else "<f4"
        scale = np.frombuffer(parts[PART_SCALE], dtype).astype(np.float32)
        if not (np.isfinite(scale) & (scale > 0)).all():
            raise MbzFormatError("a scale is not finite and > 0")
        if desc.common_zero_point is None:
            zero_point = np.frombuffer(parts[PART_ZERO_POINT], np.uint8).copy()
        else:
            zero_point = np.full(_channels(desc), desc.common_zero_point, np.uint8)
        bits = desc.need("bits")
        if zero_point.max(initial=0) >= 2**bits:
            raise MbzFormatError(f"a zero point is >= 2**bits = {2**bits}")
        qdata = decode_stream(desc, parts, PART_QDATA, 2**bits)
        return UniformTensor(
            qdata=_scatter(qdata, desc, keep),
            scale=scale,
            zero_point=zero_point,
            bits=bits,
            axis=desc.axis,
            mask=_full_mask(desc, keep),
            entropy=desc.entropy,
            lean=bool(desc.lean_keys()),
        )


@dataclass(frozen=True)
class ChannelCodebookCodec:
    """scaled_codebook and int_codebook: C float16 scales, k centroids (``dtype``: float16 or
    int8), then the index stream."""

    encoding: Encoding
    dtype: str  # the centroids' little-endian numpy dtype
    tensor_type: type[ScaledCodebookTensor] | type[IntCodebookTensor]

    def encode(self, tensor: ChannelCodebookTensor, keep: np.ndarray | None) -> tuple[dict, Parts]:
        """Descriptor fields and parts of a per-channel scaled codebook tensor."""
        coded, stream = encode_stream(
            _kept(tensor.indices, keep), tensor.bits, tensor.entropy, PART_INDICES, tensor.lean
        )
        parts = [
            (PART_SCALE, tensor.scale.astype("<f2").tobytes()),
            (PART_CODEBOOK, tensor.codebook.astype(self.dtype).tobytes()),
            *stream,
        ]
        fields = {"bits": tensor.bits, "k": tensor.codebook.size, "axis": tensor.axis}
        return {**fields, **coded}, parts

    def part_sizes(self, desc: Descriptor) -> PartSizes:
        """The parts a descriptor implies, with their exact lengths."""
        return [
            (PART_SCALE, 2 * _channels(desc)),
            (PART_CODEBOOK, np.dtype(self.dtype).itemsize * desc.need("k")),
            *stream_sizes(desc, PART_INDICES),
        ]

    def decode(
        self, desc: Descriptor, parts: dict, keep: np.ndarray | None
    ) -> ScaledCodebookTensor | IntCodebookTensor:
        """Rebuild the tensor from its parts."""
        scale = np.frombuffer(parts[PART_SCALE], "<f2").astype(np.float16)
        if not (np.isfinite(scale) & (scale > 0)).all():
            raise MbzFormatError("a scale is not finite and > 0")
        codebook = np.frombuffer(parts[PART_CODEBOOK], self.dtype).astype(self.dtype[1:])
        if not np.isfinite(codebook).all():
            raise MbzFormatError("codebook holds a NaN or infinity")
        indices = decode_stream(desc, parts, PART_INDICES, desc.need("k"))
        return self.tensor_type(
            codebook=codebook,
            scale=scale,
            indices=_scatter(indices, desc, keep),
            bits=desc.need("bits"),
            axis=desc.axis if desc.axis is not None else 0,
            mask=_full_mask(desc, keep),
            entropy=desc.entropy,
            lean=bool(desc.lean_keys()),
        )


class Codec(Protocol):
    """What the registry holds. ``encode`` takes the tensor class of its encoding (the one
    ``encoding_of`` maps to it), a pairing the registry's key type cannot express: hence Any."""

    @property
    def encoding(self) -> Encoding: ...

    def encode(self, tensor: Any, keep: np.ndarray | None) -> tuple[dict, Parts]: ...

    def part_sizes(self, desc: Descriptor) -> PartSizes: ...

    def decode(self, desc: Descriptor, parts: dict, keep: np.ndarray | None) -> Tensor: ...


CODECS: dict[Encoding, Codec] = {
    Encoding.F32: DenseCodec(Encoding.F32, "<f4"),
    Encoding.F16: DenseCodec(Encoding.F16, "<f2"),
    Encoding.CODEBOOK: CodebookCodec(),
    Encoding.UNIFORM: UniformCodec(),
    Encoding.SCALED_CODEBOOK: ChannelCodebookCodec(
        Encoding.SCALED_CODEBOOK, "<f2", ScaledCodebookTensor
    ),
    Encoding.INT_CODEBOOK: ChannelCodebookCodec(Encoding.INT_CODEBOOK, "|i1", IntCodebookTensor),
}


def encoding_of(tensor: Tensor) -> Encoding:
    """The encoding id the writer uses for a (validated) tensor object."""
    if isinstance(tensor, CodebookTensor):
        return Encoding.CODEBOOK
    if isinstance(tensor, ScaledCodebookTensor):
        return Encoding.SCALED_CODEBOOK
    if isinstance(tensor, IntCodebookTensor):
        return Encoding.INT_CODEBOOK
    if isinstance(tensor, UniformTensor):
        return Encoding.UNIFORM
    return Encoding.F16 if tensor.values.dtype == np.float16 else Encoding.F32


def encode_stream(
    values: np.ndarray, bits: int, entropy: Entropy | None, part: str, lean: bool = False
) -> tuple[dict, Parts]:
    """An index stream as its descriptor fields and parts: fixed-width, Huffman, or (entropy
    None) whichever is smaller. ``lean``: the code lengths packed as narrow as they fit."""
    fixed = [(part, pack_bits(values, bits))]
    if entropy == Entropy.FIXED:
        return {"entropy": Entropy.FIXED}, fixed
    lengths = code_lengths(values, 2**bits)
    fields: dict = {"entropy": Entropy.HUFFMAN}
    table = lengths.tobytes()
    if lean:
        width = max(1, int(lengths.max(initial=0)).bit_length())
        fields[CODE_LENGTH_BITS_KEY], table = width, pack_bits(lengths, width)
    coded = [(PART_CODE_LENGTHS, table), (part, huffman_encode(values, lengths))]
    if entropy is None and _size(fixed) <= _size(coded):
        return {"entropy": Entropy.FIXED}, fixed
    return fields, coded


def stream_sizes(desc: Descriptor, part: str) -> PartSizes:
    """The parts of an index stream (a Huffman stream's length is variable)."""
    bits = desc.need("bits")
    if desc.entropy == Entropy.FIXED:
        return [(part, packed_size(desc.nnz, bits))]
    return [(PART_CODE_LENGTHS, packed_size(2**bits, desc.code_length_bits or 8)), (part, None)]


def decode_stream(desc: Descriptor, parts: dict, part: str, alphabet: int) -> np.ndarray:
    """The ``nnz`` stored symbols of an index stream, each checked to be < ``alphabet``."""
    if desc.entropy == Entropy.FIXED:
        values = unpack_bits(parts[part], desc.nnz, desc.need("bits"))
    else:
        width = desc.code_length_bits or 8
        lengths = unpack_bits(parts[PART_CODE_LENGTHS], 2 ** desc.need("bits"), width)
        check_lengths(lengths, desc.nnz, alphabet)
        values = huffman_decode(parts[part], lengths, desc.nnz)
    if values.max(initial=0) >= alphabet:
        raise MbzFormatError(f"part {part!r}: a value is >= {alphabet}")
    return values


def _size(parts: Parts) -> int:
    return sum(len(data) for _, data in parts)


def _channels(desc: Descriptor) -> int:
    return 1 if desc.axis is None else desc.shape[desc.axis]


def _kept(array: np.ndarray, keep: np.ndarray | None) -> np.ndarray:
    flat = np.ascontiguousarray(array).ravel()
    return flat if keep is None else flat[keep]


def _scatter(kept: np.ndarray, desc: Descriptor, keep: np.ndarray | None) -> np.ndarray:
    if keep is None:
        return kept.reshape(desc.shape)
    full = np.zeros(desc.count, kept.dtype)
    full[keep] = kept
    return full.reshape(desc.shape)


def _full_mask(desc: Descriptor, keep: np.ndarray | None) -> np.ndarray | None:
    return None if keep is None else keep.reshape(desc.shape)
