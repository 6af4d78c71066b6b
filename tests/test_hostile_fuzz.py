"""The structure-aware fuzzer of examples/fuzz.py, for a fixed seed: every mutated file is
accepted or refused with MbzFormatError by every reader, never anything else."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

from mbz.format import Encoding, decode_mbz

FUZZ_SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "fuzz.py"


@pytest.fixture(scope="module")
def fuzz():
    """examples/fuzz.py as a module."""
    spec = importlib.util.spec_from_file_location("mbz_examples_fuzz", FUZZ_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    del sys.modules[spec.name]


def test_seeds_cover_every_encoding_and_quantized_activations(fuzz):
    seeds = fuzz.corpus(0)
    tensors = [decode_mbz(fuzz.rebuild(s.metadata.encode(), s.bodies, s.compressed)) for s in seeds]
    descriptors = [d for mbz in tensors for d in mbz.descriptors.values()]
    assert {d.encoding.name for d in descriptors} == {e.name for e in Encoding}
    assert {d.sparsity.name for d in descriptors} == {"NONE", "BITMAP", "CSR"}
    assert {d.entropy.name for d in descriptors if d.entropy is not None} == {"FIXED", "HUFFMAN"}
    assert any(d.axis == 0 for d in descriptors) and any(s.compressed for s in seeds)
    ops = {n["op"] for mbz in tensors for n in mbz.metadata["graph"]["nodes"]}
    assert "quantize" in ops and {"avgpool2d", "maxpool2d", "batchnorm", "add"} <= ops


def test_mutated_files_are_refused_by_every_reader(fuzz, tmp_path: Path):
    """One fixed mutation per class, each refused (CRCs are fixed, so the readers see it)."""
    seed = fuzz.corpus(0)[0]
    for name, mutation in fuzz.MUTATIONS.items():
        if name in ("bytes", "sections"):
            continue  # these may leave a valid file
        outcomes = set()
        for case in range(20):
            meta, bodies = fuzz.json.loads(seed.metadata), list(seed.bodies)
            mutation(meta, bodies, fuzz.random.Random(case))
            outcomes.add(fuzz.run_case(fuzz.rebuild(meta, bodies, seed.compressed), tmp_path))
        assert "refused" in outcomes, name


def test_fixed_seed_fuzzing_finds_nothing(fuzz, tmp_path: Path):
    summary = fuzz.fuzz(2400, seed=0, out=tmp_path, trace=False)
    assert not summary.crashes, summary.crashes[:3]
    outcomes = summary.to_dict()["outcomes"]
    assert set(outcomes) == set(fuzz.MUTATIONS)
    assert all(counts.get("refused", 0) > 0 for counts in outcomes.values())
    assert sum(counts.get("accepted", 0) for counts in outcomes.values()) > 50
    assert summary.max_seconds < 5


def test_run_case_lets_other_errors_through(fuzz, tmp_path: Path):
    """What the fuzzer counts as a crash does reach it."""
    with pytest.raises(TypeError):
        fuzz.run_case(None, tmp_path)
    assert fuzz.run_case(b"not a file", tmp_path) == "refused"
