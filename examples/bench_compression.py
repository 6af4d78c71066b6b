"""Benchmark what fine-tuning inside `mbz pack` buys: accuracy and real file size per scheme.

Run: python examples/bench_compression.py MODEL.pt DATA.npz [--finetune-epochs 1] [--qat-epochs 2]
where MODEL.pt was trained on DATA's train split, for example

    mbz train --data ../shared/data/cifar10-fragment.npz --width 0.5 --epochs 6 \\
        --warmup-epochs 1 -o runs/base.pt

Rows: the float baseline; --prune 0.36 channel mode (float weights, so only pruning counts)
without and with fine-tuning (--prune-steps 2); k-means conv=4,fc=2 without and with centroid
fine-tuning; uniform W2 without and with QAT; W8A8, W4A4, W4A2 (uniform weights, calibrated
activations) and W4A2 with QAT; --prune 0.5 weight mode (float weights) without and with gradual
magnitude pruning. Fine-tuning holds out 10% of the train split to pick its epoch; accuracies
are on the test split, from the torch fake-quant run stored at pack time and from the numpy
runtime. Prints a Markdown table and writes runs/bench_compression.json after every row (rows
already there are skipped with --resume).
"""

import argparse
import json
import os
import platform
import sys
from pathlib import Path

import torch

from mbz.checkpoint import load_model
from mbz.config import PackConfig
from mbz.data import load_split
from mbz.finetune import Tuning
from mbz.pack import pack
from mbz.runtime import load_program

FLOAT = {"conv": 32, "fc": 32}
W2 = {"conv": 2, "fc": 2}
W4 = {"conv": 4, "fc": 4}
W8 = {"conv": 8, "fc": 8}
KMEANS = {"conv": 4, "fc": 2}


def act(bits: int) -> dict[str, int]:
    """``--act-bits N``: every relu, add and projection output at ``bits``."""
    return {"relu": bits, "add": bits, "proj": bits}


def rows(finetune: int, qat: int) -> list[tuple[str, dict]]:
    """(row name, PackConfig fields) of every benchmark row."""
    prune = {"prune": 0.36, "bits": FLOAT, "prune_steps": 2}
    kmeans = {"bits": KMEANS}
    w2 = {"method": "uniform", "bits": W2}
    w4a2 = {"method": "uniform", "bits": W4, "act_bits": act(2)}
    weight = {"prune": 0.5, "prune_mode": "weight", "bits": FLOAT}
    return [
        ("baseline (float32)", {"bits": FLOAT}),
        ("prune 0.36 channel", prune),
        (
            f"prune 0.36 channel + fine-tuning 2x{finetune} ep",
            {**prune, "finetune_epochs": finetune},
        ),
        ("k-means conv=4,fc=2", kmeans),
        (f"k-means conv=4,fc=2 + centroids {finetune} ep", {**kmeans, "finetune_epochs": finetune}),
        ("uniform W2", w2),
        (f"uniform W2 + QAT {qat} ep", {**w2, "finetune_epochs": qat}),
        ("W8A8", {"method": "uniform", "bits": W8, "act_bits": act(8)}),
        ("W4A4", {"method": "uniform", "bits": W4, "act_bits": act(4)}),
        ("W4A2", w4a2),
        (f"W4A2 + QAT {qat} ep", {**w4a2, "finetune_epochs": qat}),
        ("prune 0.5 weight", weight),
        (
            f"prune 0.5 weight + gradual pruning {finetune} ep",
            {**weight, "finetune_epochs": finetune},
        ),
    ]


def run_row(index: int, name: str, fields: dict, args: argparse.Namespace, train, test) -> dict:
    """Pack one row and measure it with both runtimes."""
    config = PackConfig(**fields)
    path = args.out / f"{index:02d}.mbz"
    tuning = Tuning.of(train, config) if config.finetune_epochs else None
    calibration = train.head(config.calib_images) if config.act_bits else None
    result = pack(
        load_model(args.model), config, path, test, calibration=calibration, tuning=tuning
    )
    predictions = load_program(path).predict(test.images, threads=args.threads).argmax(1)
    kept = [row for row in result.finetune or [] if row["packed"]]
    return {
        "row": name,
        "config": config.to_dict(),
        "file": str(path),
        "file_bytes": result.file_bytes,
        "ratio": result.ratio,
        "top1_torch": result.accuracy["top1"],
        "top1_numpy": float((predictions == test.labels).mean()),
        "heldout_top1": kept[-1]["val_accuracy"] if kept else None,
        "activation_peak_bytes": result.activation_peak_bytes,
        "seconds": result.seconds,
        "finetune": result.finetune,
    }


def markdown(results: list[dict]) -> str:
    """The results as a Markdown table."""
    lines = [
        "| scheme | file bytes | ratio | top-1 torch | top-1 numpy | held-out top-1 | pack s |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        held = "" if r["heldout_top1"] is None else f"{100 * r['heldout_top1']:.2f}%"
        lines.append(
            f"| {r['row']} | {r['file_bytes']:,} | {r['ratio']:.2f}x | "
            f"{100 * r['top1_torch']:.2f}% | {100 * r['top1_numpy']:.2f}% | {held} | "
            f"{r['seconds']:.0f} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Pack every row, print the table, save the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("data")
    parser.add_argument("--finetune-epochs", type=int, default=1)
    parser.add_argument("--qat-epochs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="numpy runtime threads")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_compression"))
    parser.add_argument("--resume", action="store_true", help="skip rows already in the JSON")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    report_path = args.out.with_suffix(".json")
    train, test = load_split(args.data, "train"), load_split(args.data, "test")
    done = (
        json.loads(report_path.read_text())["rows"] if args.resume and report_path.exists() else []
    )
    report = {
        "command": " ".join(sys.argv),
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "device": "cuda" if torch.cuda.is_available() else "cpu",
            "platform": platform.platform(),
        },
        "model": str(args.model),
        "train_images": len(train),
        "test_images": len(test),
        "rows": done,
    }
    finished = {r["row"] for r in done}
    schemes = rows(args.finetune_epochs, args.qat_epochs)
    order = {name: index for index, (name, _) in enumerate(schemes)}
    for index, (name, fields) in enumerate(schemes):
        if name in finished:
            continue
        report["rows"].append(run_row(index, name, fields, args, train, test))
        report["rows"].sort(key=lambda r: order.get(r["row"], len(order)))
        report_path.write_text(json.dumps(report, indent=2))
        print(
            markdown([r for r in report["rows"] if r["row"] == name]).splitlines()[-1], flush=True
        )
    print(markdown(report["rows"]))


if __name__ == "__main__":
    main()
