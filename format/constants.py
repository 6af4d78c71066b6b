"""Every number and name of the .mbz container, shared by the reader, the writer and the runtime.

SPEC.md is the normative text; this module is its one machine-readable copy.
"""

from enum import IntEnum, StrEnum

MAGIC = b"\x89MBZ\r\n\x1a\n"
VERSION_MAJOR = 1
# 1.1 zlib metadata (section kind 3); 1.2 scaled_codebook; 1.3 int_codebook, lean side info
VERSION_MINOR = 3

HEADER_SIZE = 64
SECTION_ENTRY_SIZE = 32
DEFAULT_ALIGNMENT = 64
KNOWN_FLAGS = 0  # v1.0 defines no flag bits: any set bit is rejected.

# Limits a reader enforces before it allocates anything.
MAX_SECTIONS = 65_536
MAX_METADATA_BYTES = 16 * 1024 * 1024
MAX_RANK = 8
MAX_ELEMENTS = 1 << 28  # per tensor: 1 GiB once decoded to float32
MAX_ALIGNMENT = 4096
MAX_CODEBOOK = 256
MIN_BITS = 1
MAX_BITS = 8


class SectionKind(IntEnum):
    """What a section holds."""

    METADATA = 1  # canonical JSON, exactly one, always section 0
    TENSOR = 2  # the parts of one tensor, named by the metadata's tensor table
    METADATA_ZLIB = 3  # the canonical JSON as one zlib stream (RFC 1950), since 1.1


METADATA_KINDS = (SectionKind.METADATA, SectionKind.METADATA_ZLIB)
# The first minor version that defines each section kind; a writer puts the highest minor its
# sections need in the header, and a reader rejects a kind newer than the file's minor.
KIND_SINCE_MINOR = {SectionKind.METADATA: 0, SectionKind.TENSOR: 0, SectionKind.METADATA_ZLIB: 1}
METADATA_ZLIB_LEVEL = 9


class Encoding(IntEnum):
    """How a tensor's values are stored. The registry in ``encodings`` has one codec per id."""

    F32 = 1
    F16 = 2
    CODEBOOK = 3
    UNIFORM = 4
    SCALED_CODEBOOK = 5  # since 1.2: scale[c] * codebook[index], both float16
    INT_CODEBOOK = 6  # since 1.3: float16 scale[c] * int8 codebook[index]


# The first minor version that defines each encoding (as KIND_SINCE_MINOR for section kinds).
ENCODING_SINCE_MINOR = {encoding: 0 for encoding in Encoding} | {
    Encoding.SCALED_CODEBOOK: 2,
    Encoding.INT_CODEBOOK: 3,
}


class Sparsity(IntEnum):
    """How the positions of the stored (non-zero) values of a pruned tensor are recorded."""

    NONE = 0
    BITMAP = 1
    CSR = 2


class Entropy(IntEnum):
    """How an integer index stream (codebook indices, uniform codes) is stored."""

    FIXED = 0  # bit-packed at ``bits`` bits per value
    HUFFMAN = 1  # canonical Huffman code, code lengths stored


ENCODING_NAMES = {e: e.name.lower() for e in Encoding}
SPARSITY_NAMES = {s: s.name.lower() for s in Sparsity}
ENTROPY_NAMES = {e: e.name.lower() for e in Entropy}


class Op(StrEnum):
    """A graph operator the runtime executes (SPEC.md, "The graph"); the value is the ``op``
    string of a node in the file. Every per-op table of every layer is keyed by it."""

    CONV2D = "conv2d"
    LINEAR = "linear"
    BATCHNORM = "batchnorm"
    RELU = "relu"
    RELU6 = "relu6"
    ADD = "add"
    AVGPOOL2D = "avgpool2d"
    MAXPOOL2D = "maxpool2d"
    GLOBAL_AVGPOOL = "global_avgpool"
    FLATTEN = "flatten"
    QUANTIZE = "quantize"


# Each op's parameter tensors (by role) and required attributes.
GRAPH_OPS: dict[Op, dict[str, tuple[str, ...]]] = {
    Op.CONV2D: {"params": ("weight", "bias"), "attrs": ("stride", "padding", "dilation", "groups")},
    Op.LINEAR: {"params": ("weight", "bias"), "attrs": ()},
    Op.BATCHNORM: {"params": ("scale", "shift"), "attrs": ()},
    Op.RELU: {"params": (), "attrs": ()},
    Op.RELU6: {"params": (), "attrs": ()},
    Op.ADD: {"params": (), "attrs": ()},
    Op.AVGPOOL2D: {"params": (), "attrs": ("kernel", "stride", "padding")},
    Op.MAXPOOL2D: {"params": (), "attrs": ("kernel", "stride", "padding")},
    Op.GLOBAL_AVGPOOL: {"params": (), "attrs": ()},
    Op.FLATTEN: {"params": (), "attrs": ()},
    Op.QUANTIZE: {"params": (), "attrs": ("bits", "scale", "zero_point")},
}

# Binary layout (struct formats, little-endian). The table CRC covers the header's first
# TABLE_CRC_HEADER_BYTES bytes (everything before the CRC field) followed by the whole table.
HEADER_FORMAT = "<8sHHIQII32s"  # magic, major, minor, flags, file_size, count, table_crc, reserved
SECTION_ENTRY_FORMAT = "<IIQQII"  # kind, alignment, offset, length, crc32, reserved
TABLE_CRC_HEADER_BYTES = 28
RESERVED_HEADER_OFFSET = 32

# More limits (SPEC.md section 4).
MAX_JSON_DEPTH = 64
MAX_NAME_BYTES = 1024
MAX_HUFFMAN_CODE_LENGTH = 16
MIN_CSR_BITS = 1
MAX_CSR_BITS = 8
MAX_DECLARED_INT = (1 << 63) - 1  # any integer in a tensor descriptor

# What a file may cost (SPEC.md section 9). The defaults of ``Limits``; a caller may raise them.
DEFAULT_MAX_TOTAL_ELEMENTS = 1 << 26  # decoded elements of all tensors (256 MiB as float32)
DEFAULT_MAX_INPUT_ELEMENTS = 1 << 22  # graph input elements per image
DEFAULT_MAX_ACTIVATION_BYTES = 1 << 28  # peak float32 bytes of live values per image
DEFAULT_MAX_MACS = 1 << 32  # multiply-accumulates (and window reads) per image
# The densest encoding: a CSR stream of 8-bit filler entries covers 255 pruned elements per
# byte, 4 * 255 bytes of float32 once decoded. No valid file decodes to more per file byte.
MAX_DECODE_RATIO = 4 * ((1 << MAX_CSR_BITS) - 1)

# Tensor descriptor keys (SPEC.md section 3): always present, and per encoding / sparsity.
DESCRIPTOR_KEYS = ("encoding", "nnz", "parts", "section", "shape", "sparsity")
ENCODING_KEYS: dict[Encoding, tuple[str, ...]] = {
    Encoding.F32: (),
    Encoding.F16: (),
    Encoding.CODEBOOK: ("bits", "entropy", "k"),
    Encoding.UNIFORM: ("axis", "bits", "entropy"),
    Encoding.SCALED_CODEBOOK: ("axis", "bits", "entropy", "k"),
    Encoding.INT_CODEBOOK: ("axis", "bits", "entropy", "k"),
}
CSR_KEYS = ("csr_bits", "csr_entries")
# Lean side information (SPEC.md 3.1, since 1.3): optional keys, written only when the compact
# form is used, each allowed for the encodings listed.
LEAN_SINCE_MINOR = 3
SCALE_DTYPE_KEY = "scale_dtype"  # "f16": uniform scales stored as binary16
COMMON_ZERO_POINT_KEY = "common_zero_point"  # every channel's zero point; no zero_point part
CODE_LENGTH_BITS_KEY = "code_length_bits"  # Huffman code lengths packed at this many bits
MAX_CODE_LENGTH_BITS = 5  # enough for MAX_HUFFMAN_CODE_LENGTH
LEAN_KEYS: dict[Encoding, tuple[str, ...]] = {
    e: (CODE_LENGTH_BITS_KEY,) if "entropy" in ENCODING_KEYS[e] else () for e in Encoding
} | {Encoding.UNIFORM: (CODE_LENGTH_BITS_KEY, COMMON_ZERO_POINT_KEY, SCALE_DTYPE_KEY)}

# Part names, in the order they appear in a tensor section (SPEC.md section 3).
PART_VALUES = "values"
PART_CODEBOOK = "codebook"
PART_SCALE = "scale"
PART_ZERO_POINT = "zero_point"
PART_CODE_LENGTHS = "code_lengths"
PART_INDICES = "indices"
PART_QDATA = "qdata"
PART_MASK = "mask"
PART_GAPS = "gaps"
