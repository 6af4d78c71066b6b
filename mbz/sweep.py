"""``mbz sweep``: pack and evaluate every combination of a grid of compression settings.

Each grid point runs the ``mbz pack`` and ``mbz eval`` commands in-process (``--json``), so a
sweep uses exactly what a user would run by hand. A run is keyed by a hash of its settings,
the model's bytes and the data; finished runs are appended to ``results.jsonl`` as they end,
and a rerun skips every key already there, so an interrupted sweep continues where it stopped.
``results.csv`` is regenerated from the JSON lines after each sweep.
"""

from __future__ import annotations

import contextlib
import csv
import hashlib
import io
import itertools
import json
import shlex
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path

import click

from mbz.data import load_split
from mbz.errors import MbzError
from mbz.runtime import load_program

RESULTS_JSONL = "results.jsonl"
RESULTS_CSV = "results.csv"
# The baseline run: float32 weights and activations, nothing pruned, through the same pipeline.
BASELINE_CONFIG = {"bits": 32, "act_bits": 32, "prune": 0.0}


def _bits_flag(value) -> list[str]:
    return ["--bits", f"conv={value},fc={value}"]


def _act_bits_flag(value) -> list[str]:
    return [] if value == 32 else ["--act-bits", str(value)]


# Grid key -> (the `mbz pack` option it needs, the arguments for one value).
GRID_FLAGS: dict[str, tuple[str, Callable[[object], list[str]]]] = {
    "bits": ("--bits", _bits_flag),
    "act_bits": ("--act-bits", _act_bits_flag),
    "prune": ("--prune", lambda v: ["--prune", str(v)]),
    "method": ("--method", lambda v: ["--method", str(v)]),
    "prune_mode": ("--prune-mode", lambda v: ["--prune-mode", str(v)]),
    "finetune_epochs": ("--finetune-epochs", lambda v: ["--finetune-epochs", str(v)]),
    "calib": ("--calib", lambda v: ["--calib", str(v)]),
}


def _value(text: str) -> int | float | str:
    """``8`` -> 8, ``0.36`` -> 0.36, ``kmeans`` -> 'kmeans'."""
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


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


def check_grid(grid: dict[str, list]) -> dict[str, list]:
    """Refuse unknown keys, empty value lists and keys whose `mbz pack` option is missing."""
    from mbz.cli import main

    options = {opt for param in main.commands["pack"].params for opt in param.opts}
    if not grid:
        raise MbzError("the grid is empty; give e.g. --grid 'bits=8,4 prune=0,0.36'")
    for key, values in grid.items():
        if key not in GRID_FLAGS:
            raise MbzError(f"unknown grid key '{key}'; known keys: {', '.join(GRID_FLAGS)}")
        if not values:
            raise MbzError(f"grid key '{key}' has no values")
        flag = GRID_FLAGS[key][0]
        if flag not in options:
            raise MbzError(
                f"grid key '{key}' needs `mbz pack {flag}`, which this version of mbz lacks"
            )
    return grid


def expand_grid(grid: dict[str, list]) -> list[dict]:
    """Every combination of the grid's values, as {key: value} dicts (first key slowest)."""
    return [dict(zip(grid, combo, strict=True)) for combo in itertools.product(*grid.values())]


@dataclass
class SweepSettings:
    """What every run of a sweep shares."""

    model: Path
    data: str
    out_dir: Path
    data_root: str | None = None
    limit: int | None = None
    runtime: str = "numpy"  # `mbz eval --runtime`
    peak_images: int = 4  # images the activation peak is measured on
    pack_args: tuple[str, ...] = ()  # further `mbz pack` options for every run
    model_sha256: str = field(init=False)

    def __post_init__(self) -> None:
        self.model_sha256 = hashlib.sha256(Path(self.model).read_bytes()).hexdigest()

    def data_args(self) -> list[str]:
        """The data options of `mbz pack` and `mbz eval`."""
        args = ["--data", self.data]
        args += ["--data-root", self.data_root] if self.data_root else []
        return args + (["--limit", str(self.limit)] if self.limit else [])


def run_key(config: dict, settings: SweepSettings) -> str:
    """A stable 16-hex-digit key of one run: its config, the model's bytes and the data."""
    identity = {
        "config": config,
        "model_sha256": settings.model_sha256,
        "data": settings.data,
        "limit": settings.limit,
        "runtime": settings.runtime,
        "pack_args": list(settings.pack_args),
    }
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]


def pack_args(config: dict) -> list[str]:
    """The `mbz pack` options of one grid point."""
    return [arg for key, value in config.items() for arg in GRID_FLAGS[key][1](value)]


def invoke_cli(args: list[str]) -> tuple[dict | None, str | None]:
    """Run ``mbz ARGS`` in-process; returns its JSON output (or None) and its error (or None)."""
    from mbz.cli import main

    stdout, error = io.StringIO(), None
    with contextlib.redirect_stdout(stdout):
        try:
            main.main(args=args, prog_name="mbz", standalone_mode=False)
        except click.ClickException as exc:
            error = exc.format_message()
    try:
        return json.loads(stdout.getvalue()), error
    except json.JSONDecodeError:
        return None, error or f"`mbz {shlex.join(args)}` printed no JSON"


def measure_peak(path: Path, images) -> int:
    """Peak live activation bytes per image, measured by the numpy runtime on ``images``."""
    program = load_program(path)
    program.predict(images, batch_size=len(images))
    return program.last_peak_bytes_per_image


def run_point(config: dict, settings: SweepSettings, peak_images, kind: str = "run") -> dict:
    """Pack and evaluate one grid point; returns its record."""
    key = run_key(config, settings)
    output = settings.out_dir / "runs" / f"{key}.mbz"
    output.parent.mkdir(parents=True, exist_ok=True)
    args = ["pack", str(settings.model), "-o", str(output), *pack_args(config)]
    packed, error = invoke_cli([*args, *settings.data_args(), *settings.pack_args, "--json"])
    if error or packed is None:
        raise MbzError(f"run {key} ({config}): mbz pack failed: {error}")
    started = time.perf_counter()
    evaluated, error = invoke_cli(
        ["eval", str(output), *settings.data_args(), "--runtime", settings.runtime, "--json"]
    )
    if evaluated is None:
        raise MbzError(f"run {key} ({config}): mbz eval failed: {error}")
    eval_seconds = time.perf_counter() - started
    by_runtime = {r["runtime"]: r["accuracy"] for r in evaluated["results"]}
    peak = measure_peak(output, peak_images)
    peaks = packed.get("activation_peak_bytes") or {}
    return {
        "key": key,
        "kind": kind,
        "config": config,
        "file": str(output.relative_to(settings.out_dir)),
        "file_bytes": packed["file_bytes"],
        "fp32_bytes": packed["fp32_bytes"],
        "ratio": packed["ratio"],
        "accuracy": evaluated["results"][0]["accuracy"],
        "accuracy_by_runtime": by_runtime,
        "pack_accuracy": (packed.get("accuracy") or {}).get("top1"),
        "images": evaluated["results"][0]["images"],
        "data": settings.data,
        "agreement": evaluated["agreement"],
        "eval_ok": evaluated["ok"],
        "eval_failures": evaluated["failures"],
        "pack_seconds": packed["seconds"],
        "eval_seconds": eval_seconds,
        "act_peak_bytes": peak,
        "act_peak_fp32_bytes": peaks.get("float32", peak),
        "peak_images": len(peak_images),
    }


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


def run_sweep(
    grid: dict[str, list],
    settings: SweepSettings,
    progress: Callable[[int], None] = lambda n: None,
    on_record: Callable[[dict], None] = lambda record: None,
) -> SweepOutcome:
    """Run the baseline and every grid point not already in ``settings.out_dir``'s results.

    ``progress(n)`` is called as runs finish or are skipped; ``on_record(record)`` after each
    new run is saved. Writes results.jsonl (appended) and results.csv (regenerated).
    """
    settings.out_dir.mkdir(parents=True, exist_ok=True)
    jsonl = settings.out_dir / RESULTS_JSONL
    records = read_records(jsonl)
    done = {record["key"] for record in records}
    points = [(BASELINE_CONFIG, "baseline")] + [(c, "run") for c in expand_grid(grid)]
    peak_images = load_split(settings.data, "test", settings.data_root).images[
        : settings.peak_images
    ]
    ran = 0
    for config, kind in points:
        if run_key(config, settings) not in done:
            record = run_point(config, settings, peak_images, kind)
            append_record(jsonl, record)
            records.append(record)
            done.add(record["key"])
            on_record(record)
            ran += 1
        progress(1)
    write_csv(settings.out_dir / RESULTS_CSV, records)
    return SweepOutcome(records, ran, len(points) - ran)


def parse_pack_args(text: str | None) -> tuple[str, ...]:
    """Extra `mbz pack` options given as one shell-quoted string."""
    return tuple(shlex.split(text)) if text else ()
