"""``mbz inspect`` accounts for every byte of a file (golden files, no torch model needed)."""

import json
from pathlib import Path

from click.testing import CliRunner

from mbz.cli import main
from mbz.inspect import CATEGORIES, describe

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
