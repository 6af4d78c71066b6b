"""Rewrite the golden .mbz files (only when the format changes on purpose, with a version bump).

Run from the repository root: python tests/golden/regenerate.py
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from mbz.format import write_mbz
from tests.format_cases import golden_cases
from tests.test_format_bytes import GOLDEN_METADATA

for name, (tensors, _) in golden_cases().items():
    # Plain JSON metadata (version 1.0): zlib's output may vary between zlib builds.
    path = Path(__file__).parent / f"{name}.mbz"
    size = write_mbz(path, GOLDEN_METADATA, tensors, compress_metadata=False)
    print(f"{name}.mbz: {size} bytes")
