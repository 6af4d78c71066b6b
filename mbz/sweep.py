"""``mbz sweep``: pack and evaluate every combination of a grid of compression settings.

Grid keys are ``PackConfig`` field names; each point is ``dataclasses.replace(base, **point)``
(``base``: the defaults with ``--set`` overrides), validated by the config itself. The model and
the data are loaded once; every point calls ``mbz.pack.pack`` and ``mbz.verify.verify``
directly. A run is keyed by a hash of its settings, the model's bytes and the data; finished
runs are appended to ``results.jsonl`` as they end, and a rerun skips every key already there,
so an interrupted sweep continues where it stopped. ``results.csv`` is regenerated from the
JSON lines (in grid order) after each sweep. Points run here one after the other, or as Ray
tasks (``mbz.ray_sweep``) through the same ``Runner`` interface.
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import itertools
import json
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from mbz.api import float_model_accuracy
from mbz.capture import capture
from mbz.checkpoint import LoadedModel, load_model
from mbz.config import ACT_FLOAT, PackConfig, activation_bits, weight_bits
from mbz.data import Dataset, check_image_shape, load_split
from mbz.errors import MbzError
from mbz.finetune import Tuning, load_training
from mbz.pack import pack
from mbz.runtime import load_program
from mbz.verify import RUNTIMES, verify

RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
# The baseline run: float32 weights and activations, nothing pruned, through the same pipeline
# (and never fine-tuned: it is the model as it was given).
BASELINE_POINT = {"bits": 32, "act_bits": 32, "prune": 0.0}
_FIXED_FIELDS = ("version",)  # PackConfig fields a sweep cannot set


def _value(text: str) -> int | float | bool | str:
    """``8`` -> 8, ``0.36`` -> 0.36, ``true`` -> True, ``kmeans`` -> 'kmeans'."""
    if text.lower() in ("true", "false"):
        return text.lower() == "true"
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def sweep_keys() -> list[str]:
    """The keys a grid or ``--set`` accepts: the PackConfig fields."""
    return [f.name for f in dataclasses.fields(PackConfig) if f.name not in _FIXED_FIELDS]


def parse_grid(text: str) -> dict[str, list]:
    """``"bits=8,4 prune=0,0.36 method=kmeans"`` -> {key: [values]}, in the given order."""
    grid: dict[str, list] = {}
    for item in text.split():
        key, sep, values = item.partition("=")
        if not sep or not values:
            raise MbzError(f"grid item '{item}' is not KEY=V1,V2,... (e.g. bits=8,4)")
        if key in grid:
            raise MbzError(f"grid key '{key}' is given twice")
        grid[key] = [_value(v) for v in values.split(",") if v]
    return check_grid(grid)


def load_grid(spec: str) -> dict[str, list]:
    """A grid from ``spec``: a .json file ({key: value or [values]}) or ``parse_grid`` text.

    YAML is not read (PyYAML is not a dependency of mbz); write the grid as JSON.
    """
    path = Path(spec)
    if path.suffix.lower() in (".yaml", ".yml"):
        raise MbzError(f"{spec}: YAML grids are not supported; write the same grid as .json")
    if path.suffix.lower() != ".json":
        return parse_grid(spec)
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise MbzError(f"{spec}: not valid JSON ({error})") from None
    if not isinstance(data, dict):
        raise MbzError(f'{spec}: expected an object such as {{"bits": [8, 4]}}')
    return check_grid({k: v if isinstance(v, list) else [v] for k, v in data.items()})


def _check_key(key: str, what: str) -> None:
    if key not in sweep_keys():
        raise MbzError(f"unknown {what} key '{key}'; known keys: {', '.join(sweep_keys())}")


def check_grid(grid: dict[str, list]) -> dict[str, list]:
    """Refuse an empty grid, unknown keys and empty value lists."""
    if not grid:
        raise MbzError("the grid is empty; give e.g. --grid 'bits=8,4 prune=0,0.36'")
    for key, values in grid.items():
        _check_key(key, "grid")
        if not values:
            raise MbzError(f"grid key '{key}' has no values")
    return grid


def expand_grid(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, as {key: value} dicts (first key slowest)."""
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]


def parse_settings(items: Iterable[str]) -> dict:
    """``--set`` items (``calib_images=16``, ``bits=conv=4,fc=2``) -> {field: value}."""
    settings: dict = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not value:
            raise MbzError(f"--set '{item}' is not KEY=VALUE (e.g. calib_images=16)")
        _check_key(key, "--set")
        settings[key] = _value(value)
    return settings


def _rules(key: str, value: Any) -> dict[str, int]:
    """A ``bits``/``act_bits`` value: a number for every group (32 activation bits: float), or
    rules as ``mbz pack`` reads them (weight rules overlay the default bits)."""
    if key == "act_bits":
        return {} if value == ACT_FLOAT else activation_bits(value)
    return {"conv": value, "fc": value} if type(value) is int else weight_bits(value)


def _field_value(key: str, value: Any, default: object) -> Any:
    """``value`` as the type of the PackConfig field ``key`` (whose default is ``default``)."""
    if key in ("bits", "act_bits"):
        return _rules(key, value)
    if isinstance(default, tuple):
        parts = value.split(",") if isinstance(value, str) else value
        return tuple(float(part) for part in parts)
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if type(value) is not type(default):
        raise ValueError(f"{key}={value!r}: expected {type(default).__name__}")
    return value


def point_config(base: PackConfig, point: dict) -> PackConfig:
    """``base`` with the grid point's values: ``dataclasses.replace`` validates them."""
    try:
        values = {k: _field_value(k, v, getattr(base, k)) for k, v in point.items()}
        return dataclasses.replace(base, **values)
    except (ValueError, TypeError) as error:
        raise MbzError(f"grid point {point}: {error}") from None


@dataclass
class SweepSettings:
    """What every run of a sweep shares."""

    model: Path
    data: str
    out_dir: Path
    data_root: str | None = None
    limit: int | None = None
    runtime: str = "numpy"  # one of RUNTIMES, or "all"
    peak_images: int = 4  # images the activation peak is measured on
    base: PackConfig = field(default_factory=PackConfig)  # every point starts from it
    trust_pickle: bool = False
    arch: str | None = None  # the network of a bare MobileNet-v2 state_dict (mbz.models.ARCHS)
    tolerance: float = 0.001  # accuracy difference accepted between runtimes (a fraction)
    model_sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.model_sha256 = hashlib.sha256(Path(self.model).read_bytes()).hexdigest()

    @property
    def runtimes(self) -> tuple[str, ...]:
        """The runtimes each run is evaluated with; the first one's accuracy is charted."""
        return RUNTIMES if self.runtime == "all" else (self.runtime,)


@dataclass(frozen=True)
class Job:
    """One run of a sweep: its grid point, the config it resolves to, and its key."""

    key: str
    kind: str  # "baseline" or "run"
    point: dict
    config: PackConfig

    @property
    def file(self) -> str:
        """The run's .mbz file, relative to the sweep folder."""
        return f"runs/{self.key}.mbz"


def run_key(point: dict, config: PackConfig, settings: SweepSettings) -> str:
    """A stable 16-hex-digit key of one run: its point and config, the model's bytes and the
    data."""
    identity = {
        "point": point,
        "config": config.to_dict(),
        "model_sha256": settings.model_sha256,
        "data": settings.data,
        "limit": settings.limit,
        "runtime": settings.runtime,
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def plan(grid: dict[str, list], settings: SweepSettings) -> list[Job]:
    """The baseline and every grid point, each validated, without repeats."""
    points = [(BASELINE_POINT, "baseline")] + [(p, "run") for p in expand_grid(grid)]
    jobs: dict[str, Job] = {}
    for point, kind in points:
        config = point_config(settings.base, point)
        if kind == "baseline":
            config = dataclasses.replace(config, finetune_epochs=0)
        key = run_key(point, config, settings)
        jobs.setdefault(key, Job(key, kind, point, config))
    return list(jobs.values())


@dataclass
class SweepData:
    """The images every run reads, loaded once."""

    test: Dataset  # evaluation images (the first ``limit`` of the test split)
    peak_images: np.ndarray  # the activation peak is measured on these
    train: Dataset | None  # for calibration and fine-tuning; None when no run needs it
    float_accuracy: dict[tuple, dict]  # (mean, std) -> the float model's top-1 on ``test``


def open_data(settings: SweepSettings, jobs: list[Job], model: LoadedModel) -> SweepData:
    """The test split (and the train split when a job calibrates activations or fine-tunes),
    checked to hold images of the size ``model`` takes."""
    test = load_split(settings.data, "test", settings.data_root)
    needs_train = any(_calibrates(job.config) or job.config.finetuning for job in jobs)
    train = load_training(settings.data, settings.data_root) if needs_train else None
    shape = capture(model.module).graph["input_shape"]
    for split in (test, train) if train is not None else (test,):
        check_image_shape(split, shape, str(settings.model))
    limited = test.head(settings.limit) if settings.limit else test
    norms = {(job.config.mean, job.config.std): job.config for job in jobs}
    baselines = {
        norm: float_model_accuracy(model.module, config, limited) for norm, config in norms.items()
    }
    return SweepData(limited, test.images[: settings.peak_images], train, baselines)


def _train(data: SweepData) -> Dataset:
    if data.train is None:  # open_data loads it whenever a job calibrates or fine-tunes
        raise RuntimeError("the sweep loaded no train split")
    return data.train


def _calibrates(config: PackConfig) -> bool:
    """Whether packing ``config`` reads calibration images (as ``mbz pack --data`` does)."""
    return bool(config.act_bits or config.budgeted or config.bias_correction)


def open_model(settings: SweepSettings) -> LoadedModel:
    """The sweep's model, loaded once."""
    return load_model(settings.model, trust_pickle=settings.trust_pickle, arch=settings.arch)


def measure_peak(path: Path, images: np.ndarray) -> int:
    """Peak live activation bytes per image, measured by the numpy runtime on ``images``."""
    program = load_program(path)
    program.predict(images, batch_size=len(images))
    return program.last_peak_bytes_per_image


def run_point(
    model: LoadedModel, data: SweepData, job: Job, output: Path, settings: SweepSettings
) -> dict:
    """Pack ``job``'s config into ``output``, evaluate it; returns its record."""
    config = job.config
    calibration = _train(data).head(config.calib_images) if _calibrates(config) else None
    tuning = Tuning.of(_train(data), config) if config.finetuning else None
    baseline = data.float_accuracy[(config.mean, config.std)]
    packed = pack(model, config, output, data.test, None, calibration, tuning, baseline)
    started = time.perf_counter()
    report = verify(output, data.test, settings.runtimes, settings.tolerance)
    eval_seconds = time.perf_counter() - started
    peak = measure_peak(output, data.peak_images)
    first = report.results[0]
    return {
        "key": job.key,
        "kind": job.kind,
        "config": job.point,
        "file": job.file,
        "file_bytes": packed.file_bytes,
        "fp32_bytes": packed.fp32_bytes,
        "ratio": packed.ratio,
        "accuracy": first.accuracy,
        "accuracy_by_runtime": {r.runtime: r.accuracy for r in report.results},
        "pack_accuracy": (packed.accuracy or {}).get("top1"),
        "images": int(first.predictions.size),
        "data": settings.data,
        "agreement": report.agreements,
        "max_logit_difference": report.to_dict()["max_logit_difference"],
        "eval_ok": not report.failures,
        "eval_failures": report.failures,
        "pack_seconds": packed.seconds,
        "eval_seconds": eval_seconds,
        "act_peak_bytes": peak,
        "act_peak_fp32_bytes": (packed.activation_peak_bytes or {}).get("float32", peak),
        "peak_images": len(data.peak_images),
    }


# Runs jobs and yields each one's record as it finishes, its file written at job.file.
Runner = Callable[[list[Job], SweepSettings], Iterator[dict]]


def run_locally(jobs: list[Job], settings: SweepSettings) -> Iterator[dict]:
    """The ``Runner`` of this process: one job after the other."""
    if not jobs:
        return
    model = open_model(settings)
    data = open_data(settings, jobs, model)
    for job in jobs:
        yield run_point(model, data, job, settings.out_dir / job.file, settings)


def read_records(path: Path) -> list[dict]:
    """The records of a results.jsonl file (or of the one in a sweep folder).

    A last line cut short (a sweep killed while writing) is dropped, and cut from the file so
    that the next record starts on a line of its own.
    """
    path = Path(path)
    if path.is_dir():
        path = path / RESULTS_JSONL
    if not path.exists():
        return []
    text = path.read_text()
    lines = text.splitlines()
    if text and not text.endswith("\n"):
        path.write_text("".join(line + "\n" for line in lines[:-1]))
        lines = lines[:-1]
    try:
        return [json.loads(line) for line in lines if line.strip()]
    except json.JSONDecodeError as error:
        raise MbzError(f"{path}: a line is not JSON ({error}); remove it to continue") from None


def append_record(path: Path, record: dict) -> None:
    """Append one record as a JSON line, flushed to disk before returning."""
    with open(path, "a") as handle:
        handle.write(json.dumps(record) + "\n")
        handle.flush()


CSV_FIELDS = (
    "key", "kind", "file", "file_bytes", "fp32_bytes", "ratio", "accuracy", "pack_accuracy",
    "images", "eval_ok", "pack_seconds", "eval_seconds", "act_peak_bytes", "act_peak_fp32_bytes",
)  # fmt: skip


def flat_row(record: dict) -> dict:
    """One CSV row: the config keys, then the fields of CSV_FIELDS, then one accuracy column
    per runtime (``accuracy_numpy``, ...)."""
    row = dict(record["config"])
    row.update({name: record[name] for name in CSV_FIELDS})
    row.update({f"accuracy_{k}": v for k, v in record["accuracy_by_runtime"].items()})
    return row


def write_csv(path: Path, records: Iterable[dict]) -> None:
    """Write the records as a CSV table (columns: the union of every row's keys, in order)."""
    rows = [flat_row(record) for record in records]
    columns = list(dict.fromkeys(name for row in rows for name in row))
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)


@dataclass
class SweepOutcome:
    """What a sweep did: every record of the folder, and how many runs this call made."""

    records: list[dict]
    ran: int
    skipped: int


def in_grid_order(records: list[dict], jobs: list[Job]) -> list[dict]:
    """``records`` ordered as ``jobs`` (records of other grids in the folder last)."""
    position = {job.key: index for index, job in enumerate(jobs)}
    return sorted(records, key=lambda record: position.get(record["key"], len(jobs)))


def run_sweep(
    grid: dict[str, list],
    settings: SweepSettings,
    progress: Callable[[int], None] = lambda n: None,
    on_record: Callable[[dict], None] = lambda record: None,
    runner: Runner = run_locally,
) -> SweepOutcome:
    """Run the baseline and every grid point not already in ``settings.out_dir``'s results.

    ``progress(n)`` is called as runs finish or are skipped; ``on_record(record)`` after each
    new run is saved. Writes results.jsonl (appended) and results.csv (regenerated).
    """
    jobs = plan(grid, settings)
    (settings.out_dir / "runs").mkdir(parents=True, exist_ok=True)
    jsonl = settings.out_dir / RESULTS_JSONL
    records = read_records(jsonl)
    done = {record["key"] for record in records}
    todo = [job for job in jobs if job.key not in done]
    progress(len(jobs) - len(todo))
    for record in runner(todo, settings):
        append_record(jsonl, record)
        records.append(record)
        on_record(record)
        progress(1)
    records = in_grid_order(records, jobs)
    write_csv(settings.out_dir / RESULTS_CSV, records)
    return SweepOutcome(records, len(todo), len(jobs) - len(todo))
