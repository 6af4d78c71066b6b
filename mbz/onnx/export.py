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
  file's axis; int_codebook: the same with int8 centroids, ``Cast`` to float32.
- sparse (bitmap or CSR in the file): the kept values only, and the positions as a bitmap
  (one bit per element, unpacked by ``BitShift`` and ``BitwiseAnd``); every position gathers
  from ``[0, kept values...]`` at ``keep * CumSum(keep)``. Uniform codes are put in place first,
  then decoded, then the pruned positions set to 0 by ``Where``.
- ``quantize`` nodes: ``Mul`` by the float32 reciprocal of the scale, ``Clip`` to the code range
  (when narrower than 8 bits), ``QuantizeLinear`` with scale 1 and the file's zero point (it
  rounds half to even) giving the codes, and ``DequantizeLinear`` with the file's scale and zero
  point where a node reads the values as floats. onnxruntime's ``QuantizeLinear`` divides by
  its scale, which rounds differently from SPEC.md section 7 at ties; with scale 1 the division
  is exact, so the result is bit for bit the numpy runtime's.
- exact layers (``mbz.runtime.exact``; SPEC.md 7.3 and 8.1): ``ConvInteger`` /
  ``MatMulInteger`` on the codes and uint8 integer weights, or a float32 ``Conv`` of
  integer-valued tensors for grouped layers below ``2**24``, then ``Cast``, ``Mul``
  (multipliers), ``Add`` (bias); pooling of codes sums ``q - z`` exactly, then ``Mul``, ``Div``.
- the other ops: ``Conv``, ``Gemm`` (``transB``), ``Mul``/``Add`` (batchnorm), ``Relu``,
  ``Clip`` (relu6), ``Add``, ``AveragePool`` (``count_include_pad``), ``MaxPool``,
  ``GlobalAveragePool``, ``Flatten``.

``dense=True`` writes every weight as a plain float32 initializer instead.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from mbz.format import (
    CodebookTensor,
    DenseTensor,
    Encoding,
    IntCodebookTensor,
    MbzFile,
    Tensor,
    UniformTensor,
)
from mbz.format.bits import pack_bits
from mbz.format.constants import Op
from mbz.format.encodings import encoding_of
from mbz.format.limits import DEFAULT_LIMITS, Limits
from mbz.format.tensors import ChannelCodebookTensor
from mbz.runtime import exact
from mbz.runtime.exact import ExactLayer
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


def codes_value(value: str) -> str:
    """The uint8 codes ``q`` (QuantizeLinear's output) of the ONNX value ``value`` that a
    ``quantize`` node writes."""
    return f"{value}:q"


def code_zero_point(value: str) -> str:
    """The uint8 scalar zero point of the codes ``codes_value(value)``."""
    return f"{value}:zero_point"


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

    def produces(self, value: str) -> bool:
        """Whether a node already computes ``value``."""
        return any(value in node.output for node in self.nodes)

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
    tensor: CodebookTensor | ChannelCodebookTensor,
    kept: np.ndarray,
    out: str,
) -> str:
    """``codebook[indices]``, the indices cast to int32 (Gather takes no unsigned indices);
    int8 centroids stay int8 in the file and are cast to float32 in the graph."""
    indices = b.codes(f"{name}:indices", kept, tensor.bits)
    index32 = b.op("Cast", [indices], f"{name}:indices32", to=TensorProto.INT32)
    if tensor.codebook.dtype == np.int8:
        stored = b.constant(f"{name}:codebook_i8", tensor.codebook)
        codebook = b.op("Cast", [stored], f"{name}:codebook", to=TensorProto.FLOAT)
    else:
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
    """``value`` reshaped to ``shape`` (one shape constant per distinct shape)."""
    target = b.constant(f"const:shape[{','.join(map(str, shape))}]", np.array(shape))
    return b.op("Reshape", [value, target], out)


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
    b: _Builder,
    name: str,
    tensor: Tensor,
    stored: np.ndarray,
    out: str,
    decode: StoredDecoder,
    dtype: type = F32,
) -> str:
    """The stored values (floats or codebook indices) decoded to ``out`` (of ``dtype``) by
    ``decode``, put in place with zeros at pruned positions when the tensor is sparse."""
    if tensor.mask is None:
        return decode(b, name, tensor, stored, out)
    values = decode(b, name, tensor, stored[tensor.mask], f"{name}:kept")
    _, index = _gather_index(b, name, tensor.mask)
    return _expand(b, name, values, index, tensor.shape, dtype, out)


def _decode_float(b: _Builder, out: str, tensor: DenseTensor) -> str:
    """f32 and f16: the stored floats."""
    return _in_place(b, out, tensor, tensor.values, out, _decode_dense)


def _decode_plain_codebook(b: _Builder, out: str, tensor: CodebookTensor) -> str:
    """``codebook[indices]``."""
    return _in_place(b, out, tensor, tensor.indices, out, _decode_codebook)


def _decode_scaled_codebook(b: _Builder, out: str, tensor: ChannelCodebookTensor) -> str:
    """``scale[c] * codebook[indices]``, the scales broadcast along the file's axis (scaled and
    integer codebooks)."""
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
    Encoding.INT_CODEBOOK: _decode_scaled_codebook,
}


def _decode_weight(b: _Builder, name: str, tensor: Tensor, dense: bool) -> str:
    """Add the nodes that decode one tensor of the file; returns ``tensor_value(name)``."""
    out = tensor_value(name)
    if dense:
        return b.constant(out, tensor.decode())
    return DECODERS[encoding_of(tensor)](b, out, tensor)


# ---------------------------------------------------------------------------------- graph ops


Emitter = Callable[[_Builder, dict, list[str], dict[str, str], str, Shape], str]


def _window(attrs: dict) -> dict:
    """The ONNX ``strides``, ``pads`` and (convolutions) ``dilations`` of a window op."""
    ph, pw = attrs["padding"]
    window = {"strides": list(attrs["stride"]), "pads": [ph, pw, ph, pw]}
    if "dilation" in attrs:
        window["dilations"] = list(attrs["dilation"])
    return window


def _conv2d(b: _Builder, node: dict, xs: list[str], p: dict[str, str], out: str, _: Shape) -> str:
    attrs = node["attrs"]
    inputs = [xs[0], p["weight"], p["bias"]]
    return b.op("Conv", inputs, out, group=attrs["groups"], **_window(attrs))


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
        return b.op(op_type, xs, out, kernel_shape=list(attrs["kernel"]), **_window(attrs), **extra)

    return emit


def _quantize(b: _Builder, node: dict, xs: list[str], p: dict[str, str], out: str, _: Shape) -> str:
    """SPEC.md section 7 as multiply-by-reciprocal and QuantizeLinear(scale 1): the codes
    ``codes_value(out)``; ``_dequantize_codes`` adds the float values where a node reads them."""
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
    zp = b.constant(code_zero_point(out), np.uint8(zero_point))
    one = b.constant("const:1_f32", F32(1))
    return b.op("QuantizeLinear", [scaled, one, zp], codes_value(out))


def _dequantize_codes(b: _Builder, value: str, attrs: dict) -> str:
    """The float values ``value`` of the codes of a quantize node (``attrs``): a
    ``DequantizeLinear`` with its scale and zero point, added once, when first read."""
    if not b.produces(value):
        scale = b.constant(f"{value}:scale", F32(attrs["scale"]))
        b.op("DequantizeLinear", [codes_value(value), scale, code_zero_point(value)], value)
    return value


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


# ------------------------------------------------------------------------ exact integer layers


def _integer_uniform(b: _Builder, out: str, tensor: UniformTensor) -> str:
    """``codes - zero_point[c]`` as int32; when sparse, the kept codes are put in place and
    the pruned positions multiplied by 0."""
    view = (-1,) + (1,) * (len(tensor.shape) - 1)
    zero = b.codes(f"{out}:zero_point", tensor.zero_point.reshape(view), tensor.bits)
    zero32 = b.op("Cast", [zero], f"{out}:zero_point32", to=TensorProto.INT32)
    if tensor.mask is None:
        codes = b.codes(f"{out}:codes", tensor.qdata, tensor.bits)
        codes32 = b.op("Cast", [codes], f"{out}:codes32", to=TensorProto.INT32)
        return b.op("Sub", [codes32, zero32], out)
    keep, index = _gather_index(b, out, tensor.mask)
    kept = b.codes(f"{out}:codes", tensor.qdata[tensor.mask], tensor.bits)
    kept32 = b.op("Cast", [kept], f"{out}:kept32", to=TensorProto.INT32)
    codes32 = _expand(b, out, kept32, index, tensor.shape, np.int32, f"{out}:codes32")
    centred = b.op("Sub", [codes32, zero32], f"{out}:centred")
    return b.op("Mul", [centred, _reshape(b, keep, tensor.shape, f"{out}:keep_mask")], out)


def _gather_integers(
    b: _Builder, name: str, tensor: IntCodebookTensor, kept: np.ndarray, out: str
) -> str:
    """The int8 centroids at the indices ``kept``, as int32."""
    indices = b.codes(f"{name}:indices", kept, tensor.bits)
    index32 = b.op("Cast", [indices], f"{name}:indices32", to=TensorProto.INT32)
    codebook = b.constant(f"{name}:codebook_i8", tensor.codebook)
    codebook32 = b.op("Cast", [codebook], f"{name}:codebook32", to=TensorProto.INT32)
    return b.op("Gather", [codebook32, index32], out, axis=0)


def _integer_codebook(b: _Builder, out: str, tensor: IntCodebookTensor) -> str:
    """``codebook[indices]`` of the int8 centroids, as int32 (the scales are the plan's)."""
    return _in_place(b, out, tensor, tensor.indices, out, _gather_integers, np.int32)


# The nodes that decode the integer weight ``w_int`` of each encoding that has one
# (``exact.integer_weight``) into the int32 value ``out``, 0 at pruned positions.
INTEGER_DECODERS: dict[Encoding, WeightDecoder] = {
    Encoding.UNIFORM: _integer_uniform,
    Encoding.INT_CODEBOOK: _integer_codebook,
}

UINT8_TOP = 255
# uint8 x uint8 products summed over fewer terms than this stay below 2**31
INTEGER_FAN_IN_LIMIT = exact.INT32_EXACT // (UINT8_TOP * UINT8_TOP)


@dataclass(frozen=True)
class IntegerLayer:
    """An exact layer as the export computes it: with ``ConvInteger`` / ``MatMulInteger`` on
    the uint8 weight ``w_int + offsets[c]``, or (``offsets`` None) with a float32 ``Conv`` of
    integer-valued tensors; then the plan's epilogue."""

    plan: ExactLayer
    offsets: np.ndarray | None  # uint8 [out]

    @property
    def shared(self) -> bool:
        """Whether one offset serves every output channel (it is then the weight zero point
        of ``ConvInteger`` / ``MatMulInteger``)."""
        return self.offsets is not None and bool((self.offsets == self.offsets[0]).all())


def integer_layers(graph: dict, tensors: Mapping[str, Any]) -> dict[str, IntegerLayer]:
    """How the export computes each exact layer (``exact.exact_layers``), by node name.

    Grouped convolutions whose bound is below ``2**24`` take float32 ``Conv`` (onnxruntime's
    ``ConvInteger`` has no depthwise kernel and is several times slower there); every other
    layer whose integer weights fit uint8 with one offset per output channel, and whose
    ``fan_in`` keeps any sum of uint8 x uint8 products below ``2**31``, takes the integer
    kernels; the rest take float32 ``Conv`` when below ``2**24``, else stay on the float path.
    """
    nodes = {n["name"]: n for n in graph["nodes"]}
    layers = {}
    for name, plan in exact.exact_layers(graph, tensors).items():
        weight = tensors[nodes[name]["params"]["weight"]]
        offsets = uint8_offsets(plan.weight, getattr(weight, "zero_point", None))
        integer = offsets is not None and plan.fan_in < INTEGER_FAN_IN_LIMIT
        grouped = nodes[name]["attrs"].get("groups", 1) > 1
        if plan.float32_exact and plan.weight.ndim == 4 and (grouped or not integer):
            layers[name] = IntegerLayer(plan, None)
        elif integer:
            layers[name] = IntegerLayer(plan, offsets)
    return layers


def uint8_offsets(weight: np.ndarray, zero_points: np.ndarray | None) -> np.ndarray | None:
    """Per output channel (axis 0) an offset that makes ``weight + offset`` uint8: the uniform
    codes' ``zero_points`` (when given) if they are all equal (the weight is then the codes),
    else one shared offset when one exists, else those zero points, else each channel's own;
    None when a channel spans more than 256 integers."""
    channels = len(weight)
    zeros = None if zero_points is None else np.broadcast_to(zero_points, (channels,))
    if zeros is not None and (zeros == zeros[0]).all():
        return zeros.astype(np.uint8)
    rows = weight.reshape(channels, -1).astype(np.int64)
    low, high = rows.min(axis=1, initial=0), rows.max(axis=1, initial=0)
    shared = -int(low.min())
    if int(high.max()) + shared <= UINT8_TOP:
        return np.full(channels, shared, np.uint8)
    if zeros is not None:
        return zeros.astype(np.uint8)
    if (high - low > UINT8_TOP).any():
        return None
    return (-low).astype(np.uint8)


def _integer_weight(
    b: _Builder, name: str, tensor: Tensor, layer: IntegerLayer, dense: bool
) -> str:
    """The weight of an exact layer: uint8 ``w_int + offsets[c]``, or float32 ``w_int`` for
    a float32 ``Conv``; decoded in-graph from the file's codes (constant-folded when the
    session opens), or stored plain when ``dense``."""
    out = integer_value(name)
    weight = layer.plan.weight
    view = (-1,) + (1,) * (weight.ndim - 1)
    if layer.offsets is None:
        if dense:
            return b.constant(out, weight.astype(F32))
        values = INTEGER_DECODERS[encoding_of(tensor)](b, f"{out}:int32", tensor)
        return b.op("Cast", [values], out, to=TensorProto.FLOAT)
    if dense:
        return b.constant(out, (weight + layer.offsets.reshape(view)).astype(np.uint8))
    if _offsets_are_zero_points(tensor, layer.offsets):  # the weight is the codes themselves
        codes = b.codes(f"{out}:codes", tensor.qdata, tensor.bits)
        nibbles = tensor.bits <= NIBBLE_BITS
        return b.op("Cast", [codes], out, to=TensorProto.UINT8) if nibbles else codes
    values = INTEGER_DECODERS[encoding_of(tensor)](b, f"{out}:int32", tensor)
    offsets = _int32(b, _offsets(b, out, layer), view, f"{out}:offsets32")
    shifted = b.op("Add", [values, offsets], f"{out}:shifted")
    return b.op("Cast", [shifted], out, to=TensorProto.UINT8)


def _offsets_are_zero_points(tensor: Tensor, offsets: np.ndarray) -> bool:
    """Whether ``tensor`` is dense uniform codes whose zero points are ``offsets``."""
    return (
        isinstance(tensor, UniformTensor)
        and tensor.mask is None
        and np.array_equal(np.broadcast_to(tensor.zero_point, offsets.shape), offsets)
    )


def integer_value(name: str) -> str:
    """The ONNX value holding the weight of the exact layers that read tensor ``name``."""
    return f"integer:{name}"


def _offsets(b: _Builder, weight: str, layer: IntegerLayer) -> str:
    """The uint8 offsets of the integer weight ``weight``: a scalar when shared, else [out]."""
    assert layer.offsets is not None  # only integer-kernel layers have offsets
    if layer.shared:
        return b.constant(f"{weight}:offset", layer.offsets[0])
    return b.constant(f"{weight}:offsets", layer.offsets)


def _int32(b: _Builder, value: str, view: tuple[int, ...], out: str) -> str:
    """``value`` cast to int32 and reshaped to ``view``."""
    return _reshape(b, b.op("Cast", [value], f"{out}:cast", to=TensorProto.INT32), view, out)


def _centred(b: _Builder, source: str) -> str:
    """The codes of ``source`` as integer-valued float32 ``q - z`` (once per source)."""
    out = f"{source}:centred"
    if not b.produces(out):
        codes = b.op("Cast", [codes_value(source)], f"{source}:codes_f32", to=TensorProto.FLOAT)
        zero = b.op("Cast", [code_zero_point(source)], f"{source}:zero_f32", to=TensorProto.FLOAT)
        b.op("Sub", [codes, zero], out)
    return out


def _epilogue(b: _Builder, acc: str, layer: IntegerLayer, bias: str, rank: int, out: str) -> str:
    """``(float32(acc) * multiplier[c]) + bias[c]``, separate float32 ops (SPEC.md 7.3; the
    ``Cast`` only for int32 accumulators), the constants shaped to broadcast along the channel
    axis of a ``rank``-d value."""
    view = (-1,) + (1,) * (rank - 1)
    if layer.offsets is not None:
        acc = b.op("Cast", [acc], f"{out}:acc_f32", to=TensorProto.FLOAT)
    multiplier = b.constant(f"{out}:multiplier", layer.plan.multiplier.reshape(view))
    scaled = b.op("Mul", [acc, multiplier], f"{out}:scaled")
    if rank > 1:
        bias = _reshape(b, bias, view, f"{out}:bias")
    return b.op("Add", [scaled, bias], out)


def _ones(b: _Builder, shape: list[int], dtype: type, out: str) -> str:
    """A tensor of ones (built in-graph, so it takes no room in the file)."""
    ones = numpy_helper.from_array(np.ones(1, dtype))
    return b.op("ConstantOfShape", [b.constant(f"{out}:shape", np.array(shape))], out, value=ones)


def _exact_conv2d(
    b: _Builder, node: dict, source: str, p: dict[str, str], layer: IntegerLayer, out: str
) -> str:
    """float32 ``Conv`` of the centred codes, or ``ConvInteger`` of the codes of ``source``
    and the uint8 weight. onnxruntime takes one weight zero point only, so with per-channel
    offsets ``o`` the accumulator is ``ConvInteger(q, w_int + o) - o[c] * S``, ``S`` the
    window sums of ``q - z`` over the channel's group (a ``ConvInteger`` with all-ones
    weights)."""
    window = {"group": node["attrs"]["groups"], **_window(node["attrs"])}
    if layer.offsets is None:
        acc = b.op("Conv", [_centred(b, source), p["weight"]], f"{out}:acc", **window)
        return _epilogue(b, acc, layer, p["bias"], 3, out)
    codes, zero = codes_value(source), code_zero_point(source)
    offsets = _offsets(b, p["weight"], layer)
    if layer.shared:
        acc = b.op("ConvInteger", [codes, p["weight"], zero, offsets], f"{out}:acc", **window)
        return _epilogue(b, acc, layer, p["bias"], 3, out)
    raw = b.op("ConvInteger", [codes, p["weight"], zero], f"{out}:raw_acc", **window)
    shape = list(layer.plan.weight.shape)
    if window["group"] == 1:
        shape[0] = 1  # one sum over all input channels serves every output channel
    ones = _ones(b, shape, np.uint8, f"{out}:ones")
    sums = b.op("ConvInteger", [codes, ones, zero], f"{out}:sums", **window)
    offsets32 = _int32(b, offsets, (-1, 1, 1), f"{out}:offsets32")
    correction = b.op("Mul", [sums, offsets32], f"{out}:correction")
    return _epilogue(b, b.op("Sub", [raw, correction], f"{out}:acc"), layer, p["bias"], 3, out)


def _exact_linear(
    b: _Builder, node: dict, source: str, p: dict[str, str], layer: IntegerLayer, out: str
) -> str:
    """``MatMulInteger`` of the codes of ``source`` and the transposed uint8 weight, with
    the offsets as (per-column) weight zero points."""
    weight = b.op("Transpose", [p["weight"]], f"{p['weight']}:transposed", perm=[1, 0])
    zeros = [code_zero_point(source), _offsets(b, p["weight"], layer)]
    acc = b.op("MatMulInteger", [codes_value(source), weight, *zeros], f"{out}:acc")
    return _epilogue(b, acc, layer, p["bias"], 1, out)


def _exact_pool(
    b: _Builder, node: dict, source: str, quantize: dict, out: str, shape: Shape
) -> str:
    """Average pooling of the codes of ``source`` (``quantize``: its node's attrs): the sums
    ``S`` of ``q - z`` over each window, exact in float32 (``ReduceSum``, or a depthwise
    ``Conv`` with all-ones weights; padding counts as 0), then ``(S * float32(scale)) /
    float32(window)``."""
    centred = _centred(b, source)
    if node["op"] == Op.GLOBAL_AVGPOOL:
        kernel = list(shape[1:])
        axes = b.constant("const:[2,3]", np.array([2, 3]))
        sums = b.op("ReduceSum", [centred, axes], f"{out}:sums", keepdims=1)
    else:
        kernel = node["attrs"]["kernel"]
        ones = _ones(b, [shape[0], 1, *kernel], F32, f"{out}:ones")
        window = _window(node["attrs"])
        sums = b.op("Conv", [centred, ones], f"{out}:sums", group=shape[0], **window)
    scale = b.constant(f"{out}:code_scale", F32(quantize["scale"]))
    scaled = b.op("Mul", [sums, scale], f"{out}:scaled")
    return b.op("Div", [scaled, b.constant(f"{out}:window", F32(np.prod(kernel)))], out)


# ------------------------------------------------------------------------------------- export


def _preprocess(b: _Builder, graph: dict, mean: np.ndarray, std: np.ndarray) -> None:
    """uint8 NHWC images -> the graph input: ``((x / 255) - mean) / std``, then NCHW."""
    x = b.op("Cast", [INPUT_NAME], "preprocess:float", to=TensorProto.FLOAT)
    x = b.op("Div", [x, b.constant("preprocess:255", F32(255))], "preprocess:unit")
    x = b.op("Sub", [x, b.constant("preprocess:mean", mean)], "preprocess:centered")
    x = b.op("Div", [x, b.constant("preprocess:std", std)], "preprocess:normalized")
    b.op("Transpose", [x], graph_value(graph["input"], graph), perm=[0, 3, 1, 2])


def _emit(
    b: _Builder,
    node: dict,
    graph: dict,
    params: dict[str, str],
    layer: IntegerLayer | None,
    codes: dict[str, dict],
    shape: Shape,
) -> None:
    """The nodes of one graph node: an exact layer (``layer``), average pooling of codes, or
    its ``EMITTERS`` entry; ``codes``: the attrs of every quantize node, by output value."""
    inputs = [graph_value(name, graph) for name in node["inputs"]]
    output = graph_value(node["output"], graph)
    source = node["inputs"][0]
    if layer is not None:
        emit_exact = _exact_conv2d if node["op"] == Op.CONV2D else _exact_linear
        emit_exact(b, node, inputs[0], params, layer, output)
    elif node["op"] in exact.POOLING_OPS and source in codes:
        _exact_pool(b, node, inputs[0], codes[source], output, shape)
    else:
        for name, value in zip(node["inputs"], inputs, strict=True):
            if name in codes:
                _dequantize_codes(b, value, codes[name])
        EMITTERS[node["op"]](b, node, inputs, params, output, shape)


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
    integer = integer_layers(graph, mbz.tensors)
    codes = {n["output"]: n["attrs"] for n in graph["nodes"] if n["op"] == Op.QUANTIZE}
    decoded: dict[str, str] = {}
    for node in graph["nodes"]:
        layer = integer.get(node["name"])
        params = {}
        for role, name in node["params"].items():
            decode: Callable[..., str]
            if layer is not None and role == "weight":
                key, decode = integer_value(name), partial(_integer_weight, layer=layer)
            else:
                key, decode = name, _decode_weight
            if key not in decoded:
                decoded[key] = decode(b, name, mbz.tensors[name], dense=dense)
            params[role] = decoded[key]
        _emit(b, node, graph, params, layer, codes, shapes[node["inputs"][0]])
    if graph["output"] in codes:
        _dequantize_codes(b, OUTPUT_NAME, codes[graph["output"]])
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
