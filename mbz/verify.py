"""Reload a .mbz file, run it with each runtime, and check they agree with each other and with
the accuracy stored at pack time.

The file is read and validated within its limits once, before any weight is decoded; torch is
imported only when the torch runtime is asked for."""

from __future__ import annotations

import math
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
    images_differing,
    max_logit_difference,
)
from mbz.format import DEFAULT_LIMITS, Limits, MbzFile, read_mbz
from mbz.onnx.export import export_onnx
from mbz.onnx.session import OnnxProgram
from mbz.runtime import load_program
from mbz.runtime.exact import all_exact, exact_layers
from mbz.runtime.program import check_runnable

RUNTIMES = ("numpy", "torch", "onnx")
AGREEMENT_FLOAT = 0.999  # per-image top-1 agreement required with float activations
AGREEMENT_QUANT = 0.995  # ... and with quantized activations (float summation order differs)


@dataclass
class Report:
    """Results of every runtime, the top-1 agreement and the largest absolute logit difference
    of each pair, and what failed."""

    results: list[EvalResult]
    agreements: dict[str, float] = field(default_factory=dict)
    logit_differences: dict[str, float] = field(default_factory=dict)
    stored: dict | None = None
    failures: list[str] = field(default_factory=list)
    exact: bool = False  # every layer exact (SPEC.md 7.3): any logit difference is a failure

    def to_dict(self) -> dict:
        """JSON-ready report."""
        return {
            "results": [r.to_dict() for r in self.results],
            "agreement": self.agreements,
            "max_logit_difference": {
                pair: value if math.isfinite(value) else None
                for pair, value in self.logit_differences.items()
            },
            "stored_accuracy": self.stored,
            "ok": not self.failures,
            "failures": self.failures,
            "exact": self.exact,
        }

    def to_text(self) -> str:
        """Human-readable report."""
        lines = [
            f"{r.runtime:>6}: top-1 {100 * r.accuracy:6.2f}%  "
            f"{r.images_per_s:8.1f} images/s  ({r.predictions.size} images)"
            for r in self.results
        ]
        lines += [
            f"agreement {pair}: {100 * v:.2f}%, "
            f"largest logit difference {self.logit_differences[pair]:.3g}"
            for pair, v in self.agreements.items()
        ]
        if self.exact and self.agreements:
            lines.append("every layer is exact: the runtimes' logits must be bit-identical")
        if self.stored:
            lines.append(
                f"stored at pack time: {100 * self.stored['top1']:.2f}% "
                f"on {self.stored['images']} images of {self.stored['data']}"
            )
        lines.append("OK" if not self.failures else "FAILED: " + "; ".join(self.failures))
        return "\n".join(lines)


def open_checked(source: Path | MbzFile, limits: Limits = DEFAULT_LIMITS) -> MbzFile:
    """A .mbz file (a path or a read file), its graph and preprocessing validated within
    ``limits`` (MbzFormatError) before any weight is decoded."""
    mbz = source if isinstance(source, MbzFile) else read_mbz(source, limits)
    check_runnable(mbz, limits)
    return mbz


def _run(
    runtime: str, mbz: MbzFile, dataset: Dataset, progress: Progress, limits: Limits
) -> EvalResult:
    if runtime == "numpy":
        return evaluate_numpy(load_program(mbz, limits), dataset, progress)
    if runtime == "onnx":  # exported in memory, weights decoded by onnxruntime at load
        onnx_program = OnnxProgram(export_onnx(mbz, limits=limits))
        return replace(evaluate_numpy(onnx_program, dataset, progress), runtime="onnx")
    params = {name: tensor.decode() for name, tensor in mbz.tensors.items()}
    graph, preprocess = mbz.metadata["graph"], mbz.metadata["preprocess"]
    plan = exact_layers(graph, mbz.tensors)
    return evaluate_torch(graph, params, preprocess, dataset, progress=progress, exact=plan)


def check_report(report: Report, tolerance: float, quantized: bool, fingerprint: str) -> None:
    """Fill ``report.failures`` for every pair of runtimes: any logit difference when
    ``report.exact``; the agreement bar (``quantized``: the lower one) and the accuracy
    ``tolerance``; each accuracy against the stored one when measured on the data whose
    ``fingerprint`` (``data_fingerprint``) it records."""
    bar = AGREEMENT_QUANT if quantized else AGREEMENT_FLOAT
    for first, other in combinations(report.results, 2):
        pair = f"{first.runtime}/{other.runtime}"
        report.agreements[pair] = agreement(first, other)
        report.logit_differences[pair] = max_logit_difference(first, other)
        if report.exact:
            _check_identical(report, first, other)
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


def _check_identical(report: Report, first: EvalResult, other: EvalResult) -> None:
    """A failure unless two runtimes' logits are bit-identical (for an all-exact file)."""
    differing = images_differing(first, other)
    if differing:
        pair = f"{first.runtime}/{other.runtime}"
        report.failures.append(
            f"{pair} logits differ on {differing} of {first.predictions.size} images (largest "
            f"difference {report.logit_differences[pair]:.3g}) although every layer of the file "
            "is exact (SPEC.md 7.3), so they must be bit-identical: one runtime does not compute "
            "as the spec fixes (a bug in mbz, not in the file)"
        )


def verify(
    source: Path | MbzFile,
    dataset: Dataset,
    runtimes: tuple[str, ...] = RUNTIMES,
    tolerance: float = 0.001,
    progress: Progress = None,
    limits: Limits = DEFAULT_LIMITS,
) -> Report:
    """Evaluate ``source`` (a .mbz path or a read file) with each runtime on ``dataset``.

    ``tolerance`` is a fraction: 0.001 accepts 0.1 percentage points of accuracy difference.
    When every layer of the file is exact (``mbz.runtime.exact.all_exact``), any difference
    between two runtimes' logits is a failure.
    The file is validated within ``limits`` first (``open_checked``).
    """
    mbz = open_checked(source, limits)
    results = [_run(runtime, mbz, dataset, progress, limits) for runtime in runtimes]
    exact = all_exact(mbz.metadata["graph"], mbz.tensors)
    report = Report(results, stored=mbz.metadata.get("accuracy"), exact=exact)
    quantized = any(node["op"] == "quantize" for node in mbz.metadata["graph"]["nodes"])
    check_report(report, tolerance, quantized, data_fingerprint(dataset))
    return report
