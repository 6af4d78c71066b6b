"""Accuracy at size, post-training: real file bytes, ratio, top-1 and the drop against the float
model on the same test images, for a grid of settings, with the Pareto front.

    python examples/bench_accuracy_at_size.py MODEL DATA [--arch cifar --mean ... --std ...]

MODEL is anything ``mbz pack`` takes (e.g. the output of ``examples/train_torchvision.py``, or an
``mbz train`` checkpoint); DATA an ``.npz`` or ``cifar10``. Each row is one ``mbz.pack`` call
(the Python API ``mbz pack`` runs), so the numbers are those of the files written. It prints a
Markdown table and saves ``runs/bench_accuracy_at_size.json`` with the command line and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

import mbz
from mbz.budget import BudgetError

# name -> pack options (post-training: no fine-tuning)
SETTINGS: dict[str, dict] = {
    "kmeans 8/8": {"bits": "conv=8,fc=8"},
    "kmeans 4/4 plain": {"bits": "conv=4,fc=4", "codebook": "plain"},
    "kmeans 4/4": {"bits": "conv=4,fc=4"},
    "kmeans 3/3 plain": {"bits": "conv=3,fc=3", "codebook": "plain"},
    "kmeans 3/3": {"bits": "conv=3,fc=3"},
    "uniform 4/4": {"bits": "conv=4,fc=4", "method": "uniform"},
    "uniform 3/3": {"bits": "conv=3,fc=3", "method": "uniform"},
    "prune 0.36 kmeans 4/2 plain": {"bits": "conv=4,fc=2", "prune": 0.36, "codebook": "plain"},
    "prune 0.36 kmeans 4/2": {"bits": "conv=4,fc=2", "prune": 0.36},
    # bits per layer chosen for a size (mbz.budget); a ratio below the smallest file is reported
    **{f"target {r}x": {"target_ratio": r, "huffman": True} for r in (10, 15, 20, 30, 40)},
}


def pareto(rows: list[dict]) -> list[str]:
    """Names of the rows no other row beats in both bytes (fewer) and top-1 (higher)."""
    front = []
    for row in rows:
        beaten = any(
            o["file_bytes"] <= row["file_bytes"] and o["top1"] >= row["top1"] and o is not row
            and (o["file_bytes"], -o["top1"]) != (row["file_bytes"], -row["top1"])
            for o in rows
        )
        if not beaten:
            front.append(row["name"])
    return front


def run(args: argparse.Namespace) -> dict:
    """Pack every setting (or the ``--only`` ones) and collect the rows."""
    common = {"data": args.data, "arch": args.arch, "limit": args.limit}
    if args.mean:
        common |= {"mean": args.mean, "std": args.std}
    rows, unreachable = [], []
    names = args.only or list(SETTINGS)
    for name in names:
        start = time.perf_counter()
        output = args.out / f"{name.replace(' ', '_').replace('/', '-')}.mbz"
        try:
            result = mbz.pack(args.model, output, **common, **SETTINGS[name])
        except BudgetError as error:
            unreachable.append({"name": name, "options": SETTINGS[name], "error": str(error)})
            print(f"| {name} | smallest {error.smallest:,} | | | |", flush=True)
            continue
        top1, base = result.accuracy["top1"], result.float_accuracy["top1"]
        row = {
            "name": name,
            "options": SETTINGS[name],
            "file_bytes": result.file_bytes,
            "ratio": result.ratio,
            "top1": top1,
            "float_top1": base,
            "drop_pt": 100 * (top1 - base),
            "seconds": round(time.perf_counter() - start, 1),
        }
        rows.append(row)
        print(f"| {name} | {row['file_bytes']:,} | {row['ratio']:.1f}x | {100 * top1:.2f}% "
              f"| {row['drop_pt']:+.2f} |", flush=True)
    return {"rows": rows, "pareto": pareto(rows), "unreachable": unreachable}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--mean", type=lambda s: tuple(map(float, s.split(","))))
    parser.add_argument("--std", type=lambda s: tuple(map(float, s.split(","))))
    parser.add_argument("--limit", type=int, default=None, help="first N test images")
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS), help="a subset of rows")
    parser.add_argument("--out", type=Path, default=Path("runs/accuracy_at_size"))
    parser.add_argument("--json", type=Path, default=Path("runs/bench_accuracy_at_size.json"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    print("| setting | bytes | ratio | top-1 | drop (pt) |\n|---|---:|---:|---:|---:|")
    report = run(args)
    print(f"Pareto front: {', '.join(report['pareto'])}")
    report |= {
        "command": " ".join(sys.argv),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
        "versions": {"python": platform.python_version(), "torch": torch.__version__,
                     "numpy": np.__version__, "mbz": mbz.__version__},
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
