"""The ONNX export against the numpy runtime: every encoding, quantized activations, the CLI."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import numpy as np
import onnx
import onnx.utils
import pytest
import torch
from click.testing import CliRunner
from onnx import TensorProto

from mbz.cli import main
from mbz.format import (
    CodebookTensor,
    DenseTensor,
    Entropy,
    IntCodebookTensor,
    MbzFile,
    MbzFormatError,
    ScaledCodebookTensor,
    Sparsity,
    UniformTensor,
    read_mbz,
    write_mbz,
)
from mbz.onnx.export import (
    INPUT_NAME,
    IR_VERSION,
    OPSET,
    OUTPUT_NAME,
    export_onnx,
    graph_value,
    onnx_bytes,
    tensor_value,
)
from mbz.onnx.session import OnnxProgram, onnx_session
from mbz.runtime import load_program
from tests.helpers import (
    assert_runs_without_torch,
    invoke,
    narrow_mobilenet,
    save_mbz_checkpoint,
)
from tests.test_runtime import conv_node, graph_of, node, preprocess_for, sqnr_db, tie_values

FLOAT_SQNR_DB = 80.0  # same weights, only the float summation order differs
SHAPE = (8, 4, 3, 3)  # the conv weight every encoding case is stored as


def images(count: int, size: int = 6, channels: int = 4, seed: int = 0) -> np.ndarray:
    """Random uint8 NHWC images."""
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (count, size, size, channels), dtype=np.uint8)


def _mask(rng: np.random.Generator, density: float) -> np.ndarray:
    return rng.random(SHAPE) < density


def _codebook(rng, bits, k=None, mask=None, entropy=Entropy.FIXED) -> CodebookTensor:
    k = k or 2**bits
    codebook = np.sort(rng.standard_normal(k)).astype(np.float32)
    indices = rng.integers(0, k, SHAPE).astype(np.uint8)
    return CodebookTensor(codebook, indices, bits, mask=mask, entropy=entropy)


def _channel_codebook(rng, bits, dtype, mask=None) -> ScaledCodebookTensor | IntCodebookTensor:
    """A codebook scaled per output channel: float16 centroids, or int8 ones (int_codebook)."""
    integer = dtype == np.int8
    values = rng.choice(np.arange(-128, 128), 2**bits, replace=False) if integer else (
        rng.uniform(-1, 1, 2**bits)
    )
    scale = rng.uniform(0.01, 0.5, SHAPE[0]).astype(np.float16)
    indices = rng.integers(0, 2**bits, SHAPE).astype(np.uint8)
    kind = IntCodebookTensor if integer else ScaledCodebookTensor
    return kind(np.sort(values).astype(dtype), scale, indices, bits, mask=mask)


def _uniform(rng, bits, axis=None, mask=None, symmetric=False, entropy=Entropy.FIXED):
    channels = 1 if axis is None else SHAPE[axis]
    if symmetric:
        zero_point = np.full(channels, 2 ** (bits - 1), np.uint8)
    else:
        zero_point = rng.integers(0, 2**bits, channels).astype(np.uint8)
    return UniformTensor(
        qdata=rng.integers(0, 2**bits, SHAPE).astype(np.uint8),
        scale=rng.uniform(0.01, 0.5, channels).astype(np.float32),
        zero_point=zero_point,
        bits=bits,
        axis=axis,
        mask=mask,
        entropy=entropy,
    )


def _dense(rng, dtype, mask=None) -> DenseTensor:
    return DenseTensor(rng.standard_normal(SHAPE).astype(dtype), mask=mask)


# id -> (builder(rng), sparsity the writer must have chosen)
ENCODINGS = {
    "f32": (lambda r: _dense(r, np.float32), Sparsity.NONE),
    "f16": (lambda r: _dense(r, np.float16), Sparsity.NONE),
    "f32_bitmap": (lambda r: _dense(r, np.float32, _mask(r, 0.6)), Sparsity.BITMAP),
    "f16_csr": (lambda r: _dense(r, np.float16, _mask(r, 0.05)), Sparsity.CSR),
    "codebook_2bit": (lambda r: _codebook(r, 2), Sparsity.NONE),
    "codebook_4bit_k11": (lambda r: _codebook(r, 4, k=11), Sparsity.NONE),
    "codebook_6bit": (lambda r: _codebook(r, 6), Sparsity.NONE),
    "codebook_8bit_huffman": (lambda r: _codebook(r, 8, entropy=Entropy.HUFFMAN), Sparsity.NONE),
    "codebook_3bit_bitmap": (lambda r: _codebook(r, 3, mask=_mask(r, 0.5)), Sparsity.BITMAP),
    "codebook_huffman_csr": (
        lambda r: _codebook(r, 5, mask=_mask(r, 0.05), entropy=Entropy.HUFFMAN),
        Sparsity.CSR,
    ),
    "scaled_codebook_4bit": (lambda r: _channel_codebook(r, 4, np.float16), Sparsity.NONE),
    "int_codebook_4bit": (lambda r: _channel_codebook(r, 4, np.int8), Sparsity.NONE),
    "int_codebook_3bit_bitmap": (
        lambda r: _channel_codebook(r, 3, np.int8, mask=_mask(r, 0.5)),
        Sparsity.BITMAP,
    ),
    "uniform_tensor_asym_4bit": (lambda r: _uniform(r, 4), Sparsity.NONE),
    "uniform_tensor_sym_8bit": (lambda r: _uniform(r, 8, symmetric=True), Sparsity.NONE),
    "uniform_channel_asym_3bit": (lambda r: _uniform(r, 3, axis=0), Sparsity.NONE),
    "uniform_channel_sym_7bit": (lambda r: _uniform(r, 7, axis=0, symmetric=True), Sparsity.NONE),
    "uniform_axis1_huffman": (
        lambda r: _uniform(r, 6, axis=1, entropy=Entropy.HUFFMAN),
        Sparsity.NONE,
    ),
    "uniform_channel_bitmap": (
        lambda r: _uniform(r, 4, axis=0, mask=_mask(r, 0.5)),
        Sparsity.BITMAP,
    ),
    "uniform_tensor_csr": (lambda r: _uniform(r, 2, mask=_mask(r, 0.05)), Sparsity.CSR),
}


def conv_file(path: Path, weight) -> MbzFile:
    """A .mbz whose conv2d weight is ``weight`` (input 4x6x6, 8 * 6 * 6 outputs), read back."""
    nodes = [
        conv_node("conv", "input"),
        node("act", "relu6", ["conv"]),
        node("flat", "flatten", ["act"]),
    ]
    bias = DenseTensor(np.linspace(-1, 1, SHAPE[0], dtype=np.float32))
    metadata = {"graph": graph_of(nodes, [4, 6, 6]), "preprocess": preprocess_for(4)}
    write_mbz(path, metadata, {"conv.weight": weight, "conv.bias": bias})
    return read_mbz(path)


def with_output(model: onnx.ModelProto, value: str) -> onnx.ModelProto:
    """A copy of ``model`` that also outputs the float32 ``value``."""
    copy = onnx.ModelProto()
    copy.CopyFrom(model)
    copy.graph.output.append(onnx.helper.make_tensor_value_info(value, TensorProto.FLOAT, None))
    return copy


def run_onnx(model: onnx.ModelProto, batch: np.ndarray, extra: str | None = None) -> list:
    """Outputs of ``model`` (logits, and ``extra`` if given) on uint8 images."""
    if extra is not None:
        model = with_output(model, extra)
    outputs = [OUTPUT_NAME] + ([extra] if extra else [])
    return onnx_session(model).run(outputs, {INPUT_NAME: batch})


@pytest.mark.parametrize(("build", "sparsity"), ENCODINGS.values(), ids=ENCODINGS.keys())
def test_every_encoding_decodes_exactly_in_graph(tmp_path, build, sparsity) -> None:
    mbz = conv_file(tmp_path / "m.mbz", build(np.random.default_rng(7)))
    assert mbz.descriptors["conv.weight"].sparsity == sparsity
    expected = mbz.tensors["conv.weight"].decode()
    batch = images(5)
    numpy_logits = load_program(tmp_path / "m.mbz").predict(batch)
    for dense in (False, True):
        model = export_onnx(mbz, dense=dense)
        onnx.checker.check_model(model, full_check=True)
        logits, weight = run_onnx(model, batch, tensor_value("conv.weight"))
        np.testing.assert_array_equal(weight, expected)
        assert sqnr_db(numpy_logits, logits) >= FLOAT_SQNR_DB


def initializer_types(model: onnx.ModelProto) -> Counter:
    """How many initializers of each ONNX element type the model stores."""
    return Counter(TensorProto.DataType.Name(t.data_type) for t in model.graph.initializer)


def test_codes_stay_compact_and_dense_is_float(tmp_path) -> None:
    rng = np.random.default_rng(1)
    mbz = conv_file(tmp_path / "m.mbz", _codebook(rng, 4))
    model, dense = export_onnx(mbz), export_onnx(mbz, dense=True)
    assert initializer_types(model)["UINT4"] == 1
    assert set(initializer_types(dense)) == {"FLOAT"}
    assert "Gather" in {n.op_type for n in model.graph.node}
    stored = {t.name: len(t.raw_data) for t in model.graph.initializer}
    assert stored["tensor:conv.weight:indices"] == 288 // 2  # 4 bits per weight
    assert stored["tensor:conv.weight:codebook"] == 16 * 4
    assert onnx_bytes(dense) > onnx_bytes(model)
    assert onnx_bytes(model) == len(model.SerializeToString())


def test_per_channel_codes_use_dequantize_linear_axis(tmp_path) -> None:
    rng = np.random.default_rng(2)
    tensor = _uniform(rng, 8, axis=0)
    model = export_onnx(conv_file(tmp_path / "m.mbz", tensor))
    (dq,) = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert onnx.helper.get_node_attr_value(dq, "axis") == 0
    scale = {t.name: t for t in model.graph.initializer}[dq.input[1]]
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(scale), tensor.scale)


def test_batchnorm_on_flat_features(tmp_path) -> None:
    nodes = [
        node("gap", "global_avgpool", ["input"]),
        node("flat", "flatten", ["gap"]),
        node("bn", "batchnorm", ["flat"], {"scale": "bn.scale", "shift": "bn.shift"}),
    ]
    tensors = {
        "bn.scale": DenseTensor(np.array([0.5, -2.0, 3.0, 1.5], np.float32)),
        "bn.shift": DenseTensor(np.array([1.0, 0.0, -1.0, 0.25], np.float16)),
    }
    metadata = {"graph": graph_of(nodes, [4, 6, 6]), "preprocess": preprocess_for(4)}
    write_mbz(tmp_path / "bn.mbz", metadata, tensors)
    batch = images(6)
    logits = OnnxProgram(export_onnx(read_mbz(tmp_path / "bn.mbz"))).predict(batch)
    assert sqnr_db(load_program(tmp_path / "bn.mbz").predict(batch), logits) >= FLOAT_SQNR_DB


# -------------------------------------------------------------------- quantized activations


def quantized_file(path: Path, channels: int = 4, size: int = 6) -> MbzFile:
    """A small classifier of ``channels`` x ``size`` x ``size`` images with every op kind and
    quantize nodes of 8, 4 and 2 bits, its weights in mixed encodings (codebook, uniform,
    sparse, float16)."""
    rng = np.random.default_rng(3)
    pool = {"kernel": [2, 2], "stride": [2, 2], "padding": [0, 0]}
    avg = {"kernel": [3, 3], "stride": [1, 1], "padding": [1, 1]}
    nodes = [
        node("qin", "quantize", ["input"], attrs={"bits": 8, "scale": 0.02, "zero_point": 128}),
        conv_node("c1", "qin"),
        node("a1", "relu6", ["c1"]),
        node("q1", "quantize", ["a1"], attrs={"bits": 8, "scale": 6 / 255, "zero_point": 0}),
        conv_node("c2", "q1", groups=8),
        node("bn", "batchnorm", ["c2"], {"scale": "bn.scale", "shift": "bn.shift"}),
        node("a2", "relu", ["bn"]),
        node("q2", "quantize", ["a2"], attrs={"bits": 4, "scale": 0.11, "zero_point": 0}),
        node("sum", "add", ["q2", "q1"]),
        node("q3", "quantize", ["sum"], attrs={"bits": 2, "scale": 0.5, "zero_point": 1}),
        node("avg", "avgpool2d", ["q3"], attrs=avg),
        node("max", "maxpool2d", ["avg"], attrs=pool),
        node("gap", "global_avgpool", ["max"]),
        node("flat", "flatten", ["gap"]),
        node("fc", "linear", ["flat"], {"weight": "fc.weight", "bias": "fc.bias"}),
    ]
    tensors = {
        "c1.weight": CodebookTensor(
            np.sort(rng.standard_normal(16)).astype(np.float32) * np.float32(0.3),
            rng.integers(0, 16, (8, channels, 3, 3)).astype(np.uint8),
            4,
        ),
        "c1.bias": DenseTensor(rng.standard_normal(8).astype(np.float16)),
        "c2.weight": UniformTensor(
            rng.integers(0, 256, (8, 1, 3, 3)).astype(np.uint8),
            rng.uniform(0.001, 0.005, 8).astype(np.float32),
            rng.integers(100, 156, 8).astype(np.uint8),
            8,
            axis=0,
        ),
        "c2.bias": DenseTensor(rng.standard_normal(8).astype(np.float32)),
        "bn.scale": DenseTensor(rng.uniform(0.5, 2, 8).astype(np.float32)),
        "bn.shift": DenseTensor(rng.standard_normal(8).astype(np.float32)),
        "fc.weight": CodebookTensor(
            np.linspace(-1, 1, 4, dtype=np.float32),
            rng.integers(0, 4, (10, 8)).astype(np.uint8),
            2,
            mask=rng.random((10, 8)) < 0.5,
        ),
        "fc.bias": DenseTensor(np.zeros(10, np.float32)),
    }
    shape = [channels, size, size]
    metadata = {"graph": graph_of(nodes, shape), "preprocess": preprocess_for(channels)}
    write_mbz(path, metadata, tensors)
    return read_mbz(path)


def test_quantized_activations_match_numpy(tmp_path) -> None:
    mbz = quantized_file(tmp_path / "q.mbz")
    model = export_onnx(mbz)
    onnx.checker.check_model(model, full_check=True)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["QuantizeLinear"] == 4  # one per quantize node
    # the codes read as floats (by c1, whose codebook is not integer, and the add); c2's
    # uniform weight is decoded to integers, c2 and the avgpool read codes
    assert ops["DequantizeLinear"] == 3
    batch = images(64, seed=4)
    numpy_logits = load_program(tmp_path / "q.mbz").predict(batch)
    logits = OnnxProgram(model).predict(batch, batch_size=24)
    agree = (numpy_logits.argmax(1) == logits.argmax(1)).mean()
    assert agree >= 0.995
    assert sqnr_db(numpy_logits, logits) >= 50.0  # a few values may land across a step


def sub_model(model: onnx.ModelProto, inputs: list[str], outputs: list[str]) -> onnx.ModelProto:
    """The part of ``model`` between ``inputs`` and ``outputs`` (onnx.utils.Extractor)."""
    inferred = onnx.shape_inference.infer_shapes(model, strict_mode=True)
    part = onnx.utils.Extractor(inferred).extract_model(inputs, outputs)
    part.ir_version = IR_VERSION
    return part


QUANT_CASES = [(8, 0.25, 0), (8, 0.1, 128), (4, 0.5, 3), (2, 1.0, 1), (1, 0.3, 0), (8, 0.0173, 77)]


@pytest.mark.parametrize(("bits", "scale", "zero_point"), QUANT_CASES)
def test_quantize_is_bit_exact(tmp_path, bits: int, scale: float, zero_point: int) -> None:
    attrs = {"bits": bits, "scale": scale, "zero_point": zero_point}
    nodes = [node("q", "quantize", ["input"], attrs=attrs), node("flat", "flatten", ["q"])]
    metadata = {"graph": graph_of(nodes, [1, 2, 2]), "preprocess": preprocess_for(1)}
    write_mbz(tmp_path / "q.mbz", metadata, {})
    model = export_onnx(read_mbz(tmp_path / "q.mbz"))
    x = tie_values(scale, zero_point, bits)
    x = x[: x.size // 4 * 4].reshape(-1, 1, 2, 2)
    part = sub_model(model, [graph_value("input", metadata["graph"])], [OUTPUT_NAME])
    got = onnx_session(part).run(None, {part.graph.input[0].name: x})[0]
    ref = torch.fake_quantize_per_tensor_affine(
        torch.from_numpy(x), scale, zero_point, 0, 2**bits - 1
    )
    np.testing.assert_array_equal(got, ref.numpy().reshape(got.shape))


def test_preprocessing_is_bit_exact(tmp_path) -> None:
    mbz = conv_file(tmp_path / "m.mbz", _dense(np.random.default_rng(0), np.float32))
    model = export_onnx(mbz)
    graph_input = graph_value(mbz.metadata["graph"]["input"], mbz.metadata["graph"])
    batch = images(7, seed=5)
    got = onnx_session(sub_model(model, [INPUT_NAME], [graph_input])).run(None, {INPUT_NAME: batch})
    expected = load_program(tmp_path / "m.mbz").preprocess_images(batch).transpose(0, 3, 1, 2)
    np.testing.assert_array_equal(got[0], expected)


# ------------------------------------------------------------------ runtime wrapper, no torch


def test_onnx_program_predict(tmp_path) -> None:
    program = OnnxProgram(export_onnx(quantized_file(tmp_path / "q.mbz")))
    batch, counts = images(9, seed=6), []
    chunked = program.predict(batch, batch_size=4, progress=counts.append)
    assert counts == [4, 4, 1]
    np.testing.assert_array_equal(chunked, program.predict(batch))
    assert program.predict(batch[:0]).shape == (0, 10)
    with pytest.raises(ValueError):
        program.predict(batch[:, :5])
    with pytest.raises(ValueError):
        program.predict(batch.astype(np.float32))


def test_export_rejects_a_file_without_graph(tmp_path) -> None:
    write_mbz(tmp_path / "bare.mbz", {}, {"w": DenseTensor(np.ones(3, np.float32))})
    with pytest.raises(MbzFormatError, match="graph"):
        export_onnx(read_mbz(tmp_path / "bare.mbz"))


def test_export_runs_without_torch(tmp_path) -> None:
    path = tmp_path / "m.mbz"
    conv_file(path, _codebook(np.random.default_rng(0), 4))
    assert_runs_without_torch(
        "import numpy as np\n"
        "from mbz.format import read_mbz\n"
        "from mbz.onnx.export import export_onnx\n"
        "from mbz.onnx.session import OnnxProgram\n"
        f"model = export_onnx(read_mbz({str(path)!r}))\n"
        "out = OnnxProgram(model).predict(np.zeros((2, 6, 6, 4), np.uint8))\n"
        "assert out.shape == (2, 288)"
    )


# ---------------------------------------------------------------------------------------- CLI


def test_cli_export_onnx(tmp_path) -> None:
    mbz = quantized_file(tmp_path / "q.mbz")
    result = invoke("export-onnx", tmp_path / "q.mbz", "--json")
    assert result.exit_code == 0, result.output
    summary = json.loads(result.output)
    written = tmp_path / "q.onnx"
    assert summary["path"] == str(written)
    assert summary["onnx_bytes"] == written.stat().st_size
    assert summary["mbz_bytes"] == mbz.file_size == (tmp_path / "q.mbz").stat().st_size
    assert (summary["opset"], summary["ir_version"]) == (OPSET, IR_VERSION)
    model = onnx.load(written)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == OPSET and model.ir_version == IR_VERSION
    batch = images(8, seed=8)
    np.testing.assert_array_equal(
        OnnxProgram(model).predict(batch), OnnxProgram(export_onnx(mbz)).predict(batch)
    )

    text = invoke("export-onnx", tmp_path / "q.mbz", "--dense", "-o", tmp_path / "d.onnx")
    assert text.exit_code == 0, text.output
    size = (tmp_path / "d.onnx").stat().st_size
    assert f"{size:,} bytes ONNX" in text.output and f".mbz {mbz.file_size:,} bytes" in text.output


def test_cli_export_onnx_bad_file(tmp_path) -> None:
    bad = tmp_path / "bad.mbz"
    bad.write_bytes(b"not an mbz file at all")
    result = CliRunner().invoke(main, ["export-onnx", str(bad)])
    assert result.exit_code == 1
    assert "not a valid .mbz file" in result.output
    assert "Traceback" not in result.output


def test_cli_eval_onnx_with_quantized_activations(tmp_path) -> None:
    quantized_file(tmp_path / "q.mbz", channels=3, size=32)
    data = tmp_path / "data.npz"
    batch = images(40, size=32, channels=3, seed=9)
    np.savez(data, x_test=batch, y_test=np.arange(40) % 10)
    result = invoke("eval", tmp_path / "q.mbz", "--data", data, "--runtime", "onnx", "--json")
    assert result.exit_code == 0, result.output
    (onnx_result,) = json.loads(result.output)["results"]
    assert onnx_result["runtime"] == "onnx" and onnx_result["images"] == 40
    logits = load_program(tmp_path / "q.mbz").predict(batch)
    numpy_accuracy = float((logits.argmax(1) == np.arange(40) % 10).mean())
    assert abs(onnx_result["accuracy"] - numpy_accuracy) <= 1 / 40


def test_pack_then_eval_all_runtimes(tmp_path) -> None:
    model_path, data = tmp_path / "model.pt", tmp_path / "data.npz"
    save_mbz_checkpoint(model_path, narrow_mobilenet())
    rng = np.random.default_rng(0)
    np.savez(
        data,
        x_test=rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, 48),
    )
    out = tmp_path / "m.mbz"
    packed = invoke(
        "pack", model_path, "--prune", 0.36, "--bits", "conv=4,fc=2", "-o", out, "--data", data
    )
    assert packed.exit_code == 0, packed.output
    result = invoke("eval", out, "--data", data, "--runtime", "all", "--json")
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["ok"], report["failures"]
    assert [r["runtime"] for r in report["results"]] == ["numpy", "torch", "onnx"]
    assert set(report["agreement"]) == {"numpy/torch", "numpy/onnx", "torch/onnx"}
    assert min(report["agreement"].values()) >= 0.999


# ------------------------------------------------- exact integer layers (SPEC.md 7.3 and 8)


def quantize_ref(x: np.ndarray, scale: float, zero_point: int, bits: int) -> np.ndarray:
    """SPEC.md 7's codes, in numpy float32, as int64."""
    scaled = x * (np.float32(1) / np.float32(scale))
    return np.clip(np.rint(scaled) + zero_point, 0, 2**bits - 1).astype(np.int64)


def window_sums_ref(a: np.ndarray, w: np.ndarray, stride: int, pad: int, dil: int, groups: int):
    """The int64 convolution ``sum(a * w)`` of NCHW ``a`` (zero padding), one kernel tap at
    a time."""
    m, per_group, kh, kw = w.shape
    padded = np.pad(a, ((0, 0), (0, 0), (pad, pad), (pad, pad)))
    oh = (padded.shape[2] - dil * (kh - 1) - 1) // stride + 1
    ow = (padded.shape[3] - dil * (kw - 1) - 1) // stride + 1
    acc = np.zeros((a.shape[0], m, oh, ow), np.int64)
    outs = m // groups
    for g, i, j in np.ndindex(groups, kh, kw):
        rows = slice(i * dil, i * dil + stride * (oh - 1) + 1, stride)
        cols = slice(j * dil, j * dil + stride * (ow - 1) + 1, stride)
        patch = padded[:, g * per_group : (g + 1) * per_group, rows, cols]
        taps = w[g * outs : (g + 1) * outs, :, i, j]
        acc[:, g * outs : (g + 1) * outs] += np.einsum("nchw,mc->nmhw", patch, taps)
    return acc


def integer_weight_ref(tensor: UniformTensor | IntCodebookTensor) -> np.ndarray:
    """``qdata - zero_point[c]`` or ``codebook[indices]`` in int64, 0 at pruned positions."""
    if isinstance(tensor, IntCodebookTensor):
        values = tensor.codebook.astype(np.int64)[tensor.indices]
    else:
        view = (-1,) + (1,) * (tensor.qdata.ndim - 1)
        values = tensor.qdata.astype(np.int64) - tensor.zero_point.astype(np.int64).reshape(view)
    return values if tensor.mask is None else np.where(tensor.mask, values, 0)


def epilogue_ref(acc: np.ndarray, act_scale: float, tensor: UniformTensor, bias: np.ndarray):
    """``(float32(acc) * (float32(s_a) * float32(s_w[c]))) + bias[c]`` in float32."""
    view = (-1,) + (1,) * (acc.ndim - 2)
    scale = np.broadcast_to(tensor.scale.astype(np.float32), (acc.shape[1],))
    multiplier = (np.float32(act_scale) * scale).reshape(view)
    value = acc.astype(np.float64).astype(np.float32)  # one rounding, to nearest even
    return (value * multiplier) + bias.reshape(view)


def skewed_uniform(rng, shape, bits, axis, zero_points, mask=None) -> UniformTensor:
    """Uniform codes in the upper half of the range, so that accumulators are large."""
    channels = 1 if axis is None else shape[0]
    return UniformTensor(
        qdata=rng.integers(2 ** (bits - 1), 2**bits, shape).astype(np.uint8),
        scale=rng.uniform(1e-4, 1e-3, channels).astype(np.float32),
        zero_point=np.asarray(zero_points, np.uint8).reshape(channels),
        bits=bits,
        axis=axis,
        mask=mask,
    )


def int_codebook(rng, shape, bits, mask=None) -> IntCodebookTensor:
    """int8 centroids spanning -128..127, float16 scales per output channel."""
    centroids = np.unique(np.r_[-128, 127, rng.integers(-128, 128, 2**bits - 2)])
    return IntCodebookTensor(
        codebook=centroids.astype(np.int8),
        scale=rng.uniform(1e-4, 1e-3, shape[0]).astype(np.float16),
        indices=rng.integers(0, len(centroids), shape).astype(np.uint8),
        bits=bits,
        mask=mask,
    )


WIDE_ZERO_POINTS = [0, 255, 7, 128, 30, 200, 1, 90]  # no one offset makes w_int uint8
# id -> (weight builder(rng, shape, mask), in channels, density, stride, pad, dilation, groups)
EXACT_CONVS = {
    "per_channel_8bit_wide_zero_points": (
        lambda r, s, m: skewed_uniform(r, s, 8, 0, WIDE_ZERO_POINTS, m), 128, 1, 1, 1, 1, 1
    ),
    "per_tensor_8bit": (lambda r, s, m: skewed_uniform(r, s, 8, None, [3], m), 64, 1, 1, 1, 1, 1),
    "per_channel_4bit_sparse_strided": (
        lambda r, s, m: skewed_uniform(r, s, 4, 0, [0, 15, 3, 8, 1, 2, 9, 4], m),
        *(48, 0.7, 2, 2, 2, 1),
    ),
    "depthwise_8bit": (
        lambda r, s, m: skewed_uniform(r, s, 8, 0, WIDE_ZERO_POINTS, m), 8, 1, 2, 1, 1, 8
    ),
    "grouped_8bit": (
        lambda r, s, m: skewed_uniform(r, s, 8, 0, WIDE_ZERO_POINTS, m), 16, 1, 1, 1, 1, 2
    ),
    "int_codebook_4bit_sparse": (lambda r, s, m: int_codebook(r, s, 4, m), 96, 0.6, 1, 1, 1, 1),
    "int_codebook_8bit_depthwise": (lambda r, s, m: int_codebook(r, s, 8, m), 8, 1, 1, 1, 1, 8),
}
ACT_CASES = [(8, 0.05, 0), (4, 0.3, 3)]


def exact_conv_file(path: Path, case: tuple, act: tuple) -> MbzFile:
    """quantize -> conv2d (an exact layer) -> flatten, 6x6 inputs, read back."""
    build, channels, density, stride, pad, dil, groups = case
    act_bits, act_scale, act_zero = act
    rng = np.random.default_rng(channels)
    shape = (8, channels // groups, 3, 3)
    mask = rng.random(shape) < density if density < 1 else None
    weight = build(rng, shape, mask)
    nodes = [
        node("q", "quantize", ["input"], attrs={"bits": act_bits, "scale": act_scale,
                                                "zero_point": act_zero}),
        conv_node("conv", "q", stride=stride, padding=pad, dilation=dil, groups=groups),
        node("flat", "flatten", ["conv"]),
    ]
    bias = DenseTensor(rng.standard_normal(8).astype(np.float16))
    metadata = {"graph": graph_of(nodes, [channels, 6, 6]), "preprocess": preprocess_for(channels)}
    write_mbz(path, metadata, {"conv.weight": weight, "conv.bias": bias})
    return read_mbz(path)


def run_from_graph_input(model: onnx.ModelProto, graph: dict, x: np.ndarray) -> np.ndarray:
    """The logits of ``model`` fed the float32 graph input ``x`` (NCHW) directly."""
    part = sub_model(model, [graph_value(graph["input"], graph)], [OUTPUT_NAME])
    return onnx_session(part).run(None, {part.graph.input[0].name: x})[0]


def exact_conv_reference(mbz: MbzFile, case: tuple, act: tuple) -> tuple:
    """Graph inputs (mostly positive floats, spread over the code range) and the int64
    accumulators and float32 logits of the file of ``exact_conv_file``, computed in numpy."""
    act_bits, act_scale, act_zero = act
    stride, pad, dil, groups = case[3:]
    rng = np.random.default_rng(1)
    x = rng.uniform(-0.2, 1, (3, case[1], 6, 6)).astype(np.float32)
    x *= np.float32(act_scale * 2**act_bits)
    a = quantize_ref(x, act_scale, act_zero, act_bits) - act_zero
    weight = mbz.tensors["conv.weight"]
    acc = window_sums_ref(a, integer_weight_ref(weight), stride, pad, dil, groups)
    bias = mbz.tensors["conv.bias"].decode()
    return x, acc, epilogue_ref(acc, act_scale, weight, bias).reshape(len(x), -1)


@pytest.mark.parametrize("act", ACT_CASES, ids=["act8", "act4"])
@pytest.mark.parametrize("case", EXACT_CONVS.values(), ids=EXACT_CONVS.keys())
def test_exact_conv_equals_integer_reference(tmp_path, case, act) -> None:
    mbz = exact_conv_file(tmp_path / "c.mbz", case, act)
    x, _, expected = exact_conv_reference(mbz, case, act)
    for dense in (False, True):
        model = export_onnx(mbz, dense=dense)
        onnx.checker.check_model(model, full_check=True)
        kernels = {n.op_type for n in model.graph.node} & {"Conv", "ConvInteger"}
        assert kernels == ({"Conv"} if case[-1] > 1 else {"ConvInteger"})  # SPEC.md 8.1
        if not dense:  # besides a codebook, no initializer is larger than the packed codes
            weight = mbz.tensors["conv.weight"]
            packed = -(-int(np.prod(weight.shape)) * weight.bits // 8)
            stored = [t for t in model.graph.initializer if not t.name.endswith("codebook_i8")]
            assert max(len(t.raw_data) for t in stored) <= packed
        got = run_from_graph_input(model, mbz.metadata["graph"], x)
        np.testing.assert_array_equal(got, expected)


def test_exact_conv_reference_needs_more_than_float32(tmp_path) -> None:
    # the widest case's accumulators pass 2**24, where float32 sums of them would round
    case = EXACT_CONVS["per_channel_8bit_wide_zero_points"]
    _, acc, _ = exact_conv_reference(exact_conv_file(tmp_path / "c.mbz", case, ACT_CASES[0]),
                                     case, ACT_CASES[0])
    assert np.abs(acc).max() > 2**24
    assert (acc.astype(np.float32).astype(np.int64) != acc).any()


@pytest.mark.parametrize("act", ACT_CASES, ids=["act8", "act4"])
def test_exact_linear_equals_integer_reference(tmp_path, act) -> None:
    # a classifier-sized layer: 1280 features, per-column offsets as MatMulInteger's zero points
    act_bits, act_scale, act_zero = act
    rng = np.random.default_rng(5)
    weight = skewed_uniform(rng, (8, 1280), 8, 0, WIDE_ZERO_POINTS)
    bias = rng.standard_normal(8).astype(np.float32)
    nodes = [
        node("flat", "flatten", ["input"]),
        node("q", "quantize", ["flat"], attrs={"bits": act_bits, "scale": act_scale,
                                               "zero_point": act_zero}),
        node("fc", "linear", ["q"], {"weight": "fc.weight", "bias": "fc.bias"}),
    ]
    metadata = {"graph": graph_of(nodes, [1280, 1, 1]), "preprocess": preprocess_for(1280)}
    write_mbz(tmp_path / "l.mbz", metadata, {"fc.weight": weight, "fc.bias": DenseTensor(bias)})
    model = export_onnx(read_mbz(tmp_path / "l.mbz"))
    assert Counter(n.op_type for n in model.graph.node)["MatMulInteger"] == 1
    x = rng.uniform(-0.2, 1, (4, 1280, 1, 1)).astype(np.float32)
    x *= np.float32(act_scale * 2**act_bits)
    a = quantize_ref(x.reshape(4, -1), act_scale, act_zero, act_bits) - act_zero
    acc = a @ integer_weight_ref(weight).T
    assert act_bits < 8 or np.abs(acc).max() > 2**24
    expected = epilogue_ref(acc, act_scale, weight, bias)
    np.testing.assert_array_equal(run_from_graph_input(model, metadata["graph"], x), expected)


POOLS = {
    "avgpool2d": {"kernel": [3, 3], "stride": [2, 2], "padding": [1, 1]},
    "global_avgpool": {},
}


@pytest.mark.parametrize("act", ACT_CASES, ids=["act8", "act4"])
@pytest.mark.parametrize("op", POOLS)
def test_pooling_of_codes_is_an_integer_sum(tmp_path, op: str, act) -> None:
    act_bits, act_scale, act_zero = act
    nodes = [
        node("q", "quantize", ["input"], attrs={"bits": act_bits, "scale": act_scale,
                                                "zero_point": act_zero}),
        node("pool", op, ["q"], attrs=POOLS[op]),
        node("flat", "flatten", ["pool"]),
    ]
    metadata = {"graph": graph_of(nodes, [5, 7, 7]), "preprocess": preprocess_for(5)}
    write_mbz(tmp_path / "p.mbz", metadata, {})
    model = export_onnx(read_mbz(tmp_path / "p.mbz"))
    assert not {"AveragePool", "GlobalAveragePool"} & {n.op_type for n in model.graph.node}
    x = np.random.default_rng(6).uniform(-1, 1, (3, 5, 7, 7)).astype(np.float32)
    x *= np.float32(act_scale * 2**act_bits)
    a = quantize_ref(x, act_scale, act_zero, act_bits) - act_zero
    kernel, stride, pad = (3, 2, 1) if op == "avgpool2d" else (7, 1, 0)
    ones = np.ones((5, 1, kernel, kernel), np.int64)
    sums = window_sums_ref(a, ones, stride, pad, 1, groups=5)
    scaled = sums.astype(np.float32) * np.float32(act_scale)
    expected = (scaled / np.float32(kernel * kernel)).reshape(3, -1)
    np.testing.assert_array_equal(run_from_graph_input(model, metadata["graph"], x), expected)


PACKS = {
    "uniform8_act8": ("--bits", "conv=8,fc=8", "--method", "uniform", "--act-bits", 8),
    "uniform4_act4": ("--bits", "conv=4,fc=4", "--method", "uniform", "--act-bits", 4),
    "kmeans4_int_act4": (
        *("--bits", "conv=4,fc=4", "--method", "kmeans", "--codebook", "int", "--act-bits", 4),
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("options", PACKS.values(), ids=PACKS.keys())
def test_packed_exact_file_gives_identical_logits_in_every_runtime(tmp_path, options) -> None:
    from mbz.runtime import exact
    from mbz.torch_graph import GraphModule, image_batches

    model_path, data = tmp_path / "model.pt", tmp_path / "data.npz"
    save_mbz_checkpoint(model_path, narrow_mobilenet())
    rng = np.random.default_rng(0)
    batch = rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8)
    np.savez(data, x_train=batch[:24], y_train=np.arange(24) % 10, x_test=batch[24:],
             y_test=np.arange(16) % 10)
    invoke("pack", model_path, *options, "--data", data, "--calib-images", 24, "-o",
           tmp_path / "m.mbz")
    mbz = read_mbz(tmp_path / "m.mbz")
    graph = mbz.metadata["graph"]
    assert exact.all_exact(graph, mbz.tensors)
    model = export_onnx(mbz)
    ops = Counter(n.op_type for n in model.graph.node)
    assert ops["ConvInteger"] >= 1 and ops["MatMulInteger"] == 1
    # the weights stay compressed: the initializers take about the .mbz's bytes (the graph's
    # nodes add a constant per layer on top)
    assert sum(len(t.raw_data) for t in model.graph.initializer) < 1.1 * mbz.file_size
    onnx_logits = OnnxProgram(model).predict(batch)
    numpy_logits = load_program(tmp_path / "m.mbz").predict(batch)
    module = GraphModule.of_tensors(graph, mbz.tensors).eval()
    with torch.no_grad():
        torch_logits = np.concatenate(
            [module(x).numpy() for _, x in image_batches(batch, mbz.metadata["preprocess"],
                                                         torch.device("cpu"), 16)]
        )
    np.testing.assert_array_equal(onnx_logits, numpy_logits)
    np.testing.assert_array_equal(onnx_logits, torch_logits)
