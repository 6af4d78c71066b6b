"""Benchmark the .mbz codec: encode/decode time and size of MobileNet-v2-sized tensors.

Run: python examples/bench_format.py   (prints a table and writes runs/bench_format.json)
"""

import json
import time
from pathlib import Path

import numpy as np

from mbz.format import CodebookTensor, Entropy, UniformTensor, decode_mbz, encode_mbz

COUNT = 2_200_000  # about the weight count of MobileNet-v2 for CIFAR-10


def cases(rng: np.random.Generator) -> dict:
    """Named single-tensor workloads."""
    skewed = np.clip(rng.normal(8, 2, COUNT), 0, 15).astype(np.uint8)
    sparse = rng.random(COUNT) < 0.1
    return {
        "codebook 4-bit": CodebookTensor(np.linspace(-1, 1, 16, dtype=np.float32), skewed, 4),
        "codebook 4-bit huffman": CodebookTensor(
            np.linspace(-1, 1, 16, dtype=np.float32), skewed, 4, entropy=Entropy.HUFFMAN
        ),
        "uniform 2-bit, 90% pruned (csr)": UniformTensor(
            rng.integers(0, 4, COUNT).astype(np.uint8),
            np.ones(1, np.float32),
            np.full(1, 2, np.uint8),
            2,
            mask=sparse,
        ),
    }


def measure(tensor) -> dict:
    """Bytes, encode and decode seconds (best of 3)."""
    encode_s, decode_s = [], []
    for _ in range(3):
        start = time.perf_counter()
        data = encode_mbz({}, {"w": tensor})
        encode_s.append(time.perf_counter() - start)
        start = time.perf_counter()
        decode_mbz(data).tensors["w"].decode()
        decode_s.append(time.perf_counter() - start)
    return {"bytes": len(data), "encode_s": min(encode_s), "decode_s": min(decode_s)}


def main() -> None:
    """Print and save the table."""
    results = {name: measure(t) for name, t in cases(np.random.default_rng(0)).items()}
    print(f"{'case':34} {'bytes':>10} {'encode ms':>10} {'decode ms':>10}")
    for name, r in results.items():
        ms = f"{1e3 * r['encode_s']:>10.1f} {1e3 * r['decode_s']:>10.1f}"
        print(f"{name:34} {r['bytes']:>10} {ms}")
    out = Path("runs/bench_format.json")
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    print(f"saved {out}")


if __name__ == "__main__":
    main()
