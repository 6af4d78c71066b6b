"""Structure-aware fuzzing of everything that reads a .mbz file (SPEC.md section 9).

Run: python examples/fuzz.py [--cases 100000] [--seed 0] [--out runs/fuzz]
(one core; a few ms per case). Every case is one mutation of a small valid file (a hand-built
CNN with conv, depthwise, pointwise, batchnorm, residual add, both poolings, linear and, in some
files, quantized activations; its weights in one of the encodings: f32, f16, codebook, scaled
codebook, int codebook, uniform per tensor or per channel, fixed-width or Huffman, dense, bitmap
or CSR). The mutated file is re-assembled with correct CRCs, so that it reaches past the container
checks, then read
(``decode_mbz``), loaded (``load_program``), run on one image (``Program.predict``), exported
(``export_onnx``) and inspected (``describe``). The only acceptable outcomes are acceptance and
``MbzFormatError``; anything else is saved to ``OUT/crashes/`` with its traceback, and a JSON
summary (counts per mutation class, time and traced memory per case) goes to ``OUT/summary.json``.

The mutation classes (``MUTATIONS``): JSON values replaced by other types, hostile numbers
(huge, tiny, negative, 10**400), shapes, op attributes, graph wiring, tensor bytes, decompression
bombs (valid CSR tensors of up to 2**28 elements), and whole sections dropped or duplicated.
Cases run under ``FUZZ_LIMITS``, lower than the defaults so that every accepted case runs fast.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import resource
import sys
import tempfile
import time
import traceback
import tracemalloc
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from mbz.format import (
    CodebookTensor,
    DenseTensor,
    Entropy,
    IntCodebookTensor,
    Limits,
    MbzFormatError,
    ScaledCodebookTensor,
    SectionKind,
    UniformTensor,
    decode_mbz,
    encode_mbz,
)
from mbz.format.constants import GRAPH_OPS, VERSION_MINOR
from mbz.format.container import assemble
from mbz.format.jsonio import canonical_json
from mbz.inspect import describe
from mbz.runtime import load_program

FUZZ_LIMITS = Limits(
    total_elements=1 << 22, input_elements=1 << 18, activation_bytes=1 << 25, macs=1 << 26
)
HOSTILE_NUMBERS = (
    0, -1, 1, 2, 3, 7, 255, 256, 1001, 4001, 2**31, 2**63, 2**64, -(2**63), 10**400, -(10**400),
    0.5, -0.0, 1e-45, 1e-40, 1.1754944e-38, 3.4028235e38, 3.5e38, 1e308, -1e308, 1e-320,
)
HOSTILE_VALUES = (None, True, False, "", "x", "conv2d", "\ud800", [], [1], [1, 2], {}, {"a": 1})
SHAPE_DIMS = (0, 1, 2, 3, 4, 8, 255, 4096, 65536, 1 << 28, -1)


@dataclass
class Seed:
    """A valid file's pieces: its metadata (tensor table included), section bodies, kind."""

    name: str
    metadata: str  # the JSON text, parsed afresh for each case
    bodies: list[bytes]
    compressed: bool


@dataclass
class Case:
    """A mutated file: its bytes and the mutation class that made it."""

    mutation: str
    seed: str
    data: bytes


# ------------------------------------------------------------------------------------ corpus


def _weight(rng: np.random.Generator, shape: tuple, spec: dict):
    """A tensor of ``shape`` in the encoding ``spec`` (kind, bits, entropy, density, axis)."""
    mask = None if spec["density"] is None else rng.random(shape) < spec["density"]
    values = rng.standard_normal(shape).astype(np.float32) * 0.3
    if spec["kind"] in ("f32", "f16"):
        dtype = np.float32 if spec["kind"] == "f32" else np.float16
        return DenseTensor(values.astype(dtype), mask=mask)
    bits, entropy = spec["bits"], spec["entropy"]
    levels = 2**bits
    if spec["kind"] in ("codebook", "scaled", "int"):
        k = min(levels, 2 + int(rng.integers(0, levels - 1)))
        codebook = np.sort(rng.standard_normal(k)).astype(np.float32) * 0.3
        indices = (rng.integers(0, k, shape) * (rng.random(shape) < 0.7)).astype(np.uint8)
        if spec["kind"] == "codebook":
            return CodebookTensor(codebook, indices, bits, mask=mask, entropy=entropy)
        scale = rng.uniform(0.5, 2.0, shape[0]).astype(np.float16)
        if spec["kind"] == "int":
            integers = np.unique(np.round(codebook * 127 / np.abs(codebook).max()))
            return IntCodebookTensor(
                integers.astype(np.int8), scale / 127, indices % integers.size, bits,
                mask=mask, entropy=entropy,
            )
        return ScaledCodebookTensor(
            codebook.astype(np.float16), scale, indices, bits, mask=mask, entropy=entropy
        )
    axis = 0 if spec["per_channel"] else None
    channels = shape[0] if axis == 0 else 1
    return UniformTensor(
        qdata=rng.integers(0, levels, shape).astype(np.uint8),
        scale=rng.uniform(1e-3, 0.1, channels).astype(np.float32),
        zero_point=np.full(channels, levels // 2, np.uint8),
        bits=bits,
        axis=axis,
        mask=mask,
        entropy=entropy,
    )


def _node(name: str, op: str, inputs: list[str], params: dict | None = None, **attrs) -> dict:
    return {
        "name": name,
        "op": op,
        "inputs": inputs,
        "output": name,
        "params": params or {},
        "attrs": attrs,
    }


def _conv(name: str, source: str, stride: int = 1, padding: int = 1, groups: int = 1) -> dict:
    params = {"weight": f"{name}.weight", "bias": f"{name}.bias"}
    return _node(
        name, "conv2d", [source], params, stride=[stride] * 2, padding=[padding] * 2,
        dilation=[1, 1], groups=groups,
    )


def _quantize(name: str, source: str, bits: int, scale: float, zero_point: int) -> dict:
    return _node(name, "quantize", [source], bits=bits, scale=scale, zero_point=zero_point)


def seed_graph(act_bits: int | None) -> tuple[dict, dict[str, tuple]]:
    """A small CNN on [3, 8, 8] images with every op, and the shapes of its parameters."""
    nodes = [_conv("c1", "input"), _node("r1", "relu6", ["c1"])]
    last = "r1"
    if act_bits:
        nodes.append(_quantize("q1", "r1", act_bits, 6 / (2**act_bits - 1), 0))
        last = "q1"
    nodes += [
        _conv("dw", last, stride=2, groups=8),
        _node("r2", "relu", ["dw"]),
        _conv("pw", "r2", padding=0),
        _node("bn", "batchnorm", ["pw"], {"scale": "bn.scale", "shift": "bn.shift"}),
        _conv("pw2", "bn", padding=0),
        _node("add", "add", ["bn", "pw2"]),
    ]
    last = "add"
    if act_bits:
        nodes.append(_quantize("q2", "add", act_bits, 0.05, 2 ** (act_bits - 1)))
        last = "q2"
    nodes += [
        _node("mp", "maxpool2d", [last], kernel=[2, 2], stride=[2, 2], padding=[0, 0]),
        _node("ap", "avgpool2d", ["mp"], kernel=[3, 3], stride=[1, 1], padding=[1, 1]),
        _node("gp", "global_avgpool", ["ap"]),
        _node("fl", "flatten", ["gp"]),
        _node("fc", "linear", ["fl"], {"weight": "fc.weight", "bias": "fc.bias"}),
    ]
    graph = {"input": "input", "input_shape": [3, 8, 8], "output": "fc", "nodes": nodes}
    shapes = {
        "c1.weight": (8, 3, 3, 3), "c1.bias": (8,), "dw.weight": (8, 1, 3, 3), "dw.bias": (8,),
        "pw.weight": (16, 8, 1, 1), "pw.bias": (16,), "bn.scale": (16,), "bn.shift": (16,),
        "pw2.weight": (16, 16, 1, 1), "pw2.bias": (16,), "fc.weight": (10, 16), "fc.bias": (10,),
    }
    return graph, shapes


DENSE = {"kind": "f32", "density": None}
SEED_SPECS = {
    "f32_dense": {"kind": "f32", "density": None},
    "f16_bitmap": {"kind": "f16", "density": 0.5},
    "codebook_fixed": {"kind": "codebook", "bits": 4, "entropy": Entropy.FIXED, "density": None},
    "codebook_huffman_csr": {
        "kind": "codebook", "bits": 3, "entropy": Entropy.HUFFMAN, "density": 0.08
    },
    "scaled_codebook_bitmap": {
        "kind": "scaled", "bits": 4, "entropy": Entropy.FIXED, "density": 0.5
    },
    "uniform_tensor_bitmap": {
        "kind": "uniform", "bits": 8, "entropy": Entropy.FIXED, "density": 0.6,
        "per_channel": False,
    },
    "uniform_channel_huffman": {
        "kind": "uniform", "bits": 2, "entropy": Entropy.HUFFMAN, "density": None,
        "per_channel": True,
    },
    "int_codebook_masked": {"kind": "int", "bits": 4, "entropy": Entropy.FIXED, "density": 0.3},
}


def corpus(seed: int = 0) -> list[Seed]:
    """The seed files: every encoding, with float and with quantized (4- and 8-bit)
    activations, metadata compressed (kind 3) and plain (kind 1)."""
    rng = np.random.default_rng(seed)
    seeds = []
    for index, (name, spec) in enumerate(SEED_SPECS.items()):
        act_bits = (None, 8, 4)[index % 3]
        graph, shapes = seed_graph(act_bits)
        tensors = {
            tensor: _weight(rng, shape, spec if len(shape) > 1 else DENSE)
            for tensor, shape in shapes.items()
        }
        metadata = {
            "graph": graph,
            "preprocess": {
                "layout": "NHWC", "dtype": "uint8", "mean": [0.5, 0.5, 0.5], "std": [0.25] * 3
            },
            "layers": {n["name"]: {"shape_before": list(shapes[n["params"]["weight"]])}
                       for n in graph["nodes"] if "weight" in n["params"]},
            "accuracy": {"top1": 0.5, "images": 10, "data": "fuzz", "runtime": "numpy"},
            "source": {"sha256": "0" * 64, "fp32_bytes": 12345},
            "mbz": {"tool_version": "0.1.0"},
            "pack_config": {"method": spec["kind"], "act_bits": act_bits},
        }
        compressed = index % 2 == 0
        seeds.append(_split(f"{name}_a{act_bits or 32}", metadata, tensors, compressed))
    return seeds


def _split(name: str, metadata: dict, tensors: dict, compressed: bool) -> Seed:
    """The pieces of the file ``encode_mbz`` writes (which also validates the seed)."""
    data = encode_mbz(metadata, tensors, compress_metadata=compressed)
    layout = decode_mbz(data).layout
    spans = [data[s.offset : s.offset + s.length] for s in layout.sections]
    meta = zlib.decompress(spans[0]) if compressed else bytes(spans[0])
    return Seed(name, meta.decode("utf-8"), spans[1:], compressed)


def rebuild(metadata: dict | bytes, bodies: list[bytes], compressed: bool) -> bytes:
    """A file with correct CRCs, whatever the metadata and bodies hold (at the reader's minor
    version, so that every encoding it knows is allowed)."""
    raw = metadata if isinstance(metadata, bytes) else _json(metadata)
    kind = SectionKind.METADATA_ZLIB if compressed else SectionKind.METADATA
    if compressed:
        raw = zlib.compress(raw)
    kinds = [kind] + [SectionKind.TENSOR] * len(bodies)
    return assemble(kinds, [raw, *bodies], 64, VERSION_MINOR)


def _json(obj: object) -> bytes:
    try:
        return canonical_json(obj)
    except (ValueError, TypeError):  # a mutation put NaN or a surrogate there: write it anyway
        return json.dumps(obj, sort_keys=True, allow_nan=True).encode("utf-8", "surrogatepass")


# --------------------------------------------------------------------------------- mutations


def _paths(obj: object, prefix: tuple = ()) -> Iterator[tuple]:
    """Every path (tuple of keys and indices) to a value inside a JSON tree, the root excluded."""
    if isinstance(obj, dict):
        items = obj.items()
    else:
        items = enumerate(obj) if isinstance(obj, list) else ()
    for key, value in items:
        yield (*prefix, key)
        yield from _paths(value, (*prefix, key))


def _get(obj: object, path: tuple) -> object:
    for key in path:
        obj = obj[key]
    return obj


def _set(obj: object, path: tuple, value: object) -> None:
    _get(obj, path[:-1])[path[-1]] = value


def _number(rng: random.Random) -> int | float:
    if rng.random() < 0.7:
        return rng.choice(HOSTILE_NUMBERS)
    magnitude = rng.randint(0, 1 << 40) if rng.random() < 0.5 else 10.0 ** rng.randint(-50, 50)
    return rng.choice((1, -1)) * magnitude


def mutate_json_type(meta: dict, bodies: list[bytes], rng: random.Random) -> None:
    """A value anywhere in the metadata replaced by a value of another type."""
    path = rng.choice(list(_paths(meta)))
    _set(meta, path, copy.deepcopy(rng.choice((*HOSTILE_VALUES, _number(rng)))))


def mutate_number(meta: dict, bodies: list[bytes], rng: random.Random) -> None:
    """A number anywhere in the metadata replaced by a hostile one (huge, tiny, negative)."""
    paths = [p for p in _paths(meta) if type(_get(meta, p)) in (int, float)]
    _set(meta, rng.choice(paths), _number(rng))


def mutate_shape(meta: dict, bodies: list[bytes], rng: random.Random) -> None:
    """A tensor's shape or the input shape changed: a dimension, the rank, or the order."""
    names = list(meta["tensors"])
    target = meta["graph"]["input_shape"] if rng.random() < 0.3 else None
    if not isinstance(target, list):
        target = meta["tensors"][rng.choice(names)]["shape"]
    choice = rng.random()
    if choice < 0.4 and target:
        target[rng.randrange(len(target))] = rng.choice(SHAPE_DIMS)
    elif choice < 0.6:
        target.append(rng.choice(SHAPE_DIMS))
    elif choice < 0.8 and target:
        target.pop(rng.randrange(len(target)))
    else:
        rng.shuffle(target)


def mutate_attrs(meta: dict, bodies: list[bytes], rng: random.Random) -> None:
    """An op attribute (kernel, stride, padding, dilation, groups, bits, scale, zero point)."""
    nodes = [n for n in meta["graph"]["nodes"] if n["attrs"]]
    node = rng.choice(nodes)
    key = rng.choice(sorted(node["attrs"]))
    value = node["attrs"][key]
    if isinstance(value, list) and value:
        value[rng.randrange(len(value))] = rng.choice((*SHAPE_DIMS, _number(rng)))
    else:
        node["attrs"][key] = _number(rng) if rng.random() < 0.8 else rng.choice(HOSTILE_VALUES)


def mutate_graph(meta: dict, bodies: list[bytes], rng: random.Random) -> None:
    """The graph's wiring: an op renamed, an input rewired, a node dropped, duplicated or
    moved, the output renamed."""
    nodes = meta["graph"]["nodes"]
    node = rng.choice(nodes)
    choice = rng.randrange(6)
    if choice == 0:
        node["op"] = rng.choice(sorted(GRAPH_OPS))
    elif choice == 1 and node["inputs"]:
        node["inputs"][0] = rng.choice(["input", *(n["output"] for n in nodes)])
    elif choice == 2 and len(nodes) > 1:
        nodes.remove(node)
    elif choice == 3:
        nodes.insert(rng.randrange(len(nodes) + 1), copy.deepcopy(node))
    elif choice == 4:
        nodes.insert(rng.randrange(len(nodes) + 1), nodes.pop(nodes.index(node)))
    else:
        meta["graph"]["output"] = rng.choice([n["output"] for n in nodes])


def mutate_bytes(meta: dict, bodies: list[bytes], rng: random.Random) -> None:
    """Bytes of one tensor section overwritten (its CRC is fixed when the file is rebuilt)."""
    index = rng.randrange(len(bodies))
    body = bytearray(bodies[index])
    for _ in range(rng.randint(1, 4)):
        if body:
            body[rng.randrange(len(body))] = rng.randrange(256)
    bodies[index] = bytes(body)


def mutate_bomb(meta: dict, bodies: list[bytes], rng: random.Random) -> None:
    """One tensor replaced by a valid, fully pruned f32 CSR tensor of up to 2**28 elements:
    255 elements per byte of its stream."""
    name = rng.choice(list(meta["tensors"]))
    large = rng.random() < 0.8
    count = rng.choice((1 << 20, 1 << 24, 1 << 28)) if large else rng.randrange(1 << 16)
    entries = count // 255
    desc = meta["tensors"][name]
    desc.clear()
    desc.update(
        section=len(bodies) + 1, shape=[count], encoding="f32", sparsity="csr", nnz=0,
        parts=[["values", 0], ["gaps", entries]], csr_bits=8, csr_entries=entries,
    )
    bodies.append(b"\xff" * entries)
    _drop_orphans(meta, bodies)


def mutate_sections(meta: dict, bodies: list[bytes], rng: random.Random) -> None:
    """A tensor section dropped, duplicated, or two swapped (the table re-signed)."""
    index = rng.randrange(len(bodies))
    choice = rng.randrange(3)
    if choice == 0:
        bodies.pop(index)
    elif choice == 1:
        bodies.append(bodies[index])
    else:
        other = rng.randrange(len(bodies))
        bodies[index], bodies[other] = bodies[other], bodies[index]


def _drop_orphans(meta: dict, bodies: list[bytes]) -> None:
    """Keep only the sections the tensor table names, renumbering them (a bomb replaces one)."""
    used = sorted({d["section"] for d in meta["tensors"].values()})
    renumber = {old: new for new, old in enumerate(used, start=1)}
    kept = [bodies[old - 1] for old in used]
    for desc in meta["tensors"].values():
        desc["section"] = renumber[desc["section"]]
    bodies[:] = kept


Mutation = Callable[[dict, list[bytes], random.Random], None]
MUTATIONS: dict[str, Mutation] = {
    "json_type": mutate_json_type,
    "number": mutate_number,
    "shape": mutate_shape,
    "attrs": mutate_attrs,
    "graph": mutate_graph,
    "bytes": mutate_bytes,
    "bomb": mutate_bomb,
    "sections": mutate_sections,
}


def cases(seeds: list[Seed], count: int, seed: int) -> Iterator[Case]:
    """``count`` mutated files, each one to three mutations of one class applied to a seed."""
    rng = random.Random(seed)
    names = sorted(MUTATIONS)
    for index in range(count):
        source = seeds[index % len(seeds)]
        mutation = names[(index // len(seeds)) % len(names)]
        meta, bodies = json.loads(source.metadata), list(source.bodies)
        for _ in range(rng.choice((1, 1, 1, 2, 3))):
            try:
                MUTATIONS[mutation](meta, bodies, rng)
            except (KeyError, IndexError, TypeError, ValueError, AttributeError):
                break  # an earlier mutation removed what this one looks for
        yield Case(mutation, source.name, rebuild(meta, bodies, source.compressed))


# ------------------------------------------------------------------------------------ harness


def run_case(data: bytes, folder: Path, limits: Limits = FUZZ_LIMITS) -> str:
    """Everything that reads a file, on ``data``: "accepted" or "refused" (MbzFormatError);
    any other exception propagates."""
    try:
        path = folder / "case.mbz"
        path.write_bytes(data)
        describe(path, limits, onnx=True)  # reads, and exports to ONNX when it has a graph
        program = load_program(decode_mbz(data, limits), limits)
        c, h, w = program.input_shape
        program.predict(np.full((1, h, w, c), 128, np.uint8))
    except MbzFormatError:
        return "refused"
    return "accepted"


@dataclass
class Summary:
    """Outcomes per mutation class, the slowest case and the largest traced peak."""

    outcomes: dict[str, Counter] = field(default_factory=dict)
    crashes: list[dict] = field(default_factory=list)
    max_seconds: float = 0.0
    max_traced_bytes: int = 0
    cases: int = 0

    def add(self, mutation: str, outcome: str, seconds: float, traced: int) -> None:
        """Record one case."""
        self.outcomes.setdefault(mutation, Counter())[outcome] += 1
        self.max_seconds = max(self.max_seconds, seconds)
        self.max_traced_bytes = max(self.max_traced_bytes, traced)
        self.cases += 1

    def to_dict(self) -> dict:
        """JSON-ready."""
        return {
            "cases": self.cases,
            "outcomes": {k: dict(v) for k, v in sorted(self.outcomes.items())},
            "crashes": self.crashes,
            "max_case_seconds": self.max_seconds,
            "max_case_traced_bytes": self.max_traced_bytes,
            # the process's peak resident memory so far (Linux: KiB), which bounds every case's
            "max_rss_bytes": 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
        }


def fuzz(
    count: int, seed: int = 0, out: Path | None = None, trace: bool = True,
    progress: Callable[[Summary], None] | None = None,
) -> Summary:
    """Run ``count`` cases; crashing inputs are saved under ``out/crashes`` when given."""
    summary, seeds = Summary(), corpus(seed)
    if trace:
        tracemalloc.start()
    with tempfile.TemporaryDirectory() as temporary:
        for index, case in enumerate(cases(seeds, count, seed)):
            if trace:
                tracemalloc.reset_peak()
            start = time.perf_counter()
            try:
                outcome = run_case(case.data, Path(temporary))
            except Exception as error:  # what the fuzzer is looking for
                outcome = f"crash {type(error).__name__}"
                summary.crashes.append(_save(case, index, error, out))
            traced = tracemalloc.get_traced_memory()[1] if trace else 0
            summary.add(case.mutation, outcome, time.perf_counter() - start, traced)
            if progress is not None and index % 1000 == 999:
                progress(summary)
    if trace:
        tracemalloc.stop()
    return summary


def _save(case: Case, index: int, error: Exception, out: Path | None) -> dict:
    record = {
        "case": index,
        "mutation": case.mutation,
        "seed": case.seed,
        "error": f"{type(error).__name__}: {str(error)[:300]}",
        "traceback": traceback.format_exc()[-3000:],
    }
    if out is not None:
        folder = out / "crashes"
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{index:07d}_{case.mutation}.mbz").write_bytes(case.data)
        (folder / f"{index:07d}_{case.mutation}.txt").write_text(record["traceback"])
    return record


def main() -> None:
    """Command line: run the cases, print progress and the summary, save crashes."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=100_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("runs/fuzz"))
    parser.add_argument(
        "--no-trace",
        action="store_true",
        help="skip tracemalloc, 4x faster; the peak RSS still bounds every case's memory",
    )
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()

    def report(summary: Summary) -> None:
        elapsed = time.perf_counter() - start
        print(
            f"{summary.cases} cases, {len(summary.crashes)} crashes, {elapsed:.0f} s, "
            f"max case {summary.max_seconds:.2f} s, "
            f"max traced {summary.max_traced_bytes / 2**20:.1f} MiB, "
            f"max RSS {summary.to_dict()['max_rss_bytes'] / 2**20:.0f} MiB",
            flush=True,
        )
        result = summary.to_dict() | {"wall_seconds": elapsed, "command": sys.argv}
        (args.out / "summary.json").write_text(json.dumps(result, indent=2))

    summary = fuzz(args.cases, args.seed, args.out, not args.no_trace, report)
    report(summary)
    print(json.dumps(summary.to_dict()["outcomes"], indent=1))
    sys.exit(1 if summary.crashes else 0)


if __name__ == "__main__":
    main()
