"""Type checks for values read from a file's JSON metadata, each naming the field it checks.

JSON gives strings, booleans, arbitrary-precision integers (``10**400``) and doubles of any
magnitude; everything that reads metadata beyond the tensor table goes through these before it
computes with a value, so a wrong type or range is an ``MbzFormatError``, never a TypeError or
OverflowError.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from .errors import MbzFormatError

FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)  # the smallest normal float32


def is_int(value: Any) -> bool:
    """Whether a JSON value is an integer (booleans are not)."""
    return isinstance(value, int) and not isinstance(value, bool)


def json_int(value: Any, low: int, high: int, where: str) -> int:
    """``value`` when it is an integer in ``low ..= high``."""
    if not (is_int(value) and low <= value <= high):
        raise MbzFormatError(f"{where} must be an integer in {low}..{high}, got {_show(value)}")
    return value


def json_str(value: Any, where: str) -> str:
    """``value`` when it is a non-empty string of Unicode scalar values (JSON's ``\\ud800``
    escapes can make lone surrogates, which no UTF-8 consumer accepts)."""
    if not isinstance(value, str) or not value or not is_utf8(value):
        raise MbzFormatError(f"{where} must be a non-empty UTF-8 string, got {_show(value)}")
    return value


def is_utf8(text: str) -> bool:
    """Whether ``text`` encodes to UTF-8 (holds no lone surrogate)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def json_float32(value: Any, where: str) -> np.float32:
    """``value`` as float32 when it is a number whose magnitude float32 can hold."""
    if not (isinstance(value, int | float) and not isinstance(value, bool)):
        raise MbzFormatError(f"{where} must be a number, got {_show(value)}")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not (math.isfinite(number) and abs(number) <= FLOAT32_MAX):
        raise MbzFormatError(f"{where} must be a finite float32, got {_show(value)}")
    return np.float32(number)


def json_scale(value: Any, where: str) -> np.float32:
    """``value`` as float32 when it is a positive normal float32 (so ``1 / scale`` is finite)."""
    number = json_float32(value, where)
    if not number >= FLOAT32_TINY:
        raise MbzFormatError(
            f"{where} must be a normal float32 > 0 (at least {FLOAT32_TINY:.9g}), "
            f"got {_show(value)}"
        )
    return number


def _show(value: Any) -> str:
    """A short rendering of a JSON value for a message (huge numbers cut)."""
    text = repr(value) if not is_int(value) or value.bit_length() < 200 else "a huge integer"
    return text if len(text) <= 60 else text[:57] + "..."
