"""The tensor descriptor: one entry of the metadata's "tensors" table (SPEC.md section 3.1)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from .checks import is_utf8
from .constants import (
    CODE_LENGTH_BITS_KEY,
    COMMON_ZERO_POINT_KEY,
    CSR_KEYS,
    DESCRIPTOR_KEYS,
    ENCODING_KEYS,
    ENCODING_NAMES,
    ENTROPY_NAMES,
    LEAN_KEYS,
    MAX_BITS,
    MAX_CODE_LENGTH_BITS,
    MAX_CODEBOOK,
    MAX_CSR_BITS,
    MAX_DECLARED_INT,
    MAX_ELEMENTS,
    MAX_NAME_BYTES,
    MAX_RANK,
    MIN_BITS,
    MIN_CSR_BITS,
    SCALE_DTYPE_KEY,
    SPARSITY_NAMES,
    Encoding,
    Entropy,
    Sparsity,
)
from .errors import MbzFormatError

CHANNEL_CODEBOOKS = (Encoding.SCALED_CODEBOOK, Encoding.INT_CODEBOOK)  # axis: an integer
_ENCODINGS = {v: k for k, v in ENCODING_NAMES.items()}
_SPARSITIES = {v: k for k, v in SPARSITY_NAMES.items()}
_ENTROPIES = {v: k for k, v in ENTROPY_NAMES.items()}


@dataclass(frozen=True)
class Descriptor:
    """Everything the metadata says about one tensor, validated and typed."""

    name: str
    section: int
    shape: tuple[int, ...]
    encoding: Encoding
    sparsity: Sparsity
    nnz: int
    parts: tuple[tuple[str, int], ...]
    bits: int | None = None
    k: int | None = None
    axis: int | None = None
    entropy: Entropy | None = None
    csr_bits: int | None = None
    csr_entries: int | None = None
    scale_dtype: str | None = None  # since 1.3, uniform: "f16" (binary16 scales), None: f32
    common_zero_point: int | None = None  # since 1.3, uniform: every channel's zero point
    code_length_bits: int | None = None  # since 1.3, Huffman: packed width of the code lengths

    @property
    def count(self) -> int:
        """Number of elements of the full tensor."""
        return math.prod(self.shape)

    def need(self, key: Literal["bits", "k", "csr_bits", "csr_entries"]) -> int:
        """A field that the descriptor's encoding or sparsity has (parse_descriptor checked it)."""
        value = getattr(self, key)
        if value is None:
            raise MbzFormatError(f"tensor {self.name!r}: descriptor has no {key!r}")
        return value

    def keys(self) -> tuple[str, ...]:
        """The exact set of JSON keys this descriptor has."""
        csr = CSR_KEYS if self.sparsity == Sparsity.CSR else ()
        keys = DESCRIPTOR_KEYS + ENCODING_KEYS[self.encoding] + csr + self.lean_keys()
        return tuple(sorted(keys))

    def lean_keys(self) -> tuple[str, ...]:
        """The optional keys of lean side information (since 1.3) this descriptor has."""
        return tuple(key for key in LEAN_KEYS[self.encoding] if getattr(self, key) is not None)

    def to_json(self) -> dict:
        """The JSON object written into metadata["tensors"][name]."""
        full = {
            "section": self.section,
            "shape": list(self.shape),
            "encoding": ENCODING_NAMES[self.encoding],
            "sparsity": SPARSITY_NAMES[self.sparsity],
            "nnz": self.nnz,
            "parts": [[name, length] for name, length in self.parts],
            "bits": self.bits,
            "k": self.k,
            "axis": self.axis,
            "entropy": None if self.entropy is None else ENTROPY_NAMES[self.entropy],
            "csr_bits": self.csr_bits,
            "csr_entries": self.csr_entries,
            SCALE_DTYPE_KEY: self.scale_dtype,
            COMMON_ZERO_POINT_KEY: self.common_zero_point,
            CODE_LENGTH_BITS_KEY: self.code_length_bits,
        }
        return {key: full[key] for key in self.keys()}


def parse_descriptor(name: str, obj: object, strict: bool) -> Descriptor:
    """Validate one JSON descriptor; ``strict`` (file minor <= ours) also rejects unknown keys."""
    where = f"tensor {name!r}"
    if not name or not is_utf8(name) or len(name.encode("utf-8")) > MAX_NAME_BYTES:
        raise MbzFormatError(
            f"{where}: name is empty, not UTF-8 or longer than {MAX_NAME_BYTES} bytes"
        )
    if not isinstance(obj, dict):
        raise MbzFormatError(f"{where}: descriptor is not a JSON object")
    encoding = _enum(obj, "encoding", _ENCODINGS, where)
    sparsity = _enum(obj, "sparsity", _SPARSITIES, where)
    shape = _shape(obj, where)
    desc = Descriptor(
        name=name,
        section=_int(obj, "section", 1, MAX_DECLARED_INT, where),
        shape=shape,
        encoding=encoding,
        sparsity=sparsity,
        nnz=_int(obj, "nnz", 0, math.prod(shape), where),
        parts=_parts(obj, where),
    )
    lean = tuple(key for key in LEAN_KEYS[encoding] if key in obj)
    _check_keys(obj, desc.keys() + lean, strict, where)
    desc = _with_lean_fields(_with_encoding_fields(desc, obj, where), obj, lean, where)
    if sparsity == Sparsity.NONE and desc.nnz != desc.count:
        raise MbzFormatError(f"{where}: sparsity none needs nnz == {desc.count}, got {desc.nnz}")
    if sparsity == Sparsity.CSR:
        desc = _replace(
            desc,
            csr_bits=_int(obj, "csr_bits", MIN_CSR_BITS, MAX_CSR_BITS, where),
            csr_entries=_int(obj, "csr_entries", 0, MAX_DECLARED_INT, where),
        )
    return desc


def _with_encoding_fields(desc: Descriptor, obj: dict, where: str) -> Descriptor:
    if desc.encoding in (Encoding.F32, Encoding.F16):
        return desc
    bits = _int(obj, "bits", MIN_BITS, MAX_BITS, where)
    entropy = _enum(obj, "entropy", _ENTROPIES, where)
    k = None
    if "k" in ENCODING_KEYS[desc.encoding]:
        k = _int(obj, "k", 1, min(MAX_CODEBOOK, 2**bits), where)
    axis = obj.get("axis") if "axis" in ENCODING_KEYS[desc.encoding] else None
    if axis is not None or desc.encoding in CHANNEL_CODEBOOKS:
        axis = _int(obj, "axis", 0, len(desc.shape) - 1, where)
    return _replace(desc, bits=bits, entropy=entropy, k=k, axis=axis)


def _with_lean_fields(desc: Descriptor, obj: dict, lean: tuple[str, ...], where: str) -> Descriptor:
    """The optional keys of lean side information (SPEC.md 3.1), each checked."""
    changes: dict[str, object] = {}
    if SCALE_DTYPE_KEY in lean:
        changes[SCALE_DTYPE_KEY] = _enum(obj, SCALE_DTYPE_KEY, {"f16": "f16"}, where)
    if COMMON_ZERO_POINT_KEY in lean:
        top = 2 ** desc.need("bits") - 1
        changes[COMMON_ZERO_POINT_KEY] = _int(obj, COMMON_ZERO_POINT_KEY, 0, top, where)
    if CODE_LENGTH_BITS_KEY in lean:
        if desc.entropy != Entropy.HUFFMAN:
            raise MbzFormatError(f"{where}: {CODE_LENGTH_BITS_KEY!r} needs entropy 'huffman'")
        width = _int(obj, CODE_LENGTH_BITS_KEY, 1, MAX_CODE_LENGTH_BITS, where)
        changes[CODE_LENGTH_BITS_KEY] = width
    return _replace(desc, **changes)


def _replace(desc: Descriptor, **changes: object) -> Descriptor:
    return Descriptor(**{**desc.__dict__, **changes})


def _check_keys(obj: dict, expected: tuple[str, ...], strict: bool, where: str) -> None:
    missing = sorted(set(expected) - set(obj))
    if missing:
        raise MbzFormatError(f"{where}: descriptor lacks key(s) {missing}")
    extra = sorted(set(obj) - set(expected))
    if strict and extra:
        raise MbzFormatError(f"{where}: descriptor has unknown key(s) {extra}")


def _int(obj: dict, key: str, lo: int, hi: int, where: str) -> int:
    value = obj.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise MbzFormatError(f"{where}: {key!r} must be an integer in {lo}..{hi}, got {value!r}")
    return value


def _enum(obj: dict, key: str, names: dict, where: str):
    value = obj.get(key)
    if not isinstance(value, str) or value not in names:
        raise MbzFormatError(f"{where}: {key!r} must be one of {sorted(names)}, got {value!r}")
    return names[value]


def _shape(obj: dict, where: str) -> tuple[int, ...]:
    shape = obj.get("shape")
    if not isinstance(shape, list) or len(shape) > MAX_RANK:
        raise MbzFormatError(f"{where}: 'shape' must be a list of at most {MAX_RANK} integers")
    count = 1
    for dim in shape:
        if type(dim) is not int or not 0 <= dim <= MAX_ELEMENTS:
            raise MbzFormatError(f"{where}: bad dimension {dim!r} in shape")
        count *= dim
    if count > MAX_ELEMENTS:
        raise MbzFormatError(f"{where}: {count} elements exceed the limit {MAX_ELEMENTS}")
    return tuple(shape)


def _parts(obj: dict, where: str) -> tuple[tuple[str, int], ...]:
    parts = obj.get("parts")
    if not isinstance(parts, list):
        raise MbzFormatError(f"{where}: 'parts' must be a list of [name, length] pairs")
    result = []
    for part in parts:
        if not (isinstance(part, list) and len(part) == 2 and isinstance(part[0], str)):
            raise MbzFormatError(f"{where}: bad part entry {part!r}")
        if type(part[1]) is not int or not 0 <= part[1] <= MAX_DECLARED_INT:
            raise MbzFormatError(f"{where}: part {part[0]!r} has bad length {part[1]!r}")
        result.append((part[0], part[1]))
    return tuple(result)
