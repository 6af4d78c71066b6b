"""The .mbz container codec (numpy and bitarray only; never imports torch).

Writer: ``write_mbz`` / ``encode_mbz``; reader: ``read_mbz`` / ``decode_mbz``; the tensor objects
both sides use: ``DenseTensor``, ``CodebookTensor``, ``UniformTensor``,
``ScaledCodebookTensor``, ``IntCodebookTensor``. SPEC.md is normative.
"""

from .constants import Encoding, Entropy, Op, SectionKind, Sparsity
from .container import Layout, MbzFile, SectionInfo, decode_mbz, encode_mbz, read_mbz, write_mbz
from .errors import MbzFormatError
from .limits import DEFAULT_LIMITS, Limits
from .tensors import (
    CodebookTensor,
    DenseTensor,
    IntCodebookTensor,
    ScaledCodebookTensor,
    Tensor,
    UniformTensor,
)

__all__ = [
    "DEFAULT_LIMITS",
    "CodebookTensor",
    "DenseTensor",
    "Encoding",
    "Entropy",
    "IntCodebookTensor",
    "Layout",
    "Limits",
    "MbzFile",
    "MbzFormatError",
    "Op",
    "ScaledCodebookTensor",
    "SectionInfo",
    "SectionKind",
    "Sparsity",
    "Tensor",
    "UniformTensor",
    "decode_mbz",
    "encode_mbz",
    "read_mbz",
    "write_mbz",
]
