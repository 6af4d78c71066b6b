"""Positions of the stored values of a pruned tensor: bitmap or CSR gaps (SPEC.md 3.5).

CSR entries are ``c``-bit numbers read in order with a cursor starting at 0. The filler
``F = 2**c - 1`` advances the cursor by ``F`` and stores nothing; any other entry ``e`` says the
next stored value is at ``cursor + e``, and the cursor moves just past it. The stream covers the
whole tensor: after the last entry, fewer than ``F`` positions remain.
"""

from dataclasses import dataclass

import numpy as np

from .bits import pack_bits, packed_size, unpack_bits
from .constants import MAX_CSR_BITS, MIN_CSR_BITS, Sparsity
from .errors import MbzFormatError


@dataclass(frozen=True)
class SparseEncoding:
    """The writer's choice for one mask: its kind, its part's bytes, and the CSR parameters."""

    sparsity: Sparsity
    data: bytes
    csr_bits: int | None = None
    csr_entries: int | None = None


def encode_mask(mask: np.ndarray) -> SparseEncoding:
    """Encode a flat bool mask as a bitmap or CSR, whichever is smaller (bitmap on a tie)."""
    flat = np.ascontiguousarray(mask, dtype=bool).ravel()
    positions = np.flatnonzero(flat)
    gaps, tail = _gaps(positions, flat.size)
    sizes = {c: packed_size(csr_entry_count(gaps, tail, c), c) for c in _csr_widths()}
    best = min(sizes, key=lambda c: (sizes[c], c))
    if packed_size(flat.size, 1) <= sizes[best]:
        return SparseEncoding(Sparsity.BITMAP, pack_bits(flat.view(np.uint8), 1))
    entries = _csr_entries(gaps, tail, best)
    return SparseEncoding(Sparsity.CSR, pack_bits(entries, best), best, entries.size)


def csr_entry_count(gaps: np.ndarray, tail: int, csr_bits: int) -> int:
    """Number of ``csr_bits``-bit entries that encode these gaps and trailing run."""
    filler = (1 << csr_bits) - 1
    return int(gaps.size + (gaps // filler).sum() + tail // filler)


def decode_bitmap(data: memoryview, count: int, nnz: int) -> np.ndarray:
    """The flat bool mask of a bitmap part; checks pad bits and that it has ``nnz`` ones."""
    mask = unpack_bits(data, count, 1).view(bool)
    kept = int(np.count_nonzero(mask))
    if kept != nnz:
        raise MbzFormatError(f"bitmap has {kept} set bits, descriptor says nnz {nnz}")
    return mask


def decode_csr(data: memoryview, count: int, nnz: int, csr_bits: int, entries: int) -> np.ndarray:
    """The flat bool mask of a CSR gap stream, checked to stay in range and cover the tensor."""
    stream = unpack_bits(data, entries, csr_bits)
    filler = (1 << csr_bits) - 1
    is_value = stream != filler
    values = int(np.count_nonzero(is_value))
    if values != nnz:
        raise MbzFormatError(f"CSR stream holds {values} values, descriptor says nnz {nnz}")
    ends = np.cumsum(np.where(is_value, stream.astype(np.int64) + 1, filler))
    cursor = int(ends[-1]) if ends.size else 0
    if cursor > count:
        raise MbzFormatError(f"CSR stream runs to position {cursor}, past the {count} elements")
    if count - cursor >= filler:
        raise MbzFormatError(
            f"CSR stream ends at position {cursor}: {count - cursor} trailing positions "
            f"need filler entries"
        )
    mask = np.zeros(count, bool)
    mask[ends[is_value] - 1] = True
    return mask


def _csr_widths() -> range:
    return range(MIN_CSR_BITS, MAX_CSR_BITS + 1)


def _gaps(positions: np.ndarray, count: int) -> tuple[np.ndarray, int]:
    """Zeros before each kept position (since the previous one), and zeros after the last."""
    previous = np.concatenate(([-1], positions[:-1])) if positions.size else positions
    gaps = (positions - previous - 1).astype(np.int64)
    tail = count - (int(positions[-1]) + 1 if positions.size else 0)
    return gaps, tail


def _csr_entries(gaps: np.ndarray, tail: int, csr_bits: int) -> np.ndarray:
    filler = (1 << csr_bits) - 1
    per_value = gaps // filler + 1
    entries = np.full(int(per_value.sum()) + tail // filler, filler, np.uint8)
    entries[np.cumsum(per_value) - 1] = gaps % filler
    return entries
