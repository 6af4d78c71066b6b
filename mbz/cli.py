"""The ``mbz`` command line: thin click commands over library functions."""

import click

from mbz import __version__


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="mbz")
def main() -> None:
    """Compress a MobileNet-v2 into a .mbz file and prove its accuracy without PyTorch."""
