"""The ``mbz`` command line: thin click commands over library functions."""

import click

from mbz import __version__
from mbz.commands.eval import eval_command
from mbz.commands.export_onnx import export_onnx_command
from mbz.commands.inspect import inspect_command
from mbz.commands.pack import pack_command
from mbz.commands.report import report_command
from mbz.commands.sweep import sweep_command
from mbz.commands.train import train_command
from mbz.errors import MbzError
from mbz.format import MbzFormatError


class MbzGroup(click.Group):
    """Turns the library's user-facing errors into clean messages (no traceback)."""

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


main.add_command(pack_command)
main.add_command(eval_command)
main.add_command(inspect_command)
main.add_command(export_onnx_command)
main.add_command(train_command)
main.add_command(sweep_command)
main.add_command(report_command)
