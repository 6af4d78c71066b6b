"""Charts with matplotlib and plotly: what each figure draws, the rendered pixels, the files of
a sweep and its self-contained page."""

from __future__ import annotations

import itertools
import xml.etree.ElementTree as ElementTree
from html.parser import HTMLParser

import numpy as np
import pytest
from matplotlib import colormaps
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from mbz.charts import (
    axis_positions,
    confusion_matrix_chart,
    line_chart,
    parallel_chart,
    parallel_columns,
    pareto_front,
    save,
    write_charts,
)


def record(key, kind, config, size, accuracy) -> dict:
    """A sweep record with the fields the charts, the page and W&B read."""
    return {"key": key, "kind": kind, "config": config, "file_bytes": size,
            "ratio": 2e6 / size, "accuracy": accuracy,
            "accuracy_by_runtime": {"numpy": accuracy}, "act_peak_bytes": 4096,
            "pack_seconds": 1.5}  # fmt: skip


def sweep_records() -> list[dict]:
    """A baseline and 12 runs (bits 8/4/2 x kmeans/uniform x prune 0/0.5), made-up numbers:
    fewer bits and more pruning give smaller files and lower accuracy."""
    rows = [record("base", "baseline", {"bits": 32, "act_bits": 32, "prune": 0.0}, 2e6, 0.6)]
    grid = itertools.product((8, 4, 2), ("kmeans", "uniform"), (0.0, 0.5))
    for index, (bits, method, prune) in enumerate(grid):
        size = int(bits * 60_000 * (1 - prune) + 9_000 * index)
        accuracy = 0.6 - 0.02 * (8 - bits) - 0.1 * prune - (0.03 if method == "uniform" else 0)
        config = {"bits": bits, "method": method, "prune": prune}
        rows.append(record(f"r{index}", "run", config, size, round(accuracy, 4)))
    return rows


def pixel(figure, axes, x: float, y: float, image: np.ndarray) -> np.ndarray:
    """The RGB colour rendered at data point (x, y) of ``axes``."""
    px, py = axes.transData.transform((x, y))
    return image[round(figure.bbox.height - py), round(px), :3]


def test_line_chart_draws_each_series_where_its_points_are(tmp_path):
    epochs = [1, 2, 3, 4]
    series = {"train": (epochs, [2.0, 1.5, 1.2, 1.0]), "test": (epochs, [2.2, None, 1.6, 1.4])}
    figure = line_chart(series, "Loss", "epoch", "loss")
    (path,) = save(figure, tmp_path / "loss.png")
    image = imread(path)
    assert image.shape[:2] == (440, 720)
    axes = figure.axes[0]
    train, test = axes.lines
    np.testing.assert_array_equal(test.get_ydata(), [2.2, np.nan, 1.6, 1.4])  # a gap, no point
    for line, (x, y) in ((train, (1, 2.0)), (test, (4, 1.4))):
        np.testing.assert_allclose(pixel(figure, axes, x, y, image), to_rgb(line.get_color()),
                                   atol=0.02)  # fmt: skip
    assert [text.get_text() for text in axes.get_legend().get_texts()] == ["train", "test"]


def test_confusion_matrix_shades_cells_by_share_of_the_row(tmp_path):
    matrix = np.array([[9, 1, 0], [2, 7, 1], [0, 0, 10]])
    figure = confusion_matrix_chart(matrix, ["cat", "dog", "ship"], "Confusion")
    (path,) = save(figure, tmp_path / "cm.png")
    image, axes = imread(path), figure.axes[0]

    def darkness(row: int, col: int) -> float:
        return 3 - float(pixel(figure, axes, col - 0.4, row - 0.4, image).sum())  # a corner

    assert darkness(2, 2) > darkness(0, 0) > darkness(1, 1) > darkness(1, 0) > darkness(0, 1)
    empty = pixel(figure, axes, 2 - 0.4, -0.4, image)  # row 0, column 2: no images
    np.testing.assert_allclose(empty, colormaps["Blues"](0.0)[:3], atol=0.02)
    counts = [t.get_text() for t in axes.texts]
    assert counts == [str(v) for v in matrix.flatten()]
    with pytest.raises(ValueError, match="3x3"):
        confusion_matrix_chart(matrix[:2], ["cat", "dog", "ship"], "bad")


def test_pareto_front_keeps_undominated_points():
    sizes = [10, 20, 30, 15, 40]
    accuracy = [0.5, 0.7, 0.6, 0.5, 0.9]
    # 30 is beaten by 20 (smaller, more accurate); 15 by 10 (smaller, as accurate).
    assert pareto_front(sizes, accuracy) == [0, 1, 4]


def test_axis_positions_of_settings_and_measures():
    assert axis_positions(["uniform", "kmeans", "uniform"]) == (
        [1.0, 0.0, 1.0], [0.0, 1.0], ["kmeans", "uniform"],
    )  # fmt: skip
    assert axis_positions([8, 2, 4, 2]) == ([8.0, 2.0, 4.0, 2.0], [2.0, 4.0, 8.0], ["2", "4", "8"])
    _, ticks, labels = axis_positions([float(v) for v in range(10)])
    assert ticks == [0.0, 2.25, 4.5, 6.75, 9.0] and labels[1] == "2.25"


def test_parallel_chart_has_one_line_per_run_coloured_by_accuracy():
    records = sweep_records()
    columns = parallel_columns(records)
    assert list(columns) == ["weight bits", "method", "pruned", "size kB", "accuracy %"]
    assert len(columns["accuracy %"]) == 12  # the runs; the baseline is not charted
    figure = parallel_chart(columns, "Sweep")
    lines = figure.axes[0].lines
    assert len(lines) == 12
    accuracy = columns["accuracy %"]
    viridis = colormaps["viridis"]
    best, worst = lines[int(np.argmax(accuracy))], lines[int(np.argmin(accuracy))]
    np.testing.assert_allclose(best.get_color(), viridis(1.0))
    np.testing.assert_allclose(worst.get_color(), viridis(0.0))
    # Each line passes through its run's values, each axis scaled to [0, 1].
    assert lines[0].get_ydata()[0] == 1.0 and lines[-1].get_ydata()[0] == 0.0  # 8 bits, 2 bits


class Tags(HTMLParser):
    """Every start tag of a page, with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_sweep_files_and_self_contained_page(tmp_path):
    records = sweep_records()
    paths = write_charts(tmp_path, records, "demo sweep")
    names = sorted(path.name for path in paths)
    assert names == sorted(
        [f"{n}.{k}" for n in ("parallel", "pareto", "sparsity") for k in ("png", "svg")]
        + ["sweep.html"]
    )
    for name in ("parallel", "pareto", "sparsity"):
        assert (tmp_path / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert ElementTree.parse(tmp_path / f"{name}.svg").getroot().tag.endswith("svg")
    page = (tmp_path / "sweep.html").read_text()
    parser = Tags()
    parser.feed(page)
    references = [(tag, a) for tag, a in parser.tags if {"src", "href"} & set(a)]
    assert references == []  # plotly.js is inline: no script, stylesheet or image to fetch
    assert [a.get("id") for tag, a in parser.tags if tag == "div" and a.get("id")] == ["parallel"]
    assert sum(tag == "svg" for tag, _ in parser.tags) == 2  # pareto and sparsity, inline
    rows = [a for tag, a in parser.tags if tag == "tr"]
    assert len(rows) == 13  # the header and one row per run
    runs = records[1:]
    front = pareto_front([r["file_bytes"] for r in runs], [r["accuracy"] for r in runs])
    assert sum(a.get("class") == "front" for a in rows) == len(front)
