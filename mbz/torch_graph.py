"""Run mbz's graph IR (SPEC.md section 6) with torch, and turn raw images into its input.

``GraphModule.of_tensors`` runs a file's graph as every runtime does (SPEC.md 7.3): each exact
``conv2d``/``linear`` (``mbz.runtime.exact``) sums the integers ``(q - z_a) * w_int`` exactly
and applies the float32 epilogue op by op, and pooling of codes sums the codes exactly, so its
logits are bit-identical to the numpy and ONNX runtimes' on a file whose layers are all exact.
Without a plan (calibration, training) every node is the plain float op.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mbz.errors import MbzError
from mbz.format.constants import Op
from mbz.runtime.exact import POOLING_OPS, ExactLayer, exact_layers

Tensors = list[torch.Tensor]
OpFunction = Callable[[Tensors, dict[str, torch.Tensor], dict], torch.Tensor]


def _conv2d(xs: Tensors, p: dict[str, torch.Tensor], a: dict) -> torch.Tensor:
    stride, padding, dilation = tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"])
    return F.conv2d(xs[0], p["weight"], p.get("bias"), stride, padding, dilation, a["groups"])


def _batchnorm(xs: Tensors, p: dict[str, torch.Tensor], _: dict) -> torch.Tensor:
    return xs[0] * p["scale"][:, None, None] + p["shift"][:, None, None]


def _avgpool2d(xs: Tensors, _: dict[str, torch.Tensor], a: dict) -> torch.Tensor:
    kernel, stride, padding = tuple(a["kernel"]), tuple(a["stride"]), tuple(a["padding"])
    return F.avg_pool2d(xs[0], kernel, stride, padding, ceil_mode=False, count_include_pad=True)


def _maxpool2d(xs: Tensors, _: dict[str, torch.Tensor], a: dict) -> torch.Tensor:
    return F.max_pool2d(xs[0], tuple(a["kernel"]), tuple(a["stride"]), tuple(a["padding"]))


def _quantize(xs: Tensors, _: dict[str, torch.Tensor], a: dict) -> torch.Tensor:
    top = 2 ** int(a["bits"]) - 1
    return torch.fake_quantize_per_tensor_affine(
        xs[0], float(a["scale"]), int(a["zero_point"]), 0, top
    )


OPS: dict[Op, OpFunction] = {
    Op.CONV2D: _conv2d,
    Op.LINEAR: lambda xs, p, _: F.linear(xs[0], p["weight"], p.get("bias")),
    Op.BATCHNORM: _batchnorm,
    Op.RELU: lambda xs, _p, _a: F.relu(xs[0]),
    Op.RELU6: lambda xs, _p, _a: F.relu6(xs[0]),
    Op.ADD: lambda xs, _p, _a: xs[0] + xs[1],
    Op.AVGPOOL2D: _avgpool2d,
    Op.MAXPOOL2D: _maxpool2d,
    Op.GLOBAL_AVGPOOL: lambda xs, _p, _a: F.adaptive_avg_pool2d(xs[0], 1),
    Op.FLATTEN: lambda xs, _p, _a: torch.flatten(xs[0], 1),
    Op.QUANTIZE: _quantize,
}


def integers(x: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """The integers ``q - z`` of a quantize node's output ``x = float32((q - z) * scale)``, as
    ``dtype``: ``x / scale`` in float64 is within ``2**-23`` relative of ``q - z`` (at most
    255 in magnitude), so rounding recovers it exactly."""
    return torch.round(x.double() / scale).to(dtype)


def _view(values: np.ndarray, op: str) -> torch.Tensor:
    """Per-output-channel float32 constants shaped to broadcast over the op's output."""
    return torch.from_numpy(np.asarray(values, np.float32)).reshape(
        (-1, 1, 1) if op == Op.CONV2D else (-1,)
    )


class ExactReduction(nn.Module):
    """One exact ``conv2d``/``linear`` (SPEC.md 7.3): the accumulator ``sum((q - z_a) *
    w_int)`` as an exact integer, then ``float32(acc) * multiplier[c]``, then ``+ bias[c]``
    (two float32 ops, never fused).

    The sum runs in float32 on the CPU when every partial sum stays below ``2**24`` (exact in
    any order), otherwise, and always on CUDA (whose float32 convolutions may use TF32 or
    Winograd), in float64, exact below ``2**53``; rounding the float64 result guards against
    an FFT algorithm's error, far below 0.5."""

    weight: torch.Tensor
    multiplier: torch.Tensor
    bias: torch.Tensor

    def __init__(self, node: dict, plan: ExactLayer, input_scale: float) -> None:
        """The plan of ``node``, whose input is the output of a quantize node of scale
        ``input_scale``."""
        super().__init__()
        self.op, self.attrs = node["op"], node["attrs"]
        self.input_scale = float(np.float32(input_scale))
        self.float32_exact = plan.float32_exact
        self.register_buffer("weight", torch.from_numpy(plan.weight.astype(np.float32)))
        self.register_buffer("multiplier", _view(plan.multiplier, node["op"]))
        self.register_buffer("bias", _view(plan.bias, node["op"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The float32 output of the layer for the fake-quantized input ``x``."""
        wide = x.is_cuda or not self.float32_exact
        dtype = torch.float64 if wide else torch.float32
        weight = {"weight": self.weight.to(dtype)}  # no bias: the epilogue adds it
        acc = OPS[self.op]([integers(x, self.input_scale, dtype)], weight, self.attrs)
        y = (acc.round() if wide else acc).to(torch.float32)
        y = y * self.multiplier
        return y + self.bias


_POOL_ATTRS = ("kernel", "stride", "padding")


class CodePooling(nn.Module):
    """``avgpool2d``/``global_avgpool`` of codes (SPEC.md 7.3): ``S = sum(q - z)`` over the
    window, exact in float64 (padding counts as 0 and in the divisor), then ``(float32(S) *
    float32(scale)) / float32(window)``, each a float32 op on same-device tensors (CUDA
    replaces division by a host scalar with a multiplication by its reciprocal)."""

    scale: torch.Tensor

    def __init__(self, node: dict, input_scale: float) -> None:
        """``node`` reads the output of a quantize node of scale ``input_scale``."""
        super().__init__()
        self.op, self.attrs = node["op"], node["attrs"]
        self.input_scale = float(np.float32(input_scale))
        self.register_buffer("scale", torch.tensor(np.float32(input_scale)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The pooled float32 values of the fake-quantized input ``x``."""
        ints = integers(x, self.input_scale, torch.float64)
        if self.op == Op.GLOBAL_AVGPOOL:
            total, window = ints.sum((2, 3), keepdim=True), x.shape[2] * x.shape[3]
        else:
            kernel, stride, padding = (tuple(self.attrs[key]) for key in _POOL_ATTRS)
            total = F.avg_pool2d(ints, kernel, stride, padding, divisor_override=1)
            window = kernel[0] * kernel[1]
        y = total.to(torch.float32) * self.scale
        return y / torch.full_like(y, window)


class GraphModule(nn.Module):
    """A graph IR and its tensors as a torch module; ``forward`` maps NCHW inputs to logits.

    The tensors are buffers (``param_0``, ``param_1``... since tensor names contain dots), so
    ``.to(device)`` moves them. With ``exact`` (the plan of ``mbz.runtime.exact.exact_layers``;
    ``of_tensors`` builds it from a file's tensors), the planned layers and every pooling of
    codes compute as SPEC.md 7.3 fixes; without it (calibration, training) every node is the
    float op on fake-quantized values.
    """

    def __init__(
        self,
        graph: dict,
        params: dict[str, np.ndarray],
        exact: Mapping[str, ExactLayer] | None = None,
    ) -> None:
        """Keep the graph's nodes and register every tensor they name; MbzError for an unknown
        op or a missing tensor."""
        super().__init__()
        self.input_name: str = graph["input"]
        self.output_name: str = graph["output"]
        self.nodes: list[dict] = copy.deepcopy(graph["nodes"])
        self.slots: dict[str, str] = {}  # tensor name -> buffer name
        for node in self.nodes:
            if node["op"] not in OPS:
                raise MbzError(f"graph node {node['name']!r} has unknown op {node['op']!r}")
            for name in node["params"].values():
                self._register(name, params)
        self.exact_steps = nn.ModuleDict()  # node index (as text) -> its exact computation
        if exact is not None:
            self._plan_exact(exact)

    @classmethod
    def of_tensors(cls, graph: dict, tensors: Mapping[str, Any]) -> GraphModule:
        """The module that runs a file's graph as every runtime does: the decoded ``tensors``
        (``mbz.format`` tensors by name) and the exact plan they allow."""
        params = {name: tensor.decode() for name, tensor in tensors.items()}
        return cls(graph, params, exact_layers(graph, tensors))

    def _plan_exact(self, exact: Mapping[str, ExactLayer]) -> None:
        scales = {n["output"]: n["attrs"]["scale"] for n in self.nodes if n["op"] == Op.QUANTIZE}
        for index, node in enumerate(self.nodes):
            scale = scales.get(node["inputs"][0]) if node["inputs"] else None
            if node["name"] in exact and scale is not None:
                self.exact_steps[str(index)] = ExactReduction(node, exact[node["name"]], scale)
            elif node["op"] in POOLING_OPS and scale is not None:
                self.exact_steps[str(index)] = CodePooling(node, scale)

    def _register(self, name: str, params: dict[str, np.ndarray]) -> None:
        if name in self.slots:
            return
        if name not in params:
            raise MbzError(f"the graph names tensor {name!r}, which is not among the params")
        self.slots[name] = f"param_{len(self.slots)}"
        value = torch.tensor(np.asarray(params[name], dtype=np.float32))
        self.register_buffer(self.slots[name], value)

    def node_tensors(self, node: dict) -> dict[str, torch.Tensor]:
        """The tensors ``node`` reads, by role (``weight``, ``bias``...)."""
        return {role: self.get_buffer(self.slots[n]) for role, n in node["params"].items()}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits ``[N, classes]`` of a preprocessed float32 batch ``[N, C, H, W]``."""
        values = {self.input_name: x}
        for index, node in enumerate(self.nodes):
            inputs = [values[name] for name in node["inputs"]]
            values[node["output"]] = self._run(index, node, inputs)
        return values[self.output_name]

    def _run(self, index: int, node: dict, inputs: Tensors) -> torch.Tensor:
        if str(index) in self.exact_steps:
            return self.exact_steps[str(index)](inputs[0])
        return OPS[node["op"]](inputs, self.node_tensors(node), node["attrs"])


def preprocess_images(
    images: np.ndarray | torch.Tensor,
    preprocess: dict,
    device: torch.device | str,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> torch.Tensor:
    """uint8 images ``[N, H, W, C]`` (an array, or a tensor on any device) -> float32
    ``[N, C, H, W]`` graph input on ``device``: ``((image / 255) - mean[c]) / std[c]`` in float32,
    as SPEC.md section 6 defines, laid out in ``memory_format`` (training uses channels_last)."""
    batch = images if isinstance(images, torch.Tensor) else np.asarray(images)
    channels = len(preprocess["mean"])
    shaped = batch.ndim == 4 and batch.shape[-1] == channels
    if str(batch.dtype) not in ("uint8", "torch.uint8") or not shaped:
        raise MbzError(
            f"expected uint8 images [N, H, W, {channels}], got {batch.dtype} {list(batch.shape)}"
        )
    x = batch if isinstance(batch, torch.Tensor) else torch.from_numpy(batch.copy())
    x = x.to(device).float() / 255
    mean = torch.tensor(preprocess["mean"], dtype=torch.float32, device=device)
    std = torch.tensor(preprocess["std"], dtype=torch.float32, device=device)
    return ((x - mean) / std).permute(0, 3, 1, 2).contiguous(memory_format=memory_format)


def image_batches(
    images: np.ndarray,
    preprocess: dict,
    device: torch.device | str,
    batch_size: int,
    progress: Callable[[int], None] | None = None,
) -> Iterator[tuple[slice, torch.Tensor]]:
    """The graph inputs of ``images``, ``batch_size`` at a time, each with the slice of
    ``images`` it holds; ``progress(count)`` is called once the caller is done with a batch."""
    for begin in range(0, len(images), batch_size):
        part = slice(begin, min(begin + batch_size, len(images)))
        yield part, preprocess_images(images[part], preprocess, device)
        if progress:
            progress(part.stop - part.start)
