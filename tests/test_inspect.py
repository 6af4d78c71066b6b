"""``mbz inspect`` accounts for every byte of a file (golden files, no torch model needed)."""

import json
import math
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from mbz.cli import main
from mbz.format import CodebookTensor, DenseTensor, Entropy, UniformTensor, write_mbz
from mbz.inspect import CATEGORIES, describe, format_report
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
    assert facts["totals"]["index_bytes"] >= facts["totals"]["entropy_bytes"] > 0
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


def _streams_file(path: Path) -> Path:
    """Index streams with known symbol frequencies, 64 positions each (order-0 entropy by hand:
    3/4 zeros + 1/4 ones is 48 log2(4/3) + 16 log2(4) = 51.92 bits -> 7 bytes; 32/16/8/8 is
    1.75 bits a symbol -> 14 bytes; 16 ones + 16 twos kept of 64 is 1 bit a symbol -> 4 bytes)."""
    skewed = np.repeat(np.uint8([0, 1]), [48, 16]).reshape(8, 8)
    dyadic = np.repeat(np.uint8([0, 1, 2, 3]), [32, 16, 8, 8]).reshape(8, 8)
    mask = np.arange(64).reshape(8, 8) % 2 == 0
    halves = np.where(np.arange(64).reshape(8, 8) < 32, 1, 2).astype(np.uint8)
    codebook = np.float32([-1, 0, 1, 2])
    tensors = {
        "fixed": CodebookTensor(codebook, skewed, bits=2, entropy=Entropy.FIXED),
        "huffman": CodebookTensor(codebook, dyadic, bits=2, entropy=Entropy.HUFFMAN),
        # The pruned positions (code 3) are not part of the stream.
        "sparse": UniformTensor(
            np.where(mask, halves, 3).astype(np.uint8), np.float32([0.5]), np.uint8([1]), bits=2,
            mask=mask,
        ),
        "bias": DenseTensor(np.float32([1, 2, 3])),
    }
    write_mbz(path, {"v": 1}, tensors)
    return path


def test_index_streams_against_their_order_0_entropy(tmp_path):
    facts = describe(_streams_file(tmp_path / "s.mbz"))
    rows = {row["tensor"]: row for row in facts["tensors"]}
    stored = {name: (row["index_bytes"], row["entropy_bytes"]) for name, row in rows.items()}
    # Fixed width: 64 two-bit codes; Huffman: 4 code-length bytes + 32*1 + 16*2 + 16*3 bits.
    assert stored == {"fixed": (16, 7), "huffman": (4 + 14, 14), "sparse": (8, 4), "bias": (0, 0)}
    layers = {row["layer"]: row for row in facts["layers"]}
    assert (layers["huffman"]["index_bytes"], layers["huffman"]["entropy_bytes"]) == (18, 14)
    assert (facts["totals"]["index_bytes"], facts["totals"]["entropy_bytes"]) == (42, 25)
    text = format_report(facts)
    assert "index streams 42 bytes, order-0 entropy 25 bytes (+68.0%)" in text
    header = format_report(facts, wide=True).splitlines()[0].split()
    assert header[header.index("index"):][:4] == ["index", "B", "H0", "B"]


def test_huffman_streams_stay_within_a_bit_a_symbol_of_the_entropy(tmp_path):
    rng = np.random.default_rng(0)
    probabilities = np.array([0.5, 0.2, 0.1, 0.08, 0.05, 0.04, 0.02, 0.01])
    indices = rng.choice(8, size=(40, 50), p=probabilities).astype(np.uint8)
    tensor = CodebookTensor(np.arange(8, dtype=np.float32), indices, 3, entropy=Entropy.HUFFMAN)
    write_mbz(tmp_path / "h.mbz", {"v": 1}, {"w": tensor})
    (row,) = describe(tmp_path / "h.mbz")["tensors"]
    counts = np.bincount(indices.ravel())
    bound = math.ceil(-np.sum(counts * np.log2(counts / counts.sum())) / 8)
    codes = row["index_bytes"] - 2**3  # less the code-length table
    assert row["entropy_bytes"] == bound <= codes <= bound + math.ceil(indices.size / 8)


def _exactness_file(path: Path) -> Path:
    """A runnable file whose conv/linear/pooling layers are exact in each way and not exact
    for each reason: c1 (f32), c2 (f32 chunks: 255 * 255 * 32 * 9 >= 2^24), c3 (reads c2's
    float output), a global average pool of codes (exact), fc (codebook weights)."""
    rng = np.random.default_rng(0)

    def node(name, op, source, params=False, **attrs):
        weights = {"weight": f"{name}.w", "bias": f"{name}.b"} if params else {}
        return {"name": name, "op": op, "inputs": [source], "output": name, "params": weights,
                "attrs": attrs}  # fmt: skip

    def conv(name, source, kernel):
        return node(name, "conv2d", source, True, stride=[1, 1], padding=[kernel // 2] * 2,
                    dilation=[1, 1], groups=1)  # fmt: skip

    def uniform(shape):
        codes = np.full(shape, 255, np.uint8)  # |w_int| = 255 everywhere: the bound by hand
        return UniformTensor(codes, np.full(shape[0], 0.01, np.float32),
                             np.zeros(shape[0], np.uint8), bits=8, axis=0)  # fmt: skip

    quantize = {"bits": 8, "scale": 0.05, "zero_point": 0}
    nodes = [
        node("q0", "quantize", "input", **quantize), conv("c1", "q0", 3),
        node("r1", "relu", "c1"), node("q1", "quantize", "r1", **quantize), conv("c2", "q1", 3),
        conv("c3", "c2", 1), node("r3", "relu", "c3"), node("q3", "quantize", "r3", **quantize),
        node("gap", "global_avgpool", "q3"), node("flat", "flatten", "gap"),
        node("q4", "quantize", "flat", **quantize), node("fc", "linear", "q4", True),
    ]  # fmt: skip
    tensors = {"c1.w": uniform((32, 3, 3, 3)), "c2.w": uniform((8, 32, 3, 3)),
               "c3.w": uniform((8, 8, 1, 1)),
               "fc.w": CodebookTensor(np.float32([-1, 1]), rng.integers(0, 2, (10, 8), np.uint8),
                                      bits=1)}  # fmt: skip
    for name, out in (("c1", 32), ("c2", 8), ("c3", 8), ("fc", 10)):
        tensors[f"{name}.b"] = DenseTensor(np.zeros(out, np.float32))
    graph = {"input": "input", "input_shape": [3, 8, 8], "output": "fc", "nodes": nodes}
    preprocess = {"layout": "NHWC", "dtype": "uint8", "mean": [0.5] * 3, "std": [0.25] * 3}
    write_mbz(path, {"graph": graph, "preprocess": preprocess}, tensors)
    return path


def test_exact_column_accumulators_bounds_and_summary(tmp_path):
    path = _exactness_file(tmp_path / "exact.mbz")
    facts = describe(path)
    layers = {row["layer"]: row for row in facts["layers"]}
    got = {name: (r["exact"], r["accumulator"], r["bound"]) for name, r in layers.items()}
    assert got == {
        "c1": (True, "f32", 255 * 255 * 27),
        "c2": (True, "f32 chunks", 255 * 255 * 288),
        "c3": (False, None, None),
        "fc": (False, None, None),
    }
    reasons = {"read float values": 1, "have codebook weights, which have no integer form": 1}
    assert facts["exact"] == {"all": False, "layers": 5, "not": reasons}
    text = CliRunner().invoke(main, ["inspect", str(path)]).output
    lines = text.splitlines()
    assert lines[0].split()[-2:] == ["exact", "bytes"] and max(map(len, lines)) <= 100
    cells = {line.split()[0]: line.split()[-2] for line in lines[1:5]}
    assert cells == {"c1": "f32", "c2": "chunks", "c3": "no", "fc": "no"}
    assert "2 of 5 conv/linear/pooling layers not exact (1 read float values, 1 have codebook" in (
        " ".join(text.split())
    )
    wide = format_report(facts, wide=True).splitlines()
    assert wide[0].split()[-3:] == ["exact", "bound", "total"]
    assert f" f32 chunks {255 * 255 * 288} " in wide[2]
