"""Reload a .mbz file, run it with each runtime, and check they agree with each other and with
the accuracy stored at pack time."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import combinations
from pathlib import Path

from mbz.data import Dataset
from mbz.evaluate import (
    EvalResult,
    Progress,
    agreement,
    data_fingerprint,
    evaluate_numpy,
    evaluate_torch,
)
from mbz.format import MbzFile, read_mbz
from mbz.runtime import load_program
from mbz.runtime.onnx_export import OnnxProgram, export_onnx

RUNTIMES = ("numpy", "torch", "onnx")
AGREEMENT_FLOAT = 0.999  # per-image top-1 agreement required with float activations
AGREEMENT_QUANT = 0.995  # ... and with quantized activations (float summation order differs)


@dataclass
class Report:
    """Results of every runtime, their agreement, and what failed."""

    results: list[EvalResult]
    agreements: dict[str, float] = field(default_factory=dict)
    stored: dict | None = None
    failures: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        """JSON-ready report."""
        return {
            "results": [r.to_dict() for r in self.results],
            "agreement": self.agreements,
            "stored_accuracy": self.stored,
            "ok": not self.failures,
            "failures": self.failures,
        }

    def to_text(self) -> str:
        """Human-readable report."""
        lines = [
            f"{r.runtime:>6}: top-1 {100 * r.accuracy:6.2f}%  "
            f"{r.images_per_s:8.1f} images/s  ({r.predictions.size} images)"
            for r in self.results
        ]
        lines += [f"agreement {pair}: {100 * v:.2f}%" for pair, v in self.agreements.items()]
        if self.stored:
            lines.append(
                f"stored at pack time: {100 * self.stored['top1']:.2f}% "
                f"on {self.stored['images']} images of {self.stored['data']}"
            )
        lines.append("OK" if not self.failures else "FAILED: " + "; ".join(self.failures))
        return "\n".join(lines)


def _run(
    runtime: str, path: Path, mbz: MbzFile, dataset: Dataset, progress: Progress
) -> EvalResult:
    if runtime == "numpy":
        return evaluate_numpy(load_program(path), dataset, progress)
    if runtime == "onnx":  # exported in memory, weights decoded by onnxruntime at load
        onnx_program = OnnxProgram(export_onnx(mbz))
        return replace(evaluate_numpy(onnx_program, dataset, progress), runtime="onnx")
    params = {name: tensor.decode() for name, tensor in mbz.tensors.items()}
    graph, preprocess = mbz.metadata["graph"], mbz.metadata["preprocess"]
    return evaluate_torch(graph, params, preprocess, dataset, progress=progress)


def _check(report: Report, tolerance: float, quantized: bool, fingerprint: str) -> None:
    """Fill ``report.failures`` from the agreement bar and the tolerance, for every pair."""
    bar = AGREEMENT_QUANT if quantized else AGREEMENT_FLOAT
    for first, other in combinations(report.results, 2):
        pair = f"{first.runtime}/{other.runtime}"
        report.agreements[pair] = agreement(first, other)
        if report.agreements[pair] < bar:
            report.failures.append(
                f"{pair} agree on {100 * report.agreements[pair]:.2f}% "
                f"of images, below {100 * bar:.1f}%"
            )
        if abs(first.accuracy - other.accuracy) > tolerance:
            report.failures.append(
                f"{pair} accuracies differ by more than {100 * tolerance:.2f} points"
            )
    stored = report.stored
    if stored and stored.get("data_sha256") == fingerprint:
        for result in report.results:
            if abs(result.accuracy - stored["top1"]) > tolerance:
                report.failures.append(
                    f"{result.runtime} accuracy {100 * result.accuracy:.2f}% differs from "
                    f"{100 * stored['top1']:.2f}% stored at pack time"
                )


def verify(
    path: Path,
    dataset: Dataset,
    runtimes: tuple[str, ...] = RUNTIMES,
    tolerance: float = 0.001,
    progress: Progress = None,
) -> Report:
    """Evaluate ``path`` with each runtime on ``dataset``.

    ``tolerance`` is a fraction: 0.001 accepts 0.1 percentage points of accuracy difference.
    """
    mbz = read_mbz(path)
    results = [_run(runtime, path, mbz, dataset, progress) for runtime in runtimes]
    report = Report(results, stored=mbz.metadata.get("accuracy"))
    quantized = any(node["op"] == "quantize" for node in mbz.metadata["graph"]["nodes"])
    _check(report, tolerance, quantized, data_fingerprint(dataset))
    return report
