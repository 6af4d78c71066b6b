"""Canonical Huffman coding of an index stream (SPEC.md section 3.6).

Codes are assigned from the code lengths alone, as in DEFLATE: symbols sorted by
(length, symbol) get consecutive code values; each code is written most significant bit
first into the LSB-first bit stream.
"""

import heapq
import itertools

import numpy as np
from bitarray import bitarray
from bitarray.util import canonical_decode

from .constants import MAX_HUFFMAN_CODE_LENGTH
from .errors import MbzFormatError


def code_lengths(values: np.ndarray, alphabet: int) -> np.ndarray:
    """Huffman code lengths (uint8, one per symbol, 0 = absent), at most MAX_HUFFMAN_CODE_LENGTH.

    Ties are broken by symbol, so the lengths are deterministic. When the optimal code is too
    long, counts are halved (rounding up to 1) until it fits.
    """
    counts = np.bincount(values, minlength=alphabet).astype(np.int64)
    lengths = _huffman_lengths(counts)
    while lengths.max(initial=0) > MAX_HUFFMAN_CODE_LENGTH:
        counts = np.where(counts > 0, np.maximum(counts >> 1, 1), 0)
        lengths = _huffman_lengths(counts)
    return lengths


def canonical_codes(lengths: np.ndarray) -> np.ndarray:
    """The canonical code value of every symbol (0 where absent), DEFLATE's algorithm."""
    per_length = np.bincount(lengths, minlength=MAX_HUFFMAN_CODE_LENGTH + 1)
    per_length[0] = 0
    next_code = [0] * (MAX_HUFFMAN_CODE_LENGTH + 2)
    code = 0
    for length in range(1, MAX_HUFFMAN_CODE_LENGTH + 1):
        code = (code + int(per_length[length - 1])) << 1
        next_code[length] = code
    codes = np.zeros(lengths.size, np.int64)
    for symbol, length in enumerate(lengths.tolist()):
        if length:
            codes[symbol] = next_code[length]
            next_code[length] += 1
    return codes


def huffman_encode(values: np.ndarray, lengths: np.ndarray) -> bytes:
    """The bit stream of ``values`` under the canonical code of ``lengths``, zero padded."""
    sizes = lengths[values].astype(np.int64)
    codes = canonical_codes(lengths)[values]
    starts = np.cumsum(sizes) - sizes
    stream = np.zeros(int(sizes.sum()), np.uint8)
    for bit in range(int(sizes.max(initial=0))):
        has = sizes > bit
        shift = sizes[has] - 1 - bit
        stream[starts[has] + bit] = (codes[has] >> shift) & 1
    return np.packbits(stream, bitorder="little").tobytes()


def check_lengths(lengths: np.ndarray, count: int, alphabet: int) -> None:
    """Validate stored code lengths: bound, symbols beyond ``alphabet`` absent, Kraft sum <= 1."""
    if int(lengths.max(initial=0)) > MAX_HUFFMAN_CODE_LENGTH:
        raise MbzFormatError(f"code length above {MAX_HUFFMAN_CODE_LENGTH}")
    if lengths[alphabet:].any():
        raise MbzFormatError(f"code length given for a symbol >= {alphabet}")
    present = lengths[lengths > 0].astype(np.int64)
    if int((1 << (MAX_HUFFMAN_CODE_LENGTH - present)).sum()) > 1 << MAX_HUFFMAN_CODE_LENGTH:
        raise MbzFormatError("code lengths are over-subscribed (Kraft sum > 1)")
    if count and not present.size:
        raise MbzFormatError(f"{count} symbols to decode but no code lengths")


def huffman_decode(data: memoryview, lengths: np.ndarray, count: int) -> np.ndarray:
    """Decode exactly ``count`` symbols; only fewer than 8 zero pad bits may follow."""
    if count == 0:
        if len(data):
            raise MbzFormatError(f"{len(data)} stream bytes for 0 symbols")
        return np.zeros(0, np.uint8)
    present = lengths[lengths > 0]
    available = 8 * len(data)
    if count * int(present.min()) > available or available >= count * int(present.max()) + 8:
        raise MbzFormatError(f"{len(data)} stream bytes cannot hold exactly {count} symbols")
    stream = bitarray(endian="little")
    stream.frombytes(bytes(data))
    values = _canonical_decode(stream, lengths, count)
    used = int(lengths[values].sum(dtype=np.int64))
    if available - used >= 8:
        raise MbzFormatError(f"{available - used} unused bits after {count} symbols")
    if stream[used:].any():
        raise MbzFormatError(f"non-zero pad bits after stream bit {used}")
    return values


def _canonical_decode(stream: bitarray, lengths: np.ndarray, count: int) -> np.ndarray:
    per_length = np.bincount(lengths, minlength=2)[: int(lengths.max()) + 1].tolist()
    per_length[0] = 0
    symbols = np.lexsort((np.arange(lengths.size), lengths))
    symbols = symbols[lengths[symbols] > 0].tolist()
    decoded = canonical_decode(stream, per_length, symbols)
    try:
        return np.fromiter(itertools.islice(decoded, count), np.uint8, count=count)
    except ValueError as error:
        raise MbzFormatError(f"invalid Huffman stream ({error})") from None


def _huffman_lengths(counts: np.ndarray) -> np.ndarray:
    """Optimal code lengths by the Huffman algorithm; one present symbol gets length 1."""
    lengths = np.zeros(counts.size, np.uint8)
    heap = [(int(c), s, [s]) for s, c in enumerate(counts.tolist()) if c > 0]
    if len(heap) == 1:
        lengths[heap[0][1]] = 1
        return lengths
    heapq.heapify(heap)
    order = counts.size
    while len(heap) > 1:
        weight_a, _, symbols_a = heapq.heappop(heap)
        weight_b, _, symbols_b = heapq.heappop(heap)
        merged = symbols_a + symbols_b
        lengths[merged] += 1
        heapq.heappush(heap, (weight_a + weight_b, order, merged))
        order += 1
    return lengths
