"""Issue 17's findings, each refused with MbzFormatError, fast and without allocating much.

The files in tests/regressions/ are one mutation of a small valid file each (README.md there);
the decompression bombs are generated here.
"""

from __future__ import annotations

import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from mbz.cli import main
from mbz.format import Limits, MbzFormatError, SectionKind, decode_mbz, read_mbz
from mbz.format.container import assemble
from mbz.format.jsonio import canonical_json
from mbz.inspect import describe
from mbz.onnx.export import export_onnx
from mbz.runtime import load_program

REGRESSIONS = Path(__file__).parent / "regressions"
FILES = sorted(REGRESSIONS.glob("*.mbz"))
EXPECTED = {  # file -> what the error names
    "op_is_a_list.mbz": "op must be one of",
    "op_is_an_object.mbz": "op must be one of",
    "mean_10e400.mbz": "mean must be a finite float32",
    "std_10e400.mbz": "std must be a finite float32",
    "quantize_scale_10e400.mbz": "scale must be a finite float32",
    "quantize_scale_1e-45.mbz": "scale must be a normal float32",
    "avgpool_kernel_1001.mbz": "padding 500 must be at most",
    "avgpool_kernel_2001.mbz": "padding 1000 must be at most",
    "avgpool_kernel_4001.mbz": "padding 2000 must be at most",
    "maxpool_kernel_4001.mbz": "padding 2000 must be at most",
    "input_3x4096x4096.mbz": "input_elements",
}
MiB = 1 << 20


def refused_quickly(call: Callable[[], object], file_bytes: int, fragment: str) -> None:
    """``call`` raises MbzFormatError naming ``fragment`` within a second, its traced peak
    within a small multiple of the file (plus 1 MiB for the interpreter's own bookkeeping)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(MbzFormatError, match=fragment):
            call()
        seconds = time.perf_counter() - start
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert seconds < 1.0
    assert peak < 8 * file_bytes + MiB, f"peak {peak} bytes for a {file_bytes}-byte file"


def test_every_finding_has_a_regression_file():
    assert [path.name for path in FILES] == sorted(EXPECTED)


@pytest.mark.parametrize("path", FILES, ids=[path.name for path in FILES])
def test_regression_file_refused_by_every_reader(path: Path):
    size, fragment = path.stat().st_size, EXPECTED[path.name]
    refused_quickly(lambda: load_program(path), size, fragment)
    refused_quickly(lambda: describe(path), size, fragment)
    mbz = read_mbz(path)  # the container itself is valid: only what it says is hostile
    refused_quickly(lambda: export_onnx(mbz), size, fragment)


@pytest.mark.parametrize("command", [["inspect"], ["export-onnx", "-o", "{tmp}/x.onnx"]])
@pytest.mark.parametrize("path", FILES[:3] + FILES[-3:], ids=lambda p: p.name)
def test_cli_refuses_in_one_line(path: Path, command: list[str], tmp_path: Path):
    args = [part.format(tmp=tmp_path) for part in command]
    result = CliRunner().invoke(main, [args[0], str(path), *args[1:]])
    assert result.exit_code == 1
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: not a valid .mbz file: ")
    assert EXPECTED[path.name] in lines[0]


def test_cli_eval_refuses_before_reading_images(tmp_path: Path):
    data = tmp_path / "images.npz"
    np.savez(data, x_test=np.zeros((2, 8, 8, 3), np.uint8), y_test=np.zeros(2, np.int64))
    path = REGRESSIONS / "quantize_scale_1e-45.mbz"
    result = CliRunner().invoke(main, ["eval", str(path), "--data", str(data)])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [
        "Error: not a valid .mbz file: graph node 2 'q1': scale must be a normal float32 > 0 "
        "(at least 1.17549435e-38), got 1e-45"
    ]


def test_raising_a_limit_is_explicit(tmp_path: Path):
    path = REGRESSIONS / "input_3x4096x4096.mbz"
    args = ["inspect", str(path), "--raise-limit", "input_elements=2**26"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 1  # past the input limit, the next one stops it
    assert "input_elements" not in result.output and "--raise-limit macs=N" in result.output
    wide = Limits(input_elements=1 << 26, activation_bytes=1 << 33, macs=1 << 40)
    assert load_program(path, wide).input_shape == (3, 4096, 4096)


def bomb(tensors: int, elements: int = 1 << 28) -> bytes:
    """A file valid by SPEC.md: ``tensors`` float32 tensors of ``elements`` each, all pruned,
    their CSR streams 8-bit fillers (255 elements per byte)."""
    entries = elements // 255
    table = {
        f"w{i}": {
            "section": i + 1, "shape": [elements], "encoding": "f32", "sparsity": "csr",
            "nnz": 0, "parts": [["values", 0], ["gaps", entries]], "csr_bits": 8,
            "csr_entries": entries,
        }
        for i in range(tensors)
    }
    bodies = [b"\xff" * entries] * tensors
    metadata = canonical_json({"tensors": table})
    kinds = [SectionKind.METADATA] + [SectionKind.TENSOR] * tensors
    return assemble(kinds, [metadata, *bodies], 64)


@pytest.mark.parametrize("tensors", [1, 4])
def test_decompression_bombs_refused(tensors: int, tmp_path: Path):
    path = tmp_path / "bomb.mbz"
    path.write_bytes(bomb(tensors))
    size = path.stat().st_size
    assert size < tensors * 1.06 * MiB
    refused_quickly(lambda: read_mbz(path), size, "elements in all, above the limit")
    refused_quickly(lambda: load_program(path), size, "elements in all, above the limit")


def test_a_bomb_within_raised_limits_is_read():
    data = bomb(1, 1 << 20)
    with pytest.raises(MbzFormatError, match="above the limit"):
        decode_mbz(data, Limits(total_elements=1 << 19))
    tensor = decode_mbz(data, Limits(total_elements=1 << 20)).tensors["w0"]
    assert tensor.shape == (1 << 20,) and not tensor.decode().any()


