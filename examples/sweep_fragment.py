"""The compression study, small: train on the shared CIFAR-10 fragment, sweep, report.

Run from the repository root:

    python examples/sweep_fragment.py [--fragment ../shared/data/cifar10-fragment.npz]
        [--out runs/sweep_fragment] [--epochs 6] [--width 0.5] [--grid "..."] [--limit 500]
        [--ray]

It runs the same commands a user would, printing each one first:

    mbz train --data FRAGMENT --width 0.5 --epochs 6 --warmup-epochs 1 --seed 0 -o OUT/base.pt
    mbz sweep OUT/base.pt --data FRAGMENT --limit 500 --grid GRID -o OUT/sweep [--ray]
    mbz report OUT/sweep --baseline OUT/base.pt --max-drop 1.0

then writes OUT/report.md and OUT/report.json. Every step resumes: a trained checkpoint is
reused and finished sweep runs are skipped, so an interrupted study continues where it stopped.
The default grid (bits 8,4,2 x act_bits 32,8 x prune 0,0.36 x kmeans) is 12 runs, minutes on a
laptop CPU; the charts are OUT/sweep/sweep.html (offline) and its PNGs.
"""

from __future__ import annotations

import argparse
import platform
import shlex
import sys
import time
from contextlib import redirect_stdout
from pathlib import Path

import click
import numpy as np
import torch

from mbz.cli import main as mbz

DEFAULT_GRID = "bits=8,4,2 act_bits=32,8 prune=0,0.36 method=kmeans"


def run(args: list[str]) -> None:
    """Print and run one ``mbz`` command in this process; stop on its failure."""
    print("$ mbz " + shlex.join(args), flush=True)
    started = time.perf_counter()
    try:
        mbz.main(args=args, prog_name="mbz", standalone_mode=False)
    except click.ClickException as error:
        sys.exit(f"step failed: {error.format_message()}")
    print(f"  ({time.perf_counter() - started:.0f} s)", flush=True)


def main() -> None:
    """Train (unless done), sweep and report."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--fragment", default="../shared/data/cifar10-fragment.npz")
    parser.add_argument("--out", type=Path, default=Path("runs/sweep_fragment"))
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--grid", default=DEFAULT_GRID)
    parser.add_argument("--limit", type=int, default=500, help="test images per evaluation")
    parser.add_argument("--max-drop", default="1.0", help="accepted drop, percentage points")
    parser.add_argument("--ray", action="store_true", help="sweep the points as Ray tasks")
    options = parser.parse_args()
    out = options.out
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"python {platform.python_version()}, torch {torch.__version__}, numpy {np.__version__}, "
        f"{platform.machine()} {'CUDA' if torch.cuda.is_available() else 'CPU'}, seed 0",
        flush=True,
    )
    model = out / "base.pt"
    if not model.exists():
        run([
            "train", "--data", options.fragment, "--width", str(options.width),
            "--epochs", str(options.epochs), "--warmup-epochs", "1", "--seed", "0",
            "-o", str(model),
        ])  # fmt: skip
    sweep = out / "sweep"
    run([
        "sweep", str(model), "--data", options.fragment, "--limit", str(options.limit),
        "--grid", options.grid, "-o", str(sweep), *(["--ray"] if options.ray else []),
    ])  # fmt: skip
    for suffix, flag in (("md", "--markdown"), ("json", "--json")):
        report = ["report", str(sweep), "--baseline", str(model), "--max-drop", options.max_drop]
        print("$ mbz " + shlex.join([*report, flag]) + f" > {out / ('report.' + suffix)}")
        with open(out / f"report.{suffix}", "w") as handle, redirect_stdout(handle):
            mbz.main(args=[*report, flag], prog_name="mbz", standalone_mode=False)
    print((out / "report.md").read_text())


if __name__ == "__main__":
    main()
