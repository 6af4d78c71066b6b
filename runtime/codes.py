"""Quantized activations held as integer codes, and the buffer pool every kernel draws from.

A quantized value (SPEC.md section 7) is held as its codes (``Codes``: ``encode`` and
``decode``), bit-packed when they have 4 bits or fewer, so that it takes 1/4 to 1/32 of its
float32 bytes; ``encode_range`` and ``decode_range`` work on a block of codes at a time, for the
kernels that read and write codes in cache (``kernels``). ``BufferPool`` recycles arrays across
the batches of a run: reusing memory avoids the page faults of fresh allocations, which
otherwise cost as much as the arithmetic.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

F32 = np.float32
U8 = np.uint8
CODE_WIDTHS = (1, 2, 4, 8)  # bits per stored code: the narrowest of these that holds the bits
Shape = tuple[int, ...]


class BufferPool:
    """Arrays recycled by exact shape and dtype (one pool per run; not thread-safe)."""

    def __init__(self) -> None:
        """An empty pool."""
        self._free: dict[tuple[Shape, np.dtype], list[np.ndarray]] = {}

    def take(self, shape: Shape, dtype: type = F32) -> np.ndarray:
        """An uninitialised C-contiguous array of ``shape`` (float32 unless ``dtype``)."""
        stack = self._free.get((tuple(shape), np.dtype(dtype)))
        return stack.pop() if stack else np.empty(shape, dtype=dtype)

    def give(self, array: np.ndarray) -> None:
        """Hand back an array from ``take`` that nothing reads any more."""
        self._free.setdefault((array.shape, array.dtype), []).append(array)


def take(pool: BufferPool | None, shape: Shape, dtype: type = F32) -> np.ndarray:
    """An array of ``shape`` from ``pool``, or a fresh one without a pool."""
    return np.empty(shape, dtype=dtype) if pool is None else pool.take(shape, dtype)


def give(pool: BufferPool | None, array: np.ndarray) -> None:
    """Hand ``array`` back to ``pool`` (nothing without a pool)."""
    if pool is not None:
        pool.give(array)


def quantize(
    x: np.ndarray,
    bits: int,
    scale: float,
    zero_point: int,
    out: np.ndarray | None = None,
    pool: BufferPool | None = None,
) -> np.ndarray:
    """Fake quantization exactly as ``torch.fake_quantize_per_tensor_affine(x, scale,
    zero_point, 0, 2**bits - 1)``, in float32 with round-half-even (SPEC.md section 7): the
    decoded ``encode`` of ``x``."""
    codes = encode(x, bits, scale, zero_point, pool)
    result = decode(codes, pool, out)
    give(pool, codes.data)
    return result


@dataclass(frozen=True)
class Codes:
    """A quantized activation held as its integer codes ``q`` (the value is
    ``(q - zero_point) * scale``).

    ``data`` stores the ``prod(shape)`` codes (C order) in ``width``-bit slots, planar: with
    ``per = 8 // width`` codes per byte and ``m = ceil(count / per)`` bytes, code ``i * m + j``
    sits at bit ``i * width`` of byte ``j``, so packing and unpacking are whole-array shifts."""

    data: np.ndarray
    shape: Shape
    bits: int
    scale: float
    zero_point: int

    @property
    def width(self) -> int:
        """Bits per stored code."""
        return code_width(self.bits)


def integers(codes: Codes) -> Codes:
    """The same codes read as their integers ``q - zero_point`` (scale 1): what exact layers and
    pooling of codes decode (SPEC.md section 7.3)."""
    return replace(codes, scale=1.0)


def code_width(bits: int) -> int:
    """The slot width that holds ``bits``-bit codes: 1, 2, 4 or 8."""
    return next(width for width in CODE_WIDTHS if width >= bits)


def _planes(count: int, width: int) -> tuple[int, int]:
    """(codes per byte, bytes) of ``count`` codes in ``width``-bit slots."""
    per = 8 // width
    return per, -(-count // per)


def new_codes(
    shape: Shape, bits: int, scale: float, zero_point: int, pool: BufferPool | None = None
) -> Codes:
    """Codes of ``shape`` to be filled by ``encode_range`` (packed slots start at zero)."""
    per, size = _planes(math.prod(shape), code_width(bits))
    data = take(pool, (size,), U8)
    if per > 1:
        data.fill(0)
    return Codes(data, tuple(shape), bits, scale, zero_point)


def encode(
    x: np.ndarray,
    bits: int,
    scale: float,
    zero_point: int,
    pool: BufferPool | None = None,
    overwrite: bool = False,
) -> Codes:
    """The codes ``clamp(round_half_even(x * float32(1 / scale)) + zero_point, 0, 2**bits - 1)``
    of a float32 array (SPEC.md section 7); ``overwrite`` lets it use ``x`` as scratch space."""
    codes = new_codes(x.shape, bits, scale, zero_point, pool)
    encode_range(x.reshape(-1), codes, 0, pool, overwrite)
    return codes


def encode_range(
    values: np.ndarray,
    codes: Codes,
    start: int,
    pool: BufferPool | None = None,
    overwrite: bool = True,
) -> None:
    """Encode the flat float32 ``values`` as codes ``start`` onwards of ``codes``, using
    ``values`` as scratch space when ``overwrite``.

    Clamping to ``[-zero_point, 2**bits - 1 - zero_point]`` before rounding equals clamping
    after it (the bounds are integers), and leaves the zero point to add only when not 0.
    Every pass stays within one dtype but the last: numpy's casting loops are buffered and
    several times slower."""
    q = values if overwrite else take(pool, values.shape)
    zero, top = F32(codes.zero_point), F32(2**codes.bits - 1)
    np.multiply(values, F32(1) / F32(codes.scale), out=q)
    np.clip(q, -zero, top - zero, out=q)
    np.rint(q, out=q)
    if zero:
        q += zero
    stop, width = start + q.size, codes.width
    per, size = _planes(math.prod(codes.shape), width)
    if per == 1:
        np.copyto(codes.data[start:stop], q, casting="unsafe")
    elif stop > start:
        part = take(pool, q.shape, U8)
        np.copyto(part, q, casting="unsafe")
        for i, lo, hi in _plane_spans(start, stop, size):
            piece = part[lo - start : hi - start]
            np.left_shift(piece, i * width, out=piece)
            target = codes.data[lo - i * size : hi - i * size]
            np.bitwise_or(target, piece, out=target)
        give(pool, part)
    if not overwrite:
        give(pool, q)


def _plane_spans(start: int, stop: int, size: int) -> Iterator[tuple[int, int, int]]:
    """(plane, first code, end code) of each plane of ``size`` codes that [start, stop) meets."""
    for i in range(start // size, (stop - 1) // size + 1):
        yield i, max(start, i * size), min(stop, (i + 1) * size)


def decode(
    codes: Codes, pool: BufferPool | None = None, out: np.ndarray | None = None
) -> np.ndarray:
    """The float32 values ``(float32(q) - zero_point) * float32(scale)`` of ``codes`` (into
    ``out``, C-contiguous, when given), exactly the fake-quantized values they came from."""
    out = take(pool, codes.shape) if out is None else out
    if not out.flags.c_contiguous:
        raise ValueError("decode needs a C-contiguous output array")
    flat = out.reshape(-1)
    decode_range(codes, 0, flat.size, flat, pool)
    return out


def decode_range(
    codes: Codes, start: int, stop: int, out: np.ndarray, pool: BufferPool | None = None
) -> np.ndarray:
    """Decode codes ``start`` to ``stop`` (C order) into the flat float32 ``out`` (no multiply
    when the scale is 1: ``x * 1`` is ``x``)."""
    width, zero = codes.width, F32(codes.zero_point)
    per, size = _planes(math.prod(codes.shape), width)
    if per == 1:
        np.copyto(out, codes.data[start:stop])
    elif stop > start:
        part, mask = take(pool, (stop - start,), U8), U8(2**width - 1)
        for i, lo, hi in _plane_spans(start, stop, size):
            piece = part[: hi - lo]
            np.right_shift(codes.data[lo - i * size : hi - i * size], i * width, out=piece)
            np.bitwise_and(piece, mask, out=piece)
            np.copyto(out[lo - start : hi - start], piece)
        give(pool, part)
    if zero:
        out -= zero
    if codes.scale != 1:
        out *= F32(codes.scale)
    return out


def as_float(x: np.ndarray | Codes, pool: BufferPool | None = None) -> np.ndarray:
    """An activation as float32: codes decoded (into an array from ``pool``), arrays as they
    are."""
    return decode(x, pool) if isinstance(x, Codes) else x
