"""What reading and running a file may cost (SPEC.md section 9), checked before allocating.

``Limits`` holds the bounds a reader and the runtime enforce; the defaults fit any MobileNet-v2
with room to spare, and a caller opens a larger model by passing higher ones explicitly
(``Limits(macs=...)`` or ``Limits.from_overrides({"macs": ...})``), never silently.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, fields, replace

from .constants import (
    DEFAULT_MAX_ACTIVATION_BYTES,
    DEFAULT_MAX_INPUT_ELEMENTS,
    DEFAULT_MAX_MACS,
    DEFAULT_MAX_TOTAL_ELEMENTS,
    MAX_DECODE_RATIO,
)
from .errors import MbzFormatError

FLOAT32_BYTES = 4


@dataclass(frozen=True)
class Limits:
    """Upper bounds on what one file may make a reader allocate or compute.

    ``total_elements``: decoded elements of all tensors together; ``input_elements``: elements
    of one input image; ``activation_bytes``: peak float32 bytes of the values alive at once
    while one image runs (shape inference); ``macs``: multiply-accumulates per image, pooling
    window reads and element-wise operations included."""

    total_elements: int = DEFAULT_MAX_TOTAL_ELEMENTS
    input_elements: int = DEFAULT_MAX_INPUT_ELEMENTS
    activation_bytes: int = DEFAULT_MAX_ACTIVATION_BYTES
    macs: int = DEFAULT_MAX_MACS

    def __post_init__(self) -> None:
        for item in fields(self):
            value = getattr(self, item.name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"limit {item.name} must be a positive integer, got {value!r}")

    @classmethod
    def names(cls) -> tuple[str, ...]:
        """The names of the limits, as ``from_overrides`` takes them."""
        return tuple(item.name for item in fields(cls))

    @classmethod
    def from_overrides(cls, overrides: Mapping[str, int]) -> Limits:
        """The defaults with the named limits replaced (ValueError for an unknown name)."""
        unknown = sorted(set(overrides) - set(cls.names()))
        if unknown:
            raise ValueError(f"unknown limit(s) {unknown}; the limits are {list(cls.names())}")
        return replace(cls(), **overrides)


DEFAULT_LIMITS = Limits()


def raise_hint(name: str) -> str:
    """How a user raises the limit ``name``, for error messages."""
    return f"raise it explicitly with Limits({name}=...) or --raise-limit {name}=N"


def check_decoded_size(counts: Iterable[int], file_size: int, limits: Limits) -> None:
    """Reject a file whose tensors decode to more elements than ``limits`` allow, or to more
    float32 bytes per file byte than the densest encoding can hold (MAX_DECODE_RATIO)."""
    total = sum(counts)
    if total > limits.total_elements:
        raise MbzFormatError(
            f"tensors hold {total} elements in all, above the limit of {limits.total_elements} "
            f"({raise_hint('total_elements')})"
        )
    if FLOAT32_BYTES * total > MAX_DECODE_RATIO * file_size:
        raise MbzFormatError(
            f"tensors decode to {FLOAT32_BYTES * total} bytes from a {file_size}-byte file, "
            f"more than {MAX_DECODE_RATIO} per byte, which no encoding reaches"
        )
