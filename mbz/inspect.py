"""What a .mbz file spends its bytes on: per-tensor parts, grouped, and file-level totals."""

from __future__ import annotations

from pathlib import Path

from mbz.format import MbzFile, SectionInfo, read_mbz

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


def describe(path: str | Path) -> dict:
    """Read (and so fully validate, CRCs included) a .mbz file and account for every byte."""
    path = Path(path)
    mbz = read_mbz(path)
    layout = mbz.layout
    rows = [_tensor_row(mbz, s) for s in layout.sections[1:]]
    totals = {c: sum(r[c] for r in rows) for c in CATEGORIES}
    totals.update(
        metadata=layout.sections[0].length,
        header_and_table=layout.header_bytes + layout.table_bytes,
        padding=layout.padding_bytes,
    )
    source = mbz.metadata.get("source", {})
    fp32 = source.get("fp32_bytes")
    return {
        "file": str(path),
        "version": ".".join(map(str, mbz.version)),
        "total_bytes": mbz.file_size,
        "checksums": "ok",
        "fp32_bytes": fp32,
        "ratio": fp32 / mbz.file_size if isinstance(fp32, int | float) else None,
        "source_sha256": source.get("sha256"),
        "tool_version": mbz.metadata.get("mbz", {}).get("tool_version"),
        "accuracy": mbz.metadata.get("accuracy"),
        "pack_config": mbz.metadata.get("pack_config"),
        "nodes": len(mbz.metadata.get("graph", {}).get("nodes", [])),
        "layers": mbz.metadata.get("layers", {}),
        "tensors": rows,
        "totals": totals,
    }


def format_report(facts: dict) -> str:
    """The human-readable table ``mbz inspect`` prints."""
    head = f"{'tensor':40} {'shape':>16} {'encoding':>9} {'bits':>4} {'sparsity':>8}"
    head += "".join(f" {c:>9}" for c in CATEGORIES) + f" {'total':>9}"
    lines = [head]
    for r in facts["tensors"]:
        shape = "x".join(map(str, r["shape"]))
        enc = r["encoding"] + ("+h" if r["entropy"] == "huffman" else "")
        line = f"{r['tensor'][:40]:40} {shape:>16} {enc:>9} {r['bits'] or '':>4} {r['sparsity']:>8}"
        lines.append(line + "".join(f" {r[c]:>9}" for c in CATEGORIES) + f" {r['bytes']:>9}")
    t = facts["totals"]
    lines.append("")
    lines.append(
        "bytes: " + ", ".join(f"{c} {t[c]}" for c in CATEGORIES)
        + f", metadata {t['metadata']}, header+table {t['header_and_table']}, "
        f"alignment padding {t['padding']}"
    )
    lines.append(_summary(facts))
    return "\n".join(lines)


def _summary(facts: dict) -> str:
    text = f"file {facts['total_bytes']} bytes (.mbz v{facts['version']}, checksums ok)"
    if facts["ratio"]:
        text += f"; FP32 model {facts['fp32_bytes']} bytes, ratio {facts['ratio']:.2f}x"
    accuracy = facts["accuracy"]
    if accuracy:
        text += (
            f"; top-1 {100 * accuracy['top1']:.2f}% at pack time "
            f"({accuracy['images']} images of {accuracy['data']})"
        )
    return text
