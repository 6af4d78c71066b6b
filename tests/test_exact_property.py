"""Property (issue 14): on random small all-exact graphs and random uint8 images, the numpy
runtime, the torch graph and onnxruntime give bit-identical logits."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mbz.format import DenseTensor, IntCodebookTensor, UniformTensor, read_mbz, write_mbz
from mbz.onnx.export import export_onnx
from mbz.onnx.session import OnnxProgram
from mbz.runtime import load_program
from mbz.runtime.exact import all_exact
from tests.test_exactness import torch_logits

F32 = np.float32


class Builder:
    """A graph under construction: nodes appended in order, tensors by name."""

    def __init__(self, draw: st.DrawFn, channels: int, size: int) -> None:
        self.draw, self.nodes, self.tensors = draw, [], {}
        self.value, self.channels, self.size = "input", channels, size
        self.rng = np.random.default_rng(draw(st.integers(0, 2**32 - 1)))

    def add(self, op: str, params: bool = False, **attrs) -> str:
        name = f"n{len(self.nodes)}"
        names = {"weight": f"{name}.weight", "bias": f"{name}.bias"} if params else {}
        self.nodes.append({"name": name, "op": op, "inputs": [self.value], "output": name,
                           "params": names, "attrs": attrs})
        self.value = name
        return name

    def quantize(self) -> None:
        """An activation quantizer: 4 or 8 bits, a random float32 scale and zero point."""
        bits = self.draw(st.sampled_from([4, 8]))
        scale = float(F32(self.draw(st.floats(2.0**-6, 0.5))))
        zero = self.draw(st.integers(0, 2**bits - 1))
        self.add("quantize", bits=bits, scale=scale, zero_point=zero)

    def weight(self, shape: tuple[int, ...]) -> UniformTensor | IntCodebookTensor:
        """Uniform codes (per tensor or per channel) or an int8 codebook, random bits."""
        bits, out = self.draw(st.integers(2, 8)), shape[0]
        if self.draw(st.booleans()):
            per_channel = self.draw(st.booleans())
            channels = out if per_channel else 1
            return UniformTensor(
                qdata=self.rng.integers(0, 2**bits, shape, dtype=np.uint8),
                scale=self.rng.uniform(1e-3, 0.1, channels).astype(F32),
                zero_point=self.rng.integers(0, 2**bits, channels).astype(np.uint8),
                bits=bits, axis=0 if per_channel else None,
            )
        return IntCodebookTensor(
            codebook=self.rng.integers(-127, 128, 2**bits).astype(np.int8),
            scale=self.rng.uniform(1e-4, 1e-2, out).astype(np.float16),
            indices=self.rng.integers(0, 2**bits, shape).astype(np.uint8),
            bits=bits,
        )

    def layer(self, op: str, shape: tuple[int, ...], **attrs) -> None:
        name = self.add(op, params=True, **attrs)
        self.tensors[f"{name}.weight"] = self.weight(shape)
        self.tensors[f"{name}.bias"] = DenseTensor(self.rng.normal(0, 0.5, shape[0]).astype(F32))

    def conv(self) -> None:
        """A random conv2d (full or depthwise, 1x1 or 3x3, stride 1 or 2), then a relu/relu6,
        a residual add of its (codes) input, or neither, then a quantizer."""
        source, residual = self.value, self.draw(st.booleans())
        depthwise = self.draw(st.booleans())
        kernel = self.draw(st.sampled_from([1, 3]))
        stride = 1 if residual or self.size <= 2 else self.draw(st.sampled_from([1, 2]))
        out = self.channels if depthwise or residual else self.draw(st.integers(1, 6))
        groups = self.channels if depthwise else 1
        self.layer("conv2d", (out, self.channels // groups, kernel, kernel),
                   stride=[stride] * 2, padding=[kernel // 2] * 2, dilation=[1, 1], groups=groups)
        self.channels, self.size = out, (self.size - 1) // stride + 1
        if residual:
            self.nodes.append({"name": f"{self.value}.add", "op": "add", "params": {},
                               "inputs": [source, self.value], "output": f"{self.value}.add",
                               "attrs": {}})
            self.value = f"{self.value}.add"
        elif activation := self.draw(st.sampled_from([None, "relu", "relu6"])):
            self.add(activation)
        self.quantize()

    def head(self, classes: int) -> None:
        """global_avgpool, flatten, the classifier's operand quantizer, linear."""
        self.add("global_avgpool")
        self.add("flatten")
        self.quantize()
        self.layer("linear", (classes, self.channels))


@st.composite
def exact_files(draw: st.DrawFn) -> tuple[dict, dict]:
    """(metadata with a random all-exact graph and preprocessing, its tensors)."""
    channels, size = draw(st.integers(1, 4)), draw(st.integers(3, 8))
    b = Builder(draw, channels, size)
    b.quantize()
    for _ in range(draw(st.integers(1, 3))):
        b.conv()
    b.head(draw(st.integers(2, 5)))
    graph = {"input": "input", "input_shape": [channels, size, size], "output": b.value,
             "nodes": b.nodes}
    mean = [float(F32(draw(st.floats(0, 1)))) for _ in range(channels)]
    std = [float(F32(draw(st.floats(0.1, 1)))) for _ in range(channels)]
    preprocess = {"layout": "NHWC", "dtype": "uint8", "mean": mean, "std": std}
    return {"graph": graph, "preprocess": preprocess}, b.tensors


@pytest.mark.slow
@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(case=exact_files(), seed=st.integers(0, 2**32 - 1))
def test_random_exact_graphs_give_identical_logits_in_every_runtime(tmp_path_factory, case, seed):
    metadata, tensors = case
    path = tmp_path_factory.mktemp("exact") / "random.mbz"
    write_mbz(path, metadata, tensors)
    mbz = read_mbz(path)
    assert all_exact(mbz.metadata["graph"], mbz.tensors)
    c, h, w = metadata["graph"]["input_shape"]
    images = np.random.default_rng(seed).integers(0, 256, (6, h, w, c), dtype=np.uint8)
    numpy_logits = load_program(path).predict(images)
    onnx_logits = OnnxProgram(export_onnx(mbz)).predict(images)
    torch_out = torch_logits(path, images)
    assert numpy_logits.tobytes() == torch_out.astype(F32).tobytes()
    assert numpy_logits.tobytes() == onnx_logits.astype(F32).tobytes()
