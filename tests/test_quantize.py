"""Weight quantizers: codebooks and uniform codes, judged by SQNR in dB."""

import numpy as np
import pytest

from mbz.config import PackConfig
from mbz.format import CodebookTensor, DenseTensor, Encoding, Entropy, UniformTensor
from mbz.quantize import Coding, kmeans_1d, quantize_weight, uniform_quantize
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
    assert coded(weight, 4, method="uniform").entropy == Entropy.FIXED


def test_pack_options_reach_the_uniform_encoder(weight):
    tensor = coded(weight, 4, method="uniform", symmetric=True, per_channel=False)
    assert isinstance(tensor, UniformTensor) and tensor.axis is None
    assert tensor.scale.shape == (1,) and tensor.zero_point.tolist() == [8]
    assert isinstance(coded(weight, 4, method="kmeans"), CodebookTensor)
