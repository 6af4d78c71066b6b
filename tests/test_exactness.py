"""How far the runtimes are from bit-exact agreement (issue 14): the largest logit difference that
`mbz eval` reports, and activation codes on exact rounding boundaries."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from mbz.format import read_mbz
from mbz.onnx.export import export_onnx
from mbz.onnx.session import OnnxProgram
from mbz.runtime import load_program
from mbz.runtime.codes import encode, quantize
from mbz.torch_graph import GraphModule, image_batches
from tests.helpers import (
    invoke,
    narrow_mobilenet,
    recalibrate_batchnorm,
    save_mbz_checkpoint,
)

F32 = np.float32


@pytest.fixture(scope="module")
def packed(tmp_path_factory):
    """(a .mbz with 8-bit weights and 8-bit activations, an npz of random images)."""
    workdir = tmp_path_factory.mktemp("exact")
    model, data, out = workdir / "model.pt", workdir / "data.npz", workdir / "a8.mbz"
    rng = np.random.default_rng(3)
    train = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    save_mbz_checkpoint(model, recalibrate_batchnorm(narrow_mobilenet(3), train))
    np.savez(
        data,
        x_train=train,
        y_train=rng.integers(0, 10, 32, dtype=np.uint8),
        x_test=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, 24, dtype=np.uint8),
    )
    invoke("pack", model, "--bits", "conv=8,fc=8", "--act-bits", 8, "--calib", "min-max",
           "--data", data, "-o", out)
    return out, data


def torch_logits(path, images: np.ndarray) -> np.ndarray:
    """The file's logits from its graph run as the torch fake-quant module, in one batch."""
    mbz = read_mbz(path)
    params = {name: tensor.decode() for name, tensor in mbz.tensors.items()}
    module = GraphModule(mbz.metadata["graph"], params).eval()
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
