"""``mbz sweep``: grid points as pack configs, and a tiny real sweep (narrow model, 32 test
images, a 2x2 grid) with its resume and results files."""

from __future__ import annotations

import csv
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from mbz.checkpoint import load_model, save_checkpoint
from mbz.config import PackConfig, parse_act_bits
from mbz.errors import MbzError
from mbz.format import read_mbz
from mbz.models import ArchConfig
from mbz.runtime import load_program
from mbz.sweep import expand_grid, load_grid, parse_grid, parse_settings, point_config
from tests.helpers import invoke, narrow_mobilenet

GRID = "bits=4,2 act_bits=32,8 huffman=false"  # fixed-width: test_report counts bytes


@dataclass
class Sweep:
    """A finished tiny sweep: its inputs, its folder and the CLI arguments that made it."""

    model: Path
    data: Path
    folder: Path
    args: list[str]


def sweep_args(model: Path, data: Path, folder: Path, grid: str = GRID) -> list[str]:
    return [
        "sweep", str(model), "--data", str(data), "--grid", grid, "-o", str(folder),
        "--set", "calib_images=16", "--json",
    ]  # fmt: skip


def sweep(args: list[str]) -> dict:
    return json.loads(invoke(*args).stdout)


def tiny_inputs(root: Path) -> tuple[Path, Path]:
    """A narrow model (its architecture recorded) and 48 random images, made once in ``root``."""
    model, data = root / "model.pt", root / "tiny.npz"
    if not model.exists():
        root.mkdir(exist_ok=True)
        save_checkpoint(model, narrow_mobilenet(width_mult=0.125), ArchConfig(width_mult=0.125))
        rng = np.random.default_rng(0)
        images = rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
        labels = rng.integers(0, 10, 48)
        np.savez(data, x_train=images, y_train=labels, x_test=images[:32], y_test=labels[:32])
    return model, data


def build_tiny_sweep(tmp_path_factory) -> Sweep:
    """The tiny sweep, in one folder of the session: the first caller runs it, later callers
    (the report tests' fixture) find every run finished and redo none."""
    root = tmp_path_factory.getbasetemp() / "tiny-sweep"
    model, data = tiny_inputs(root)
    args = sweep_args(model, data, root / "out")
    summary = sweep(args)
    assert summary["ran"] + summary["skipped"] == 5  # the baseline and 2x2 runs
    return Sweep(model, data, root / "out", args)


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory) -> Sweep:
    """One sweep for the sweep tests (packing is the slow part)."""
    return build_tiny_sweep(tmp_path_factory)


def records(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "results.jsonl").read_text().splitlines()]


def test_grid_text_and_json(tmp_path):
    grid = parse_grid("bits=8,4 prune=0,0.36 method=kmeans huffman=true")
    assert grid == {"bits": [8, 4], "prune": [0, 0.36], "method": ["kmeans"], "huffman": [True]}
    assert len(expand_grid(grid)) == 4
    path = tmp_path / "grid.json"
    path.write_text(json.dumps({"bits": [8, 4], "method": "uniform"}))
    assert load_grid(str(path)) == {"bits": [8, 4], "method": ["uniform"]}
    for bad, message in (
        ("colour=red", "unknown grid key 'colour'; known keys: bits, method"),
        ("version=2", "unknown grid key 'version'"),
        ("bits", "not KEY=V1,V2"),
        ("bits=8 bits=4", "given twice"),
        ("grid.yaml", "YAML"),
    ):
        with pytest.raises(MbzError, match=message):
            load_grid(bad)


def test_a_point_is_the_base_config_with_its_values():
    base = PackConfig(calib_images=16)
    config = point_config(base, {"bits": 2, "act_bits": 8, "method": "uniform", "prune": 0})
    assert config == PackConfig(
        bits={"conv": 2, "fc": 2}, act_bits=parse_act_bits("8"), method="uniform",
        prune=0.0, calib_images=16,
    )  # fmt: skip
    assert point_config(base, {"act_bits": 32}).act_bits == {}  # float activations
    assert point_config(base, {"bits": "conv=3,fc=2"}).bits == {"conv": 3, "fc": 2}
    assert point_config(base, {"bits": "fc=2"}).bits == {"conv": 4, "fc": 2}  # as mbz pack
    assert point_config(base, {"mean": "0.5,0.5,0.5"}).mean == (0.5, 0.5, 0.5)
    for point, message in (
        ({"prune": 1.5}, r"prune fraction 1.5 must be in \[0, 1\)"),  # PackConfig's check
        ({"method": "magic"}, "method 'magic'"),
        ({"method": 3}, "method=3: expected str"),
        ({"calib_images": 1.5}, "calib_images=1.5: expected int"),
        ({"bits": 9}, "every value must be 1-8, 16 or 32"),
    ):
        with pytest.raises(MbzError, match=message):
            point_config(base, point)


def test_set_items_become_config_values():
    values = parse_settings(["calib_images=16", "bits=conv=4,fc=2", "huffman=true"])
    assert values == {"calib_images": 16, "bits": "conv=4,fc=2", "huffman": True}
    config = point_config(PackConfig(), values)
    assert (config.calib_images, config.bits, config.huffman) == (16, {"conv": 4, "fc": 2}, True)
    for bad, message in (("calib_images", "not KEY=VALUE"), ("colour=red", "unknown --set")):
        with pytest.raises(MbzError, match=message):
            parse_settings([bad])


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


def test_a_run_is_the_file_mbz_pack_writes(tiny_sweep, tmp_path):
    point = {"bits": 2, "act_bits": 8, "huffman": False}
    run = next(r for r in records(tiny_sweep.folder) if r["config"] == point)
    output = tmp_path / "by-hand.mbz"
    invoke(
        "pack", tiny_sweep.model, "--bits", "conv=2,fc=2", "--act-bits", 8, "--no-huffman",
        "--calib-images", 16, "--data", tiny_sweep.data, "-o", output,
    )  # fmt: skip
    assert (tiny_sweep.folder / run["file"]).read_bytes() == output.read_bytes()


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
    summary = sweep(tiny_sweep.args)
    assert (summary["ran"], summary["skipped"]) == (0, 5)
    assert (tiny_sweep.folder / "results.jsonl").read_bytes() == before


def test_interrupted_sweep_continues(tiny_sweep, tmp_path):
    folder = tmp_path / "out"
    shutil.copytree(tiny_sweep.folder, folder)
    lines = (folder / "results.jsonl").read_text().splitlines()
    # Killed while writing the last record: half a line, no newline.
    (folder / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    summary = sweep(sweep_args(tiny_sweep.model, tiny_sweep.data, folder))
    assert (summary["ran"], summary["skipped"]) == (1, 4)
    again = records(folder)
    assert [r["key"] for r in again] == [json.loads(line)["key"] for line in lines]


def test_grid_errors_are_clean_and_come_first(tiny_sweep, tmp_path):
    for grid, message in (
        ("colour=red", "unknown grid key 'colour'"),
        ("bits=4 prune=0,2", "grid point {'bits': 4, 'prune': 2}: prune fraction 2.0"),
    ):
        folder = tmp_path / grid.replace(" ", "_")
        result = invoke(*sweep_args(tiny_sweep.model, tiny_sweep.data, folder, grid), expect=1)
        assert message in result.output and "Traceback" not in result.output
        assert not (folder / "results.jsonl").exists()  # nothing ran before the bad point


def test_ray_options_need_ray(tiny_sweep, tmp_path):
    args = sweep_args(tiny_sweep.model, tiny_sweep.data, tmp_path / "x")
    result = invoke(*args, "--ray-cpus", 2, expect=2)
    assert "--ray-address and --ray-cpus need --ray" in result.output
    result = invoke(*args, "--ray", "--ray-cpus", 2, "--ray-address", "auto", expect=2)
    assert "--ray-cpus sizes a local Ray, not a cluster" in result.output


def test_model_and_images_are_checked_before_any_run(tiny_sweep, tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save(narrow_mobilenet(width_mult=0.125).state_dict(), bare)
    result = invoke(*sweep_args(bare, tiny_sweep.data, tmp_path / "a"), expect=1)
    assert "--arch" in result.output and "Traceback" not in result.output
    big = tmp_path / "big.npz"
    images = np.zeros((4, 64, 64, 3), np.uint8)
    np.savez(big, x_train=images, y_train=np.arange(4), x_test=images, y_test=np.arange(4))
    result = invoke(*sweep_args(tiny_sweep.model, big, tmp_path / "b"), expect=1)
    assert "64x64 images" in result.output and "Traceback" not in result.output
    for folder in ("a", "b"):
        assert not (tmp_path / folder / "results.jsonl").exists()


@pytest.mark.slow
def test_bare_state_dict_with_arch_and_fine_tuned_points(tiny_sweep, tmp_path):
    bare = tmp_path / "bare.pt"
    torch.save(narrow_mobilenet(width_mult=0.125).state_dict(), bare)
    args = sweep_args(bare, tiny_sweep.data, tmp_path / "out", "prune_mode=weight prune=0.5")
    summary = sweep([*args, "--arch", "cifar", "--set", "finetune_epochs=1"])
    assert (summary["ran"], summary["skipped"]) == (2, 0)
    baseline, run = records(tmp_path / "out")
    assert "finetune_epochs" not in read_mbz(tmp_path / "out" / baseline["file"]).metadata[
        "pack_config"
    ]  # the baseline is the model as given
    metadata = read_mbz(tmp_path / "out" / run["file"]).metadata
    assert metadata["pack_config"]["finetune_epochs"] == 1
    assert metadata["pack_config"]["prune_mode"] == "weight"
    assert metadata["source"]["arch"]["name"] == "mobilenet_v2_cifar"
