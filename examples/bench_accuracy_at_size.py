"""Accuracy at size, post-training: real file bytes, ratio, top-1 and the drop against the float
model on the same test images, for a grid of settings, with the Pareto front.

    python examples/bench_accuracy_at_size.py MODEL DATA [--arch cifar --mean ... --std ...]

MODEL is anything ``mbz pack`` takes (e.g. the output of ``examples/train_torchvision.py``, or an
``mbz train`` checkpoint); DATA an ``.npz`` or ``cifar10``. Each row is one ``mbz.pack`` call
(the Python API ``mbz pack`` runs), so the numbers are those of the files written. When
``nncodec`` is installed (``pip install nncodec``, benchmark only) NNCodec's points at several QP
values on the same model and images are added (``nncodec_points.py``). It prints a
Markdown table and saves ``runs/bench_accuracy_at_size.json`` with the command line and versions.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import nncodec_points  # this folder's module (a script's folder is on sys.path)
import numpy as np
import torch

import mbz
from mbz.api import prepare_pack
from mbz.budget import BudgetError
from mbz.charts import save, scatter_chart

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
    # whole bits of uniform codes instead of k-means (both with steps half a bit apart)
    **{f"target {r}x uniform": {"target_ratio": r, "method": "uniform"} for r in (15, 20, 30)},
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
    rows += nncodec_rows(args, common)
    return {"rows": rows, "pareto": pareto(rows), "unreachable": unreachable}


def nncodec_rows(args: argparse.Namespace, common: dict) -> list[dict]:
    """NNCodec's points on the same model and test images (``nncodec_points``), when it is
    installed and not turned off with ``--no-nncodec``."""
    if args.no_nncodec or not nncodec_points.available():
        print("(nncodec is not installed: no NNCodec points; `pip install nncodec`)")
        return []
    job = prepare_pack(args.model, args.out / "probe.mbz", **common, bias_correction=False)
    rows = nncodec_points.points(job, args.qp)
    for row in rows:
        print(f"| {row['name']} | {row['file_bytes']:,} | {row['ratio']:.1f}x "
              f"| {100 * row['top1']:.2f}% | {row['drop_pt']:+.2f} |", flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    nncodec_points.model_and_data_arguments(parser)
    parser.add_argument("--only", nargs="*", choices=list(SETTINGS), help="a subset of rows")
    parser.add_argument("--no-nncodec", action="store_true", help="skip NNCodec's points")
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
    print(f"saved {args.json} and {', '.join(map(str, chart(report['rows'], args.json)))}")


def chart(rows: list[dict], path: Path) -> list[Path]:
    """Top-1 against kilobytes for mbz's rows and NNCodec's, saved next to ``path`` (PNG)."""
    series: dict[str, tuple[list[float], list[float]]] = {}
    for row in rows:
        name = "NNCodec" if row["name"].startswith("nncodec") else "mbz"
        xs, ys = series.setdefault(name, ([], []))
        xs.append(row["file_bytes"] / 1000)
        ys.append(100 * row["top1"])
    title = "Post-training accuracy at size (same model, same test images)"
    figure = scatter_chart(series, title, "file kB", "top-1 %")
    return save(figure, path.with_suffix(".png"))


if __name__ == "__main__":
    main()
