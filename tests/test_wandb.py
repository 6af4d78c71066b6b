"""W&B logging with the real ``wandb`` package in offline mode: the run files it writes hold
the configs, summaries and the sweep table; without the package, the commands say how to
install it."""

from __future__ import annotations

import json
import struct
import sys
from pathlib import Path

import numpy as np
import pytest

from mbz.charts import parallel_columns
from mbz.tracking import TABLE, log_sweep_table, sweep_run_logger
from tests.helpers import invoke
from tests.test_charts import record as sweep_record

wandb = pytest.importorskip("wandb")
from wandb.proto import wandb_internal_pb2  # noqa: E402  (needs wandb)

_BLOCK, _HEADER = 32768, 7  # the LevelDB log layout of W&B's run-*.wandb files
_WHOLE, _LAST = 1, 4  # record chunk types that end a record


@pytest.fixture(autouse=True)
def offline(monkeypatch, tmp_path):
    """W&B in offline mode, writing under tmp_path (its settings are read again per test)."""
    for name, value in (("WANDB_MODE", "offline"), ("WANDB_DIR", str(tmp_path)),
                        ("WANDB_SILENT", "true"), ("WANDB_CONSOLE", "off")):  # fmt: skip
        monkeypatch.setenv(name, value)
    yield
    wandb.teardown()


def wandb_records(path: Path) -> list:
    """The protobuf records of a run-*.wandb file (a LevelDB-format log after W&B's header)."""
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    records, chunks, pos = [], b"", _HEADER
    while pos + _HEADER <= len(data):
        if _BLOCK - pos % _BLOCK < _HEADER:  # the rest of a block is padding
            pos += _BLOCK - pos % _BLOCK
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + _HEADER])
        chunks += data[pos + _HEADER : pos + _HEADER + length]
        pos += _HEADER + length
        if kind in (_WHOLE, _LAST):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            records.append(record)
            chunks = b""
    return records


def _items(updates) -> dict:
    return {"/".join(u.nested_key) or u.key: json.loads(u.value_json) for u in updates}


def offline_runs(folder: Path) -> dict[str, dict]:
    """Every offline run under ``folder``, by display name: config, summary, history rows,
    group, job type and files folder."""
    runs = {}
    for path in sorted(folder.rglob("offline-run-*/run-*.wandb")):
        found = {"summary": {}, "history": [], "files": path.parent / "files"}
        for record in wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run = record.run
                found.update(config=_items(run.config.update), group=run.run_group,
                              job_type=run.job_type, name=run.display_name)  # fmt: skip
            elif kind == "summary":
                found["summary"].update(_items(record.summary.update))
            elif kind == "history":
                found["history"].append(_items(record.history.item))
        runs[found["name"]] = found
    return runs


def sweep_records() -> list[dict]:
    """Three sweep records: a baseline and two runs."""
    return [
        sweep_record("base", "baseline", {"bits": 32, "act_bits": 32, "prune": 0.0}, 900_000, 0.61),
        sweep_record("a", "run", {"bits": 4, "method": "kmeans"}, 120_000, 0.5),
        sweep_record("b", "run", {"bits": 2, "method": "uniform"}, 70_000, 0.25),
    ]


def test_sweep_runs_and_table_in_the_offline_files(tmp_path):
    records = sweep_records()
    log = sweep_run_logger(wandb, "demo", tmp_path)
    for record in records:
        log(record)
    log_sweep_table(wandb, "demo", tmp_path, records)
    runs = offline_runs(tmp_path)
    assert set(runs) == {"base", "a", "b", "sweep-table"}
    for record in records:
        run = runs[record["key"]]
        assert (run["group"], run["job_type"]) == ("mbz-sweep", record["kind"])
        assert {k: run["config"][k] for k in record["config"]} == record["config"]
        summary = run["summary"]
        assert summary["file_bytes"] == record["file_bytes"]
        assert summary["accuracy"] == summary["accuracy_numpy"] == record["accuracy"]
    (table,) = (runs["sweep-table"]["files"] / "media" / "table").glob(f"{TABLE}_*.table.json")
    logged = json.loads(table.read_text())
    columns = parallel_columns(records)
    assert logged["columns"] == ["weight bits", "method", "size kB", "accuracy %"]
    assert logged["columns"] == list(columns)
    assert logged["data"] == [[4, "kmeans", 120.0, 50.0], [2, "uniform", 70.0, 25.0]]


@pytest.mark.slow
def test_train_logs_every_epoch(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (48, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 3, 48)
    data = tmp_path / "tiny.npz"
    np.savez(data, x_train=images, y_train=labels, x_test=images[:24], y_test=labels[:24])
    invoke(
        "train", "--data", data, "-o", tmp_path / "m.pt", "--wandb", "--wandb-project", "demo",
        "--width", 0.25, "--epochs", 2, "--batch-size", 16, "--warmup-epochs", 0.5,
        "--device", "cpu", "--json",
    )  # fmt: skip
    (run,) = offline_runs(tmp_path).values()
    assert run["config"]["arch"]["width_mult"] == 0.25 and run["config"]["recipe"]["epochs"] == 2
    epochs = [row for row in run["history"] if "val_accuracy" in row]
    assert [row["_step"] for row in epochs] == [1, 2]
    assert {"train_loss", "val_loss", "images_per_s"} <= set(epochs[0])
    assert 0.0 <= run["summary"]["test_accuracy"] <= 1.0 and "test_loss" in run["summary"]


@pytest.mark.parametrize("command", ["train", "sweep"])
def test_without_the_package_the_commands_say_how_to_install_it(command, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "wandb", None)  # `import wandb` raises ImportError
    data, model = tmp_path / "tiny.npz", tmp_path / "m.pt"
    images, labels = np.zeros((6, 32, 32, 3), np.uint8), np.arange(6) % 3
    np.savez(data, x_train=images, y_train=labels, x_test=images, y_test=labels)
    model.write_bytes(b"hashed, not loaded, before the check")
    args = {"train": ("-o", tmp_path / "new.pt"), "sweep": (model, "--grid", "bits=4")}[command]
    result = invoke(command, *args, "--data", data, "--wandb", expect=1)
    assert "pip install" in result.output and "wandb" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "new.pt").exists()
