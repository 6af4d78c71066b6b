"""The points of ``mbz sweep`` as Ray tasks (``mbz sweep --ray``).

The driver ships the model file's bytes and the images to Ray's object store once; each worker
process loads the model once and runs ``mbz.sweep.run_point`` into a temporary file, and returns
the record with the file's bytes. The driver writes the file where a local sweep would and yields
the record as soon as its task finishes, so ``mbz.sweep.run_sweep`` appends it at once: an
interrupted Ray sweep resumes like a local one, and both give the same records.
"""

from __future__ import annotations

import hashlib
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from mbz.checkpoint import LoadedModel, load_model
from mbz.errors import MbzError
from mbz.sweep import Job, Runner, SweepData, SweepSettings, open_data, open_model, run_point

_MODELS: dict[str, LoadedModel] = {}  # per worker process: the model of each sweep, by sha256


@dataclass
class Shipment:
    """What every task reads: the model file's bytes and the images."""

    model_bytes: bytes
    trust_pickle: bool
    arch: str | None
    data: SweepData


def _model(shipment: Shipment) -> LoadedModel:
    """The shipped model, loaded once per worker process."""
    sha = hashlib.sha256(shipment.model_bytes).hexdigest()
    if sha not in _MODELS:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / "model.pt"
            path.write_bytes(shipment.model_bytes)
            _MODELS[sha] = load_model(path, shipment.trust_pickle, shipment.arch)
    return _MODELS[sha]


def run_task(shipment: Shipment, job: Job, settings: SweepSettings) -> tuple[dict, bytes]:
    """One point, in a Ray worker: its record and the bytes of its .mbz file."""
    with tempfile.TemporaryDirectory() as folder:
        output = Path(folder) / "run.mbz"
        record = run_point(_model(shipment), shipment.data, job, output, settings)
        return record, output.read_bytes()


def _import_ray():
    try:
        import ray  # optional dependency
    except ImportError:
        raise MbzError("--ray needs the ray package: pip install 'mbz[ray]'") from None
    return ray


def ray_runner(address: str | None = None, num_cpus: int | None = None) -> Runner:
    """A ``Runner`` that runs each job as a Ray task (one CPU each).

    Without ``address`` a local Ray is started in this process (``num_cpus`` CPUs, all by
    default) and stopped at the end; with one, the driver joins that cluster (``auto`` finds a
    running one), whose workers must have mbz installed. A Ray already initialised in this
    process is used as it is.
    """

    def run(jobs: list[Job], settings: SweepSettings) -> Iterator[dict]:
        if not jobs:
            return
        ray = _import_ray()
        started = not ray.is_initialized()
        if started:
            cpus = {} if address else {"num_cpus": num_cpus}
            ray.init(address=address, include_dashboard=False, log_to_driver=False, **cpus)
        try:
            yield from _run_all(ray, jobs, settings)
        finally:
            if started:
                ray.shutdown()

    return run


def _run_all(ray, jobs: list[Job], settings: SweepSettings) -> Iterator[dict]:
    """Submit every job; yield each record once its file is written, in finishing order.
    The driver loads the model too, so that its errors and the image-size check come first."""
    data = open_data(settings, jobs, open_model(settings))
    model_bytes = settings.model.read_bytes()
    shipment = ray.put(Shipment(model_bytes, settings.trust_pickle, settings.arch, data))
    task = ray.remote(num_cpus=1)(run_task)
    pending = {task.remote(shipment, job, settings): job for job in jobs}
    while pending:
        (ready,), _ = ray.wait(list(pending), num_returns=1)
        job = pending.pop(ready)
        record, data = ray.get(ready)
        (settings.out_dir / job.file).write_bytes(data)
        yield record
