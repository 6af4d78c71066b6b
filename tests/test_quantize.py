"""Weight quantizers: codebooks and uniform codes, judged by SQNR in dB."""

from dataclasses import replace

import numpy as np
import pytest

from mbz.config import PackConfig
from mbz.format import (
    CodebookTensor,
    DenseTensor,
    Encoding,
    Entropy,
    ScaledCodebookTensor,
    UniformTensor,
    decode_mbz,
    encode_mbz,
)
from mbz.quantize import (
    STEP_CODES,
    Coding,
    kmeans_1d,
    quantize_weight,
    section_bytes,
    step_bits,
    step_quantize,
    uniform_quantize,
)
from tests.helpers import sqnr_db


@pytest.fixture
def weight():
    return np.random.default_rng(0).standard_normal((32, 16, 3, 3)).astype(np.float32)


# SQNR of the optimal (Lloyd-Max) scalar quantizer of a Gaussian source; 8 bits from the
# high-resolution formula 6.02 b - 4.35 dB.
LLOYD_MAX_GAUSSIAN_DB = {1: 4.40, 2: 9.30, 4: 20.22, 8: 43.8}


@pytest.mark.parametrize("bits", sorted(LLOYD_MAX_GAUSSIAN_DB))
def test_kmeans_codebook_is_close_to_the_optimal_quantizer(weight, bits):
    tensor = quantize_weight(weight, Coding(Encoding.CODEBOOK, bits))
    assert isinstance(tensor, CodebookTensor)
    assert tensor.codebook.size <= 2**bits
    assert sqnr_db(weight, tensor.decode()) > LLOYD_MAX_GAUSSIAN_DB[bits] - 2.0


def test_kmeans_moves_centroids_from_linear_init():
    values = np.concatenate([np.zeros(1000), np.ones(10) * 5, [10.0]])
    centroids = kmeans_1d(values, 3)
    np.testing.assert_allclose(centroids, [0.0, 5.0, 10.0])
    skewed = np.random.default_rng(1).exponential(size=5000)
    init = np.linspace(skewed.min(), skewed.max(), 4)
    assert not np.allclose(kmeans_1d(skewed, 4), init)


def test_kmeans_with_few_distinct_values_is_exact():
    values = np.array([0.5, -1.0, 0.5, 2.0], np.float32)
    tensor = quantize_weight(values, Coding(Encoding.CODEBOOK, 4))
    np.testing.assert_array_equal(tensor.decode(), values)


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
@pytest.mark.parametrize("per_channel", [False, True])
def test_uniform_quality_and_zero_is_exact(weight, bits, symmetric, per_channel):
    w = weight.copy()
    w[0, 0, 0, 0] = 0.0
    tensor = uniform_quantize(w, bits, symmetric=symmetric, per_channel=per_channel)
    assert isinstance(tensor, UniformTensor)
    assert tensor.scale.shape == ((32,) if per_channel else (1,))
    decoded = tensor.decode()
    assert decoded[0, 0, 0, 0] == 0.0
    assert sqnr_db(w, decoded) > 6.02 * bits - 12


def test_per_channel_beats_per_tensor_on_uneven_channels(weight):
    w = weight * np.geomspace(0.01, 10, 32, dtype=np.float32)[:, None, None, None]
    per_tensor = uniform_quantize(w, 4, per_channel=False).decode()
    per_channel = uniform_quantize(w, 4, per_channel=True).decode()
    assert sqnr_db(w, per_channel) > sqnr_db(w, per_tensor) + 3


def test_mask_excludes_pruned_weights_from_the_range(weight):
    mask = np.abs(weight) < 1.0
    w = weight.copy()
    w[~mask] = 100.0  # would dominate the range if it counted
    tensor = uniform_quantize(w, 4, mask=mask)
    decoded = tensor.decode()
    assert np.all(decoded[~mask] == 0.0)
    assert sqnr_db(weight[mask], decoded[mask]) > 15


def coded(weight: np.ndarray, bits: int, **fields):
    return quantize_weight(weight, Coding.of(PackConfig(**fields), bits))


def test_float_bits_keep_floats_and_huffman_is_left_to_the_writer(weight):
    assert coded(weight, 32, method="kmeans").values.dtype == np.float32
    half = coded(weight, 16, method="uniform")
    assert isinstance(half, DenseTensor) and half.values.dtype == np.float16
    assert coded(weight, 4, method="kmeans", huffman=True).entropy is None
    assert coded(weight, 4, method="uniform", huffman=False).entropy == Entropy.FIXED


def test_pack_options_reach_the_uniform_encoder(weight):
    tensor = coded(weight, 4, method="uniform", symmetric=True, per_channel=False)
    assert isinstance(tensor, UniformTensor) and tensor.axis is None
    assert tensor.scale.shape == (1,) and tensor.zero_point.tolist() == [8]
    assert isinstance(coded(weight, 4, method="kmeans", codebook="plain"), CodebookTensor)
    assert isinstance(coded(weight, 4, method="kmeans", codebook="scaled"), ScaledCodebookTensor)


def uneven_channels(seed: int = 0) -> np.ndarray:
    """A conv weight whose output channels span 100x in scale, as BatchNorm folding makes."""
    rng = np.random.default_rng(seed)
    gains = np.exp(rng.uniform(-2.3, 2.3, 64)).astype(np.float32)
    return (rng.standard_normal((64, 16, 3, 3)) * gains[:, None, None, None]).astype(np.float32)


@pytest.mark.parametrize("bits", [2, 3, 4, 8])
def test_a_scaled_codebook_beats_a_plain_one_on_uneven_channels(bits):
    w = uneven_channels()
    plain = coded(w, bits, method="kmeans", codebook="plain").decode()
    scaled = coded(w, bits, method="kmeans", codebook="scaled").decode()
    # per channel, relative to its own size: what the next layer's inputs see after BN
    per_channel = [sqnr_db(w[c], scaled[c]) - sqnr_db(w[c], plain[c]) for c in range(64)]
    assert np.median(per_channel) > 3.0
    assert sqnr_db(w, scaled) > sqnr_db(w, plain)


def test_auto_keeps_the_codebook_with_the_smaller_error():
    w = uneven_channels(1)
    auto = coded(w, 3, method="kmeans", codebook="auto")
    options = [coded(w, 3, method="kmeans", codebook=kind) for kind in ("plain", "scaled")]
    errors = [float(((w - t.decode()) ** 2).sum()) for t in options]
    assert np.array_equal(auto.decode(), options[int(np.argmin(errors))].decode())
    # one channel far wider than float16 holds: only a plain codebook can store it
    huge = w.copy()
    huge[0] *= 1e6
    assert isinstance(coded(huge, 3, method="kmeans", codebook="scaled"), CodebookTensor)


def test_weighted_kmeans_lowers_the_weighted_error():
    rng = np.random.default_rng(2)
    values = rng.standard_normal(4000)
    importance = np.where(np.abs(values) > 1.5, 50.0, 1.0)
    plain, weighted = kmeans_1d(values, 8), kmeans_1d(values, 8, weights=importance)

    def cost(centroids):
        nearest = centroids[np.abs(values[:, None] - centroids[None]).argmin(1)]
        return float((importance * (values - nearest) ** 2).sum())

    assert cost(weighted) < 0.9 * cost(plain)
    assert np.array_equal(kmeans_1d(values, 8, weights=np.ones(4000)), plain)


def written(tensor) -> tuple[dict, int]:
    """The descriptor and section length ``tensor`` gets in a file."""
    decoded = decode_mbz(encode_mbz({}, {"w": tensor}))
    return decoded.descriptors["w"].to_json(), decoded.layout.sections[1].length


def test_uniform_scales_are_float16_values_stored_in_2_bytes(weight):
    lean = coded(weight * 3.7, 4, method="uniform", huffman=False)
    assert np.array_equal(lean.scale.astype(np.float16).astype(np.float32), lean.scale)
    full = UniformTensor(lean.qdata, lean.scale, lean.zero_point, 4, axis=0)  # the 1.2 layout
    (lean_desc, lean_bytes), (_, full_bytes) = written(lean), written(full)
    assert lean_desc["scale_dtype"] == "f16"
    assert full_bytes - lean_bytes == 2 * 32  # 32 scales, 2 bytes each saved
    back = decode_mbz(encode_mbz({}, {"w": lean})).tensors["w"]
    assert np.array_equal(back.decode(), full.decode())
    # the codes were computed with the rounded scales: the error is a 4-bit quantizer's
    assert sqnr_db(weight, lean.decode() / np.float32(3.7)) > 6.02 * 4 - 12


def test_symmetric_codes_store_no_zero_points(weight):
    symmetric = coded(weight, 4, method="uniform", symmetric=True, huffman=False)
    desc, _ = written(symmetric)
    assert desc["common_zero_point"] == 8
    assert [name for name, _ in desc["parts"]] == ["scale", "qdata"]
    back = decode_mbz(encode_mbz({}, {"w": symmetric})).tensors["w"]
    assert back.zero_point.tolist() == [8] * 32
    assert np.array_equal(back.decode(), symmetric.decode())


def test_compact_huffman_table_round_trips_and_is_smaller(weight):
    lean = coded(weight, 8, method="kmeans", codebook="plain", huffman=True)
    full = CodebookTensor(lean.codebook, lean.indices, 8, entropy=None)
    (lean_desc, lean_bytes), (full_desc, full_bytes) = written(lean), written(full)
    assert lean_desc["entropy"] == full_desc["entropy"] == "huffman"
    tables = [dict(d["parts"])["code_lengths"] for d in (lean_desc, full_desc)]
    assert tables == [256 * lean_desc["code_length_bits"] // 8, 256]
    assert full_bytes - lean_bytes == tables[1] - tables[0]
    back = decode_mbz(encode_mbz({}, {"w": lean})).tensors["w"]
    assert np.array_equal(back.decode(), lean.decode())


def test_step_codes_share_one_step_on_the_unfolded_weights():
    rng = np.random.default_rng(7)
    gain = rng.uniform(0.05, 4.0, 24).astype(np.float32) * rng.choice([-1, 1], 24)
    spread = np.linspace(0.1, 1.0, 24, dtype=np.float32)[:, None, None, None]
    unfolded = rng.standard_normal((24, 16, 3, 3)).astype(np.float32) * spread
    weight = unfolded * gain[:, None, None, None]
    tensor = step_quantize(weight, gain, 10)
    assert tensor.bits == step_bits(10) == 5 and np.all(tensor.zero_point == 16)
    codes = tensor.qdata.astype(int) - 16
    assert np.abs(codes).max() == 10  # the largest unfolded magnitude gets the largest code
    step = tensor.scale / np.abs(gain)  # float16 scales: equal to float16 precision
    assert np.ptp(step) / step.mean() < 2**-10
    # channels with small unfolded weights use few codes (what entropy coding makes cheap)
    largest = np.abs(codes).reshape(24, -1).max(axis=1)
    assert largest[:6].max() < 4 and largest[-1] >= 8


def test_step_sizes_between_whole_bits_trade_bytes_for_error():
    rng = np.random.default_rng(8)
    gain = rng.uniform(0.2, 2.0, 64).astype(np.float32)
    weight = rng.standard_normal((64, 96, 1, 1)).astype(np.float32) * gain[:, None, None, None]
    sizes, quality = [], []
    for max_code in STEP_CODES:
        tensor = step_quantize(weight, gain, max_code)
        tensor.entropy = None  # Huffman where smaller, as packed files store them
        sizes.append(section_bytes(tensor))
        quality.append(sqnr_db(weight, tensor.decode()))
    assert sizes == sorted(sizes) and len(set(sizes)) == len(sizes)
    assert quality == sorted(quality)
    three, four = (section_bytes(replace(uniform_quantize(weight, b, symmetric=True),
                                         entropy=None)) for b in (3, 4))
    assert any(three < size < four for size in sizes)  # a rate between 3 and 4 bits
