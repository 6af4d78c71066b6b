"""The charts of ``mbz sweep``: one drawing, rendered both as a PNG (through ``mbz.plot``'s
raster canvas) and as inline SVG for the offline HTML report.

``Drawing`` records the calls ``mbz.plot.Axes`` makes on a canvas, so the axes, ticks and
legends of ``mbz.plot`` draw into it unchanged; ``to_canvas`` replays them on a raster and
``to_svg`` writes them as SVG elements.
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from mbz.plot import (
    BLACK,
    GREY,
    LINE_CHART_SIZE,
    PALETTE,
    WHITE,
    Canvas,
    Color,
    data_axes,
    nice_ticks,
    tick_label,
)

FRONT_COLOR: Color = PALETTE[3]
# Colour scale of the parallel-coordinates lines, low accuracy to high (viridis end points).
SCALE_STOPS = np.array([(68, 1, 84), (33, 145, 140), (253, 231, 37)], dtype=float)
AXIS_NAMES = {"bits": "weight bits", "act_bits": "act bits", "prune": "pruned"}
_FONT_PX = 10  # SVG font size of the 7-pixel bitmap font at scale 1
_BASELINE = {"top": "hanging", "middle": "middle", "bottom": "alphabetic"}
_ANCHOR = {"left": "start", "center": "middle", "right": "end"}


class Drawing:
    """A recording canvas with the drawing methods of ``mbz.plot.Canvas``."""

    def __init__(self, width: int, height: int) -> None:
        self.width, self.height = width, height
        self.items: list[tuple[str, tuple, dict]] = []

    def fill_rect(self, left: float, top: float, right: float, bottom: float, color: Color):
        """A filled rectangle."""
        self.items.append(("fill_rect", (left, top, right, bottom, color), {}))

    def line(self, x0: float, y0: float, x1: float, y1: float, color: Color, width: int = 1):
        """A straight line."""
        self.items.append(("line", (x0, y0, x1, y1, color, width), {}))

    def polyline(self, xs: Sequence[float], ys: Sequence[float], color: Color, width: int = 1):
        """Straight segments joining consecutive points."""
        self.items.append(("polyline", (list(xs), list(ys), color, width), {}))

    def points(self, xs, ys, color: Color, size: int = 1, titles: Sequence[str] = ()) -> None:
        """Squares of ``size`` pixels centred on each point; ``titles`` become SVG tooltips."""
        self.items.append(("points", (list(xs), list(ys), color, size), {"titles": titles}))

    def text(self, x: float, y: float, text: str, color: Color = BLACK, **style) -> None:
        """Text anchored as in ``Canvas.text`` (scale, align, valign, vertical)."""
        self.items.append(("text", (x, y, text, color), style))

    def to_canvas(self) -> Canvas:
        """The drawing as a raster."""
        canvas = Canvas(self.width, self.height)
        for method, args, kwargs in self.items:
            if method == "points":
                kwargs = {}
            getattr(canvas, method)(*args, **kwargs)
        return canvas

    def save_png(self, path: str | Path) -> None:
        """Write the drawing as a PNG file."""
        self.to_canvas().save(path)

    def to_svg(self) -> str:
        """The drawing as one ``<svg>`` element (no external references)."""
        body = [_SVG[method](*args, **kwargs) for method, args, kwargs in self.items]
        return (
            f'<svg width="{self.width}" '
            f'height="{self.height}" viewBox="0 0 {self.width} {self.height}" '
            f'font-family="monospace"><rect width="100%" height="100%" fill="white"/>'
            + "".join(body)
            + "</svg>"
        )


def _rgb(color: Color) -> str:
    return "#{:02x}{:02x}{:02x}".format(*color)


def _svg_rect(left, top, right, bottom, color) -> str:
    return (
        f'<rect x="{left:.1f}" y="{top:.1f}" width="{right - left:.1f}" '
        f'height="{bottom - top:.1f}" fill="{_rgb(color)}"/>'
    )


def _svg_line(x0, y0, x1, y1, color, width) -> str:
    return (
        f'<line x1="{x0:.1f}" y1="{y0:.1f}" x2="{x1:.1f}" y2="{y1:.1f}" '
        f'stroke="{_rgb(color)}" stroke-width="{width}"/>'
    )


def _svg_polyline(xs, ys, color, width) -> str:
    points = " ".join(f"{x:.1f},{y:.1f}" for x, y in zip(xs, ys, strict=True))
    return (
        f'<polyline points="{points}" fill="none" stroke="{_rgb(color)}" '
        f'stroke-width="{width}" stroke-opacity="0.8"/>'
    )


def _svg_points(xs, ys, color, size, titles=()) -> str:
    size = max(size, 3)
    marks = []
    for index, (x, y) in enumerate(zip(xs, ys, strict=True)):
        tip = f"<title>{html.escape(titles[index])}</title>" if index < len(titles) else ""
        marks.append(
            f'<rect x="{x - size / 2:.1f}" y="{y - size / 2:.1f}" width="{size}" '
            f'height="{size}" fill="{_rgb(color)}">{tip}</rect>'
        )
    return "".join(marks)


def _svg_text(x, y, text, color, scale=1, align="left", valign="top", vertical=False) -> str:
    rotate = f' transform="rotate(-90 {x:.1f} {y:.1f})"' if vertical else ""
    anchor = "middle" if vertical else _ANCHOR[align]
    baseline = "middle" if vertical else _BASELINE[valign]
    return (
        f'<text x="{x:.1f}" y="{y:.1f}" font-size="{_FONT_PX * scale}" fill="{_rgb(color)}" '
        f'text-anchor="{anchor}" dominant-baseline="{baseline}"{rotate}>'
        f"{html.escape(text)}</text>"
    )


_SVG = {
    "fill_rect": _svg_rect,
    "line": _svg_line,
    "polyline": _svg_polyline,
    "points": _svg_points,
    "text": _svg_text,
}


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


def scatter_chart(
    series: dict[str, tuple[Sequence[float], Sequence[float], Sequence[str]]],
    title: str,
    xlabel: str,
    ylabel: str,
    front: tuple[Sequence[float], Sequence[float]] | None = None,
) -> Drawing:
    """A scatter plot of ``series`` ({name: (xs, ys, tooltips)}) with a legend, and ``front``
    (xs, ys) drawn as a line through larger marks when given."""
    drawing = Drawing(*LINE_CHART_SIZE)
    arrays = [(np.asarray(xs, float), np.asarray(ys, float)) for xs, ys, _ in series.values()]
    axes, xticks, yticks = data_axes(drawing, arrays)
    axes.grid_and_ticks(xticks, yticks)
    axes.labels(title, xlabel, ylabel)
    legend = []
    colors = PALETTE * (1 + len(series) // len(PALETTE))
    for (name, (_, _, tips)), (xs, ys), color in zip(series.items(), arrays, colors, strict=False):
        px, py = axes.to_pixel(xs, ys)
        drawing.points(px, py, color, size=5, titles=list(tips))
        legend.append((name, color))
    if front is not None:
        px, py = axes.to_pixel(*front)
        drawing.polyline(px, py, FRONT_COLOR, width=2)
        drawing.points(px, py, FRONT_COLOR, size=9)
        legend.append(("Pareto front", FRONT_COLOR))
    if legend:
        axes.legend(legend)
    return drawing


def scale_color(fraction: float) -> Color:
    """The colour of ``fraction`` (0 to 1) on the parallel-coordinates scale."""
    position = min(max(fraction, 0.0), 1.0) * (len(SCALE_STOPS) - 1)
    low = min(int(position), len(SCALE_STOPS) - 2)
    mix = SCALE_STOPS[low] + (SCALE_STOPS[low + 1] - SCALE_STOPS[low]) * (position - low)
    return tuple(round(v) for v in mix)


def _axis_positions(values: list, discrete: bool) -> tuple[list[float], list[tuple[float, str]]]:
    """Each value's position in [0, 1] on its axis, and the (position, label) ticks.

    A ``discrete`` column (a grid setting) gets one tick per distinct value, numbers spaced by
    value and anything else evenly in sorted order; a measured column spans round ticks.
    """
    numeric = all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)
    if numeric and not discrete:
        ticks = nice_ticks(min(values), max(values), count=4)
        low, span = float(ticks[0]), float(ticks[-1] - ticks[0])
        return [(v - low) / span for v in values], [
            ((t - low) / span, tick_label(t)) for t in ticks
        ]
    distinct = sorted(set(values), key=lambda v: (not numeric, v if numeric else str(v)))
    if numeric and len(distinct) > 1:
        low, span = float(distinct[0]), float(distinct[-1] - distinct[0])
        where = {v: (float(v) - low) / span for v in distinct}
    elif len(distinct) == 1:
        where = {distinct[0]: 0.5}
    else:
        where = {v: i / (len(distinct) - 1) for i, v in enumerate(distinct)}
    return [where[v] for v in values], [
        (where[v], tick_label(v) if numeric else str(v)) for v in distinct
    ]


def parallel_coordinates(
    columns: dict[str, list],
    color_by: str,
    title: str,
    tooltips: Sequence[str] = (),
    discrete: Sequence[str] = (),
) -> Drawing:
    """One vertical axis per column ({label: values, one per run}) and one line per run,
    coloured by the ``color_by`` column (dark: lowest, yellow: highest), like W&B's chart.
    Columns named in ``discrete`` get a tick per value; the others round ticks."""
    width, height = 900, 460
    left, top, right, bottom = 70, 70, width - 70, height - 50
    drawing = Drawing(width, height)
    drawing.text(width / 2, 16, title, scale=2, align="center")
    labels = list(columns)
    xs = np.linspace(left, right, len(labels))
    placed = {label: _axis_positions(columns[label], label in discrete) for label in labels}
    shade, _ = placed[color_by]
    count = len(columns[color_by])
    for run in range(count):
        ys = [bottom - placed[label][0][run] * (bottom - top) for label in labels]
        drawing.polyline(xs, ys, scale_color(shade[run]), width=2)
        tip = list(tooltips[run : run + 1])
        drawing.points(xs[-1:], ys[-1:], scale_color(shade[run]), size=5, titles=tip)
    for x, label in zip(xs, labels, strict=True):
        drawing.line(x, top, x, bottom, BLACK)
        drawing.text(x, top - 20, label, align="center", valign="bottom")
        for fraction, text in placed[label][1]:
            y = bottom - fraction * (bottom - top)
            drawing.line(x - 3, y, x + 3, y, BLACK)
            drawing.fill_rect(x + 5, y - 5, x + 7 + 6 * len(text), y + 5, WHITE)
            drawing.text(x + 6, y, text, GREY, valign="middle")
    return drawing


def _label(config: dict) -> str:
    return " ".join(f"{key}={value}" for key, value in config.items())


def _tooltip(record: dict) -> str:
    return (
        f"{_label(record['config'])}: {100 * record['accuracy']:.2f}%, "
        f"{record['file_bytes']:,} bytes"
    )


def sweep_drawings(records: list[dict]) -> dict[str, Drawing]:
    """The three charts of a sweep's runs: parallel coordinates of (grid keys, size, accuracy),
    accuracy vs file size with the Pareto front, and accuracy vs pruned fraction by bits."""
    runs = [r for r in records if r["kind"] == "run"]
    sizes = [r["file_bytes"] / 1000 for r in runs]
    accuracy = [100 * r["accuracy"] for r in runs]
    tips = [_tooltip(r) for r in runs]
    keys = list(dict.fromkeys(k for r in runs for k in r["config"]))
    columns = {AXIS_NAMES.get(k, k): [r["config"].get(k, "-") for r in runs] for k in keys}
    columns.update({"size kB": sizes, "accuracy %": accuracy})
    front = pareto_front(sizes, accuracy)
    by_bits: dict[str, tuple[list, list, list]] = {}
    for run, acc, tip in zip(runs, accuracy, tips, strict=True):
        xs, ys, names = by_bits.setdefault(f"{run['config'].get('bits', '?')}-bit", ([], [], []))
        xs.append(run["config"].get("prune", 0.0))
        ys.append(acc)
        names.append(tip)
    return {
        "parallel": parallel_coordinates(
            columns, "accuracy %", "Sweep: settings -> size, accuracy", tips, list(columns)[:-2]
        ),
        "pareto": scatter_chart(
            {"runs": (sizes, accuracy, tips)},
            "Accuracy vs file size",
            ".mbz file size (kB)",
            "top-1 accuracy (%)",
            front=([sizes[i] for i in front], [accuracy[i] for i in front]),
        ),
        "sparsity": scatter_chart(
            by_bits, "Accuracy vs pruning", "pruned fraction", "top-1 accuracy (%)"
        ),
    }


_CSS = (
    "body{font-family:sans-serif;margin:2em;color:#222}table{border-collapse:collapse}"
    "td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}th{background:#eee}"
    "tr.front td{font-weight:bold}figure{margin:1em 0}"
)


def html_page(title: str, records: list[dict], drawings: dict[str, Drawing]) -> str:
    """One self-contained HTML page: the charts as inline SVG, and a table of every run
    (Pareto-front runs in bold). Nothing is fetched from elsewhere: it works offline."""
    runs = sorted((r for r in records if r["kind"] == "run"), key=lambda r: r["file_bytes"])
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
    figures = "".join(f"<figure>{d.to_svg()}</figure>" for d in drawings.values())
    return (
        '<!DOCTYPE html><html><head><meta charset="utf-8">'
        f"<title>{html.escape(title)}</title>"
        f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>{figures}"
        f"<h2>Runs ({len(runs)}; Pareto front in bold)</h2><table><tr>{head}</tr>"
        + "".join(rows)
        + "</table></body></html>\n"
    )


def write_charts(out_dir: Path, records: list[dict], title: str) -> list[Path]:
    """Write parallel.png, pareto.png, sparsity.png and sweep.html into ``out_dir``."""
    drawings = sweep_drawings(records)
    paths = []
    for name, drawing in drawings.items():
        paths.append(out_dir / f"{name}.png")
        drawing.save_png(paths[-1])
    paths.append(out_dir / "sweep.html")
    paths[-1].write_text(html_page(title, records, drawings))
    return paths
