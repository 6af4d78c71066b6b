"""Click parameter types and shared options for the ``mbz`` commands."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields

import click


class RulesType(click.ParamType):
    """``conv=4,fc=2,features.18.*=8`` -> ordered {selector: bits}, by ``parse`` (which raises
    ValueError with what is accepted)."""

    name = "RULES"

    def __init__(self, parse: Callable[[str], dict[str, int]]) -> None:
        self.parse = parse

    def convert(self, value, param, ctx):
        if isinstance(value, Mapping):
            return dict(value)
        try:
            return self.parse(value)
        except ValueError as error:
            self.fail(str(error), param, ctx)


class FractionOrWord(click.ParamType):
    """A fraction in [0, 1), or the word ``word`` (such as ``--prune auto``)."""

    def __init__(self, word: str) -> None:
        self.word = word
        self.name = f"FRACTION|{word}"

    def convert(self, value, param, ctx):
        if value == self.word:
            return value
        try:
            fraction = float(value)
        except ValueError:
            self.fail(f"'{value}' is neither a number nor '{self.word}'", param, ctx)
        if not 0.0 <= fraction < 1.0:
            self.fail(f"{fraction} is not in [0, 1)", param, ctx)
        return fraction


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


@dataclass(frozen=True)
class Flag:
    """How one field of a dataclass becomes a command-line option (``--field-name``)."""

    help: str
    type: click.ParamType | type | None = None
    off: str | None = None  # the negative form of a bool flag [default: --no-<name>]
    aliases: tuple[str, ...] = ()  # other names of the option
    metavar: str | None = None


def field_options(cls: type, flags: dict[str, Flag], internal: tuple[str, ...] = ()) -> Callable:
    """One option per field of the dataclass ``cls``, its default the field's (shown), passed
    to the command under the field's name; ``internal`` fields get no option. A field in
    neither ``flags`` nor ``internal`` is an error, so that a new field cannot be forgotten."""
    forgotten = [f.name for f in fields(cls) if f.name not in flags and f.name not in internal]
    if forgotten:
        raise TypeError(f"{cls.__name__} fields without a flag: {', '.join(forgotten)}")
    defaults = cls()

    def decorate(command: Callable) -> Callable:
        for item in reversed([f for f in fields(cls) if f.name in flags]):
            flag, name = flags[item.name], "--" + item.name.replace("_", "-")
            default = _shown(getattr(defaults, item.name))
            declarations = [name, *flag.aliases]
            if isinstance(default, bool):
                declarations = [f"{name}/{flag.off or '--no-' + name[2:]}"]
            command = click.option(
                *declarations,
                item.name,
                type=flag.type,
                default=default,
                show_default=default is not None,
                metavar=flag.metavar,
                help=flag.help,
            )(command)
        return command

    return decorate


def _shown(value: object) -> object:
    """A field's default as its option's default: rules as ``k=v,...`` (None when empty),
    tuples as comma-separated text."""
    if isinstance(value, dict):
        return ",".join(f"{key}={bits}" for key, bits in value.items()) or None
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return value


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
            "--wandb needs the wandb package: pip install 'mbz[wandb]' (it logs offline, without a "
            "network, with WANDB_MODE=offline; `wandb sync` uploads later)"
        ) from None
    return wandb
