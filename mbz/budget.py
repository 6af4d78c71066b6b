"""Mixed precision to a byte budget: ``--target-ratio R`` / ``--target-size BYTES``.

Each quantizable layer gets candidate encodings, one per bit width of ``CANDIDATE_BITS`` (a single
one when a ``--bits`` rule pins the layer) and sparsity of ``CANDIDATE_SPARSITIES`` (the layer's
smallest magnitudes pruned, on top of what ``--prune`` prunes), so the budget trades sparsity for
bits; and (unless ``--per-tensor``) one per step of the uniform step-size mode
(``mbz.quantize.step_quantize``: one step per tensor on the unfolded weights, half a bit apart),
so the budget has fine rate steps between whole bits. A candidate's *cost* is the exact number of
bytes its section adds to the file (``mbz.format``'s encoding of the tensor in the layout the file
stores, Huffman included, rounded up to the section alignment); its *sensitivity* is the increase
in loss it is expected to cause: ``0.5 * sum(F * (w - q(w))**2)``, with ``F`` the diagonal Fisher
information of the folded float model on calibration images (the second-order term of the loss
around trained weights), mapped per layer onto the measured KL
divergence of the logits from the float model's with that layer alone quantized (the diagonal
misses how errors add up over a wide layer's inputs). A knapsack over the costs rounded *up* to a
bucket of bytes picks the candidate per layer with the least summed sensitivity whose rounded
costs fit the room left for weights, so their real bytes fit too. What the rest of the file costs
(biases, metadata, header, table, padding) is measured on the file a choice makes; when that file
is over the budget, the choice is redone with that much less room. The knapsack runs with and
without the pruning candidates and the step-size codes, and the choice whose logits on the
calibration images are nearest the float model's is kept (``Divergence``: the least reliable
estimates are those of heavy pruning and of a second family of codes).
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from mbz.config import DEFAULT_BITS, LayerInfo, PackConfig, bits_for
from mbz.data import Dataset
from mbz.errors import MbzError
from mbz.evaluate import Progress
from mbz.format import Tensor
from mbz.format.constants import DEFAULT_ALIGNMENT
from mbz.format.container import encode_tensor
from mbz.quantize import (
    STEP_CODES,
    Coding,
    quantize_weight,
    smallest_layout,
    step_bits,
    weighted_error,
)
from mbz.torch_graph import GraphModule, image_batches, preprocess_images

CANDIDATE_BITS = (2, 3, 4, 5, 6, 8)  # the bit widths a layer no --bits rule pins may get
CANDIDATE_SPARSITIES = (0.0, 0.25, 0.5, 0.75)  # shares of a layer the budget may prune
BUCKETS = 1 << 14  # knapsack resolution: the costliest choice spans this many buckets
HEADROOM = 1024  # bytes kept free for metadata written after the choice (the accuracies)
MAX_ROUNDS = 8  # choices tried with less room before falling back to the smallest one
FISHER_BATCH = 32  # images per backward pass of the sensitivity measurement
PROBE_IMAGES = 64  # calibration images each layer's measured output change is averaged over
PROBE_BITS = (2, 4)  # the widths at which each layer's sensitivity is measured, not estimated
# --prune auto: the bits each kept weight gets on average. Chosen on 407 images neither model
# nor fine-tuning saw (both trained on the other 3,661 of the fragment): at 30x, fine-tuned 3
# epochs in batches of 128, mean held-out top-1 of a torchvision-layout and an mbz model 39.2%
# at 2.1 bits (--prune 0.5), 40.5% at 2.7 (0.6), 39.6% at 3.5 (0.7)
AUTO_PRUNE_BITS = 2.7
MAX_AUTO_PRUNE = 0.9  # --prune auto never removes more than this share of the weights

Choice = dict[str, "Candidate"]  # weight tensor name -> the candidate chosen for it
SizeOf = Callable[[Choice], int]  # the bytes of the file a choice makes


@dataclass(frozen=True)
class Candidate:
    """One way to store a layer's weight, what it costs and what it is expected to lose."""

    bits: int
    tensor: Tensor
    cost: int  # bytes its section adds to the file, alignment padding included
    sensitivity: float  # expected loss increase: 0.5 * sum(F * (w - decoded)**2)
    stepped: bool = False  # uniform codes of the step-size mode (mbz.quantize.step_quantize)

    @property
    def sparsity(self) -> float:
        """The share of the weight it prunes (0.0 without a mask)."""
        mask = self.tensor.mask
        return 0.0 if mask is None else float(1.0 - mask.mean())


class BudgetError(MbzError):
    """The budget is below the smallest file the candidates can make (``smallest`` bytes)."""

    def __init__(self, smallest: int) -> None:
        super().__init__(
            f"the budget cannot be met: the smallest file these layers can make is "
            f"{smallest:,} bytes (--target-size {smallest}); every stored weight costs about "
            "a bit at least, so remove channels (--prune auto, or a fraction such as 0.36), or "
            "allow fewer bits to the layers --bits pins"
        )
        self.smallest = smallest


def target_bytes(config: PackConfig, fp32_bytes: int) -> int | None:
    """The file size ``config`` asks for: ``target_size``, or the FP32 bytes divided by
    ``target_ratio``, rounded down; None without a budget."""
    if config.target_size:
        return config.target_size
    if config.target_ratio:
        return math.floor(fp32_bytes / config.target_ratio)
    return None


def auto_prune(target: int, weights: int) -> float:
    """The share of a model's ``weights`` (conv and linear) ``--prune auto`` removes for a
    budget of ``target`` bytes: what leaves the rest AUTO_PRUNE_BITS bits each (the file's
    other bytes included), rounded to 0.01, between 0 (they have that many already) and
    MAX_AUTO_PRUNE."""
    share = 1.0 - 8 * target / (AUTO_PRUNE_BITS * weights)
    return round(min(max(share, 0.0), MAX_AUTO_PRUNE), 2)


def fisher_diagonal(
    graph: dict,
    params: dict[str, np.ndarray],
    names: Iterable[str],
    config: PackConfig,
    dataset: Dataset,
    progress: Progress = None,
) -> dict[str, np.ndarray]:
    """The diagonal Fisher information of the tensors ``names`` on ``dataset``: the mean squared
    per-image gradient of the cross-entropy loss, estimated as ``E[g**2] / n`` with ``g`` the
    gradient of a batch's summed loss over its ``n`` images (one backward pass per batch)."""
    module = GraphModule(graph, params)
    weights = {name: module.get_buffer(module.slots[name]).requires_grad_() for name in names}
    totals = {name: torch.zeros_like(weight) for name, weight in weights.items()}
    preprocess = {"mean": list(config.mean), "std": list(config.std)}
    batches = 0
    for part, x in image_batches(dataset.images, preprocess, "cpu", FISHER_BATCH, progress):
        labels = torch.as_tensor(dataset.labels[part], dtype=torch.long)
        loss = F.cross_entropy(module(x), labels, reduction="sum")
        grads = torch.autograd.grad(loss, list(weights.values()))
        for name, grad in zip(weights, grads, strict=True):
            totals[name] += grad.square() / (part.stop - part.start)
        batches += 1
    return {name: total.numpy() / max(batches, 1) for name, total in totals.items()}


class Divergence:
    """How far encoded weights move the logits from the float model's on fixed images: the
    mean KL divergence of the softmax outputs (``divergence(choice)``, the weights not in
    ``choice`` float)."""

    def __init__(
        self, graph: dict, params: dict[str, np.ndarray], config: PackConfig, dataset: Dataset
    ) -> None:
        preprocess = {"mean": list(config.mean), "std": list(config.std)}
        self.graph, self.params = graph, params
        self.x = preprocess_images(dataset.images, preprocess, "cpu")
        self.reference = self._log_softmax(params)

    def _log_softmax(self, params: dict[str, np.ndarray]) -> torch.Tensor:
        with torch.no_grad():
            return GraphModule(self.graph, params)(self.x).log_softmax(1)

    def __call__(self, choice: Choice) -> float:
        decoded = dict(self.params)
        decoded.update({name: c.tensor.decode().astype(np.float32) for name, c in choice.items()})
        logits = self._log_softmax(decoded)
        return float(F.kl_div(logits, self.reference, log_target=True, reduction="batchmean"))


def probe_kl(
    options: dict[str, list[Candidate]], divergence: Divergence, progress: Progress = None
) -> dict[str, list[tuple[Candidate, float]]]:
    """Per weight, its candidates nearest each of PROBE_BITS (the least sparse of those) and
    the ``divergence`` when that weight alone is so encoded."""
    probes = {}
    for name, layer in options.items():
        nearest = [min(layer, key=lambda c: (abs(c.bits - b), c.sparsity)) for b in PROBE_BITS]
        probes[name] = [(probe, divergence({name: probe})) for probe in dict.fromkeys(nearest)]
        if progress:
            progress(len(divergence.x))
    return probes


def rescaled(layer: list[Candidate], probes: list[tuple[Candidate, float]]) -> list[Candidate]:
    """``layer``'s candidates with sensitivities mapped onto the measured KL of the probes: the
    diagonal Fisher gives the order across candidates, the measurements the scale (the
    diagonal misses how errors add up over a wide layer's inputs: 10-50x on the last layers of
    a MobileNet-v2) and, with two probes, the growth ``KL ~ S**p`` (errors add up faster than
    linearly at 2 bits); with one usable probe, ``p = 1``."""
    usable = [(c.sensitivity, kl) for c, kl in probes if c.sensitivity > 0 and kl > 0]
    if not usable:
        return layer
    (low, low_kl), (high, high_kl) = usable[0], usable[-1]
    power = 1.0
    if high != low:
        power = min(max(math.log(high_kl / low_kl) / math.log(high / low), 0.5), 3.0)
    return [replace(c, sensitivity=low_kl * (c.sensitivity / low) ** power) for c in layer]


def section_cost(name: str, tensor: Tensor) -> int:
    """The bytes ``tensor``'s section adds to a file: its encoded parts, in the layout the
    file stores (``smallest_layout``), padded to alignment."""
    _, body = encode_tensor(name, smallest_layout(tensor), 1)
    return -(-len(body) // DEFAULT_ALIGNMENT) * DEFAULT_ALIGNMENT


def encoded_candidates(
    name: str,
    weight: np.ndarray,
    fisher: np.ndarray | None,
    codings: Iterable[Coding],
    masks: Iterable[np.ndarray | None],
) -> list[Candidate]:
    """The weight encoded by each of ``codings`` under each keep-mask of ``masks``, those
    another beats included (``undominated`` drops them); without ``fisher``, the sensitivities
    are plain squared errors (a pruned weight's error is its whole value)."""
    found = []
    for coding, mask in itertools.product(codings, masks):
        tensor = quantize_weight(weight, coding, mask)
        error = 0.5 * weighted_error(weight, tensor, fisher)
        cost = section_cost(name, tensor)
        found.append(Candidate(coding.bits, tensor, cost, error, coding.max_code is not None))
    return found


def candidate_masks(weight: np.ndarray, floor: np.ndarray | None) -> list[np.ndarray | None]:
    """The keep-masks a layer's candidates may have: ``floor`` (what ``--prune`` removes, None:
    nothing) and one per CANDIDATE_SPARSITIES above it, each dropping the layer's smallest
    magnitudes after what ``floor`` drops (so they nest)."""
    kept = np.ones(weight.size, bool) if floor is None else floor.ravel()
    order = np.lexsort((np.abs(weight).ravel(), kept))  # pruned first, then by magnitude
    masks = [floor]
    for sparsity in CANDIDATE_SPARSITIES:
        drop = round(sparsity * weight.size)
        if drop > weight.size - np.count_nonzero(kept):
            keep = np.ones(weight.size, bool)
            keep[order[:drop]] = False
            masks.append(keep.reshape(weight.shape))
    return masks


def undominated(candidates: Iterable[Candidate]) -> list[Candidate]:
    """The candidates no other one is as cheap and as accurate as, cheapest first (so more
    bits that change nothing are never chosen)."""
    front: list[Candidate] = []
    for candidate in sorted(candidates, key=lambda c: (c.cost, c.sensitivity)):
        if not front or candidate.sensitivity < front[-1].sensitivity:
            front.append(candidate)
    return front


def knapsack(options: list[list[Candidate]], room: int, bucket: int) -> list[int] | None:
    """One candidate index per layer with the least summed sensitivity such that the costs,
    each rounded up to ``bucket`` bytes, add up to at most ``room`` (so the real costs do);
    None when no choice fits."""
    slots = room // bucket
    if slots < 0:
        return None
    best = np.zeros(slots + 1)  # best[c]: least sensitivity of the layers so far in c buckets
    picks = []
    for layer in options:
        table = np.full((len(layer), slots + 1), np.inf)
        for row, candidate in enumerate(layer):
            size = -(-candidate.cost // bucket)
            if size <= slots:
                table[row, size:] = best[: slots + 1 - size] + candidate.sensitivity
        pick = table.argmin(axis=0)
        best = table[pick, np.arange(slots + 1)]
        picks.append(pick)
    if not np.isfinite(best[slots]):
        return None
    chosen, left = [], slots
    for layer, pick in zip(reversed(options), reversed(picks), strict=True):
        chosen.append(int(pick[left]))
        left -= -(-layer[chosen[-1]].cost // bucket)
    return chosen[::-1]


def fit(
    options: dict[str, list[Candidate]],
    target: int,
    size_of: SizeOf,
    cheapest: Choice | None = None,
) -> Choice:
    """The least sensitive choice whose file, as ``size_of`` measures it, plus HEADROOM fits
    ``target`` bytes; MbzError naming the smallest reachable size when even the cheapest
    candidates (``cheapest``, by default the least costly of each layer) do not fit."""
    if cheapest is None:
        cheapest = {name: min(layer, key=lambda c: c.cost) for name, layer in options.items()}
    smallest = check_reachable(cheapest, target, size_of)
    names, layers = list(options), list(options.values())
    bucket = max(1, -(-sum(max(c.cost for c in layer) for layer in layers) // BUCKETS))
    room = target - HEADROOM - (smallest - sum(c.cost for c in cheapest.values()))
    for _ in range(MAX_ROUNDS):
        picks = knapsack(layers, room, bucket)
        if picks is None:
            break
        choice = {name: layer[i] for name, layer, i in zip(names, layers, picks, strict=True)}
        excess = size_of(choice) + HEADROOM - target
        if excess <= 0:
            return choice
        room -= excess
    return cheapest


def allocations(
    found: dict[str, list[Candidate]],
    floors: dict[str, float],
    target: int,
    size_of: SizeOf,
    fewest: Choice | None = None,
) -> list[Choice]:
    """The choices of ``found``'s candidates that fit ``target`` (the one with every candidate
    falls back to ``fewest``, a choice the caller found to fit): with every candidate, and
    without those that prune more than ``floors`` (each layer's sparsity from ``--prune``),
    without step-size codes, and without both, where those differ and fit. The sensitivities
    of heavy pruning and of a new family of codes are the least reliable estimates, so the
    caller measures each choice (``Divergence``) and keeps the nearest."""

    def dense(c: Candidate, name: str) -> bool:
        return c.sparsity <= floors[name] + 1e-9

    def whole(c: Candidate, name: str) -> bool:
        return not c.stepped

    def both(c: Candidate, name: str) -> bool:
        return dense(c, name) and whole(c, name)

    choices, seen = [], set()
    for index, keep in enumerate((lambda c, name: True, dense, whole, both)):
        subset = {name: [c for c in layer if keep(c, name)] for name, layer in found.items()}
        sizes = tuple(len(layer) for layer in subset.values())
        if sizes in seen or not all(sizes):
            continue
        seen.add(sizes)
        try:
            options = {n: undominated(layer) for n, layer in subset.items()}
            choices.append(fit(options, target, size_of, None if index else fewest))
        except BudgetError:
            pass  # only what was left out reaches the budget
    return choices


def check_reachable(choice: Choice, target: int, size_of: SizeOf) -> int:
    """The bytes of ``choice``'s file; BudgetError when it plus HEADROOM exceeds ``target``."""
    size = size_of(choice)
    if size + HEADROOM > target:
        # the size named must work when asked for: that command's metadata records another
        # target, and its compressed length may cross one more section alignment
        raise BudgetError(size + HEADROOM + DEFAULT_ALIGNMENT)
    return size


def candidate_bits(config: PackConfig, layer: LayerInfo) -> tuple[int, ...]:
    """The bit widths a layer may get: the one its ``--bits`` rule gives when a rule other
    than the defaults (conv=4,fc=4) selects it, else every one of CANDIDATE_BITS."""
    pins = {key: bits for key, bits in config.bits.items() if DEFAULT_BITS.get(key) != bits}
    pinned = bits_for(pins, layer, 0)
    return (pinned,) if pinned else CANDIDATE_BITS


def candidate_codings(
    config: PackConfig, bits: tuple[int, ...], gain: np.ndarray | None
) -> list[Coding]:
    """One coding per bit width of ``bits`` (``--method``'s), and unless ``--per-tensor``, the
    uniform step-size mode at each step of STEP_CODES whose stored width lies within ``bits``
    (fine rate steps between whole bits, ``mbz.quantize.step_quantize``)."""
    codings = [Coding.of(config, b) for b in bits]
    if not config.per_channel:
        return codings
    steps = [m for m in STEP_CODES if min(bits) <= step_bits(m) <= max(bits)]
    return codings + [
        replace(Coding.of(config, step_bits(m)), max_code=m, gain=gain) for m in steps
    ]


def choose(
    graph: dict,
    params: dict[str, np.ndarray],
    layers: dict[str, LayerInfo],
    config: PackConfig,
    masks: dict[str, np.ndarray],
    calibration: Dataset,
    target: int,
    size_of: SizeOf,
    gains: dict[str, np.ndarray],
    progress: Progress = None,
) -> Choice:
    """The encodings of the weights ``layers`` (weight tensor name -> its layer) that fit
    ``target`` bytes with the least summed sensitivity, measured on ``calibration``; ``masks``
    are what ``--prune`` removes (``candidate_masks`` may remove more); ``gains`` are the
    folded BatchNorm gains the step-size mode of uniform codes divides out."""
    widths = {name: candidate_bits(config, info) for name, info in layers.items()}
    kept = {name: candidate_masks(params[name], masks.get(name)) for name in layers}

    def candidates(
        name: str, fisher: np.ndarray | None, bits: tuple[int, ...], most_sparse: bool = False
    ) -> list[Candidate]:
        codings = candidate_codings(config, bits, gains.get(name))
        options = kept[name][-1:] if most_sparse else kept[name]
        return encoded_candidates(name, params[name], fisher, codings, options)

    # the fewest bits first: an impossible budget is refused before the sensitivity pass
    fewest = {
        name: min(candidates(name, None, (min(bits),), True), key=lambda c: c.cost)
        for name, bits in widths.items()
    }
    check_reachable(fewest, target, size_of)
    fisher = fisher_diagonal(graph, params, layers, config, calibration, progress)
    found = {name: candidates(name, fisher[name], bits) for name, bits in widths.items()}
    divergence = Divergence(graph, params, config, calibration.head(PROBE_IMAGES))
    probes = probe_kl(found, divergence, progress)
    scaled = {name: rescaled(found[name], kl) for name, kl in probes.items()}
    floors = {name: float(1.0 - masks[name].mean()) if name in masks else 0.0 for name in layers}
    judge = Divergence(graph, params, config, calibration)
    return min(allocations(scaled, floors, target, size_of, fewest), key=judge)


def check_written(path: Path, size: int, config: PackConfig, fp32_bytes: int) -> None:
    """MbzError, and no file at ``path``, when the ``size`` bytes written are over the budget:
    what was added after the choice (quantized activations' graph, fine-tuned index streams)
    cost more than the HEADROOM kept for it."""
    target = target_bytes(config, fp32_bytes)
    if target is None or size <= target:
        return
    path.unlink()
    raise MbzError(
        f"the file came out at {size:,} bytes, {size - target:,} over the budget of "
        f"{target:,}: what was added after the bits were chosen (quantized activations, "
        "fine-tuning) took more than the room kept for it; ask for a smaller size"
    )
