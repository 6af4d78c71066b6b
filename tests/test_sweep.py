"""``mbz sweep``: a tiny real sweep (narrow model, 32 test images, a 2x2 grid) and its resume,
results files and offline charts."""

from __future__ import annotations

import csv
import importlib.util
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mbz.charts import pareto_front
from mbz.checkpoint import load_model
from mbz.cli import main
from mbz.errors import MbzError
from mbz.runtime import load_program
from mbz.sweep import expand_grid, load_grid, parse_grid
from tests.helpers import narrow_mobilenet

GRID = "bits=4,2 act_bits=32,8"


@dataclass
class Sweep:
    """A finished tiny sweep: its inputs, its folder and the CLI arguments that made it."""

    model: Path
    data: Path
    folder: Path
    args: list[str]


def sweep_args(model: Path, data: Path, folder: Path) -> list[str]:
    return [
        "sweep", str(model), "--data", str(data), "--grid", GRID, "-o", str(folder),
        "--pack-args", "--calib-images 16", "--json",
    ]  # fmt: skip


def invoke(args: list[str]):
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


def build_tiny_sweep(tmp_path_factory) -> Sweep:
    """The tiny sweep, in one folder of the session: the first caller runs it, later callers
    (the report tests' fixture) find every run finished and redo none."""
    root = tmp_path_factory.getbasetemp() / "tiny-sweep"
    model, data = root / "model.pt", root / "tiny.npz"
    if not model.exists():
        root.mkdir(exist_ok=True)
        torch.save(narrow_mobilenet(width_mult=0.125).state_dict(), model)
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, 48)
        np.savez(data, x_train=images, y_train=labels, x_test=images[:32], y_test=labels[:32])
    args = sweep_args(model, data, root / "out")
    summary = invoke(args)
    assert summary["ran"] + summary["skipped"] == 5  # the baseline and 2x2 runs
    return Sweep(model, data, root / "out", args)


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Sweep:
    """One sweep for the sweep tests (packing is the slow part)."""
    return build_tiny_sweep(tmp_path_factory)


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def test_grid_text_and_json(tmp_path):
    grid = parse_grid("bits=8,4 prune=0,0.36 method=kmeans")
    assert grid == {"bits": [8, 4], "prune": [0, 0.36], "method": ["kmeans"]}
    assert len(expand_grid(grid)) == 4
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"bits": [8, 4], "method": "uniform"}))
    assert load_grid(str(path)) == {"bits": [8, 4], "method": ["uniform"]}
    for bad, message in (
        ("colour=red", "unknown grid key 'colour'"),
        ("bits", "not KEY=V1,V2"),
        ("bits=8 bits=4", "given twice"),
        ("grid.yaml", "YAML"),
    ):
        with pytest.raises(MbzError, match=message):
            load_grid(bad)


def test_each_run_records_real_files(tiny_sweep):
    rows = records(tiny_sweep.folder)
    runs = [r for r in rows if r["kind"] == "run"]
    assert [r["kind"] for r in rows].count("baseline") == 1
    assert sorted((r["config"]["bits"], r["config"]["act_bits"]) for r in runs) == [
        (2, 8), (2, 32), (4, 8), (4, 32),
    ]  # fmt: skip
    fp32 = load_model(tiny_sweep.model).fp32_bytes
    data = np.load(tiny_sweep.data)
    for record in rows:
        path = tiny_sweep.folder / record["file"]
        assert record["file_bytes"] == path.stat().st_size
        assert record["fp32_bytes"] == fp32
        assert record["ratio"] == pytest.approx(fp32 / path.stat().st_size)
        program = load_program(path)
        predictions = program.predict(data["x_test"]).argmax(axis=1)
        assert record["accuracy_by_runtime"]["numpy"] == np.mean(predictions == data["y_test"])
        program.predict(data["x_test"][: record["peak_images"]])
        assert record["act_peak_bytes"] == program.last_peak_bytes_per_image
        assert record["pack_seconds"] > 0
    by_config = {(r["config"]["bits"], r["config"]["act_bits"]): r for r in runs}
    for bits in (4, 2):
        quantized, float_acts = by_config[(bits, 8)], by_config[(bits, 32)]
        # 8-bit codes take a quarter of the float32 bytes: the peak must shrink a lot.
        assert quantized["act_peak_bytes"] < float_acts["act_peak_bytes"] / 2
        assert quantized["act_peak_fp32_bytes"] == float_acts["act_peak_bytes"]
        assert by_config[(2, 32)]["file_bytes"] < by_config[(4, 32)]["file_bytes"]


def test_csv_holds_the_json_lines(tiny_sweep):
    rows = records(tiny_sweep.folder)
    with open(tiny_sweep.folder / "results.csv", newline="") as handle:
        table = list(csv.DictReader(handle))
    assert [row["key"] for row in table] == [r["key"] for r in rows]
    for row, record in zip(table, rows, strict=True):
        assert int(row["bits"]) == record["config"]["bits"]
        assert int(row["act_bits"]) == record["config"]["act_bits"]
        assert int(row["file_bytes"]) == record["file_bytes"]
        assert float(row["accuracy_numpy"]) == record["accuracy_by_runtime"]["numpy"]
        assert int(row["act_peak_bytes"]) == record["act_peak_bytes"]


def test_rerun_does_no_new_run(tiny_sweep):
    before = (tiny_sweep.folder / "results.jsonl").read_bytes()
    summary = invoke(tiny_sweep.args)
    assert (summary["ran"], summary["skipped"]) == (0, 5)
    assert (tiny_sweep.folder / "results.jsonl").read_bytes() == before


def test_interrupted_sweep_continues(tiny_sweep, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(tiny_sweep.folder, folder)
    lines = (folder / "results.jsonl").read_text().splitlines()
    # Killed while writing the last record: half a line, no newline.
    (folder / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    summary = invoke(sweep_args(tiny_sweep.model, tiny_sweep.data, folder))
    assert (summary["ran"], summary["skipped"]) == (1, 4)
    again = records(folder)
    assert [r["key"] for r in again] == [json.loads(line)["key"] for line in lines]


def test_html_is_self_contained(tiny_sweep):
    page = (tiny_sweep.folder / "sweep.html").read_text()
    assert page.count("<svg") == 3
    for reference in ("http:", "https:", "//", "src=", "<link", "@import", "url("):
        assert reference not in page, reference
    for name in ("parallel", "pareto", "sparsity"):
        assert (tiny_sweep.folder / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pareto_front_keeps_undominated_points():
    sizes = [10, 20, 30, 15, 40]
    accuracy = [0.5, 0.7, 0.6, 0.5, 0.9]
    # 30 is beaten by 20 (smaller, more accurate); 15 by 10 (smaller, as accurate).
    assert pareto_front(sizes, accuracy) == [0, 1, 4]


def test_grid_and_wandb_errors_are_clean(tiny_sweep):
    args = [a if a != GRID else "colour=red" for a in tiny_sweep.args]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1 and "unknown grid key 'colour'" in result.output
    if importlib.util.find_spec("wandb") is not None:
        pytest.skip("wandb is installed: the missing-package message cannot be shown")
    result = CliRunner().invoke(main, [*tiny_sweep.args, "--wandb"])
    assert result.exit_code == 1 and "pip install wandb" in result.output
