"""LSB-first bit packing of small unsigned integers (SPEC.md section 3.4), vectorised numpy.

Value ``i`` of a ``b``-bit stream occupies stream bits ``[i*b, (i+1)*b)``, value bits LSB first;
stream bit ``j`` is bit ``j % 8`` of byte ``j // 8``. Pad bits in the last byte are zero.
"""

import numpy as np

from .errors import MbzFormatError


def packed_size(count: int, bits: int) -> int:
    """Bytes taken by ``count`` values of ``bits`` bits."""
    return (count * bits + 7) // 8


def pack_bits(values: np.ndarray, bits: int) -> bytes:
    """Pack uint8 ``values`` (each < 2**bits) into ``packed_size(len(values), bits)`` bytes."""
    v = np.ascontiguousarray(values, dtype=np.uint8).ravel()
    if bits == 8:
        return v.tobytes()
    if bits == 1:
        return np.packbits(v, bitorder="little").tobytes()
    if bits == 4:
        even = np.zeros(v.size + v.size % 2, np.uint8)
        even[: v.size] = v
        return (even[0::2] | (even[1::2] << 4)).tobytes()
    planes = np.unpackbits(v[:, None], axis=1, bitorder="little")[:, :bits]
    return np.packbits(planes.ravel(), bitorder="little").tobytes()


def unpack_bits(data: bytes | memoryview, count: int, bits: int) -> np.ndarray:
    """Unpack ``count`` values of ``bits`` bits; raise MbzFormatError on bad size or pad bits."""
    raw = np.frombuffer(data, np.uint8)
    if raw.size != packed_size(count, bits):
        raise MbzFormatError(f"{raw.size} bytes cannot hold exactly {count} values of {bits} bits")
    if bits == 8:
        return raw.copy()
    if bits == 4:
        values = np.empty(raw.size * 2, np.uint8)
        values[0::2] = raw & 0x0F
        values[1::2] = raw >> 4
        return _strip_pad(values, count, count * bits)
    stream = np.unpackbits(raw, bitorder="little")
    stream = _strip_pad(stream, count * bits, count * bits)
    if bits == 1:
        return stream
    return np.packbits(stream.reshape(count, bits), axis=1, bitorder="little").ravel()


def _strip_pad(values: np.ndarray, keep: int, used_bits: int) -> np.ndarray:
    if values[keep:].any():
        raise MbzFormatError(f"non-zero pad bits after the first {used_bits} stream bits")
    return values[:keep]
