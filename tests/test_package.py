"""Packaging: the console script, and format/runtime importable without torch."""

import configparser
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from mbz import __version__
from mbz.cli import main


def test_version_option():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_format_and_runtime_import_without_torch():
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('torch', 'torchvision'):\n"
        "            raise ImportError('torch is blocked in this test')\n"
        "sys.meta_path.insert(0, Block())\n"
        "import mbz.format, mbz.runtime\n"
        "import mbz.format.constants\n"
        "assert 'torch' not in sys.modules\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


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
