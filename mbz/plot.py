"""PNG charts drawn with numpy alone (no plotting library): a raster canvas with a built-in
5x7 bitmap font, a PNG encoder (zlib + struct), axes that map data onto pixels, and the charts
of ``mbz train``: line charts of its curves and a confusion matrix.

Coordinates are pixels, x to the right and y downwards from the top-left corner.
"""

from __future__ import annotations

import math
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

Color = tuple[int, int, int]
WHITE: Color = (255, 255, 255)
BLACK: Color = (0, 0, 0)
GREY: Color = (120, 120, 120)
GRID: Color = (228, 228, 228)
PALETTE: tuple[Color, ...] = (  # series colours, in order
    (31, 119, 180),
    (255, 127, 14),
    (44, 160, 44),
    (214, 39, 40),
    (148, 103, 189),
    (140, 86, 75),
)
LINE_CHART_SIZE = (720, 440)  # width, height
GLYPH_WIDTH, GLYPH_HEIGHT = 5, 7
_ADVANCE = GLYPH_WIDTH + 1  # one blank column between characters

# ASCII 32 (space) to 126 (~): five columns per glyph, left to right; bit 0 is the top row.
_FONT = bytes.fromhex(
    "0000000000 00005f0000 0007000700 147f147f14 242a7f2a12 2313086462 3649552250"
    "0005030000 001c224100 0041221c00 082a1c2a08 08083e0808 0050300000 0808080808"
    "0060600000 2010080402 3e5149453e 00427f4000 4261514946 2141454b31 1814127f10"
    "2745454539 3c4a494930 0171090503 3649494936 064949291e 0036360000 0056360000"
    "0008142241 1414141414 4122140800 0201510906 324979413e 7e1111117e 7f49494936"
    "3e41414122 7f4141221c 7f49494941 7f09090101 3e41415132 7f0808087f 00417f4100"
    "2040413f01 7f08142241 7f40404040 7f0204027f 7f0408107f 3e4141413e 7f09090906"
    "3e4151215e 7f09192946 4649494931 01017f0101 3f4040403f 1f2040201f 7f2018207f"
    "6314081463 0304780403 6151494543 007f414100 0204081020 0041417f00 0402010204"
    "4040404040 0001020400 2054545478 7f48444438 3844444420 384444487f 3854545418"
    "087e090102 081454543c 7f08040478 00447d4000 2040443d00 007f102844 00417f4000"
    "7c04180478 7c08040478 3844444438 7c14141408 081414187c 7c08040408 4854545420"
    "043f444020 3c4040207c 1c2040201c 3c4030403c 4428102844 0c5050503c 4464544c44"
    "0008364100 00007f0000 0041360800 0804080408"
)
_GLYPHS = (
    np.unpackbits(
        np.frombuffer(_FONT, np.uint8).reshape(-1, GLYPH_WIDTH, 1), axis=2, bitorder="little"
    )[:, :, :GLYPH_HEIGHT]
    .transpose(0, 2, 1)
    .astype(bool)
)  # [95, 7 rows, 5 columns]


def text_mask(text: str, scale: int = 1) -> np.ndarray:
    """Bool pixels [7 * scale, (6 * len - 1) * scale] of ``text`` in the built-in font.

    Characters outside printable ASCII are drawn as '?'.
    """
    codes = [ord(c) - 32 if 32 <= ord(c) <= 126 else ord("?") - 32 for c in text]
    mask = np.zeros((GLYPH_HEIGHT, max(0, _ADVANCE * len(codes) - 1)), dtype=bool)
    for index, code in enumerate(codes):
        mask[:, index * _ADVANCE : index * _ADVANCE + GLYPH_WIDTH] = _GLYPHS[code]
    return mask.repeat(scale, axis=0).repeat(scale, axis=1)


def encode_png(pixels: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of ``pixels`` (uint8 [H, W, 3])."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or pixels.shape[2] != 3:
        raise ValueError(f"expected uint8 [H, W, 3] pixels, got {pixels.dtype} {pixels.shape}")
    height, width, _ = pixels.shape
    rows = np.concatenate([np.zeros((height, 1), np.uint8), pixels.reshape(height, -1)], axis=1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data)
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB, no interlace
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9))
        + chunk(b"IEND", b"")
    )


class Canvas:
    """An RGB raster to draw on; everything drawn is clipped to its edges."""

    def __init__(self, width: int, height: int, background: Color = WHITE) -> None:
        self.pixels = np.empty((height, width, 3), dtype=np.uint8)
        self.pixels[:] = background

    @property
    def width(self) -> int:
        """Pixels across."""
        return self.pixels.shape[1]

    @property
    def height(self) -> int:
        """Pixels down."""
        return self.pixels.shape[0]

    def fill_rect(self, left: float, top: float, right: float, bottom: float, color: Color) -> None:
        """Fill the pixels with left <= x < right and top <= y < bottom (rounded)."""
        x0, x1 = (min(max(round(v), 0), self.width) for v in (left, right))
        y0, y1 = (min(max(round(v), 0), self.height) for v in (top, bottom))
        self.pixels[y0:y1, x0:x1] = color

    def stamp(self, mask: np.ndarray, left: int, top: int, color: Color) -> None:
        """Paint ``color`` where the bool ``mask`` is set, its corner at (left, top)."""
        height, width = mask.shape
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + width, self.width), min(top + height, self.height)
        if x0 < x1 and y0 < y1:
            region = self.pixels[y0:y1, x0:x1]
            region[mask[y0 - top : y1 - top, x0 - left : x1 - left]] = color

    def line(self, x0: float, y0: float, x1: float, y1: float, color: Color, width: int = 1):
        """A straight line, ``width`` pixels thick, between two points (both included)."""
        steps = max(1, math.ceil(max(abs(x1 - x0), abs(y1 - y0))))
        t = np.linspace(0.0, 1.0, steps + 1)
        self.points(x0 + t * (x1 - x0), y0 + t * (y1 - y0), color, width)

    def points(self, xs: np.ndarray, ys: np.ndarray, color: Color, size: int = 1) -> None:
        """A ``size`` x ``size`` square of pixels centred on each point."""
        offsets = np.arange(size) - (size - 1) // 2
        xs = (np.rint(np.asarray(xs))[:, None] + offsets).astype(int)
        ys = (np.rint(np.asarray(ys))[:, None] + offsets).astype(int)
        cols, rows = np.broadcast_arrays(xs[:, None, :], ys[:, :, None])
        keep = (cols >= 0) & (cols < self.width) & (rows >= 0) & (rows < self.height)
        self.pixels[rows[keep], cols[keep]] = color

    def polyline(self, xs: Sequence[float], ys: Sequence[float], color: Color, width: int = 1):
        """Straight segments joining consecutive points."""
        for index in range(len(xs) - 1):
            self.line(xs[index], ys[index], xs[index + 1], ys[index + 1], color, width)

    def text(
        self,
        x: float,
        y: float,
        text: str,
        color: Color = BLACK,
        *,
        scale: int = 1,
        align: str = "left",
        valign: str = "top",
        vertical: bool = False,
    ) -> None:
        """Write ``text`` anchored at (x, y): ``align`` left/center/right, ``valign``
        top/middle/bottom; ``vertical`` turns it to read bottom to top."""
        mask = text_mask(text, scale)
        if vertical:
            mask = np.rot90(mask)
        height, width = mask.shape
        left = x - {"left": 0, "center": width / 2, "right": width}[align]
        top = y - {"top": 0, "middle": height / 2, "bottom": height}[valign]
        self.stamp(mask, round(left), round(top), color)

    def save(self, path: str | Path) -> None:
        """Write the canvas as a PNG file."""
        Path(path).write_bytes(encode_png(self.pixels))


def nice_ticks(low: float, high: float, count: int = 5, min_step: float = 0.0) -> np.ndarray:
    """About ``count`` round tick values (1, 2 or 5 times a power of ten apart, and at least
    ``min_step``) covering [low, high]; the first is <= low and the last >= high."""
    if not high > low:
        low, high = low - 1, high + 1
    raw = max((high - low) / max(1, count), min_step)
    power = 10.0 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return np.arange(first, last + 1) * step


def tick_label(value: float) -> str:
    """A short label for a tick value (no float noise such as 0.30000000000000004)."""
    return f"{round(value, 10):g}"


@dataclass
class Axes:
    """A data rectangle ``x_range`` x ``y_range`` drawn into a pixel box of a canvas.

    The first value of each range maps to the left (x) or bottom (y) edge of the box; a
    range may run backwards, so ``y_range=(n, 0)`` puts 0 at the top.
    """

    canvas: Canvas
    box: tuple[int, int, int, int]  # left, top, right, bottom pixels
    x_range: tuple[float, float]
    y_range: tuple[float, float]

    def to_pixel(self, xs, ys) -> tuple[np.ndarray, np.ndarray]:
        """Pixel coordinates of data points."""
        left, top, right, bottom = self.box
        (x0, x1), (y0, y1) = self.x_range, self.y_range
        px = left + (np.asarray(xs, float) - x0) / (x1 - x0) * (right - left)
        py = bottom - (np.asarray(ys, float) - y0) / (y1 - y0) * (bottom - top)
        return px, py

    def grid_and_ticks(self, xticks: np.ndarray, yticks: np.ndarray) -> None:
        """Light grid lines, the frame, and tick labels below and left of the box."""
        left, top, right, bottom = self.box
        canvas = self.canvas
        px, _ = self.to_pixel(xticks, np.full(len(xticks), self.y_range[0]))
        _, py = self.to_pixel(np.full(len(yticks), self.x_range[0]), yticks)
        for x, value in zip(px, xticks, strict=True):
            canvas.line(x, top, x, bottom, GRID)
            canvas.line(x, bottom, x, bottom + 4, BLACK)
            canvas.text(x, bottom + 7, tick_label(value), align="center")
        for y, value in zip(py, yticks, strict=True):
            canvas.line(left, y, right, y, GRID)
            canvas.line(left - 4, y, left, y, BLACK)
            canvas.text(left - 7, y, tick_label(value), align="right", valign="middle")
        for x0, y0, x1, y1 in (
            (left, top, right, top),
            (left, bottom, right, bottom),
            (left, top, left, bottom),
            (right, top, right, bottom),
        ):
            canvas.line(x0, y0, x1, y1, BLACK)

    def labels(self, title: str, xlabel: str, ylabel: str) -> None:
        """Title above the box, axis labels below and to the left."""
        left, top, right, bottom = self.box
        middle_x, middle_y = (left + right) / 2, (top + bottom) / 2
        self.canvas.text(middle_x, top - 12, title, scale=2, align="center", valign="bottom")
        self.canvas.text(middle_x, bottom + 22, xlabel, align="center")
        self.canvas.text(14, middle_y, ylabel, align="center", valign="middle", vertical=True)

    def plot_line(self, xs, ys, color: Color, markers: bool = True) -> None:
        """A series as line segments, with a small square on each point."""
        px, py = self.to_pixel(xs, ys)
        self.canvas.polyline(px, py, color, width=2)
        if markers:
            self.canvas.points(px, py, color, size=5)

    def plot_points(self, xs, ys, color: Color, size: int = 5) -> None:
        """A series as unconnected squares (a scatter plot)."""
        px, py = self.to_pixel(xs, ys)
        self.canvas.points(px, py, color, size=size)

    def legend(self, entries: Sequence[tuple[str, Color]]) -> None:
        """Coloured swatches with labels, in the top-right corner inside the box."""
        _, top, right, _ = self.box
        width = max(len(label) for label, _ in entries) * _ADVANCE + 24
        left = right - width - 8
        self.canvas.fill_rect(left, top + 8, right - 8, top + 14 + 12 * len(entries), WHITE)
        for index, (label, color) in enumerate(entries):
            y = top + 12 + 12 * index
            self.canvas.fill_rect(left + 4, y + 1, left + 16, y + 6, color)
            self.canvas.text(left + 20, y, label)


def _finite_points(xs, ys) -> tuple[np.ndarray, np.ndarray]:
    """The points whose x and y are both numbers (None and NaN dropped)."""
    xs = np.array([np.nan if v is None else v for v in xs], dtype=float)
    ys = np.array([np.nan if v is None else v for v in ys], dtype=float)
    keep = np.isfinite(xs) & np.isfinite(ys)
    return xs[keep], ys[keep]


def data_axes(
    canvas: Canvas, series: list[tuple[np.ndarray, np.ndarray]], margins=(70, 50, 24, 52)
) -> tuple[Axes, np.ndarray, np.ndarray]:
    """Axes fitting every point of ``series`` (ranges widened to round ticks), and the ticks.

    ``margins`` are the pixels left, top, right and bottom of the box.
    """
    xs = np.concatenate([x for x, _ in series] or [np.zeros(0)])
    ys = np.concatenate([y for _, y in series] or [np.zeros(0)])
    whole = xs.size > 0 and bool(np.all(xs == np.round(xs)))  # epochs, counts: no 1.5 ticks
    xticks = nice_ticks(xs.min(), xs.max(), min_step=float(whole)) if xs.size else nice_ticks(0, 1)
    yticks = nice_ticks(ys.min(), ys.max()) if ys.size else nice_ticks(0, 1)
    left, top, right, bottom = margins
    box = (left, top, canvas.width - right, canvas.height - bottom)
    axes = Axes(canvas, box, (xticks[0], xticks[-1]), (yticks[0], yticks[-1]))
    return axes, xticks, yticks


def line_chart(
    path: str | Path,
    series: dict[str, tuple[Sequence[float], Sequence[float | None]]],
    title: str,
    xlabel: str,
    ylabel: str,
) -> Axes:
    """Write a PNG line chart of ``series`` ({name: (xs, ys)}) with a legend.

    Points with a None or NaN coordinate are left out. Returns the axes, whose ``to_pixel``
    tells where a data point was drawn.
    """
    canvas = Canvas(*LINE_CHART_SIZE)
    points = {name: _finite_points(xs, ys) for name, (xs, ys) in series.items()}
    axes, xticks, yticks = data_axes(canvas, list(points.values()))
    axes.grid_and_ticks(xticks, yticks)
    axes.labels(title, xlabel, ylabel)
    drawn = [(name, xy) for name, xy in points.items() if xy[0].size]
    for (_, (xs, ys)), color in zip(drawn, PALETTE * len(drawn), strict=False):
        axes.plot_line(xs, ys, color)
    if drawn:
        axes.legend(
            [(name, color) for (name, _), color in zip(drawn, PALETTE * len(drawn), strict=False)]
        )
    canvas.save(path)
    return axes


def _shade(fraction: float) -> Color:
    """White (0) to dark blue (1)."""
    low, high = np.array(WHITE, float), np.array((8, 48, 107), float)
    return tuple(round(v) for v in low + (high - low) * min(max(fraction, 0.0), 1.0))


def confusion_matrix_png(
    path: str | Path, matrix: np.ndarray, class_names: Sequence[str], title: str
) -> Axes:
    """Write a PNG of a confusion matrix (rows: true class, columns: predicted class).

    Each cell shows its count, shaded by its share of the row. Returns axes in cell units:
    cell (row r, column c) spans x in [c, c + 1] and y in [r, r + 1].
    """
    matrix = np.asarray(matrix)
    n = len(class_names)
    if matrix.shape != (n, n):
        raise ValueError(f"a confusion matrix of {n} classes is {n}x{n}, got {matrix.shape}")
    cell = 44
    names_width = max(len(name) for name in class_names) * _ADVANCE
    left, top = names_width + 40, names_width + 70
    title_width = text_mask(title, scale=2).shape[1]
    canvas = Canvas(max(left + n * cell, title_width) + 20, top + n * cell + 20)
    axes = Axes(canvas, (left, top, left + n * cell, top + n * cell), (0, n), (n, 0))
    rows = matrix.sum(axis=1, keepdims=True)
    shares = matrix / np.maximum(rows, 1)
    for r in range(n):
        for c in range(n):
            (x0, x1), (y0, y1) = axes.to_pixel([c, c + 1], [r, r + 1])
            canvas.fill_rect(x0, y0, x1, y1, _shade(shares[r, c]))
            ink = WHITE if shares[r, c] > 0.5 else BLACK
            canvas.text(
                (x0 + x1) / 2,
                (y0 + y1) / 2,
                str(int(matrix[r, c])),
                ink,
                align="center",
                valign="middle",
            )
    for index, name in enumerate(class_names):
        (x0, x1), (y0, y1) = axes.to_pixel([index, index + 1], [index, index + 1])
        canvas.text(left - 6, (y0 + y1) / 2, name, align="right", valign="middle")
        canvas.text((x0 + x1) / 2, top - 6, name, align="center", valign="bottom", vertical=True)
    canvas.text(canvas.width / 2, 8, title, scale=2, align="center")
    canvas.text(left + n * cell / 2, 32, "predicted class", align="center")
    canvas.text(
        12, top + n * cell / 2, "true class", align="center", valign="middle", vertical=True
    )
    canvas.save(path)
    return axes
