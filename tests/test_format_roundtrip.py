"""Round trips of every encoding through the container (hypothesis property tests)."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from mbz.format import Encoding, Entropy, decode_mbz, encode_mbz, write_mbz
from mbz.format.bits import pack_bits, unpack_bits
from mbz.format.constants import Sparsity
from mbz.format.huffman import code_lengths, huffman_decode, huffman_encode
from mbz.format.sparsity import decode_bitmap, decode_csr, encode_mask
from tests.format_cases import random_tensor

shapes = st.lists(st.integers(1, 9), min_size=1, max_size=4).map(tuple)
densities = st.one_of(st.none(), st.sampled_from([0.0, 0.01, 0.1, 0.5, 0.9, 1.0]))
entropies = st.sampled_from([Entropy.FIXED, Entropy.HUFFMAN, None])


@settings(max_examples=150, deadline=None)
@given(
    kind=st.sampled_from([e.name.lower() for e in Encoding]),
    shape=shapes,
    bits=st.integers(1, 8),
    density=densities,
    entropy=entropies,
    per_channel=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_every_encoding_round_trips(kind, shape, bits, density, entropy, per_channel, seed):
    tensor = random_tensor(
        np.random.default_rng(seed), kind, shape, bits, density, entropy, per_channel
    )
    decoded = decode_mbz(encode_mbz({"note": "x"}, {"t": tensor}))
    back = decoded.tensors["t"]
    assert back.shape == tensor.shape
    assert np.array_equal(back.decode(), tensor.decode())
    assert decoded.metadata == {"note": "x"}
    assert decoded.layout.total == decoded.file_size


@settings(max_examples=200, deadline=None)
@given(bits=st.integers(1, 8), count=st.integers(0, 300), seed=st.integers(0, 2**32 - 1))
def test_bit_packing_round_trips(bits, count, seed):
    values = np.random.default_rng(seed).integers(0, 2**bits, count).astype(np.uint8)
    packed = pack_bits(values, bits)
    assert len(packed) == (count * bits + 7) // 8
    assert np.array_equal(unpack_bits(packed, count, bits), values)


@settings(max_examples=200, deadline=None)
@given(count=st.integers(0, 600), density=st.floats(0, 1), seed=st.integers(0, 2**32 - 1))
def test_masks_round_trip_and_pick_the_smaller(count, density, seed):
    mask = np.random.default_rng(seed).random(count) < density
    sparse = encode_mask(mask)
    nnz = int(mask.sum())
    if sparse.sparsity == Sparsity.BITMAP:
        back = decode_bitmap(memoryview(sparse.data), count, nnz)
    else:
        back = decode_csr(memoryview(sparse.data), count, nnz, sparse.csr_bits, sparse.csr_entries)
        assert len(sparse.data) < (count + 7) // 8
    assert len(sparse.data) <= (count + 7) // 8
    assert np.array_equal(back, mask)


@settings(max_examples=150, deadline=None)
@given(
    alphabet_bits=st.integers(1, 8),
    count=st.integers(1, 400),
    skew=st.floats(0.1, 5),
    seed=st.integers(0, 2**32 - 1),
)
def test_huffman_round_trips(alphabet_bits, count, skew, seed):
    rng = np.random.default_rng(seed)
    alphabet = 2**alphabet_bits
    weights = np.exp(-skew * np.arange(alphabet))
    values = rng.choice(alphabet, count, p=weights / weights.sum()).astype(np.uint8)
    lengths = code_lengths(values, alphabet)
    assert np.array_equal(
        huffman_decode(memoryview(huffman_encode(values, lengths)), lengths, count), values
    )


def test_same_input_gives_identical_bytes(tmp_path):
    rng = np.random.default_rng(1)
    tensors = {"a": random_tensor(rng, "codebook", (8, 3, 3), 4, 0.4, None)}
    first = write_mbz(tmp_path / "a.mbz", {"k": [1, 2]}, tensors)
    write_mbz(tmp_path / "b.mbz", {"k": [1, 2]}, tensors)
    assert first == (tmp_path / "a.mbz").stat().st_size
    assert (tmp_path / "a.mbz").read_bytes() == (tmp_path / "b.mbz").read_bytes()


def test_huffman_is_chosen_only_when_smaller():
    rng = np.random.default_rng(2)
    skewed = random_tensor(rng, "codebook", (4000,), 4, None, None)
    skewed.indices[:3900] = 0
    uniform = random_tensor(rng, "codebook", (4000,), 4, None, None)
    uniform.codebook = np.linspace(-1, 1, 16).astype(np.float32)
    uniform.indices = (np.arange(4000) % 16).astype(np.uint8)
    decoded = decode_mbz(encode_mbz({}, {"s": skewed, "u": uniform}))
    assert decoded.descriptors["s"].entropy == Entropy.HUFFMAN
    assert decoded.descriptors["u"].entropy == Entropy.FIXED


@settings(max_examples=60, deadline=None)
@given(
    kind=st.sampled_from(["codebook", "uniform", "scaled_codebook", "int_codebook"]),
    shape=shapes,
    bits=st.integers(2, 8),
    density=densities,
    entropy=entropies,
    exact=st.booleans(),
    seed=st.integers(0, 2**32 - 1),
)
def test_lean_side_information_round_trips_and_is_never_larger(
    kind, shape, bits, density, entropy, exact, seed
):
    tensor = random_tensor(np.random.default_rng(seed), kind, shape, bits, density, entropy, True)
    if kind == "uniform" and exact:  # float16 scales, one zero point: the compact forms apply
        tensor.scale = tensor.scale.astype(np.float16).astype(np.float32)
        tensor.zero_point[:] = tensor.zero_point[0]
    full = decode_mbz(encode_mbz({}, {"t": tensor})).layout.sections[1].length
    tensor.lean = True
    data = encode_mbz({}, {"t": tensor})
    decoded = decode_mbz(data)
    back = decoded.tensors["t"]
    assert np.array_equal(back.decode(), tensor.decode())
    assert decoded.layout.sections[1].length <= full
    assert back.lean == bool(decoded.descriptors["t"].lean_keys())
    assert encode_mbz({}, {"t": back}) == data  # what is read writes back the same bytes
    if kind == "uniform" and exact:
        assert {"common_zero_point", "scale_dtype"} <= set(decoded.descriptors["t"].lean_keys())
