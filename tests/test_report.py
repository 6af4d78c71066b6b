"""``mbz report``: the compression analysis, checked against the files on disk."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from mbz.checkpoint import load_model
from tests.helpers import invoke
from tests.test_sweep import build_tiny_sweep, records


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
    """The sweep tests' tiny sweep (run once per session, whichever file asks first)."""
    return build_tiny_sweep(tmp_path_factory)


def report(sweep, *options: str) -> dict:
    result = invoke("report", sweep.folder, "--baseline", sweep.model, "--json", *options)
    return json.loads(result.stdout)


def test_ratios_match_the_files(tiny_sweep):
    facts = report(tiny_sweep, "--max-drop", "100")
    rows = records(tiny_sweep.folder)
    runs = {r["key"]: r for r in rows if r["kind"] == "run"}
    state = torch.load(tiny_sweep.model, weights_only=True)["state_dict"]
    fp32_bytes = load_model(tiny_sweep.model).fp32_bytes
    # conv weights are 4-D, the classifier's 2-D; BatchNorm and biases are 1-D.
    weights = [t for t in state.values() if t.ndim in (2, 4)]
    assert facts["baseline"]["fp32_bytes"] == fp32_bytes
    assert facts["baseline"]["weight_bytes_fp32"] == 4 * sum(t.numel() for t in weights)
    for run in facts["runs"]:
        size = (tiny_sweep.folder / runs[run["key"]]["file"]).stat().st_size
        assert run["file_bytes"] == size
        assert run["size_mb"] == size / 1e6
        assert run["model_ratio"] == pytest.approx(fp32_bytes / size)
        # Nothing pruned, k-means codes packed at `bits` per weight: the payload is known.
        bits = run["config"]["bits"]
        payload = sum(math.ceil(t.numel() * bits / 8) for t in weights)
        assert run["weight_payload_bytes"] == payload
        assert run["weights_only_ratio"] == pytest.approx(
            4 * sum(t.numel() for t in weights) / payload
        )
        assert run["weight_payload_bytes"] + sum(run["overheads"].values()) == size
        record = runs[run["key"]]
        assert run["activation_ratio"] == record["act_peak_fp32_bytes"] / record["act_peak_bytes"]
    # Every run is within 100 points: the best is the smallest file.
    assert facts["best"]["file_bytes"] == min(r["file_bytes"] for r in facts["runs"])


def test_best_run_within_the_drop(tiny_sweep):
    facts = report(tiny_sweep, "--max-drop", "0")
    rows = records(tiny_sweep.folder)
    baseline = next(r for r in rows if r["kind"] == "baseline")
    assert facts["baseline"]["accuracy"] == baseline["accuracy"]
    assert "measured by mbz sweep" in facts["baseline"]["accuracy_source"]
    eligible = [r for r in rows if r["kind"] == "run" and r["accuracy"] >= baseline["accuracy"]]
    if not eligible:
        assert facts["best"] is None
        return
    smallest = min(eligible, key=lambda r: (r["file_bytes"], -r["accuracy"]))
    assert facts["best"]["key"] == smallest["key"]
    assert facts["best"]["activation_ratio_vs_baseline"] == (
        baseline["act_peak_bytes"] / smallest["act_peak_bytes"]
    )


def test_markdown_states_the_numbers(tiny_sweep):
    result = invoke("report", tiny_sweep.folder, "--baseline", tiny_sweep.model)
    best = report(tiny_sweep)["best"]
    text = result.output
    assert text.startswith("# mbz compression report")
    assert "Activation memory: peak bytes of live activations" in text
    if best is not None:
        assert f"{best['file_bytes']:,} bytes" in text
        assert f"= {best['model_ratio']:.2f}x" in text


def test_missing_mbz_file_is_a_clean_error(tiny_sweep, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(tiny_sweep.folder, folder)
    victim = next(r for r in records(folder) if r["kind"] == "run")
    (folder / victim["file"]).unlink()
    result = invoke("report", folder, "--baseline", tiny_sweep.model, expect=1)
    assert "is missing" in result.output
