"""How far the runtimes are from bit-exact agreement (issue 14): the largest logit difference that
`mbz eval` reports, and activation codes on exact rounding boundaries."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from mbz.data import load_split
from mbz.evaluate import EvalResult
from mbz.format import DenseTensor, UniformTensor, read_mbz
from mbz.onnx.export import export_onnx
from mbz.onnx.session import OnnxProgram
from mbz.runtime import Program, load_program
from mbz.runtime.codes import encode, quantize
from mbz.runtime.exact import exact_layers, exact_nodes
from mbz.torch_graph import GraphModule, image_batches
from mbz.verify import Report, check_report, verify
from tests.helpers import (
    invoke,
    random_model_and_data,
    sqnr_db,
)

F32 = np.float32


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """(a .mbz with 8-bit weights and 8-bit activations, an npz of random images)."""
    workdir = tmp_path_factory.mktemp("exact")
    (model, data), out = random_model_and_data(workdir, 3), workdir / "a8.mbz"
    invoke("pack", model, "--bits", "conv=8,fc=8", "--act-bits", 8, "--calib", "min-max",
           "--data", data, "-o", out)
    return out, data


def torch_logits(path, images: np.ndarray) -> np.ndarray:
    """The file's logits from its graph run as the torch fake-quant module, in one batch."""
    mbz = read_mbz(path)
    module = GraphModule.of_tensors(mbz.metadata["graph"], mbz.tensors).eval()
    with torch.no_grad():
        (_, x), = image_batches(images, mbz.metadata["preprocess"], "cpu", len(images))
        return module(x).numpy()


def test_eval_reports_largest_logit_difference_of_each_pair(packed):
    path, data = packed
    images = np.load(data)["x_test"]
    logits = {
        "numpy": load_program(path).predict(images),
        "torch": torch_logits(path, images),
        "onnx": OnnxProgram(export_onnx(read_mbz(path))).predict(images),
    }
    expected = {
        f"{a}/{b}": float(np.abs(logits[a].astype(np.float64) - logits[b]).max())
        for a, b in (("numpy", "torch"), ("numpy", "onnx"), ("torch", "onnx"))
    }
    # the exit status is left alone: with quantized activations the runtimes may disagree
    command = ("eval", path, "--data", data, "--runtime", "all")
    report = json.loads(invoke(*command, "--json", expect=None).stdout)
    assert report["max_logit_difference"] == expected
    assert report["agreement"]["numpy/torch"] == np.mean(
        logits["numpy"].argmax(1) == logits["torch"].argmax(1)
    )
    text = invoke(*command, expect=None).stdout
    for pair, value in expected.items():
        assert f"agreement {pair}: " in text and f"largest logit difference {value:.3g}" in text


def test_single_runtime_reports_no_pairs(packed):
    path, data = packed
    report = json.loads(invoke("eval", path, "--data", data, "--json", expect=None).stdout)
    assert report["agreement"] == {} and report["max_logit_difference"] == {}


def within_ulps(x: np.float32, steps: int = 3) -> list[np.float32]:
    """The float32 values at most ``steps`` units in the last place from ``x``, ascending."""
    down, up = [x], [x]
    for _ in range(steps):
        down.append(np.nextafter(down[-1], F32(-np.inf)))
        up.append(np.nextafter(up[-1], F32(np.inf)))
    return down[::-1] + up[1:]


def boundary_values(scale: float, zero_point: int, bits: int) -> tuple[np.ndarray, np.ndarray]:
    """(float32 x whose float32 product with float32(1 / scale) is exactly k + 0.5, for every
    k in the code range that has one, and those products)."""
    inv = F32(1) / F32(scale)
    ties = np.arange(-zero_point, 2**bits - zero_point, dtype=np.float64) - 0.5
    found = []
    for tie in ties:
        found += [x for x in within_ulps(F32(tie / float(inv))) if float(x * inv) == tie][:1]
    xs = np.array(found, dtype=F32)
    return xs, (xs * inv).astype(np.float64)


@pytest.mark.parametrize(
    ("scale", "zero_point", "bits"),
    [(2.0**-4, 0, 8), (2.0**-3, 7, 4), (float(F32(6 / 255)), 0, 8), (float(F32(0.0371)), 131, 8),
     (float(F32(0.3)), 5, 4)],
)
def test_rounding_boundaries_give_the_same_codes_in_numpy_and_torch(scale, zero_point, bits):
    xs, products = boundary_values(scale, zero_point, bits)
    assert len(xs) >= 2**bits // 2  # most ties k + 0.5 are reachable from some float32 x
    top = 2**bits - 1
    # round half to even, then the zero point, then the clamp: Python's round() is half-even
    expected = np.array([min(max(round(p) + zero_point, 0), top) for p in products])
    # just below and just above each tie as well: the neighbouring codes must also agree
    below = np.nextafter(xs, F32(-np.inf))
    above = np.nextafter(xs, F32(np.inf))
    everything = np.concatenate([xs, below, above])

    codes = encode(everything, bits, scale, zero_point)
    numpy_values = quantize(everything, bits, scale, zero_point)
    torch_values = torch.fake_quantize_per_tensor_affine(
        torch.from_numpy(everything), scale, zero_point, 0, top
    ).numpy()
    numpy_codes = np.rint(numpy_values.astype(np.float64) / scale).astype(int) + zero_point
    torch_codes = np.rint(torch_values.astype(np.float64) / scale).astype(int) + zero_point

    assert np.array_equal(numpy_codes[: len(xs)], expected)
    different = np.flatnonzero(numpy_codes != torch_codes)
    assert different.size == 0, (
        f"x {everything[different]} -> numpy codes {numpy_codes[different]}, "
        f"torch codes {torch_codes[different]}"
    )
    assert numpy_values.tobytes() == torch_values.tobytes()
    if bits == 8:  # one code per byte: the stored codes themselves
        assert np.array_equal(codes.data, numpy_codes.astype(np.uint8))


# ------------------------------------------------------------------ the numpy runtime's exact path

ACT_SCALE = 2.0**-4  # a power of two: the input x = (q - z) * scale quantizes back to q exactly


def layer_node(name: str, op: str, source: str, **attrs) -> dict:
    """A graph node whose output value is named like the node (weight and bias when it has
    ``{name}.weight``/``{name}.bias`` tensors: conv2d and linear)."""
    params = {"weight": f"{name}.weight", "bias": f"{name}.bias"}
    return {"name": name, "op": op, "inputs": [source], "output": name,
            "params": params if op in ("conv2d", "linear") else {}, "attrs": attrs}


def conv_attrs(stride: int = 1, padding: int = 0, groups: int = 1) -> dict:
    return {"stride": [stride] * 2, "padding": [padding] * 2, "dilation": [1, 1], "groups": groups}


def quantize_node(name: str, source: str, zero_point: int, scale: float = ACT_SCALE) -> dict:
    return layer_node(name, "quantize", source, bits=8, scale=scale, zero_point=zero_point)


def uniform_layer(name: str, shape: tuple[int, ...], low: int, seed: int) -> dict:
    """``{name}.weight``: 8-bit uniform codes in [low, 255] with a zero point and float32 scale
    per output channel; ``{name}.bias``: float32."""
    rng = np.random.default_rng(seed)
    out = shape[0]
    weight = UniformTensor(
        qdata=rng.integers(low, 256, shape, dtype=np.uint8),
        scale=rng.uniform(1e-3, 2e-2, out).astype(F32),
        zero_point=rng.integers(0, 3, out).astype(np.uint8),
        bits=8,
        axis=0,
    )
    bias = DenseTensor(rng.normal(0, 1, out).astype(F32))
    return {f"{name}.weight": weight, f"{name}.bias": bias}


def run_exact(nodes: list[dict], tensors: dict, codes: np.ndarray, zero_point: int) -> np.ndarray:
    """The graph ``input -> nodes`` run by the numpy runtime with its exact plan, on the input
    whose first quantize gives ``codes`` [N, C, H, W] with ``zero_point``."""
    graph = {"input": "input", "input_shape": list(codes.shape[1:]),
             "output": nodes[-1]["output"], "nodes": nodes}
    channels = codes.shape[1]
    preprocess = {"layout": "NHWC", "dtype": "uint8", "mean": [0.0] * channels,
                  "std": [1.0] * channels}
    params = {name: tensor.decode() for name, tensor in tensors.items()}
    plan = exact_layers(graph, tensors)
    program = Program(graph, params, preprocess, exact=plan)
    x = ((codes.astype(F32) - F32(zero_point)) * F32(ACT_SCALE)).astype(F32)
    return program.run(x)


def integer_weight_of(tensor: UniformTensor) -> np.ndarray:
    view = (-1,) + (1,) * (tensor.qdata.ndim - 1)
    return tensor.qdata.astype(np.int64) - tensor.zero_point.astype(np.int64).reshape(view)


def reference_conv(a: np.ndarray, w: np.ndarray, stride: int, padding: int, groups: int):
    """The int64 convolution of a [N, C, H, W] by w [O, C/groups, kH, kW] (zero padding)."""
    n, _, h, width = a.shape
    out_channels, per_group, kh, kw = w.shape
    padded = np.pad(a, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
    ho, wo = (h + 2 * padding - kh) // stride + 1, (width + 2 * padding - kw) // stride + 1
    out = np.zeros((n, out_channels, ho, wo), np.int64)
    per_out = out_channels // groups
    for i in range(kh):
        for j in range(kw):
            patch = padded[:, :, i : i + stride * ho : stride, j : j + stride * wo : stride]
            for g in range(groups):
                inputs = patch[:, g * per_group : (g + 1) * per_group]
                taps = w[g * per_out : (g + 1) * per_out, :, i, j]
                out[:, g * per_out : (g + 1) * per_out] += np.einsum("nchw,oc->nohw", inputs, taps)
    return out


def reference_epilogue(acc: np.ndarray, tensors: dict, name: str, channel_axis: int) -> np.ndarray:
    """``float32(acc) * (float32(s_a) * float32(s_w[c])) + bias[c]``, one float32 op at a time."""
    weight, bias = tensors[f"{name}.weight"], tensors[f"{name}.bias"].values
    view = [1] * acc.ndim
    view[channel_axis] = -1
    multiplier = (F32(ACT_SCALE) * weight.scale).astype(F32).reshape(view)
    y = acc.astype(np.float64).astype(F32)  # exact integer -> float32, round half even
    y = (y * multiplier).astype(F32)
    return (y + bias.reshape(view)).astype(F32)


@pytest.mark.parametrize(
    ("channels", "out", "kernel", "stride", "padding", "groups", "low", "beyond_float32"),
    [
        (64, 8, 3, 1, 1, 1, 200, True),  # bound 255 * 255 * 576 = 37.5M > 2^24: chunks
        (80, 12, 3, 2, 1, 2, 200, True),  # grouped, strided
        (400, 16, 1, 1, 0, 1, 200, True),  # pointwise over 400 channels
        (400, 16, 1, 2, 0, 1, 200, True),  # strided pointwise
        (40, 16, 1, 1, 0, 1, 0, False),  # pointwise within the float32 bound
        (24, 24, 3, 1, 1, 24, 0, False),  # depthwise 3x3
        (6, 6, 21, 1, 2, 6, 200, True),  # depthwise 21x21: one channel's sum exceeds 2^24
    ],
)
def test_numpy_exact_conv_equals_an_integer_reference(
    channels, out, kernel, stride, padding, groups, low, beyond_float32
):
    tensors = uniform_layer("conv", (out, channels // groups, kernel, kernel), low, seed=channels)
    size = max(9, kernel)
    codes = np.random.default_rng(out).integers(low, 256, (3, channels, size, size))
    nodes = [quantize_node("q", "input", 0), layer_node("conv", "conv2d", "q", **conv_attrs(
        stride, padding, groups)), layer_node("flat", "flatten", "conv")]
    (plan,) = exact_layers({"nodes": nodes}, tensors).values()
    assert plan.float32_exact != beyond_float32
    acc = reference_conv(codes, integer_weight_of(tensors["conv.weight"]), stride, padding, groups)
    if beyond_float32:  # the reference's sums exceed what one float32 reduction holds
        assert np.abs(acc).max() >= 2**24
    expected = reference_epilogue(acc, tensors, "conv", channel_axis=1)
    got = run_exact(nodes, tensors, codes, zero_point=0).reshape(expected.shape)
    assert got.tobytes() == expected.tobytes()


def test_numpy_exact_linear_and_fused_quantize_equal_an_integer_reference():
    features, zero_point = 1280, 117
    tensors = uniform_layer("fc", (10, features), 0, seed=5)
    codes = np.random.default_rng(6).integers(0, 256, (4, features, 1, 1))
    out_scale = float(F32(0.05))
    nodes = [layer_node("flat", "flatten", "input"), quantize_node("q", "flat", zero_point),
             layer_node("fc", "linear", "q"), quantize_node("out", "fc", 100, out_scale)]
    (plan,) = exact_layers({"nodes": nodes}, tensors).values()
    assert not plan.float32_exact  # bound 138 * 255 * 1280 = 45M: float32 chunks
    acc = (codes[:, :, 0, 0] - zero_point) @ integer_weight_of(tensors["fc.weight"]).T
    y = reference_epilogue(acc, tensors, "fc", channel_axis=1)
    q = np.clip(np.rint(y * (F32(1) / F32(out_scale))) + F32(100), F32(0), F32(255))
    expected = ((q - F32(100)) * F32(out_scale)).astype(F32)
    got = run_exact(nodes, tensors, codes, zero_point)
    assert got.tobytes() == expected.tobytes()


@pytest.mark.parametrize("op", ["avgpool2d", "global_avgpool"])
def test_numpy_pooling_of_codes_is_an_integer_sum_times_scale_over_window(op):
    zero_point, scale = 37, float(F32(0.0371))
    codes = np.random.default_rng(7).integers(0, 256, (2, 5, 7, 7))
    attrs = {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]} if op == "avgpool2d" else {}
    nodes = [quantize_node("q", "input", zero_point, scale), layer_node("pool", op, "q", **attrs),
             layer_node("flat", "flatten", "pool")]
    integers = codes - zero_point
    if op == "avgpool2d":  # padding counts as 0, and in the divisor
        padded = np.pad(integers, ((0, 0), (0, 0), (1, 1), (1, 1)))
        sums = sum(padded[:, :, i : i + 7 : 2, j : j + 7 : 2] for i in range(3) for j in range(3))
        window = 9
    else:
        sums, window = integers.sum(axis=(2, 3)), 49
    expected = (sums.astype(F32) * F32(scale)) / F32(window)
    # x = (q - z) * scale quantizes back to q (x * float32(1 / scale) is within 1e-6 of q - z)
    x = ((codes.astype(F32) - F32(zero_point)) * F32(scale)).astype(F32)
    graph = {"input": "input", "input_shape": [5, 7, 7], "output": "flat", "nodes": nodes}
    preprocess = {"layout": "NHWC", "dtype": "uint8", "mean": [0.0] * 5, "std": [1.0] * 5}
    got = Program(graph, {}, preprocess, exact={}).run(x)
    assert got.tobytes() == expected.astype(F32).reshape(got.shape).tobytes()


@pytest.fixture(scope="module")
def uniform_packed(packed, tmp_path_factory):
    """A .mbz with uniform 4-bit weights and 8-bit activations (exact layers) of the same model."""
    _, data = packed
    out = tmp_path_factory.mktemp("exact_uniform") / "u4a8.mbz"
    model = data.parent / "model.pt"
    invoke("pack", model, "--method", "uniform", "--bits", "conv=4,fc=4", "--act-bits", 8,
           "--calib", "min-max", "--data", data, "-o", out)
    return out, data


@pytest.mark.slow
def test_numpy_exact_path_is_the_float_path_rounded_differently(uniform_packed):
    path, data = uniform_packed
    mbz = read_mbz(path)
    plan = exact_layers(mbz.metadata["graph"], mbz.tensors)
    assert len(plan) >= 10  # the convs that read codes, with their integer weights
    images = np.load(data)["x_test"]
    exact, previous = load_program(path), load_program(path, exact=False)
    assert exact.exact and not previous.exact
    logits, float_logits = exact.predict(images), previous.predict(images)
    # an image where no code lands within rounding of a boundary keeps its logits to float32
    # rounding; a code that flips spreads through this random network, but not far
    per_image = np.abs(logits - float_logits).max(axis=1) / np.abs(float_logits).max()
    assert np.median(per_image) < 1e-5
    assert sqnr_db(float_logits, logits) > 15
    assert np.mean(logits.argmax(1) == float_logits.argmax(1)) >= 0.9


# ------------------------------------------------------------------ the torch graph's exact path


def run_torch(
    nodes: list[dict], tensors: dict, codes: np.ndarray, zero_point: int, scale: float = ACT_SCALE
) -> np.ndarray:
    """The graph ``input -> nodes`` run by ``GraphModule.of_tensors`` (what ``mbz pack``
    measures and ``mbz eval --runtime torch`` runs) on the input whose first quantize (of
    ``scale`` and ``zero_point``) gives ``codes`` [N, C, H, W]."""
    graph = {"input": "input", "input_shape": list(codes.shape[1:]),
             "output": nodes[-1]["output"], "nodes": nodes}  # fmt: skip
    x = ((codes.astype(F32) - F32(zero_point)) * F32(scale)).astype(F32)
    with torch.no_grad():
        return GraphModule.of_tensors(graph, tensors)(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize(
    ("channels", "out", "kernel", "stride", "padding", "groups", "low"),
    [
        (128, 8, 3, 1, 1, 1, 200),  # bound 255 * 255 * 1152 > 2^24: float64
        (80, 12, 3, 2, 1, 2, 200),  # grouped, strided, float64
        (40, 16, 1, 1, 0, 1, 0),  # pointwise within the float32 bound: float32
        (24, 24, 3, 1, 1, 24, 0),  # depthwise 3x3, float32
    ],
)
def test_torch_exact_conv_equals_an_integer_reference(
    channels, out, kernel, stride, padding, groups, low
):
    tensors = uniform_layer("conv", (out, channels // groups, kernel, kernel), low, seed=channels)
    codes = np.random.default_rng(out).integers(low, 256, (3, channels, 9, 9))
    attrs = conv_attrs(stride, padding, groups)
    nodes = [quantize_node("q", "input", 0), layer_node("conv", "conv2d", "q", **attrs)]
    acc = reference_conv(codes, integer_weight_of(tensors["conv.weight"]), stride, padding, groups)
    if low:  # sums of large same-sign products: beyond what float32 holds exactly
        assert np.abs(acc).max() >= 2**24
    expected = reference_epilogue(acc, tensors, "conv", channel_axis=1)
    assert run_torch(nodes, tensors, codes, zero_point=0).tobytes() == expected.tobytes()


def test_torch_exact_linear_equals_an_integer_reference():
    features, zero_point = 1280, 117
    tensors = uniform_layer("fc", (10, features), 0, seed=5)
    codes = np.random.default_rng(6).integers(0, 256, (4, features, 1, 1))
    nodes = [layer_node("flat", "flatten", "input"), quantize_node("q", "flat", zero_point),
             layer_node("fc", "linear", "q")]  # fmt: skip
    acc = (codes[:, :, 0, 0] - zero_point) @ integer_weight_of(tensors["fc.weight"]).T
    expected = reference_epilogue(acc, tensors, "fc", channel_axis=1)
    assert run_torch(nodes, tensors, codes, zero_point).tobytes() == expected.tobytes()


@pytest.mark.parametrize("op", ["avgpool2d", "global_avgpool"])
def test_torch_pooling_of_codes_is_an_integer_sum_times_scale_over_window(op):
    zero_point, scale = 37, float(F32(0.0371))  # codes recovered from x = (q - z) * scale
    codes = np.random.default_rng(8).integers(0, 256, (2, 5, 7, 7))
    attrs = {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]} if op == "avgpool2d" else {}
    nodes = [quantize_node("q", "input", zero_point, scale), layer_node("pool", op, "q", **attrs)]
    if op == "avgpool2d":  # padding counts as 0, and in the divisor
        ones = np.ones((5, 1, 3, 3), np.int64)
        sums, window = reference_conv(codes - zero_point, ones, 2, 1, groups=5), 9
    else:
        sums, window = (codes - zero_point).sum(axis=(2, 3), keepdims=True), 49
    expected = ((sums.astype(F32) * F32(scale)) / F32(window)).astype(F32)
    assert run_torch(nodes, {}, codes, zero_point, scale).tobytes() == expected.tobytes()


# ------------------------------------------------------------------ mbz eval on all-exact files


def test_any_logit_difference_fails_an_all_exact_file_only():
    logits = np.random.default_rng(9).normal(0, 1, (5, 10)).astype(F32)
    other = logits.copy()
    row = 3
    column = int(np.argsort(logits[row])[0])  # not the top-1 class: the agreement stays 100%
    other[row, column] = np.nextafter(other[row, column], F32(np.inf))
    reports = {}
    for exact in (True, False):
        results = [EvalResult("numpy", logits, 0.2, 1.0), EvalResult("torch", other, 0.2, 1.0)]
        reports[exact] = Report(results, exact=exact)
        check_report(reports[exact], 0.001, True, "no stored accuracy")
    step = float(other[row, column]) - float(logits[row, column])
    (failure,) = reports[True].failures
    assert failure.startswith(
        f"numpy/torch logits differ on 1 of 5 images (largest difference {step:.3g})"
    )
    assert "must be bit-identical" in failure
    assert reports[False].failures == [] and reports[False].agreements["numpy/torch"] == 1.0


@pytest.mark.slow
def test_uniform_weights_with_act_bits_pack_an_all_exact_file_the_runtimes_agree_on(
    uniform_packed,
):
    path, data = uniform_packed
    mbz = read_mbz(path)
    status = exact_nodes(mbz.metadata["graph"], mbz.tensors)
    ops = {node["name"]: node["op"] for node in mbz.metadata["graph"]["nodes"]}
    assert {"conv2d", "linear", "global_avgpool"} <= {ops[name] for name in status}
    assert all(status.values())  # the first conv and the classifier included
    report = verify(path, load_split(str(data), "test"), ("numpy", "torch"))
    assert report.exact and report.failures == []
    assert report.logit_differences == {"numpy/torch": 0.0}
    assert report.agreements == {"numpy/torch": 1.0}
    single = json.loads(invoke("eval", path, "--data", data, "--runtime", "torch", "--json").stdout)
    assert single["exact"] is True and single["ok"]
    summary = "all layers exact: numpy, torch and onnx logits are bit-identical"
    assert summary in invoke("inspect", path).stdout


@pytest.mark.slow
def test_float_activations_keep_the_agreement_thresholds(packed, tmp_path):
    _, data = packed
    path = tmp_path / "w8.mbz"
    invoke("pack", data.parent / "model.pt", "--bits", "conv=8,fc=8", "-o", path)
    report = verify(path, load_split(str(data), "test"), ("numpy", "torch"))
    assert not report.exact and report.failures == []
    assert report.logit_differences["numpy/torch"] > 0  # float sums in different orders


def test_numpy_layer_whose_bound_reaches_int32_runs_the_float_path():
    features = 33_100  # 255 * 255 * 33,100 = 2,152,327,500 >= 2^31
    tensors = uniform_layer("fc", (2, features), 255, seed=8)
    nodes = [layer_node("flat", "flatten", "input"), quantize_node("q", "flat", 0),
             layer_node("fc", "linear", "q")]
    assert exact_layers({"nodes": nodes}, tensors) == {}
    codes = np.random.default_rng(9).integers(0, 256, (2, features, 1, 1))
    graph = {"input": "input", "input_shape": [features, 1, 1], "output": "fc", "nodes": nodes}
    preprocess = {"layout": "NHWC", "dtype": "uint8", "mean": [0.0] * features,
                  "std": [1.0] * features}
    params = {name: tensor.decode() for name, tensor in tensors.items()}
    x = ((codes.astype(F32)) * F32(ACT_SCALE)).astype(F32)
    float_path = Program(graph, params, preprocess).run(x)
    assert run_exact(nodes, tensors, codes, 0).tobytes() == float_path.tobytes()


@pytest.mark.parametrize(("scale", "zero_point"), [(6 / 255, 0), (0.05, 0), (0.02, 3)])
def test_numpy_exact_conv_with_relu6_and_quantize_equals_an_integer_reference(scale, zero_point):
    # 6 / scale reaches the top code only for the first: the others clip at 6 before quantizing
    tensors = uniform_layer("conv", (16, 40, 1, 1), 0, seed=11)
    centred = {"zero_point": np.full(16, 128, np.uint8), "scale": np.full(16, 1e-3, F32)}
    tensors["conv.weight"] = dataclasses.replace(tensors["conv.weight"], **centred)
    codes = np.random.default_rng(12).integers(0, 256, (2, 40, 5, 5))
    out_scale = float(F32(scale))
    nodes = [quantize_node("q", "input", 0), layer_node("conv", "conv2d", "q", **conv_attrs()),
             layer_node("act", "relu6", "conv"), quantize_node("out", "act", zero_point, out_scale),
             layer_node("flat", "flatten", "out")]
    acc = reference_conv(codes, integer_weight_of(tensors["conv.weight"]), 1, 0, 1)
    y = np.clip(reference_epilogue(acc, tensors, "conv", channel_axis=1), F32(0), F32(6))
    q = np.clip(np.rint(y * (F32(1) / F32(out_scale))) + F32(zero_point), F32(0), F32(255))
    expected = ((q - F32(zero_point)) * F32(out_scale)).astype(F32)
    assert 0 < np.mean(y == 6) < 1 and 0 < np.mean(y == 0) < 1  # both clips matter
    got = run_exact(nodes, tensors, codes, 0).reshape(expected.shape)
    assert got.tobytes() == expected.tobytes()
