"""Tensors for the format tests: random valid tensors, and the fixed cases of the golden files."""

from __future__ import annotations

import numpy as np

from mbz.format import (
    CodebookTensor,
    DenseTensor,
    Entropy,
    IntCodebookTensor,
    ScaledCodebookTensor,
    UniformTensor,
)


def random_tensor(
    rng: np.random.Generator,
    kind: str,
    shape: tuple[int, ...],
    bits: int,
    density: float | None,
    entropy: Entropy | None = Entropy.FIXED,
    per_channel: bool = False,
):
    """A valid tensor of ``kind`` (an encoding's name; scaled_codebook and int_codebook need a
    non-empty shape); ``density`` None: not sparse."""
    mask = None if density is None else rng.random(shape) < density
    if kind in ("f32", "f16"):
        values = rng.standard_normal(shape).astype(np.float32 if kind == "f32" else np.float16)
        return DenseTensor(values=values, mask=mask)
    levels = 2**bits
    if kind == "codebook":
        k = int(rng.integers(1, levels + 1))
        codebook = np.sort(rng.standard_normal(k)).astype(np.float32)
        indices = rng.integers(0, k, shape).astype(np.uint8)
        return CodebookTensor(codebook, indices, bits, mask=mask, entropy=entropy)
    if kind == "scaled_codebook":
        k = int(rng.integers(1, levels + 1))
        codebook = np.sort(rng.uniform(-1, 1, k)).astype(np.float16)
        scale = rng.uniform(1e-3, 4.0, shape[0]).astype(np.float16)
        indices = rng.integers(0, k, shape).astype(np.uint8)
        return ScaledCodebookTensor(codebook, scale, indices, bits, mask=mask, entropy=entropy)
    if kind == "int_codebook":
        k = int(rng.integers(1, levels + 1))
        codebook = rng.choice(np.arange(-128, 128), k, replace=False).astype(np.int8)
        scale = rng.uniform(1e-3, 4.0, shape[0]).astype(np.float16)
        indices = rng.integers(0, k, shape).astype(np.uint8)
        return IntCodebookTensor(codebook, scale, indices, bits, mask=mask, entropy=entropy)
    axis = 0 if per_channel and shape else None
    channels = shape[0] if axis == 0 else 1
    return UniformTensor(
        qdata=rng.integers(0, levels, shape).astype(np.uint8),
        scale=rng.uniform(1e-3, 1.0, channels).astype(np.float32),
        zero_point=rng.integers(0, levels, channels).astype(np.uint8),
        bits=bits,
        axis=axis,
        mask=mask,
        entropy=entropy,
    )


def golden_cases() -> dict[str, tuple[dict, dict]]:
    """Small hand-written files: name -> (tensors, expected decoded float32 arrays).

    The expected arrays are written out by hand from SPEC.md's decode formulas, not computed by
    the codec.
    """
    cb = np.array([-1.0, 0.0, 0.5, 2.0], np.float32)
    idx = np.array([[0, 1, 2], [3, 2, 1]], np.uint8)
    mask = np.array([[True, False, True], [False, False, True]])
    q = np.array([[0, 7, 3], [5, 1, 6]], np.uint8)
    return {
        "dense": (
            {
                "w32": DenseTensor(np.array([1.5, -2.0, 0.25], np.float32)),
                "w16": DenseTensor(np.array([[0.5, -1.0]], np.float16)),
            },
            {"w32": [1.5, -2.0, 0.25], "w16": [[0.5, -1.0]]},
        ),
        "codebook": (
            {"w": CodebookTensor(cb, idx, 2)},
            {"w": [[-1.0, 0.0, 0.5], [2.0, 0.5, 0.0]]},
        ),
        "uniform_per_channel_bitmap": (
            {
                "w": UniformTensor(
                    q,
                    np.array([0.5, 0.25], np.float32),
                    np.array([4, 2], np.uint8),
                    3,
                    axis=0,
                    mask=mask,
                )
            },
            {"w": [[-2.0, 0.0, -0.5], [0.0, 0.0, 1.0]]},
        ),
        "scaled_codebook": (
            {
                "w": ScaledCodebookTensor(
                    np.array([-1.0, 0.0, 0.5, 1.0], np.float16),
                    np.array([2.0, 0.25], np.float16),
                    idx,
                    2,
                )
            },
            {"w": [[-2.0, 0.0, 1.0], [0.25, 0.125, 0.0]]},
        ),
        "int_codebook": (
            {
                "w": IntCodebookTensor(
                    np.array([-128, 0, 3, 127], np.int8),
                    np.array([0.5, 0.125], np.float16),
                    idx,
                    2,
                )
            },
            {"w": [[-64.0, 0.0, 1.5], [15.875, 0.375, 0.0]]},
        ),
        "codebook_huffman_csr": (
            {
                "w": CodebookTensor(
                    cb,
                    np.array([2, 2, 2, 2, 2, 0, 2, 2, 2, 3], np.uint8),
                    2,
                    mask=np.array([1, 0, 0, 0, 0, 0, 0, 0, 0, 1], bool),
                    entropy=Entropy.HUFFMAN,
                )
            },
            {"w": [0.5, 0, 0, 0, 0, 0, 0, 0, 0, 2.0]},
        ),
        "uniform_lean_huffman": (
            {
                "w": UniformTensor(
                    np.array([[2, 2, 3, 1], [2, 2, 2, 0]], np.uint8),
                    np.array([0.5, 0.25], np.float32),
                    np.array([2, 2], np.uint8),
                    2,
                    axis=0,
                    entropy=Entropy.HUFFMAN,
                    lean=True,
                )
            },
            {"w": [[0.0, 0.0, 0.5, -0.5], [0.0, 0.0, 0.0, -0.5]]},
        ),
    }
