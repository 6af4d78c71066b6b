"""Models and data locations shared by the tests."""

from __future__ import annotations

import traceback
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from click.testing import CliRunner, Result
from torch import nn

from mbz.cli import main


def fragment_path() -> Path | None:
    """The shared CIFAR-10 fragment (``shared/data/cifar10-fragment.npz``), if present."""
    path = Path(__file__).resolve().parents[2] / "shared/data/cifar10-fragment.npz"
    return path if path.exists() else None


class Block(nn.Module):
    """Expand + depthwise + pointwise (kuangliu/pytorch-cifar ``models/mobilenetv2.py``)."""

    def __init__(self, in_planes: int, out_planes: int, expansion: int, stride: int) -> None:
        super().__init__()
        self.stride = stride

        planes = expansion * in_planes
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(
            planes, planes, kernel_size=3, stride=stride, padding=1, groups=planes, bias=False
        )
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, out_planes, kernel_size=1, stride=1, padding=0, bias=False)
        self.bn3 = nn.BatchNorm2d(out_planes)

        self.shortcut = nn.Sequential()
        if stride == 1 and in_planes != out_planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=1, padding=0, bias=False),
                nn.BatchNorm2d(out_planes),
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The block, with the residual connection when the stride is 1."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = F.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out = out + self.shortcut(x) if self.stride == 1 else out
        return out


class CourseMobileNetV2(nn.Module):
    """kuangliu/pytorch-cifar's CIFAR-10 MobileNetV2, written as in the course code.

    ``width`` divides every channel count (1 is the original network), so tests can run a
    narrow one.
    """

    # (expansion, out_planes, num_blocks, stride)
    cfg = (
        (1, 16, 1, 1),
        (6, 24, 2, 1),  # NOTE: change stride 2 -> 1 for CIFAR10
        (6, 32, 3, 2),
        (6, 64, 4, 2),
        (6, 96, 3, 1),
        (6, 160, 3, 2),
        (6, 320, 1, 1),
    )

    def __init__(self, num_classes: int = 10, width: int = 1) -> None:
        super().__init__()
        self.width = width
        # NOTE: change conv1 stride 2 -> 1 for CIFAR10
        self.conv1 = nn.Conv2d(3, self._c(32), kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(self._c(32))
        self.layers = self._make_layers(in_planes=self._c(32))
        self.conv2 = nn.Conv2d(
            self._c(320), self._c(1280), kernel_size=1, stride=1, padding=0, bias=False
        )
        self.bn2 = nn.BatchNorm2d(self._c(1280))
        self.linear = nn.Linear(self._c(1280), num_classes)

    def _c(self, channels: int) -> int:
        return max(1, channels // self.width)

    def _make_layers(self, in_planes: int) -> nn.Sequential:
        layers = []
        for expansion, out_planes, num_blocks, stride in self.cfg:
            strides = [stride] + [1] * (num_blocks - 1)
            for block_stride in strides:
                layers.append(Block(in_planes, self._c(out_planes), expansion, block_stride))
                in_planes = self._c(out_planes)
        return nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits of a batch of 32x32 images."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layers(out)
        out = F.relu(self.bn2(self.conv2(out)))
        # NOTE: change pooling kernel_size 7 -> 4 for CIFAR10
        out = F.avg_pool2d(out, 4)
        out = out.view(out.size(0), -1)
        out = self.linear(out)
        return out


def narrow_mobilenet(seed: int = 0, width_mult: float = 0.25) -> nn.Module:
    """mbz's CIFAR MobileNet-v2, narrow, with BatchNorm gammas and betas spread out so that
    channel ranking means something without training."""
    from mbz.models import cifar_mobilenet_v2

    torch.manual_seed(seed)
    model = cifar_mobilenet_v2(num_classes=10, width_mult=width_mult)
    for module in model.modules():
        if isinstance(module, nn.BatchNorm2d):
            nn.init.uniform_(module.weight, 0.2, 1.0)
            nn.init.normal_(module.bias, 0.0, 0.1)
    return model.eval()


def save_mbz_checkpoint(path: Path, model: nn.Module) -> Path:
    """``model`` (mbz's CIFAR MobileNet-v2, such as ``narrow_mobilenet()``) saved as mbz train
    saves it, with its architecture recorded, so that ``mbz pack`` needs no ``--arch``."""
    from mbz.checkpoint import save_checkpoint
    from mbz.models import infer_arch

    save_checkpoint(path, model, infer_arch(model.state_dict()))
    return path


def recalibrate_batchnorm(model: nn.Module, images_uint8_nhwc) -> nn.Module:
    """Set every BatchNorm's running statistics to those of ``images`` (no weight update), so
    an untrained model's activations keep a useful scale; the model in eval mode."""
    from mbz.data import CIFAR10_MEAN, CIFAR10_STD
    from mbz.finetune import reestimate_batchnorm

    preprocess = {"mean": CIFAR10_MEAN, "std": CIFAR10_STD}
    reestimate_batchnorm(model, np.asarray(images_uint8_nhwc), preprocess, "cpu")
    return model.eval()


def assert_runs_without_torch(body: str) -> None:
    """Run ``body`` in a fresh Python where importing torch or torchvision fails; it must print
    ok and must not have loaded torch."""
    import subprocess
    import sys

    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        f"{body}\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def invoke(*args: object, expect: int | None = 0, **kwargs) -> Result:
    """Run ``mbz ARGS`` in-process; unless ``expect`` is None, check the exit code (and show the
    output, with the traceback of an unexpected exception, when it differs)."""
    result = CliRunner().invoke(main, [str(a) for a in args], **kwargs)
    if expect is not None and result.exit_code != expect:
        detail = result.output
        if result.exc_info and not isinstance(result.exception, SystemExit):
            detail += "".join(traceback.format_exception(*result.exc_info))
        raise AssertionError(f"exit {result.exit_code}, expected {expect}:\n{detail}")
    return result


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio of ``approx`` against ``reference``, in dB (inf when
    they are equal)."""
    ref64, x64 = np.asarray(reference, dtype=np.float64), np.asarray(approx, dtype=np.float64)
    noise = np.sum((ref64 - x64) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(ref64**2) / noise))


def random_model_and_data(workdir: Path, seed: int) -> tuple[Path, Path]:
    """A narrow MobileNet-v2 checkpoint (BatchNorm statistics from its train images) and an
    .npz of 32 random train and 24 random test images with labels, in ``workdir``."""
    model, data = workdir / "model.pt", workdir / "data.npz"
    rng = np.random.default_rng(seed)
    train = rng.integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    save_mbz_checkpoint(model, recalibrate_batchnorm(narrow_mobilenet(seed), train))
    np.savez(
        data,
        x_train=train,
        y_train=rng.integers(0, 10, 32, dtype=np.uint8),
        x_test=rng.integers(0, 256, (24, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, 24, dtype=np.uint8),
    )
    return model, data
