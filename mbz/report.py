"""``mbz report``: the compression analysis of a sweep, computed from the files on disk.

For the smallest run within an accuracy drop of the baseline: the model compression ratio
(FP32 model bytes / .mbz bytes), the weights-only ratio (FP32 conv/linear weight bytes / their
payload in the file, every other byte of the file listed as an overhead), the activation
compression ratio (peak live activation bytes per image measured by the numpy runtime, float
vs the stored bits) and the final size. Every .mbz is re-read (and so validated) with
``mbz.inspect.describe``; nothing is taken from a formula.
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from mbz.checkpoint import load_model
from mbz.errors import MbzError
from mbz.format import read_mbz
from mbz.inspect import describe
from mbz.sweep import RESULTS_JSONL, read_records

WEIGHT_OPS = ("conv2d", "linear")
OVERHEADS = ("codebook", "scales", "mask", "other_payload", "metadata", "header_and_table",
             "padding")  # fmt: skip
PEAK_METHOD = (
    "peak bytes of live activations per image while the numpy runtime runs the .mbz graph "
    "(Program.last_peak_bytes_per_image: the values held between steps, quantized ones at "
    "their stored code size), measured by mbz sweep on {images} test image(s); the float32 "
    "peak is the same graph with float activations (measured by mbz pack on one calibration "
    "image for runs with activation bits)"
)


def baseline_weight_bytes(module: nn.Module) -> int:
    """FP32 bytes of the conv and linear weights of ``module`` (4 bytes per element)."""
    return 4 * sum(
        m.weight.numel() for m in module.modules() if isinstance(m, nn.Conv2d | nn.Linear)
    )


def file_breakdown(path: Path) -> dict:
    """The bytes of a .mbz file: conv/linear weight payload, and every other byte by kind.

    The parts add up to the file's size.
    """
    facts = describe(path)
    graph = read_mbz(path).metadata["graph"]
    weights = {n["params"]["weight"] for n in graph["nodes"] if n["op"] in WEIGHT_OPS}
    rows = facts["tensors"]
    totals = facts["totals"]
    weight_payload = sum(r["payload"] for r in rows if r["tensor"] in weights)
    parts = {
        "weight_payload": weight_payload,
        "codebook": totals["codebook"],
        "scales": totals["scales"],
        "mask": totals["mask"],
        "other_payload": totals["payload"] - weight_payload,
        "metadata": totals["metadata"],
        "header_and_table": totals["header_and_table"],
        "padding": totals["padding"],
    }
    if sum(parts.values()) != facts["total_bytes"]:
        raise MbzError(f"{path}: the byte accounting does not add up to the file's size")
    return {"total_bytes": facts["total_bytes"], "parts": parts}


def baseline_accuracy(records: list[dict], loaded_extra: dict) -> tuple[float, str]:
    """The baseline's top-1 accuracy and where it came from."""
    for record in records:
        if record["kind"] == "baseline":
            runtimes = ", ".join(record["accuracy_by_runtime"])
            return record["accuracy"], (
                f"measured by mbz sweep: the model packed as float32 (no pruning, no "
                f"quantization) run by {runtimes} on {record['images']} images of {record['data']}"
            )
    if isinstance(loaded_extra.get("accuracy"), int | float):
        return float(loaded_extra["accuracy"]), "recorded in the checkpoint by mbz train"
    raise MbzError(
        "no baseline accuracy: the results hold no baseline run and the checkpoint records "
        "none; rerun `mbz sweep` on the same folder to measure it"
    )


def analyse_run(record: dict, folder: Path, fp32_bytes: int, weight_bytes: int) -> dict:
    """The compression ratios of one run, from its .mbz file on disk."""
    path = folder / record["file"]
    if not path.exists():
        raise MbzError(f"{path}: the .mbz file of run {record['key']} is missing")
    breakdown = file_breakdown(path)
    size, parts = breakdown["total_bytes"], breakdown["parts"]
    return {
        "key": record["key"],
        "config": record["config"],
        "file": str(path),
        "file_bytes": size,
        "size_mb": size / 1e6,
        "accuracy": record["accuracy"],
        "accuracy_by_runtime": record["accuracy_by_runtime"],
        "model_ratio": fp32_bytes / size,
        "weight_bytes_fp32": weight_bytes,
        "weight_payload_bytes": parts["weight_payload"],
        "weights_only_ratio": weight_bytes / parts["weight_payload"],
        "overheads": {name: parts[name] for name in OVERHEADS},
        "act_peak_fp32_bytes": record["act_peak_fp32_bytes"],
        "act_peak_bytes": record["act_peak_bytes"],
        "activation_ratio": record["act_peak_fp32_bytes"] / record["act_peak_bytes"],
    }


def build_report(results: Path, baseline: Path, max_drop: float, trust_pickle: bool = False):
    """The report of the sweep in ``results`` (its folder or results.jsonl) against the
    ``baseline`` checkpoint: every run analysed, and the smallest within ``max_drop``
    percentage points of the baseline's accuracy."""
    results = Path(results)
    folder = results if results.is_dir() else results.parent
    records = read_records(folder / RESULTS_JSONL if results.is_dir() else results)
    runs = [r for r in records if r["kind"] == "run"]
    if not runs:
        raise MbzError(f"{results}: no finished sweep runs; run `mbz sweep` first")
    loaded = load_model(baseline, trust_pickle=trust_pickle)
    accuracy, source = baseline_accuracy(records, loaded.extra)
    weight_bytes = baseline_weight_bytes(loaded.module)
    analysed = [analyse_run(r, folder, loaded.fp32_bytes, weight_bytes) for r in runs]
    floor = accuracy - max_drop / 100
    eligible = [a for a in analysed if a["accuracy"] >= floor]
    best = min(eligible, key=lambda a: (a["file_bytes"], -a["accuracy"]), default=None)
    baseline_run = next((r for r in records if r["kind"] == "baseline"), None)
    if best is not None and baseline_run is not None:
        best["activation_ratio_vs_baseline"] = (
            baseline_run["act_peak_bytes"] / best["act_peak_bytes"]
        )
    return {
        "baseline": {
            "checkpoint": str(baseline),
            "fp32_bytes": loaded.fp32_bytes,
            "weight_bytes_fp32": weight_bytes,
            "accuracy": accuracy,
            "accuracy_source": source,
            "act_peak_bytes": None if baseline_run is None else baseline_run["act_peak_bytes"],
        },
        "max_drop_points": max_drop,
        "accuracy_floor": floor,
        "best": best,
        "runs": sorted(analysed, key=lambda a: a["file_bytes"]),
        "activation_method": PEAK_METHOD.format(images=runs[0]["peak_images"]),
        "units": "MB = 10^6 bytes; ratios are before / after",
    }


def _config(config: dict) -> str:
    return " ".join(f"{k}={v}" for k, v in config.items())


def _best_lines(report: dict) -> list[str]:
    best, base = report["best"], report["baseline"]
    if best is None:
        top = max(report["runs"], key=lambda a: a["accuracy"])
        return [
            f"No run is within {report['max_drop_points']} points of the baseline "
            f"({100 * base['accuracy']:.2f}%); the most accurate reached "
            f"{100 * top['accuracy']:.2f}% ({_config(top['config'])})."
        ]
    o = best["overheads"]
    lines = [
        f"## Best configuration within {report['max_drop_points']} points: "
        f"`{_config(best['config'])}`",
        "",
        f"- accuracy: {100 * best['accuracy']:.2f}% "
        f"(baseline {100 * base['accuracy']:.2f}%, drop "
        f"{100 * (base['accuracy'] - best['accuracy']):.2f} points)",
        f"- final size: {best['size_mb']:.4f} MB ({best['file_bytes']:,} bytes, `{best['file']}`)",
        f"- model compression ratio: {base['fp32_bytes']:,} / {best['file_bytes']:,} = "
        f"{best['model_ratio']:.2f}x",
        f"- weights-only ratio: {best['weight_bytes_fp32']:,} / {best['weight_payload_bytes']:,}"
        f" = {best['weights_only_ratio']:.2f}x; overheads (bytes): "
        + ", ".join(f"{name} {value:,}" for name, value in o.items()),
        f"- activation compression ratio: {best['act_peak_fp32_bytes']:,} / "
        f"{best['act_peak_bytes']:,} bytes per image = {best['activation_ratio']:.2f}x",
    ]
    if "activation_ratio_vs_baseline" in best:
        lines.append(
            f"- activation peak vs the FP32 baseline model: {base['act_peak_bytes']:,} / "
            f"{best['act_peak_bytes']:,} = {best['activation_ratio_vs_baseline']:.2f}x"
        )
    return lines


def format_markdown(report: dict) -> str:
    """The report as Markdown: the baseline, the best run, the method, and a table of runs."""
    base = report["baseline"]
    lines = [
        "# mbz compression report",
        "",
        f"Baseline `{base['checkpoint']}`: {base['fp32_bytes']:,} bytes FP32 "
        f"({base['weight_bytes_fp32']:,} bytes of conv/linear weights); top-1 "
        f"{100 * base['accuracy']:.2f}%, {base['accuracy_source']}.",
        "",
        *_best_lines(report),
        "",
        f"Activation memory: {report['activation_method']}. Units: {report['units']}.",
        "",
        "| config | file bytes | MB | accuracy % | model ratio | weights-only ratio "
        "| activation ratio |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    lines += [
        f"| {_config(a['config'])} | {a['file_bytes']:,} | {a['size_mb']:.4f} | "
        f"{100 * a['accuracy']:.2f} | {a['model_ratio']:.2f}x | {a['weights_only_ratio']:.2f}x "
        f"| {a['activation_ratio']:.2f}x |"
        for a in report["runs"]
    ]
    return "\n".join(lines) + "\n"
