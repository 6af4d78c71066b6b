"""Benchmark the ONNX export: file sizes, and onnxruntime's speed and agreement against the numpy
runtime and torch, at 1 thread on the CPU.

Run: python examples/bench_onnx.py [OUTPUT.mbz] [--repeats N] [--data NPZ] [--fit-images N]
(default OUTPUT runs/bench_onnx/model.mbz).

Packs mbz's MobileNet-v2 (width 1.0, fresh init with seed 0, BatchNorm gammas U(0.2, 1) and
betas N(0, 0.1); only its BatchNorm statistics and classifier are fitted on N train images,
without gradient steps, so that its predictions differ between images) with
``--prune 0.36 --bits conv=4,fc=2``, exports it to ONNX (compressed and ``--dense``) and runs,
on the test split of shared/data/cifar10-fragment.npz: onnxruntime (both ONNX files), the numpy
runtime, torch fake-quant (the packed weights in mbz's torch graph executor, as ``mbz eval``
runs them, here on the CPU) and torch eager (the float source module).
Each speed is the best of N passes over the whole split (session/program creation excluded).
Prints a table and writes OUTPUT with the suffix .json next to it (with the two .onnx files).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
import torch

from mbz.checkpoint import load_model
from mbz.config import PackConfig
from mbz.data import Dataset, load_split
from mbz.evaluate import EvalResult, agreement
from mbz.format import read_mbz
from mbz.models import cifar_mobilenet_v2
from mbz.onnx.export import OPSET, export_onnx, onnx_bytes
from mbz.onnx.session import OnnxProgram
from mbz.pack import pack
from mbz.runtime import load_program
from mbz.torch_graph import GraphModule, preprocess_images

FRAGMENT = Path(__file__).resolve().parents[2] / "shared/data/cifar10-fragment.npz"
CONFIG = PackConfig(bits={"conv": 4, "fc": 2}, prune=0.36)
PREPROCESS = {"layout": "NHWC", "dtype": "uint8", "mean": CONFIG.mean, "std": CONFIG.std}
TORCH_BATCH = 256  # as mbz.evaluate.evaluate_torch
RIDGE = 1.0  # L2 penalty of the least-squares classifier fit
CPU = torch.device("cpu")
PAIRS = [
    ("onnx", "numpy"),
    ("onnx", "torch fake-quant"),
    ("numpy", "torch fake-quant"),
    ("onnx", "onnx --dense"),
    ("torch fake-quant", "torch eager fp32"),  # what compression changed
]
Predict = Callable[[np.ndarray], np.ndarray]


def fitted_model(train: Dataset) -> torch.nn.Module:
    """The fresh-init model, BatchNorm gammas and betas spread out (as an L1-slimmed network's
    are, so that channel pruning ranks something), with BatchNorm statistics and the classifier
    fitted on ``train``."""
    torch.manual_seed(0)
    module = cifar_mobilenet_v2(num_classes=10, width_mult=1.0)
    for norm in module.modules():
        if isinstance(norm, torch.nn.BatchNorm2d):
            torch.nn.init.uniform_(norm.weight, 0.2, 1.0)
            torch.nn.init.normal_(norm.bias, 0.0, 0.1)
            norm.reset_running_stats()
            norm.momentum = None  # a cumulative average over every batch seen
    chunks = preprocess_images(train.images, PREPROCESS, CPU).split(TORCH_BATCH)
    with torch.no_grad():
        module.train()
        for x in chunks:
            module.features(x)
        module.eval()
        features = torch.cat([module.features(x).mean(dim=(2, 3)) for x in chunks]).double()
        design = torch.cat([features, torch.ones(len(features), 1, dtype=torch.float64)], 1)
        targets = torch.nn.functional.one_hot(torch.from_numpy(train.labels), 10).double()
        gram = design.T @ design + RIDGE * torch.eye(design.shape[1], dtype=torch.float64)
        solution = torch.linalg.solve(gram, design.T @ targets)
        module.classifier[1].weight.copy_(solution[:-1].T)
        module.classifier[1].bias.copy_(solution[-1])
    return module


def torch_predict(module: torch.nn.Module) -> Predict:
    """uint8 images -> logits with a torch module on the CPU, ``TORCH_BATCH`` at a time."""

    @torch.no_grad()
    def predict(images: np.ndarray) -> np.ndarray:
        chunks = [
            module(preprocess_images(images[begin : begin + TORCH_BATCH], PREPROCESS, CPU))
            for begin in range(0, len(images), TORCH_BATCH)
        ]
        return torch.cat(chunks).numpy()

    return predict


def measure(name: str, predict: Predict, data: Dataset, repeats: int) -> tuple:
    """(EvalResult at the best of ``repeats`` passes, logits)."""
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        logits = predict(data.images)
        seconds.append(time.perf_counter() - start)
    predictions = logits.argmax(axis=1)
    accuracy = float((predictions == data.labels).mean())
    return EvalResult(name, logits, accuracy, len(data) / min(seconds)), logits


def centered_sqnr_db(ref: np.ndarray, x: np.ndarray) -> float:
    """SNR of logits ``x`` against ``ref`` in dB, both centred on ``ref``'s mean logit per
    class, so that what is shared by every image does not inflate it (inf when equal)."""
    ref64 = ref.astype(np.float64)
    signal = ref64 - ref64.mean(axis=0)
    noise = np.sum((ref64 - x) ** 2)
    return float("inf") if noise == 0 else float(10 * np.log10(np.sum(signal**2) / noise))


def runners(output: Path, module: torch.nn.Module, models: dict) -> tuple[dict, dict]:
    """Every runtime's predict function, and the seconds each ONNX session took to open."""
    predicts, load_s = {}, {}
    for name, model in models.items():
        start = time.perf_counter()
        predicts[name] = OnnxProgram(model, threads=1).predict
        load_s[name] = time.perf_counter() - start
    program = load_program(output)
    predicts["numpy"] = lambda images: program.predict(images, threads=1)
    mbz = read_mbz(output)
    graph_module = GraphModule.of_tensors(mbz.metadata["graph"], mbz.tensors).eval()
    predicts["torch fake-quant"] = torch_predict(graph_module)
    predicts["torch eager fp32"] = torch_predict(module)
    return predicts, load_s


def main() -> None:
    """Pack, export, run every runtime; print the table and save the JSON."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("output", nargs="?", type=Path, default=Path("runs/bench_onnx/model.mbz"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--data", type=Path, default=FRAGMENT)
    parser.add_argument("--fit-images", type=int, default=1024)
    args = parser.parse_args()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)
    test = load_split(str(args.data), "test")
    module = fitted_model(load_split(str(args.data), "train").head(args.fit_images))
    torch.save(module.state_dict(), args.output.with_suffix(".pt"))
    pack(load_model(args.output.with_suffix(".pt"), arch="cifar"), CONFIG, args.output)
    mbz = read_mbz(args.output)
    models = {"onnx": export_onnx(mbz), "onnx --dense": export_onnx(mbz, dense=True)}
    sizes = {".mbz": mbz.file_size}
    for name, model in models.items():
        onnx.checker.check_model(model, full_check=True)
        path = args.output.with_name(args.output.stem + name.replace(" --", "_") + ".onnx")
        path.write_bytes(model.SerializeToString())
        sizes[name] = onnx_bytes(model)
    predicts, load_s = runners(args.output, module, models)
    measured = {name: measure(name, p, test, args.repeats) for name, p in predicts.items()}
    results = {name: result for name, (result, _) in measured.items()}
    logits = {name: value for name, (_, value) in measured.items()}
    compare = {
        f"{a}/{b}": {
            "agreement": agreement(results[a], results[b]),
            "centered_logits_sqnr_db": centered_sqnr_db(logits[b], logits[a]),
        }
        for a, b in PAIRS
    }
    print_table(sizes, results, load_s, compare)
    save(args, test, sizes, results, load_s, compare)


def print_table(sizes: dict, results: dict, load_s: dict, compare: dict) -> None:
    """The sizes, speeds and agreements, as text."""
    print(f"{'file':14} {'bytes':>10} {'x .mbz':>7}")
    for name, size in sizes.items():
        print(f"{name:14} {size:>10,} {size / sizes['.mbz']:>7.3f}")
    head = f"{'runtime (1 thread, CPU)':24} {'top-1':>7} {'images/s':>9} {'classes':>7}"
    print(f"\n{head} {'open s':>7}")
    for name, r in results.items():
        opened = f"{load_s[name]:>7.2f}" if name in load_s else ""
        classes = np.unique(r.predictions).size
        print(f"{name:24} {100 * r.accuracy:>6.2f}% {r.images_per_s:>9.1f} {classes:>7} {opened}")
    print()
    for pair, facts in compare.items():
        print(
            f"{pair:38} agreement {100 * facts['agreement']:6.2f}%  "
            f"centred logits SQNR {facts['centered_logits_sqnr_db']:6.1f} dB"
        )


def save(args, test: Dataset, sizes: dict, results: dict, load_s: dict, compare: dict) -> None:
    """Write the numbers, the command and the machine next to ``args.output``."""
    facts = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "machine": {
            "cpu": _cpu_name(),
            "threads": 1,
            "cores": os.cpu_count(),
            "load_average_1min_at_end": os.getloadavg()[0],
            "python": platform.python_version(),
            "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__,
            "torch": torch.__version__,
            "numpy": np.__version__,
        },
        "model": "mbz MobileNet-v2 width 1.0, fresh init (seed 0), BatchNorm gammas U(0.2, 1) "
        "and betas N(0, 0.1); BatchNorm statistics and classifier fitted (least squares) on "
        f"{args.fit_images} train images",
        "pack_config": CONFIG.to_dict(),
        "data": test.source,
        "images": len(test),
        "repeats": args.repeats,
        "opset": OPSET,
        "bytes": sizes,
        "runtimes": {
            name: {**r.to_dict(), "classes_predicted": int(np.unique(r.predictions).size)}
            for name, r in results.items()
        },
        "onnx_session_open_s": load_s,
        "compare": compare,
    }
    out = args.output.with_suffix(".json")
    out.write_text(json.dumps(facts, indent=2))
    print(f"saved {out}")


def _cpu_name() -> str:
    """The CPU model from /proc/cpuinfo (Linux), else what platform reports."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


if __name__ == "__main__":
    main()
