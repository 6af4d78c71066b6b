"""Benchmark fine-tuning while packing (issue 13's table): each setting post-training, then
fine-tuned with and without distillation from the float model.

Run: python examples/bench_finetune.py MODEL DATA [--arch cifar --mean .5,.5,.5 --std .25,.25,.25]
     [--epochs 3 | --steps N] [--limit-train N] [--limit N] [--only NAME ...]
     [--variants post distilled labels] [--seeds N] [--output runs/bench_finetune.json]
(MODEL from `mbz train --data DATA`, or a torchvision-layout state_dict with --arch; DATA such as
../shared/data/cifar10-fragment.npz). Each row records the real file bytes, the top-1 accuracy
on the test split (never trained or selected on), the drop against the float model in points,
and the minutes the pack took on this machine, and for fine-tuned rows every epoch's held-out
accuracy (the start's too: the state packed is never worse than it). A budget no candidate
reaches is a row with the error. Prints a Markdown table and writes --output with the command
line, machine and every row; a rerun with the same --output skips the rows it holds. With
--seeds N each fine-tuned row runs with `--seed` 0 to N-1 (the held-out split, shuffling and
augmentation change; post-training rows do not depend on it), and a second table gives each
setting's mean drop and its spread: one run's drop moves by points from seed to seed, more than
many of the differences between settings.
"""

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import mbz
from mbz.errors import MbzError

K, U = {"method": "kmeans"}, {"method": "uniform"}
W = {"prune_mode": "weight", "bits": "conv=4,fc=2"}
# name: pack options (issue 13, "Evidence")
SETTINGS = {
    "prune 0.36 channel, conv=4,fc=2": {"prune": 0.36, "bits": "conv=4,fc=2"},
    "prune 0.5 channel, conv=4,fc=2": {"prune": 0.5, "bits": "conv=4,fc=2"},
    "prune 0.36 weight, conv=4,fc=2": {"prune": 0.36, **W},
    "prune 0.5 weight, conv=4,fc=2": {"prune": 0.5, **W},
    "uniform W4": {**U, "bits": "conv=4,fc=4"},
    "uniform W3": {**U, "bits": "conv=3,fc=3"},
    "uniform W2 (conv=2,fc=2)": {**U, "bits": "conv=2,fc=2"},
    "k-means conv=4,fc=4": {**K, "bits": "conv=4,fc=4"},
    "k-means conv=3,fc=3": {**K, "bits": "conv=3,fc=3"},
    "k-means conv=2,fc=2": {**K, "bits": "conv=2,fc=2"},
    "target ratio 15": {"target_ratio": 15},
    "target ratio 20": {"target_ratio": 20},
    "target ratio 25": {"target_ratio": 25},
    "target ratio 30": {"target_ratio": 30},
    "prune 0.36 channel, target ratio 30": {"prune": 0.36, "target_ratio": 30},
    "uniform, target ratio 20": {**U, "target_ratio": 20},
    "uniform, prune 0.36 channel, target ratio 30": {**U, "prune": 0.36, "target_ratio": 30},
    "prune auto, target ratio 30": {"prune": "auto", "target_ratio": 30},
}
# how each setting is fine-tuned: (label, extra pack options)
VARIANTS = {
    "post": ("post-training", None),
    "distilled": ("fine-tuned, distilled", None),
    "labels": ("fine-tuned, labels", 0.0),
}


def triple(text: str) -> tuple[float, ...]:
    return tuple(float(v) for v in text.split(","))


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model")
    parser.add_argument("data")
    parser.add_argument("--arch", default=None)
    parser.add_argument("--mean", type=triple, default=None)
    parser.add_argument("--std", type=triple, default=None)
    parser.add_argument("--epochs", type=float, default=3.0, help="fine-tuning epochs per run")
    parser.add_argument("--steps", type=int, default=0, help="fine-tuning steps instead")
    parser.add_argument("--limit-train", type=int, default=None)
    parser.add_argument("--limit", type=int, default=None, help="test images")
    parser.add_argument("--only", nargs="*", default=None, help="setting names to run")
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--seeds", type=int, default=1, help="seeds per fine-tuned row")
    parser.add_argument("--output", type=Path, default=Path("runs/bench_finetune.json"))
    return parser.parse_args()


def run(
    args: argparse.Namespace, options: dict, distill: float | None, seed: int | None
) -> dict:
    """One pack (fine-tuned with ``seed``, post-training when None); its bytes, test top-1,
    float top-1 and minutes."""
    common = {k: v for k, v in (("mean", args.mean), ("std", args.std)) if v is not None}
    if seed is not None:
        budget = {"finetune_steps": args.steps} if args.steps else {"finetune_epochs": args.epochs}
        common.update(budget, limit_train=args.limit_train, seed=seed)
        if distill is not None:
            common["distill_weight"] = distill
    start = time.perf_counter()
    try:
        result = mbz.pack(
            args.model, args.output.with_suffix(".mbz"), data=args.data, limit=args.limit,
            arch=args.arch, **common, **options,
        )
    except MbzError as error:
        return {"error": str(error), "minutes": (time.perf_counter() - start) / 60}
    history = result.finetune or []
    return {
        "file_bytes": result.file_bytes,
        "ratio": result.ratio,
        "prune": result.prune,
        "top1": result.accuracy["top1"],
        "float_top1": result.float_accuracy["top1"],
        "drop_points": 100 * (result.float_accuracy["top1"] - result.accuracy["top1"]),
        "minutes": (time.perf_counter() - start) / 60,
        "kept_epochs": [(row["stage"], row["epoch"]) for row in history if row.get("packed")],
        "held_out": [(row["stage"], row["epoch"], row["val_accuracy"]) for row in history],
    }


def seed_of(row: dict) -> int | None:
    """The fine-tuning seed of ``row``; rows written before --seeds were all fine-tuned with 0."""
    return row.get("seed", None if row["run"] == VARIANTS["post"][0] else 0)


def line(row: dict) -> str:
    """``row`` as a line of the Markdown table."""
    label = row["run"] + (f", seed {row['seed']}" if row.get("seed") else "")
    if "error" in row:
        return f"| {row['setting']} | {label} | {row['error']} | | | {row['minutes']:.1f} |"
    return (
        f"| {row['setting']} | {label} | {row['file_bytes']:,} ({row['ratio']:.1f}x) | "
        f"{100 * row['top1']:.1f}% | {-row['drop_points']:+.1f} | {row['minutes']:.1f} |"
    )


def spread(rows: list[dict]) -> None:
    """Print each setting and run's mean drop over its seeds, with their standard deviation
    and range."""
    print("\n| setting | run | seeds | mean drop | std | range |\n|---|---|---:|---:|---:|---|")
    groups: dict[tuple[str, str], list[float]] = {}
    for row in rows:
        if "error" not in row:
            groups.setdefault((row["setting"], row["run"]), []).append(-row["drop_points"])
    for (setting, label), drops in groups.items():
        std = statistics.stdev(drops) if len(drops) > 1 else 0.0
        print(
            f"| {setting} | {label} | {len(drops)} | {statistics.mean(drops):+.1f} | {std:.1f} | "
            f"{min(drops):+.1f} to {max(drops):+.1f} |"
        )


def main() -> None:
    args = arguments()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    names = args.only or list(SETTINGS)
    rows = json.loads(args.output.read_text())["rows"] if args.output.exists() else []
    print("| setting | run | real bytes | top-1 | drop | minutes |\n|---|---|---:|---:|---:|---:|")
    for row in rows:
        print(line(row))
    for name in names:
        for key in args.variants:
            label, distill = VARIANTS[key]
            for seed in [None] if key == "post" else range(args.seeds):
                done = {(row["setting"], row["run"], seed_of(row)) for row in rows}
                if (name, label, seed) in done:
                    continue
                row = {"setting": name, "run": label, "seed": seed, "options": SETTINGS[name]}
                row.update(run(args, SETTINGS[name], distill, seed))
                rows.append(row)
                print(line(row), flush=True)
                args.output.write_text(json.dumps({
                    "command": sys.argv, "machine": platform.platform(), "cpus": os.cpu_count(),
                    "torch_threads": torch.get_num_threads(), "rows": rows,
                }, indent=2))
    if args.seeds > 1:
        spread(rows)


if __name__ == "__main__":
    main()
