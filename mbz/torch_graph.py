"""Run mbz's graph IR (SPEC.md section 6) with torch, and turn raw images into its input."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mbz.errors import MbzError
from mbz.format.constants import Op

Tensors = list[torch.Tensor]
OpFunction = Callable[[Tensors, dict[str, torch.Tensor], dict], torch.Tensor]


def _conv2d(xs: Tensors, p: dict[str, torch.Tensor], a: dict) -> torch.Tensor:
    stride, padding, dilation = tuple(a["stride"]), tuple(a["padding"]), tuple(a["dilation"])
    return F.conv2d(xs[0], p["weight"], p["bias"], stride, padding, dilation, a["groups"])


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
    Op.LINEAR: lambda xs, p, _: F.linear(xs[0], p["weight"], p["bias"]),
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


class GraphModule(nn.Module):
    """A graph IR and its tensors as a torch module; ``forward`` maps NCHW inputs to logits.

    The tensors are buffers (``param_0``, ``param_1``... since tensor names contain dots), so
    ``.to(device)`` moves them.
    """

    def __init__(self, graph: dict, params: dict[str, np.ndarray]) -> None:
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
        for node in self.nodes:
            inputs = [values[name] for name in node["inputs"]]
            values[node["output"]] = OPS[node["op"]](inputs, self.node_tensors(node), node["attrs"])
        return values[self.output_name]


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
