"""Data augmentation of the training loop, on whole uint8 batches on the training device:
random crop with zero padding and horizontal flip, and mixup."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

CROP_PADDING = 4  # pixels of zero padding around each image before the random crop

Mixed = tuple[torch.Tensor, float] | None  # mixup's (partner labels, weight of the own labels)


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding ``CROP_PADDING``) and horizontal flip of each image.

    ``images`` is a batch [N, H, W, C] of any dtype on any device; one gather over the batch,
    no per-image loop. Each output image is an H x W window of its zero-padded input, mirrored
    left-right with probability 1/2.
    """
    n, height, width, _ = images.shape
    device = images.device
    padded = F.pad(images, (0, 0, CROP_PADDING, CROP_PADDING, CROP_PADDING, CROP_PADDING))
    span = 2 * CROP_PADDING + 1
    top = torch.randint(0, span, (n, 1), generator=generator, device=device)
    left = torch.randint(0, span, (n, 1), generator=generator, device=device)
    flip = torch.rand((n, 1), generator=generator, device=device) < 0.5
    rows = top + torch.arange(height, device=device)
    cols = left + torch.arange(width, device=device)
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


def mixup(
    x: torch.Tensor,
    target: torch.Tensor,
    alpha: float,
    generator: torch.Generator,
    rng: np.random.Generator,
) -> tuple[torch.Tensor, Mixed]:
    """Mixup (alpha > 0): the batch blended with a shuffled copy of itself by a
    Beta(alpha, alpha) weight, and what the loss needs to blend the labels alike."""
    if alpha <= 0:
        return x, None
    weight = float(rng.beta(alpha, alpha))
    shuffle = torch.randperm(len(target), generator=generator, device=x.device)
    return weight * x + (1 - weight) * x[shuffle], (target[shuffle], weight)
