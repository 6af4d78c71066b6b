"""What a new user meets first: models written elsewhere and ordinary mistakes get the right
network or one clear line (issue 15)."""

import json

import numpy as np
import pytest
import torch
from torch import nn
from torchvision.models import mobilenet_v2

from mbz.api import prepare_pack
from mbz.capture import capture
from mbz.errors import MbzError
from mbz.format import read_mbz
from mbz.runtime import load_program
from tests.helpers import invoke, narrow_mobilenet, save_mbz_checkpoint, sqnr_db
from tests.test_api import logits_of, spread_batchnorm


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("front-door")


@pytest.fixture(scope="module")
def torchvision_model():
    torch.manual_seed(0)
    return spread_batchnorm(mobilenet_v2(num_classes=10))


@pytest.fixture(scope="module")
def torchvision_file(workdir, torchvision_model):
    path = workdir / "tv.pt"
    torch.save(torchvision_model.state_dict(), path)
    return path


@pytest.fixture(scope="module")
def checkpoint(workdir):
    return save_mbz_checkpoint(workdir / "mbz.pt", narrow_mobilenet())


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(5).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)


def npz(path, images, labels):
    np.savez(path, x_train=images, y_train=labels, x_test=images, y_test=labels)
    return path


@pytest.fixture(scope="module")
def size64(workdir):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (8, 64, 64, 3), dtype=np.uint8)
    return npz(workdir / "size64.npz", images, rng.integers(0, 10, 8))


def one_error_line(output: str) -> str:
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), output
    return lines[0]


# 1. A torchvision state_dict: the right network, or a refusal naming the choices.


def test_torchvision_state_dict_is_refused_without_arch(workdir, torchvision_file):
    out = workdir / "refused.mbz"
    line = one_error_line(invoke("pack", torchvision_file, "-o", out, expect=1).output)
    assert "--arch cifar (mbz's CIFAR-10 MobileNet-v2" in line
    assert "torchvision (torchvision.models.mobilenet_v2 as is" in line
    assert not out.exists()


def test_torchvision_state_dict_with_arch_reproduces_the_module(
    workdir, torchvision_file, torchvision_model, images
):
    out = workdir / "tv.mbz"
    invoke("pack", torchvision_file, "--arch", "torchvision", "--bits", "conv=32,fc=32", "-o", out)
    expected = logits_of(torchvision_model, images)
    assert sqnr_db(expected, load_program(out).predict(images)) > 60
    arch = read_mbz(out).metadata["source"]["arch"]
    assert arch == {"name": "mobilenet_v2", "num_classes": 10, "width_mult": 1.0, "dropout": 0.2}
    wrong = workdir / "as_cifar.mbz"  # what the same weights gave before: another network
    invoke("pack", torchvision_file, "--arch", "cifar", "--bits", "conv=32,fc=32", "-o", wrong)
    assert sqnr_db(expected, load_program(wrong).predict(images)) < 40  # 26 dB here


@pytest.mark.filterwarnings("ignore:`torch.jit.*` is deprecated:FutureWarning")
def test_scripted_torchvision_model_is_rebuilt_with_its_strides(torchvision_model, images):
    scripted = torch.jit.script(torchvision_model)
    graph = capture(scripted).graph
    strides = {n["name"]: n["attrs"]["stride"] for n in graph["nodes"] if n["op"] == "conv2d"}
    assert strides["features.0.0"] == [2, 2]  # torchvision's, not mbz's CIFAR stride 1


def test_a_float_model_at_chance_is_reported(workdir, checkpoint, images):
    random_labels = npz(workdir / "random.npz", images, np.arange(16) % 10)
    packed = invoke("pack", checkpoint, "--data", random_labels, "-o", workdir / "c.mbz")
    assert "no better than chance (10%)" in packed.output
    assert "--arch" in packed.output and "--mean/--std" in packed.output
    model = narrow_mobilenet()
    own = npz(workdir / "own.npz", images, logits_of(model, images).argmax(1))
    fine = invoke("pack", checkpoint, "--data", own, "-o", workdir / "f.mbz")
    assert "chance" not in fine.output
    assert "(float 100.00%, +0.00 pt) on 16 images" in fine.output


# 2. --bits and --act-bits accept only what they can use.


@pytest.mark.parametrize(
    ("flag", "value", "expected"),
    [
        ("--bits", "cov=2", "'cov' is neither a group nor a name in the model: use a group "
                            "(conv, fc, dw, pw, first)"),
        ("--bits", "fc=2,fc=8", "'fc' is given twice"),
        ("--bits", "features.99.*=2", "name glob matching one of features.0.0, "),
        ("--act-bits", "relu=4,rleu=8", "'rleu' is neither a group nor a name in the model: use "
                                        "a group (input, relu, add, proj, operand)"),
        ("--act-bits", "8,4", "several bare numbers"),
    ],
)
def test_bad_rules_exit_2_naming_the_valid_ones(workdir, checkpoint, flag, value, expected):
    data = npz(workdir / "d.npz", np.zeros((4, 32, 32, 3), np.uint8), np.zeros(4, np.int64))
    out = workdir / "bad.mbz"
    result = invoke("pack", checkpoint, flag, value, "--data", data, "-o", out, expect=2)
    assert f"Invalid value for '{flag}'" in result.output and expected in result.output
    assert not out.exists()


def test_rules_overlay_the_defaults_that_help_documents(workdir, checkpoint):
    out = workdir / "overlay.mbz"
    invoke("pack", checkpoint, "--bits", "fc=2", "-o", out)
    layers = read_mbz(out).metadata["layers"]
    assert {f["bits"] for name, f in layers.items() if name != "classifier.1"} == {4}
    assert layers["classifier.1"]["bits"] == 2
    text = " ".join(invoke("pack", "--help").output.split())
    assert "Rules overlay the defaults conv=4,fc=4" in text
    assert "(--bits fc=2 gives every conv layer 4 bits)" in text
    assert "Other activations no rule selects stay float32" in text
    assert "(operand: the pooled features) take 8 bits unless a rule names them" in text


# 3. Images of the wrong size: one line on every command, nothing stored.


def test_wrong_image_size_is_one_line_on_pack_and_stores_nothing(workdir, checkpoint, size64):
    out = workdir / "size64.mbz"
    for extra in ([], ["--act-bits", "8"], ["--finetune-epochs", "1"]):
        line = one_error_line(
            invoke("pack", checkpoint, "--data", size64, "-o", out, *extra, expect=1).output
        )
        assert "size64.npz:test has 64x64 images" in line or "size64.npz:train" in line
        assert "takes 32x32 images" in line
        assert not out.exists()


@pytest.mark.parametrize("runtime", ["numpy", "torch", "onnx", "all"])
def test_wrong_image_size_is_one_line_on_eval(workdir, checkpoint, size64, runtime):
    good = workdir / "good.mbz"
    if not good.exists():
        invoke("pack", checkpoint, "-o", good)
    result = invoke("eval", good, "--data", size64, "--runtime", runtime, expect=1)
    line = one_error_line(result.output)
    assert f"size64.npz:test has 64x64 images with 3 channels, but {good} takes 32x32" in line


def test_wrong_image_size_is_one_line_on_train(workdir, size64):
    out = workdir / "trained.pt"
    result = invoke("train", "--data", size64, "--epochs", 1, "-o", out, expect=1)
    assert "size64.npz:train has 64x64 images" in one_error_line(result.output)
    assert not out.exists()


# 4. Advice that fits the mistake.


def test_output_in_a_missing_directory_says_so(workdir, checkpoint):
    result = invoke("pack", checkpoint, "-o", workdir / "missing_dir" / "x.mbz", expect=1)
    line = one_error_line(result.output)
    assert f"the directory {workdir / 'missing_dir'} does not exist" in line
    assert ".tmp" not in line


def test_every_unsupported_operation_is_listed_at_once():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 8, 3)
            self.act = nn.GELU()
            self.norm = nn.LayerNorm(8)
            self.act2 = nn.GELU()
            self.fc = nn.Linear(8, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.sigmoid(self.act(self.conv(x)))
            x = self.norm(self.act2(x).mean((2, 3)))
            return self.fc(x)

    with pytest.raises(MbzError) as error:
        capture(Odd())
    message = str(error.value)
    assert message.startswith("the model uses 3 unsupported operations: ")
    assert "'GELU' in module 'act', module 'act2'" in message
    assert "'sigmoid' in the top-level forward" in message
    assert "'LayerNorm' in module 'norm'" in message


# 6. Fine-tuning on a subset.


def test_limit_train_cuts_the_fine_tuning_images(workdir, checkpoint, images):
    data = npz(workdir / "ft.npz", images, np.arange(16) % 10)
    job = prepare_pack(checkpoint, workdir / "ft.mbz", data=str(data), limit_train=8,
                       finetune_epochs=1, val_fraction=0.25)
    assert (len(job.tuning.train), len(job.tuning.val)) == (6, 2)
    assert len(job.dataset) == 16  # the test split is not cut by --limit-train
    result = invoke("pack", checkpoint, "--limit-train", 8, "-o", workdir / "x.mbz", expect=2)
    assert "--limit-train limits the images of fine-tuning" in result.output


def test_json_summary_carries_the_float_accuracy(workdir, checkpoint, images):
    data = npz(workdir / "j.npz", images, np.arange(16) % 10)
    summary = json.loads(
        invoke("pack", checkpoint, "--data", data, "-o", workdir / "j.mbz", "--json").stdout
    )
    assert summary["float_accuracy"]["images"] == 16 and summary["float_accuracy"]["chance"] == 0.1


def test_inspect_fits_100_columns_and_wide_shows_everything(workdir, checkpoint):
    out = workdir / "inspected.mbz"
    invoke("pack", checkpoint, "--prune", 0.36, "--prune-mode", "weight", "-o", out)
    narrow = invoke("inspect", out).output.splitlines()
    assert max(map(len, narrow)) <= 100
    assert narrow[0].split() == ["layer", "shape", "kept", "encoding", "bits", "k", "sparse",
                                 "mask", "exact", "bytes"]
    wide = invoke("inspect", out, "--wide").output.splitlines()
    assert wide[0].split()[-7:] == ["payload", "codebook", "scales", "mask", "exact", "bound",
                                    "total"]
    assert "->" in wide[1] and max(map(len, wide)) > 100
    # The same layers, and each row's total bytes, in both.
    assert [row.split()[0] for row in narrow[1:4]] == [row.split()[0] for row in wide[1:4]]
    assert [row.split()[-1] for row in narrow[1:4]] == [row.split()[-1] for row in wide[1:4]]
