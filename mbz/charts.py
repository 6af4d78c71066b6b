"""Charts: ``mbz train``'s curves and confusion matrix, and ``mbz sweep``'s parallel
coordinates, accuracy vs size with the Pareto front, and accuracy vs pruning.

Static charts are matplotlib figures (``Figure`` objects, no pyplot state; PNG through Agg, and
SVG); the sweep's page holds plotly's interactive parallel coordinates with plotly.js inline,
the SVG charts and a table of every run, and reads nothing from the network.
"""

from __future__ import annotations

import html
import io
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import cast

import numpy as np
import plotly.graph_objects as go
from matplotlib import colormaps
from matplotlib.cm import ScalarMappable
from matplotlib.colors import Normalize
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

COLORMAP = "viridis"  # parallel coordinates: lines coloured by accuracy, dark = lowest
FRONT_COLOR = "tab:red"
AXIS_NAMES = {"bits": "weight bits", "act_bits": "act bits", "prune": "pruned"}
ACCURACY, SIZE = "accuracy %", "size kB"
PARALLEL_TITLE = "Sweep: settings -> size, accuracy"


def save(figure: Figure, path: Path, formats: Sequence[str] = ("png",)) -> list[Path]:
    """Write ``figure`` as ``path`` with each suffix of ``formats``; the paths written."""
    paths = [Path(path).with_suffix(f".{kind}") for kind in formats]
    for target in paths:
        figure.savefig(target, format=target.suffix[1:], dpi=100)
    return paths


def line_chart(
    series: dict[str, tuple[Sequence[float], Sequence[float | None]]],
    title: str,
    xlabel: str,
    ylabel: str,
) -> Figure:
    """A line chart of ``series`` ({name: (xs, ys)}) with a legend; None values are gaps."""
    figure = Figure(figsize=(7.2, 4.4), layout="constrained")
    axes = figure.add_subplot()
    for name, (xs, ys) in series.items():
        values = np.array([np.nan if y is None else y for y in ys], dtype=float)
        axes.plot(xs, values, marker="o", markersize=4, label=name)
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    # the default locator is an AutoLocator, a MaxNLocator (whose set_params takes ``integer``)
    cast(MaxNLocator, axes.xaxis.get_major_locator()).set_params(integer=True)
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


def confusion_matrix_chart(matrix: np.ndarray, class_names: Sequence[str], title: str) -> Figure:
    """A confusion matrix (rows: true class, columns: predicted class): each cell shows its
    count, shaded by its share of the row."""
    matrix = np.asarray(matrix)
    n = len(class_names)
    if matrix.shape != (n, n):
        raise ValueError(f"a confusion matrix of {n} classes is {n}x{n}, got {matrix.shape}")
    shares = matrix / np.maximum(matrix.sum(axis=1, keepdims=True), 1)
    figure = Figure(figsize=(1.5 + 0.5 * n, 1.2 + 0.5 * n), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(shares, cmap="Blues", vmin=0.0, vmax=1.0)
    for (row, col), count in np.ndenumerate(matrix):
        color = "white" if shares[row, col] > 0.5 else "black"
        axes.text(col, row, str(int(count)), ha="center", va="center", color=color, fontsize=8)
    axes.set_xticks(range(n), class_names, rotation=90)
    axes.set_yticks(range(n), class_names)
    axes.set(title=title, xlabel="predicted class", ylabel="true class")
    figure.colorbar(image, ax=axes, label="share of the true class")
    return figure


def pareto_front(sizes: Sequence[float], accuracies: Sequence[float]) -> list[int]:
    """Indices of the points no other point beats (smaller or equal size and higher or equal
    accuracy, better in one), ordered by size."""
    order = sorted(range(len(sizes)), key=lambda i: (sizes[i], -accuracies[i]))
    front, best = [], -np.inf
    for index in order:
        if accuracies[index] > best:
            front.append(index)
            best = accuracies[index]
    return front


def _runs(records: list[dict]) -> list[dict]:
    return [r for r in records if r["kind"] == "run"]


def parallel_columns(records: list[dict]) -> dict[str, list]:
    """The parallel-coordinates table of a sweep's runs: one column per grid key, then the
    file size (kB) and the accuracy (%); one row per run."""
    runs = _runs(records)
    keys = list(dict.fromkeys(k for r in runs for k in r["config"]))
    columns = {AXIS_NAMES.get(k, k): [r["config"].get(k, "-") for r in runs] for k in keys}
    columns[SIZE] = [r["file_bytes"] / 1000 for r in runs]
    columns[ACCURACY] = [100 * r["accuracy"] for r in runs]
    return columns


def axis_positions(values: list, most_ticks: int = 6) -> tuple[list[float], list[float], list[str]]:
    """Numbers for one parallel axis: each value's position, and the tick positions and labels.

    Numbers stay themselves (a tick per distinct value, or 5 evenly spaced ticks when there are
    more than ``most_ticks``); anything else (a method name) gets its index in sorted order.
    """
    if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in values):
        names = sorted({str(v) for v in values})
        return [float(names.index(str(v))) for v in values], [*map(float, range(len(names)))], names
    ticks = sorted({float(v) for v in values})
    if len(ticks) > most_ticks:
        ticks = np.linspace(ticks[0], ticks[-1], 5).tolist()
    return [float(v) for v in values], ticks, [f"{t:.3g}" for t in ticks]


def _unit(values: Sequence[float], ticks: Sequence[float]) -> np.ndarray:
    """``values`` mapped onto [0, 1] by the axis range (the middle when it is one value)."""
    low, high = min(ticks), max(ticks)
    return (np.asarray(values) - low) / (high - low) if high > low else np.full(len(values), 0.5)


def parallel_chart(columns: dict[str, list], title: str) -> Figure:
    """Static parallel coordinates: one vertical axis per column, one line per run coloured
    by accuracy (the last column), as W&B's chart."""
    placed = [axis_positions(values) for values in columns.values()]
    lines = np.array([_unit(values, ticks) for values, ticks, _ in placed]).T  # [runs, axes]
    accuracy = columns[ACCURACY]
    norm, cmap = Normalize(min(accuracy), max(accuracy)), colormaps[COLORMAP]
    figure = Figure(figsize=(9, 4.6), layout="constrained")
    axes = figure.add_subplot()
    for line, acc in zip(lines, accuracy, strict=True):
        axes.plot(range(len(columns)), line, color=cmap(norm(acc)), lw=1.5)
    axes.vlines(range(len(columns)), 0, 1, color="black", lw=1)
    for x, (_, ticks, labels) in enumerate(placed):
        for at, label in zip(_unit(ticks, ticks), labels, strict=True):
            axes.text(x + 0.03, at, label, fontsize=8, va="center", color="dimgray",
                      bbox={"fc": "white", "ec": "none", "pad": 0.5})  # fmt: skip
    axes.set_xticks(range(len(columns)), list(columns))
    axes.set_yticks([])
    axes.set_xlim(-0.1, len(columns) - 0.6)
    axes.set_title(title)
    figure.colorbar(ScalarMappable(norm, cmap), ax=axes, label=ACCURACY)
    return figure


def scatter_chart(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    title: str,
    xlabel: str,
    ylabel: str,
    front: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Figure:
    """A scatter plot of ``series`` ({name: (xs, ys)}), and ``front`` (xs, ys) as a line
    through larger marks when given."""
    figure = Figure(figsize=(7.2, 4.4), layout="constrained")
    axes = figure.add_subplot()
    for name, (xs, ys) in series.items():
        axes.scatter(xs, ys, s=25, label=name)
    if front is not None:
        axes.plot(*front, color=FRONT_COLOR, marker="o", markersize=8, label="Pareto front")
    axes.set(title=title, xlabel=xlabel, ylabel=ylabel)
    axes.grid(alpha=0.3)
    axes.legend()
    return figure


def sweep_figures(records: list[dict]) -> dict[str, Figure]:
    """The static charts of a sweep: parallel coordinates, accuracy vs file size with the
    Pareto front, and accuracy vs pruned fraction by weight bits."""
    runs = _runs(records)
    columns = parallel_columns(records)
    sizes, accuracy = columns[SIZE], columns[ACCURACY]
    front = pareto_front(sizes, accuracy)
    by_bits: dict[str, tuple[list, list]] = {}
    for run, acc in zip(runs, accuracy, strict=True):
        xs, ys = by_bits.setdefault(f"{run['config'].get('bits', '?')}-bit", ([], []))
        xs.append(run["config"].get("prune", 0.0))
        ys.append(acc)
    return {
        "parallel": parallel_chart(columns, PARALLEL_TITLE),
        "pareto": scatter_chart(
            {"runs": (sizes, accuracy)},
            "Accuracy vs file size",
            ".mbz file size (kB)",
            "top-1 accuracy (%)",
            front=([sizes[i] for i in front], [accuracy[i] for i in front]),
        ),
        "sparsity": scatter_chart(
            by_bits, "Accuracy vs pruning", "pruned fraction", "top-1 accuracy (%)"
        ),
    }


def parallel_plotly(columns: dict[str, list], title: str) -> go.Figure:
    """Interactive parallel coordinates (plotly ``parcoords``): one line per run."""
    dimensions = []
    for label, values in columns.items():
        positions, ticks, names = axis_positions(values)
        dimensions.append({"label": label, "values": positions, "tickvals": ticks,
                           "ticktext": names})  # fmt: skip
    trace = go.Parcoords(
        line={"color": columns[ACCURACY], "colorscale": COLORMAP.capitalize(), "showscale": True,
              "colorbar": {"title": {"text": ACCURACY}}},
        dimensions=dimensions,
    )  # fmt: skip
    return go.Figure(trace, layout={"title": {"text": title}, "height": 480})


def svg_text(figure: Figure) -> str:
    """``figure`` as one inline ``<svg>`` element (no XML prolog, text drawn as paths)."""
    buffer = io.StringIO()
    figure.savefig(buffer, format="svg")
    text = buffer.getvalue()
    return text[text.index("<svg") :]


_CSS = (
    "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#eee}"
    "tr.front td{font-weight:bold}figure{margin:1em 0}"
)


def runs_table(records: list[dict]) -> str:
    """An HTML table of every run by file size, Pareto-front runs in bold."""
    runs = sorted(_runs(records), key=lambda r: r["file_bytes"])
    front = {
        runs[i]["key"]
        for i in pareto_front([r["file_bytes"] for r in runs], [r["accuracy"] for r in runs])
    }
    keys = list(dict.fromkeys(k for r in runs for k in r["config"]))
    head = "".join(f"<th>{html.escape(k)}</th>" for k in keys) + (
        "<th>file bytes</th><th>ratio to FP32</th><th>accuracy %</th>"
        "<th>activation peak bytes/image</th><th>pack s</th>"
    )
    rows = []
    for r in runs:
        cells = [str(r["config"].get(k, "-")) for k in keys] + [
            f"{r['file_bytes']:,}",
            f"{r['ratio']:.2f}x",
            f"{100 * r['accuracy']:.2f}",
            f"{r['act_peak_bytes']:,}",
            f"{r['pack_seconds']:.1f}",
        ]
        css = ' class="front"' if r["key"] in front else ""
        rows.append(f"<tr{css}>" + "".join(f"<td>{html.escape(c)}</td>" for c in cells) + "</tr>")
    return (
        f"<h2>Runs ({len(runs)}; Pareto front in bold)</h2><table><tr>{head}</tr>"
        + "".join(rows)
        + "</table>"
    )


def html_page(title: str, records: list[dict], figures: dict[str, Figure]) -> str:
    """One self-contained HTML page: the interactive parallel coordinates (plotly.js inline),
    the other charts as inline SVG, and the table of runs. It works offline."""
    interactive = parallel_plotly(parallel_columns(records), PARALLEL_TITLE)
    plot = interactive.to_html(
        full_html=False, include_plotlyjs=True, div_id="parallel", config={"displaylogo": False}
    )
    svgs = "".join(
        f"<figure>{svg_text(figure)}</figure>" for name, figure in figures.items()
        if name != "parallel"
    )  # fmt: skip
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>"
        f"<figure>{plot}</figure>{svgs}{runs_table(records)}</body></html>\n"
    )


def write_charts(out_dir: Path, records: list[dict], title: str) -> list[Path]:
    """Write parallel, pareto and sparsity as .png and .svg, and sweep.html, in ``out_dir``."""
    figures = sweep_figures(records)
    paths = [p for name, fig in figures.items() for p in save(fig, out_dir / name, ("png", "svg"))]
    page = out_dir / "sweep.html"
    page.write_text(html_page(title, records, figures))
    return [*paths, page]
