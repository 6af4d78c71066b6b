"""Writing and reading the whole container: header, section table, sections (SPEC.md section 1).

``encode_mbz`` / ``write_mbz`` turn metadata and tensor objects into bytes; ``decode_mbz`` /
``read_mbz`` check every number against the bytes present before using it and raise only
``MbzFormatError`` for bad content.
"""

from __future__ import annotations

import os
import struct
import tempfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .constants import (
    DEFAULT_ALIGNMENT,
    ENCODING_NAMES,
    ENCODING_SINCE_MINOR,
    HEADER_FORMAT,
    HEADER_SIZE,
    KIND_SINCE_MINOR,
    KNOWN_FLAGS,
    LEAN_SINCE_MINOR,
    MAGIC,
    MAX_ALIGNMENT,
    MAX_METADATA_BYTES,
    MAX_SECTIONS,
    METADATA_KINDS,
    METADATA_ZLIB_LEVEL,
    PART_GAPS,
    PART_MASK,
    SECTION_ENTRY_FORMAT,
    SECTION_ENTRY_SIZE,
    TABLE_CRC_HEADER_BYTES,
    VERSION_MAJOR,
    VERSION_MINOR,
    SectionKind,
    Sparsity,
)
from .descriptor import Descriptor, parse_descriptor
from .encodings import CODECS, encoding_of
from .errors import MbzFormatError
from .jsonio import canonical_json, parse_json
from .limits import DEFAULT_LIMITS, Limits, check_decoded_size
from .sparsity import decode_bitmap, decode_csr, encode_mask
from .tensors import Tensor

TENSORS_KEY = "tensors"


@dataclass(frozen=True)
class SectionInfo:
    """Where one section lies and what its bytes are spent on."""

    index: int
    kind: SectionKind
    name: str  # "metadata" or the tensor's name
    offset: int
    length: int
    alignment: int
    parts: tuple[tuple[str, int], ...]


@dataclass(frozen=True)
class Layout:
    """Byte accounting of a file: header + table + sections + alignment padding = file size."""

    header_bytes: int
    table_bytes: int
    padding_bytes: int
    sections: tuple[SectionInfo, ...]

    @property
    def total(self) -> int:
        """The file size these parts add up to."""
        return (
            self.header_bytes
            + self.table_bytes
            + self.padding_bytes
            + sum(s.length for s in self.sections)
        )


@dataclass
class MbzFile:
    """A decoded file: metadata (without the tensor table), tensors, descriptors, layout."""

    metadata: dict
    tensors: dict[str, Tensor]
    descriptors: dict[str, Descriptor]
    version: tuple[int, int]
    file_size: int
    layout: Layout
    extra: dict = field(default_factory=dict)


@dataclass(frozen=True)
class _Entry:
    kind: int
    alignment: int
    offset: int
    length: int
    crc32: int
    reserved: int


# ---------------------------------------------------------------------------------------- writer


def encode_mbz(
    metadata: dict,
    tensors: dict[str, Tensor],
    alignment: int = DEFAULT_ALIGNMENT,
    compress_metadata: bool = True,
) -> bytes:
    """The bytes of a .mbz file holding ``metadata`` and ``tensors`` (in the given order).

    ``metadata`` must be JSON-serialisable without NaN and must not have a "tensors" key (the
    writer adds the tensor table). With ``compress_metadata`` the JSON is stored as a zlib
    stream (section kind 3, file version 1.1); without, as plain JSON (kind 1, version 1.0).
    Raises ValueError/TypeError for what cannot be written.
    """
    if TENSORS_KEY in metadata:
        raise ValueError(f"metadata must not contain {TENSORS_KEY!r}: the writer adds it")
    if alignment < 1 or alignment > MAX_ALIGNMENT or alignment & (alignment - 1):
        raise ValueError(f"alignment must be a power of two in 1..{MAX_ALIGNMENT}")
    table, bodies, minor = {}, [], 0
    for index, (name, tensor) in enumerate(tensors.items(), start=1):
        descriptor, body = encode_tensor(name, tensor, index)
        table[name] = descriptor.to_json()
        bodies.append(body)
        minor = max(minor, _since_minor(descriptor))
    meta = canonical_json({**metadata, TENSORS_KEY: table})
    if len(meta) > MAX_METADATA_BYTES:
        raise ValueError(f"metadata is {len(meta)} bytes, above the {MAX_METADATA_BYTES} limit")
    kind = SectionKind.METADATA
    if compress_metadata:
        meta, kind = zlib.compress(meta, METADATA_ZLIB_LEVEL), SectionKind.METADATA_ZLIB
    kinds = [kind] + [SectionKind.TENSOR] * len(bodies)
    return assemble(kinds, [meta, *bodies], alignment, minor)


def _since_minor(desc: Descriptor) -> int:
    """The lowest minor version that defines a descriptor's encoding and keys."""
    lean = LEAN_SINCE_MINOR if desc.lean_keys() else 0
    return max(ENCODING_SINCE_MINOR[desc.encoding], lean)


def encode_tensor(name: str, tensor: Tensor, section: int) -> tuple[Descriptor, bytes]:
    """One tensor's descriptor and section bytes (parts back to back, SPEC.md section 3)."""
    tensor.validate()
    keep = None if tensor.mask is None else tensor.mask.ravel()
    encoding = encoding_of(tensor)
    fields_, parts = CODECS[encoding].encode(tensor, keep)
    sparse = None if keep is None else encode_mask(keep)
    if sparse is not None:
        parts.append((PART_MASK if sparse.sparsity == Sparsity.BITMAP else PART_GAPS, sparse.data))
    descriptor = Descriptor(
        name=name,
        section=section,
        shape=tensor.shape,
        encoding=encoding,
        sparsity=Sparsity.NONE if sparse is None else sparse.sparsity,
        nnz=int(np.prod(tensor.shape)) if keep is None else int(np.count_nonzero(keep)),
        parts=tuple((part, len(data)) for part, data in parts),
        csr_bits=None if sparse is None else sparse.csr_bits,
        csr_entries=None if sparse is None else sparse.csr_entries,
        **fields_,
    )
    return descriptor, b"".join(data for _, data in parts)


def assemble(
    kinds: list[SectionKind], bodies: list[bytes], alignment: int, minor: int = 0
) -> bytes:
    """A file from raw section bodies: header, table, aligned sections (used by tests, too).
    The header's minor version is the highest of ``minor`` (what the tensors' encodings need)
    and what the section kinds need."""
    if len(bodies) > MAX_SECTIONS:
        raise ValueError(f"{len(bodies)} sections exceed the limit {MAX_SECTIONS}")
    cursor = HEADER_SIZE + SECTION_ENTRY_SIZE * len(bodies)
    entries, chunks = [], []
    for kind, body in zip(kinds, bodies, strict=True):
        offset = -(-cursor // alignment) * alignment
        chunks += [bytes(offset - cursor), body]
        entries.append(
            struct.pack(
                SECTION_ENTRY_FORMAT, kind, alignment, offset, len(body), zlib.crc32(body), 0
            )
        )
        cursor = offset + len(body)
    table = b"".join(entries)
    minor = max(minor, *(KIND_SINCE_MINOR[SectionKind(kind)] for kind in kinds))
    head = struct.pack("<8sHHIQI", MAGIC, VERSION_MAJOR, minor, 0, cursor, len(bodies))
    crc = zlib.crc32(head + table)
    header = struct.pack(
        HEADER_FORMAT, MAGIC, VERSION_MAJOR, minor, 0, cursor, len(bodies), crc, bytes(32)
    )
    return header + table + b"".join(chunks)


def write_mbz(
    path: str | os.PathLike,
    metadata: dict,
    tensors: dict[str, Tensor],
    alignment: int = DEFAULT_ALIGNMENT,
    compress_metadata: bool = True,
) -> int:
    """Write the file atomically (temporary file in the same folder, fsync, rename).

    An interrupted write never leaves a partial file at ``path``. Returns the size in bytes.
    ``compress_metadata`` as in ``encode_mbz``.
    """
    data = encode_mbz(metadata, tensors, alignment, compress_metadata)
    target = Path(path)
    handle, temporary = tempfile.mkstemp(
        dir=target.parent, prefix=f".{target.name}.", suffix=".tmp"
    )
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _fsync_folder(target.parent)
    return len(data)


def _fsync_folder(folder: Path) -> None:
    """Make the rename durable where the platform allows opening a folder."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


# ---------------------------------------------------------------------------------------- reader


def read_mbz(path: str | os.PathLike, limits: Limits = DEFAULT_LIMITS) -> MbzFile:
    """Read and fully validate a .mbz file (OSError when it cannot be read at all); ``limits``
    as in ``decode_mbz``."""
    return decode_mbz(Path(path).read_bytes(), limits)


def decode_mbz(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> MbzFile:
    """Validate and decode the bytes of a .mbz file; raises only MbzFormatError for bad bytes.

    Before any tensor is decoded, their element counts are checked against ``limits`` (the
    total) and against the densest encoding (SPEC.md section 9)."""
    view = memoryview(data).cast("B")
    minor, entries = _read_header_and_table(view)
    _check_sections(view, entries, minor)
    if entries[0].kind not in METADATA_KINDS:
        raise MbzFormatError("section 0 must be the metadata (kind 1 or 3)")
    metadata = parse_json(_metadata_bytes(view, entries[0]))
    descriptors = _descriptors(metadata, entries, minor)
    check_decoded_size((d.count for d in descriptors.values()), len(view), limits)
    tensors = {name: _decode_tensor(view, entries[d.section], d) for name, d in descriptors.items()}
    layout = _layout(entries, descriptors)
    return MbzFile(metadata, tensors, descriptors, (VERSION_MAJOR, minor), len(view), layout)


def _read_header_and_table(view: memoryview) -> tuple[int, list[_Entry]]:
    if len(view) < HEADER_SIZE:
        raise MbzFormatError(
            f"file is {len(view)} bytes, shorter than the {HEADER_SIZE}-byte header"
        )
    magic, major, minor, flags, size, count, crc, reserved = struct.unpack_from(HEADER_FORMAT, view)
    if magic != MAGIC:
        raise MbzFormatError(f"bad magic {magic!r} at offset 0: not a .mbz file")
    if major != VERSION_MAJOR:
        raise MbzFormatError(
            f"major version {major} at offset 8; this reader knows {VERSION_MAJOR}"
        )
    if flags & ~KNOWN_FLAGS:
        raise MbzFormatError(f"unknown flag bits {flags:#x} at offset 12")
    if size != len(view):
        raise MbzFormatError(
            f"header (offset 16) says the file is {size} bytes but it has {len(view)}: "
            + ("truncated" if size > len(view) else "trailing bytes")
        )
    if any(reserved):
        raise MbzFormatError("reserved header bytes 32..63 are not zero")
    if not 1 <= count <= MAX_SECTIONS:
        raise MbzFormatError(f"section count {count} at offset 24 is not in 1..{MAX_SECTIONS}")
    table_end = HEADER_SIZE + SECTION_ENTRY_SIZE * count
    if table_end > len(view):
        raise MbzFormatError(f"section table of {count} entries runs past the end of the file")
    if zlib.crc32(view[HEADER_SIZE:table_end], zlib.crc32(view[:TABLE_CRC_HEADER_BYTES])) != crc:
        raise MbzFormatError("header/section table CRC-32 mismatch (offset 28)")
    entries = [
        _Entry(
            *struct.unpack_from(SECTION_ENTRY_FORMAT, view, HEADER_SIZE + SECTION_ENTRY_SIZE * i)
        )
        for i in range(count)
    ]
    return minor, entries


def _check_sections(view: memoryview, entries: list[_Entry], minor: int) -> None:
    """Kinds, alignment, ordering, padding, bounds and CRC of every section."""
    cursor = HEADER_SIZE + SECTION_ENTRY_SIZE * len(entries)
    for index, entry in enumerate(entries):
        where = (
            f"section {index} (table entry at offset {HEADER_SIZE + SECTION_ENTRY_SIZE * index})"
        )
        if entry.kind not in SectionKind.__members__.values():
            raise MbzFormatError(f"{where}: unknown kind {entry.kind}")
        if KIND_SINCE_MINOR[SectionKind(entry.kind)] > minor:
            raise MbzFormatError(f"{where}: kind {entry.kind} needs version 1.1 or newer")
        if entry.reserved:
            raise MbzFormatError(f"{where}: reserved field is not zero")
        alignment = entry.alignment
        if not 1 <= alignment <= MAX_ALIGNMENT or alignment & (alignment - 1):
            raise MbzFormatError(f"{where}: alignment {alignment} is not a power of two <= 4096")
        if entry.offset % alignment or not cursor <= entry.offset < cursor + alignment:
            raise MbzFormatError(
                f"{where}: offset {entry.offset} is not the first multiple of {alignment} "
                f"at or after byte {cursor}"
            )
        if entry.length > len(view) - entry.offset:
            raise MbzFormatError(
                f"{where}: {entry.length} bytes at {entry.offset} run past the end"
            )
        if any(view[cursor : entry.offset]):
            raise MbzFormatError(f"{where}: padding bytes {cursor}..{entry.offset} are not zero")
        if zlib.crc32(_body(view, entry)) != entry.crc32:
            raise MbzFormatError(f"{where}: CRC-32 mismatch over bytes at {entry.offset}")
        cursor = entry.offset + entry.length
    if cursor != len(view):
        raise MbzFormatError(f"the last section ends at {cursor}, not at the file end {len(view)}")


def _body(view: memoryview, entry: _Entry) -> memoryview:
    return view[entry.offset : entry.offset + entry.length]


def _metadata_bytes(view: memoryview, entry: _Entry) -> bytes | memoryview:
    """The metadata JSON, inflated (never past the size limit) when stored as zlib."""
    body = _body(view, entry)
    if entry.kind == SectionKind.METADATA:
        return body
    inflater = zlib.decompressobj()
    try:
        data = inflater.decompress(body, MAX_METADATA_BYTES + 1)
    except zlib.error as error:
        raise MbzFormatError(f"metadata section is not a valid zlib stream: {error}") from None
    if len(data) > MAX_METADATA_BYTES:
        raise MbzFormatError(f"metadata inflates past the {MAX_METADATA_BYTES}-byte limit")
    if not inflater.eof or inflater.unused_data:
        raise MbzFormatError("metadata zlib stream is truncated or followed by extra bytes")
    return data


def _descriptors(metadata: dict, entries: list[_Entry], minor: int) -> dict[str, Descriptor]:
    """Validate the tensor table: every tensor section referenced exactly once, encodings the
    file's version defines, parts that fit."""
    table = metadata.pop(TENSORS_KEY, None)
    if not isinstance(table, dict):
        raise MbzFormatError("metadata has no 'tensors' object")
    descriptors: dict[str, Descriptor] = {}
    owners: dict[int, str] = {}
    for name, obj in table.items():
        desc = parse_descriptor(name, obj, strict=minor <= VERSION_MINOR)
        if ENCODING_SINCE_MINOR[desc.encoding] > minor:
            raise MbzFormatError(
                f"tensor {name!r}: encoding {ENCODING_NAMES[desc.encoding]!r} needs version "
                f"1.{ENCODING_SINCE_MINOR[desc.encoding]} or newer, the file says 1.{minor}"
            )
        if desc.lean_keys() and LEAN_SINCE_MINOR > minor:
            raise MbzFormatError(
                f"tensor {name!r}: key(s) {list(desc.lean_keys())} need version "
                f"1.{LEAN_SINCE_MINOR} or newer, the file says 1.{minor}"
            )
        if desc.section >= len(entries) or entries[desc.section].kind != SectionKind.TENSOR:
            raise MbzFormatError(f"tensor {name!r}: section {desc.section} is not a tensor section")
        if desc.section in owners:
            raise MbzFormatError(
                f"tensors {owners[desc.section]!r} and {name!r} share section {desc.section}"
            )
        owners[desc.section] = name
        _check_parts(desc, entries[desc.section].length)
        descriptors[name] = desc
    orphans = [i for i, e in enumerate(entries) if e.kind == SectionKind.TENSOR and i not in owners]
    if orphans:
        raise MbzFormatError(f"tensor section(s) {orphans[:8]} are named by no tensor")
    if sum(e.kind in METADATA_KINDS for e in entries) != 1:
        raise MbzFormatError("a file has exactly one metadata section")
    return descriptors


def expected_parts(desc: Descriptor) -> list[tuple[str, int | None]]:
    """The parts a descriptor implies, in file order, with their lengths (None: variable)."""
    parts = CODECS[desc.encoding].part_sizes(desc)
    if desc.sparsity == Sparsity.BITMAP:
        parts.append((PART_MASK, (desc.count + 7) // 8))
    elif desc.sparsity == Sparsity.CSR:
        parts.append((PART_GAPS, (desc.need("csr_entries") * desc.need("csr_bits") + 7) // 8))
    return parts


def _check_parts(desc: Descriptor, section_length: int) -> None:
    where = f"tensor {desc.name!r}"
    expected = expected_parts(desc)
    names = [name for name, _ in expected]
    if [name for name, _ in desc.parts] != names:
        raise MbzFormatError(f"{where}: parts must be {names}, got {[n for n, _ in desc.parts]}")
    for (name, length), (_, want) in zip(desc.parts, expected, strict=True):
        if want is not None and length != want:
            raise MbzFormatError(f"{where}: part {name!r} is {length} bytes, expected {want}")
    if sum(length for _, length in desc.parts) != section_length:
        raise MbzFormatError(
            f"{where}: parts do not add up to the section's {section_length} bytes"
        )


def _decode_tensor(view: memoryview, entry: _Entry, desc: Descriptor) -> Tensor:
    parts, cursor = {}, entry.offset
    for name, length in desc.parts:
        parts[name] = view[cursor : cursor + length]
        cursor += length
    try:
        keep = _keep_mask(desc, parts)
        return CODECS[desc.encoding].decode(desc, parts, keep)
    except MbzFormatError as error:
        raise MbzFormatError(f"tensor {desc.name!r}: {error}") from None


def _keep_mask(desc: Descriptor, parts: dict) -> np.ndarray | None:
    if desc.sparsity == Sparsity.BITMAP:
        return decode_bitmap(parts[PART_MASK], desc.count, desc.nnz)
    if desc.sparsity == Sparsity.CSR:
        return decode_csr(
            parts[PART_GAPS], desc.count, desc.nnz, desc.need("csr_bits"), desc.need("csr_entries")
        )
    return None


def _layout(entries: list[_Entry], descriptors: dict[str, Descriptor]) -> Layout:
    by_section = {d.section: d for d in descriptors.values()}
    sections = tuple(
        SectionInfo(
            index=i,
            kind=SectionKind(e.kind),
            name=by_section[i].name if i in by_section else "metadata",
            offset=e.offset,
            length=e.length,
            alignment=e.alignment,
            parts=by_section[i].parts if i in by_section else (("json", e.length),),
        )
        for i, e in enumerate(entries)
    )
    table = SECTION_ENTRY_SIZE * len(entries)
    used = HEADER_SIZE + table + sum(e.length for e in entries)
    end = entries[-1].offset + entries[-1].length
    return Layout(HEADER_SIZE, table, end - used, sections)
