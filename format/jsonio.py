"""Canonical JSON for the metadata section, and its strict parser (SPEC.md section 2)."""

import json
import math

from .constants import MAX_JSON_DEPTH, MAX_METADATA_BYTES
from .errors import MbzFormatError


def canonical_json(obj: object) -> bytes:
    """UTF-8 canonical JSON: sorted keys, no whitespace, no ASCII escaping, NaN refused."""
    text = json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )
    return text.encode("utf-8")


def parse_json(data: bytes | memoryview) -> dict:
    """Parse the metadata section: size cap, UTF-8, an object, no duplicate keys, finite numbers."""
    if len(data) > MAX_METADATA_BYTES:
        raise MbzFormatError(f"metadata is {len(data)} bytes, above the {MAX_METADATA_BYTES} limit")
    try:
        text = bytes(data).decode("utf-8")
    except UnicodeDecodeError as error:
        raise MbzFormatError(f"metadata is not UTF-8 at byte {error.start}") from None
    try:
        obj = json.loads(
            text,
            object_pairs_hook=_unique_object,
            parse_constant=_no_constant,
            parse_float=_finite_float,
        )
    except (ValueError, RecursionError) as error:
        raise MbzFormatError(f"metadata is not valid JSON: {error}") from None
    if not isinstance(obj, dict):
        raise MbzFormatError("metadata is not a JSON object")
    _check_depth(obj)
    return obj


def _unique_object(pairs: list[tuple[str, object]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        raise MbzFormatError(f"metadata has duplicate JSON key {_first_repeat(pairs)!r}")
    return obj


def _first_repeat(pairs: list[tuple[str, object]]) -> str:
    seen: set[str] = set()
    for key, _ in pairs:
        if key in seen:
            return key
        seen.add(key)
    raise ValueError("no key repeats")


def _no_constant(name: str) -> float:
    raise MbzFormatError(f"metadata contains {name}, which JSON does not allow")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise MbzFormatError(f"metadata number {text[:40]} overflows to infinity")
    return value


def _check_depth(obj: dict) -> None:
    """Reject nesting deeper than MAX_JSON_DEPTH (iterative, so no recursion limit is hit)."""
    stack: list[tuple[dict | list, int]] = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_JSON_DEPTH:
            raise MbzFormatError(f"metadata nests deeper than {MAX_JSON_DEPTH} levels")
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
