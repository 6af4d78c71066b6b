"""Train a model mbz did not make: torchvision's ``mobilenet_v2`` with CIFAR strides, plain torch.

Compression results are reported as the drop against this float model (and beside a model made by
``mbz train``), because numbers measured only on mbz's own models have misled us. Nothing here uses
mbz: the layout is torchvision's, the normalisation constants are this script's own, the recipe is
a short SGD run on the images of an ``.npz`` (``x_train``/``y_train`` uint8 NHWC, such as
``../shared/data/cifar10-fragment.npz``).

    python examples/train_torchvision.py ../shared/data/cifar10-fragment.npz -o runs/tv.pt

The output is a checkpoint dict ``{"state_dict", "mean", "std", "test_top1"}``; it prints the
``mbz pack`` command that compresses it (the CIFAR strides are mbz's ``--arch cifar``).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

# Not mbz's constants on purpose: a user's model comes with its own.
MEAN = (0.5, 0.5, 0.5)
STD = (0.25, 0.25, 0.25)


def cifar_mobilenet_v2(num_classes: int = 10, width: float = 1.0) -> nn.Module:
    """torchvision's mobilenet_v2 with stride 1 in the first conv and the first 24-channel block,
    the usual change for 32x32 images."""
    model = torchvision.models.mobilenet_v2(num_classes=num_classes, width_mult=width)
    model.features[0][0].stride = (1, 1)
    model.features[2].conv[1][0].stride = (1, 1)
    return model


def to_tensor(images: np.ndarray, device: torch.device) -> torch.Tensor:
    """uint8 NHWC images -> normalised float NCHW (channels_last memory)."""
    x = torch.from_numpy(images).to(device).permute(0, 3, 1, 2).float().div_(255)
    mean = torch.tensor(MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(STD, device=device).view(1, 3, 1, 1)
    return ((x - mean) / std).contiguous(memory_format=torch.channels_last)


def augment(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (4-pixel zero padding) and horizontal flip, per image."""
    n, _, h, w = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dy = torch.randint(0, 9, (n,), generator=generator).tolist()
    dx = torch.randint(0, 9, (n,), generator=generator).tolist()
    flip = torch.rand(n, generator=generator).lt(0.5).tolist()
    out = torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(n)])
    out[flip] = out[flip].flip(3)
    return out.contiguous(memory_format=torch.channels_last)


@torch.no_grad()
def top1(model: nn.Module, images: np.ndarray, labels: np.ndarray, device: torch.device) -> float:
    """Top-1 accuracy in eval mode, batches of 256."""
    model.eval()
    correct = 0
    for start in range(0, len(images), 256):
        logits = model(to_tensor(images[start : start + 256], device))
        correct += int((logits.argmax(1).cpu().numpy() == labels[start : start + 256]).sum())
    return correct / len(images)


def train(args: argparse.Namespace) -> dict:
    """The whole run; returns the summary that is printed and saved."""
    torch.manual_seed(args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    data = np.load(args.data)
    x, y = data["x_train"], data["y_train"].astype(np.int64)
    model = cifar_mobilenet_v2(width=args.width).to(device).to(memory_format=torch.channels_last)
    steps_per_epoch = len(x) // args.batch_size
    optimizer = torch.optim.SGD(
        model.parameters(), lr=args.lr, momentum=0.9, nesterov=True, weight_decay=5e-4
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, args.lr, total_steps=args.epochs * steps_per_epoch, pct_start=0.15
    )
    generator = torch.Generator().manual_seed(args.seed)
    start = time.perf_counter()
    for epoch in range(args.epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator).numpy()
        for step in range(steps_per_epoch):
            idx = order[step * args.batch_size : (step + 1) * args.batch_size]
            inputs = augment(to_tensor(x[idx], device), generator)
            loss = F.cross_entropy(model(inputs), torch.from_numpy(y[idx]).to(device),
                                   label_smoothing=0.1)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()
        seen = (epoch + 1) * steps_per_epoch * args.batch_size
        rate = seen / (time.perf_counter() - start)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss.item():.3f}, {rate:.1f} img/s",
              flush=True)
    accuracy = top1(model, data["x_test"], data["y_test"].astype(np.int64), device)
    model.cpu()
    torch.save({"state_dict": model.state_dict(), "mean": MEAN, "std": STD,
                "test_top1": accuracy}, args.output)
    return {"output": str(args.output), "test_top1": accuracy, "epochs": args.epochs,
            "seconds": round(time.perf_counter() - start, 1), "device": str(device)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("data", type=Path, help=".npz with x_train/y_train/x_test/y_test")
    parser.add_argument("-o", "--output", type=Path, default=Path("runs/torchvision_mnv2.pt"))
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier")
    args = parser.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    summary = train(args)
    print(json.dumps(summary))
    mean, std = ",".join(map(str, MEAN)), ",".join(map(str, STD))
    print(f"pack it: mbz pack {args.output} --arch cifar --mean {mean} --std {std} "
          f"--data {args.data} -o model.mbz")


if __name__ == "__main__":
    main()
