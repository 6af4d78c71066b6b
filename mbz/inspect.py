"""What a .mbz file spends its bytes on: per-tensor parts, grouped, and file-level totals."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from mbz.format import MbzFile, SectionInfo, read_mbz
from mbz.runtime.onnx_export import export_onnx, onnx_bytes

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
    return row


def _layer_row(mbz: MbzFile, node: dict, tensor_rows: dict[str, dict]) -> dict:
    """One weight layer: its shapes before/after pruning, encoding, and bytes by category."""
    facts = mbz.metadata.get("layers", {}).get(node["name"], {})
    names = list(node["params"].values())
    weight = tensor_rows[node["params"].get("weight", names[0])]
    before, after = facts.get("shape_before", weight["shape"]), weight["shape"]
    codebook = getattr(mbz.tensors[weight["tensor"]], "codebook", None)
    row = {
        "layer": node["name"],
        "op": node["op"],
        "shape_before": before,
        "shape_after": after,
        "kept_channels": [after[0], before[0]],
        "bits": weight["bits"],
        "encoding": weight["encoding"],
        "entropy": weight["entropy"],
        "codebook_size": None if codebook is None else int(codebook.size),
        "sparsity": 1.0 - weight["nnz"] / max(1, int(np.prod(after))),
        "mask_encoding": weight["sparsity"],
        "tensors": names,
    }
    for key in (*CATEGORIES, "bytes"):
        row[key] = sum(tensor_rows[name][key] for name in names)
    return row


def describe(path: str | Path) -> dict:
    """Read (and so fully validate, CRCs included) a .mbz file and account for every byte."""
    path = Path(path)
    mbz = read_mbz(path)
    layout = mbz.layout
    rows = [_tensor_row(mbz, s) for s in layout.sections[1:]]
    by_name = {row["tensor"]: row for row in rows}
    nodes = mbz.metadata.get("graph", {}).get("nodes", [])
    layers = [_layer_row(mbz, node, by_name) for node in nodes if node.get("params")]
    claimed = {name for layer in layers for name in layer["tensors"]}
    layers += [
        _layer_row(mbz, {"name": name, "op": "tensor", "params": {"weight": name}}, by_name)
        for name in by_name
        if name not in claimed
    ]
    totals = {c: sum(r[c] for r in rows) for c in CATEGORIES}
    totals.update(
        metadata=layout.sections[0].length,
        header_and_table=layout.header_bytes + layout.table_bytes,
        padding=layout.padding_bytes,
    )
    runnable = all(key in mbz.metadata for key in ("graph", "preprocess"))
    source = mbz.metadata.get("source", {})
    fp32 = source.get("fp32_bytes")
    return {
        "file": str(path),
        "version": ".".join(map(str, mbz.version)),
        "total_bytes": mbz.file_size,
        "checksums": "ok",
        "onnx_bytes": onnx_bytes(export_onnx(mbz)) if runnable else None,
        "fp32_bytes": fp32,
        "ratio": fp32 / mbz.file_size if isinstance(fp32, int | float) else None,
        "source_sha256": source.get("sha256"),
        "tool_version": mbz.metadata.get("mbz", {}).get("tool_version"),
        "accuracy": mbz.metadata.get("accuracy"),
        "pack_config": mbz.metadata.get("pack_config"),
        "nodes": len(mbz.metadata.get("graph", {}).get("nodes", [])),
        "layers": layers,
        "tensors": rows,
        "totals": totals,
    }


def format_report(facts: dict) -> str:
    """The human-readable per-layer table ``mbz inspect`` prints."""
    head = (
        f"{'layer':28} {'shape before -> after':>30} {'kept':>9} {'encoding':>10} {'bits':>4} "
        f"{'k':>3} {'sparse':>6} {'mask':>6}"
    )
    lines = [head + "".join(f" {c:>8}" for c in CATEGORIES) + f" {'total':>8}"]
    for r in facts["layers"]:
        shapes = f"{_dims(r['shape_before'])} -> {_dims(r['shape_after'])}"
        kept = "{}/{}".format(*r["kept_channels"])
        enc = r["encoding"] + ("+h" if r["entropy"] == "huffman" else "")
        line = (
            f"{r['layer'][:28]:28} {shapes:>30} {kept:>9} {enc:>10} {r['bits'] or '':>4} "
            f"{r['codebook_size'] or '':>3} {100 * r['sparsity']:5.1f}% {r['mask_encoding']:>6}"
        )
        lines.append(line + "".join(f" {r[c]:>8}" for c in CATEGORIES) + f" {r['bytes']:>8}")
    t = facts["totals"]
    lines.append("")
    lines.append(
        "bytes: " + ", ".join(f"{c} {t[c]}" for c in CATEGORIES)
        + f", metadata {t['metadata']}, header+table {t['header_and_table']}, "
        f"alignment padding {t['padding']}"
    )
    lines.append(_summary(facts))
    return "\n".join(lines)


def _dims(shape: list[int]) -> str:
    return "x".join(map(str, shape))


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
