"""Quantized activations: calibration ranges, where quantize nodes go, the runtime's integer
codes and activation memory, and `mbz pack --act-bits` end to end (narrow models, few images)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mbz.calibrate import RangeStats, calibrate, choose_range, quant_params
from mbz.capture import capture
from mbz.checkpoint import load_model
from mbz.cli import main
from mbz.config import PackConfig, parse_act_bits
from mbz.data import CIFAR10_MEAN, CIFAR10_STD, Dataset, load_split
from mbz.fold import fold_batchnorm
from mbz.format import read_mbz
from mbz.pack import pack
from mbz.runtime import Program, kernels, load_program
from mbz.runtime.codes import BufferPool, decode, encode, quantize
from tests.helpers import fragment_path, invoke, narrow_mobilenet, save_mbz_checkpoint

PREPROCESS = {"layout": "NHWC", "dtype": "uint8", "mean": [*CIFAR10_MEAN], "std": [*CIFAR10_STD]}
PARITY_AGREEMENT = 0.995  # per-image top-1 agreement of numpy and torch with quantized activations
PARITY_POINTS = 0.3  # accuracy difference allowed between them, in percentage points


def random_images(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)


def stats_of(values: np.ndarray) -> RangeStats:
    stats = RangeStats()
    stats.add(torch.from_numpy(values), torch.Generator().manual_seed(0))
    return stats


# ------------------------------------------------------------------------------ calibration


def test_min_max_covers_outliers_and_mse_clips_them():
    rng = np.random.default_rng(0)
    values = np.concatenate([rng.normal(0, 1, 50_000), [40.0, -35.0]]).astype(np.float32)
    stats = stats_of(values)
    assert choose_range(stats, 4, "min-max", 99.99) == (-35.0, 40.0)
    lo, hi = choose_range(stats, 4, "mse", 99.99)
    assert -8 < lo < -1 and 1 < hi < 8  # a 4-bit step of 5 would round most values to zero
    lo, hi = choose_range(stats, 8, "percentile", 99.9)
    assert -4.5 < lo < -2.5 and 2.5 < hi < 4.5  # the 0.1% / 99.9% quantiles of N(0, 1): -+3.09


def test_mse_error_is_below_min_max_error():
    values = np.random.default_rng(1).standard_t(3, 20_000).astype(np.float32)
    stats, sample = stats_of(values), torch.from_numpy(values)

    def error(method: str) -> float:
        scale, zero_point = quant_params(*choose_range(stats, 3, method, 99.9), 3)
        quantized = torch.fake_quantize_per_tensor_affine(sample, scale, zero_point, 0, 7)
        return float(torch.mean((quantized - sample) ** 2))

    assert error("mse") < 0.5 * error("min-max")


def test_quant_params_cover_the_range_with_float32_scales():
    cases = [(0.0, 6.0, 8), (0.0, 5.3, 2), (-1.7, 3.1, 4), (-2.0, -0.5, 8), (0.3, 9.0, 1)]
    for lo, hi, bits in cases:
        scale, zero_point = quant_params(lo, hi, bits)
        top = 2**bits - 1
        assert float(np.float32(scale)) == scale and scale > 0
        assert isinstance(zero_point, int) and 0 <= zero_point <= top
        covered = ((0 - zero_point) * scale, (top - zero_point) * scale)
        assert covered[0] <= min(lo, 0.0) + scale and covered[1] >= max(hi, 0.0) - scale
        if lo >= 0:
            assert zero_point == 0
    assert quant_params(0.0, 0.0, 8) == (1.0, 0)


def test_parse_act_bits():
    assert parse_act_bits("8") == {"relu": 8, "add": 8, "proj": 8}
    assert parse_act_bits("relu=4,add=8,input=8") == {"relu": 4, "add": 8, "input": 8}
    assert parse_act_bits("4,features.1*=32")["features.1*"] == 32
    for text in ("16", "relu=16", "relu=9", "four", ""):
        with pytest.raises(ValueError, match=r"\S"):
            parse_act_bits(text)


def test_config_without_act_bits_keeps_its_old_json():
    assert "act_bits" not in PackConfig().to_dict()
    config = PackConfig(act_bits={"relu": 4}, calib="mse")
    assert PackConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config


# ---------------------------------------------------------------------- quantize node points


@pytest.fixture(scope="module")
def folded():
    captured = capture(narrow_mobilenet())
    fold_batchnorm(captured.graph, captured.params)
    return captured.graph, captured.params


def calibrated(folded, act_bits: str) -> dict:
    graph, params = folded
    graph = json.loads(json.dumps(graph))
    config = PackConfig(act_bits=parse_act_bits(act_bits), calib="min-max")
    data = Dataset(random_images(16, 0), np.zeros(16, np.int64), ("c",) * 10, "random")
    calibrate(graph, params, PREPROCESS, data, config)
    return graph


def test_every_convolution_and_the_classifier_read_quantized_activations(folded):
    graph = calibrated(folded, "8")
    nodes = {node["output"]: node for node in graph["nodes"]}
    reducing = [node for node in graph["nodes"] if node["op"] in ("conv2d", "linear")]
    read = [nodes[layer["inputs"][0]] for layer in reducing]
    assert all(node["op"] == "quantize" for node in read)
    # the first conv reads the quantized input, the classifier the quantized pooled features
    assert read[0]["inputs"] == [graph["input"]] and read[0]["attrs"]["bits"] == 8
    assert nodes[read[-1]["inputs"][0]]["op"] == "flatten" and read[-1]["attrs"]["bits"] == 8
    defined_by = {name: node["op"] for name, node in nodes.items()}
    for node in graph["nodes"]:
        if node["op"] in ("relu6", "add"):
            readers = [n for n in graph["nodes"] if node["output"] in n["inputs"]]
            assert [r["op"] for r in readers] == ["quantize"], node["name"]
        if node["op"] == "quantize" and defined_by.get(node["inputs"][0]) == "relu6":
            assert node["attrs"]["zero_point"] == 0
    assert nodes[graph["output"]]["op"] == "linear"


def test_rules_choose_bits_per_group_and_glob(folded):
    graph = calibrated(folded, "relu=4,add=6,input=8,features.1.*=32")
    nodes = {node["output"]: node for node in graph["nodes"]}
    bits = {
        nodes[q["inputs"][0]]["op"] if q["inputs"][0] in nodes else "input": q["attrs"]["bits"]
        for q in graph["nodes"]
        if q["op"] == "quantize"
    }
    # proj points stay float (no rule); the classifier's operand takes 8 bits
    assert bits == {"input": 8, "relu6": 4, "add": 6, "flatten": 8}
    quantized = {q["inputs"][0] for q in graph["nodes"] if q["op"] == "quantize"}
    assert not any(value.startswith("features.1.") for value in quantized)
    assert any(value.startswith("features.2.") for value in quantized)


# ---------------------------------------------------------------------- runtime integer codes


@pytest.mark.parametrize("bits", range(1, 9))
def test_codes_decode_to_torch_fake_quantization(bits):
    pool, rng = BufferPool(), np.random.default_rng(bits)
    scale, zero_point = 0.0625 * 1.5, (2**bits - 1) // 3
    for count in (0, 1, 7, 8, 9, 1001):  # not multiples of the codes per byte, too
        x = (rng.normal(0, 2**bits * scale, count)).astype(np.float32)
        ref = torch.fake_quantize_per_tensor_affine(
            torch.from_numpy(x), scale, zero_point, 0, 2**bits - 1
        ).numpy()
        codes = encode(x, bits, scale, zero_point, pool)
        assert codes.data.dtype == np.uint8
        assert codes.data.nbytes == -(-count * codes.width // 8)
        assert np.array_equal(decode(codes, pool), ref)


def node(name: str, op: str, inputs: list[str], params=None, attrs=None) -> dict:
    """A graph node whose output value is named like the node."""
    return {"name": name, "op": op, "inputs": inputs, "output": name,
            "params": params or {}, "attrs": attrs or {}}  # fmt: skip


def conv_node(name: str, source: str, padding: int, groups: int = 1) -> dict:
    """A stride-1 conv2d reading ``source``, with params ``{name}.w`` and ``{name}.b``."""
    attrs = {"stride": [1, 1], "padding": [padding] * 2, "dilation": [1, 1], "groups": groups}
    return node(name, "conv2d", [source], {"weight": f"{name}.w", "bias": f"{name}.b"}, attrs)


def block_program(bits: int) -> tuple[Program, dict]:
    """An inverted residual block between quantize nodes: 3x3 conv, relu6, 1x1 expand, relu6,
    depthwise, relu6, 1x1 project, add the block input; every value a reader sees quantized."""
    quant = {"bits": bits, "scale": 6 / (2**bits - 1), "zero_point": 0}
    signed = {**quant, "zero_point": 2**bits // 2}
    nodes = [
        conv_node("c1", "input", padding=1),
        node("a1", "relu6", ["c1"]),
        node("q1", "quantize", ["a1"], attrs=quant),
        conv_node("expand", "q1", padding=0),
        node("a2", "relu6", ["expand"]),
        node("q2", "quantize", ["a2"], attrs=quant),
        conv_node("dw", "q2", padding=1, groups=12),
        node("a3", "relu6", ["dw"]),
        node("q3", "quantize", ["a3"], attrs=quant),
        conv_node("project", "q3", padding=0),
        node("q4", "quantize", ["project"], attrs=signed),
        node("sum", "add", ["q4", "q1"]),
        node("q5", "quantize", ["sum"], attrs=signed),
        node("flat", "flatten", ["q5"]),
    ]
    shapes = {
        "c1": (8, 3, 3, 3),
        "expand": (12, 8, 1, 1),
        "dw": (12, 1, 3, 3),
        "project": (8, 12, 1, 1),
    }
    rng = np.random.default_rng(0)
    params = {}
    for name, shape in shapes.items():
        params[f"{name}.w"] = rng.normal(0, 0.6, shape).astype(np.float32)
        params[f"{name}.b"] = rng.normal(0, 0.1, shape[0]).astype(np.float32)
    graph = {"input": "input", "input_shape": [3, 6, 6], "output": "flat", "nodes": nodes}
    return Program(graph, params, PREPROCESS), graph | {"params": params}


@pytest.mark.parametrize("bits", [8, 3, 2])
def test_program_with_codes_equals_float_fake_quantization(bits, monkeypatch):
    """Holding codes, decoding them per reader and encoding conv outputs a block at a time
    computes exactly what the runtime's kernels compute on float fake-quantized values (small
    cache blocks, so that blocks straddle the planes of packed codes)."""
    monkeypatch.setattr(kernels, "CACHE_BLOCK_BYTES", 300)
    program, spec = block_program(bits)
    images = random_images(5, 3)[:, :6, :6]
    weights = spec["params"]
    attrs = {node["name"]: node["attrs"] for node in spec["nodes"] if node["op"] == "quantize"}
    relu6, same = (0.0, 6.0), {"stride": (1, 1), "dilation": (1, 1)}

    def pointwise(value, name, clip=None):
        w = kernels.prepare_pointwise(weights[f"{name}.w"])
        return kernels.conv_pointwise(value, w, weights[f"{name}.b"], (1, 1), (0, 0), clip)

    w1 = kernels.prepare_grouped(weights["c1.w"], 1)
    c1 = kernels.conv_grouped(program.preprocess_images(images), w1, weights["c1.b"], (3, 3),
                          padding=(1, 1), clip=relu6, **same)  # fmt: skip
    q1 = quantize(c1, **attrs["q1"])
    q2 = quantize(pointwise(q1, "expand", relu6), **attrs["q2"])
    wd = kernels.prepare_depthwise(weights["dw.w"])
    q3 = quantize(kernels.conv_depthwise(q2, wd, weights["dw.b"], padding=(1, 1), clip=relu6,
                                         **same), **attrs["q3"])  # fmt: skip
    q4 = quantize(pointwise(q3, "project"), **attrs["q4"])
    q5 = quantize(q4 + q1, **attrs["q5"])
    assert np.array_equal(program.predict(images), kernels.flatten(q5))


def test_quantized_graph_output_is_decoded_and_the_input_left_alone():
    """flatten of one channel can be a view of the input; its fused quantize must not write
    into the caller's array."""
    attrs = {"bits": 3, "scale": 0.25, "zero_point": 4}
    nodes = [
        {"name": "f", "op": "flatten", "inputs": ["x"], "output": "f", "params": {}, "attrs": {}},
        {
            "name": "q",
            "op": "quantize",
            "inputs": ["f"],
            "output": "q",
            "params": {},
            "attrs": attrs,
        },
    ]
    graph = {"input": "x", "input_shape": [1, 2, 2], "output": "q", "nodes": nodes}
    program = Program(graph, {}, {**PREPROCESS, "mean": [0.5], "std": [0.2]})
    x = np.random.default_rng(0).normal(size=(3, 1, 2, 2)).astype(np.float32)
    before = x.copy()
    got = program.run(x)
    assert np.array_equal(x, before)
    ref = torch.fake_quantize_per_tensor_affine(
        torch.from_numpy(before.reshape(3, 4)), 0.25, 4, 0, 7
    )
    assert np.array_equal(got, ref.numpy())


def test_peak_bytes_shrink_with_the_bits():
    peaks = {}
    for bits in (2, 4, 8):
        program, _ = block_program(bits)
        program.predict(random_images(4, 1)[:, :6, :6], batch_size=4)
        peaks[bits] = program.last_peak_bytes_per_image
    assert peaks[2] < peaks[4] < peaks[8]


# ----------------------------------------------------------------------- mbz pack --act-bits


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("actquant")


@pytest.fixture(scope="module")
def model_path(workdir):
    path = workdir / "model.pt"
    save_mbz_checkpoint(path, narrow_mobilenet(1))
    return path


@pytest.fixture(scope="module")
def data_path(workdir):
    path = workdir / "data.npz"
    rng = np.random.default_rng(2)
    np.savez(
        path,
        x_train=random_images(64, 4),
        y_train=rng.integers(0, 10, 64, dtype=np.uint8),
        x_test=random_images(200, 5),
        y_test=rng.integers(0, 10, 200, dtype=np.uint8),
    )
    return path


def pack_json(model, path, *options) -> dict:
    """``mbz pack MODEL -o PATH --json OPTIONS``; its summary."""
    result = invoke("pack", model, "-o", path, "--json", *options)
    assert result.exit_code == 0, result.output
    return json.loads(result.output)


def parity_report(path, data, *options) -> dict:
    """``mbz eval PATH --runtime all`` with the quantized-activation parity bar: its report."""
    result = invoke("eval", path, "--data", data, "--runtime", "all", "--json", *options)
    report = json.loads(result.output)
    assert result.exit_code == 0 and report["ok"], result.output
    assert report["agreement"]["numpy/torch"] >= PARITY_AGREEMENT
    return report


@pytest.fixture(scope="module")
def packed(model_path, data_path, workdir):
    """{act bits: (path, pack summary)} for float weights with 8-, 4- and 2-bit activations."""
    options = ("--bits", "conv=32,fc=32", "--data", data_path, "--calib", "min-max", "--limit", 50)
    out = {}
    for bits in (8, 4, 2):
        path = workdir / f"a{bits}.mbz"
        out[bits] = (path, pack_json(model_path, path, "--act-bits", bits, *options))
    return out


@pytest.mark.slow
def test_act_bits_change_predictions_and_runtimes_agree(packed, data_path):
    test = load_split(str(data_path), "test")
    logits = {bits: load_program(path).predict(test.images) for bits, (path, _) in packed.items()}
    assert np.mean(logits[8].argmax(1) != logits[2].argmax(1)) > 0.05
    parity_report(packed[2][0], data_path, "--tolerance", PARITY_POINTS)  # 8 bits: the fragment


def test_pack_stores_calibrated_quantize_nodes(packed):
    path, summary = packed[4]
    metadata = read_mbz(path).metadata
    quantize = [node for node in metadata["graph"]["nodes"] if node["op"] == "quantize"]
    operands = {"input", "flatten"}  # what the first conv and the classifier read: 8 bits
    assert {node["inputs"][0] for node in quantize if node["attrs"]["bits"] == 8} == operands
    assert all(node["attrs"]["bits"] == 4 for node in quantize if node["inputs"][0] not in operands)
    assert len({node["attrs"]["scale"] for node in quantize}) > len(quantize) // 2
    assert metadata["pack_config"]["act_bits"] == {"relu": 4, "add": 4, "proj": 4}
    assert metadata["accuracy"]["top1"] == summary["accuracy"]["top1"]


def test_peak_activation_bytes_are_measured_smaller(packed):
    peaks = {bits: summary["activation_peak_bytes"] for bits, (_, summary) in packed.items()}
    assert peaks[8]["float32"] == peaks[4]["float32"]
    assert peaks[4]["quantized"] < peaks[8]["quantized"] < peaks[8]["float32"]
    program = load_program(packed[8][0])
    program.predict(random_images(1, 9), batch_size=1)
    assert program.last_peak_bytes_per_image == peaks[8]["quantized"]


def test_pack_without_act_bits_reports_no_activation_peak(model_path, workdir):
    result = invoke("pack", model_path, "-o", workdir / "plain.mbz", "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["activation_peak_bytes"] is None
    assert "act_bits" not in read_mbz(workdir / "plain.mbz").metadata["pack_config"]


def test_act_bits_need_training_images(model_path, workdir):
    test_only = workdir / "test_only.npz"
    np.savez(test_only, x_test=random_images(8, 6), y_test=np.zeros(8, np.uint8))
    runner = CliRunner()
    no_data = runner.invoke(main, ["pack", str(model_path), "--act-bits", "8"])
    assert no_data.exit_code == 2 and "train split" in no_data.output
    no_train = runner.invoke(
        main, ["pack", str(model_path), "--act-bits", "8", "--data", str(test_only)]
    )
    assert no_train.exit_code == 1
    assert "x_train" in no_train.output and "--act-bits" in no_train.output
    assert "Traceback" not in no_train.output


@pytest.mark.slow
def test_w8a8_parity_on_the_fragment(workdir):
    fragment = fragment_path()
    if fragment is None:
        pytest.skip("shared/data/cifar10-fragment.npz is not present")
    model, path = workdir / "fresh.pt", workdir / "w8a8.mbz"
    save_mbz_checkpoint(model, narrow_mobilenet(2))
    config = PackConfig(bits={"conv": 8, "fc": 8}, act_bits=parse_act_bits("8"))
    calibration = load_split(str(fragment), "train").head(64)
    pack(load_model(model), config, path, calibration=calibration)  # calibrated with mse
    parity_report(path, fragment, "--limit", 400, "--tolerance", PARITY_POINTS)
