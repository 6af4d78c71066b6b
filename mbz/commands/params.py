"""Click parameter types and shared options for the ``mbz`` commands."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

import click

from mbz.config import parse_bits


class BitsType(click.ParamType):
    """``conv=4,fc=2,dw=8,features.18.*=8`` -> ordered {selector: bits}."""

    name = "BITS"

    def convert(self, value, param, ctx):
        if isinstance(value, dict):
            return value
        try:
            return parse_bits(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


class TripleType(click.ParamType):
    """Three comma-separated floats, such as a per-channel mean."""

    name = "R,G,B"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(float(part) for part in value.split(","))
        except ValueError:
            self.fail(f"'{value}' is not three comma-separated numbers", param, ctx)
        if len(numbers) != 3:
            self.fail(f"'{value}' has {len(numbers)} values; give one per RGB channel", param, ctx)
        return numbers


def data_options(required: bool) -> Callable:
    """``--data``, ``--data-root`` and ``--limit``, shared by the commands that read images."""

    def decorate(command: Callable) -> Callable:
        command = click.option(
            "--limit",
            type=click.IntRange(min=1),
            default=None,
            help="Use only the first N test images.",
        )(command)
        command = click.option(
            "--data-root",
            type=click.Path(file_okay=False),
            default=None,
            help="Folder holding (or to download) torchvision's CIFAR-10 [default: ~/.cache/mbz].",
        )(command)
        return click.option(
            "--data",
            "data_source",
            required=required,
            metavar="SOURCE",
            help="Test images: 'cifar10' (torchvision), an .npz with x_test/y_test, "
            "or a cifar-10-batches-py folder.",
        )(command)

    return decorate


@contextmanager
def progress_bar(total: int, label: str, enabled: bool = True) -> Iterator[Callable[[int], None]]:
    """A click progress bar on stderr; yields a callback taking the number of items done."""
    if not enabled:
        yield lambda n: None
        return
    with click.progressbar(length=total, label=label, file=click.get_text_stream("stderr")) as bar:
        yield bar.update


def import_wandb():
    """The optional wandb package, or a ClickException that says how to install it."""
    try:
        import wandb  # optional dependency
    except ImportError:
        raise click.ClickException(
            "--wandb needs the wandb package: pip install wandb (it logs offline, without a "
            "network, with WANDB_MODE=offline; `wandb sync` uploads later)"
        ) from None
    return wandb
