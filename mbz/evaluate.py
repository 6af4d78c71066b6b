"""Top-1 evaluation of a graph with the torch fake-quant runtime and the numpy runtime.

torch is imported inside the torch functions only, so that evaluating with the numpy or ONNX
runtime works on a machine without it."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from mbz.data import Dataset

if TYPE_CHECKING:
    import torch

    from mbz.runtime.exact import ExactLayer

Progress = Callable[[int], None] | None


@dataclass
class EvalResult:
    """Logits of one runtime on one dataset, and their top-1 accuracy."""

    runtime: str
    logits: np.ndarray
    accuracy: float
    images_per_s: float

    @property
    def predictions(self) -> np.ndarray:
        """The predicted class of each image."""
        return self.logits.argmax(axis=1)

    def to_dict(self) -> dict:
        """JSON-ready summary (logits left out)."""
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
    logits = np.concatenate(logits_chunks)
    accuracy = float((logits.argmax(axis=1) == labels).mean()) if labels.size else 0.0
    return EvalResult(runtime, logits, accuracy, labels.size / max(seconds, 1e-9))


def evaluate_torch(
    graph: dict,
    params: dict[str, np.ndarray],
    preprocess: dict,
    dataset: Dataset,
    batch_size: int = 256,
    progress: Progress = None,
    exact: Mapping[str, ExactLayer] | None = None,
) -> EvalResult:
    """Accuracy of the graph run by torch with exactly the decoded (fake-quantized) weights;
    ``exact``, a file's plan (``mbz.runtime.exact.exact_layers``), makes it compute as every
    runtime does (``GraphModule``)."""
    import torch

    from mbz.torch_graph import GraphModule, image_batches

    device = pick_device()
    module = GraphModule(graph, params, exact).to(device).eval()
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


def _logit_differences(a: EvalResult, b: EvalResult) -> np.ndarray:
    """Absolute differences of two runtimes' logits in float64: 0 where bit-identical (equal
    infinities and NaN against NaN count as equal), infinite for any other non-finite
    mismatch."""
    x, y = a.logits.astype(np.float64), b.logits.astype(np.float64)
    same = (x == y) | (np.isnan(x) & np.isnan(y))
    with np.errstate(invalid="ignore"):  # inf - inf where ``same`` already holds
        difference = np.where(same, 0.0, np.abs(x - y))
    return np.nan_to_num(difference, nan=np.inf)


def max_logit_difference(a: EvalResult, b: EvalResult) -> float:
    """Largest absolute difference between two runtimes' logits, computed in float64 (0 when
    they are bit-identical; equal infinities and NaN against NaN count as equal, any other
    non-finite mismatch as infinite)."""
    return float(_logit_differences(a, b).max(initial=0.0))


def images_differing(a: EvalResult, b: EvalResult) -> int:
    """How many images have at least one logit that is not bit-identical between two
    runtimes (as ``max_logit_difference`` compares them)."""
    differences = _logit_differences(a, b)
    return int(np.count_nonzero(differences.reshape(len(differences), -1).max(axis=1, initial=0)))
