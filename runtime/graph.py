"""Validation and shape inference of the graph stored in a .mbz file (SPEC.md section 6).

Shapes are per image, in the graph's NCHW convention: ``(C, H, W)`` for feature maps and
``(F,)`` for flat features. Everything a runtime could trip on is rejected here, with a message
naming the node, so that executing a validated graph cannot fail on its structure.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NoReturn

import numpy as np

from mbz.format.constants import GRAPH_OPS, MAX_BITS, MAX_ELEMENTS, MIN_BITS
from mbz.format.errors import MbzFormatError

MAX_NODES = 100_000
MAX_ACTIVATION_ELEMENTS = MAX_ELEMENTS  # per image, for any value and any padded input
GRAPH_KEYS = ("input", "input_shape", "output", "nodes")
NODE_KEYS = ("name", "op", "inputs", "output", "params", "attrs")
PAIR_MINIMUM = {"stride": 1, "padding": 0, "dilation": 1, "kernel": 1}

Shape = tuple[int, ...]


def validate_graph(graph: dict, params: dict[str, np.ndarray]) -> None:
    """Raise MbzFormatError, naming the node, unless the graph is executable with ``params``."""
    infer_shapes(graph, params)


def infer_shapes(graph: dict, params: dict[str, np.ndarray]) -> dict[str, Shape]:
    """Validate the graph and return the per-image NCHW shape of every value it defines."""
    _check_header(graph)
    shapes: dict[str, Shape] = {graph["input"]: tuple(graph["input_shape"])}
    names: set[str] = set()
    for index, node in enumerate(graph["nodes"]):
        label = _label(node, index)
        _check_node_fields(node, label, names)
        _check_wiring(node, label, shapes)
        weights = _node_params(node, label, params)
        attrs = _node_attrs(node, label)
        inputs = [shapes[name] for name in node["inputs"]]
        shape = SHAPE_RULES[node["op"]](inputs, weights, attrs, label)
        _check_size(shape, label, "output")
        shapes[node["output"]] = shape
    _check_output(graph, shapes)
    return shapes


def _fail(label: str, message: str) -> NoReturn:
    raise MbzFormatError(f"graph {label}: {message}")


def _label(node: Any, index: int) -> str:
    if isinstance(node, dict) and isinstance(node.get("name"), str):
        return f"node {index} {node['name']!r}"
    return f"node {index}"


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_header(graph: Any) -> None:
    if not isinstance(graph, dict):
        raise MbzFormatError("graph: must be an object")
    missing = [key for key in GRAPH_KEYS if key not in graph]
    if missing:
        raise MbzFormatError(f"graph: missing keys {missing}")
    if not isinstance(graph["input"], str) or not isinstance(graph["output"], str):
        raise MbzFormatError("graph: input and output must be value names (strings)")
    shape = graph["input_shape"]
    if not isinstance(shape, list) or len(shape) != 3:
        raise MbzFormatError("graph: input_shape must be [C, H, W]")
    if not all(_is_int(d) and d > 0 for d in shape):
        raise MbzFormatError("graph: input_shape must hold positive integers")
    _check_size(tuple(shape), "input", "input_shape")
    nodes = graph["nodes"]
    if not isinstance(nodes, list) or not 1 <= len(nodes) <= MAX_NODES:
        raise MbzFormatError(f"graph: nodes must be a list of 1 to {MAX_NODES} nodes")


def _check_node_fields(node: Any, label: str, names: set[str]) -> None:
    if not isinstance(node, dict):
        _fail(label, "must be an object")
    missing = [key for key in NODE_KEYS if key not in node]
    if missing:
        _fail(label, f"missing keys {missing}")
    if not isinstance(node["name"], str) or not node["name"]:
        _fail(label, "name must be a non-empty string")
    if node["name"] in names:
        _fail(label, "name is not unique")
    names.add(node["name"])
    if node["op"] not in GRAPH_OPS:
        _fail(label, f"unknown op {node['op']!r}")
    if not isinstance(node["inputs"], list) or not all(isinstance(i, str) for i in node["inputs"]):
        _fail(label, "inputs must be a list of value names")
    if not isinstance(node["output"], str) or not node["output"]:
        _fail(label, "output must be a non-empty value name")


def _check_wiring(node: dict, label: str, shapes: dict[str, Shape]) -> None:
    expected = 2 if node["op"] == "add" else 1
    if len(node["inputs"]) != expected:
        _fail(label, f"op {node['op']} takes {expected} input(s), got {len(node['inputs'])}")
    for name in node["inputs"]:
        if name not in shapes:
            _fail(label, f"input {name!r} is not defined before this node")
    if node["output"] in shapes:
        _fail(label, f"output {node['output']!r} is already defined")


def _check_keys(found: Any, expected: tuple[str, ...], what: str, label: str) -> None:
    if not isinstance(found, dict):
        _fail(label, f"{what} must be an object")
    if set(found) != set(expected):
        _fail(label, f"{what} must be exactly {sorted(expected)}, got {sorted(found)}")


def _node_params(node: dict, label: str, params: dict[str, np.ndarray]) -> dict[str, Shape]:
    _check_keys(node["params"], GRAPH_OPS[node["op"]]["params"], "params", label)
    shapes = {}
    for role, tensor in node["params"].items():
        if not isinstance(tensor, str) or tensor not in params:
            _fail(label, f"param {role} names a missing tensor {tensor!r}")
        array = params[tensor]
        if not isinstance(array, np.ndarray) or array.dtype.kind not in "fiu":
            _fail(label, f"param {role} ({tensor!r}) is not a numeric array")
        if array.size == 0:
            _fail(label, f"param {role} ({tensor!r}) is empty")
        shapes[role] = tuple(int(d) for d in array.shape)
    return shapes


def _node_attrs(node: dict, label: str) -> dict[str, Any]:
    attrs = node["attrs"]
    _check_keys(attrs, GRAPH_OPS[node["op"]]["attrs"], "attrs", label)
    for key, value in attrs.items():
        if key in PAIR_MINIMUM:
            _check_pair(key, value, label)
    if "groups" in attrs and not (_is_int(attrs["groups"]) and attrs["groups"] > 0):
        _fail(label, "groups must be a positive integer")
    if node["op"] == "quantize":
        _check_quantize(attrs, label)
    return attrs


def _check_pair(key: str, value: Any, label: str) -> None:
    low = PAIR_MINIMUM[key]
    if not (isinstance(value, list | tuple) and len(value) == 2):
        _fail(label, f"{key} must be a pair of integers")
    if not all(_is_int(v) and v >= low for v in value):
        _fail(label, f"{key} must be a pair of integers >= {low}, got {value}")


def _check_quantize(attrs: dict, label: str) -> None:
    bits, scale, zero_point = attrs["bits"], attrs["scale"], attrs["zero_point"]
    if not (_is_int(bits) and MIN_BITS <= bits <= MAX_BITS):
        _fail(label, f"bits must be an integer in {MIN_BITS}..{MAX_BITS}")
    if not (isinstance(scale, int | float) and not isinstance(scale, bool)):
        _fail(label, "scale must be a number")
    with np.errstate(over="ignore"):
        scale32 = np.float32(scale)
    if not (math.isfinite(scale) and np.isfinite(scale32) and scale32 > 0):
        _fail(label, f"scale must be finite and > 0 in float32, got {scale}")
    if not (_is_int(zero_point) and 0 <= zero_point <= 2**bits - 1):
        _fail(label, f"zero_point must be an integer in 0..{2**bits - 1}")


def _check_size(shape: Shape, label: str, what: str) -> None:
    if math.prod(shape) > MAX_ACTIVATION_ELEMENTS:
        _fail(label, f"{what} {list(shape)} exceeds {MAX_ACTIVATION_ELEMENTS} elements per image")


def _check_output(graph: dict, shapes: dict[str, Shape]) -> None:
    output = graph["output"]
    if output not in shapes:
        raise MbzFormatError(f"graph: output {output!r} is not defined")
    if len(shapes[output]) != 1:
        raise MbzFormatError(f"graph: output {output!r} has shape {shapes[output]}, not [classes]")


# ------------------------------------------------------------------------------- shape rules


def _feature_map(shape: Shape, label: str) -> Shape:
    if len(shape) != 3:
        _fail(label, f"needs a [C, H, W] feature map, got {list(shape)}")
    return shape


def _window(size: int, kernel: int, stride: int, padding: int, dilation: int, label: str) -> int:
    span = dilation * (kernel - 1) + 1
    if size + 2 * padding < span:
        _fail(label, f"window {span} does not fit in input {size} padded by {padding}")
    return (size + 2 * padding - span) // stride + 1


def _spatial(shape: Shape, attrs: dict, kernel: tuple[int, int], label: str) -> tuple[int, int]:
    c, h, w = shape
    (ph, pw), (sh, sw) = attrs["padding"], attrs["stride"]
    dh, dw = attrs.get("dilation", (1, 1))
    _check_size((c, h + 2 * ph, w + 2 * pw), label, "padded input")
    return (
        _window(h, kernel[0], sh, ph, dh, label),
        _window(w, kernel[1], sw, pw, dw, label),
    )


def _conv2d(inputs: list[Shape], weights: dict, attrs: dict, label: str) -> Shape:
    c = _feature_map(inputs[0], label)[0]
    weight, groups = weights["weight"], attrs["groups"]
    if len(weight) != 4:
        _fail(label, f"conv weight must be [O, I/groups, kH, kW], got {list(weight)}")
    out_channels, per_group, kh, kw = weight
    if out_channels % groups or per_group * groups != c:
        _fail(label, f"weight {list(weight)} with groups={groups} does not fit {c} input channels")
    if weights["bias"] != (out_channels,):
        _fail(label, f"bias must be [{out_channels}], got {list(weights['bias'])}")
    return (out_channels, *_spatial(inputs[0], attrs, (kh, kw), label))


def _linear(inputs: list[Shape], weights: dict, attrs: dict, label: str) -> Shape:
    weight = weights["weight"]
    if len(inputs[0]) != 1:
        _fail(label, f"linear needs flat features, got {list(inputs[0])}")
    if len(weight) != 2 or weight[1] != inputs[0][0]:
        _fail(label, f"weight {list(weight)} does not fit {inputs[0][0]} input features")
    if weights["bias"] != (weight[0],):
        _fail(label, f"bias must be [{weight[0]}], got {list(weights['bias'])}")
    return (weight[0],)


def _batchnorm(inputs: list[Shape], weights: dict, attrs: dict, label: str) -> Shape:
    channels = inputs[0][0]
    if weights["scale"] != (channels,) or weights["shift"] != (channels,):
        _fail(label, f"scale and shift must both be [{channels}]")
    return inputs[0]


def _same(inputs: list[Shape], weights: dict, attrs: dict, label: str) -> Shape:
    if any(shape != inputs[0] for shape in inputs):
        _fail(label, f"input shapes differ: {[list(s) for s in inputs]}")
    return inputs[0]


def _pool(inputs: list[Shape], weights: dict, attrs: dict, label: str) -> Shape:
    c = _feature_map(inputs[0], label)[0]
    kernel, padding = attrs["kernel"], attrs["padding"]
    if any(2 * p > k for p, k in zip(padding, kernel, strict=True)):
        _fail(label, f"padding {padding} must be at most half the kernel {kernel}")
    return (c, *_spatial(inputs[0], attrs, tuple(kernel), label))


def _global_avgpool(inputs: list[Shape], weights: dict, attrs: dict, label: str) -> Shape:
    return (_feature_map(inputs[0], label)[0], 1, 1)


def _flatten(inputs: list[Shape], weights: dict, attrs: dict, label: str) -> Shape:
    return (math.prod(inputs[0]),)


SHAPE_RULES: dict[str, Callable[[list[Shape], dict, dict, str], Shape]] = {
    "conv2d": _conv2d,
    "linear": _linear,
    "batchnorm": _batchnorm,
    "relu": _same,
    "relu6": _same,
    "add": _same,
    "avgpool2d": _pool,
    "maxpool2d": _pool,
    "global_avgpool": _global_avgpool,
    "flatten": _flatten,
    "quantize": _same,
}
