"""Validation, shape inference and cost of the graph stored in a .mbz file (SPEC.md 6 and 9).

Shapes are per image, in the graph's NCHW convention: ``(C, H, W)`` for feature maps and
``(F,)`` for flat features. Everything a runtime could trip on is rejected here, with a message
naming the node: value types, attribute ranges, and what running one image would cost (its
multiply-accumulates and the peak bytes of the values alive at once), checked against ``Limits``
before any weight is decoded. Executing a validated graph cannot fail on its structure.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, NoReturn

import numpy as np

from mbz.format.checks import is_int, json_int, json_scale, json_str
from mbz.format.constants import GRAPH_OPS, MAX_BITS, MIN_BITS, Op
from mbz.format.errors import MbzFormatError
from mbz.format.limits import DEFAULT_LIMITS, FLOAT32_BYTES, Limits, raise_hint

MAX_NODES = 100_000
GRAPH_KEYS = ("input", "input_shape", "output", "nodes")
NODE_KEYS = ("name", "op", "inputs", "output", "params", "attrs")
PAIR_MINIMUM = {"stride": 1, "padding": 0, "dilation": 1, "kernel": 1}
WINDOW_OPS = frozenset({Op.CONV2D, Op.AVGPOOL2D, Op.MAXPOOL2D})

Shape = tuple[int, ...]


@dataclass(frozen=True)
class GraphCost:
    """What running one image costs: multiply-accumulates (window reads and element-wise ops
    counted as one each) and the peak float32 bytes of the values alive at once (a padded
    copy of a step's input included)."""

    macs: int
    peak_bytes: int


def validate_graph(
    graph: dict, params: Mapping[str, np.ndarray], limits: Limits = DEFAULT_LIMITS
) -> None:
    """Raise MbzFormatError, naming the node, unless the graph is executable with ``params``
    within ``limits``."""
    analyze(graph, params, limits)


def infer_shapes(
    graph: dict, params: Mapping[str, np.ndarray], limits: Limits = DEFAULT_LIMITS
) -> dict[str, Shape]:
    """Validate the graph and return the per-image NCHW shape of every value it defines."""
    return analyze(graph, params, limits)[0]


def analyze(
    graph: Any, params: Mapping[str, np.ndarray], limits: Limits = DEFAULT_LIMITS
) -> tuple[dict[str, Shape], GraphCost]:
    """Validate the graph (MbzFormatError) and return the per-image shape of every value and
    the cost of one image, checked against ``limits``. ``params`` only need their shapes: any
    array works, ``np.broadcast_to`` stand-ins included, so nothing need be decoded first."""
    _check_header(graph, limits)
    shapes: dict[str, Shape] = {graph["input"]: tuple(graph["input_shape"])}
    names: set[str] = set()
    macs, scratch = 0, {}
    for index, node in enumerate(graph["nodes"]):
        label = _label(node, index)
        _check_node_fields(node, label, names)
        _check_wiring(node, label, shapes)
        weights = _node_params(node, label, params)
        attrs = _node_attrs(node, label)
        inputs = [shapes[name] for name in node["inputs"]]
        shape = SHAPE_RULES[node["op"]](inputs, weights, attrs, label)
        shapes[node["output"]] = shape
        macs += _macs(node["op"], inputs[0], shape, weights, attrs)
        if macs > limits.macs:
            _fail(
                label,
                f"the graph needs more than {limits.macs} multiply-accumulates per "
                f"image up to here ({raise_hint('macs')})",
            )
        scratch[index] = _padded_elements(inputs[0], attrs)
    _check_output(graph, shapes)
    cost = GraphCost(macs, _peak_bytes(graph, shapes, scratch))
    if cost.peak_bytes > limits.activation_bytes:
        raise MbzFormatError(
            f"graph: running one image holds {cost.peak_bytes} bytes of activations at once, "
            f"above the limit of {limits.activation_bytes} ({raise_hint('activation_bytes')})"
        )
    return shapes, cost


def _fail(label: str, message: str) -> NoReturn:
    raise MbzFormatError(f"graph {label}: {message}")


def _label(node: Any, index: int) -> str:
    if isinstance(node, dict) and isinstance(node.get("name"), str):
        return f"node {index} {node['name'][:100]!r}"
    return f"node {index}"


def _check_header(graph: Any, limits: Limits) -> None:
    if not isinstance(graph, dict):
        raise MbzFormatError("graph: must be an object")
    missing = [key for key in GRAPH_KEYS if key not in graph]
    if missing:
        raise MbzFormatError(f"graph: missing keys {missing}")
    json_str(graph["input"], "graph: input")
    json_str(graph["output"], "graph: output")
    shape = graph["input_shape"]
    if not isinstance(shape, list) or len(shape) != 3:
        raise MbzFormatError("graph: input_shape must be [C, H, W]")
    for dim in shape:
        json_int(dim, 1, limits.input_elements, "graph: each dimension of input_shape")
    if math.prod(shape) > limits.input_elements:
        raise MbzFormatError(
            f"graph: input_shape {shape} has more than {limits.input_elements} elements per "
            f"image ({raise_hint('input_elements')})"
        )
    nodes = graph["nodes"]
    if not isinstance(nodes, list) or not 1 <= len(nodes) <= MAX_NODES:
        raise MbzFormatError(f"graph: nodes must be a list of 1 to {MAX_NODES} nodes")


def _check_node_fields(node: Any, label: str, names: set[str]) -> None:
    if not isinstance(node, dict):
        _fail(label, "must be an object")
    missing = [key for key in NODE_KEYS if key not in node]
    if missing:
        _fail(label, f"missing keys {missing}")
    json_str(node["name"], f"graph {label}: name")
    if node["name"] in names:
        _fail(label, "name is not unique")
    names.add(node["name"])
    op = node["op"]
    if not isinstance(op, str) or op not in GRAPH_OPS:
        _fail(label, f"op must be one of {sorted(map(str, Op))}, got {str(op)[:60]!r}")
    if not isinstance(node["inputs"], list) or not all(isinstance(i, str) for i in node["inputs"]):
        _fail(label, "inputs must be a list of value names")
    json_str(node["output"], f"graph {label}: output")


def _check_wiring(node: dict, label: str, shapes: dict[str, Shape]) -> None:
    expected = 2 if node["op"] == Op.ADD else 1
    if len(node["inputs"]) != expected:
        _fail(label, f"op {node['op']} takes {expected} input(s), got {len(node['inputs'])}")
    for name in node["inputs"]:
        if name not in shapes:
            _fail(label, f"input {name[:100]!r} is not defined before this node")
    if node["output"] in shapes:
        _fail(label, f"output {node['output'][:100]!r} is already defined")


def _check_keys(found: Any, expected: tuple[str, ...], what: str, label: str) -> None:
    if not isinstance(found, dict):
        _fail(label, f"{what} must be an object")
    if set(found) != set(expected):
        _fail(label, f"{what} must be exactly {sorted(expected)}, got {sorted(found)[:10]}")


def _node_params(node: dict, label: str, params: Mapping[str, np.ndarray]) -> dict[str, Shape]:
    _check_keys(node["params"], GRAPH_OPS[node["op"]]["params"], "params", label)
    shapes = {}
    for role, tensor in node["params"].items():
        if not isinstance(tensor, str) or tensor not in params:
            _fail(label, f"param {role} names a missing tensor {str(tensor)[:100]!r}")
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
    if "groups" in attrs and not (is_int(attrs["groups"]) and attrs["groups"] > 0):
        _fail(label, "groups must be a positive integer")
    if node["op"] == Op.QUANTIZE:
        _check_quantize(attrs, label)
    return attrs


def _check_pair(key: str, value: Any, label: str) -> None:
    """A pair of integers at least ``PAIR_MINIMUM[key]`` (upper bounds: ``_spatial``)."""
    low = PAIR_MINIMUM[key]
    if not (isinstance(value, list | tuple) and len(value) == 2):
        _fail(label, f"{key} must be a pair of integers")
    if not all(is_int(v) and v >= low for v in value):
        _fail(label, f"{key} must be a pair of integers >= {low}, got {str(value)[:60]}")


def _check_quantize(attrs: dict, label: str) -> None:
    bits = json_int(attrs["bits"], MIN_BITS, MAX_BITS, f"graph {label}: bits")
    json_scale(attrs["scale"], f"graph {label}: scale")
    json_int(attrs["zero_point"], 0, 2**bits - 1, f"graph {label}: zero_point")


def _check_output(graph: dict, shapes: dict[str, Shape]) -> None:
    output = graph["output"]
    if output not in shapes:
        raise MbzFormatError(f"graph: output {output[:100]!r} is not defined")
    if len(shapes[output]) != 1:
        raise MbzFormatError(f"graph: output {output!r} has shape {shapes[output]}, not [classes]")


# ------------------------------------------------------------------------------------- cost


def _macs(op: Op, source: Shape, shape: Shape, weights: dict, attrs: dict) -> int:
    """Multiply-accumulates of one node for one image (a window read or an element-wise
    operation counts as one)."""
    if op == Op.CONV2D:
        _, per_group, kh, kw = weights["weight"]
        return math.prod(shape) * per_group * kh * kw
    if op == Op.LINEAR:
        return math.prod(weights["weight"])
    if op in WINDOW_OPS:
        return math.prod(shape) * math.prod(attrs["kernel"])
    return max(math.prod(source), math.prod(shape))


def _padded_elements(source: Shape, attrs: dict) -> int:
    """Elements of the padded copy a windowed op makes of its input (0 without padding)."""
    padding = attrs.get("padding")
    if not padding or not any(padding):
        return 0
    c, h, w = source
    return c * (h + 2 * padding[0]) * (w + 2 * padding[1])


def _peak_bytes(graph: dict, shapes: dict[str, Shape], scratch: dict[int, int]) -> int:
    """Peak float32 bytes alive at once for one image: after each node, every value still to be
    read (and the node's output and padded input), values freed after their last reader."""
    readers = Counter(name for node in graph["nodes"] for name in node["inputs"])
    readers[graph["output"]] += 1
    live = {graph["input"]: math.prod(shapes[graph["input"]])}
    peak = sum(live.values())
    for index, node in enumerate(graph["nodes"]):
        live[node["output"]] = math.prod(shapes[node["output"]])
        peak = max(peak, sum(live.values()) + scratch[index])
        for name in node["inputs"]:
            readers[name] -= 1
            if readers[name] == 0:
                live.pop(name, None)
    return FLOAT32_BYTES * peak


# ------------------------------------------------------------------------------- shape rules


def _feature_map(shape: Shape, label: str) -> Shape:
    if len(shape) != 3:
        _fail(label, f"needs a [C, H, W] feature map, got {list(shape)}")
    return shape


def _window(size: int, kernel: int, stride: int, padding: int, dilation: int, label: str) -> int:
    """Output length along one axis; the window, stride and padding must fit the input."""
    span = dilation * (kernel - 1) + 1
    padded = size + 2 * padding
    if padded < span:
        _fail(label, f"window {span} does not fit in input {size} padded by {padding}")
    if padding > min(span, size):
        _fail(label, f"padding {padding} must be at most the window {span} and the input {size}")
    if max(stride, dilation) > padded:
        _fail(label, f"stride {stride} or dilation {dilation} exceeds the padded input {padded}")
    return (padded - span) // stride + 1


def _spatial(shape: Shape, attrs: dict, kernel: tuple[int, int], label: str) -> tuple[int, int]:
    _, h, w = shape
    (ph, pw), (sh, sw) = attrs["padding"], attrs["stride"]
    dh, dw = attrs.get("dilation", (1, 1))
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


SHAPE_RULES: dict[Op, Callable[[list[Shape], dict, dict, str], Shape]] = {
    Op.CONV2D: _conv2d,
    Op.LINEAR: _linear,
    Op.BATCHNORM: _batchnorm,
    Op.RELU: _same,
    Op.RELU6: _same,
    Op.ADD: _same,
    Op.AVGPOOL2D: _pool,
    Op.MAXPOOL2D: _pool,
    Op.GLOBAL_AVGPOOL: _global_avgpool,
    Op.FLATTEN: _flatten,
    Op.QUANTIZE: _same,
}
