"""Pruning on the graph IR: channel pruning (ranked by measured importance or BN gamma) and
weight magnitude.

Channel pruning removes whole channels, so layers become physically smaller. Channels that must
stay aligned (a depthwise conv and its input, the operands of a residual add) form one
*channel space* and are pruned together. ``--prune FRACTION`` counts conv and linear weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from mbz.graph_ops import is_depthwise, weight_nodes

MIN_KEEP_FRACTION = 0.1  # every channel space keeps at least this share of its channels
_PASS_THROUGH = {"relu", "relu6", "quantize", "avgpool2d", "maxpool2d", "global_avgpool"}


@dataclass
class ChannelSpaces:
    """Union-find over the channel dimension of every value in the graph."""

    parent: dict[str, str] = field(default_factory=dict)
    frozen: set[str] = field(default_factory=set)
    value_space: dict[str, str] = field(default_factory=dict)
    members: list[tuple[dict, str, str]] = field(default_factory=list)  # (node, role, space)

    def new(self, name: str, frozen: bool = False) -> str:
        """A fresh space, optionally one that may not be pruned."""
        self.parent[name] = name
        if frozen:
            self.frozen.add(name)
        return name

    def find(self, space: str) -> str:
        """The root of a space."""
        while self.parent[space] != space:
            space = self.parent[space]
        return space

    def union(self, a: str, b: str) -> str:
        """Merge two spaces."""
        ra, rb = self.find(a), self.find(b)
        self.parent[rb] = ra
        return ra

    def prunable_roots(self) -> set[str]:
        """Roots of the spaces that no frozen space was merged into and a BN ranks."""
        frozen = {self.find(s) for s in self.frozen}
        ranked = {self.find(space) for _, role, space in self.members if role == "bn"}
        return ranked - frozen


def analyse(graph: dict, params: dict[str, np.ndarray]) -> ChannelSpaces:
    """Assign every value a channel space and record how each node uses it."""
    spaces = ChannelSpaces()
    spaces.value_space[graph["input"]] = spaces.new(graph["input"], frozen=True)
    pooled = {n["output"] for n in graph["nodes"] if n["op"] == "global_avgpool"}
    for node in graph["nodes"]:
        _visit(spaces, node, params, pooled)
    spaces.frozen.add(spaces.value_space[graph["output"]])
    return spaces


def _visit(spaces: ChannelSpaces, node: dict, params: dict, pooled: set[str]) -> None:
    """Record one node's effect on channel spaces."""
    op, out = node["op"], node["output"]
    ins = [spaces.value_space[name] for name in node["inputs"]]
    if op in _PASS_THROUGH or (op == "flatten" and node["inputs"][0] in pooled):
        spaces.value_space[out] = ins[0]
    elif op == "batchnorm":
        spaces.value_space[out] = ins[0]
        spaces.members.append((node, "bn", ins[0]))
    elif op == "add":
        spaces.value_space[out] = spaces.union(ins[0], ins[1])
    elif op == "conv2d" and is_depthwise(node, params):
        spaces.value_space[out] = ins[0]
        spaces.members.append((node, "dw", ins[0]))
    elif op in ("conv2d", "linear"):
        grouped = op == "conv2d" and node["attrs"]["groups"] != 1
        spaces.value_space[out] = spaces.new(out, frozen=grouped or op == "linear")
        spaces.members += [(node, "in", ins[0]), (node, "out", out)]
        if grouped:
            spaces.frozen.add(ins[0])
    else:  # a flatten of a spatial map mixes channels into features
        spaces.frozen.add(ins[0])
        spaces.value_space[out] = spaces.new(out, frozen=True)


@dataclass
class ChannelPlan:
    """Which channels each prunable space keeps."""

    keep: dict[str, np.ndarray]  # space root -> sorted kept channel indices
    spaces: ChannelSpaces


def _space_scores(spaces: ChannelSpaces, bn_gamma: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per prunable space, each channel's importance: the largest |gamma| among its BNs."""
    roots = spaces.prunable_roots()
    scores: dict[str, np.ndarray] = {}
    for node, role, space in spaces.members:
        root = spaces.find(space)
        if role == "bn" and root in roots:
            gamma = np.abs(bn_gamma[node["name"]])
            scores[root] = np.maximum(scores[root], gamma) if root in scores else gamma
    return scores


def _reader_norms(spaces: ChannelSpaces, params: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Per prunable space, the L2 norm of the weights that read each channel (the next layers'
    input columns), summed over the readers."""
    norms: dict[str, np.ndarray] = {}
    roots = spaces.prunable_roots()
    for node, role, space in spaces.members:
        root = spaces.find(space)
        if role != "in" or root not in roots:
            continue
        weight = params[node["params"]["weight"]].astype(np.float64)
        axes = tuple(a for a in range(weight.ndim) if a != 1)
        column = np.sqrt((weight**2).sum(axis=axes))
        norms[root] = norms[root] + column if root in norms else column
    return norms


def _channel_scores(
    spaces: ChannelSpaces, params: dict[str, np.ndarray], bn_gamma: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Each channel's importance for post-training pruning: |gamma| times the norm of the
    weights that read it (what the next layers lose with it), relative to its space's mean, so
    that layers whose gammas run small are not emptied first."""
    scores = _space_scores(spaces, bn_gamma)
    norms = _reader_norms(spaces, params)
    relative = {}
    for root, score in scores.items():
        effect = score * norms.get(root, np.ones_like(score))
        mean = effect.mean()
        relative[root] = effect / mean if mean > 0 else effect
    return relative


def _kept_weight_count(spaces: ChannelSpaces, graph: dict, params: dict, kept: dict) -> int:
    """Conv and linear weights that remain when each space keeps ``kept[root]`` channels."""
    total = 0
    for node in weight_nodes(graph):
        weight = params[node["params"]["weight"]]
        out_space = spaces.find(spaces.value_space[node["output"]])
        in_space = spaces.find(spaces.value_space[node["inputs"][0]])
        per_out = int(np.prod(weight.shape[1:]))
        if node["op"] == "conv2d" and is_depthwise(node, params):
            total += kept.get(in_space, weight.shape[0]) * per_out
        elif node["op"] == "conv2d" and node["attrs"]["groups"] != 1:
            total += weight.size
        else:
            rows = kept.get(out_space, weight.shape[0])
            total += rows * kept.get(in_space, weight.shape[1]) * (per_out // weight.shape[1])
    return total


def _taylor_scores(
    spaces: ChannelSpaces, graph: dict, params: dict, importance: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Each channel's measured importance per weight it removes: the summed ``importance`` of
    its space's BatchNorms (an estimate of the loss increase when the channel is zeroed) over
    the conv and linear weights that go with it, so the greedy order is a knapsack's."""
    roots = spaces.prunable_roots()
    total = _kept_weight_count(spaces, graph, params, {})
    scores: dict[str, np.ndarray] = {}
    for node, role, space in spaces.members:
        root = spaces.find(space)
        if role == "bn" and root in roots:
            found = importance[node["name"]].astype(np.float64)
            scores[root] = scores[root] + found if root in scores else found
    for root, score in scores.items():
        cost = total - _kept_weight_count(spaces, graph, params, {root: score.size - 1})
        scores[root] = score / max(cost, 1)
    return scores


def plan_channels(
    graph: dict,
    params: dict[str, np.ndarray],
    bn_gamma: dict[str, np.ndarray],
    fraction: float,
    importance: dict[str, np.ndarray] | None = None,
) -> ChannelPlan:
    """Choose channels to remove, least important first across the network, until at least
    ``fraction`` of all conv and linear weights are gone (each space keeps 10% at least).
    Importance: ``importance`` per BatchNorm node when given, per weight removed
    (``_taylor_scores``), else ``_channel_scores`` from the weights alone."""
    spaces = analyse(graph, params)
    if importance is None:
        scores = _channel_scores(spaces, params, bn_gamma)
    else:
        scores = _taylor_scores(spaces, graph, params, importance)
    roots = sorted(scores)
    full = {root: scores[root].size for root in roots}
    candidates = []  # (score, root index, channel) for channels that may go
    for i, root in enumerate(roots):
        order = np.argsort(scores[root], kind="stable")
        floor = max(1, int(np.ceil(MIN_KEEP_FRACTION * full[root])))
        candidates += [(scores[root][c], i, c) for c in order[: full[root] - floor]]
    candidates.sort()
    total = _kept_weight_count(spaces, graph, params, {})
    target = total * (1.0 - fraction)

    def kept_after(n: int) -> dict[str, int]:
        removed = np.bincount([c[1] for c in candidates[:n]], minlength=len(roots))
        return {root: full[root] - int(removed[i]) for i, root in enumerate(roots)}

    lo, hi = 0, len(candidates)
    while lo < hi:
        mid = (lo + hi) // 2
        if _kept_weight_count(spaces, graph, params, kept_after(mid)) <= target:
            hi = mid
        else:
            lo = mid + 1
    drop: dict[str, set[int]] = {root: set() for root in roots}
    for _, i, channel in candidates[:lo]:
        drop[roots[i]].add(int(channel))
    keep = {r: np.array([c for c in range(full[r]) if c not in drop[r]]) for r in roots}
    return ChannelPlan(keep=keep, spaces=spaces)


def apply_channels(
    plan: ChannelPlan, params: dict[str, np.ndarray], bn_gamma: dict[str, np.ndarray]
) -> None:
    """Slice every parameter touched by a pruned space; depthwise ``groups`` follow."""
    for node, role, space in plan.spaces.members:
        keep = plan.keep.get(plan.spaces.find(space))
        if keep is None:
            continue
        names = node["params"]
        if role == "in":
            params[names["weight"]] = params[names["weight"]][:, keep]
            continue
        for name in names.values():
            params[name] = params[name][keep]
        if role == "bn":
            bn_gamma[node["name"]] = bn_gamma[node["name"]][keep]
        if role == "dw":
            node["attrs"]["groups"] = int(keep.size)


def prune_channels(
    graph: dict,
    params: dict[str, np.ndarray],
    bn_gamma: dict[str, np.ndarray],
    fraction: float,
    importance: dict[str, np.ndarray] | None = None,
) -> dict[str, np.ndarray]:
    """Channel pruning in place: rank channels (``plan_channels``, by ``importance`` when
    given) and remove ``fraction`` of the weights. Returns, per batchnorm whose channels were
    cut, the indices it kept."""
    if fraction <= 0:
        return {}
    plan = plan_channels(graph, params, bn_gamma, fraction, importance)
    apply_channels(plan, params, bn_gamma)
    kept = {}
    for node, role, space in plan.spaces.members:
        keep = plan.keep.get(plan.spaces.find(space))
        if role == "bn" and keep is not None:
            kept[node["name"]] = keep
    return kept


def batchnorm_keep_masks(
    plan: ChannelPlan, bn_gamma: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Per batchnorm node name: True for each channel ``plan`` keeps (all, in unpruned spaces)."""
    masks = {}
    for node, role, space in plan.spaces.members:
        if role == "bn":
            mask = np.ones(bn_gamma[node["name"]].size, dtype=bool)
            keep = plan.keep.get(plan.spaces.find(space))
            if keep is not None:
                mask[:] = False
                mask[keep] = True
            masks[node["name"]] = mask
    return masks


def prune_zeroed_channels(
    graph: dict, params: dict[str, np.ndarray], bn_gamma: dict[str, np.ndarray]
) -> None:
    """Remove, in place, exactly the channels of prunable spaces whose every BatchNorm gamma is
    zero: the channels that fine-tuning held at zero (their gamma and beta masked), so the
    smaller network computes what the masked one did."""
    spaces = analyse(graph, params)
    keep = {
        root: np.flatnonzero(score != 0) for root, score in _space_scores(spaces, bn_gamma).items()
    }
    apply_channels(ChannelPlan(keep=keep, spaces=spaces), params, bn_gamma)


def magnitude_masks(
    graph: dict, params: dict[str, np.ndarray], fraction: float
) -> dict[str, np.ndarray]:
    """Global magnitude pruning: keep-masks that drop the ``fraction`` smallest |weights| of all
    conv and linear layers together (ties broken by position, so the count is exact)."""
    names = [node["params"]["weight"] for node in weight_nodes(graph)]
    flat = np.concatenate([np.abs(params[name]).ravel() for name in names])
    drop = round(fraction * flat.size)
    keep = np.ones(flat.size, dtype=bool)
    keep[np.argsort(flat, kind="stable")[:drop]] = False
    masks, start = {}, 0
    for name in names:
        size = params[name].size
        masks[name] = keep[start : start + size].reshape(params[name].shape)
        start += size
    return masks
