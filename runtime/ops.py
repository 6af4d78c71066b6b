"""Vectorised numpy kernels for the graph's ops, on float32 NHWC feature maps or [N, F] features.

Weights arrive pre-arranged by ``prepare_*`` (done once per program). Python loops only run over
kernel taps, never over pixels or channels. Element-wise kernels take an optional ``out`` array
(which may be their input) so that the program can run them in place. Every kernel accepts a
``pool``; the large ones take their arrays from it: reusing memory across the batches of a run
avoids the page faults of fresh allocations, which otherwise cost as much as the arithmetic.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

F32 = np.float32
CACHE_BLOCK_BYTES = 256 * 1024  # output bytes per depthwise block, well inside a core's L2
Pair = tuple[int, int]
Shape = tuple[int, ...]
Clip = tuple[float, float] | None  # a fused relu / relu6: (low, high) bounds


class BufferPool:
    """Float32 arrays recycled by exact shape (one pool per run; not thread-safe)."""

    def __init__(self) -> None:
        """An empty pool."""
        self._free: dict[Shape, list[np.ndarray]] = {}

    def take(self, shape: Shape) -> np.ndarray:
        """An uninitialised C-contiguous float32 array of ``shape``."""
        stack = self._free.get(tuple(shape))
        return stack.pop() if stack else np.empty(shape, dtype=F32)

    def give(self, array: np.ndarray) -> None:
        """Hand back an array from ``take`` that nothing reads any more."""
        self._free.setdefault(array.shape, []).append(array)


def _take(pool: BufferPool | None, shape: Shape) -> np.ndarray:
    return np.empty(shape, dtype=F32) if pool is None else pool.take(shape)


def _give(pool: BufferPool | None, array: np.ndarray) -> None:
    if pool is not None:
        pool.give(array)


# ----------------------------------------------------------------------------- weight layouts


def prepare_pointwise(weight: np.ndarray) -> np.ndarray:
    """[O, C, 1, 1] -> [C, O], the right-hand side of ``x @ w``."""
    return np.ascontiguousarray(weight[:, :, 0, 0].T, dtype=F32)


def prepare_depthwise(weight: np.ndarray) -> np.ndarray:
    """[C, 1, kH, kW] -> [kH, kW, C], one row of per-channel factors per tap."""
    return np.ascontiguousarray(weight[:, 0].transpose(1, 2, 0), dtype=F32)


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
    out = _take(pool, (n, h + 2 * ph, w + 2 * pw, c))
    out[:, :ph] = value
    out[:, ph + h :] = value
    out[:, ph : ph + h, :pw] = value
    out[:, ph : ph + h, pw + w :] = value
    out[:, ph : ph + h, pw : pw + w] = x
    return out


def _release_padded(pool: BufferPool | None, padded: np.ndarray, x: np.ndarray) -> None:
    if padded is not x:
        _give(pool, padded)


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


def _finish(block: np.ndarray, bias_rows: np.ndarray, clip: Clip) -> None:
    """Add the row-tiled bias to an [..., W, C] block in place, then clip it if asked."""
    np.add(block, bias_rows, out=block)
    if clip is not None:
        np.clip(block, F32(clip[0]), F32(clip[1]), out=block)


def _taps(
    padded: np.ndarray, kernel: Pair, stride: Pair, dilation: Pair, out_hw: Pair
) -> Iterator[tuple[int, int, np.ndarray]]:
    """(i, j, strided view of the padded input seen by kernel tap (i, j))."""
    (sh, sw), (dh, dw), (ho, wo) = stride, dilation, out_hw
    for i in range(kernel[0]):
        for j in range(kernel[1]):
            rows = slice(i * dh, i * dh + sh * (ho - 1) + 1, sh)
            cols = slice(j * dw, j * dw + sw * (wo - 1) + 1, sw)
            yield i, j, padded[:, rows, cols, :]


def _out_hw(x: np.ndarray, kernel: Pair, stride: Pair, padding: Pair, dilation: Pair) -> Pair:
    return (
        output_size(x.shape[1], kernel[0], stride[0], padding[0], dilation[0]),
        output_size(x.shape[2], kernel[1], stride[1], padding[1], dilation[1]),
    )


# ------------------------------------------------------------------------------ convolutions


def conv_pointwise(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    stride: Pair,
    padding: Pair,
    clip: Clip = None,
    pool: BufferPool | None = None,
) -> np.ndarray:
    """1x1 convolution without groups: a matmul per block of image rows, each finished (bias,
    optional ``clip``) while it is still in cache. ``weight`` is [C, O]."""
    if padding != (0, 0) or stride != (1, 1):
        x = np.ascontiguousarray(pad_nhwc(x, padding)[:, :: stride[0], :: stride[1], :])
    n, h, w, c = x.shape
    out = _take(pool, (n, h, w, weight.shape[1]))
    rows_in, rows_out = x.reshape(n * h, w, c), out.reshape(n * h, w, -1)
    bias_rows = tile_rows(bias, w)
    block = max(1, CACHE_BLOCK_BYTES // max(bias_rows.nbytes, 1))
    for begin in range(0, n * h, block):
        target = rows_out[begin : begin + block]
        source = rows_in[begin : begin + block].reshape(-1, c)
        np.matmul(source, weight, out=target.reshape(-1, weight.shape[1]))
        _finish(target, bias_rows, clip)
    return out


def conv_depthwise(
    x: np.ndarray,
    weight: np.ndarray,
    bias: np.ndarray,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    clip: Clip = None,
    pool: BufferPool | None = None,
) -> np.ndarray:
    """Depthwise convolution as one shifted multiply-add per tap. ``weight`` is [kH, kW, C].

    Images are processed in blocks of about ``CACHE_BLOCK_BYTES`` of output, so that the
    repeated passes over the output (taps, bias, optional ``clip``) stay in cache."""
    kernel = weight.shape[:2]
    out_hw = _out_hw(x, kernel, stride, padding, dilation)
    out = _take(pool, (x.shape[0], *out_hw, x.shape[3]))
    rows, bias_rows = tile_rows(weight, out_hw[1]), tile_rows(bias, out_hw[1])
    block = max(1, CACHE_BLOCK_BYTES // max(out[:1].nbytes, 1))
    product = _take(pool, (min(block, len(x)), *out.shape[1:]))
    for begin in range(0, len(x), block):
        chunk = x[begin : begin + block]
        padded = pad_nhwc(chunk, padding, pool=pool)
        target = out[begin : begin + block]
        _accumulate_taps(padded, rows, target, product, stride, dilation)
        _finish(target, bias_rows, clip)
        _release_padded(pool, padded, chunk)
    _give(pool, product)
    return out


def _accumulate_taps(
    padded: np.ndarray,
    rows: np.ndarray,
    target: np.ndarray,
    product: np.ndarray,
    stride: Pair,
    dilation: Pair,
) -> None:
    """``target = sum over taps of view * rows[i, j]`` (``product`` is scratch space)."""
    scratch = product[: len(target)]
    for i, j, view in _taps(padded, rows.shape[:2], stride, dilation, target.shape[1:3]):
        if i == 0 and j == 0:
            np.multiply(view, rows[0, 0], out=target)
        else:
            np.multiply(view, rows[i, j], out=scratch)
            target += scratch


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
) -> np.ndarray:
    """Any convolution, by im2col and one (batched per group) matmul. ``weight``: see
    ``prepare_grouped``."""
    groups = weight.shape[0]
    n, c = x.shape[0], x.shape[3]
    out_hw = _out_hw(x, kernel, stride, padding, dilation)
    columns = _take(pool, (n, *out_hw, kernel[0], kernel[1], c))
    padded = pad_nhwc(x, padding, pool=pool)
    for i, j, view in _taps(padded, kernel, stride, dilation, out_hw):
        columns[:, :, :, i, j, :] = view
    _release_padded(pool, padded, x)
    pixels = n * out_hw[0] * out_hw[1]
    out = _take(pool, (n, *out_hw, groups * weight.shape[2]))
    if groups == 1:
        np.matmul(columns.reshape(pixels, -1), weight[0], out=out.reshape(pixels, -1))
    else:
        per_group = columns.reshape(pixels, kernel[0] * kernel[1], groups, c // groups)
        per_group = per_group.transpose(2, 0, 1, 3).reshape(groups, pixels, -1)
        out.reshape(pixels, groups, -1)[:] = np.matmul(per_group, weight).transpose(1, 0, 2)
    _give(pool, columns)
    _finish(out, tile_rows(bias, out_hw[1]), clip)
    return out


def linear(
    x: np.ndarray, weight: np.ndarray, bias: np.ndarray, pool: BufferPool | None = None
) -> np.ndarray:
    """``x @ weight + bias`` with ``weight`` already transposed to [I, O]."""
    out = np.matmul(x, weight)
    out += bias
    return out


# ----------------------------------------------------------------------------- element-wise


def _output_for(x: np.ndarray, out: np.ndarray | None, pool: BufferPool | None) -> np.ndarray:
    return _take(pool, x.shape) if out is None else out


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


def quantize(
    x: np.ndarray,
    bits: int,
    scale: float,
    zero_point: int,
    out: np.ndarray | None = None,
    pool: BufferPool | None = None,
) -> np.ndarray:
    """Fake quantization exactly as ``torch.fake_quantize_per_tensor_affine(x, scale,
    zero_point, 0, 2**bits - 1)``, in float32 with round-half-even (SPEC.md section 7)."""
    scale32, zero32 = F32(scale), F32(zero_point)
    q = np.multiply(x, F32(1) / scale32, out=_output_for(x, out, pool))
    np.rint(q, out=q)
    q += zero32
    np.clip(q, F32(0), F32(2**bits - 1), out=q)
    q -= zero32
    q *= scale32
    return q


# ---------------------------------------------------------------------------------- pooling


def avgpool2d(
    x: np.ndarray, kernel: Pair, stride: Pair, padding: Pair, pool: BufferPool | None = None
) -> np.ndarray:
    """Average pooling with zero padding counted in the divisor (torch's default)."""
    out_hw = _out_hw(x, kernel, stride, padding, (1, 1))
    out = _take(pool, (x.shape[0], *out_hw, x.shape[3]))
    out[:] = 0
    padded = pad_nhwc(x, padding, pool=pool)
    for _, _, view in _taps(padded, kernel, stride, (1, 1), out_hw):
        out += view
    _release_padded(pool, padded, x)
    out /= F32(kernel[0] * kernel[1])
    return out


def maxpool2d(
    x: np.ndarray, kernel: Pair, stride: Pair, padding: Pair, pool: BufferPool | None = None
) -> np.ndarray:
    """Max pooling; padding never wins (it is -inf)."""
    out_hw = _out_hw(x, kernel, stride, padding, (1, 1))
    out = _take(pool, (x.shape[0], *out_hw, x.shape[3]))
    out[:] = -np.inf
    padded = pad_nhwc(x, padding, -np.inf, pool)
    for _, _, view in _taps(padded, kernel, stride, (1, 1), out_hw):
        np.maximum(out, view, out=out)
    _release_padded(pool, padded, x)
    return out


def global_avgpool(x: np.ndarray, pool: BufferPool | None = None) -> np.ndarray:
    """Mean over H and W: [N, H, W, C] -> [N, 1, 1, C]."""
    return x.mean(axis=(1, 2), keepdims=True, dtype=F32)


def flatten(x: np.ndarray, pool: BufferPool | None = None) -> np.ndarray:
    """[N, ...] -> [N, F] in NCHW element order; always a new array (never a view)."""
    if x.ndim == 4 and x.shape[1] * x.shape[2] > 1:
        return np.ascontiguousarray(x.transpose(0, 3, 1, 2)).reshape(x.shape[0], -1)
    return x.reshape(x.shape[0], -1).copy()
