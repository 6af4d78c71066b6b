"""Benchmark quantized activations: W8A8, W4A4 and W4A2 under each calibration method.

Run: python examples/bench_actquant.py MODEL.pt DATA.npz [--calib-images 256] [--limit N]
(for example a model from `mbz train --data DATA.npz --epochs 6` and
../shared/data/cifar10-fragment.npz). Weights are k-means (conv=N,fc=N); activations are
calibrated on the first --calib-images train images and measured on the test split: file size,
torch fake-quant and numpy accuracy, their per-image agreement, numpy speed (1 thread) and the
peak bytes of live activations per image that the numpy runtime measured, float32 vs quantized.
Prints a table and writes runs/bench_actquant.json.
"""

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

from mbz.checkpoint import load_model
from mbz.config import CALIB_METHODS, PackConfig, parse_act_bits, parse_bits
from mbz.data import load_split
from mbz.pack import pack
from mbz.verify import verify

# name: (weight bits, activation bits); None keeps float activations
SCHEMES = {
    "float": ("conv=32,fc=32", None),
    "W8": ("conv=8,fc=8", None),
    "W8A8": ("conv=8,fc=8", "8"),
    "W4": ("conv=4,fc=4", None),
    "W4A4": ("conv=4,fc=4", "4"),
    "W4A2": ("conv=4,fc=4", "2"),
}


def run_case(args, loaded, train, test, scheme: str, calib: str | None) -> dict:
    """Pack one configuration (``calib`` None: float activations) and evaluate it with both
    runtimes."""
    bits, act_bits = SCHEMES[scheme]
    config = PackConfig(
        bits=parse_bits(bits),
        act_bits=parse_act_bits(act_bits) if act_bits else {},
        calib=calib or PackConfig.calib,
        calib_images=args.calib_images,
    )
    path = args.workdir / f"{scheme}-{calib or 'float'}.mbz"
    start = time.perf_counter()
    result = pack(loaded, config, path, calibration=train.head(args.calib_images))
    pack_s = time.perf_counter() - start
    report = verify(path, test, ("numpy", "torch"), tolerance=1.0)
    by_runtime = {r.runtime: r for r in report.results}
    peaks = result.activation_peak_bytes or {}
    return {
        "scheme": scheme,
        "calib": calib,
        "file_bytes": result.file_bytes,
        "torch_top1": by_runtime["torch"].accuracy,
        "numpy_top1": by_runtime["numpy"].accuracy,
        "agreement": report.agreements["numpy/torch"],
        "numpy_images_per_s": by_runtime["numpy"].images_per_s,
        "peak_float32": peaks.get("float32"),
        "peak_quantized": peaks.get("quantized"),
        "pack_s": pack_s,
    }


def print_row(row: dict) -> None:
    """One line of the table."""
    peak = (
        f"{row['peak_float32']:>10,} {row['peak_quantized']:>10,} "
        f"{row['peak_float32'] / row['peak_quantized']:>5.1f}x"
        if row["peak_quantized"]
        else f"{'-':>10} {'-':>10} {'-':>6}"
    )
    print(
        f"{row['scheme']:6} {row['calib'] or '-':10} {row['file_bytes']:>10,} "
        f"{100 * row['torch_top1']:>7.2f} {100 * row['numpy_top1']:>7.2f} "
        f"{100 * row['agreement']:>7.2f} {row['numpy_images_per_s']:>7.1f} {peak} "
        f"{row['pack_s']:>6.1f}",
        flush=True,
    )


def main() -> None:
    """Pack every scheme x calibration method, print and save the table."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("data", type=Path)
    parser.add_argument("--calib-images", type=int, default=PackConfig.calib_images)
    parser.add_argument("--limit", type=int, default=None, help="first N test images only")
    parser.add_argument("--schemes", default=",".join(SCHEMES), help="comma-separated subset")
    parser.add_argument("--workdir", type=Path, default=Path("runs/bench_actquant"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    loaded = load_model(args.model)
    train = load_split(str(args.data), "train")
    test = load_split(str(args.data), "test")
    test = test.head(args.limit) if args.limit else test
    print(
        f"{'scheme':6} {'calib':10} {'bytes':>10} {'torch%':>7} {'numpy%':>7} {'agree%':>7} "
        f"{'img/s':>7} {'peak f32':>10} {'peak q':>10} {'saved':>6} {'pack s':>6}"
    )
    rows = []
    for scheme in args.schemes.split(","):
        for calib in CALIB_METHODS if SCHEMES[scheme][1] else (None,):
            rows.append(run_case(args, loaded, train, test, scheme, calib))
            print_row(rows[-1])
    save(args, test, rows)


def save(args, test, rows: list[dict]) -> None:
    """Write the rows with the command, the data and the machine that made them."""
    out = Path("runs/bench_actquant.json")
    out.parent.mkdir(exist_ok=True)
    record = {
        "command": " ".join(["python", *sys.argv]),
        "model": str(args.model),
        "test": {"source": test.source, "images": len(test)},
        "calibration": f"first {args.calib_images} train images",
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        "numpy runtime and torch on 1 thread",
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "rows": rows,
    }
    out.write_text(json.dumps(record, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
