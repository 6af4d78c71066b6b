"""``mbz sweep --ray``: the tiny sweep's grid on a local Ray started by the command gives the
same records and files as the local sweep, and resumes the same way."""

from __future__ import annotations

import pytest

from tests.test_sweep import build_tiny_sweep, records, sweep, sweep_args

pytest.importorskip("ray")
pytestmark = pytest.mark.slow
RAY = ("--ray", "--ray-cpus", "2")  # a cheap local Ray: two CPUs, no dashboard
TIMING = ("pack_seconds", "eval_seconds")


@pytest.fixture(scope="session")
def tiny_sweep(tmp_path_factory):
    """The sweep tests' tiny sweep (run once per session, whichever file asks first)."""
    return build_tiny_sweep(tmp_path_factory)


def without_timing(rows: list[dict]) -> dict[str, dict]:
    return {r["key"]: {k: v for k, v in r.items() if k not in TIMING} for r in rows}


def test_ray_sweep_matches_the_local_sweep_and_resumes(tiny_sweep, tmp_path):
    folder = tmp_path / "ray"
    summary = sweep([*sweep_args(tiny_sweep.model, tiny_sweep.data, folder), *RAY])
    assert (summary["ran"], summary["skipped"]) == (5, 0)
    local, remote = records(tiny_sweep.folder), records(folder)
    assert without_timing(remote) == without_timing(local)
    for record in local:
        ours = (folder / record["file"]).read_bytes()
        assert ours == (tiny_sweep.folder / record["file"]).read_bytes(), record["config"]
    assert (folder / "results.csv").read_text().splitlines()[0] == (
        (tiny_sweep.folder / "results.csv").read_text().splitlines()[0]
    )
    # Killed while writing its last record: the rerun on Ray runs that one point again.
    lines = (folder / "results.jsonl").read_text().splitlines()
    (folder / "results.jsonl").write_text("\n".join(lines[:-1]) + "\n" + lines[-1][:40])
    (folder / remote[-1]["file"]).unlink()
    summary = sweep([*sweep_args(tiny_sweep.model, tiny_sweep.data, folder), *RAY])
    assert (summary["ran"], summary["skipped"]) == (1, 4)
    assert without_timing(records(folder)) == without_timing(local)
    assert (folder / remote[-1]["file"]).exists()

