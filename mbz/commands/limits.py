"""``--raise-limit NAME=VALUE``: what a .mbz file may cost to read and run (SPEC.md section 9).

Shared by the commands that open .mbz files (inspect, eval, export-onnx). Without the option a
file is held to the defaults of ``mbz.format.Limits``; a larger model is opened only when the
user raises a limit by name, never silently.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import click

from mbz.format import Limits

LIMITS_HELP = (
    "Raise a limit on what the file may cost to read and run, NAME=VALUE (repeatable; SPEC.md "
    "section 9): "
    + ", ".join(f"{name} [{getattr(Limits(), name):,}]" for name in Limits.names())
    + ". Files beyond a limit are refused; values accept 1e9 or 2**30."
)


def parse_limits(values: tuple[str, ...]) -> Limits:
    """``("macs=1e10", ...)`` -> Limits (ValueError naming the bad item)."""
    overrides = {}
    for item in values:
        name, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"'{item}' is not NAME=VALUE")
        overrides[name.strip()] = _number(text.strip(), item)
    return Limits.from_overrides(overrides)


def _number(text: str, item: str) -> int:
    """A positive whole number written as digits, ``1e9`` or ``2**30`` (exponent at most 63)."""
    base, power, exponent = text.partition("**")
    try:
        value = int(base) ** min(int(exponent), 63) if power else float(text)
    except ValueError:
        raise ValueError(f"'{item}': {text!r} is not a number") from None
    if not (math.isfinite(value) and value >= 1 and value == int(value)):
        raise ValueError(f"'{item}': a limit is a positive whole number")
    return int(value)


def _convert(ctx: click.Context, param: click.Parameter, value: tuple[str, ...]) -> Limits:
    try:
        return parse_limits(value)
    except ValueError as error:
        raise click.BadParameter(str(error), ctx, param) from None


def limits_option() -> Callable:
    """The ``--raise-limit`` option; the command receives a ``limits`` argument (a Limits)."""
    return click.option(
        "--raise-limit",
        "limits",
        multiple=True,
        metavar="NAME=VALUE",
        callback=_convert,
        help=LIMITS_HELP,
    )
