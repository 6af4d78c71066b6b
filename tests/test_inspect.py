"""``mbz inspect`` accounts for every byte of a file (golden files, no torch model needed)."""

import json
from pathlib import Path

from click.testing import CliRunner

from mbz.cli import main
from mbz.inspect import CATEGORIES, describe
from tests.helpers import narrow_mobilenet, save_mbz_checkpoint

GOLDEN = Path(__file__).parent / "golden"


def test_parts_are_grouped_by_category():
    facts = describe(GOLDEN / "uniform_per_channel_bitmap.mbz")
    (row,) = facts["tensors"]
    # SPEC.md 3.4 example: 2 code bytes, 8 scale + 2 zero-point bytes, 1 bitmap byte.
    assert (row["payload"], row["scales"], row["mask"], row["codebook"]) == (2, 10, 1, 0)
    assert row["bytes"] == 13


def test_totals_add_up_to_the_file_size():
    for path in GOLDEN.glob("*.mbz"):
        facts = describe(path)
        totals = facts["totals"]
        parts = sum(totals[c] for c in CATEGORIES)
        overhead = totals["metadata"] + totals["header_and_table"] + totals["padding"]
        assert parts + overhead == path.stat().st_size == facts["total_bytes"]


def test_cli_json_and_text(tmp_path):
    path = GOLDEN / "codebook_huffman_csr.mbz"
    facts = json.loads(CliRunner().invoke(main, ["inspect", str(path), "--json"]).output)
    assert facts["checksums"] == "ok"
    assert facts["tensors"][0]["entropy"] == "huffman"
    text = CliRunner().invoke(main, ["inspect", str(path)]).output
    assert "codebook+h" in text and f"file {path.stat().st_size} bytes" in text


def test_corrupt_file_gives_a_clean_error(tmp_path):
    path = tmp_path / "bad.mbz"
    path.write_bytes((GOLDEN / "codebook.mbz").read_bytes()[:-1])
    result = CliRunner().invoke(main, ["inspect", str(path)])
    assert result.exit_code == 1
    assert "not a valid .mbz file" in result.output and "truncated" in result.output
    assert "Traceback" not in result.output


def test_layer_rows_show_pruning_bits_and_every_byte(tmp_path):
    model_path, out = tmp_path / "model.pt", tmp_path / "m.mbz"
    save_mbz_checkpoint(model_path, narrow_mobilenet())
    args = ["pack", str(model_path), "--prune", "0.36", "--bits", "conv=4,fc=2", "-o", str(out)]
    assert CliRunner().invoke(main, args).exit_code == 0
    facts = describe(out, onnx=True)
    assert describe(out)["onnx_bytes"] is None  # exported only when asked
    layers = {row["layer"]: row for row in facts["layers"]}
    assert sum(row["bytes"] for row in layers.values()) == sum(r["bytes"] for r in facts["tensors"])
    assert any(kept < total for kept, total in (r["kept_channels"] for r in layers.values()))
    for row in layers.values():
        assert row["shape_after"][0] == row["kept_channels"][0] <= row["shape_before"][0]
        assert row["codebook_size"] <= (4 if row["op"] == "linear" else 16)
    onnx_path = tmp_path / "m.onnx"
    assert CliRunner().invoke(main, ["export-onnx", str(out), "-o", str(onnx_path)]).exit_code == 0
    assert facts["onnx_bytes"] == onnx_path.stat().st_size
    text = CliRunner().invoke(main, ["inspect", str(out), "--onnx"]).output
    assert f"as ONNX (mbz export-onnx) {onnx_path.stat().st_size} bytes" in text
    assert "ONNX" not in CliRunner().invoke(main, ["inspect", str(out)]).output
    first = facts["layers"][0]
    assert f"{first['kept_channels'][0]}/{first['kept_channels'][1]}" in text
