"""A validated graph compiled into a list of numpy kernels, and the loader for .mbz files.

Values flow in NHWC layout internally (feature maps) or as [N, F] (flat features); only the
graph input of ``run`` is converted from NCHW, once. A conv2d followed by its relu/relu6 runs as
one fused step, and so does any node followed by its quantize. A quantize output is held as
integer codes (``Codes``): 1x1 and depthwise convolutions decode them block by block, other
steps read a decoded scratch copy. Given the plan of exact layers (``exact.exact_layers``), a
conv2d or linear that reads codes decodes them to their integers ``q - zero_point`` and runs on
integer weights with its exact epilogue, and pooling reads codes as integer sums (SPEC.md 7.3).
A value is freed as soon as its last reader has run (its
memory goes back to the run's buffer pool), and element-wise ops overwrite their input when
nothing else needs it.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any, cast

import numpy as np

from mbz.format.checks import json_float32, json_scale
from mbz.format.constants import Op
from mbz.format.container import MbzFile, read_mbz
from mbz.format.errors import MbzFormatError
from mbz.format.limits import DEFAULT_LIMITS, Limits

from . import kernels
from .codes import BufferPool, Codes, as_float, decode, encode, integers
from .exact import FLOAT32_EXACT, ExactLayer, exact_layers
from .graph import GraphCost, Shape, analyze
from .threads import blas_threads

F32 = np.float32
CLIP_BOUNDS = {Op.RELU: (0.0, float("inf")), Op.RELU6: (0.0, 6.0)}
IN_PLACE_OPS = frozenset({Op.BATCHNORM, Op.RELU, Op.RELU6, Op.ADD})
FUSED = frozenset({"activation", "quantize"})  # attrs that fusion adds to a node
# Kernels that read codes and write them (``quant``) a block at a time, in cache.
BLOCK_CODED = frozenset({kernels.conv_pointwise, kernels.conv_depthwise})
PREPROCESS_KEYS = frozenset({"layout", "dtype", "mean", "std"})
BATCH_ACTIVATION_BYTES = 1 << 28  # predict shrinks its batches to hold at most this at once
Value = np.ndarray | Codes
Kernel = Callable[..., Value]
Plan = dict[str, ExactLayer]


@dataclass(frozen=True)
class Step:
    """One node, ready to run: its kernel (weights bound), where it reads and writes, and which
    values die once it has run."""

    name: str
    kernel: Kernel
    inputs: tuple[str, ...]
    output: str
    in_place: bool
    frees: tuple[str, ...]
    reads_codes: bool = False  # the kernel takes codes as they are (else they are decoded)
    integer_input: bool = False  # the first input is codes read as their integers (exact)


class Program:
    """An executable graph: ``predict`` on uint8 NHWC images, ``run`` on a float32 NCHW batch."""

    def __init__(
        self,
        graph: dict,
        params: dict[str, np.ndarray],
        preprocess: dict,
        limits: Limits = DEFAULT_LIMITS,
        exact: Plan | None = None,
    ) -> None:
        """Validate graph, params and preprocess within ``limits`` (MbzFormatError) and
        pre-arrange the weights. ``exact``: the graph's ``exact.exact_layers``, whose nodes then
        compute exactly, as does pooling of codes (SPEC.md 7.3); None runs every node on the
        float path."""
        self.value_shapes: dict[str, Shape]
        self.cost: GraphCost
        self.value_shapes, self.cost = analyze(graph, params, limits)
        self.input_name: str = graph["input"]
        self.output_name: str = graph["output"]
        self.input_shape: Shape = self.value_shapes[self.input_name]
        self.num_classes: int = self.value_shapes[self.output_name][0]
        self.mean, self.std = check_preprocess(preprocess, self.input_shape[0])
        self.exact: bool = exact is not None
        self.steps: list[Step] = _compile(graph, params, exact)
        self.last_peak_bytes_per_image: int = 0

    def run(self, x_nchw: np.ndarray) -> np.ndarray:
        """Logits [N, classes] of a preprocessed float32 batch [N, C, H, W]."""
        x = np.asarray(x_nchw)
        if x.ndim != 4 or x.shape[1:] != self.input_shape:
            raise ValueError(f"expected a batch [N, *{list(self.input_shape)}], got {x.shape}")
        nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=F32)
        return self._execute(nhwc, BufferPool())

    def preprocess_images(self, images_uint8_nhwc: np.ndarray) -> np.ndarray:
        """``((image / 255) - mean) / std`` in float32, staying NHWC."""
        images = self._check_images(images_uint8_nhwc)
        return (images.astype(F32) / F32(255) - self.mean) / self.std

    def predict(
        self,
        images: np.ndarray,
        batch_size: int = 16,
        progress: Callable[[int], None] | None = None,
        threads: int = 1,
    ) -> np.ndarray:
        """Logits [N, classes] of uint8 images [N, H, W, C], ``batch_size`` images at a time
        (fewer when their activations would exceed BATCH_ACTIVATION_BYTES), with ``threads``
        BLAS threads; ``progress(count)`` is called after each chunk."""
        images = self._check_images(images)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        batch_size = max(1, min(batch_size, BATCH_ACTIVATION_BYTES // self.cost.peak_bytes))
        pool = BufferPool()
        with blas_threads(threads):
            return predict_in_batches(
                lambda chunk: self._execute(self.preprocess_images(chunk), pool),
                images,
                batch_size,
                self.num_classes,
                progress,
            )

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        c, h, w = self.input_shape
        if images.ndim != 4 or images.shape[1:] != (h, w, c):
            raise ValueError(f"expected uint8 images [N, {h}, {w}, {c}], got {images.shape}")
        return images

    def _execute(self, x_nhwc: np.ndarray, pool: BufferPool) -> np.ndarray:
        """Run every step on an NHWC batch, tracking the peak bytes of live activations: the
        values held between steps, each at its stored size (codes for quantized ones).

        Dead values go back to ``pool`` (never the graph input, which may be the caller's), and
        so do the float arrays that codes were decoded into for one step."""
        values: dict[str, Value] = {self.input_name: x_nhwc}
        peak = _live_bytes(values)
        for step in self.steps:
            stored = [values[name] for name in step.inputs]
            if step.integer_input:
                stored[0] = integers(cast(Codes, stored[0]))
            args = stored if step.reads_codes else [as_float(value, pool) for value in stored]
            extra = {"out": args[0]} if step.in_place else {}
            result = values[step.output] = step.kernel(*args, pool=pool, **extra)
            peak = max(peak, _live_bytes(values))
            for arg, value in zip(args, stored, strict=True):
                if isinstance(arg, np.ndarray) and arg is not value and arg is not result:
                    pool.give(arg)
            for name in step.frees:
                _release(values, name, pool, name == self.input_name)
        self.last_peak_bytes_per_image = math.ceil(peak / max(len(x_nhwc), 1))
        output = values[self.output_name]
        return decode(output) if isinstance(output, Codes) else output.copy()


def predict_in_batches(
    run: Callable[[np.ndarray], np.ndarray],
    images: np.ndarray,
    batch_size: int,
    num_classes: int,
    progress: Callable[[int], None] | None = None,
) -> np.ndarray:
    """Logits [N, num_classes] of ``images``, ``run`` on ``batch_size`` of them at a time (the
    batch loop of every runtime that takes uint8 images); ``progress(count)`` after each."""
    chunks = [np.zeros((0, num_classes), dtype=F32)]
    for begin in range(0, len(images), batch_size):
        chunk = images[begin : begin + batch_size]
        chunks.append(run(chunk))
        if progress is not None:
            progress(len(chunk))
    return np.concatenate(chunks)


def load_program(
    source: str | os.PathLike | MbzFile, limits: Limits = DEFAULT_LIMITS, exact: bool = True
) -> Program:
    """The Program of a .mbz file (a path, read with ``read_mbz``, or a read ``MbzFile``),
    validated by ``check_runnable`` before any weight is decoded to float32. Its exact layers
    compute exactly (SPEC.md 7.3) unless ``exact`` is False (the float path everywhere, for
    comparisons)."""
    mbz = source if isinstance(source, MbzFile) else read_mbz(source, limits)
    check_runnable(mbz, limits)
    graph = mbz.metadata["graph"]
    plan = exact_layers(graph, mbz.tensors) if exact else None
    params = {name: tensor.decode() for name, tensor in mbz.tensors.items()}
    return Program(graph, params, mbz.metadata["preprocess"], limits, plan)


def check_runnable(
    mbz: MbzFile, limits: Limits = DEFAULT_LIMITS
) -> tuple[dict[str, Shape], np.ndarray, np.ndarray]:
    """Validate a read file's graph and preprocessing within ``limits`` from the tensors'
    shapes alone (MbzFormatError); returns every value's per-image shape, and the float32
    preprocessing mean and std."""
    metadata = mbz.metadata
    if not all(key in metadata for key in ("graph", "preprocess")):
        raise MbzFormatError("metadata: missing graph or preprocess")
    shapes, _ = analyze(metadata["graph"], shape_standins(mbz), limits)
    mean, std = check_preprocess(metadata["preprocess"], shapes[metadata["graph"]["input"]][0])
    return shapes, mean, std


def shape_standins(mbz: MbzFile) -> dict[str, np.ndarray]:
    """Read-only zero-byte arrays with the shapes of the file's tensors, for validation."""
    return {name: np.broadcast_to(F32(0), tensor.shape) for name, tensor in mbz.tensors.items()}


# ------------------------------------------------------------------------------ compilation


def _array(value: Value) -> np.ndarray:
    """The array that holds a value's bytes."""
    return value.data if isinstance(value, Codes) else value


def _release(values: dict[str, Value], name: str, pool: BufferPool, keep: bool) -> None:
    """Forget a value; recycle its array unless ``keep`` or another value still holds it."""
    array = _array(values.pop(name))
    if not keep and all(_array(other) is not array for other in values.values()):
        pool.give(array)


def _live_bytes(values: dict[str, Value]) -> int:
    """Bytes held by the distinct arrays among ``values`` (in-place outputs count once)."""
    arrays = [_array(value) for value in values.values()]
    owners = {id(a if a.base is None else a.base): a.nbytes for a in arrays}
    return sum(owners.values())


def check_preprocess(preprocess: Any, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The float32 mean and std of a valid preprocess object: finite float32 means, and stds
    that are normal float32 numbers > 0 (so that dividing by them stays finite)."""
    if not isinstance(preprocess, dict) or set(preprocess) != PREPROCESS_KEYS:
        raise MbzFormatError(f"preprocess: must be an object with keys {sorted(PREPROCESS_KEYS)}")
    if preprocess["layout"] != "NHWC" or preprocess["dtype"] != "uint8":
        raise MbzFormatError("preprocess: layout must be 'NHWC' and dtype 'uint8'")
    mean = _channel_floats(preprocess, "mean", channels, json_float32)
    std = _channel_floats(preprocess, "std", channels, json_scale)
    return mean, std


def _channel_floats(
    preprocess: dict, key: str, channels: int, check: Callable[[Any, str], np.float32]
) -> np.ndarray:
    values = preprocess[key]
    if not isinstance(values, list) or len(values) != channels:
        raise MbzFormatError(f"preprocess: {key} must be a list of {channels} numbers")
    return np.array([check(v, f"preprocess: each {key}") for v in values], dtype=F32)


def _compile(graph: dict, params: dict[str, np.ndarray], exact: Plan | None) -> list[Step]:
    """Steps in graph order, with in-place and free decisions from each value's last reader;
    ``exact`` as in ``Program``."""
    nodes = _fuse(graph)
    coded = {node["output"] for node in nodes if _quantizes(node)}
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        last_use[node["output"]] = index
        last_use.update((name, index) for name in node["inputs"])
    last_use.pop(graph["output"])
    frees: dict[int, list[str]] = {}
    for name, index in last_use.items():
        frees.setdefault(index, []).append(name)
    steps = []
    for index, node in enumerate(nodes):
        plan = None if exact is None else exact.get(node["name"])
        pooled_codes = exact is not None and node["op"] in CODES_POOLING
        pooled_codes = pooled_codes and node["inputs"][0] in coded
        kernel, reads_codes = _kernel(node, params, plan, pooled_codes)
        steps.append(
            Step(
                name=node["name"],
                kernel=kernel,
                inputs=tuple(node["inputs"]),
                output=node["output"],
                in_place=_can_run_in_place(node, index, last_use, graph["input"], coded),
                frees=tuple(frees.get(index, ())),
                reads_codes=reads_codes,
                integer_input=plan is not None,
            )
        )
    return steps


def _fuse(graph: dict) -> list[dict]:
    """The nodes, where a node directly followed by its only reader merges with it: a conv2d
    with a relu/relu6 (an ``activation`` attr), then any node but a quantize with a quantize (a
    ``quantize`` attr holding the quantize's attrs). The merged node writes the reader's output."""
    nodes, output = graph["nodes"], graph["output"]
    readers = Counter(name for node in nodes for name in node["inputs"])
    fused: list[dict] = []
    for node in nodes:
        merged = _merged(fused[-1], node, readers, output) if fused else None
        if merged:
            fused[-1] = merged
        else:
            fused.append(node)
    return fused


def _merged(node: dict, after: dict, readers: Counter, graph_output: str) -> dict | None:
    """``node`` with ``after`` merged into it (see ``_fuse``), or None when they do not fuse."""
    value = node["output"]
    if after["inputs"] != [value] or readers[value] != 1 or value == graph_output:
        return None
    if after["op"] == Op.QUANTIZE and not _quantizes(node):
        extra = {"quantize": after["attrs"]}
    elif (
        node["op"] == Op.CONV2D and after["op"] in CLIP_BOUNDS and not FUSED & node["attrs"].keys()
    ):
        extra = {"activation": after["op"]}
    else:
        return None
    return {**node, "attrs": {**node["attrs"], **extra}, "output": after["output"]}


def _quantizes(node: dict) -> bool:
    """Whether a (fused) node's output is held as codes."""
    return node["op"] == Op.QUANTIZE or "quantize" in node["attrs"]


def _can_run_in_place(
    node: dict, index: int, last_use: dict[str, int], graph_input: str, coded: set[str]
) -> bool:
    """Overwrite the first input when this node is its last reader (never the caller's input),
    or when it is held as codes (each step reads a freshly decoded copy)."""
    first = node["inputs"][0]
    if node["op"] not in IN_PLACE_OPS or first == graph_input:
        return False
    return first in coded or last_use.get(first) == index


def _kernel(
    node: dict, params: dict[str, np.ndarray], plan: ExactLayer | None, pooled_codes: bool
) -> tuple[Kernel, bool]:
    """The node's kernel, and whether it reads codes as they are: exact with a ``plan``, and
    pooling of codes when ``pooled_codes`` (SPEC.md 7.3)."""
    attrs = dict(node["attrs"])
    quantize = attrs.pop("quantize", None)
    if plan is not None:
        kernel = _exact_kernel(node["op"], plan, attrs, quantize)
    elif pooled_codes:
        kernel = CODES_POOLING[node["op"]]({}, attrs)
    else:
        weights = {role: np.asarray(params[name], F32) for role, name in node["params"].items()}
        kernel = KERNEL_BUILDERS[node["op"]](weights, attrs)
    blocked = getattr(kernel, "func", None) in BLOCK_CODED
    if quantize is not None and blocked:
        kernel = partial(kernel, quant=_code_attrs(quantize))
    elif quantize is not None:
        kernel = partial(_then_encode, kernel, _code_attrs(quantize))
    return kernel, blocked or pooled_codes


def _clip_subsumed(activation: str | None, quantize: dict) -> bool:
    """Whether a fused relu/relu6 changes none of the codes of the quantize that follows it, so
    that its pass can be skipped: with zero point 0, the quantize's own clamp maps every
    negative value to code 0, and every value above 6 to the top code when ``6 * inv_scale``
    (float32, rounded monotonically) reaches it."""
    if activation not in CLIP_BOUNDS or quantize["zero_point"] != 0:
        return False
    high = F32(CLIP_BOUNDS[activation][1]) * (F32(1) / F32(quantize["scale"]))
    return bool(high >= 2 ** quantize["bits"] - 1)


def _exact_kernel(op: Op, plan: ExactLayer, attrs: dict, quantize: dict | None) -> Kernel:
    """The float kernel of a conv2d/linear on the plan's integer weight (as float32, exact),
    with its epilogue multiplier, summing exactly: in float32 chunks (``_chunk_terms``), or for
    a depthwise convolution whose sums could reach ``2**24``, in float64. The fused clip is
    skipped where the ``quantize`` that follows makes it a no-op (``_clip_subsumed``); the
    float path keeps it, so that it stays the runtime as it was before exact layers."""
    if quantize is not None and _clip_subsumed(attrs.get("activation"), quantize):
        attrs = {key: value for key, value in attrs.items() if key != "activation"}
    weights = {"weight": plan.weight.astype(F32), "bias": plan.bias}
    kernel = cast(partial, KERNEL_BUILDERS[op](weights, attrs))
    extra: dict[str, Any] = {"multiplier": plan.multiplier}
    if kernel.func is not kernels.conv_depthwise:
        extra["chunk"] = _chunk_terms(plan)
    elif not plan.float32_exact:
        extra["weight"] = kernel.keywords["weight"].astype(np.float64)
    return partial(kernel, **extra)


def _chunk_terms(plan: ExactLayer) -> int | None:
    """Terms per float32 partial product of an exact reduction that could reach ``2**24``
    (None: one float32 reduction): ``chunk_channels()`` input channels with all their kernel
    taps, fewer when one channel's terms alone could reach it (a kernel of hundreds of taps)."""
    if plan.float32_exact:
        return None
    taps = plan.fan_in // plan.weight.shape[1]
    return min(plan.chunk_channels() * taps, (FLOAT32_EXACT - 1) // (plan.bound // plan.fan_in))


def _then_encode(
    kernel: Kernel,
    code: dict,
    *args: Value,
    pool: BufferPool,
    out: np.ndarray | None = None,
) -> Codes:
    """``kernel``'s result as codes, encoded in place (the float result dies here): it goes
    back to ``pool`` unless it is ``out`` (an input the caller recycles)."""
    # a kernel that encodes nothing itself returns float32
    result = cast(np.ndarray, kernel(*args, pool=pool, **({} if out is None else {"out": out})))
    codes = encode(result, pool=pool, overwrite=True, **code)
    if result is not out:
        pool.give(result)
    return codes


def _conv_kernel(weights: dict[str, np.ndarray], attrs: dict) -> Kernel:
    weight, bias, groups = weights["weight"], weights["bias"], attrs["groups"]
    stride, padding, dilation = (tuple(attrs[k]) for k in ("stride", "padding", "dilation"))
    clip = CLIP_BOUNDS.get(attrs.get("activation"))
    fixed: dict[str, Any] = {"bias": bias, "stride": stride, "padding": padding, "clip": clip}
    if groups == 1 and weight.shape[2:] == (1, 1):
        return partial(kernels.conv_pointwise, weight=kernels.prepare_pointwise(weight), **fixed)
    fixed["dilation"] = dilation
    if groups == weight.shape[0] and weight.shape[1] == 1:
        return partial(kernels.conv_depthwise, weight=kernels.prepare_depthwise(weight), **fixed)
    grouped = kernels.prepare_grouped(weight, groups)
    return partial(kernels.conv_grouped, weight=grouped, kernel=weight.shape[2:], **fixed)


def _linear_kernel(weights: dict[str, np.ndarray], attrs: dict) -> Kernel:
    weight = np.ascontiguousarray(weights["weight"].T)
    return partial(kernels.linear, weight=weight, bias=weights["bias"])


def _batchnorm_kernel(weights: dict[str, np.ndarray], attrs: dict) -> Kernel:
    return partial(kernels.batchnorm, scale=weights["scale"], shift=weights["shift"])


def _pool_kernel(op: Kernel) -> Callable[[dict, dict], Kernel]:
    def build(weights: dict[str, np.ndarray], attrs: dict) -> Kernel:
        pairs = {key: tuple(attrs[key]) for key in ("kernel", "stride", "padding")}
        return partial(op, **pairs)

    return build


def _code_attrs(attrs: dict) -> dict:
    """A quantize node's attrs as ``encode`` keywords."""
    bits, zero_point = attrs["bits"], attrs["zero_point"]
    return {"bits": bits, "scale": float(attrs["scale"]), "zero_point": zero_point}


def _quantize_kernel(weights: dict[str, np.ndarray], attrs: dict) -> Kernel:
    return partial(encode, **_code_attrs(attrs))


def _plain(op: Kernel) -> Callable[[dict, dict], Kernel]:
    return lambda weights, attrs: op


KERNEL_BUILDERS: dict[Op, Callable[[dict[str, np.ndarray], dict], Kernel]] = {
    Op.CONV2D: _conv_kernel,
    Op.LINEAR: _linear_kernel,
    Op.BATCHNORM: _batchnorm_kernel,
    Op.RELU: _plain(kernels.relu),
    Op.RELU6: _plain(kernels.relu6),
    Op.ADD: _plain(kernels.add),
    Op.AVGPOOL2D: _pool_kernel(kernels.avgpool2d),
    Op.MAXPOOL2D: _pool_kernel(kernels.maxpool2d),
    Op.GLOBAL_AVGPOOL: _plain(kernels.global_avgpool),
    Op.FLATTEN: _plain(kernels.flatten),
    Op.QUANTIZE: _quantize_kernel,
}
# Pooling whose input is codes: exact integer sums (given an exact plan).
CODES_POOLING: dict[Op, Callable[[dict[str, np.ndarray], dict], Kernel]] = {
    Op.AVGPOOL2D: _pool_kernel(kernels.avgpool2d_codes),
    Op.GLOBAL_AVGPOOL: _plain(kernels.global_avgpool_codes),
}
