"""The Python API: ``mbz.pack`` of an nn.Module or a file, ``mbz.load`` of the numpy program."""

import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import mbz
from mbz.config import SelectorError
from mbz.data import CIFAR10_MEAN, CIFAR10_STD
from mbz.format import read_mbz
from mbz.runtime import Program
from tests.helpers import (
    assert_runs_without_torch,
    invoke,
    narrow_mobilenet,
    save_mbz_checkpoint,
    sqnr_db,
)


class BasicBlock(nn.Module):
    """A CIFAR ResNet block: two 3x3 convolutions and a shortcut (1x1 when the shape changes)."""

    def __init__(self, inputs: int, outputs: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(inputs, outputs, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(outputs)
        self.conv2 = nn.Conv2d(outputs, outputs, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(outputs)
        self.shortcut = nn.Sequential()
        if stride != 1 or inputs != outputs:
            self.shortcut = nn.Sequential(
                nn.Conv2d(inputs, outputs, 1, stride, bias=False), nn.BatchNorm2d(outputs)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class SmallResNet(nn.Module):
    """A narrow ResNet-8 for 32x32 images (kuangliu/pytorch-cifar's layout, fewer blocks)."""

    def __init__(self, width: int = 8, classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.layer1 = BasicBlock(width, width, 1)
        self.layer2 = BasicBlock(width, 2 * width, 2)
        self.layer3 = BasicBlock(2 * width, 4 * width, 2)
        self.linear = nn.Linear(4 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, 8)
        return self.linear(out.view(out.size(0), -1))


def spread_batchnorm(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-default BatchNorm statistics and affine weights, so that every layer matters."""
    generator = torch.Generator().manual_seed(seed)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            size = module.num_features
            module.running_mean.copy_(torch.rand(size, generator=generator) - 0.5)
            module.running_var.copy_(torch.rand(size, generator=generator) + 0.5)
            module.weight.data.copy_(torch.rand(size, generator=generator) + 0.5)
    return model.eval()


def logits_of(model: nn.Module, images: np.ndarray) -> np.ndarray:
    x = torch.from_numpy(images).float() / 255
    x = ((x - torch.tensor(CIFAR10_MEAN)) / torch.tensor(CIFAR10_STD)).permute(0, 3, 1, 2)
    with torch.no_grad():
        return model.eval()(x).numpy()


@pytest.fixture(scope="module")
def images() -> np.ndarray:
    return np.random.default_rng(3).integers(0, 256, (16, 32, 32, 3), dtype=np.uint8)


def test_pack_captures_a_resnet_module_and_load_reproduces_it(tmp_path, images):
    torch.manual_seed(0)
    model = spread_batchnorm(SmallResNet())
    result = mbz.pack(model, tmp_path / "resnet.mbz", bits="conv=32,fc=32")
    assert result.path == tmp_path / "resnet.mbz"
    assert result.file_bytes == result.path.stat().st_size
    assert result.ratio == pytest.approx(result.fp32_bytes / result.file_bytes)
    assert result.accuracy is None and result.float_accuracy is None  # no data given
    program = mbz.load(result.path)
    assert isinstance(program, Program)
    assert sqnr_db(logits_of(model, images), program.predict(images)) > 60
    assert "arch" not in read_mbz(result.path).metadata["source"]  # captured as it is


def test_a_module_is_captured_directly_not_pickled(tmp_path, images, monkeypatch):
    class Local(SmallResNet):  # a class defined in a function cannot be pickled
        pass

    model = spread_batchnorm(Local(width=4), seed=1)
    with pytest.raises(AttributeError, match="Can't pickle local object"):
        torch.save(model, tmp_path / "local.pt")
    monkeypatch.chdir(tmp_path)
    result = mbz.pack(model, bits="conv=8,fc=8", method="uniform")
    assert result.path.name == "local.mbz"  # the class name, in the current folder
    assert sqnr_db(logits_of(model, images), mbz.load(result.path).predict(images)) > 30


def test_pack_with_data_reports_both_accuracies(tmp_path, images):
    model = spread_batchnorm(SmallResNet(), seed=2)
    labels = logits_of(model, images).argmax(1)  # the float model is right on every image
    data = tmp_path / "data.npz"
    np.savez(data, x_test=images, y_test=labels)
    seen = []
    result = mbz.pack(model, tmp_path / "m.mbz", data=str(data), limit=10, progress=seen.append)
    assert result.float_accuracy["top1"] == 1.0 and not result.float_accuracy["at_chance"]
    assert result.float_accuracy["images"] == result.accuracy["images"] == 10
    assert sum(seen) == 20  # the float model, then the packed one
    assert read_mbz(result.path).metadata["accuracy"] == result.accuracy


def test_the_cli_and_the_api_write_the_same_bytes(tmp_path):
    model = save_mbz_checkpoint(tmp_path / "model.pt", narrow_mobilenet())
    invoke("pack", model, "--bits", "fc=2", "--prune", 0.25, "-o", tmp_path / "cli.mbz")
    result = mbz.pack(model, tmp_path / "api.mbz", bits={"fc": 2}, prune=0.25)
    assert result.path.read_bytes() == (tmp_path / "cli.mbz").read_bytes()
    assert read_mbz(result.path).metadata["pack_config"]["bits"] == {"conv": 4, "fc": 2}


def test_options_are_checked(tmp_path):
    model = SmallResNet(width=4)
    with pytest.raises(ValueError, match="unknown pack option bitz"):
        mbz.pack(model, tmp_path / "x.mbz", bitz="conv=4")
    with pytest.raises(SelectorError, match=r"'layer9\.\*' is neither"):
        mbz.pack(model, tmp_path / "x.mbz", bits="layer9.*=2")
    with pytest.raises(ValueError, match="a module needs none"):
        mbz.pack(model, tmp_path / "x.mbz", arch="cifar")
    assert not (tmp_path / "x.mbz").exists()


def test_mbz_pack_is_the_function_although_mbz_pack_is_a_module_too():
    code = (
        "import sys\n"
        "import mbz\n"
        "assert 'torch' not in sys.modules\n"
        "from mbz.pack import PackResult\n"  # the submodule, imported first
        "from mbz.api import pack, load\n"
        "assert mbz.pack is pack and mbz.load is load\n"
        "from mbz import pack as again\n"
        "assert again is pack and sys.modules['mbz.pack'].PackResult is PackResult\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.strip() == "ok", result.stderr


def test_importing_mbz_and_its_runtime_loads_no_torch():
    assert_runs_without_torch("import mbz, mbz.format, mbz.runtime")
