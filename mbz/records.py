"""Reading dataclass records back from JSON-like dicts (checkpoints, metadata)."""

from __future__ import annotations

from dataclasses import fields

from mbz.errors import MbzError


def check_record(cls: type, data: object, what: str) -> dict:
    """``data`` as keyword arguments for the dataclass ``cls``: MbzError naming ``what`` when it
    is not a dict or has keys the dataclass does not know (an allow-list)."""
    if not isinstance(data, dict):
        raise MbzError(f"{what} must be a dict, got {type(data).__name__}")
    unknown = sorted(set(data) - {f.name for f in fields(cls)})
    if unknown:
        raise MbzError(f"unknown keys in {what}: {', '.join(unknown)}")
    return data
