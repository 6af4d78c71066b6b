"""Weight encodings on the torch side: which encoding a layer gets, and where each one lives.

Naming rule. An *encoding* (``mbz.format.Encoding``: f32, f16, codebook, uniform) is how a
tensor is stored, and code names things after it (``CodebookTensor``, ``codebook_quantize``,
``CodebookWeight``). A *method* is the user's word for a quantizer: ``--method kmeans|uniform``,
the ``method`` of ``PackConfig`` and of the file's ``layers`` facts (plus ``float`` there for
16/32 bits). Method names appear only in those places and in ``METHODS`` below, the one map
between the two vocabularies; ``kmeans`` stays the method's name because commands and files
already say it (k-means is the algorithm that fits a codebook: ``mbz.quantize.kmeans_1d``).

Every layer keeps one table keyed by the encoding id, and ``tests/test_registries.py`` checks
that each table covers every ``Encoding``. Adding an encoding means one entry in each:

1. ``format/constants.py``: its ``Encoding`` id and ``ENCODING_KEYS``; ``format/tensors.py``: its
   tensor class (fields such as ``qdata``, ``scale``, ``zero_point``, ``codebook``);
2. ``format/encodings.py`` ``CODECS``: the writer's encoder and the numpy decoder (and
   ``encoding_of``); SPEC.md section 3 and a golden file;
3. ``mbz/quantize.py`` ``ENCODERS``: the torch side's encoder, float weight -> tensor object;
4. ``mbz/qat.py`` ``TRAINABLE``: the module fine-tuning trains in its place;
5. the ONNX exporter's table of in-graph decoders;
6. ``METHODS`` below, and ``weight_encoding`` when a flag selects it.
"""

from __future__ import annotations

from mbz.format import Encoding

FLOAT_METHOD = "float"  # the ``layers`` facts' method of a weight kept in floats
# Bits that keep a weight in floats (``--bits conv=16``), and the encoding each one is.
FLOAT_ENCODINGS: dict[int, Encoding] = {32: Encoding.F32, 16: Encoding.F16}
# The method name (``--method``, ``PackConfig.method``, ``layers``) of each encoding.
METHODS: dict[Encoding, str] = {
    Encoding.F32: FLOAT_METHOD,
    Encoding.F16: FLOAT_METHOD,
    Encoding.CODEBOOK: "kmeans",
    Encoding.UNIFORM: "uniform",
    Encoding.SCALED_CODEBOOK: "kmeans",
    Encoding.INT_CODEBOOK: "kmeans",
}


def weight_encoding(bits: int, method: str) -> Encoding:
    """The encoding of a weight given ``bits`` (16/32 keep floats) by the quantizer ``method``;
    ValueError for a method that names no quantizing encoding."""
    if bits in FLOAT_ENCODINGS:
        return FLOAT_ENCODINGS[bits]
    for encoding, name in METHODS.items():
        if name == method and name != FLOAT_METHOD:
            return encoding
    raise ValueError(f"unknown quantization method {method!r}")
