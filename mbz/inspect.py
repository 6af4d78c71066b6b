"""What a .mbz file spends its bytes on: per-tensor parts, grouped, and file-level totals.

Everything read from the file's metadata is validated before use (the graph as the runtime
validates it, the informative keys by type), so a hostile file raises MbzFormatError only.
"""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Any

import numpy as np

from mbz.format import DEFAULT_LIMITS, Limits, MbzFile, MbzFormatError, SectionInfo, read_mbz
from mbz.format.checks import is_int, json_float32, json_int, json_str
from mbz.format.constants import MAX_ELEMENTS
from mbz.onnx.export import export_onnx, onnx_bytes
from mbz.runtime.exact import POOLING_OPS, exact_layers, exact_nodes, integer_weight
from mbz.runtime.graph import analyze
from mbz.runtime.program import check_runnable, shape_standins

# Part name -> the category ``mbz inspect`` reports it under.
PART_CATEGORY = {
    "values": "payload",
    "indices": "payload",
    "qdata": "payload",
    "codebook": "codebook",
    "code_lengths": "codebook",
    "scale": "scales",
    "zero_point": "scales",
    "mask": "mask",
    "gaps": "mask",
}
CATEGORIES = ("payload", "codebook", "scales", "mask")
_STREAM_KEYS = ("index_bytes", "entropy_bytes")
# The parts of an index stream: the codes themselves and, when Huffman-coded, their code lengths.
INDEX_PARTS = ("indices", "qdata", "code_lengths")


def entropy_bytes(symbols: np.ndarray) -> int:
    """The order-0 entropy bound of a symbol stream in whole bytes: ``ceil(n * H / 8)`` with
    ``H = -sum p log2 p`` over the symbols' frequencies, the least any code that codes each
    symbol on its own (Huffman included) can spend, tables aside."""
    if not symbols.size:
        return 0
    counts = np.bincount(symbols.ravel()).astype(np.float64)
    counts = counts[counts > 0]
    bits = float(np.sum(counts * (np.log2(symbols.size) - np.log2(counts))))
    return math.ceil(bits / 8)


def _index_stream(tensor: Any) -> np.ndarray | None:
    """The kept symbols of a tensor's index stream (indices or integer codes), None without one."""
    symbols = getattr(tensor, "indices", getattr(tensor, "qdata", None))
    if symbols is None:
        return None
    return symbols.ravel() if tensor.mask is None else symbols[tensor.mask]


def _tensor_row(mbz: MbzFile, section: SectionInfo) -> dict:
    desc = mbz.descriptors[section.name]
    row = {
        "tensor": section.name,
        "shape": list(desc.shape),
        "encoding": desc.encoding.name.lower(),
        "bits": desc.bits,
        "entropy": None if desc.entropy is None else desc.entropy.name.lower(),
        "sparsity": desc.sparsity.name.lower(),
        "nnz": desc.nnz,
        "bytes": section.length,
    }
    row.update(dict.fromkeys(CATEGORIES, 0))
    for part, length in section.parts:
        row[PART_CATEGORY[part]] += length
    symbols = _index_stream(mbz.tensors[section.name])
    row["index_bytes"] = sum(length for part, length in section.parts if part in INDEX_PARTS)
    row["entropy_bytes"] = 0 if symbols is None else entropy_bytes(symbols)
    return row


def _layer_row(mbz: MbzFile, node: dict, tensor_rows: dict[str, dict]) -> dict:
    """One weight layer: its shapes before/after pruning, encoding, and bytes by category."""
    names = list(node["params"].values())
    weight = tensor_rows[node["params"].get("weight", names[0])]
    after = weight["shape"]
    before = _shape_before(mbz.metadata, node["name"]) or after
    codebook = getattr(mbz.tensors[weight["tensor"]], "codebook", None)
    sparsity = 1.0 - weight["nnz"] / max(1, int(np.prod(after)))
    mask_encoding = weight["sparsity"]
    recorded = _zero_symbol_sparsity(mbz.metadata, node["name"])
    if recorded is not None and mask_encoding == "none":
        sparsity, mask_encoding = recorded, "zero_symbol"
    row = {
        "layer": node["name"],
        "op": node["op"],
        "shape_before": before,
        "shape_after": after,
        "kept_channels": [after[0], before[0]],
        "bits": _quantized_bits(mbz.metadata, node["name"], weight["bits"]),
        "encoding": weight["encoding"],
        "entropy": weight["entropy"],
        "codebook_size": None if codebook is None else int(codebook.size),
        "sparsity": sparsity,
        "mask_encoding": mask_encoding,
        "tensors": names,
    }
    for key in (*CATEGORIES, *_STREAM_KEYS, "bytes"):
        row[key] = sum(tensor_rows[name][key] for name in names)
    return row


def describe(path: str | Path, limits: Limits = DEFAULT_LIMITS, onnx: bool = False) -> dict:
    """Read (and so fully validate, CRCs included, within ``limits``) a .mbz file and account
    for every byte; with ``onnx``, also export it to ONNX in memory and give that size
    (``onnx_bytes``, else None, as for a file without a graph)."""
    path = Path(path)
    mbz = read_mbz(path, limits)
    runnable = all(key in mbz.metadata for key in ("graph", "preprocess"))
    nodes = _graph_nodes(mbz, limits)
    onnx_size = onnx_bytes(export_onnx(mbz, limits=limits)) if onnx and runnable else None
    layout = mbz.layout
    rows = [_tensor_row(mbz, s) for s in layout.sections[1:]]
    by_name = {row["tensor"]: row for row in rows}
    layers = [_layer_row(mbz, node, by_name) for node in nodes if node["params"]]
    claimed = {name for layer in layers for name in layer["tensors"]}
    layers += [
        _layer_row(mbz, {"name": name, "op": "tensor", "params": {"weight": name}}, by_name)
        for name in by_name
        if name not in claimed
    ]
    exactness = _exactness(mbz, nodes)
    for layer in layers:
        facts = exactness.get(layer["layer"], {})
        layer.update({key: facts.get(key) for key in ("exact", "accumulator", "bound")})
    totals = {c: sum(r[c] for r in rows) for c in (*CATEGORIES, *_STREAM_KEYS)}
    totals.update(
        metadata=layout.sections[0].length,
        header_and_table=layout.header_bytes + layout.table_bytes,
        padding=layout.padding_bytes,
    )
    source = _object(mbz.metadata, "source")
    fp32 = _optional(source, "fp32_bytes", "source", _number)
    return {
        "file": str(path),
        "version": ".".join(map(str, mbz.version)),
        "total_bytes": mbz.file_size,
        "checksums": "ok",
        "onnx_bytes": onnx_size,
        "fp32_bytes": fp32,
        "ratio": fp32 / mbz.file_size if fp32 is not None else None,
        "source_sha256": _optional(source, "sha256", "source", json_str),
        "tool_version": _optional(_object(mbz.metadata, "mbz"), "tool_version", "mbz", json_str),
        "accuracy": _accuracy(mbz.metadata),
        "pack_config": mbz.metadata.get("pack_config"),
        "nodes": len(nodes),
        "exact": _exact_summary(exactness),
        "layers": layers,
        "tensors": rows,
        "totals": totals,
    }


def _exactness(mbz: MbzFile, nodes: list[dict]) -> dict[str, dict]:
    """Per conv2d/linear/pooling node (SPEC.md 7.3): whether every runtime computes it
    bit-identically; for an exact conv2d/linear, its accumulator (``f32``: one float32 sum,
    ``f32 chunks``: float32 sums of input-channel chunks added in float64) and the bound on
    its partial sums; for a node that is not exact, why."""
    if not nodes:
        return {}
    graph = mbz.metadata["graph"]
    plans, status = exact_layers(graph, mbz.tensors), exact_nodes(graph, mbz.tensors)
    coded = {node["output"] for node in nodes if node["op"] == "quantize"}
    facts = {}
    for node in nodes:
        if node["name"] not in status:
            continue
        plan = plans.get(node["name"])
        facts[node["name"]] = {
            "exact": status[node["name"]],
            "accumulator": None if plan is None else _ACCUMULATORS[plan.float32_exact],
            "bound": None if plan is None else plan.bound,
            "why": None if status[node["name"]] else _why_not_exact(mbz, node, coded),
        }
    return facts


_ACCUMULATORS = {True: "f32", False: "f32 chunks"}  # by ExactLayer.float32_exact


def _why_not_exact(mbz: MbzFile, node: dict, coded: set[str]) -> str:
    """Why a conv2d/linear/pooling node is not exact, in words that complete "N layers ..."."""
    if node["inputs"][0] not in coded or node["op"] in POOLING_OPS:
        return "read float values"
    weight = node["params"]["weight"]
    if integer_weight(mbz.tensors[weight]) is None:
        encoding = mbz.descriptors[weight].encoding.name.lower()
        return f"have {encoding} weights, which have no integer form"
    return "could reach 2^31 in their accumulator"


def _exact_summary(exactness: dict[str, dict]) -> dict:
    """How many conv2d/linear/pooling nodes there are, whether all are exact, and how many
    are not, by reason."""
    reasons: dict[str, int] = {}
    for facts in exactness.values():
        if not facts["exact"]:
            reasons[facts["why"]] = reasons.get(facts["why"], 0) + 1
    return {"all": bool(exactness) and not reasons, "layers": len(exactness), "not": reasons}


def _graph_nodes(mbz: MbzFile, limits: Limits) -> list[dict]:
    """The graph's nodes, validated as the runtime validates them, with the preprocessing when
    the file has one (no nodes without a graph)."""
    graph = mbz.metadata.get("graph")
    if graph is None:
        return []
    if "preprocess" in mbz.metadata:
        check_runnable(mbz, limits)
    else:
        analyze(graph, shape_standins(mbz), limits)
    return graph["nodes"]


def _object(container: dict, key: str) -> dict:
    """``container[key]`` when it is an object ({} when absent)."""
    value = container.get(key, {})
    if not isinstance(value, dict):
        raise MbzFormatError(f"metadata: {key} must be an object")
    return value


def _optional(container: dict, key: str, where: str, check: Any) -> Any:
    """``check(container[key])``, or None when the key is absent or null."""
    value = container.get(key)
    return None if value is None else check(value, f"metadata: {where}.{key}")


def _number(value: Any, where: str) -> int | float:
    """``value`` as it is, when it is a number float32 can hold."""
    json_float32(value, where)
    return value


def _accuracy(metadata: dict) -> dict | None:
    """The pack-time accuracy record, its fields checked (null when not measured)."""
    accuracy = metadata.get("accuracy")
    if accuracy is None:
        return None
    if not isinstance(accuracy, dict):
        raise MbzFormatError("metadata: accuracy must be an object or null")
    top1 = json_float32(accuracy.get("top1"), "metadata: accuracy.top1")
    if not 0 <= top1 <= 1:
        raise MbzFormatError("metadata: accuracy.top1 must be in 0..1")
    json_int(accuracy.get("images"), 0, MAX_ELEMENTS, "metadata: accuracy.images")
    json_str(accuracy.get("data"), "metadata: accuracy.data")
    return accuracy


def _zero_symbol_sparsity(metadata: dict, layer: str) -> float | None:
    """The share of its weights a layer prunes when it stores them as the symbol that decodes
    to 0.0 (no mask, so the file's counts cannot tell), as the informative ``layers`` keys
    ``zero_symbol`` and ``sparsity`` record it; None for other layers."""
    facts = _object(_object(metadata, "layers"), layer)
    where = f"metadata: layers[{layer[:100]!r}]"
    if not isinstance(facts.get("zero_symbol", False), bool):
        raise MbzFormatError(f"{where}.zero_symbol must be a boolean")
    if not facts.get("zero_symbol"):
        return None
    sparsity = float(json_float32(facts.get("sparsity"), f"{where}.sparsity"))
    if not 0 <= sparsity <= 1:
        raise MbzFormatError(f"{where}.sparsity must be in 0..1")
    return sparsity


def _quantized_bits(metadata: dict, layer: str, stored: int | None) -> int | None:
    """The bits a layer stored with index width ``stored`` was quantized to, as the
    informative ``layers`` key ``bits`` records it (a zero-symbol codebook's indices are one bit
    wider: 2**bits centroids and 0.0); None for float weights, ``stored`` without a record."""
    bits = _object(_object(metadata, "layers"), layer).get("bits")
    if stored is None or bits is None:
        return stored
    return json_int(bits, 1, 32, f"metadata: layers[{layer[:100]!r}].bits")


def _shape_before(metadata: dict, layer: str) -> list[int] | None:
    """The layer's shape before channel pruning, as the informative ``layers`` key records it."""
    shape = _object(_object(metadata, "layers"), layer).get("shape_before")
    if shape is None:
        return None
    where = f"metadata: layers[{layer[:100]!r}].shape_before"
    if not (isinstance(shape, list) and 1 <= len(shape) <= 8 and all(is_int(d) for d in shape)):
        raise MbzFormatError(f"{where} must be a list of 1 to 8 integers")
    return [json_int(d, 0, MAX_ELEMENTS, where) for d in shape]


def format_report(facts: dict, wide: bool = False) -> str:
    """The human-readable per-layer table ``mbz inspect`` prints: within 100 columns (shape
    after pruning, total bytes per layer), or with ``wide`` every column (shapes before and
    after, bytes per category) and whole layer names. Columns are as wide as their cells; in
    100 columns, long layer names are cut."""
    rows = [_row_cells(r) for r in facts["layers"]]
    header = {key: head for key, head in (_WIDE_COLUMNS if wide else _NARROW_COLUMNS)}
    widths = {key: max(len(cells[key]) for cells in [header, *rows]) for key in header}
    name_width = max(len(cells["layer"]) for cells in [{"layer": "layer"}, *rows])
    if not wide:
        name_width = max(_MIN_NAME, min(name_width, _NARROW - sum(w + 1 for w in widths.values())))
    lines = [_line(header | {"layer": "layer"}, widths, name_width)]
    lines += [_line(cells, widths, name_width) for cells in rows]
    t = facts["totals"]
    summary = [
        "bytes: "
        + ", ".join(f"{c} {t[c]}" for c in CATEGORIES)
        + f", metadata {t['metadata']}, header+table {t['header_and_table']}, "
        f"alignment padding {t['padding']}" + _streams(t),
        _summary(facts),
        *_exact_line(facts["exact"]),
    ]
    if not wide:
        summary = [textwrap.fill(text, _NARROW, subsequent_indent="  ") for text in summary]
    return "\n".join([*lines, "", *summary])


_NARROW = 100  # columns of the default report
_MIN_NAME = 12  # the least of a layer name the narrow report shows
# (cell, header) of each column after the layer name.
_KIND_COLUMNS = (
    ("kept", "kept"),
    ("encoding", "encoding"),
    ("bits", "bits"),
    ("k", "k"),
    ("sparse", "sparse"),
    ("mask_encoding", "mask"),
)
_NARROW_COLUMNS = (("shape", "shape"), *_KIND_COLUMNS, ("exact", "exact"), ("bytes", "bytes"))
_WIDE_COLUMNS = (
    ("shapes", "shape before -> after"),
    *_KIND_COLUMNS,
    ("index_bytes", "index B"),
    ("entropy_bytes", "H0 B"),
    *((c, c) for c in CATEGORIES),
    ("exact", "exact"),
    ("bound", "bound"),
    ("bytes", "total"),
)


def _row_cells(r: dict) -> dict[str, str]:
    """Every cell of a layer's row, by column key."""
    cells = {
        "layer": r["layer"],
        "shape": _dims(r["shape_after"]),
        "shapes": f"{_dims(r['shape_before'])} -> {_dims(r['shape_after'])}",
        "kept": "{}/{}".format(*r["kept_channels"]),
        "encoding": r["encoding"] + ("+h" if r["entropy"] == "huffman" else ""),
        "bits": str(r["bits"] or ""),
        "k": str(r["codebook_size"] or ""),
        "sparse": f"{100 * r['sparsity']:5.1f}%",
        "mask_encoding": r["mask_encoding"].replace("_", " "),
        "bytes": str(r["bytes"]),
    }
    cells["exact"] = "" if r["exact"] is None else r["accumulator"] or "no"
    cells["bound"] = "" if r["bound"] is None else str(r["bound"])
    return cells | {c: str(r[c]) for c in (*CATEGORIES, *_STREAM_KEYS)}


def _line(cells: dict[str, str], widths: dict[str, int], name_width: int) -> str:
    """One row: the layer name left-aligned (cut to ``name_width``), the columns right-aligned."""
    name = cells["layer"][:name_width]
    return f"{name:{name_width}}" + "".join(f" {cells[key]:>{w}}" for key, w in widths.items())


def _dims(shape: list[int]) -> str:
    return "x".join(map(str, shape))


def _streams(totals: dict) -> str:
    """The index streams' stored bytes against their order-0 entropy ("" without streams)."""
    stored, bound = totals["index_bytes"], totals["entropy_bytes"]
    if not stored:
        return ""
    excess = f" ({100 * (stored / bound - 1):+.1f}%)" if bound else ""
    return f"; index streams {stored} bytes, order-0 entropy {bound} bytes{excess}"


def _exact_line(exact: dict) -> list[str]:
    """The report's line on exactness (SPEC.md 7.3); none for a file without a graph."""
    if not exact["layers"]:
        return []
    if exact["all"]:
        return ["all layers exact: numpy, torch and onnx logits are bit-identical (SPEC.md 7.3)"]
    count = sum(exact["not"].values())
    why = ", ".join(f"{n} {reason}" for reason, n in exact["not"].items())
    return [
        f"{count} of {exact['layers']} conv/linear/pooling layers not exact ({why}): the "
        "runtimes' logits can differ by float rounding (SPEC.md 7.3; pack with --act-bits and "
        "uniform or int-codebook weights for bit-identical logits)"
    ]


def _summary(facts: dict) -> str:
    text = f"file {facts['total_bytes']} bytes (.mbz v{facts['version']}, checksums ok)"
    if facts["onnx_bytes"]:
        text += f"; as ONNX (mbz export-onnx) {facts['onnx_bytes']} bytes"
    if facts["ratio"]:
        text += f"; FP32 model {facts['fp32_bytes']} bytes, ratio {facts['ratio']:.2f}x"
    accuracy = facts["accuracy"]
    if accuracy:
        text += (
            f"; top-1 {100 * accuracy['top1']:.2f}% at pack time "
            f"({accuracy['images']} images of {accuracy['data']})"
        )
    return text
