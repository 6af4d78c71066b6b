"""The numpy runtime against torch: every op, small graphs, validation, predict and threads."""

from __future__ import annotations

import copy
import re
from collections.abc import Callable

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from mbz.format import DenseTensor, MbzFormatError, write_mbz
from mbz.runtime import Program, blas_threads, load_program, validate_graph
from mbz.runtime.codes import quantize
from mbz.runtime.threads import blas_controls
from tests.helpers import assert_runs_without_torch, sqnr_db

FLOAT_SQNR_DB = 80.0


def preprocess_for(channels: int) -> dict:
    """A valid preprocess object for ``channels`` input channels."""
    return {
        "layout": "NHWC",
        "dtype": "uint8",
        "mean": [0.1 * (c + 1) for c in range(channels)],
        "std": [0.2 + 0.05 * c for c in range(channels)],
    }


def node(name: str, op: str, inputs: list[str], params=None, attrs=None) -> dict:
    """A graph node whose output value is named like the node."""
    return {
        "name": name,
        "op": op,
        "inputs": inputs,
        "output": name,
        "params": params or {},
        "attrs": attrs or {},
    }


def conv_node(name: str, source: str, stride=1, padding=1, dilation=1, groups=1) -> dict:
    """A conv2d node reading ``source`` with params ``{name}.weight`` / ``{name}.bias``."""
    pair = lambda v: list(v) if isinstance(v, tuple) else [v, v]  # noqa: E731
    return node(
        name,
        "conv2d",
        [source],
        {"weight": f"{name}.weight", "bias": f"{name}.bias"},
        {
            "stride": pair(stride),
            "padding": pair(padding),
            "dilation": pair(dilation),
            "groups": groups,
        },
    )


def graph_of(nodes: list[dict], input_shape: list[int]) -> dict:
    """A graph whose output is its last node's output."""
    return {
        "input": "input",
        "input_shape": input_shape,
        "output": nodes[-1]["output"],
        "nodes": nodes,
    }


def program_of(nodes: list[dict], params: dict, input_shape: list[int]) -> Program:
    """A Program over ``nodes`` with a matching preprocess."""
    return Program(graph_of(nodes, input_shape), params, preprocess_for(input_shape[0]))


def randn(*shape: int, seed: int = 0) -> np.ndarray:
    """Reproducible float32 normal samples."""
    return np.random.default_rng(seed).standard_normal(shape).astype(np.float32)


def torch64(array: np.ndarray) -> torch.Tensor:
    """The array as a float64 torch tensor (the reference precision)."""
    return torch.from_numpy(np.asarray(array, dtype=np.float64))


# ------------------------------------------------------------------------------------ convs

CONV_CASES = {
    # id: (in_channels, out_channels, kernel, stride, padding, dilation, groups)
    "dense3x3": (8, 16, (3, 3), 1, 1, 1, 1),
    "depthwise": (16, 16, (3, 3), 1, 1, 1, 16),
    "depthwise_stride2": (16, 16, (3, 3), 2, 1, 1, 16),
    "depthwise_dilation2": (8, 8, (3, 3), 1, 2, 2, 8),
    "depthwise_multiplier": (8, 16, (3, 3), 1, 1, 1, 8),
    "grouped2": (8, 12, (3, 3), 1, 1, 1, 2),
    "pointwise": (8, 16, (1, 1), 1, 0, 1, 1),
    "pointwise_stride2": (8, 16, (1, 1), 2, 0, 1, 1),
    "pointwise_padded": (8, 4, (1, 1), 1, 1, 1, 1),
    "stride2": (8, 16, (3, 3), 2, 1, 1, 1),
    "padding0": (8, 16, (3, 3), 1, 0, 1, 1),
    "dilation2": (8, 16, (3, 3), 1, 2, 2, 1),
    "nonsquare": (6, 10, (3, 5), (2, 1), (1, 2), 1, 1),
    "nonsquare_grouped": (6, 9, (5, 3), (1, 2), (2, 0), (1, 2), 3),
    # large enough to be computed in several cache blocks (with a partial last block)
    "pointwise_blocks": (8, 600, (1, 1), 1, 0, 1, 1),
    "depthwise_blocks": (512, 512, (3, 3), 1, 1, 1, 512),
}


@pytest.mark.parametrize("activation", [None, "relu6"])
@pytest.mark.parametrize("case", CONV_CASES.values(), ids=CONV_CASES.keys())
def test_conv2d_matches_torch(case: tuple, activation: str | None) -> None:
    cin, cout, kernel, stride, padding, dilation, groups = case
    weight = randn(cout, cin // groups, *kernel, seed=1)
    bias = randn(cout, seed=2)
    nodes = [conv_node("conv", "input", stride, padding, dilation, groups)]
    if activation:  # a conv2d followed by its relu6 runs fused
        nodes.append(node("act", activation, ["conv"]))
    nodes.append(node("flat", "flatten", [nodes[-1]["output"]]))
    program = program_of(nodes, {"conv.weight": weight, "conv.bias": bias}, [cin, 11, 13])
    x = randn(2, cin, 11, 13, seed=3)
    ref = F.conv2d(torch64(x), torch64(weight), torch64(bias), stride, padding, dilation, groups)
    if activation:
        ref = F.relu6(ref)
    got = program.run(x)
    assert got.dtype == np.float32
    assert got.shape == (2, ref[0].numel())
    assert sqnr_db(ref.flatten(1).numpy(), got) > FLOAT_SQNR_DB


def test_conv_read_twice_is_not_fused() -> None:
    weight, bias = randn(4, 4, 3, 3, seed=1), randn(4, seed=2)
    nodes = [
        conv_node("conv", "input"),
        node("act", "relu", ["conv"]),
        node("sum", "add", ["act", "conv"]),
        node("flat", "flatten", ["sum"]),
    ]
    program = program_of(nodes, {"conv.weight": weight, "conv.bias": bias}, [4, 6, 6])
    x = randn(2, 4, 6, 6, seed=3)
    conv = F.conv2d(torch64(x), torch64(weight), torch64(bias), padding=1)
    ref = (F.relu(conv) + conv).flatten(1).numpy()
    assert sqnr_db(ref, program.run(x)) > FLOAT_SQNR_DB


# ------------------------------------------------------------------------- the other ops


def run_single(op_nodes: list[dict], x: np.ndarray, params: dict | None = None) -> np.ndarray:
    """Run ``op_nodes`` followed by a flatten on the NCHW batch ``x``."""
    nodes = [*op_nodes, node("flat", "flatten", [op_nodes[-1]["output"]])]
    return program_of(nodes, params or {}, list(x.shape[1:])).run(x)


def test_linear_matches_torch() -> None:
    weight, bias = randn(7, 12, seed=1), randn(7, seed=2)
    nodes = [
        node("flat", "flatten", ["input"]),
        node("fc", "linear", ["flat"], {"weight": "w", "bias": "b"}),
    ]
    program = program_of(nodes, {"w": weight, "b": bias}, [3, 2, 2])
    x = randn(5, 3, 2, 2, seed=3)
    ref = F.linear(torch64(x).flatten(1), torch64(weight), torch64(bias))
    assert sqnr_db(ref.numpy(), program.run(x)) > FLOAT_SQNR_DB


def test_flatten_uses_nchw_order() -> None:
    x = randn(2, 3, 4, 5)
    got = run_single([node("act", "relu", ["input"])], x)
    np.testing.assert_array_equal(got, np.maximum(x, 0).reshape(2, -1))


def test_batchnorm_on_feature_maps_and_flat_features() -> None:
    scale, shift = randn(4, seed=1), randn(4, seed=2)
    x = randn(3, 4, 5, 6, seed=3)
    params = {"s": scale, "t": shift}
    got = run_single([node("bn", "batchnorm", ["input"], {"scale": "s", "shift": "t"})], x, params)
    ref = x * scale[:, None, None] + shift[:, None, None]
    assert sqnr_db(ref.reshape(3, -1), got) > FLOAT_SQNR_DB
    nodes = [
        node("flat", "flatten", ["input"]),
        node("bn", "batchnorm", ["flat"], {"scale": "s", "shift": "t"}),
    ]
    flat = randn(3, 4, 1, 1, seed=4)
    got = program_of(nodes, params, [4, 1, 1]).run(flat)
    assert sqnr_db(flat.reshape(3, 4) * scale + shift, got) > FLOAT_SQNR_DB


@pytest.mark.parametrize(
    ("op", "reference"),
    [("relu", F.relu), ("relu6", F.relu6)],
)
def test_activations_match_torch(op: str, reference: Callable) -> None:
    x = 5 * randn(2, 3, 6, 6)
    got = run_single([node("act", op, ["input"])], x)
    np.testing.assert_array_equal(got, reference(torch.from_numpy(x)).flatten(1).numpy())


def test_in_place_activation_after_conv() -> None:
    weight, bias = randn(4, 3, 3, 3, seed=1), randn(4, seed=2)
    nodes = [conv_node("conv", "input"), node("act", "relu6", ["conv"])]
    x = randn(2, 3, 8, 8, seed=3)
    got = run_single(nodes, x, {"conv.weight": weight, "conv.bias": bias})
    ref = F.relu6(F.conv2d(torch64(x), torch64(weight), torch64(bias), padding=1))
    assert sqnr_db(ref.flatten(1).numpy(), got) > FLOAT_SQNR_DB


def test_add_matches_numpy_and_leaves_the_input_alone() -> None:
    x = randn(2, 1, 4, 4)  # one channel: the NHWC input is a view of the caller's array
    original = x.copy()
    nodes = [
        node("twice", "add", ["input", "input"]),
        node("act", "relu", ["input"]),
        node("sum", "add", ["act", "twice"]),
    ]
    got = run_single(nodes, x)
    np.testing.assert_array_equal(got, (np.maximum(original, 0) + 2 * original).reshape(2, -1))
    np.testing.assert_array_equal(x, original)


POOL_CASES = [((2, 2), (2, 2), (0, 0)), ((3, 3), (1, 1), (1, 1)), ((3, 2), (2, 1), (1, 0))]


@pytest.mark.parametrize(("kernel", "stride", "padding"), POOL_CASES)
@pytest.mark.parametrize("op", ["avgpool2d", "maxpool2d"])
def test_pooling_matches_torch(op: str, kernel: tuple, stride: tuple, padding: tuple) -> None:
    x = randn(2, 3, 9, 10)
    attrs = {"kernel": list(kernel), "stride": list(stride), "padding": list(padding)}
    got = run_single([node("pool", op, ["input"], attrs=attrs)], x)
    pool = F.avg_pool2d if op == "avgpool2d" else F.max_pool2d
    ref = pool(torch64(x), kernel, stride, padding)
    assert sqnr_db(ref.flatten(1).numpy(), got) > FLOAT_SQNR_DB


def test_global_avgpool_matches_torch() -> None:
    x = randn(2, 5, 7, 6)
    got = run_single([node("gap", "global_avgpool", ["input"])], x)
    ref = F.adaptive_avg_pool2d(torch64(x), 1).flatten(1)
    assert sqnr_db(ref.numpy(), got) > FLOAT_SQNR_DB


# -------------------------------------------------------------------------------- quantize

QUANT_CASES = [(8, 0.25, 0), (8, 0.1, 128), (4, 0.5, 3), (2, 1.0, 1), (1, 0.3, 0), (8, 0.0173, 77)]


def tie_values(scale: float, zero_point: int, bits: int) -> np.ndarray:
    """Random values plus values at exact .5 ties of ``x * (1 / scale)``, across the range."""
    inv = np.float32(1) / np.float32(scale)
    ties = (np.arange(-(2**bits) - 4, 2**bits + 4, dtype=np.float32) + np.float32(0.5)) / inv
    exact = ties[(ties * inv) % 1 == 0.5]
    noise = np.float32(scale) * 2**bits * randn(4000, seed=bits)
    return np.concatenate([exact, noise, [0.0, -0.0, 1e30, -1e30]]).astype(np.float32)


@pytest.mark.parametrize(("bits", "scale", "zero_point"), QUANT_CASES)
def test_quantize_equals_torch_fake_quantize(bits: int, scale: float, zero_point: int) -> None:
    x = tie_values(scale, zero_point, bits)
    ref = torch.fake_quantize_per_tensor_affine(
        torch.from_numpy(x), scale, zero_point, 0, 2**bits - 1
    ).numpy()
    assert np.array_equal(quantize(x, bits, scale, zero_point), ref)
    attrs = {"bits": bits, "scale": scale, "zero_point": zero_point}
    image = x[: x.size // 4 * 4].reshape(-1, 1, 2, 2)
    got = run_single([node("q", "quantize", ["input"], attrs=attrs)], image)
    assert np.array_equal(got, ref[: image.size].reshape(got.shape))


def test_quantize_ties_round_half_even() -> None:
    x = np.array([0.5, 1.5, 2.5, -0.5, 3.5], dtype=np.float32)
    np.testing.assert_array_equal(quantize(x, 8, 1.0, 4), [0.0, 2.0, 2.0, 0.0, 4.0])


# ---------------------------------------------------------------------------- a small graph

RESIDUAL_NODES = [
    conv_node("c1", "input"),
    node("bn", "batchnorm", ["c1"], {"scale": "bn.scale", "shift": "bn.shift"}),
    node("act", "relu6", ["bn"]),
    conv_node("c2", "act", groups=4),
    node("sum", "add", ["c2", "input"]),
    node("gap", "global_avgpool", ["sum"]),
    node("flat", "flatten", ["gap"]),
    node("fc", "linear", ["flat"], {"weight": "fc.weight", "bias": "fc.bias"}),
]


def residual_params() -> dict[str, np.ndarray]:
    """Random parameters of ``RESIDUAL_NODES`` (4 channels, 10 classes)."""
    shapes = {
        "c1.weight": (4, 4, 3, 3),
        "c1.bias": (4,),
        "bn.scale": (4,),
        "bn.shift": (4,),
        "c2.weight": (4, 1, 3, 3),
        "c2.bias": (4,),
        "fc.weight": (10, 4),
        "fc.bias": (10,),
    }
    return {name: randn(*shape, seed=i) for i, (name, shape) in enumerate(shapes.items())}


def residual_torch(x: np.ndarray, p: dict[str, np.ndarray]) -> np.ndarray:
    """``RESIDUAL_NODES`` computed by torch in float64."""
    t = {name: torch64(v) for name, v in p.items()}
    y = F.conv2d(torch64(x), t["c1.weight"], t["c1.bias"], padding=1)
    y = F.relu6(y * t["bn.scale"][:, None, None] + t["bn.shift"][:, None, None])
    y = F.conv2d(y, t["c2.weight"], t["c2.bias"], padding=1, groups=4) + torch64(x)
    return F.linear(y.mean(dim=(2, 3)), t["fc.weight"], t["fc.bias"]).numpy()


def test_residual_graph_matches_torch() -> None:
    params = residual_params()
    program = program_of(RESIDUAL_NODES, params, [4, 10, 10])
    x = randn(3, 4, 10, 10, seed=9)
    got = program.run(x)
    assert got.shape == (3, 10)
    assert sqnr_db(residual_torch(x, params), got) > FLOAT_SQNR_DB


# ------------------------------------------------------------------------------ validation


def _set(path: tuple, value) -> Callable[[dict, dict], None]:
    def mutate(graph: dict, params: dict) -> None:
        target = graph
        for key in path[:-1]:
            target = target[key]
        target[path[-1]] = value

    return mutate


def _drop_tensor(name: str) -> Callable[[dict, dict], None]:
    return lambda graph, params: params.pop(name)


def _reshape_tensor(name: str, shape: tuple) -> Callable[[dict, dict], None]:
    return lambda graph, params: params.__setitem__(name, np.zeros(shape, np.float32))


BAD_GRAPHS = {
    "unknown_op": (_set(("nodes", 2, "op"), "gelu"), "act"),
    "undefined_input": (_set(("nodes", 1, "inputs"), ["nope"]), "bn"),
    "later_input": (_set(("nodes", 1, "inputs"), ["act"]), "bn"),
    "missing_param_key": (_set(("nodes", 0, "params"), {"weight": "c1.weight"}), "c1"),
    "extra_param_key": (_set(("nodes", 2, "params"), {"x": "c1.bias"}), "act"),
    "missing_tensor": (_drop_tensor("c2.bias"), "c2"),
    "missing_attr": (_set(("nodes", 0, "attrs"), {"stride": [1, 1]}), "c1"),
    "zero_stride": (_set(("nodes", 0, "attrs", "stride"), [0, 1]), "c1"),
    "bool_groups": (_set(("nodes", 0, "attrs", "groups"), True), "c1"),
    "string_padding": (_set(("nodes", 3, "attrs", "padding"), "1"), "c2"),
    "negative_padding": (_set(("nodes", 3, "attrs", "padding"), [-1, 1]), "c2"),
    "groups_mismatch": (_set(("nodes", 3, "attrs", "groups"), 3), "c2"),
    "conv_weight_3d": (_reshape_tensor("c1.weight", (4, 4, 3)), "c1"),
    "conv_weight_channels": (_reshape_tensor("c1.weight", (4, 3, 3, 3)), "c1"),
    "conv_bias_size": (_reshape_tensor("c1.bias", (5,)), "c1"),
    "linear_weight": (_reshape_tensor("fc.weight", (10, 5)), "fc"),
    "batchnorm_size": (_reshape_tensor("bn.shift", (3,)), "bn"),
    "add_one_input": (_set(("nodes", 4, "inputs"), ["c2"]), "sum"),
    "add_shape_mismatch": (_set(("nodes", 4, "inputs"), ["c2", "gap"]), "sum"),
    "redefined_output": (_set(("nodes", 2, "output"), "bn"), "act"),
    "duplicate_name": (_set(("nodes", 2, "name"), "bn"), "bn"),
    "linear_on_feature_map": (_set(("nodes", 7, "inputs"), ["gap"]), "fc"),
    "window_too_large": (_set(("nodes", 0, "attrs", "dilation"), [9, 9]), "c1"),
}


@pytest.mark.parametrize(("mutate", "name"), BAD_GRAPHS.values(), ids=BAD_GRAPHS.keys())
def test_validate_graph_rejects(mutate: Callable, name: str) -> None:
    graph, params = graph_of(copy.deepcopy(RESIDUAL_NODES), [4, 10, 10]), residual_params()
    validate_graph(graph, params)
    mutate(graph, params)
    with pytest.raises(MbzFormatError, match=re.escape(repr(name))):
        validate_graph(graph, params)
    with pytest.raises(MbzFormatError):
        Program(graph, params, preprocess_for(4))


QUANTIZE_ATTRS = [
    {"bits": 9, "scale": 0.1, "zero_point": 0},
    {"bits": 0, "scale": 0.1, "zero_point": 0},
    {"bits": 8, "scale": float("nan"), "zero_point": 0},
    {"bits": 8, "scale": 0.0, "zero_point": 0},
    {"bits": 8, "scale": 1e300, "zero_point": 0},
    {"bits": 8, "scale": "0.1", "zero_point": 0},
    {"bits": 8, "scale": 0.1, "zero_point": 256},
    {"bits": 4, "scale": 0.1, "zero_point": 16},
    {"bits": 8, "scale": 0.1, "zero_point": 1.0},
    {"bits": 8, "scale": 0.1},
]


@pytest.mark.parametrize("attrs", QUANTIZE_ATTRS)
def test_validate_graph_rejects_quantize_attrs(attrs: dict) -> None:
    nodes = [node("quant", "quantize", ["input"], attrs=attrs), node("flat", "flatten", ["quant"])]
    with pytest.raises(MbzFormatError, match="'quant'"):
        validate_graph(graph_of(nodes, [3, 4, 4]), {})


@pytest.mark.parametrize(
    "graph",
    [
        [],
        {"input": "input", "input_shape": [3, 4, 4], "output": "x"},
        {"input": "input", "input_shape": [3, 4], "output": "x", "nodes": []},
        {"input": "input", "input_shape": [3, 4, 4], "output": "x", "nodes": []},
        {"input": "input", "input_shape": [3, 4, 4], "output": "x", "nodes": {}},
        graph_of([node("flat", "flatten", ["input"])], [3, 4, 4]) | {"output": "missing"},
        graph_of([node("act", "relu", ["input"])], [3, 4, 4]),  # output is not [classes]
        graph_of([node("act", "relu", ["input"])], [3, 1 << 20, 1 << 20]),
    ],
)
def test_validate_graph_rejects_malformed_graphs(graph) -> None:
    with pytest.raises(MbzFormatError):
        validate_graph(graph, {})


@pytest.mark.parametrize(
    "change",
    [
        {"layout": "NCHW"},
        {"dtype": "float32"},
        {"mean": [0.5, 0.5]},
        {"std": [1.0, 0.0, 1.0]},
        {"std": [1.0, float("inf"), 1.0]},
        {"mean": [0.5, "0.5", 0.5]},
        {"extra": 1},
    ],
)
def test_program_rejects_bad_preprocess(change: dict) -> None:
    nodes = [node("flat", "flatten", ["input"])]
    with pytest.raises(MbzFormatError, match="preprocess"):
        Program(graph_of(nodes, [3, 2, 2]), {}, preprocess_for(3) | change)


# --------------------------------------------------------------------------------- predict


POOL_2X2 = {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0]}


def small_program() -> Program:
    """A conv/depthwise/pool classifier on 3x12x12 images."""
    nodes = [
        conv_node("c1", "input"),
        node("a1", "relu", ["c1"]),
        conv_node("c2", "a1", stride=2, groups=8),
        node("q", "quantize", ["c2"], attrs={"bits": 8, "scale": 0.05, "zero_point": 128}),
        node("pool", "maxpool2d", ["q"], attrs=POOL_2X2),
        node("flat", "flatten", ["pool"]),
        node("fc", "linear", ["flat"], {"weight": "fc.weight", "bias": "fc.bias"}),
    ]
    shapes = {
        "c1.weight": (8, 3, 3, 3),
        "c1.bias": (8,),
        "c2.weight": (8, 1, 3, 3),
        "c2.bias": (8,),
        "fc.weight": (10, 72),
        "fc.bias": (10,),
    }
    params = {name: randn(*shape, seed=i) for i, (name, shape) in enumerate(shapes.items())}
    return program_of(nodes, params, [3, 12, 12])


def images(count: int) -> np.ndarray:
    """Random uint8 NHWC images."""
    return np.random.default_rng(5).integers(0, 256, (count, 12, 12, 3), dtype=np.uint8)


def test_predict_chunks_agree_and_report_progress() -> None:
    program, batch = small_program(), images(37)
    counts: list[int] = []
    chunked = program.predict(batch, batch_size=5, progress=counts.append)
    whole = program.predict(batch, batch_size=64)
    assert chunked.shape == (37, 10)
    assert counts == [5] * 7 + [2]
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-5)
    nchw = program.preprocess_images(batch).transpose(0, 3, 1, 2)
    np.testing.assert_allclose(program.run(nchw), whole, rtol=1e-5, atol=1e-5)


def test_predict_empty_and_bad_input() -> None:
    program = small_program()
    assert program.predict(images(0)).shape == (0, 10)
    with pytest.raises(ValueError):
        program.predict(images(2)[:, :, :6])
    with pytest.raises(ValueError):
        program.predict(images(2), batch_size=0)
    with pytest.raises(ValueError):
        program.run(np.zeros((2, 12, 12, 3), np.float32))


def test_preprocess_formula() -> None:
    program, batch = small_program(), images(3)
    pre = preprocess_for(3)
    mean, std = np.float32(pre["mean"]), np.float32(pre["std"])
    expected = ((batch.astype(np.float32) / np.float32(255)) - mean) / std
    got = program.preprocess_images(batch)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)


def test_peak_activation_bytes() -> None:
    program = small_program()
    program.predict(images(8), batch_size=4)
    every_value = sum(4 * int(np.prod(shape)) for shape in program.value_shapes.values())
    largest = max(4 * int(np.prod(shape)) for shape in program.value_shapes.values())
    assert largest < program.last_peak_bytes_per_image < every_value


def test_load_program_round_trip(tmp_path) -> None:
    params = residual_params()
    metadata = {"graph": graph_of(RESIDUAL_NODES, [4, 10, 10]), "preprocess": preprocess_for(4)}
    path = tmp_path / "model.mbz"
    write_mbz(path, metadata, {name: DenseTensor(value) for name, value in params.items()})
    x = randn(2, 4, 10, 10, seed=9)
    direct = program_of(RESIDUAL_NODES, params, [4, 10, 10])
    np.testing.assert_array_equal(load_program(path).run(x), direct.run(x))


# ----------------------------------------------------------------------------- environment


def test_blas_threads_sets_and_restores() -> None:
    controls = blas_controls()
    if not controls:
        pytest.skip("no known BLAS library found in this process")
    before = [control.get() for control in controls]
    with blas_threads(1):
        assert [control.get() for control in controls] == [1] * len(controls)
    assert [control.get() for control in controls] == before
    with pytest.raises(ValueError):
        with blas_threads(0):
            pass


def test_runtime_runs_without_torch() -> None:
    assert_runs_without_torch(
        "import numpy as np\n"
        "from mbz.runtime import Program\n"
        "graph = {'input': 'x', 'input_shape': [1, 2, 2], 'output': 'f',\n"
        "         'nodes': [{'name': 'f', 'op': 'flatten', 'inputs': ['x'], 'output': 'f',\n"
        "                    'params': {}, 'attrs': {}}]}\n"
        "pre = {'layout': 'NHWC', 'dtype': 'uint8', 'mean': [0.0], 'std': [1.0]}\n"
        "out = Program(graph, {}, pre).predict(np.zeros((3, 2, 2, 1), np.uint8))\n"
        "assert out.shape == (3, 4)"
    )
