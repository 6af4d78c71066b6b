"""Vectorised numpy kernels for the graph's ops, on float32 NHWC feature maps or [N, F] features.

Weights arrive pre-arranged by ``prepare_*`` (done once per program). No Python loop runs over
pixels, channels or kernel taps: windowed ops read a strided view of every window at once
(``windows``), and im2col scratch is built and used in blocks of at most ``SCRATCH_BYTES``.
Element-wise kernels take an optional ``out`` array (which may be their input) so that the
program can run them in place. Every kernel accepts a ``pool`` (``codes.BufferPool``); the large
ones take their arrays from it.

The 1x1 and depthwise convolutions read and write quantized activations (``codes.Codes``) a
cache-sized block at a time.

Exact layers (SPEC.md section 7.3) run the same convolution and linear kernels on integer-valued
float32 inputs and weights, with a ``multiplier`` per output channel applied before the bias; a
``chunk`` splits a reduction that could reach ``2**24`` into float32 partial products of that
many terms, added in float64 (``matmul``); a depthwise weight held in float64 accumulates in
float64. ``avgpool2d_codes`` and ``global_avgpool_codes`` pool codes as exact integer sums.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import numpy as np
from numpy.lib.stride_tricks import as_strided

from .codes import (
    BufferPool,
    Codes,
    Shape,
    as_float,
    decode,
    decode_range,
    encode_range,
    give,
    integers,
    new_codes,
    take,
)

F32 = np.float32
F64 = np.float64
CACHE_BLOCK_BYTES = 256 * 1024  # output bytes per depthwise block, well inside a core's L2
SCRATCH_BYTES = 16 * 1024 * 1024  # im2col columns per block of output rows
Pair = tuple[int, int]
Clip = tuple[float, float] | None  # a fused relu / relu6: (low, high) bounds

_NO_SCRATCH = np.empty(0, F32)  # the scratch space of rows that need no decoding


# ----------------------------------------------------------------------------- weight layouts


def prepare_pointwise(weight: np.ndarray) -> np.ndarray:
    """[O, C, 1, 1] -> [C, O], the right-hand side of ``x @ w``."""
    return np.ascontiguousarray(weight[:, :, 0, 0].T, dtype=F32)


def prepare_depthwise(weight: np.ndarray, dtype: type = F32) -> np.ndarray:
    """[C, 1, kH, kW] -> [kH, kW, C], one row of per-channel factors per tap (float64 for an
    exact layer whose sums could reach ``2**24``: ``_accumulate_taps`` then sums in float64)."""
    return np.ascontiguousarray(weight[:, 0].transpose(1, 2, 0), dtype=dtype)


def prepare_grouped(weight: np.ndarray, groups: int) -> np.ndarray:
    """[O, I/g, kH, kW] -> [g, kH*kW*I/g, O/g], matching the im2col column order (kH, kW, I/g)."""
    out_channels, per_group, kh, kw = weight.shape
    grouped = weight.reshape(groups, out_channels // groups, per_group, kh, kw)
    return np.ascontiguousarray(
        grouped.transpose(0, 3, 4, 2, 1).reshape(groups, kh * kw * per_group, -1), dtype=F32
    )


# ---------------------------------------------------------------------------------- helpers


def output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Spatial output length of a sliding window, as torch computes it (floor mode)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def pad_nhwc(
    x: np.ndarray, padding: Pair, value: float = 0.0, pool: BufferPool | None = None
) -> np.ndarray:
    """``x`` with ``padding`` rows/columns of ``value`` on each side of H and W (``x`` itself
    when there is no padding)."""
    ph, pw = padding
    if ph == 0 and pw == 0:
        return x
    n, h, w, c = x.shape
    out = take(pool, (n, h + 2 * ph, w + 2 * pw, c))
    out[:, :ph] = value
    out[:, ph + h :] = value
    out[:, ph : ph + h, :pw] = value
    out[:, ph : ph + h, pw + w :] = value
    out[:, ph : ph + h, pw : pw + w] = x
    return out


def _release_padded(pool: BufferPool | None, padded: np.ndarray, x: np.ndarray) -> None:
    if padded is not x:
        give(pool, padded)


def tile_rows(values: np.ndarray, width: int) -> np.ndarray:
    """Per-channel ``values`` [..., C] repeated along a row: [..., width, C].

    Broadcasting a whole row instead of a bare [C] vector lets numpy's inner loop run over
    ``width * C`` contiguous elements, several times faster for small C."""
    return np.ascontiguousarray(
        np.broadcast_to(values[..., None, :], (*values.shape[:-1], width, values.shape[-1]))
    )


def add_per_channel(x: np.ndarray, values: np.ndarray) -> np.ndarray:
    """``x += values`` along the last (channel) axis, in place; returns ``x``."""
    if x.ndim == 4:
        np.add(x, tile_rows(values, x.shape[2]), out=x)
    else:
        x += values
    return x


def _finish(
    block: np.ndarray, bias_rows: np.ndarray, clip: Clip, multiplier_rows: np.ndarray | None
) -> None:
    """The epilogue of an [..., W, C] block, in place: times the row-tiled multiplier (exact
    layers), plus the row-tiled bias (two float32 operations), then the clip if asked."""
    if multiplier_rows is not None:
        np.multiply(block, multiplier_rows, out=block)
    np.add(block, bias_rows, out=block)
    if clip is not None:
        np.clip(block, F32(clip[0]), F32(clip[1]), out=block)


def windows(
    padded: np.ndarray, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair
) -> np.ndarray:
    """A read-only strided view [N, Ho, Wo, kH, kW, C] of every window of an NHWC input:
    ``view[n, y, x, i, j]`` is the pixel kernel tap (i, j) of output (y, x) reads. No copy."""
    n, _, _, c = padded.shape
    sn, sh, sw, sc = padded.strides
    shape = (n, *out_hw, *kernel, c)
    strides = (sn, sh * stride[0], sw * stride[1], sh * dilation[0], sw * dilation[1], sc)
    return as_strided(padded, shape, strides, writeable=False)


def row_blocks(
    images: int, rows: int, row_bytes: int, budget: int
) -> Iterator[tuple[slice, slice]]:
    """(images, output rows) slices covering ``images`` x ``rows`` output rows, each block
    needing at most ``budget`` bytes at ``row_bytes`` per row (one row at least): whole images
    when one fits, else blocks of rows of one image."""
    per_image = rows * row_bytes
    if per_image <= budget:
        step = max(1, budget // max(per_image, 1))
        for begin in range(0, images, step):
            yield slice(begin, min(begin + step, images)), slice(0, rows)
        return
    step = max(1, budget // max(row_bytes, 1))
    for image in range(images):
        for begin in range(0, rows, step):
            yield slice(image, image + 1), slice(begin, min(begin + step, rows))


def _rows_of(values: np.ndarray | None, width: int) -> np.ndarray | None:
    return None if values is None else tile_rows(values, width)


def matmul(
    a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, chunk: int | None = None
) -> np.ndarray:
    """``a @ b`` (batched over leading axes) into ``out``; with a ``chunk`` shorter than the
    reduction, float32 products of ``chunk`` terms each (exact for integer-valued operands
    whose partial sums stay below ``2**24``), added in float64, then rounded once to float32.
    Two products are added in float32: one IEEE addition rounds their exact sum once, too."""
    depth = b.shape[-2]
    if chunk is None or chunk >= depth:
        return np.matmul(a, b, out=out)
    if 2 * chunk >= depth:
        out = np.matmul(a[..., :chunk], b[..., :chunk, :], out=out)
        out += np.matmul(a[..., chunk:], b[..., chunk:, :])
        return out
    total = np.matmul(a[..., :chunk], b[..., :chunk, :]).astype(F64)
    for begin in range(chunk, depth, chunk):
        total += np.matmul(a[..., begin : begin + chunk], b[..., begin : begin + chunk, :])
    if out is None:
        return total.astype(F32)
    np.copyto(out, total, casting="same_kind")
    return out


def _out_hw(shape: Shape, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> Pair:
    return (
        output_size(shape[1], kernel[0], stride[0], padding[0], dilation[0]),
        output_size(shape[2], kernel[1], stride[1], padding[1], dilation[1]),
    )


# ------------------------------------------------------------------------------ convolutions


def conv_pointwise(
    x: np.ndarray | Codes,
    weight: np.ndarray,
    bias: np.ndarray,
    stride: Pair,
    padding: Pair,
    clip: Clip = None,
    quant: dict | None = None,
    pool: BufferPool | None = None,
    multiplier: np.ndarray | None = None,
    chunk: int | None = None,
) -> np.ndarray | Codes:
    """1x1 convolution without groups: a matmul (``chunk``: see ``matmul``) per block of image
    rows, each finished (``multiplier``, bias, optional ``clip``, then ``encode`` when ``quant``
    holds its bits, scale and zero point) while it is still in cache. ``weight`` is [C, O].
    Codes are decoded a block at a time."""
    if padding != (0, 0) or stride != (1, 1):
        x = as_float(x, pool)
        x = np.ascontiguousarray(pad_nhwc(x, padding)[:, :: stride[0], :: stride[1], :])
    n, h, w, c = x.shape
    bias_rows, multiplier_rows = tile_rows(bias, w), _rows_of(multiplier, w)
    block = max(1, min(n * h, CACHE_BLOCK_BYTES // max(bias_rows.nbytes, 1)))
    rows_out = _Rows.writer((n, h, w, weight.shape[1]), block, quant, pool)
    with _Rows.reader(x, block, pool) as rows_in, rows_out:
        for begin in range(0, n * h, block):
            stop = min(begin + block, n * h)
            target = rows_out.target(begin, stop)
            source = rows_in.read(begin, stop).reshape(-1, c)
            matmul(source, weight, target.reshape(-1, weight.shape[1]), chunk)
            _finish(target, bias_rows, clip, multiplier_rows)
            rows_out.write(begin, target)
    return rows_out.result


def conv_depthwise(
    x: np.ndarray | Codes,
    weight: np.ndarray,
    bias: np.ndarray,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    clip: Clip = None,
    quant: dict | None = None,
    pool: BufferPool | None = None,
    multiplier: np.ndarray | None = None,
) -> np.ndarray | Codes:
    """Depthwise convolution as one shifted multiply-add per tap. ``weight`` is [kH, kW, C]
    (float64: sums in float64), ``multiplier`` as in ``conv_pointwise``.

    Images are processed in blocks of about ``CACHE_BLOCK_BYTES`` of output, so that the
    repeated passes over the output (taps, bias, optional ``clip`` and ``quant`` as in
    ``conv_pointwise``) stay in cache; codes are decoded a block at a time."""
    kernel, (n, _, _, c) = weight.shape[:2], x.shape
    out_hw = _out_hw(x.shape, kernel, stride, padding, dilation)
    bias_rows, multiplier_rows = tile_rows(bias, out_hw[1]), _rows_of(multiplier, out_hw[1])
    block = max(1, min(n, CACHE_BLOCK_BYTES // max(4 * c * math.prod(out_hw), 1)))
    images_out = _Rows.writer((n, *out_hw, c), block, quant, pool, rank=1)
    with _Rows.reader(x, block, pool, rank=1) as images, images_out:
        for begin in range(0, n, block):
            stop = min(begin + block, n)
            target = images_out.target(begin, stop)
            chunk = images.read(begin, stop)
            padded = pad_nhwc(chunk, padding, pool=pool)
            _accumulate_taps(padded, weight, target, stride, dilation)
            _finish(target, bias_rows, clip, multiplier_rows)
            _release_padded(pool, padded, chunk)
            images_out.write(begin, target)
    return images_out.result


class _Rows:
    """Blocks of rows (slices along the leading ``rank`` axes, 2 for image rows, 1 for images)
    of an activation, read from an array or from codes (decoded into scratch space), or written
    to a new float32 array or to new codes (encoded from scratch space)."""

    def __init__(
        self, activation: np.ndarray | Codes, rank: int, block: int, pool: BufferPool | None
    ) -> None:
        self.activation, self.pool = activation, pool
        self.row_shape = tuple(activation.shape[rank:])
        self.row_size = math.prod(self.row_shape)
        self.rows: np.ndarray | Codes = activation  # codes, or the array's rows
        self.scratch = _NO_SCRATCH
        if isinstance(activation, Codes):
            self.scratch = take(pool, (block * self.row_size,))
        else:
            self.rows = activation.reshape(-1, *self.row_shape)

    @classmethod
    def reader(cls, x: np.ndarray | Codes, block: int, pool: BufferPool | None, rank: int = 2):
        """Reads ``x`` ``block`` rows at a time."""
        return cls(x, rank, block, pool)

    @classmethod
    def writer(
        cls, shape: Shape, block: int, quant: dict | None, pool: BufferPool | None, rank: int = 2
    ):
        """Writes an activation of ``shape`` (codes when ``quant``) ``block`` rows at a time."""
        if quant is None:
            return cls(take(pool, shape), rank, block, pool)
        return cls(new_codes(shape, pool=pool, **quant), rank, block, pool)

    def __enter__(self) -> _Rows:
        return self

    def __exit__(self, *exc: object) -> None:
        if isinstance(self.rows, Codes):
            give(self.pool, self.scratch)

    def _scratch(self, begin: int, stop: int) -> np.ndarray:
        return self.scratch[: (stop - begin) * self.row_size].reshape(-1, *self.row_shape)

    def read(self, begin: int, stop: int) -> np.ndarray:
        """Rows ``begin`` to ``stop`` as float32."""
        if not isinstance(self.rows, Codes):
            return self.rows[begin:stop]
        values = self._scratch(begin, stop)
        size = self.row_size
        decode_range(self.rows, begin * size, stop * size, values.reshape(-1), self.pool)
        return values

    def target(self, begin: int, stop: int) -> np.ndarray:
        """Where to compute rows ``begin`` to ``stop`` (then hand them to ``write``)."""
        if isinstance(self.rows, Codes):
            return self._scratch(begin, stop)
        return self.rows[begin:stop]

    def write(self, begin: int, rows: np.ndarray) -> None:
        """Store the rows computed in ``target(begin, ...)`` (encoded, for codes)."""
        if isinstance(self.rows, Codes):
            encode_range(rows.reshape(-1), self.rows, begin * self.row_size, self.pool)

    @property
    def result(self) -> np.ndarray | Codes:
        """The written activation."""
        return self.activation


def _accumulate_taps(
    padded: np.ndarray,
    weight: np.ndarray,
    target: np.ndarray,
    stride: Pair,
    dilation: Pair,
) -> None:
    """``target = sum over taps (i, j) of window tap (i, j) * weight[i, j]`` per channel, in
    one vectorised contraction over the windows of ``padded`` (in float64, rounded once, for a
    float64 ``weight``)."""
    view = windows(padded, weight.shape[:2], stride, dilation, target.shape[1:3])
    if weight.dtype == F32:
        np.einsum("nyxijc,ijc->nyxc", view, weight, out=target)
    else:
        np.copyto(target, np.einsum("nyxijc,ijc->nyxc", view, weight), casting="same_kind")


def conv_grouped(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    kernel: Pair,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    clip: Clip = None,
    pool: BufferPool | None = None,
    multiplier: np.ndarray | None = None,
    chunk: int | None = None,
) -> np.ndarray:
    """Any convolution, by im2col and one (batched per group) matmul per block of output rows,
    the columns of a block taking at most ``SCRATCH_BYTES``. ``weight``: see
    ``prepare_grouped``; ``multiplier`` and ``chunk`` as in ``conv_pointwise``."""
    n, c = x.shape[0], x.shape[3]
    out_hw = _out_hw(x.shape, kernel, stride, padding, dilation)
    out = take(pool, (n, *out_hw, weight.shape[0] * weight.shape[2]))
    padded = pad_nhwc(x, padding, pool=pool)
    view = windows(padded, kernel, stride, dilation, out_hw)
    row_bytes = 4 * out_hw[1] * kernel[0] * kernel[1] * c
    for images, rows in row_blocks(n, out_hw[0], row_bytes, SCRATCH_BYTES):
        source = view[images, rows]
        columns = take(pool, source.shape)
        np.copyto(columns, source)
        _matmul_groups(columns, weight, out[images, rows], chunk)
        give(pool, columns)
    _release_padded(pool, padded, x)
    _finish(out, tile_rows(bias, out_hw[1]), clip, _rows_of(multiplier, out_hw[1]))
    return out


def _matmul_groups(
    columns: np.ndarray, weight: np.ndarray, out: np.ndarray, chunk: int | None
) -> None:
    """``out`` [b, h, w, O] = the im2col ``columns`` [b, h, w, kH, kW, C] times the grouped
    ``weight`` [g, kH*kW*C/g, O/g] (``chunk``: see ``matmul``)."""
    groups, pixels = weight.shape[0], math.prod(columns.shape[:3])
    taps, c = math.prod(columns.shape[3:5]), columns.shape[5]
    if groups == 1:
        matmul(columns.reshape(pixels, -1), weight[0], out.reshape(pixels, -1), chunk)
        return
    split = columns.reshape(pixels, taps, groups, c // groups)
    per_group = split.transpose(2, 0, 1, 3).reshape(groups, pixels, -1)
    out.reshape(pixels, groups, -1)[:] = matmul(per_group, weight, chunk=chunk).transpose(1, 0, 2)


def linear(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    pool: BufferPool | None = None,
    multiplier: np.ndarray | None = None,
    chunk: int | None = None,
) -> np.ndarray:
    """``x @ weight (* multiplier) + bias`` with ``weight`` already transposed to [I, O]
    (``multiplier`` and ``chunk`` as in ``conv_pointwise``)."""
    out = matmul(x, weight, chunk=chunk)
    if multiplier is not None:
        out *= multiplier
    out += bias
    return out


# ----------------------------------------------------------------------------- element-wise


def _output_for(x: np.ndarray, out: np.ndarray | None, pool: BufferPool | None) -> np.ndarray:
    return take(pool, x.shape) if out is None else out


def batchnorm(
    x: np.ndarray,
    scale: np.ndarray,
    shift: np.ndarray,
    out: np.ndarray | None = None,
    pool: BufferPool | None = None,
) -> np.ndarray:
    """Per-channel affine ``x * scale + shift`` (channels are the last axis)."""
    if x.ndim == 4:
        scale = tile_rows(scale, x.shape[2])
    out = np.multiply(x, scale, out=_output_for(x, out, pool))
    return add_per_channel(out, shift)


def relu(
    x: np.ndarray, out: np.ndarray | None = None, pool: BufferPool | None = None
) -> np.ndarray:
    """``max(x, 0)`` (``np.clip`` with both bounds is several times faster than ``maximum``)."""
    return np.clip(x, F32(0), F32(np.inf), out=_output_for(x, out, pool))


def relu6(
    x: np.ndarray, out: np.ndarray | None = None, pool: BufferPool | None = None
) -> np.ndarray:
    """``min(max(x, 0), 6)``."""
    return np.clip(x, F32(0), F32(6), out=_output_for(x, out, pool))


def add(
    a: np.ndarray, b: np.ndarray, out: np.ndarray | None = None, pool: BufferPool | None = None
) -> np.ndarray:
    """Element-wise sum."""
    return np.add(a, b, out=_output_for(a, out, pool))


# ---------------------------------------------------------------------------------- pooling


def avgpool2d(
    x: np.ndarray, kernel: Pair, stride: Pair, padding: Pair, pool: BufferPool | None = None
) -> np.ndarray:
    """Average pooling with zero padding counted in the divisor (torch's default)."""
    padded = pad_nhwc(x, padding, pool=pool)
    out = _pool_reduce(np.add, padded, kernel, stride, pool)
    _release_padded(pool, padded, x)
    out /= F32(kernel[0] * kernel[1])
    return out


def avgpool2d_codes(
    x: Codes, kernel: Pair, stride: Pair, padding: Pair, pool: BufferPool | None = None
) -> np.ndarray:
    """Average pooling of codes, exactly: the window sums ``S`` of ``q - zero_point`` (padding
    counts as 0 and in the divisor) in float64, then ``float32(S) * scale / window``."""
    values = decode(integers(x), pool)
    padded = pad_nhwc(values, padding).astype(F64)
    give(pool, values)
    sums = _pool_reduce(np.add, padded, kernel, stride, None)
    return _average_codes(sums, x.scale, kernel[0] * kernel[1])


def maxpool2d(
    x: np.ndarray, kernel: Pair, stride: Pair, padding: Pair, pool: BufferPool | None = None
) -> np.ndarray:
    """Max pooling; padding never wins (it is -inf)."""
    padded = pad_nhwc(x, padding, -np.inf, pool)
    out = _pool_reduce(np.maximum, padded, kernel, stride, pool)
    _release_padded(pool, padded, x)
    return out


def _pool_reduce(
    ufunc: np.ufunc, padded: np.ndarray, kernel: Pair, stride: Pair, pool: BufferPool | None
) -> np.ndarray:
    """``ufunc`` reduced over every (unpadded-arithmetic) window of ``padded``, separably: over
    the kW columns of each window row (one reduction of a strided view), then over the kH rows
    of those (another), so a window costs kH + kW reads, not kH * kW."""
    n, height, width, c = padded.shape
    out_h = (height - kernel[0]) // stride[0] + 1
    out_w = (width - kernel[1]) // stride[1] + 1
    sn, sh, sw, sc = padded.strides
    columns = as_strided(padded, (n, height, out_w, kernel[1], c), (sn, sh, sw * stride[1], sw, sc))
    rows = take(pool, (n, height, out_w, c), padded.dtype.type)
    ufunc.reduce(columns, axis=3, out=rows)
    rn, rh, rw, rc = rows.strides
    windows_ = as_strided(rows, (n, out_h, kernel[0], out_w, c), (rn, rh * stride[0], rh, rw, rc))
    out = take(pool, (n, out_h, out_w, c), padded.dtype.type)
    ufunc.reduce(windows_, axis=2, out=out)
    give(pool, rows)
    return out


def global_avgpool(x: np.ndarray, pool: BufferPool | None = None) -> np.ndarray:
    """Mean over H and W: [N, H, W, C] -> [N, 1, 1, C]."""
    return x.mean(axis=(1, 2), keepdims=True, dtype=F32)


def global_avgpool_codes(x: Codes, pool: BufferPool | None = None) -> np.ndarray:
    """Mean of codes over H and W, exactly: as ``avgpool2d_codes`` with the whole map as the
    window."""
    values = decode(integers(x), pool)
    sums = values.sum(axis=(1, 2), keepdims=True, dtype=F64)
    give(pool, values)
    return _average_codes(sums, x.scale, x.shape[1] * x.shape[2])


def _average_codes(sums: np.ndarray, scale: float, window: int) -> np.ndarray:
    """``(float32(sums) * float32(scale)) / float32(window)``: two float32 operations."""
    out = sums.astype(F32)
    out *= F32(scale)
    out /= F32(window)
    return out


def flatten(x: np.ndarray, pool: BufferPool | None = None) -> np.ndarray:
    """[N, ...] -> [N, F] in NCHW element order; always a new array (never a view)."""
    if x.ndim == 4 and x.shape[1] * x.shape[2] > 1:  # a copy even when one channel is a view
        return np.array(x.transpose(0, 3, 1, 2), order="C").reshape(x.shape[0], -1)
    return x.reshape(x.shape[0], -1).copy()
