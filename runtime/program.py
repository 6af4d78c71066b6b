"""A validated graph compiled into a list of numpy kernels, and the loader for .mbz files.

Values flow in NHWC layout internally (feature maps) or as [N, F] (flat features); only the
graph input of ``run`` is converted from NCHW, once. A conv2d followed by its relu/relu6 runs as
one fused step. A value is freed as soon as its last reader has run (its memory goes back to the
run's buffer pool), and element-wise ops overwrite their input when nothing else needs it.
"""

from __future__ import annotations

import math
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import numpy as np

from mbz.format.errors import MbzFormatError

from . import ops
from .graph import Shape, infer_shapes
from .threads import blas_threads

F32 = np.float32
CLIP_BOUNDS = {"relu": (0.0, float("inf")), "relu6": (0.0, 6.0)}
IN_PLACE_OPS = frozenset({"batchnorm", "relu", "relu6", "add", "quantize"})
PREPROCESS_KEYS = frozenset({"layout", "dtype", "mean", "std"})
Kernel = Callable[..., np.ndarray]


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


class Program:
    """An executable graph: ``predict`` on uint8 NHWC images, ``run`` on a float32 NCHW batch."""

    def __init__(self, graph: dict, params: dict[str, np.ndarray], preprocess: dict) -> None:
        """Validate graph, params and preprocess (MbzFormatError) and pre-arrange the weights."""
        self.value_shapes: dict[str, Shape] = infer_shapes(graph, params)
        self.input_name: str = graph["input"]
        self.output_name: str = graph["output"]
        self.input_shape: Shape = self.value_shapes[self.input_name]
        self.num_classes: int = self.value_shapes[self.output_name][0]
        self.mean, self.std = _check_preprocess(preprocess, self.input_shape[0])
        self.steps: list[Step] = _compile(graph, params)
        self.last_peak_bytes_per_image: int = 0

    def run(self, x_nchw: np.ndarray) -> np.ndarray:
        """Logits [N, classes] of a preprocessed float32 batch [N, C, H, W]."""
        x = np.asarray(x_nchw)
        if x.ndim != 4 or x.shape[1:] != self.input_shape:
            raise ValueError(f"expected a batch [N, *{list(self.input_shape)}], got {x.shape}")
        nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1), dtype=F32)
        return self._execute(nhwc, ops.BufferPool())

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
        """Logits [N, classes] of uint8 images [N, H, W, C], ``batch_size`` images at a time,
        with ``threads`` BLAS threads; ``progress(count)`` is called after each chunk."""
        images = self._check_images(images)
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        chunks, pool = [np.zeros((0, self.num_classes), dtype=F32)], ops.BufferPool()
        with blas_threads(threads):
            for begin in range(0, len(images), batch_size):
                chunk = images[begin : begin + batch_size]
                chunks.append(self._execute(self.preprocess_images(chunk), pool))
                if progress is not None:
                    progress(len(chunk))
        return np.concatenate(chunks)

    def _check_images(self, images: np.ndarray) -> np.ndarray:
        images = np.asarray(images)
        c, h, w = self.input_shape
        if images.ndim != 4 or images.shape[1:] != (h, w, c):
            raise ValueError(f"expected uint8 images [N, {h}, {w}, {c}], got {images.shape}")
        return images

    def _execute(self, x_nhwc: np.ndarray, pool: ops.BufferPool) -> np.ndarray:
        """Run every step on an NHWC batch, tracking the peak bytes of live activations.

        Dead values go back to ``pool`` (never the graph input, which may be the caller's)."""
        values = {self.input_name: x_nhwc}
        peak = _live_bytes(values)
        for step in self.steps:
            args = [values[name] for name in step.inputs]
            extra = {"out": args[0]} if step.in_place else {}
            values[step.output] = step.kernel(*args, pool=pool, **extra)
            peak = max(peak, _live_bytes(values))
            for name in step.frees:
                _release(values, name, pool, name == self.input_name)
        self.last_peak_bytes_per_image = math.ceil(peak / max(len(x_nhwc), 1))
        return values[self.output_name].copy()


def load_program(path: str | os.PathLike) -> Program:
    """Read a .mbz file (``mbz.format.read_mbz``) and build its Program (MbzFormatError)."""
    from mbz.format import read_mbz

    mbz = read_mbz(path)
    metadata = mbz.metadata
    if not all(key in metadata for key in ("graph", "preprocess")):
        raise MbzFormatError("metadata: missing graph or preprocess")
    params = {name: tensor.decode() for name, tensor in mbz.tensors.items()}
    return Program(metadata["graph"], params, metadata["preprocess"])


# ------------------------------------------------------------------------------ compilation


def _release(values: dict[str, np.ndarray], name: str, pool: ops.BufferPool, keep: bool) -> None:
    """Forget a value; recycle its array unless ``keep`` or another value still holds it."""
    array = values.pop(name)
    if not keep and all(other is not array for other in values.values()):
        pool.give(array)


def _live_bytes(values: dict[str, np.ndarray]) -> int:
    """Bytes held by the distinct arrays among ``values`` (in-place outputs count once)."""
    owners = {id(a if a.base is None else a.base): a.nbytes for a in values.values()}
    return sum(owners.values())


def _check_preprocess(preprocess: Any, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """The float32 mean and std of a valid preprocess object."""
    if not isinstance(preprocess, dict) or set(preprocess) != PREPROCESS_KEYS:
        raise MbzFormatError(f"preprocess: must be an object with keys {sorted(PREPROCESS_KEYS)}")
    if preprocess["layout"] != "NHWC" or preprocess["dtype"] != "uint8":
        raise MbzFormatError("preprocess: layout must be 'NHWC' and dtype 'uint8'")
    mean, std = (_channel_floats(preprocess, key, channels) for key in ("mean", "std"))
    if not np.all(std > 0):
        raise MbzFormatError("preprocess: std must be > 0")
    return mean, std


def _channel_floats(preprocess: dict, key: str, channels: int) -> np.ndarray:
    values = preprocess[key]
    numbers = isinstance(values, list) and all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in values
    )
    if not numbers or len(values) != channels:
        raise MbzFormatError(f"preprocess: {key} must be a list of {channels} numbers")
    with np.errstate(over="ignore"):
        array = np.array(values, dtype=F32)
    if not np.all(np.isfinite(array)):
        raise MbzFormatError(f"preprocess: {key} must be finite in float32")
    return array


def _compile(graph: dict, params: dict[str, np.ndarray]) -> list[Step]:
    """Steps in graph order, with in-place and free decisions from each value's last reader."""
    nodes = _fuse_activations(graph)
    last_use: dict[str, int] = {}
    for index, node in enumerate(nodes):
        last_use[node["output"]] = index
        last_use.update((name, index) for name in node["inputs"])
    last_use.pop(graph["output"])
    frees: dict[int, list[str]] = {}
    for name, index in last_use.items():
        frees.setdefault(index, []).append(name)
    return [
        Step(
            name=node["name"],
            kernel=_kernel(node, params),
            inputs=tuple(node["inputs"]),
            output=node["output"],
            in_place=_can_run_in_place(node, index, last_use, graph["input"]),
            frees=tuple(frees.get(index, ())),
        )
        for index, node in enumerate(nodes)
    ]


def _fuse_activations(graph: dict) -> list[dict]:
    """The nodes, where each conv2d directly followed by its only reader, a relu or relu6,
    becomes one conv2d node (with an ``activation`` attr) writing the activation's output."""
    nodes, output = graph["nodes"], graph["output"]
    readers = Counter(name for node in nodes for name in node["inputs"])
    fused, index = [], 0
    while index < len(nodes):
        node, after = nodes[index], nodes[index + 1 : index + 2]
        if after and _fusable(node, after[0], readers, output):
            attrs = {**node["attrs"], "activation": after[0]["op"]}
            fused.append({**node, "attrs": attrs, "output": after[0]["output"]})
            index += 2
        else:
            fused.append(node)
            index += 1
    return fused


def _fusable(node: dict, after: dict, readers: Counter, graph_output: str) -> bool:
    """Whether ``after`` is a relu/relu6 that is the only reader of conv2d ``node``'s output."""
    value = node["output"]
    return (
        node["op"] == "conv2d"
        and after["op"] in CLIP_BOUNDS
        and after["inputs"] == [value]
        and readers[value] == 1
        and value != graph_output
    )


def _can_run_in_place(node: dict, index: int, last_use: dict[str, int], graph_input: str) -> bool:
    """Overwrite the first input when this node is its last reader (never the caller's input)."""
    first = node["inputs"][0]
    return node["op"] in IN_PLACE_OPS and first != graph_input and last_use.get(first) == index


def _kernel(node: dict, params: dict[str, np.ndarray]) -> Kernel:
    weights = {role: np.asarray(params[name], dtype=F32) for role, name in node["params"].items()}
    return KERNEL_BUILDERS[node["op"]](weights, node["attrs"])


def _conv_kernel(weights: dict[str, np.ndarray], attrs: dict) -> Kernel:
    weight, bias, groups = weights["weight"], weights["bias"], attrs["groups"]
    stride, padding, dilation = (tuple(attrs[k]) for k in ("stride", "padding", "dilation"))
    clip = CLIP_BOUNDS.get(attrs.get("activation"))
    fixed = {"bias": bias, "stride": stride, "padding": padding, "clip": clip}
    if groups == 1 and weight.shape[2:] == (1, 1):
        return partial(ops.conv_pointwise, weight=ops.prepare_pointwise(weight), **fixed)
    fixed["dilation"] = dilation
    if groups == weight.shape[0] and weight.shape[1] == 1:
        return partial(ops.conv_depthwise, weight=ops.prepare_depthwise(weight), **fixed)
    grouped = ops.prepare_grouped(weight, groups)
    return partial(ops.conv_grouped, weight=grouped, kernel=weight.shape[2:], **fixed)


def _linear_kernel(weights: dict[str, np.ndarray], attrs: dict) -> Kernel:
    weight = np.ascontiguousarray(weights["weight"].T)
    return partial(ops.linear, weight=weight, bias=weights["bias"])


def _batchnorm_kernel(weights: dict[str, np.ndarray], attrs: dict) -> Kernel:
    return partial(ops.batchnorm, scale=weights["scale"], shift=weights["shift"])


def _pool_kernel(op: Kernel) -> Callable[[dict, dict], Kernel]:
    def build(weights: dict[str, np.ndarray], attrs: dict) -> Kernel:
        pairs = {key: tuple(attrs[key]) for key in ("kernel", "stride", "padding")}
        return partial(op, **pairs)

    return build


def _quantize_kernel(weights: dict[str, np.ndarray], attrs: dict) -> Kernel:
    scale = float(attrs["scale"])
    return partial(ops.quantize, bits=attrs["bits"], scale=scale, zero_point=attrs["zero_point"])


def _plain(op: Kernel) -> Callable[[dict, dict], Kernel]:
    return lambda weights, attrs: op


KERNEL_BUILDERS: dict[str, Callable[[dict[str, np.ndarray], dict], Kernel]] = {
    "conv2d": _conv_kernel,
    "linear": _linear_kernel,
    "batchnorm": _batchnorm_kernel,
    "relu": _plain(ops.relu),
    "relu6": _plain(ops.relu6),
    "add": _plain(ops.add),
    "avgpool2d": _pool_kernel(ops.avgpool2d),
    "maxpool2d": _pool_kernel(ops.maxpool2d),
    "global_avgpool": _plain(ops.global_avgpool),
    "flatten": _plain(ops.flatten),
    "quantize": _quantize_kernel,
}
