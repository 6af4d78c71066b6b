"""Fold BatchNorm into the convolution it follows."""

from __future__ import annotations

import numpy as np

from mbz.graph_ops import consumers, producers, remove_node


def fold_batchnorm(graph: dict, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Fold every ``batchnorm`` whose input is a ``conv2d`` output read by nothing else.

    ``w' = w * scale[o]`` and ``b' = b * scale + shift``; the graph and ``params`` change in place
    and the folded BatchNorm's parameters are removed. BatchNorms that cannot be folded stay as
    per-channel affine nodes. Returns each folded weight's per-output-channel gain ``scale``
    (what the step-size mode of uniform codes divides out, ``mbz.quantize.step_quantize``).
    """
    gains = {}
    for node in [n for n in graph["nodes"] if n["op"] == "batchnorm"]:
        conv = producers(graph).get(node["inputs"][0])
        if conv is None or conv["op"] != "conv2d" or len(consumers(graph)[conv["output"]]) != 1:
            continue
        scale = params.pop(node["params"]["scale"])
        shift = params.pop(node["params"]["shift"])
        weight_name, bias_name = conv["params"]["weight"], conv["params"]["bias"]
        params[weight_name] = (params[weight_name] * scale[:, None, None, None]).astype(np.float32)
        gains[weight_name] = scale.astype(np.float32)
        params[bias_name] = (params[bias_name] * scale + shift).astype(np.float32)
        remove_node(graph, node)
    return gains
