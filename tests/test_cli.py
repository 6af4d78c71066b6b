"""The main path end to end through the CLI: pack, eval, inspect (CliRunner, small models)."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from mbz.cli import main
from mbz.commands.pack import drop_advice
from mbz.config import PackConfig
from mbz.format import read_mbz
from mbz.models import cifar_mobilenet_v2
from mbz.pack import PackResult
from tests.helpers import invoke, narrow_mobilenet, save_mbz_checkpoint


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("cli")


@pytest.fixture(scope="module")
def model_path(workdir):
    return save_mbz_checkpoint(workdir / "model.pt", narrow_mobilenet())


@pytest.fixture(scope="module")
def data_path(workdir):
    rng = np.random.default_rng(0)
    path = workdir / "data.npz"
    np.savez(
        path,
        x_train=rng.integers(0, 256, (16, 32, 32, 3), dtype=np.uint8),
        y_train=rng.integers(0, 10, 16, dtype=np.uint8),
        x_test=rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8),
        y_test=rng.integers(0, 10, 48, dtype=np.uint8),
    )
    return path


def test_pack_eval_inspect(model_path, data_path, workdir):
    out = workdir / "m.mbz"
    packed = invoke("pack", model_path, "--prune", 0.36, "--bits", "conv=4,fc=2",
                    "-o", out, "--data", data_path, "--json")
    assert packed.exit_code == 0, packed.output
    summary = json.loads(packed.output)
    assert summary["file_bytes"] == out.stat().st_size
    assert summary["ratio"] == pytest.approx(summary["fp32_bytes"] / out.stat().st_size)
    assert 0.0 <= summary["accuracy"]["top1"] <= 1.0
    assert summary["float_accuracy"]["images"] == 48
    assert read_mbz(out).metadata["source"]["arch"] == {
        "name": "mobilenet_v2_cifar", "num_classes": 10, "width_mult": 0.25, "dropout": 0.2
    }

    evaluated = invoke("eval", out, "--data", data_path, "--runtime", "all", "--json")
    assert evaluated.exit_code == 0, evaluated.output
    report = json.loads(evaluated.output)
    assert report["ok"]
    assert report["agreement"]["numpy/torch"] >= 0.999
    by_runtime = {r["runtime"]: r["accuracy"] for r in report["results"]}
    assert by_runtime["torch"] == pytest.approx(summary["accuracy"]["top1"])

    inspected = invoke("inspect", out, "--json")
    assert inspected.exit_code == 0, inspected.output
    facts = json.loads(inspected.output)
    assert facts["total_bytes"] == out.stat().st_size
    assert facts["checksums"] == "ok"


def test_channel_pruning_makes_layers_smaller(model_path, workdir):
    out = workdir / "pruned.mbz"
    assert invoke("pack", model_path, "--prune", 0.36, "-o", out).exit_code == 0
    layers = read_mbz(out).metadata["layers"]
    before = sum(np.prod(f["shape_before"]) for f in layers.values())
    after = sum(np.prod(f["shape_after"]) for f in layers.values())
    assert 1 - after / before >= 0.36
    assert any(f["shape_after"][0] < f["shape_before"][0] for f in layers.values())


def test_weight_pruning_stores_masks(model_path, workdir):
    out = workdir / "sparse.mbz"
    result = invoke("pack", model_path, "--prune", 0.5, "--prune-mode", "weight",
                    "--method", "uniform", "--per-tensor", "--symmetric", "-o", out)
    assert result.exit_code == 0, result.output
    mbz = read_mbz(out)
    weights = [mbz.tensors[f["weight"]].decode() for f in mbz.metadata["layers"].values()]
    zeros = sum(int((w == 0).sum()) for w in weights) / sum(w.size for w in weights)
    assert zeros >= 0.5


def test_bits_flag_is_validated(model_path):
    result = CliRunner().invoke(main, ["pack", str(model_path), "--bits", "conv=9"])
    assert result.exit_code == 2
    assert "1 to 8" in result.output


def test_pickled_module_needs_trust(workdir):
    path = workdir / "whole.pt"
    torch.save(cifar_mobilenet_v2(width_mult=0.25), path)
    refused = CliRunner().invoke(main, ["pack", str(path), "-o", str(workdir / "w.mbz")])
    assert refused.exit_code == 1
    assert "--trust-pickle" in refused.output
    assert "Traceback" not in refused.output
    accepted = invoke("pack", path, "--trust-pickle", "-o", workdir / "w.mbz")
    assert accepted.exit_code == 0, accepted.output


def test_pack_states_the_float_accuracy_and_the_drop(model_path, data_path, workdir):
    out = workdir / "honest.mbz"
    summary = json.loads(
        invoke("pack", model_path, "--bits", "conv=2,fc=2", "-o", out, "--data", data_path,
               "--json").output
    )
    packed, base = summary["accuracy"]["top1"], summary["float_accuracy"]["top1"]
    assert summary["drop_points"] == pytest.approx(100 * (packed - base))
    stored = read_mbz(out).metadata
    assert stored["float_accuracy"]["top1"] == base
    assert stored["float_accuracy"]["data_sha256"] == stored["accuracy"]["data_sha256"]
    text = invoke("pack", model_path, "--bits", "conv=2,fc=2", "-o", out, "--data", data_path)
    assert f"(float {100 * base:.2f}%, {100 * (packed - base):+.2f} pt)" in text.output


def test_pack_without_data_says_accuracy_was_not_measured(model_path, workdir):
    result = invoke("pack", model_path, "-o", workdir / "blind.mbz")
    assert "accuracy not measured: add --data" in result.output
    assert read_mbz(workdir / "blind.mbz").metadata["accuracy"] is None


@pytest.mark.parametrize(("packed", "advice"), [(0.50, True), (0.545, False), (0.60, False)])
def test_a_drop_above_two_points_gets_advice(packed, advice):
    result = PackResult(Path("m.mbz"), 100, 400, {"top1": packed}, 1.0,
                        float_accuracy={"top1": 0.56})
    text = drop_advice(result, PackConfig())
    assert (text is not None) == advice
    if advice:
        assert "--finetune-epochs 3" in text and "--target-ratio R" in text


def test_advice_names_only_what_the_command_did_not_do():
    result = PackResult(Path("m.mbz"), 100, 400, {"top1": 0.3}, 1.0, float_accuracy={"top1": 0.56})
    text = drop_advice(result, PackConfig(target_ratio=30, finetune_epochs=3))
    assert text is not None
    assert "fine-tune longer" in text and "allow a larger file" in text
    assert "--bits" not in text and "--target-ratio R" not in text


def test_huffman_by_default_never_makes_a_tensor_larger(model_path, workdir):
    sizes = {}
    for flag in ("--huffman", "--no-huffman"):
        out = workdir / f"h{flag}.mbz"
        invoke("pack", model_path, "--bits", "conv=3,fc=3", flag, "-o", out)
        sections = read_mbz(out).layout.sections
        sizes[flag] = {s.name: s.length for s in sections if s.name != "metadata"}
    assert all(sizes["--huffman"][name] <= size for name, size in sizes["--no-huffman"].items())
    assert sum(sizes["--huffman"].values()) < sum(sizes["--no-huffman"].values())
    default = invoke("pack", model_path, "--bits", "conv=3,fc=3", "-o", workdir / "d.mbz")
    assert default.exit_code == 0
    assert (workdir / "d.mbz").read_bytes() == (workdir / "h--huffman.mbz").read_bytes()
