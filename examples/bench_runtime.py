"""Benchmark the main path: `mbz pack` time and size, numpy runtime vs torch eager speed, parity.

Run: python examples/bench_runtime.py MODEL.pt DATA.npz [--threads 1]
(for example a model from `mbz train` and ../shared/data/cifar10-fragment.npz); prints a table
and writes runs/bench_runtime.json. Torch eager runs the same pruned, folded, fake-quantized
graph (NCHW, torch's default layout) with the same number of threads as the numpy runtime.
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


def best_rate(run, images: np.ndarray, repeats: int = 3) -> float:
    """Images per second of ``run(images)``, best of ``repeats``."""
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        run(images)
        best = min(best, time.perf_counter() - start)
    return len(images) / best


def torch_runner(path: Path, batch_size: int):
    """Torch eager inference of the file's graph and decoded weights, ``batch_size`` at a time."""
    mbz = read_mbz(path)
    params = {name: tensor.decode() for name, tensor in mbz.tensors.items()}
    module = GraphModule(mbz.metadata["graph"], params).eval()
    preprocess = mbz.metadata["preprocess"]

    @torch.no_grad()
    def run(images: np.ndarray) -> np.ndarray:
        chunks = [
            module(preprocess_images(images[i : i + batch_size], preprocess, torch.device("cpu")))
            for i in range(0, len(images), batch_size)
        ]
        return torch.cat(chunks).numpy()

    return run


def main() -> None:
    """Pack, then time and compare the runtimes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path)
    parser.add_argument("data")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path("runs"))
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)
    test = load_split(args.data, "test")
    config = PackConfig(bits={"conv": 4, "fc": 2}, prune=0.36)
    path = args.out / "bench_runtime.mbz"
    result = pack(load_model(args.model), config, path, test)
    program = load_program(path)
    numpy_logits = program.predict(test.images, threads=args.threads)
    report = {
        "pack": "--prune 0.36 --bits conv=4,fc=2",
        "file_bytes": result.file_bytes,
        "fp32_bytes": result.fp32_bytes,
        "ratio": result.ratio,
        "pack_seconds_with_eval": result.seconds,
        "pack_seconds_without_eval": pack(load_model(args.model), config, path).seconds,
        "threads": args.threads,
        "images": len(test),
        "accuracy_torch_at_pack": result.accuracy["top1"],
        "accuracy_numpy": float((numpy_logits.argmax(1) == test.labels).mean()),
        "numpy_images_per_s": {},
        "torch_images_per_s": {},
    }
    for batch in (16, 64, 256):
        run_numpy = partial(program.predict, batch_size=batch, threads=args.threads)
        report["numpy_images_per_s"][batch] = best_rate(run_numpy, test.images)
        report["torch_images_per_s"][batch] = best_rate(torch_runner(path, batch), test.images)
    torch_logits = torch_runner(path, 256)(test.images)
    report["agreement"] = float((torch_logits.argmax(1) == numpy_logits.argmax(1)).mean())
    (args.out / "bench_runtime.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
