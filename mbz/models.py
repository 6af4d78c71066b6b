"""The MobileNet-v2 networks mbz rebuilds from a state_dict, their record, and reading the
width and class count from the weights.

``mobilenet_v2_cifar`` (mbz's, what ``mbz train`` trains) is torchvision's ``mobilenet_v2``
module by module, with stride 1 instead of 2 in the first convolution (``features.0.0``) and in
the first 24-channel block (``features.2``), because CIFAR-10 images are 32x32 instead of
224x224: the last feature map is 4x4. ``mobilenet_v2`` is torchvision's network as is. Both
have the same keys and shapes, so a state_dict cannot tell them apart: the architecture must be
recorded (as mbz's checkpoints do) or named by the user.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from itertools import accumulate

import torch
from torch import nn
from torchvision.models.mobilenetv2 import MobileNetV2, _make_divisible

from mbz.errors import MbzError
from mbz.records import check_record

ARCH_NAME = "mobilenet_v2_cifar"  # mbz's CIFAR-10 MobileNet-v2, as recorded in files
TORCHVISION_ARCH = "mobilenet_v2"  # torchvision.models.mobilenet_v2, ImageNet strides
ARCHS = {"cifar": ARCH_NAME, "torchvision": TORCHVISION_ARCH}  # --arch choice -> record name
_ABOUT = {
    ARCH_NAME: "mbz's CIFAR-10 MobileNet-v2, stride 1 in the stem and the first 24-channel "
    "block, what mbz train trains",
    TORCHVISION_ARCH: "torchvision.models.mobilenet_v2 as is, ImageNet strides",
}

# torchvision's inverted residual setting (t, c, n, s) with the 24-channel group at stride 1.
CIFAR_SETTING = [
    [1, 16, 1, 1],
    [6, 24, 2, 1],
    [6, 32, 3, 2],
    [6, 64, 4, 2],
    [6, 96, 3, 1],
    [6, 160, 3, 2],
    [6, 320, 1, 1],
]
_FIRST_CHANNELS = 32
_LAST_CHANNELS = 1280
_ROUND = 8
_LISTED = 8  # how many offending keys an error message names


def cifar_mobilenet_v2(
    num_classes: int = 10, width_mult: float = 1.0, dropout: float = 0.2
) -> MobileNetV2:
    """torchvision's MobileNet-v2 with the two CIFAR-10 stride changes (see module docstring)."""
    model = MobileNetV2(
        num_classes=num_classes,
        width_mult=width_mult,
        inverted_residual_setting=CIFAR_SETTING,
        dropout=dropout,
    )
    model.features[0][0].stride = (1, 1)
    return model


@dataclass(frozen=True)
class ArchConfig:
    """What it takes to rebuild one of the ARCHS; stored in mbz checkpoints and .mbz files."""

    name: str = ARCH_NAME
    num_classes: int = 10
    width_mult: float = 1.0
    dropout: float = 0.2

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> ArchConfig:
        """Inverse of ``to_dict``; rejects unknown architectures and keys."""
        config = cls(**check_record(cls, data, "architecture record"))
        check_arch_name(config.name)
        return config

    def build(self) -> MobileNetV2:
        """A freshly initialised model of this architecture."""
        if self.name == TORCHVISION_ARCH:
            return MobileNetV2(self.num_classes, self.width_mult, dropout=self.dropout)
        return cifar_mobilenet_v2(self.num_classes, self.width_mult, self.dropout)


def arch_choices() -> str:
    """The ``--arch`` choices and what each one is, for messages and ``--help``."""
    return " or ".join(f"{choice} ({_ABOUT[name]})" for choice, name in ARCHS.items())


def arch_named(choice: str) -> str:
    """The recorded name of an ``--arch`` choice (a key of ARCHS); MbzError listing them."""
    if choice not in ARCHS:
        raise MbzError(f"unknown --arch {choice!r}: choose {arch_choices()}")
    return ARCHS[choice]


def check_arch_name(name: str) -> str:
    """``name`` when it is a recorded architecture name (a value of ARCHS), else MbzError."""
    if name not in _ABOUT:
        raise MbzError(f"unknown architecture {name!r}: mbz builds {', '.join(_ABOUT)}")
    return name


def _channel_plan(width_mult: float) -> tuple[int, ...]:
    """Output channels of the stem, of each block group and of the last conv, for a width."""
    stem = _make_divisible(_FIRST_CHANNELS * width_mult, _ROUND)
    groups = tuple(_make_divisible(c * width_mult, _ROUND) for _, c, _, _ in CIFAR_SETTING)
    return (stem, *groups, _make_divisible(_LAST_CHANNELS * max(1.0, width_mult), _ROUND))


def _last_conv_channels(state_dict: dict[str, torch.Tensor], prefix: str) -> int | None:
    """Output channels of the last 4-D ``weight`` under ``prefix`` (state_dict order)."""
    weights = [
        value
        for key, value in state_dict.items()
        if key.startswith(prefix) and key.endswith(".weight") and value.dim() == 4
    ]
    return int(weights[-1].shape[0]) if weights else None


def _observed_plan(state_dict: dict[str, torch.Tensor]) -> tuple[int | None, ...]:
    """The channel plan a state_dict in torchvision's layout was made with."""
    ends = list(accumulate(n for _, _, n, _ in CIFAR_SETTING))  # last block of each group
    prefixes = ["features.0.", *(f"features.{end}." for end in ends), f"features.{ends[-1] + 1}."]
    return tuple(_last_conv_channels(state_dict, prefix) for prefix in prefixes)


def _width_for(plan: tuple[int | None, ...]) -> float | None:
    """A width multiplier giving ``plan``, preferring multiples of 0.05 (then of 0.01)."""
    grid = sorted(range(5, 401), key=lambda k: (k % 5 != 0, k))
    return next((k / 100 for k in grid if _channel_plan(k / 100) == plan), None)


def _shapes(state_dict: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in state_dict.items()}


def state_dict_mismatches(model: nn.Module, state_dict: dict[str, torch.Tensor]) -> list[str]:
    """Human-readable differences between a state_dict and the model's own keys and shapes.

    Missing ``num_batches_tracked`` counters are tolerated (they do not change inference).
    """
    expected, given = _shapes(model.state_dict()), _shapes(state_dict)
    missing = [k for k in expected if k not in given and not k.endswith("num_batches_tracked")]
    problems = [f"missing {k}" for k in missing]
    problems += [f"unexpected {k}" for k in given if k not in expected]
    problems += [
        f"{k}: shape {list(given[k])}, expected {list(shape)}"
        for k, shape in expected.items()
        if k in given and given[k] != shape
    ]
    return problems


def describe_mismatches(problems: list[str]) -> str:
    """The first few problems, and how many more there are."""
    listed = "; ".join(problems[:_LISTED])
    more = len(problems) - _LISTED
    return listed + (f"; and {more} more" if more > 0 else "")


def infer_arch(state_dict: dict[str, torch.Tensor], name: str = ARCH_NAME) -> ArchConfig:
    """The architecture ``name`` (a value of ARCHS) with the width and class count of the
    weights.

    The output channels of the stem, of each block group and of the last conv give the width
    multiplier, ``classifier.1.weight`` the class count; every key and shape must then match,
    else MbzError names the mismatching keys.
    """
    stem, head = state_dict.get("features.0.0.weight"), state_dict.get("classifier.1.weight")
    if stem is None or head is None or stem.dim() != 4 or head.dim() != 2:
        raise MbzError(
            "the state_dict is not a MobileNet-v2 in torchvision's layout (no 4-D "
            "'features.0.0.weight' and 2-D 'classifier.1.weight'); for another architecture "
            "save the whole module (torch.save(model)) and pass --trust-pickle"
        )
    width = _width_for(_observed_plan(state_dict)) or stem.shape[0] / _FIRST_CHANNELS
    config = ArchConfig(check_arch_name(name), int(head.shape[0]), width)
    with torch.device("meta"):
        problems = state_dict_mismatches(config.build(), state_dict)
    if not problems:
        return config
    raise MbzError(
        f"the state_dict does not match a MobileNet-v2 (torchvision layout, width {width:g}, "
        f"{config.num_classes} classes): {describe_mismatches(problems)}. For another "
        "architecture save the whole module (torch.save(model)) and pass --trust-pickle"
    )
