"""One place per concept, kept so: one table per layer keyed by the weight encoding, each
covering every encoding and each entry producing, decoding and training exactly its own encoding
(see ``mbz.encodings``); command-line work only in ``mbz/cli.py`` and ``mbz/commands/``."""

from __future__ import annotations

import ast
import itertools
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from mbz.config import CODEBOOK_KINDS, FLOAT_BITS, METHODS, PackConfig
from mbz.encodings import METHODS as ENCODING_METHODS
from mbz.encodings import weight_encoding
from mbz.format import Encoding, decode_mbz, encode_mbz
from mbz.format.constants import GRAPH_OPS, Op
from mbz.format.encodings import CODECS, encoding_of
from mbz.onnx.export import DECODERS, EMITTERS
from mbz.qat import TRAINABLE, weight_module
from mbz.quantize import ENCODERS, Coding, quantize_weight
from mbz.runtime.graph import SHAPE_RULES
from mbz.runtime.program import KERNEL_BUILDERS
from mbz.torch_graph import OPS

# Every table keyed by Encoding, by the layer it serves.
REGISTRIES = {
    "numpy codec (format/encodings.py CODECS)": CODECS,
    "torch encoder (mbz/quantize.py ENCODERS)": ENCODERS,
    "trainable module (mbz/qat.py TRAINABLE)": TRAINABLE,
    "method name (mbz/encodings.py METHODS)": ENCODING_METHODS,
    "ONNX in-graph decoder (mbz/onnx/export.py DECODERS)": DECODERS,
}


@pytest.mark.parametrize("layer", REGISTRIES)
def test_every_encoding_is_in_every_registry(layer):
    table = REGISTRIES[layer]
    missing = sorted(encoding.name for encoding in Encoding if encoding not in table)
    assert not missing, f"{layer} has no entry for {', '.join(missing)}"
    assert set(table) == set(Encoding), f"{layer} has keys that are not encodings"


# Every table keyed by Op, by the layer it serves.
OP_TABLES = {
    "params and attrs (format/constants.py GRAPH_OPS)": GRAPH_OPS,
    "shape rule (runtime/graph.py SHAPE_RULES)": SHAPE_RULES,
    "numpy kernel (runtime/program.py KERNEL_BUILDERS)": KERNEL_BUILDERS,
    "ONNX emitter (mbz/onnx/export.py EMITTERS)": EMITTERS,
    "torch function (mbz/torch_graph.py OPS)": OPS,
}


@pytest.mark.parametrize("layer", OP_TABLES)
def test_every_op_is_in_every_table(layer):
    table = OP_TABLES[layer]
    missing = sorted(op.value for op in Op if op not in table)
    assert not missing, f"{layer} has no entry for {', '.join(missing)}"
    strangers = sorted(repr(key) for key in table if type(key) is not Op)
    assert not strangers, f"{layer} has keys that are not Op members: {', '.join(strangers)}"


def pack_choices() -> dict[Encoding, Coding]:
    """One coding per encoding that a pack configuration can ask for (bits x method x
    codebook kind)."""
    choices = {}
    for method, bits, codebook in itertools.product(METHODS, (*FLOAT_BITS, 3), CODEBOOK_KINDS):
        coding = Coding.of(PackConfig(method=method, codebook=codebook), bits)
        choices.setdefault(coding.encoding, coding)
    return choices


def test_every_encoding_is_reachable_from_the_flags_and_names_its_method():
    choices = pack_choices()
    assert set(choices) == set(Encoding)
    for encoding, coding in choices.items():
        method = ENCODING_METHODS[encoding]
        assert (method == "float") if coding.bits in FLOAT_BITS else (method in METHODS)
    with pytest.raises(ValueError, match="unknown quantization method"):
        weight_encoding(4, "float")


@pytest.fixture
def weight() -> np.ndarray:
    """A conv weight whose channels have uneven scales."""
    scales = np.geomspace(0.1, 2, 6)[:, None, None, None]
    return (np.random.default_rng(3).standard_normal((6, 4, 3, 3)) * scales).astype(np.float32)


@pytest.mark.parametrize("encoding", list(Encoding), ids=lambda e: e.name)
@pytest.mark.parametrize("pruned", [False, True])
def test_each_layer_handles_its_encoding(encoding, pruned, weight):
    coding = pack_choices()[encoding]
    mask = np.abs(weight) > 0.3 if pruned else None
    tensor = quantize_weight(weight, coding, mask)
    assert encoding_of(tensor) == encoding  # the torch encoder makes its own encoding
    decoded = tensor.decode()
    if mask is not None:
        assert np.all(decoded[~mask] == 0.0)
    # numpy decoder: the file gives back exactly what the encoder meant
    read = decode_mbz(encode_mbz({}, {"w": tensor})).tensors["w"]
    assert encoding_of(read) == encoding
    np.testing.assert_array_equal(read.decode(), decoded)
    # trainable module: starts from exactly the stored weight and exports it unchanged
    module = weight_module(weight, tensor)
    with torch.no_grad():
        np.testing.assert_array_equal(module().numpy(), decoded)
    exported = module.export(tensor)
    assert encoding_of(exported) == encoding
    assert encode_mbz({}, {"w": exported}) == encode_mbz({}, {"w": tensor})


def imported_modules(path: Path) -> set[str]:
    """Every module a source file imports (``from a import b`` counts as a and a.b)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module:
            found |= {node.module, *(f"{node.module}.{alias.name}" for alias in node.names)}
    return found


def test_the_library_does_no_command_line_work():
    command_line = ("click", "mbz.cli", "mbz.commands")
    library = [p for p in (Path(__file__).parents[1] / "mbz").glob("*.py") if p.name != "cli.py"]
    offenders = {
        f"{path.name} imports {name}"
        for path in library
        for name in imported_modules(path)
        if any(name == top or name.startswith(top + ".") for top in command_line)
    }
    assert not offenders


def top_level_imports(path: Path) -> set[str]:
    """The top-level packages a source file imports (relative imports excluded)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("folder", ["format", "runtime"])
def test_format_and_runtime_import_only_numpy_bitarray_and_the_stdlib(folder):
    """Nor onnx, onnxruntime, torch or click; nor the rest of mbz, which may import them."""
    allowed = {"numpy", "bitarray", "mbz", *sys.stdlib_module_names}
    offenders = set()
    for path in (Path(__file__).parents[1] / folder).rglob("*.py"):
        offenders |= {f"{path.name} imports {name}" for name in top_level_imports(path) - allowed}
        offenders |= {
            f"{path.name} imports {name}"
            for name in imported_modules(path)
            if name.startswith("mbz.") and name.split(".")[1] not in ("format", "runtime")
        }
    assert not offenders
