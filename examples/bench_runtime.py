"""Benchmark the main path: `mbz pack` time and size, numpy runtime vs torch eager speed, parity.

Run: python examples/bench_runtime.py MODEL.pt DATA.npz [--threads 1]
(for example a model from `mbz train` and ../shared/data/cifar10-fragment.npz); prints a table
and writes runs/bench_runtime.json. Torch eager runs the same pruned, folded, fake-quantized
graph (NCHW, torch's default layout) with the same number of threads as the numpy runtime.

The numpy runtime is timed twice on the same file, runs alternating: with its exact layers
(SPEC.md 7.3, the default) and on the float path everywhere (``load_program(exact=False)``, the
runtime before exact accumulation). ``--mbz FILE`` times an existing file (for example one packed
with ``--act-bits 8``) instead of packing MODEL.
"""

import argparse
import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from mbz.checkpoint import load_model
from mbz.config import PackConfig
from mbz.data import load_split
from mbz.format import read_mbz
from mbz.pack import pack
from mbz.runtime import load_program
from mbz.torch_graph import GraphModule, preprocess_images


def best_rates(runs: dict, images: np.ndarray, repeats: int = 3) -> dict[str, float]:
    """Images per second of each ``run(images)``, best of ``repeats``, the runs alternating (so
    that a noisy machine slows each of them alike)."""
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            run(images)
            best[name] = min(best[name], time.perf_counter() - start)
    return {name: len(images) / seconds for name, seconds in best.items()}


def torch_runner(path: Path, batch_size: int):
    """Torch eager inference of the file's graph and decoded weights, exact layers as ``mbz eval
    --runtime torch`` computes them, ``batch_size`` at a time."""
    mbz = read_mbz(path)
    module = GraphModule.of_tensors(mbz.metadata["graph"], mbz.tensors).eval()
    preprocess = mbz.metadata["preprocess"]

    @torch.no_grad()
    def run(images: np.ndarray) -> np.ndarray:
        chunks = [
            module(preprocess_images(images[i : i + batch_size], preprocess, torch.device("cpu")))
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(chunks).numpy()

    return run


def pack_report(model: Path, path: Path, test) -> dict:
    """Pack ``model`` into ``path`` (pruned, 4-bit conv and 2-bit fc k-means weights); its size
    and pack times, with and without the evaluation on ``test``."""
    config = PackConfig(bits={"conv": 4, "fc": 2}, prune=0.36)
    result = pack(load_model(model), config, path, test)
    return {
        "pack": "--prune 0.36 --bits conv=4,fc=2",
        "file_bytes": result.file_bytes,
        "fp32_bytes": result.fp32_bytes,
        "ratio": result.ratio,
        "pack_seconds_with_eval": result.seconds,
        "pack_seconds_without_eval": pack(load_model(model), config, path).seconds,
        "accuracy_torch_at_pack": result.accuracy["top1"],
    }


def main() -> None:
    """Pack, then time and compare the runtimes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("data")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs"))
    parser.add_argument("--mbz", type=Path, help="time this .mbz file instead of packing MODEL")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each, the best counts")
    parser.add_argument("--limit", type=int, help="time only the first N test images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    test = load_split(args.data, "test")
    test = test.head(args.limit) if args.limit else test
    path = args.mbz or args.out / "bench_runtime.mbz"
    report = {"file": str(path)} if args.mbz else pack_report(args.model, path, test)
    program, float_program = load_program(path), load_program(path, exact=False)
    numpy_logits = program.predict(test.images, threads=args.threads)
    float_logits = float_program.predict(test.images, threads=args.threads)
    report |= {
        "threads": args.threads,
        "images": len(test),
        "accuracy_numpy": float((numpy_logits.argmax(1) == test.labels).mean()),
        "accuracy_numpy_float_path": float((float_logits.argmax(1) == test.labels).mean()),
        "numpy_images_per_s": {},
        "numpy_float_path_images_per_s": {},
        "torch_images_per_s": {},
    }
    for batch in (16, 64, 256):
        options = {"batch_size": batch, "threads": args.threads}
        runs = {
            "numpy": partial(program.predict, **options),
            "numpy_float_path": partial(float_program.predict, **options),
            "torch": torch_runner(path, batch),
        }
        for name, rate in best_rates(runs, test.images, args.repeats).items():
            report[f"{name}_images_per_s"][batch] = rate
            print(f"batch {batch}: {name} {rate:.1f} images/s", flush=True)
    torch_logits = torch_runner(path, 256)(test.images)
    report["agreement"] = float((torch_logits.argmax(1) == numpy_logits.argmax(1)).mean())
    report["max_logit_difference_numpy_torch"] = float(
        np.abs(torch_logits.astype(np.float64) - numpy_logits).max()
    )
    (args.out / "bench_runtime.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
