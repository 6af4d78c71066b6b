"""PNG charts without a plotting library: the encoder, the canvas, the font and the charts."""

import struct
import zlib

import numpy as np
import pytest
import torch
from torchvision.io import decode_png

from mbz.plot import (
    BLACK,
    LINE_CHART_SIZE,
    PALETTE,
    WHITE,
    Canvas,
    confusion_matrix_png,
    encode_png,
    line_chart,
    nice_ticks,
)

# torchvision's decode_png (libpng) is deprecated in favour of torchcodec, absent here.
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding:DeprecationWarning")


def decoded(data: bytes) -> np.ndarray:
    """Pixels [H, W, 3] of a PNG, decoded by torchvision (libpng)."""
    tensor = decode_png(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    return tensor.permute(1, 2, 0).numpy()


def read_png(path) -> np.ndarray:
    return decoded(path.read_bytes())


def test_png_round_trips_through_libpng():
    pixels = np.random.default_rng(0).integers(0, 256, (17, 23, 3), dtype=np.uint8)
    np.testing.assert_array_equal(decoded(encode_png(pixels)), pixels)


def test_png_chunks_are_well_formed():
    data = encode_png(np.zeros((5, 7, 3), np.uint8))
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    offset, kinds = 8, []
    while offset < len(data):
        (length,) = struct.unpack(">I", data[offset : offset + 4])
        kind, body = data[offset + 4 : offset + 8], data[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", data[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + body)
        kinds.append(kind)
        offset += 12 + length
    assert kinds == [b"IHDR", b"IDAT", b"IEND"]
    assert struct.unpack(">II", data[16:24]) == (7, 5)  # width, height


def test_encoder_rejects_other_arrays():
    with pytest.raises(ValueError, match="uint8"):
        encode_png(np.zeros((4, 4), np.uint8))


def test_shapes_land_on_the_expected_pixels(tmp_path):
    canvas = Canvas(40, 30)
    canvas.fill_rect(2, 3, 6, 5, (10, 20, 30))
    canvas.line(10, 10, 20, 20, BLACK)
    canvas.text(30, 2, "-")  # a minus sign: the middle row of a 5x7 glyph
    canvas.fill_rect(35, 25, 99, 99, BLACK)  # clipped at the edges
    canvas.save(tmp_path / "c.png")
    pixels = read_png(tmp_path / "c.png")
    assert pixels.shape == (30, 40, 3)
    assert (pixels[3:5, 2:6] == (10, 20, 30)).all()
    assert (pixels[2, 2:6] == WHITE).all() and (pixels[3:5, 6] == WHITE).all()
    diagonal = pixels[np.arange(10, 21), np.arange(10, 21)]
    assert (diagonal == BLACK).all()
    assert (pixels[10, 11:21] == WHITE).all()
    glyph = (pixels[2:9, 30:35] == BLACK).all(axis=2)
    assert glyph[3].all() and not glyph[[0, 1, 2, 4, 5, 6]].any()
    assert (pixels[25:, 35:] == BLACK).all()


def test_text_is_readable_in_any_direction():
    canvas = Canvas(60, 60)
    canvas.text(5, 5, "Ab9", scale=2)
    canvas.text(40, 55, "Ab9", vertical=True, valign="bottom")
    ink = (canvas.pixels != 255).any(axis=2)
    rows, cols = np.nonzero(ink[:30, :])
    assert rows.max() - rows.min() < 14 < cols.max() - cols.min()  # wider than tall
    rows, cols = np.nonzero(ink[30:, 30:])
    assert cols.max() - cols.min() < 7 < rows.max() - rows.min()  # taller than wide


@pytest.mark.parametrize("low, high", [(0.0, 1.0), (0.37, 2.31), (12.0, 97.0), (5.0, 5.0)])
def test_nice_ticks_cover_the_range_in_round_steps(low, high):
    ticks = nice_ticks(low, high)
    assert ticks[0] <= low and ticks[-1] >= high
    steps = np.diff(ticks)
    np.testing.assert_allclose(steps, steps[0])
    mantissa = steps[0] / 10 ** np.floor(np.log10(steps[0]))
    assert min(abs(mantissa - m) for m in (1, 2, 5)) < 1e-9
    assert 3 <= len(ticks) <= 11


def test_whole_number_axes_get_whole_number_ticks():
    np.testing.assert_array_equal(nice_ticks(1, 2, min_step=1), [1, 2])
    assert np.all(nice_ticks(1, 3, min_step=1) % 1 == 0)


def test_line_chart_draws_each_series_where_its_points_are(tmp_path):
    path = tmp_path / "loss.png"
    epochs = [1, 2, 3, 4]
    axes = line_chart(
        path,
        {"train": (epochs, [2.0, 1.5, 1.2, 1.0]), "test": (epochs, [2.2, None, 1.6, 1.4])},
        "Loss",
        "epoch",
        "loss",
    )
    pixels = read_png(path)
    assert pixels.shape == (LINE_CHART_SIZE[1], LINE_CHART_SIZE[0], 3)
    for (x, y), color in (((1, 2.0), PALETTE[0]), ((4, 1.4), PALETTE[1])):
        px, py = axes.to_pixel(x, y)
        assert tuple(pixels[round(float(py)), round(float(px))]) == color
    px, py = axes.to_pixel(2, 2.2)  # a point the test series lacks: nothing drawn there
    assert tuple(pixels[round(float(py)), round(float(px))]) != PALETTE[1]
    left, top, right, _ = axes.box
    assert (pixels[top, left:right] == BLACK).all()  # the frame above the highest point


def test_confusion_matrix_shades_cells_by_share_of_the_row(tmp_path):
    path = tmp_path / "cm.png"
    matrix = np.array([[9, 1, 0], [2, 7, 1], [0, 0, 10]])
    axes = confusion_matrix_png(path, matrix, ["cat", "dog", "ship"], "Confusion")
    pixels = read_png(path).astype(int)

    def darkness(row: int, col: int) -> int:
        px, py = axes.to_pixel(col + 0.1, row + 0.1)  # a corner, away from the count
        return 765 - int(pixels[round(float(py)), round(float(px))].sum())

    assert darkness(2, 2) > darkness(0, 0) > darkness(1, 1) > darkness(1, 0) > darkness(0, 1)
    assert darkness(0, 2) == 0  # empty cells stay white
    with pytest.raises(ValueError, match="3x3"):
        confusion_matrix_png(tmp_path / "x.png", matrix[:2], ["cat", "dog", "ship"], "bad")
