"""The runtime's validation of untrusted metadata (types, ranges, limits); bounded kernels."""

from __future__ import annotations

import copy
import time

import numpy as np
import pytest

from mbz.format import Limits, MbzFormatError
from mbz.runtime import Program, kernels
from mbz.runtime.graph import analyze

PREPROCESS = {"layout": "NHWC", "dtype": "uint8", "mean": [0.5, 0.5], "std": [0.25, 0.25]}
PARAMS = {
    "c.weight": np.ones((4, 2, 3, 3), np.float32),
    "c.bias": np.zeros(4, np.float32),
    "fc.weight": np.ones((3, 4), np.float32),
    "fc.bias": np.zeros(3, np.float32),
}


def base_graph() -> dict:
    """conv 3x3 -> quantize -> avgpool 2x2 -> global pool -> flatten -> linear on [2, 6, 6]."""
    conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1}
    pool = {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0]}
    quant = {"bits": 8, "scale": 0.05, "zero_point": 128}
    rows = [
        ("c", "conv2d", "input", {"weight": "c.weight", "bias": "c.bias"}, conv),
        ("q", "quantize", "c", {}, quant),
        ("p", "avgpool2d", "q", {}, pool),
        ("g", "global_avgpool", "p", {}, {}),
        ("f", "flatten", "g", {}, {}),
        ("fc", "linear", "f", {"weight": "fc.weight", "bias": "fc.bias"}, {}),
    ]
    nodes = [
        {"name": n, "op": op, "inputs": [i], "output": n, "params": p, "attrs": a}
        for n, op, i, p, a in rows
    ]
    return {"input": "input", "input_shape": [2, 6, 6], "output": "fc", "nodes": nodes}


def test_base_graph_runs():
    logits = Program(base_graph(), PARAMS, PREPROCESS).predict(np.zeros((2, 6, 6, 2), np.uint8))
    assert logits.shape == (2, 3) and np.isfinite(logits).all()


HOSTILE = {  # (node index or None for the graph, key path, value, what the error names)
    "op_list": (1, ("op",), ["quantize"], "op must be one of"),
    "op_dict": (1, ("op",), {"quantize": 1}, "op must be one of"),
    "op_int": (1, ("op",), 7, "op must be one of"),
    "name_surrogate": (1, ("name",), "\ud800", "name must be a non-empty UTF-8 string"),
    "output_list": (1, ("output",), ["q"], "output must be a non-empty"),
    "scale_huge_int": (1, ("attrs", "scale"), 10**400, "scale must be a finite float32"),
    "scale_above_float32": (1, ("attrs", "scale"), 3.5e38, "scale must be a finite float32"),
    "scale_tiny": (1, ("attrs", "scale"), 1e-45, "scale must be a normal float32"),
    "scale_subnormal": (1, ("attrs", "scale"), 1e-39, "scale must be a normal float32"),
    "scale_string": (1, ("attrs", "scale"), "0.1", "scale must be a number"),
    "scale_bool": (1, ("attrs", "scale"), True, "scale must be a number"),
    "bits_bool": (1, ("attrs", "bits"), True, "bits must be an integer"),
    "zero_point_huge": (1, ("attrs", "zero_point"), 10**400, "zero_point must be an integer"),
    "stride_huge": (0, ("attrs", "stride"), [2**63, 1], "stride 9223372036854775808 or dilation"),
    "dilation_huge": (0, ("attrs", "dilation"), [1, 10**400], "does not fit in input 6"),
    "padding_beyond_input": (0, ("attrs", "padding"), [7, 1], "padding 7 must be at most"),
    "padding_float": (0, ("attrs", "padding"), [1.0, 1], "padding must be a pair of integers"),
    "kernel_beyond_input": (2, ("attrs", "kernel"), [4001, 2], "does not fit in input"),
    "pool_padding": (2, ("attrs", "padding"), [1, 5], "at most half the kernel"),
    "groups_huge": (0, ("attrs", "groups"), 10**400, "does not fit"),
    "input_shape_float": (None, ("input_shape",), [2, 6.0, 6], "input_shape must be an integer"),
    "input_shape_huge": (None, ("input_shape",), [2, 10**400, 6], "input_shape must be an integer"),
    "input_name_list": (None, ("input",), ["input"], "graph: input must be a non-empty"),
}


@pytest.mark.parametrize("case", HOSTILE.values(), ids=HOSTILE.keys())
def test_hostile_graph_values_raise_format_errors(case):
    index, path, value, fragment = case
    graph = base_graph()
    target = graph if index is None else graph["nodes"][index]
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(MbzFormatError, match=fragment.replace("(", r"\(")):
        Program(graph, PARAMS, PREPROCESS)


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("mean", [10**400, 0.5], "mean must be a finite float32"),
        ("mean", ["0.5", 0.5], "mean must be a number"),
        ("std", [0.25, 1e-45], "std must be a normal float32"),
        ("std", [0.25, -1.0], "std must be a normal float32"),
        ("std", [0.25, 1e39], "std must be a finite float32"),
        ("std", 0.25, "std must be a list of 2 numbers"),
    ],
)
def test_hostile_preprocess_raises_format_errors(key, value, fragment):
    with pytest.raises(MbzFormatError, match=fragment):
        Program(base_graph(), PARAMS, {**PREPROCESS, key: value})


@pytest.mark.parametrize(
    ("limits", "fragment"),
    [
        (Limits(input_elements=71), "input_elements"),
        (Limits(macs=1000), "multiply-accumulates"),
        (Limits(activation_bytes=100), "activation_bytes"),
    ],
)
def test_limits_checked_by_shape_inference(limits, fragment):
    with pytest.raises(MbzFormatError, match=fragment):
        analyze(base_graph(), PARAMS, limits)


def test_cost_counts_macs_and_live_activations():
    _, cost = analyze(base_graph(), PARAMS, Limits())
    conv = 4 * 6 * 6 * 2 * 3 * 3  # outputs x (input channels x taps)
    elementwise_and_pools = 4 * 6 * 6 + 4 * 3 * 3 * 4 + 4 * 3 * 3 + 4 + 3 * 4
    assert cost.macs == conv + elementwise_and_pools
    # the largest moment: the conv's padded input (2x8x8) with its input (2x6x6) and output
    assert cost.peak_bytes == 4 * (2 * 8 * 8 + 2 * 6 * 6 + 4 * 6 * 6)


def test_predict_shrinks_batches_to_the_activation_budget(monkeypatch):
    program = Program(base_graph(), PARAMS, PREPROCESS)
    images = np.random.default_rng(0).integers(0, 256, (5, 6, 6, 2), dtype=np.uint8)
    whole = program.predict(images, batch_size=5)
    seen = []
    monkeypatch.setattr("mbz.runtime.program.BATCH_ACTIVATION_BYTES", 2 * program.cost.peak_bytes)
    split = program.predict(images, batch_size=5, progress=seen.append)
    assert seen == [2, 2, 1]
    np.testing.assert_array_equal(split, whole)


@pytest.mark.parametrize("budget", [10**9, 4096, 1])
def test_im2col_in_blocks_matches_one_block(budget, monkeypatch):
    """Blocks of whole images, of rows of one image, and of single rows give the same result."""
    rng = np.random.default_rng(1)
    x = rng.standard_normal((3, 9, 7, 4)).astype(np.float32)
    weight = kernels.prepare_grouped(rng.standard_normal((6, 2, 3, 3)).astype(np.float32), 2)
    bias = rng.standard_normal(6).astype(np.float32)
    args = (x, weight, bias, (3, 3), (2, 1), (1, 1), (1, 2))
    expected = kernels.conv_grouped(*args)
    monkeypatch.setattr(kernels, "SCRATCH_BYTES", budget)
    np.testing.assert_array_equal(kernels.conv_grouped(*args), expected)


def test_row_blocks_cover_every_row_once():
    for images, rows, row_bytes, budget in [(5, 4, 10, 100), (2, 7, 10, 25), (3, 3, 50, 1)]:
        cells = [
            (i, r)
            for image_slice, row_slice in kernels.row_blocks(images, rows, row_bytes, budget)
            for i in range(images)[image_slice]
            for r in range(rows)[row_slice]
        ]
        assert sorted(cells) == [(i, r) for i in range(images) for r in range(rows)]
        assert len(cells) == len(set(cells))


@pytest.mark.parametrize("op", [kernels.avgpool2d, kernels.maxpool2d])
def test_pooling_with_a_huge_kernel_is_vectorised(op):
    """A 1001 x 1001 window (a million taps) in well under a second: no loop over taps."""
    x = np.random.default_rng(2).standard_normal((1, 1001, 1003, 2)).astype(np.float32)
    start = time.perf_counter()
    out = op(x, (1001, 1001), (1, 1), (0, 0))
    assert time.perf_counter() - start < 1.0
    assert out.shape == (1, 1, 3, 2)
    for j in range(3):
        window = x[0, :, j : j + 1001].astype(np.float64)
        reference = window.mean(axis=(0, 1)) if op is kernels.avgpool2d else window.max(axis=(0, 1))
        np.testing.assert_allclose(out[0, 0, j], reference, rtol=1e-4, atol=1e-6)


def test_validation_does_not_mutate_the_graph():
    graph = base_graph()
    before = copy.deepcopy(graph)
    analyze(graph, PARAMS, Limits())
    assert graph == before
