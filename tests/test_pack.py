"""``mbz pack`` flags, model forms and parity, through the CLI on narrow models."""

import json

import numpy as np
import pytest
import torch

from mbz.format import read_mbz, write_mbz
from mbz.inspect import describe
from mbz.runtime import load_program
from mbz.torch_graph import GraphModule, preprocess_images
from tests.helpers import (
    CourseMobileNetV2,
    fragment_path,
    invoke,
    narrow_mobilenet,
    recalibrate_batchnorm,
    save_mbz_checkpoint,
    sqnr_db,
)


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(1).integers(0, 256, (8, 32, 32, 3), dtype=np.uint8)


def torch_logits(model: torch.nn.Module, images: np.ndarray, mean, std) -> np.ndarray:
    x = torch.from_numpy(images).float() / 255
    x = ((x - torch.tensor(mean)) / torch.tensor(std)).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model.eval()(x).numpy()


CIFAR = ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
@pytest.mark.parametrize("form", ["state_dict", "checkpoint", "torchscript", "course_pickle"])
def test_float_pack_reproduces_every_model_form(tmp_path, images, form):
    model = CourseMobileNetV2(width=8) if form == "course_pickle" else narrow_mobilenet()
    path, extra = tmp_path / "model.pt", ["--arch", "cifar"]
    if form == "state_dict":
        torch.save(model.state_dict(), path)
    elif form == "checkpoint":
        torch.save({"epoch": 3, "model_state_dict": model.state_dict()}, path)
    elif form == "torchscript":
        torch.jit.save(torch.jit.script(model.eval()), path)
        extra = []
    else:
        torch.save(model, path)
        extra = ["--trust-pickle"]
    out = tmp_path / "float.mbz"
    invoke("pack", path, "--bits", "conv=32,fc=32", "-o", out, *extra)
    logits = load_program(out).predict(images)
    assert sqnr_db(torch_logits(model, images, *CIFAR), logits) > 60


def test_bits_groups_and_globs_reach_the_layers(tmp_path):
    path, out = tmp_path / "model.pt", tmp_path / "m.mbz"
    save_mbz_checkpoint(path, narrow_mobilenet())
    invoke("pack", path, "--bits", "conv=4,fc=2,dw=8,pw=3,first=32,features.18.*=6", "-o", out)
    layers = {row["layer"]: row for row in describe(out)["layers"]}
    assert layers["features.0.0"]["encoding"] == "f32"
    assert layers["features.1.conv.0.0"]["bits"] == 8  # depthwise
    assert layers["features.2.conv.0.0"]["bits"] == 3  # pointwise expansion
    assert layers["features.18.0"]["bits"] == 6  # glob beats pw
    assert layers["classifier.1"]["bits"] == 2
    assert all(row["codebook_size"] <= 2 ** row["bits"] for row in layers.values() if row["bits"])


def test_uniform_symmetric_per_tensor_and_huffman(tmp_path):
    path = save_mbz_checkpoint(tmp_path / "model.pt", narrow_mobilenet())
    fixed, coded = tmp_path / "fixed.mbz", tmp_path / "huffman.mbz"
    invoke("pack", path, "--method", "uniform", "--symmetric", "--per-tensor", "--no-huffman",
           "-o", fixed)
    invoke("pack", path, "--method", "uniform", "--symmetric", "--per-tensor", "--huffman",
           "-o", coded)
    tensors = read_mbz(fixed).tensors
    weight = tensors["features.2.conv.0.0.weight"]
    assert weight.scale.shape == (1,) and weight.zero_point[0] == 2 ** (weight.bits - 1)
    rows = describe(coded)["layers"]
    assert any(row["entropy"] == "huffman" for row in rows)
    assert coded.stat().st_size < fixed.stat().st_size
    np.testing.assert_array_equal(
        load_program(coded).predict(np.zeros((2, 32, 32, 3), np.uint8)),
        load_program(fixed).predict(np.zeros((2, 32, 32, 3), np.uint8)),
    )


def test_mean_and_std_are_stored_and_used(tmp_path, images):
    path, out = tmp_path / "model.pt", tmp_path / "m.mbz"
    model = narrow_mobilenet()
    save_mbz_checkpoint(path, model)
    invoke("pack", path, "--bits", "conv=32,fc=32", "--mean", "0.5,0.5,0.5", "--std",
           "0.25,0.25,0.25", "-o", out)
    preprocess = read_mbz(out).metadata["preprocess"]
    assert preprocess["mean"] == [0.5] * 3 and preprocess["std"] == [0.25] * 3
    expected = torch_logits(model, images, (0.5,) * 3, (0.25,) * 3)
    assert sqnr_db(expected, load_program(out).predict(images)) > 60
    bad = invoke("pack", path, "--std", "0.2,0.2", "-o", out, expect=2)
    assert "one per RGB channel" in bad.output


def test_eval_fails_when_the_stored_accuracy_disagrees(tmp_path):
    rng = np.random.default_rng(0)
    data = tmp_path / "data.npz"
    np.savez(data, x_test=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
             y_test=rng.integers(0, 10, 40))
    path, out = tmp_path / "model.pt", tmp_path / "m.mbz"
    save_mbz_checkpoint(path, narrow_mobilenet())
    invoke("pack", path, "--data", data, "-o", out)
    report = json.loads(invoke("eval", out, "--data", data, "--runtime", "numpy", "--json").output)
    assert report["ok"] and [r["runtime"] for r in report["results"]] == ["numpy"]
    mbz = read_mbz(out)
    mbz.metadata["accuracy"]["top1"] += 0.5
    write_mbz(out, mbz.metadata, mbz.tensors)
    failed = invoke("eval", out, "--data", data, "--runtime", "torch", expect=1)
    assert "stored at pack time" in failed.output and "Traceback" not in failed.output
    limited = invoke("eval", out, "--data", data, "--limit", 10, "--json")
    assert json.loads(limited.output)["results"][0]["images"] == 10


@pytest.mark.slow
def test_parity_on_the_cifar10_fragment(tmp_path):
    fragment = fragment_path()
    if fragment is None:
        pytest.skip("needs ../shared/data/cifar10-fragment.npz (the shared CIFAR-10 fragment)")
    path, out = tmp_path / "model.pt", tmp_path / "m.mbz"
    model = recalibrate_batchnorm(narrow_mobilenet(), np.load(fragment)["x_train"][:512])
    save_mbz_checkpoint(path, model)
    invoke("pack", path, "--prune", 0.36, "--bits", "conv=4,fc=2", "--data", fragment, "-o", out)
    report = json.loads(
        invoke("eval", out, "--data", fragment, "--runtime", "all", "--json").output
    )
    assert report["ok"], report["failures"]
    assert report["agreement"]["numpy/torch"] >= 0.999
    accuracies = [r["accuracy"] for r in report["results"]]
    assert max(accuracies) - min(accuracies) <= 0.001
    # The image-dependent part of the logits (beyond their mean over images) must agree too.
    mbz = read_mbz(out)
    images = np.load(fragment)["x_test"][:256]
    logits = load_program(out).predict(images)
    assert np.unique(logits.argmax(1)).size >= 3, "a model predicting one class proves little"
    module = GraphModule(mbz.metadata["graph"], {k: t.decode() for k, t in mbz.tensors.items()})
    with torch.no_grad():
        x = preprocess_images(images, mbz.metadata["preprocess"], torch.device("cpu"))
        expected = module(x).numpy()
    assert sqnr_db(expected - expected.mean(0), logits - logits.mean(0)) > 60
