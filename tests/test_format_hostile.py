"""Hostile input: every damaged or crafted file raises MbzFormatError and nothing else."""

from __future__ import annotations

import json
import struct
import zlib

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mbz.format import (
    DenseTensor,
    MbzFormatError,
    SectionKind,
    decode_mbz,
    encode_mbz,
    read_mbz,
    write_mbz,
)
from mbz.format.bits import pack_bits
from mbz.format.constants import VERSION_MINOR
from mbz.format.container import assemble
from mbz.format.jsonio import canonical_json
from tests.format_cases import golden_cases, random_tensor


def sample_file() -> bytes:
    rng = np.random.default_rng(3)
    tensors = {
        "cb": random_tensor(rng, "codebook", (6, 5), 3, 0.3, None),
        "uq": random_tensor(rng, "uniform", (4, 3), 4, None, per_channel=True),
        "hf": random_tensor(rng, "codebook", (50,), 2, None, None),
        "d": random_tensor(rng, "f16", (7,), 8, 0.9),
    }
    tensors["hf"].indices[:45] = 0
    return encode_mbz({"graph": {"nodes": []}}, tensors)


def sections(data: bytes) -> tuple[dict, list[bytes]]:
    """The metadata object and raw tensor section bodies of a valid file."""
    layout = decode_mbz(data).layout
    spans = [data[s.offset : s.offset + s.length] for s in layout.sections]
    compressed = layout.sections[0].kind == SectionKind.METADATA_ZLIB
    return json.loads(zlib.decompress(spans[0]) if compressed else spans[0]), spans[1:]


def rebuild(
    meta: dict | bytes, bodies: list[bytes], kind: SectionKind = SectionKind.METADATA
) -> bytes:
    """A file with correct CRCs around whatever metadata and bodies are given."""
    raw = meta if isinstance(meta, bytes) else canonical_json(meta)
    kinds = [kind] + [SectionKind.TENSOR] * len(bodies)
    return assemble(kinds, [raw, *bodies], 64)


def rejects(data: bytes, fragment: str = "") -> None:
    with pytest.raises(MbzFormatError) as error:
        decode_mbz(data)
    assert fragment in str(error.value)


def test_every_truncation_is_rejected():
    data = sample_file()
    for length in range(len(data)):
        rejects(data[:length])


def test_trailing_bytes_rejected():
    rejects(sample_file() + b"\0", "trailing")


def test_every_single_byte_flip_is_rejected():
    data = bytearray(sample_file())
    for offset in range(len(data)):
        data[offset] ^= 0x40
        rejects(bytes(data))
        data[offset] ^= 0x40


@pytest.mark.parametrize(
    ("offset", "value", "fragment"),
    [(0, b"\x88", "magic"), (8, b"\x02", "major"), (12, b"\x01", "flag")],
)
def test_header_fields_checked_before_crc(offset, value, fragment):
    data = bytearray(sample_file())
    data[offset : offset + len(value)] = value
    rejects(bytes(data), fragment)


def with_entry(data: bytes, index: int, **fields) -> bytes:
    """Rewrite one section-table entry and re-sign the table CRC."""
    out = bytearray(data)
    at = 64 + 32 * index
    names = ("kind", "alignment", "offset", "length", "crc32", "reserved")
    entry = dict(zip(names, struct.unpack_from("<IIQQII", out, at), strict=True)) | fields
    struct.pack_into("<IIQQII", out, at, *entry.values())
    count = struct.unpack_from("<I", out, 24)[0]
    struct.pack_into("<I", out, 28, zlib.crc32(bytes(out[:28] + out[64 : 64 + 32 * count])))
    return bytes(out)


@pytest.mark.parametrize(
    ("index", "fields", "fragment"),
    [
        (4, {"offset": 1 << 40}, "offset"),
        (4, {"length": 1 << 60}, "past the end"),
        (2, {"offset": 64}, "offset"),
        (1, {"length": 1 << 20}, "past the end"),
        (0, {"kind": 7}, "unknown kind"),
        (0, {"kind": 2}, "section 0"),
        (1, {"kind": 1}, "not a tensor section"),
        (1, {"alignment": 3}, "alignment"),
        (1, {"crc32": 0}, "CRC"),
    ],
)
def test_forged_section_table_rejected(index, fields, fragment):
    rejects(with_entry(sample_file(), index, **fields), fragment)


def test_overlapping_sections_rejected():
    data = sample_file()
    second = struct.unpack_from("<IIQQII", data, 64 + 32 * 2)
    rejects(with_entry(data, 2, offset=second[2] - 64), "offset")


def test_huge_section_count_in_tiny_file_rejected():
    data = bytearray(sample_file()[:64])
    struct.pack_into("<QI", data, 16, 64, 60_000)
    rejects(bytes(data), "section table")


def mutate_descriptor(name: str, **changes) -> bytes:
    meta, bodies = sections(sample_file())
    meta["tensors"][name].update(changes)
    return rebuild(meta, bodies)


@pytest.mark.parametrize(
    ("name", "changes", "fragment"),
    [
        ("cb", {"shape": [1 << 20, 1 << 20]}, "exceed"),
        ("cb", {"shape": [-1, 5]}, "dimension"),
        ("cb", {"shape": [1] * 9}, "shape"),
        ("cb", {"nnz": 31}, "nnz"),
        ("cb", {"k": 9}, "'k'"),
        ("cb", {"bits": 9}, "'bits'"),
        ("cb", {"encoding": "zip"}, "encoding"),
        ("cb", {"section": 99}, "section 99"),
        ("uq", {"section": 1}, "share section"),
        ("cb", {"parts": [["codebook", 1]]}, "parts"),
        ("uq", {"axis": 5}, "'axis'"),
        ("uq", {"pickle": "x"}, "unknown key"),
        ("d", {"csr_bits": 12}, "csr_bits"),
    ],
)
def test_crafted_descriptors_rejected(name, changes, fragment):
    rejects(mutate_descriptor(name, **changes), fragment)


def test_newer_minor_version_may_add_keys():
    meta, bodies = sections(sample_file())
    meta["tensors"]["uq"]["future"] = 1
    data = rebuild(meta, bodies)
    rejects(data, "unknown key")
    newer = VERSION_MINOR + 1
    assert decode_mbz(with_minor(data, newer)).version == (1, newer)


def with_minor(data: bytes, minor: int) -> bytes:
    """``data`` with another minor version in its header, and the table CRC that goes with it."""
    changed = bytearray(data)
    struct.pack_into("<H", changed, 10, minor)
    count = struct.unpack_from("<I", changed, 24)[0]
    crc = zlib.crc32(bytes(changed[:28] + changed[64 : 64 + 32 * count]))
    struct.pack_into("<I", changed, 28, crc)
    return bytes(changed)


@pytest.mark.parametrize(
    ("stream", "fragment"),
    [
        (zlib.compress(b" " * (17 * 1024 * 1024)), "inflates past"),
        (b"not zlib at all", "not a valid zlib"),
        (zlib.compress(b'{"tensors":{}}') + b"\0", "extra bytes"),
        (zlib.compress(b'{"tensors":{}}')[:-3], "truncated"),
    ],
)
def test_bad_compressed_metadata_rejected(stream, fragment):
    rejects(rebuild(stream, [], SectionKind.METADATA_ZLIB), fragment)


def test_compressed_metadata_needs_version_1_1():
    data = rebuild(zlib.compress(b'{"tensors":{}}'), [], SectionKind.METADATA_ZLIB)
    assert decode_mbz(data).metadata == {}
    rejects(with_minor(data, 0), "needs version 1.1")


@pytest.mark.parametrize(
    "raw",
    [
        b'{"tensors":{},"a":1,"a":2}',
        b'{"tensors":{},"a":NaN}',
        b'{"tensors":{},"a":1e999}',
        b"[1]",
        b"\xff\xfe",
        b'{"tensors":[]}',
        b"[" * 100 + b"]" * 100,
        b'{"tensors":{},"x":' + b"[" * 100 + b"]" * 100 + b"}",
    ],
)
def test_bad_metadata_json_rejected(raw):
    rejects(rebuild(raw, []))


def test_orphan_section_rejected():
    meta, bodies = sections(sample_file())
    rejects(rebuild(meta, [*bodies, b"spare"]), "named by no tensor")


def body_with(name: str, part: str, patch) -> bytes:
    """Re-assemble the sample with one part of one tensor replaced by ``patch(bytes)``."""
    meta, bodies = sections(sample_file())
    desc = meta["tensors"][name]
    index = desc["section"] - 1
    cursor, out = 0, bytearray(bodies[index])
    for part_name, length in desc["parts"]:
        if part_name == part:
            out[cursor : cursor + length] = patch(bytes(out[cursor : cursor + length]))
        cursor += length
    bodies[index] = bytes(out)
    return rebuild(meta, bodies)


def test_index_beyond_codebook_rejected():
    meta, bodies = sections(encode_mbz({}, golden_cases()["codebook"][0]))
    meta["tensors"]["w"]["k"] = 3  # index 3 is stored; the codebook part shrinks to 3 entries
    meta["tensors"]["w"]["parts"][0][1] = 12
    rejects(rebuild(meta, [bodies[0][4:]]), ">= 3")


def test_nan_in_codebook_rejected():
    nan = np.array([np.nan], "<f4").tobytes()
    rejects(body_with("cb", "codebook", lambda b: nan + b[4:]), "NaN")


def test_bad_scale_and_zero_point_rejected():
    rejects(body_with("uq", "scale", lambda b: bytes(4) + b[4:]), "scale")
    rejects(body_with("uq", "zero_point", lambda b: b"\x10" + b[1:]), "zero point")


def test_nonzero_pad_bits_rejected():
    bitmap = golden_cases()["uniform_per_channel_bitmap"][0]
    data = encode_mbz({}, bitmap)
    meta, bodies = sections(data)
    body = bytearray(bodies[0])
    body[-1] |= 0x80  # 6 mask bits used of the last byte
    rejects(rebuild(meta, [bytes(body)]), "pad bits")


def test_csr_running_past_the_tensor_rejected():
    meta, bodies = sections(encode_mbz({}, golden_cases()["codebook_huffman_csr"][0]))
    body = bytearray(bodies[0])
    body[-1] = 0xBE  # entries 2,3,3,2: kept at 2 and 11, past the 10 elements
    rejects(rebuild(meta, [bytes(body)]), "past")


def test_oversubscribed_huffman_rejected():
    meta, _ = sections(sample_file())
    assert meta["tensors"]["hf"]["entropy"] == "huffman"
    rejects(body_with("hf", "code_lengths", lambda b: b"\x01\x01\x01\x00"), "Kraft")


@settings(max_examples=2000, deadline=None)
@given(offset=st.integers(0, 10_000), value=st.integers(0, 255), fix_crc=st.booleans())
def test_fuzz_single_byte_changes(offset, value, fix_crc):
    """Any change either decodes (a still-valid file) or raises MbzFormatError, never more."""
    data = sample_file()
    meta, bodies = sections(data)
    blob = bytearray(canonical_json(meta) + b"".join(bodies))
    blob[offset % len(blob)] = value
    raw = bytes(blob)
    if fix_crc:
        cut = len(canonical_json(meta))
        lengths = np.cumsum([len(b) for b in bodies])[:-1] + cut
        pieces = np.split(np.frombuffer(raw, np.uint8), [cut, *lengths])
        candidate = rebuild(pieces[0].tobytes(), [p.tobytes() for p in pieces[1:]])
    else:
        candidate = bytes(data[:64]) + raw
    try:
        decode_mbz(candidate)
    except MbzFormatError:
        pass


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=400))
def test_fuzz_random_bytes(blob):
    try:
        decode_mbz(b"\x89MBZ\r\n\x1a\n" + blob)
    except MbzFormatError:
        pass


def test_atomic_write_keeps_the_old_file_on_failure(tmp_path):
    path = tmp_path / "model.mbz"
    write_mbz(path, {"v": 1}, {})
    before = path.read_bytes()
    with pytest.raises(TypeError):
        write_mbz(path, {"v": 2}, {"bad": DenseTensor(values=[1.0])})
    assert path.read_bytes() == before
    assert read_mbz(path).metadata == {"v": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["model.mbz"]


def int_codebook_with(codebook: bytes, k: int | None = None) -> bytes:
    """The int_codebook golden file with its codebook part replaced by ``codebook`` (declared
    at its own length) and ``k`` (default unchanged)."""
    meta, bodies = sections(encode_mbz({}, golden_cases()["int_codebook"][0]))
    desc = meta["tensors"]["w"]
    assert [name for name, _ in desc["parts"]] == ["scale", "codebook", "indices"]
    desc["parts"][1][1] = len(codebook)
    desc["k"] = desc["k"] if k is None else k
    return with_minor(rebuild(meta, [bodies[0][:4] + codebook + bodies[0][8:]]), 3)


@pytest.mark.parametrize(
    ("codebook", "k", "fragment"),
    [
        (b"\x80\x00\x03", None, "part 'codebook' is 3 bytes, expected 4"),  # truncated
        (b"\x80\x00\x03\x7f\x01", None, "part 'codebook' is 5 bytes, expected 4"),  # oversized
        (b"\x80\x00\x03\x7f\x01", 5, "'k' must be an integer in 1..4"),  # more than 2**bits
        (b"\x80\x00\x03", 3, "a value is >= 3"),  # index 3 stored, 3 centroids
        (bytes(8), None, "part 'codebook' is 8 bytes, expected 4"),  # written as float16
    ],
)
def test_bad_int_codebook_rejected(codebook, k, fragment):
    rejects(int_codebook_with(codebook, k), fragment)


def test_int_codebook_needs_version_1_3():
    data = encode_mbz({}, golden_cases()["int_codebook"][0], compress_metadata=False)
    assert decode_mbz(data).version == (1, 3)
    rejects(with_minor(data, 2), "'int_codebook' needs version 1.3")


def test_int_codebook_writer_refuses_float_or_too_many_centroids():
    (tensor,) = golden_cases()["int_codebook"][0].values()
    tensor.codebook = tensor.codebook.astype(np.float16)
    with pytest.raises(TypeError, match="codebook must have dtype int8"):
        encode_mbz({}, {"w": tensor})
    tensor.codebook = np.arange(5, dtype=np.int8)
    with pytest.raises(ValueError, match="codebook has 5 entries"):
        encode_mbz({}, {"w": tensor})


def lean_file(patch_body=None, **changes) -> bytes:
    """The lean uniform golden file (version 1.3) with descriptor ``changes`` (None deletes a
    key) and its section replaced by ``patch_body(section)``."""
    meta, bodies = sections(encode_mbz({}, golden_cases()["uniform_lean_huffman"][0]))
    desc = meta["tensors"]["w"]
    desc.update(changes)
    for key in [key for key, value in changes.items() if value is None]:
        del desc[key]
    body = patch_body(bodies[0]) if patch_body else bodies[0]
    return with_minor(rebuild(meta, [body]), 3)


def test_the_lean_file_itself_is_valid():
    assert decode_mbz(lean_file()).tensors["w"].zero_point.tolist() == [2, 2]


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"scale_dtype": "f8"}, "'scale_dtype' must be one of ['f16']"),
        ({"scale_dtype": 16}, "'scale_dtype' must be one of ['f16']"),
        ({"scale_dtype": None}, "part 'scale' is 4 bytes, expected 8"),
        ({"common_zero_point": 4}, "'common_zero_point' must be an integer in 0..3"),
        ({"common_zero_point": True}, "'common_zero_point' must be an integer"),
        ({"common_zero_point": -1}, "'common_zero_point' must be an integer"),
        ({"common_zero_point": None}, "parts must be ['scale', 'zero_point'"),
        ({"code_length_bits": 0}, "'code_length_bits' must be an integer in 1..5"),
        ({"code_length_bits": 6}, "'code_length_bits' must be an integer in 1..5"),
        ({"code_length_bits": 3}, "part 'code_lengths' is 1 bytes, expected 2"),
        ({"code_length_bits": None}, "part 'code_lengths' is 1 bytes, expected 4"),
        ({"entropy": "fixed"}, "'code_length_bits' needs entropy 'huffman'"),
        ({"encoding": "codebook", "k": 4, "axis": None}, "key(s) ['common_zero_point', 'scale"),
    ],
)
def test_crafted_lean_keys_rejected(changes, fragment):
    rejects(lean_file(**changes), fragment)


def test_lean_keys_need_version_1_3():
    rejects(with_minor(lean_file(), 2), "need version 1.3")


@pytest.mark.parametrize(
    ("section", "fragment"),
    [
        (bytes.fromhex("007c 0034 9f 740c"), "scale"),  # binary16 infinity
        (bytes.fromhex("0000 0034 9f 740c"), "scale"),  # zero
        (bytes.fromhex("0038 0034 55 740c"), "Kraft"),  # every length 1
    ],
)
def test_bad_lean_parts_rejected(section, fragment):
    rejects(lean_file(lambda _: section), fragment)


def test_packed_code_length_above_16_rejected():
    table = pack_bits(np.array([17, 1, 0, 0], np.uint8), 5)  # 5-bit lengths can say 17..31
    parts = [["scale", 4], ["code_lengths", len(table)], ["qdata", 2]]
    data = lean_file(lambda b: b[:4] + table + b[5:], code_length_bits=5, parts=parts)
    rejects(data, "code length above 16")
