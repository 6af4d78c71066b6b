"""Export a .mbz file to ONNX, weights still compressed and decoded by the graph itself.

Imports numpy, onnx, ``mbz.format`` and ``mbz.runtime`` (its graph validation), never torch:
``export_onnx`` builds the model from the file alone (``mbz.onnx.session`` runs it).

Opset 21 with IR version 10 (ONNX 1.16). Opset 21 is the first in which ``Cast`` and
``DequantizeLinear`` take packed 4-bit (UINT4) tensors, so 1-4 bit codes stay 4-bit in the ONNX
file; IR 10 is the IR of that opset (``make_model`` writes the newest IR the onnx package knows,
which older onnxruntime releases refuse to load).

How each part of the file becomes ONNX (SPEC.md sections 3, 6 and 7):

- input: raw uint8 images ``[N, H, W, C]`` (N dynamic); ``Cast``, ``Div`` 255, ``Sub`` mean,
  ``Div`` std, ``Transpose`` to NCHW: the same float32 operations, in the same order, as the
  numpy runtime. Output ``logits [N, classes]``.
- f32 weights: float32 initializers; f16: float16 initializers and a ``Cast``.
- codebook: the float32 centroids and the indices (UINT4 when ``bits <= 4``, else UINT8; Huffman
  streams decoded), ``Cast`` to int32 (``Gather`` takes no unsigned indices), ``Gather``.
- uniform: the codes (UINT4/UINT8) with their scales and zero points, ``DequantizeLinear``
  (``axis`` where the file is per channel).
- scaled_codebook: as codebook, then ``Mul`` by the scales (widened to float32) along the
  file's axis.
- sparse (bitmap or CSR in the file): the kept values only, and the positions as a bitmap
  (one bit per element, unpacked by ``BitShift`` and ``BitwiseAnd``); every position gathers
  from ``[0, kept values...]`` at ``keep * CumSum(keep)``. Uniform codes are put in place first,
  then decoded, then the pruned positions set to 0 by ``Where``.
- ``quantize`` nodes: ``Mul`` by the float32 reciprocal of the scale, ``Clip`` to the code range
  (when narrower than 8 bits), ``QuantizeLinear`` with scale 1 and the file's zero point (it
  rounds half to even), ``DequantizeLinear`` with the file's scale and zero point. onnxruntime's
  ``QuantizeLinear`` divides by its scale, which rounds differently from SPEC.md section 7 at
  ties; with scale 1 the division is exact, so the result is bit for bit the numpy runtime's.
- the other ops: ``Conv``, ``Gemm`` (``transB``), ``Mul``/``Add`` (batchnorm), ``Relu``,
  ``Clip`` (relu6), ``Add``, ``AveragePool`` (``count_include_pad``), ``MaxPool``,
  ``GlobalAveragePool``, ``Flatten``.

``dense=True`` writes every weight as a plain float32 initializer instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mbz.format import (
    CodebookTensor,
    DenseTensor,
    Encoding,
    MbzFile,
    ScaledCodebookTensor,
    Tensor,
    UniformTensor,
)
from mbz.format.bits import pack_bits
from mbz.format.constants import Op
from mbz.format.encodings import encoding_of
from mbz.format.limits import DEFAULT_LIMITS, Limits
from mbz.runtime.graph import Shape
from mbz.runtime.program import check_runnable

OPSET = 21
IR_VERSION = 10
INPUT_NAME = "images"
OUTPUT_NAME = "logits"
BATCH = "batch"
NIBBLE_BITS = 4  # codes of at most this many bits are stored as UINT4
BIT_SHIFTS = np.arange(8, dtype=np.uint8)  # bitmap bit i of a byte is element 8 * byte + i
F32 = np.float32


def tensor_value(name: str) -> str:
    """The ONNX value holding the decoded float32 weight tensor ``name`` of the file."""
    return f"tensor:{name}"


def graph_value(name: str, graph: dict) -> str:
    """The ONNX value of the .mbz graph value ``name`` (the graph output is ``logits``)."""
    return OUTPUT_NAME if name == graph["output"] else f"value:{name}"


@dataclass
class _Builder:
    """Nodes and initializers of the ONNX graph under construction."""

    nodes: list[onnx.NodeProto] = field(default_factory=list)
    initializers: dict[str, onnx.TensorProto] = field(default_factory=dict)

    def constant(self, name: str, array: np.ndarray | np.generic) -> str:
        """An initializer holding ``array`` (added once per name)."""
        if name not in self.initializers:
            self.initializers[name] = numpy_helper.from_array(np.asarray(array), name)
        return name

    def codes(self, name: str, values: np.ndarray, bits: int) -> str:
        """Unsigned integer codes as UINT4 (two per byte) when ``bits <= 4``, else UINT8."""
        if bits > NIBBLE_BITS:
            return self.constant(name, values.astype(np.uint8))
        self.initializers[name] = helper.make_tensor(
            name, TensorProto.UINT4, values.shape, pack_bits(values, NIBBLE_BITS), raw=True
        )
        return name

    def op(self, op_type: str, inputs: list[str], output: str, **attrs) -> str:
        """Append a node computing ``output``; returns ``output``."""
        self.nodes.append(helper.make_node(op_type, inputs, [output], name=output, **attrs))
        return output


# ------------------------------------------------------------------------------------ weights


def _decode_dense(b: _Builder, name: str, tensor: DenseTensor, kept: np.ndarray, out: str) -> str:
    """The stored float values (float16 widened by a Cast)."""
    if kept.dtype == np.float16:
        return b.op("Cast", [b.constant(f"{name}:f16", kept)], out, to=TensorProto.FLOAT)
    return b.constant(out, kept)


def _decode_codebook(
    b: _Builder,
    name: str,
    tensor: CodebookTensor | ScaledCodebookTensor,
    kept: np.ndarray,
    out: str,
) -> str:
    """``codebook[indices]``, the indices cast to int32 (Gather takes no unsigned indices)."""
    indices = b.codes(f"{name}:indices", kept, tensor.bits)
    index32 = b.op("Cast", [indices], f"{name}:indices32", to=TensorProto.INT32)
    codebook = b.constant(f"{name}:codebook", tensor.codebook.astype(F32))
    return b.op("Gather", [codebook, index32], out, axis=0)


def _dequantize(
    b: _Builder, name: str, tensor: UniformTensor, codes: str, bits: int, out: str
) -> str:
    """``DequantizeLinear`` of ``codes`` (``bits`` wide) with the tensor's scales and zero
    points, per channel along the file's axis or per tensor."""
    per_channel = tensor.axis is not None
    view = (-1,) if per_channel else ()
    scale = b.constant(f"{name}:scale", tensor.scale.astype(F32).reshape(view))
    zero_point = b.codes(f"{name}:zero_point", tensor.zero_point.reshape(view), bits)
    attrs = {"axis": tensor.axis} if per_channel else {}
    return b.op("DequantizeLinear", [codes, scale, zero_point], out, **attrs)


def _gather_index(b: _Builder, name: str, mask: np.ndarray) -> tuple[str, str]:
    """The flat keep-mask ``[count]`` (0/1, int32) unpacked in-graph from its bitmap, and for
    every position the index into ``[0, kept values...]``: ``keep * cumsum(keep)``.

    (Not NonZero + ScatterND: onnxruntime does not constant-fold NonZero, so the weights would
    be rebuilt on every run.)"""
    packed = np.frombuffer(pack_bits(mask.ravel(), 1), np.uint8).reshape(-1, 1)
    shifted = b.op(
        "BitShift",
        [b.constant(f"{name}:bitmap", packed), b.constant("const:bit_shifts", BIT_SHIFTS)],
        f"{name}:shifted",
        direction="RIGHT",
    )
    bits = b.op("BitwiseAnd", [shifted, b.constant("const:1_u8", np.uint8(1))], f"{name}:bits")
    bits32 = b.op("Cast", [bits], f"{name}:bits32", to=TensorProto.INT32)
    row = b.op("Reshape", [bits32, b.constant("const:[-1]", np.array([-1]))], f"{name}:bit_row")
    count = b.constant(f"{name}:count", np.array([mask.size]))
    keep = b.op("Slice", [row, b.constant("const:[0]", np.array([0])), count], f"{name}:keep")
    rank = b.op("CumSum", [keep, b.constant("const:0_i32", np.int32(0))], f"{name}:rank")
    return keep, b.op("Mul", [keep, rank], f"{name}:gather_index")


def _expand(b: _Builder, name: str, values: str, index: str, shape: Shape, dtype, out: str) -> str:
    """``out`` of ``shape``: the kept ``values`` at their positions, zero elsewhere."""
    zero = b.constant(f"const:[0]_{np.dtype(dtype).name}", np.zeros(1, dtype))
    padded = b.op("Concat", [zero, values], f"{name}:padded", axis=0)
    return _reshape(b, b.op("Gather", [padded, index], f"{name}:expanded", axis=0), shape, out)


def _reshape(b: _Builder, value: str, shape: Shape, out: str) -> str:
    return b.op("Reshape", [value, b.constant(f"{out}:shape", np.array(shape))], out)


def _decode_uniform(b: _Builder, out: str, tensor: UniformTensor) -> str:
    """Codes -> DequantizeLinear. When sparse, the kept codes are put in place first (as
    UINT8), and the pruned positions, which decode to ``-zero_point * scale``, then set to 0."""
    if tensor.mask is None:
        codes = b.codes(f"{out}:codes", tensor.qdata, tensor.bits)
        return _dequantize(b, out, tensor, codes, tensor.bits, out)
    keep, index = _gather_index(b, out, tensor.mask)
    kept = b.codes(f"{out}:codes", tensor.qdata[tensor.mask], tensor.bits)
    if tensor.bits <= NIBBLE_BITS:
        kept = b.op("Cast", [kept], f"{out}:codes8", to=TensorProto.UINT8)
    codes = _expand(b, out, kept, index, tensor.shape, np.uint8, f"{out}:all_codes")
    decoded = _dequantize(b, out, tensor, codes, 8, f"{out}:dequantized")
    keep_bool = b.op("Cast", [keep], f"{out}:keep_bool", to=TensorProto.BOOL)
    mask = _reshape(b, keep_bool, tensor.shape, f"{out}:mask")
    return b.op("Where", [mask, decoded, b.constant("const:0_f32", F32(0))], out)


StoredDecoder = Callable[[_Builder, str, Any, np.ndarray, str], str]


def _in_place(
    b: _Builder, name: str, tensor: Tensor, stored: np.ndarray, out: str, decode: StoredDecoder
) -> str:
    """The stored values (floats or codebook indices) decoded to ``out`` by ``decode``, put in
    place with zeros at pruned positions when the tensor is sparse."""
    if tensor.mask is None:
        return decode(b, name, tensor, stored, out)
    values = decode(b, name, tensor, stored[tensor.mask], f"{name}:kept")
    _, index = _gather_index(b, name, tensor.mask)
    return _expand(b, name, values, index, tensor.shape, F32, out)


def _decode_float(b: _Builder, out: str, tensor: DenseTensor) -> str:
    """f32 and f16: the stored floats."""
    return _in_place(b, out, tensor, tensor.values, out, _decode_dense)


def _decode_plain_codebook(b: _Builder, out: str, tensor: CodebookTensor) -> str:
    """``codebook[indices]``."""
    return _in_place(b, out, tensor, tensor.indices, out, _decode_codebook)


def _decode_scaled_codebook(b: _Builder, out: str, tensor: ScaledCodebookTensor) -> str:
    """``scale[c] * codebook[indices]``, the scales broadcast along the file's axis."""
    unscaled = _in_place(b, out, tensor, tensor.indices, f"{out}:unscaled", _decode_codebook)
    view = [1] * len(tensor.shape)
    view[tensor.axis] = -1
    scale = b.constant(f"{out}:scale", tensor.scale.astype(F32).reshape(view))
    return b.op("Mul", [unscaled, scale], out)


# The nodes that decode a tensor of each encoding into the float32 value ``out``.
WeightDecoder = Callable[[_Builder, str, Any], str]
DECODERS: dict[Encoding, WeightDecoder] = {
    Encoding.F32: _decode_float,
    Encoding.F16: _decode_float,
    Encoding.CODEBOOK: _decode_plain_codebook,
    Encoding.UNIFORM: _decode_uniform,
    Encoding.SCALED_CODEBOOK: _decode_scaled_codebook,
}


def _decode_weight(b: _Builder, name: str, tensor: Tensor, dense: bool) -> str:
    """Add the nodes that decode one tensor of the file; returns ``tensor_value(name)``."""
    out = tensor_value(name)
    if dense:
        return b.constant(out, tensor.decode())
    return DECODERS[encoding_of(tensor)](b, out, tensor)


# ---------------------------------------------------------------------------------- graph ops


Emitter = Callable[[_Builder, dict, list[str], dict[str, str], str, Shape], str]


def _conv2d(b: _Builder, node: dict, xs: list[str], p: dict[str, str], out: str, _: Shape) -> str:
    attrs = node["attrs"]
    ph, pw = attrs["padding"]
    return b.op(
        "Conv",
        [xs[0], p["weight"], p["bias"]],
        out,
        strides=list(attrs["stride"]),
        pads=[ph, pw, ph, pw],
        dilations=list(attrs["dilation"]),
        group=attrs["groups"],
    )


def _linear(b: _Builder, node: dict, xs: list[str], p: dict[str, str], out: str, _: Shape) -> str:
    return b.op("Gemm", [xs[0], p["weight"], p["bias"]], out, transB=1)


def _batchnorm(
    b: _Builder, node: dict, xs: list[str], p: dict[str, str], out: str, shape: Shape
) -> str:
    scale, shift = p["scale"], p["shift"]
    if len(shape) == 3:  # [C] -> [C, 1, 1] to broadcast over H and W
        axes = b.constant("const:[1,2]", np.array([1, 2]))
        scale = b.op("Unsqueeze", [scale, axes], f"{out}:scale")
        shift = b.op("Unsqueeze", [shift, axes], f"{out}:shift")
    return b.op("Add", [b.op("Mul", [xs[0], scale], f"{out}:scaled"), shift], out)


def _pool(op_type: str, **extra) -> Emitter:
    def emit(b: _Builder, node: dict, xs: list[str], p: dict[str, str], out: str, _: Shape) -> str:
        attrs = node["attrs"]
        ph, pw = attrs["padding"]
        return b.op(
            op_type,
            xs,
            out,
            kernel_shape=list(attrs["kernel"]),
            strides=list(attrs["stride"]),
            pads=[ph, pw, ph, pw],
            **extra,
        )

    return emit


def _quantize(b: _Builder, node: dict, xs: list[str], p: dict[str, str], out: str, _: Shape) -> str:
    """SPEC.md section 7 as multiply-by-reciprocal, QuantizeLinear(scale 1), DequantizeLinear."""
    attrs = node["attrs"]
    bits, zero_point, scale = attrs["bits"], attrs["zero_point"], F32(attrs["scale"])
    top = 2**bits - 1
    scaled = b.op("Mul", [xs[0], b.constant(f"{out}:inv_scale", F32(1) / scale)], f"{out}:x_inv")
    if top < 255:  # integer bounds commute with rounding: clip before is clip after
        low, high = F32(-zero_point), F32(top - zero_point)
        scaled = b.op(
            "Clip",
            [scaled, b.constant(f"{out}:low", low), b.constant(f"{out}:high", high)],
            f"{out}:clipped",
        )
    zp = b.constant(f"{out}:zero_point", np.uint8(zero_point))
    one = b.constant("const:1_f32", F32(1))
    q = b.op("QuantizeLinear", [scaled, one, zp], f"{out}:q")
    return b.op("DequantizeLinear", [q, b.constant(f"{out}:scale", scale), zp], out)


def _simple(op_type: str, **extra) -> Emitter:
    def emit(b: _Builder, node: dict, xs: list[str], p: dict[str, str], out: str, _: Shape) -> str:
        return b.op(op_type, xs, out, **extra)

    return emit


def _relu6(b: _Builder, node: dict, xs: list[str], p: dict[str, str], out: str, _: Shape) -> str:
    bounds = [b.constant("const:0_f32", F32(0)), b.constant("const:6_f32", F32(6))]
    return b.op("Clip", [xs[0], *bounds], out)


EMITTERS: dict[Op, Emitter] = {
    Op.CONV2D: _conv2d,
    Op.LINEAR: _linear,
    Op.BATCHNORM: _batchnorm,
    Op.RELU: _simple("Relu"),
    Op.RELU6: _relu6,
    Op.ADD: _simple("Add"),
    Op.AVGPOOL2D: _pool("AveragePool", count_include_pad=1),
    Op.MAXPOOL2D: _pool("MaxPool"),
    Op.GLOBAL_AVGPOOL: _simple("GlobalAveragePool"),
    Op.FLATTEN: _simple("Flatten", axis=1),
    Op.QUANTIZE: _quantize,
}


# ------------------------------------------------------------------------------------- export


def _preprocess(b: _Builder, graph: dict, mean: np.ndarray, std: np.ndarray) -> None:
    """uint8 NHWC images -> the graph input: ``((x / 255) - mean) / std``, then NCHW."""
    x = b.op("Cast", [INPUT_NAME], "preprocess:float", to=TensorProto.FLOAT)
    x = b.op("Div", [x, b.constant("preprocess:255", F32(255))], "preprocess:unit")
    x = b.op("Sub", [x, b.constant("preprocess:mean", mean)], "preprocess:centered")
    x = b.op("Div", [x, b.constant("preprocess:std", std)], "preprocess:normalized")
    b.op("Transpose", [x], graph_value(graph["input"], graph), perm=[0, 3, 1, 2])


def export_onnx(
    mbz: MbzFile, dense: bool = False, limits: Limits = DEFAULT_LIMITS
) -> onnx.ModelProto:
    """The ONNX model of a read .mbz file: uint8 NHWC images in, ``logits`` out, dynamic batch.

    Weights stay in the file's encodings and are decoded by the graph (module docstring);
    ``dense=True`` stores them as float32 instead. Raises MbzFormatError when the file has no
    valid graph or preprocess, or when running it would exceed ``limits``.
    """
    shapes, mean, std = check_runnable(mbz, limits)
    graph = mbz.metadata["graph"]
    b = _Builder()
    _preprocess(b, graph, mean, std)
    decoded: dict[str, str] = {}
    for node in graph["nodes"]:
        params = {}
        for role, name in node["params"].items():
            if name not in decoded:
                decoded[name] = _decode_weight(b, name, mbz.tensors[name], dense)
            params[role] = decoded[name]
        inputs = [graph_value(name, graph) for name in node["inputs"]]
        output = graph_value(node["output"], graph)
        EMITTERS[node["op"]](b, node, inputs, params, output, shapes[node["inputs"][0]])
    c, h, w = graph["input_shape"]
    output = graph["output"]
    onnx_graph = helper.make_graph(
        b.nodes,
        "mbz",
        [helper.make_tensor_value_info(INPUT_NAME, TensorProto.UINT8, [BATCH, h, w, c])],
        [helper.make_tensor_value_info(OUTPUT_NAME, TensorProto.FLOAT, [BATCH, *shapes[output]])],
        list(b.initializers.values()),
    )
    model = helper.make_model(
        onnx_graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="mbz"
    )
    model.ir_version = IR_VERSION
    model.doc_string = "exported by mbz export-onnx" + (" (dense float32 weights)" if dense else "")
    return model


def onnx_bytes(model: onnx.ModelProto) -> int:
    """Size of the serialized model in bytes (what ``onnx.save`` writes)."""
    return model.ByteSize()
