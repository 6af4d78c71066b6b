"""Byte-exact checks: SPEC.md's worked examples, and the committed golden files."""

from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest

from mbz.format import Encoding, Entropy, Sparsity, decode_mbz, encode_mbz, read_mbz
from mbz.format.bits import pack_bits, unpack_bits
from mbz.format.huffman import canonical_codes, code_lengths, huffman_encode
from mbz.format.sparsity import encode_mask
from tests.format_cases import golden_cases

GOLDEN = Path(__file__).parent / "golden"
GOLDEN_METADATA = {"mbz": {"tool_version": "golden"}}


def test_three_bit_packing_example():
    # SPEC.md 4: values 1,2,3,4,5 at 3 bits, LSB first -> 0xD1 0x58 (pad bit zero).
    assert pack_bits(np.array([1, 2, 3, 4, 5], np.uint8), 3) == b"\xd1\x58"
    assert unpack_bits(b"\xd1\x58", 5, 3).tolist() == [1, 2, 3, 4, 5]


def test_four_bit_packing_example():
    assert pack_bits(np.array([1, 10, 3], np.uint8), 4) == b"\xa1\x03"


def test_csr_example():
    # SPEC.md 5: 10 weights, kept at 0 and 9; 2-bit entries 0,3,3,2 -> 0xBC.
    mask = np.zeros(10, bool)
    mask[[0, 9]] = True
    sparse = encode_mask(mask)
    assert (sparse.sparsity.name, sparse.csr_bits, sparse.csr_entries) == ("CSR", 2, 4)
    assert sparse.data == b"\xbc"


def test_huffman_example():
    # SPEC.md 3: symbols 2 and 3 once each -> lengths [0,0,1,1], codes 0 and 1 -> 0x02.
    values = np.array([2, 3], np.uint8)
    lengths = code_lengths(values, 4)
    assert lengths.tolist() == [0, 0, 1, 1]
    assert canonical_codes(lengths).tolist() == [0, 0, 0, 1]
    assert huffman_encode(values, lengths) == b"\x02"


def test_header_fields_at_their_offsets():
    data = encode_mbz(GOLDEN_METADATA, golden_cases()["dense"][0], compress_metadata=False)
    assert data[:8] == b"\x89MBZ\r\n\x1a\n"
    major, minor, flags, size, count, crc = struct.unpack_from("<HHIQII", data, 8)
    assert (major, minor, flags, size, count) == (1, 0, 0, len(data), 3)
    assert crc == zlib.crc32(data[:28] + data[64 : 64 + 32 * count])
    kind, align, offset, length, section_crc, _ = struct.unpack_from("<IIQQII", data, 64)
    assert (kind, align, offset) == (1, 64, 192)
    metadata = json.loads(data[offset : offset + length])
    assert section_crc == zlib.crc32(data[offset : offset + length])
    assert metadata["tensors"]["w32"]["parts"] == [["values", 12]]
    _, _, w32_offset, _, _, _ = struct.unpack_from("<IIQQII", data, 96)
    assert np.frombuffer(data[w32_offset : w32_offset + 12], "<f4").tolist() == [1.5, -2.0, 0.25]


def test_compressed_metadata_is_a_zlib_stream_of_the_same_json():
    tensors = golden_cases()["dense"][0]
    plain = encode_mbz(GOLDEN_METADATA, tensors, compress_metadata=False)
    data = encode_mbz(GOLDEN_METADATA, tensors)
    assert struct.unpack_from("<HH", data, 8) == (1, 1)  # kind 3 needs version 1.1
    kind, _, offset, length, _, _ = struct.unpack_from("<IIQQII", data, 64)
    _, _, plain_offset, plain_length, _, _ = struct.unpack_from("<IIQQII", plain, 64)
    assert kind == 3
    assert zlib.decompress(data[offset : offset + length]) == plain[
        plain_offset : plain_offset + plain_length
    ]
    assert decode_mbz(data).metadata == decode_mbz(plain).metadata


def test_scaled_codebook_example():
    # SPEC.md 3.6: scale f16 [2.0, 0.25], codebook f16 [-1, 0, 0.5, 1], indices 0 1 2 3 2 1.
    tensors, _ = golden_cases()["scaled_codebook"]
    data = encode_mbz(GOLDEN_METADATA, tensors, compress_metadata=False)
    (info,) = [s for s in decode_mbz(data).layout.sections if s.name == "w"]
    section = data[info.offset : info.offset + info.length]
    assert section == bytes.fromhex("0040 0034 00bc 0000 0038 003c e406")
    assert struct.unpack_from("<HH", data, 8) == (1, 2)  # version 1.2: the encoding needs it


def test_int_codebook_example():
    # SPEC.md 3.7: scale f16 [0.5, 0.125], codebook int8 [-128, 0, 3, 127], indices 0 1 2 3 2 1.
    tensors, _ = golden_cases()["int_codebook"]
    data = encode_mbz(GOLDEN_METADATA, tensors, compress_metadata=False)
    (info,) = [s for s in decode_mbz(data).layout.sections if s.name == "w"]
    section = data[info.offset : info.offset + info.length]
    assert section == bytes.fromhex("0038 0030 80 00 03 7f e406")
    assert struct.unpack_from("<HH", data, 8) == (1, 3)  # version 1.3: the encoding needs it
    _, _, offset, length, _, _ = struct.unpack_from("<IIQQII", data, 64)
    descriptor = json.loads(data[offset : offset + length])["tensors"]["w"]
    assert descriptor == {
        "axis": 0,
        "bits": 2,
        "encoding": "int_codebook",
        "entropy": "fixed",
        "k": 4,
        "nnz": 6,
        "parts": [["scale", 4], ["codebook", 4], ["indices", 2]],
        "section": 1,
        "shape": [2, 3],
        "sparsity": "none",
    }


def test_lean_uniform_example():
    # SPEC.md 3.4/3.5 (since 1.3): scale f16 [0.5, 0.25], common zero point 2, Huffman code
    # lengths [3, 3, 1, 2] packed at 2 bits, codes 2 2 3 1 2 2 2 0.
    tensors, _ = golden_cases()["uniform_lean_huffman"]
    data = encode_mbz(GOLDEN_METADATA, tensors, compress_metadata=False)
    decoded = decode_mbz(data)
    (info,) = [s for s in decoded.layout.sections if s.name == "w"]
    assert data[info.offset : info.offset + info.length] == bytes.fromhex("0038 0034 9f 740c")
    assert decoded.descriptors["w"].to_json() == {
        "section": 1,
        "shape": [2, 4],
        "encoding": "uniform",
        "sparsity": "none",
        "nnz": 8,
        "parts": [["scale", 4], ["code_lengths", 1], ["qdata", 2]],
        "bits": 2,
        "axis": 0,
        "entropy": "huffman",
        "scale_dtype": "f16",
        "common_zero_point": 2,
        "code_length_bits": 2,
    }
    assert struct.unpack_from("<HH", data, 8) == (1, 3)  # the lean keys need version 1.3


@pytest.mark.parametrize("name", sorted(golden_cases()))
def test_golden_file_bytes_and_values(name):
    tensors, expected = golden_cases()[name]
    path = GOLDEN / f"{name}.mbz"
    assert encode_mbz(GOLDEN_METADATA, tensors, compress_metadata=False) == path.read_bytes(), (
        f"the encoding of {name} changed; if the format change is intended, bump the version "
        "and regenerate with `python tests/golden/regenerate.py`"
    )
    decoded = read_mbz(path)
    assert decoded.metadata == GOLDEN_METADATA
    for tensor_name, values in expected.items():
        array = decoded.tensors[tensor_name].decode()
        assert array.dtype == np.float32
        assert np.array_equal(array, np.array(values, np.float32))


def test_golden_files_cover_every_encoding_and_sparsity():
    seen = set()
    for path in GOLDEN.glob("*.mbz"):
        for desc in decode_mbz(path.read_bytes()).descriptors.values():
            seen |= {desc.encoding.name, desc.sparsity.name}
            seen |= {desc.entropy.name} if desc.entropy is not None else set()
    every = {e.name for e in (*Encoding, *Sparsity, *Entropy)}
    assert seen == every
