"""Training progress on stderr, drawn from the training loop's ``on_step`` callback."""

from __future__ import annotations

from typing import TYPE_CHECKING

import click

from mbz.training import StepReport

if TYPE_CHECKING:
    from click._termui_impl import ProgressBar

REFRESH_STEPS = 10  # steps between refreshes of the bar's text (each one waits for the device)


class EpochBars:
    """An ``on_step`` callback: one click progress bar per epoch, labelled ``epoch E/N``, with
    the running loss, accuracy and images/s. Use it as a context manager, so that a bar left
    open by an error is closed."""

    def __init__(self) -> None:
        self.bar: ProgressBar[str] | None = None
        self.text = ""

    def __enter__(self) -> EpochBars:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def __call__(self, report: StepReport) -> None:
        """Advance the epoch's bar by one step (opening it on the first)."""
        bar = self.bar if self.bar is not None else self._open(report)
        if report.step % REFRESH_STEPS == 0 or report.step == report.steps:
            running = report.running()
            self.text = (
                f"loss {running['loss']:.3f}  acc {100 * running['accuracy']:5.1f}%  "
                f"{running['images_per_s']:,.0f} img/s"
            )
        bar.update(1, self.text)
        if report.step == report.steps:
            self.close()

    def _open(self, report: StepReport) -> ProgressBar[str]:
        self.bar = click.progressbar(
            length=report.steps,
            label=f"epoch {report.epoch}/{report.epochs}",
            file=click.get_text_stream("stderr"),
            item_show_func=lambda text: text,
        )
        return self.bar.__enter__()

    def close(self) -> None:
        """Finish the open bar, if any."""
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar, self.text = None, ""
