"""Packaging: the console script, and format/runtime importable without torch."""

import configparser
from pathlib import Path

from click.testing import CliRunner

from mbz import __version__
from mbz.cli import main
from tests.helpers import assert_runs_without_torch


def test_version_option():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_format_and_runtime_import_without_torch():
    assert_runs_without_torch("import mbz.format, mbz.runtime\nimport mbz.format.constants")


def test_setup_cfg_ships_every_package():
    root = Path(__file__).resolve().parents[1]
    config = configparser.ConfigParser()
    config.read(root / "setup.cfg")
    listed = set(config["options"]["packages"].split())
    folders = {"mbz": root / "mbz", "mbz.format": root / "format", "mbz.runtime": root / "runtime"}
    found = {
        ".".join((name, *sub.parent.relative_to(folder).parts))
        for name, folder in folders.items()
        for sub in folder.rglob("__init__.py")
    }
    assert found <= listed, f"add {sorted(found - listed)} to setup.cfg's packages"
