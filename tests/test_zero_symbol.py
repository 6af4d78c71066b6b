"""Pruned weights stored as the symbol that decodes to 0.0 (no mask) when that is smaller."""

import json
from dataclasses import replace

import numpy as np
import pytest

from mbz.config import PackConfig
from mbz.format import MbzFormatError, Sparsity, read_mbz, write_mbz
from mbz.format.container import encode_tensor
from mbz.inspect import describe
from mbz.quantize import (
    ENCODERS,
    Coding,
    kmeans_1d,
    quantize_weight,
    smallest_layout,
    zero_symbol_layout,
)
from tests.helpers import invoke, narrow_mobilenet, save_mbz_checkpoint

CODINGS = [("kmeans", False), ("uniform", False), ("uniform", True)]


def sparse_weight(sparsity: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A conv weight with uneven channels and the keep-mask of its largest magnitudes."""
    rng = np.random.default_rng(seed)
    weight = rng.standard_normal((64, 32, 3, 3)) * rng.uniform(0.2, 2.0, (64, 1, 1, 1))
    weight = weight.astype(np.float32)
    return weight, np.abs(weight) > np.quantile(np.abs(weight), sparsity)


def section_bytes(tensor) -> int:
    return len(encode_tensor("w", tensor, 1)[1])


def layouts(weight, mask, method, symmetric, bits):
    """The mask layout and the zero-symbol layout (a codebook fitted with a centroid 0.0)."""
    coding = Coding.of(PackConfig(method=method, symmetric=symmetric), bits)
    masked = ENCODERS[coding.encoding](weight, coding, mask)
    pinned = ENCODERS[coding.encoding](weight, replace(coding, zero_symbol=True), mask)
    return coding, masked, zero_symbol_layout(pinned)


@pytest.mark.parametrize("method,symmetric", CODINGS)
@pytest.mark.parametrize("bits", [2, 4])
def test_a_70_percent_sparse_tensor_is_stored_in_the_smaller_layout(method, symmetric, bits):
    weight, mask = sparse_weight(0.7)
    coding, masked, zeroed = layouts(weight, mask, method, symmetric, bits)
    assert masked.mask is not None and zeroed is not None and zeroed.mask is None
    quantized = quantize_weight(weight, coding, mask)
    stored = smallest_layout(quantized)
    assert section_bytes(stored) <= min(section_bytes(masked), section_bytes(zeroed))
    decoded = stored.decode()
    assert np.array_equal(decoded, quantized.decode())  # a layout, not another quantization
    assert np.all(decoded[~mask] == 0.0) and np.all(zeroed.decode()[~mask] == 0.0)


def test_the_mask_stays_where_it_is_smaller_and_goes_where_it_is_not():
    # At 90% sparsity a CSR mask costs far less than a symbol per pruned weight; at 30% the
    # mask costs more than the pruned weights' short Huffman code.
    for sparsity, keeps_mask in ((0.9, True), (0.3, False)):
        weight, mask = sparse_weight(sparsity, seed=1)
        coding, masked, zeroed = layouts(weight, mask, "uniform", True, 4)
        stored = smallest_layout(quantize_weight(weight, coding, mask))
        assert (stored.mask is not None) == keeps_mask
        assert (section_bytes(masked) < section_bytes(zeroed)) == keeps_mask
        descriptor, _ = encode_tensor("w", stored, 1)
        assert (descriptor.sparsity != Sparsity.NONE) == keeps_mask


def test_a_pinned_codebook_keeps_its_kept_weights_as_accurate_as_under_a_mask():
    weight, mask = sparse_weight(0.5, seed=2)
    _, masked, zeroed = layouts(weight, mask, "kmeans", False, 3)
    assert 0.0 in zeroed.codebook and zeroed.codebook.size == 2**3 + 1  # one index bit wider
    assert zeroed.bits == 4 and masked.bits == 3
    error = [float(np.square(t.decode() - weight)[mask].sum()) for t in (masked, zeroed)]
    assert error[1] <= error[0] * 1.01


def test_kmeans_pins_zero_exactly():
    values = np.random.default_rng(3).uniform(0.5, 2.0, 1000)  # no value near zero
    centroids = kmeans_1d(values, 4, pin_zero=True)
    assert centroids.size == 4 and centroids[0] == 0.0 and centroids[1] > 0.5


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    folder = tmp_path_factory.mktemp("zero")
    model = save_mbz_checkpoint(folder / "m.pt", narrow_mobilenet())
    out = folder / "m.mbz"
    invoke("pack", model, "--prune", 0.3, "--prune-mode", "weight", "-o", out)
    return out


def test_inspect_shows_the_layers_stored_with_a_zero_symbol(packed):
    facts = describe(packed)
    rows = {row["mask_encoding"]: row for row in facts["layers"] if row["op"] != "tensor"}
    assert "zero_symbol" in rows and rows["zero_symbol"]["sparsity"] > 0.05
    assert any(row["mask_encoding"] in ("bitmap", "csr") for row in facts["layers"])
    mbz = read_mbz(packed)
    for name, layer in mbz.metadata["layers"].items():
        assert layer.get("zero_symbol", False) == (
            mbz.descriptors[layer["weight"]].sparsity == Sparsity.NONE and layer["sparsity"] > 0
        ), name
    assert "zero symbol" in invoke("inspect", packed).output
    rows = json.loads(invoke("inspect", packed, "--json").output)["layers"]
    assert any(row["mask_encoding"] == "zero_symbol" for row in rows)


def test_inspect_rejects_a_zero_symbol_flag_that_is_not_a_boolean(packed, tmp_path):
    mbz = read_mbz(packed)
    layer = next(iter(mbz.metadata["layers"]))
    mbz.metadata["layers"][layer]["zero_symbol"] = "yes"
    hostile = tmp_path / "hostile.mbz"
    write_mbz(hostile, mbz.metadata, mbz.tensors)
    with pytest.raises(MbzFormatError, match="zero_symbol"):
        describe(hostile)
