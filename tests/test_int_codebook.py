"""The integer codebook (SPEC.md 3.7): int8 centroids and a float16 scale per output channel,
from the encoder through the file, fine-tuning and the integer form every runtime accumulates."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mbz.config import PackConfig
from mbz.format import Encoding, IntCodebookTensor, decode_mbz, encode_mbz, read_mbz
from mbz.onnx.export import export_onnx
from mbz.onnx.session import OnnxProgram
from mbz.qat import IntCodebookWeight
from mbz.quantize import Coding, int_codebook_quantize, scaled_codebook_quantize
from mbz.runtime import load_program
from mbz.runtime.exact import all_exact, exact_layers, integer_weight
from mbz.torch_graph import GraphModule, image_batches
from tests.helpers import (
    invoke,
    random_model_and_data,
    sqnr_db,
)
from tests.test_quantize import uneven_channels

F32 = np.float32


def by_hand(tensor: IntCodebookTensor) -> np.ndarray:
    """SPEC.md 3.7 element by element: ``float32(scale[c]) * float32(codebook[index])``, 0 where
    pruned."""
    out = np.zeros(tensor.shape, F32)
    for position in np.ndindex(*tensor.shape):
        if tensor.mask is None or tensor.mask[position]:
            centroid = F32(int(tensor.codebook[tensor.indices[position]]))
            out[position] = F32(tensor.scale[position[0]]) * centroid
    return out


@pytest.mark.parametrize("pruned", [False, True])
def test_the_encoder_writes_int8_centroids_that_decode_as_the_spec_says(pruned):
    weight = uneven_channels(2)[:8]
    mask = np.abs(weight) > 0.2 if pruned else None
    tensor = int_codebook_quantize(weight, 4, mask)
    assert isinstance(tensor, IntCodebookTensor)
    assert tensor.codebook.dtype == np.int8 and tensor.scale.dtype == np.float16
    assert tensor.codebook.size <= 16 and np.abs(tensor.codebook).max() == 127
    np.testing.assert_array_equal(tensor.decode(), by_hand(tensor))
    read = decode_mbz(encode_mbz({}, {"w": tensor})).tensors["w"]
    assert isinstance(read, IntCodebookTensor)
    np.testing.assert_array_equal(read.codebook, tensor.codebook)
    np.testing.assert_array_equal(read.scale, tensor.scale)
    np.testing.assert_array_equal(read.decode(), by_hand(tensor))


def test_integer_weight_times_its_scale_is_the_decoded_weight_in_float32():
    weight = uneven_channels(3)
    tensor = int_codebook_quantize(weight, 3, np.abs(weight) > 0.1)
    integer = integer_weight(tensor)
    assert integer is not None and integer.values.dtype == np.int32
    assert integer.scale.dtype == F32 and integer.scale.shape == (weight.shape[0],)
    assert np.array_equal(integer.values[~tensor.mask], np.zeros((~tensor.mask).sum()))
    assert set(np.unique(integer.values)) <= {0, *tensor.codebook.tolist()}
    product = integer.values.astype(F32) * integer.scale[:, None, None, None]
    np.testing.assert_array_equal(product, tensor.decode())


@pytest.mark.parametrize("bits", [2, 3, 4, 5])
def test_int8_centroids_cost_under_a_tenth_of_a_decibel(bits):
    """A folded conv weight (channels spanning 100x): the integer codebook's error is the scaled
    codebook's within 0.1 dB. (At 6 bits the int8 grid costs about 0.15 dB, at 8 bits 2.6 dB:
    256 k-means centroids are finer than the 255 int8 steps near zero.)"""
    for seed in (0, 1):
        weight = uneven_channels(seed)
        scaled = scaled_codebook_quantize(weight, bits)
        integer = int_codebook_quantize(weight, bits)
        assert scaled is not None and integer is not None
        loss = sqnr_db(weight, scaled.decode()) - sqnr_db(weight, integer.decode())
        assert loss < 0.1


def test_fine_tuning_moves_integer_centroids_and_exports_what_it_trained():
    weight = uneven_channels(4)[:6]
    tensor = int_codebook_quantize(weight, 3)
    module = IntCodebookWeight(tensor, weight)
    target = torch.from_numpy(weight * F32(1.1))
    optimizer = torch.optim.SGD(module.parameters(), lr=3.0)
    for _ in range(3):
        optimizer.zero_grad()
        ((module() - target) ** 2).sum().backward()
        optimizer.step()
    exported = module.export(tensor)
    assert isinstance(exported, IntCodebookTensor) and exported.codebook.dtype == np.int8
    assert not np.array_equal(exported.codebook, tensor.codebook)
    with torch.no_grad():
        np.testing.assert_array_equal(module().numpy(), exported.decode())


@pytest.mark.parametrize(
    ("codebook", "act_bits", "encoding"),
    [
        ("auto", {}, Encoding.SCALED_CODEBOOK),
        ("auto", {"relu": 8}, Encoding.INT_CODEBOOK),
        ("int", {}, Encoding.INT_CODEBOOK),
        ("scaled", {"relu": 8}, Encoding.SCALED_CODEBOOK),
        ("plain", {"relu": 8}, Encoding.CODEBOOK),
    ],
)
def test_auto_takes_integer_centroids_when_activations_are_quantized(codebook, act_bits, encoding):
    config = PackConfig(method="kmeans", codebook=codebook, act_bits=act_bits)
    assert Coding.of(config, 4).encoding == encoding
    assert Coding.of(config, 16).encoding == Encoding.F16
    uniform = PackConfig(method="uniform", codebook=codebook, act_bits=act_bits)
    assert Coding.of(uniform, 4).encoding == Encoding.UNIFORM


def test_pack_help_names_the_integer_codebook():
    text = " ".join(invoke("pack", "--help").output.split())
    assert "int (SPEC 3.7" in text and "int when --act-bits quantizes activations" in text


def pack_int_codebook(workdir, *flags: object) -> tuple:
    """A narrow MobileNet-v2 packed with 4-bit k-means codebooks and ``flags`` (which must give
    integer codebooks), and its data."""
    (model, data), out = random_model_and_data(workdir, 5), workdir / "int.mbz"
    invoke("pack", model, "--bits", "conv=4,fc=4", *flags, "--data", data, "-o", out)
    mbz = read_mbz(out)
    weights = [t for name, t in mbz.tensors.items() if name.endswith("weight")]
    assert weights and all(isinstance(t, IntCodebookTensor) for t in weights)
    return out, data, mbz


@pytest.mark.slow
def test_numpy_torch_and_onnx_agree_on_a_packed_int_codebook_file(tmp_path):
    path, data, mbz = pack_int_codebook(tmp_path, "--codebook", "int")
    images = np.load(data)["x_test"]
    numpy_logits = load_program(path).predict(images)
    params = {name: tensor.decode() for name, tensor in mbz.tensors.items()}
    module = GraphModule(mbz.metadata["graph"], params).eval()
    with torch.no_grad():
        ((_, x),) = image_batches(images, mbz.metadata["preprocess"], "cpu", len(images))
        torch_logits = module(x).numpy()
    onnx_logits = OnnxProgram(export_onnx(mbz)).predict(images)
    for logits in (torch_logits, onnx_logits):
        assert (logits.argmax(1) == numpy_logits.argmax(1)).all()
        assert sqnr_db(numpy_logits, logits) > 60
    report = json.loads(invoke("eval", path, "--data", data, "--runtime", "all", "--json").output)
    assert report["ok"], report["failures"]


@pytest.mark.slow
def test_with_quantized_activations_every_layer_reading_codes_is_exact(tmp_path):
    """``--act-bits`` alone picks integer codebooks (auto), and they make the layers exact."""
    path, data, mbz = pack_int_codebook(tmp_path, "--act-bits", 8)
    graph = mbz.metadata["graph"]
    codes = {n["output"] for n in graph["nodes"] if n["op"] == "quantize"}
    reading = {
        n["name"] for n in graph["nodes"] if n["op"] in ("conv2d", "linear")
        and n["inputs"][0] in codes
    }
    assert reading and set(exact_layers(graph, mbz.tensors)) == reading
    assert all_exact(graph, mbz.tensors)  # so eval fails on any logit difference
    report = json.loads(invoke("eval", path, "--data", data, "--runtime", "all", "--json").output)
    assert report["ok"], report["failures"]
