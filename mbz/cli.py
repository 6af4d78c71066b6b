"""The ``mbz`` command line: thin click commands over library functions."""

import importlib

import click

from mbz import __version__
from mbz.errors import MbzError
from mbz.format import MbzFormatError

# Each command's module and object, imported when the command runs (or --help lists it), so
# that `mbz inspect`, `mbz eval --runtime numpy|onnx` and `mbz export-onnx` never load torch.
COMMANDS = {
    "pack": ("mbz.commands.pack", "pack_command"),
    "eval": ("mbz.commands.eval", "eval_command"),
    "inspect": ("mbz.commands.inspect", "inspect_command"),
    "export-onnx": ("mbz.commands.export_onnx", "export_onnx_command"),
    "train": ("mbz.commands.train", "train_command"),
    "sweep": ("mbz.commands.sweep", "sweep_command"),
    "report": ("mbz.commands.report", "report_command"),
}


class MbzGroup(click.Group):
    """Turns the library's user-facing errors into clean messages (no traceback); imports a
    command's module only when that command is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name]
        return getattr(importlib.import_module(module), attribute)

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except MbzError as error:
            raise click.ClickException(str(error)) from error
        except MbzFormatError as error:
            raise click.ClickException(f"not a valid .mbz file: {error}") from error
        except OSError as error:
            raise click.ClickException(f"{error.strerror or error}: {error.filename}") from error


@click.group(cls=MbzGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mbz")
def main() -> None:
    """Compress a MobileNet-v2 into a .mbz file and prove its accuracy without PyTorch.

    \b
      mbz pack    model.pt --prune 0.36 --bits conv=4,fc=2 -o model.mbz
      mbz eval    model.mbz --data cifar10 --runtime all
      mbz inspect model.mbz
    """
