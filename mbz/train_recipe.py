"""How ``mbz train`` trains: the ``Recipe`` (one flag per field) and its learning-rate schedule."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

from mbz.errors import MbzError
from mbz.records import check_record


@dataclass
class Recipe:
    """How to train; every field is a flag of ``mbz train`` with the same default.

    The defaults follow the reference reports (batch 128, peak LR 0.1, 5 warm-up epochs,
    weight decay 5e-4); the reports also used label smoothing 0.1 and mixup 0.2.
    """

    epochs: int = 30  # passes over the training images
    batch_size: int = 128  # images per optimizer step, all processes together
    lr: float = 0.1  # peak learning rate, reached at the end of the warm-up
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # L2 penalty on every parameter (SGD's weight_decay)
    warmup_epochs: float = 5.0  # linear warm-up from 0 to lr; cosine decay to 0 follows
    label_smoothing: float = 0.0
    mixup: float = 0.0  # alpha of the Beta(alpha, alpha) mixing weight; 0 turns mixup off
    augment: bool = True  # random crop (zero padding 4) and horizontal flip
    seed: int = 0  # shuffling, augmentation, mixup and dropout

    def __post_init__(self) -> None:
        """ValueError naming every out-of-range field."""
        checks = {
            "epochs must be >= 1": self.epochs >= 1,
            "batch_size must be >= 1": self.batch_size >= 1,
            "lr must be > 0": self.lr > 0,
            "momentum must be in [0, 1)": 0 <= self.momentum < 1,
            "nesterov needs momentum > 0": not self.nesterov or self.momentum > 0,
            "weight_decay must be >= 0": self.weight_decay >= 0,
            "warmup_epochs must be >= 0": self.warmup_epochs >= 0,
            "label_smoothing must be in [0, 1)": 0 <= self.label_smoothing < 1,
            "mixup must be >= 0": self.mixup >= 0,
        }
        problems = [message for message, ok in checks.items() if not ok]
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        """Inverse of ``to_dict``; MbzError for unknown keys or out-of-range values."""
        try:
            return cls(**check_record(cls, data, "training recipe"))
        except ValueError as error:
            raise MbzError(f"invalid training recipe: {error}") from error


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Learning rate of optimizer step ``step`` (from 0): linear warm-up, then cosine to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, progress)))
