"""Post-training correction (mbz.correct): each channel's mean and spread restored after the
weights are quantized, on small models and random images."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from mbz.capture import capture
from mbz.config import PackConfig
from mbz.correct import correct_quantization, restore_statistics
from mbz.fold import fold_batchnorm
from mbz.format import ScaledCodebookTensor
from mbz.pack import quantize_graph
from mbz.prune import prune_channels
from mbz.torch_graph import GraphModule, preprocess_images
from tests.helpers import narrow_mobilenet, recalibrate_batchnorm, sqnr_db

PREPROCESS = {"layout": "NHWC", "dtype": "uint8", "mean": [0.5] * 3, "std": [0.25] * 3}


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(0).integers(0, 256, (96, 32, 32, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def folded(images):
    model = recalibrate_batchnorm(narrow_mobilenet(seed=3), images[:64])
    captured = capture(model)
    graph, params = copy.deepcopy(captured.graph), dict(captured.params)
    fold_batchnorm(graph, params)
    return graph, params


def logits(graph: dict, params: dict, images: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return GraphModule(graph, params)(preprocess_images(images, PREPROCESS, "cpu")).numpy()


def decoded(tensors: dict) -> dict:
    return {name: tensor.decode() for name, tensor in tensors.items()}


def first_layer_means(graph: dict, params: dict, images: np.ndarray) -> np.ndarray:
    node = graph["nodes"][0]
    single = {**graph, "nodes": [node], "output": node["output"]}
    return logits(single, params, images).mean(axis=(0, 2, 3))


@pytest.mark.parametrize("method", ["kmeans", "uniform"])
def test_the_first_layer_gets_the_float_channel_means_back(folded, images, method):
    graph, params = folded
    config = PackConfig(bits={"conv": 3, "fc": 3}, method=method)
    tensors, _ = quantize_graph(graph, params, config, {})
    means = first_layer_means(graph, params, images[:64])
    assert not np.allclose(first_layer_means(graph, decoded(tensors), images[:64]), means)
    correct_quantization(graph, params, tensors, PREPROCESS, images[:64])
    # the first layer sees the true input, so on the calibration images its channel means are
    # the float ones exactly (up to float32 sums and the float16 bias's half a unit, 2**-12)
    bias = tensors[graph["nodes"][0]["params"]["bias"]].decode()
    np.testing.assert_allclose(
        first_layer_means(graph, decoded(tensors), images[:64]),
        means,
        atol=1e-4 * np.abs(means).max() + 2.0**-12 * np.abs(bias).max(),
    )


def test_correction_brings_3_bit_uniform_codes_closer_to_the_float_network(folded, images):
    # (a random network on random images: k-means codes gain little here; on trained
    # MobileNet-v2s the correction is worth 1 to 10 points of top-1, see the README)
    graph, params = folded
    tensors, _ = quantize_graph(graph, params, PackConfig(bits={"conv": 3}, method="uniform"), {})
    before = decoded(tensors)
    correct_quantization(graph, params, tensors, PREPROCESS, images[:64])
    reference, held_out = logits(graph, params, images[64:]), images[64:]
    assert sqnr_db(reference, logits(graph, decoded(tensors), held_out)) > sqnr_db(
        reference, logits(graph, before, held_out)
    ) + 3.0


def test_only_scales_and_biases_change(folded, images):
    graph, params = folded
    tensors, _ = quantize_graph(graph, params, PackConfig(bits={"conv": 3, "fc": 3}), {})
    original = copy.deepcopy(tensors)
    correct_quantization(graph, params, tensors, PREPROCESS, images[:32])
    for name, tensor in tensors.items():
        if isinstance(tensor, ScaledCodebookTensor):
            np.testing.assert_array_equal(tensor.indices, original[name].indices)
            np.testing.assert_array_equal(tensor.codebook, original[name].codebook)
            factor = tensor.scale.astype(np.float64) / original[name].scale
            assert np.all((factor > 0.49) & (factor < 2.01))


@pytest.mark.slow
def test_after_channel_pruning_each_batchnorm_gets_the_unpruned_statistics_back(images):
    model = recalibrate_batchnorm(narrow_mobilenet(seed=4), images[:64])
    captured = capture(model)
    graph, params = copy.deepcopy(captured.graph), dict(captured.params)
    reference = (copy.deepcopy(graph), dict(params))
    kept = prune_channels(graph, params, dict(captured.bn_gamma), 0.4)
    assert kept, "nothing was pruned"
    restore_statistics(reference, (graph, params), kept, PREPROCESS, images[:64])
    for node in (n for n in graph["nodes"] if n["op"] == "batchnorm"):
        want = outputs_of(reference, node["name"], images[:64])
        if node["name"] in kept:
            want = want[:, kept[node["name"]]]
        got = outputs_of((graph, params), node["name"], images[:64])
        for stat in (np.mean, np.std):
            np.testing.assert_allclose(
                stat(got, axis=(0, 2, 3)), stat(want, axis=(0, 2, 3)), rtol=1e-3, atol=1e-4
            )


def outputs_of(network: tuple[dict, dict], name: str, images: np.ndarray) -> np.ndarray:
    """The output of node ``name`` of ``network`` (graph, params) on ``images``."""
    graph, params = network
    nodes = graph["nodes"]
    end = next(i for i, n in enumerate(nodes) if n["name"] == name)
    prefix = {**graph, "nodes": nodes[: end + 1], "output": nodes[end]["output"]}
    return logits(prefix, params, images)
