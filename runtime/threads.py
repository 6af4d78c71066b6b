"""Set the thread count of numpy's BLAS for a block of code (ctypes only, no threadpoolctl).

Multi-threaded OpenBLAS is far slower than one thread on the many small matrix products of a
batched MobileNet, so ``Program.predict`` runs under ``blas_threads(1)`` by default.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy  # noqa: F401  (loads the BLAS library this module looks for)

LIBRARY_MARKERS = ("openblas", "mkl_rt", "blis")
# (setter, getter) symbol pairs, first match wins per library.
SYMBOLS = (
    ("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
    ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
    ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
    ("openblas_set_num_threads", "openblas_get_num_threads"),
    ("MKL_Set_Num_Threads", "MKL_Get_Max_Threads"),
    ("bli_thread_set_num_threads", "bli_thread_get_num_threads"),
)


@dataclass(frozen=True)
class ThreadControl:
    """The thread-count setter and getter of one loaded BLAS library."""

    set: Callable[[int], None]
    get: Callable[[], int]


@contextmanager
def blas_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` BLAS threads, then restore the previous count.

    Does nothing where no known BLAS library is loaded (or /proc/self/maps is unavailable).
    """
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"thread count must be a positive integer, got {n!r}")
    controls = blas_controls()
    previous = [control.get() for control in controls]
    for control in controls:
        control.set(n)
    try:
        yield
    finally:
        for control, count in zip(controls, previous, strict=True):
            control.set(count)


@functools.cache
def blas_controls() -> tuple[ThreadControl, ...]:
    """One control per BLAS library loaded in this process (found once, then cached)."""
    controls = []
    for path in _loaded_blas_paths():
        try:
            library = ctypes.CDLL(path)
        except OSError:
            continue
        control = _control(library)
        if control is not None:
            controls.append(control)
    return tuple(controls)


def _loaded_blas_paths() -> list[str]:
    try:
        lines = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    paths = {line.split(maxsplit=5)[-1] for line in lines if len(line.split(maxsplit=5)) == 6}
    return sorted(p for p in paths if any(m in Path(p).name.lower() for m in LIBRARY_MARKERS))


def _control(library: ctypes.CDLL) -> ThreadControl | None:
    for set_name, get_name in SYMBOLS:
        setter = getattr(library, set_name, None)
        getter = getattr(library, get_name, None)
        if setter is not None and getter is not None:
            setter.argtypes, setter.restype = [ctypes.c_int], None
            getter.argtypes, getter.restype = [], ctypes.c_int
            return ThreadControl(setter, getter)
    return None
