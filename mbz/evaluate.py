"""Top-1 evaluation of a graph with the torch fake-quant runtime and the numpy runtime.

torch is imported inside the torch functions only, so that evaluating with the numpy or ONNX
runtime works on a machine without it."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mbz.data import Dataset

if TYPE_CHECKING:
    import torch

Progress = Callable[[int], None] | None


@dataclass
class EvalResult:
    """Predictions of one runtime on one dataset."""

    runtime: str
    predictions: np.ndarray
    accuracy: float
    images_per_s: float

    def to_dict(self) -> dict:
        """JSON-ready summary (predictions left out)."""
        return {
            "runtime": self.runtime,
            "accuracy": self.accuracy,
            "images": int(self.predictions.size),
            "images_per_s": self.images_per_s,
        }


def data_fingerprint(dataset: Dataset) -> str:
    """SHA-256 of the images and labels, to tell whether two accuracies share their data."""
    digest = hashlib.sha256(np.ascontiguousarray(dataset.images).tobytes())
    digest.update(np.ascontiguousarray(dataset.labels, dtype=np.int64).tobytes())
    return digest.hexdigest()


def pick_device() -> torch.device:
    """CUDA when present, else CPU."""
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _result(runtime: str, logits_chunks: list, labels: np.ndarray, seconds: float) -> EvalResult:
    predictions = np.concatenate(logits_chunks).argmax(axis=1)
    accuracy = float((predictions == labels).mean()) if labels.size else 0.0
    return EvalResult(runtime, predictions, accuracy, labels.size / max(seconds, 1e-9))


def evaluate_torch(
    graph: dict,
    params: dict[str, np.ndarray],
    preprocess: dict,
    dataset: Dataset,
    batch_size: int = 256,
    progress: Progress = None,
) -> EvalResult:
    """Accuracy of the graph run by torch with exactly the decoded (fake-quantized) weights."""
    import torch

    from mbz.torch_graph import GraphModule, image_batches

    device = pick_device()
    module = GraphModule(graph, params).to(device).eval()
    chunks, start = [], time.perf_counter()
    with torch.no_grad():
        for _, x in image_batches(dataset.images, preprocess, device, batch_size, progress):
            chunks.append(module(x).float().cpu().numpy())
    return _result("torch", chunks, dataset.labels, time.perf_counter() - start)


def evaluate_numpy(program, dataset: Dataset, progress: Progress = None) -> EvalResult:
    """Accuracy of a ``mbz.runtime`` program (numpy only) on the dataset."""
    start = time.perf_counter()
    logits = program.predict(dataset.images, progress=progress)
    return _result("numpy", [logits], dataset.labels, time.perf_counter() - start)


def agreement(a: EvalResult, b: EvalResult) -> float:
    """Share of images on which two runtimes predict the same class."""
    return float((a.predictions == b.predictions).mean()) if a.predictions.size else 1.0
