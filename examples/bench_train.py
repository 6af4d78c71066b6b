"""Benchmark training speed: images/s of mbz's training loop (``mbz.training.fit``).

Run: python examples/bench_train.py [--width 1.0] [--images 512] [--epochs 2] [--threads N]
Trains mbz's MobileNet-v2 on the first IMAGES training images of the shared CIFAR-10 fragment
(random images when it is absent) and reports each epoch's images/s; the first epoch includes
one-time warm-up (oneDNN/cuDNN kernel selection), so the best later epoch is the figure to quote.
It also times bare training steps in NCHW and channels_last memory formats (fit uses the
latter). Prints a table and writes runs/bench_train.json with the command and the machine.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mbz.data import CIFAR10_CLASSES, Dataset, load_split
from mbz.evaluate import pick_device
from mbz.models import cifar_mobilenet_v2
from mbz.train_recipe import Recipe
from mbz.training import fit

FRAGMENT = Path(__file__).resolve().parents[2] / "shared/data/cifar10-fragment.npz"


def images(count: int) -> Dataset:
    """The first ``count`` fragment training images, or random ones without the fragment."""
    if FRAGMENT.exists():
        return load_split(str(FRAGMENT), "train").head(count)
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    return Dataset(pixels, rng.integers(0, 10, count), CIFAR10_CLASSES, "random")


def fit_speeds(args: argparse.Namespace, data: Dataset, device: torch.device) -> list[float]:
    """images/s of each epoch of ``fit`` (no validation)."""
    torch.manual_seed(0)
    model = cifar_mobilenet_v2(width_mult=args.width)
    recipe = Recipe(epochs=args.epochs, batch_size=args.batch_size, warmup_epochs=1)
    result = fit(model, data, recipe, device=device)
    return [row["images_per_s"] for row in result.history]


def format_speeds(args: argparse.Namespace, device: torch.device, steps: int = 4) -> dict:
    """images/s of bare training steps (best of ``steps``) per memory format."""
    speeds = {}
    for name, memory_format in (
        ("nchw", torch.contiguous_format),
        ("channels_last", torch.channels_last),
    ):
        torch.manual_seed(0)
        model = cifar_mobilenet_v2(width_mult=args.width).to(device, memory_format=memory_format)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, nesterov=True)
        x = torch.randn(args.batch_size, 3, 32, 32, device=device)
        x = x.contiguous(memory_format=memory_format)
        y = torch.randint(0, 10, (args.batch_size,), device=device)
        times = []
        for _ in range(steps + 1):  # the first step warms up
            start = time.perf_counter()
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - start)
        speeds[name] = args.batch_size / min(times[1:])
    return speeds


def main() -> None:
    """Measure, print and save."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--width", type=float, default=1.0)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device()
    data = images(args.images)
    per_epoch = fit_speeds(args, data, device)
    formats = format_speeds(args, device)
    machine = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    results = {
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "device": f"{device.type}: {machine or platform.machine()}",
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1min": os.getloadavg()[0],  # other processes sharing the cores
        "torch": str(torch.__version__),
        "data": f"{data.source}, {len(data)} images",
        "width": args.width,
        "batch_size": args.batch_size,
        "fit_images_per_s_per_epoch": per_epoch,
        "fit_images_per_s": max(per_epoch[1:] or per_epoch),
        "bare_step_images_per_s": formats,
    }
    print(
        f"{results['device']}, {results['torch_threads']} torch threads, "
        f"load average {results['load_average_1min']:.1f}"
    )
    print(f"fit, width {args.width}, batch {args.batch_size}, {results['data']}:")
    for epoch, speed in enumerate(per_epoch, 1):
        print(f"  epoch {epoch}: {speed:8.1f} images/s")
    for name, speed in formats.items():
        print(f"bare training step, {name:13}: {speed:8.1f} images/s")
    out = Path("runs/bench_train.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
