"""Small queries and rewrites on mbz's graph IR (SPEC.md section 6), shared by the passes."""

from __future__ import annotations

from collections import defaultdict

import numpy as np


def consumers(graph: dict) -> dict[str, list[dict]]:
    """Value name -> the nodes that read it."""
    found: dict[str, list[dict]] = defaultdict(list)
    for node in graph["nodes"]:
        for name in node["inputs"]:
            found[name].append(node)
    return found


def producers(graph: dict) -> dict[str, dict]:
    """Value name -> the node that writes it."""
    return {node["output"]: node for node in graph["nodes"]}


def is_depthwise(node: dict, params: dict[str, np.ndarray]) -> bool:
    """A conv2d with one input channel per group and as many groups as output channels."""
    if node["op"] != "conv2d":
        return False
    weight = params[node["params"]["weight"]]
    groups = node["attrs"]["groups"]
    return groups > 1 and weight.shape[1] == 1 and weight.shape[0] == groups


def is_pointwise(node: dict, params: dict[str, np.ndarray]) -> bool:
    """A 1x1 conv2d without groups."""
    if node["op"] != "conv2d":
        return False
    weight = params[node["params"]["weight"]]
    return node["attrs"]["groups"] == 1 and weight.shape[2:] == (1, 1)


def weight_nodes(graph: dict) -> list[dict]:
    """The conv2d and linear nodes, in execution order."""
    return [node for node in graph["nodes"] if node["op"] in ("conv2d", "linear")]


def remove_node(graph: dict, node: dict) -> None:
    """Drop a single-input node and make its readers read its input instead."""
    source, target = node["inputs"][0], node["output"]
    graph["nodes"] = [n for n in graph["nodes"] if n is not node]
    for other in graph["nodes"]:
        other["inputs"] = [source if name == target else name for name in other["inputs"]]
    if graph["output"] == target:
        graph["output"] = source
