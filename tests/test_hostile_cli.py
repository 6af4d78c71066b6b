"""The commands that read a .mbz file run without torch (it is blocked in a fresh Python)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np

from tests.helpers import assert_runs_without_torch

FUZZ_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "fuzz.py"
REGRESSIONS = Path(__file__).parent / "regressions"


def small_file(path: Path) -> Path:
    """A valid file on 8x8 images: the first seed of examples/fuzz.py (f32 weights)."""
    spec = importlib.util.spec_from_file_location("mbz_examples_fuzz_cli", FUZZ_SCRIPT)
    fuzz = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = fuzz
    try:
        spec.loader.exec_module(fuzz)
        seed = fuzz.corpus(0)[0]
        path.write_bytes(fuzz.rebuild(seed.metadata.encode(), seed.bodies, seed.compressed))
    finally:
        del sys.modules[spec.name]
    return path


def cli_calls(calls: list[list[str]]) -> str:
    """A script running ``mbz`` with each argument list (output captured), asserting that each
    succeeds."""
    return (
        "import contextlib, io\n"
        "from mbz.cli import main\n"
        f"for args in {calls!r}:\n"
        "    try:\n"
        "        with contextlib.redirect_stdout(io.StringIO()):\n"
        "            main(args, standalone_mode=False)\n"
        "        code = 0\n"
        "    except SystemExit as exit:\n"
        "        code = exit.code\n"
        "    except Exception as error:\n"
        "        code = type(error).__name__\n"
        "    assert code == 0, (args, code)\n"
    )


def test_inspect_eval_and_export_run_without_torch(tmp_path: Path):
    path = small_file(tmp_path / "m.mbz")
    data = tmp_path / "images.npz"
    images = np.random.default_rng(0).integers(0, 256, (4, 8, 8, 3), dtype=np.uint8)
    np.savez(data, x_test=images, y_test=np.arange(4))
    calls = [
        ["inspect", str(path)],
        ["inspect", str(path), "--json", "--onnx"],
        ["eval", str(path), "--data", str(data), "--runtime", "numpy", "--json"],
        ["eval", str(path), "--data", str(data), "--runtime", "onnx", "--json"],
        ["export-onnx", str(path), "-o", str(tmp_path / "m.onnx"), "--json"],
    ]
    assert_runs_without_torch(cli_calls(calls))
    assert (tmp_path / "m.onnx").stat().st_size > 0


def test_a_hostile_file_is_refused_without_torch():
    path = str(REGRESSIONS / "op_is_a_list.mbz")
    body = (
        "from click.testing import CliRunner\n"
        "from mbz.cli import main\n"
        f"result = CliRunner().invoke(main, ['inspect', {path!r}])\n"
        "assert result.exit_code == 1, result.output\n"
        "error = 'Error: not a valid .mbz file: graph node 1'\n"
        "assert result.output.startswith(error), result.output\n"
    )
    assert_runs_without_torch(body)
