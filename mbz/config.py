"""The pack configuration: a dataclass that round-trips through the .mbz metadata as JSON."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from mbz.errors import MbzError

CONFIG_VERSION = 1
FLOAT_BITS = (16, 32)  # 32 keeps float32, 16 stores float16
VALID_BITS = (*range(1, 9), *FLOAT_BITS)
GROUPS = ("conv", "fc", "dw", "pw", "first")
DEFAULT_BITS = {"conv": 4, "fc": 4}  # what --bits rules overlay: every conv and linear layer
METHODS = ("kmeans", "uniform")
PRUNE_MODES = ("channel", "weight")
PRUNE_AUTO = "auto"  # --prune auto: the share follows from the byte budget (mbz.budget.auto_prune)
# Peak learning rate of each pruning run by --prune-mode, chosen on the held-out split of
# `mbz pack MODEL --prune 0.36 [--prune-mode weight] --bits conv=4,fc=2 --finetune-epochs 3
# --finetune-lr LR` (earlier README models, channels ranked by BatchNorm |gamma|). Channel
# slimming, held-out accuracy of the packed model at
# 0.005/0.01/0.02/0.04/0.08: tv 39.1/39.3/44.0/47.7/45.2%, mbz w1 43.0/43.2/45.2/47.4/46.7%.
# Gradual weight pruning on the folded graph (no BatchNorm left): tv 52.1% at 0.01, 22.4% at 0.04.
PRUNING_LR = {"channel": 0.04, "weight": 0.01}
# --codebook: which codebook --method kmeans fits
CODEBOOK_KINDS = ("auto", "scaled", "plain", "int")
# Activation points (SPEC.md section 7): the network input, every relu/relu6 output, every
# residual add output, every projection conv output that ends a block without a residual, and
# every other value a conv2d/linear reads (the pooled features before the classifier).
ACT_GROUPS = ("input", "relu", "add", "proj", "operand")
ACT_ALL = ("relu", "add", "proj")  # what a bare ``--act-bits N`` sets
# Points no rule selects that still take ACT_OPERAND_BITS once any point is quantized, so that
# every conv2d/linear reads codes and accumulates exactly (SPEC.md 7.1, 7.3).
ACT_OPERANDS = ("input", "operand")
ACT_OPERAND_BITS = 8
ACT_FLOAT = 32  # activation bits that keep a point in float32
VALID_ACT_BITS = (*range(1, 9), ACT_FLOAT)
CALIB_METHODS = ("min-max", "percentile", "mse")
# Which rule wins when several match a layer: a name glob beats ``first``, which beats the kind
# of convolution (``dw``/``pw``), which beats the layer family (``conv``/``fc``).
_PRECEDENCE = {"conv": 0, "fc": 0, "dw": 1, "pw": 1, "first": 2}
_ACT_PRECEDENCE = dict.fromkeys(ACT_GROUPS, 0)  # each point is in exactly one group
_GLOB_PRECEDENCE = 3
_LISTED_NAMES = 12  # how many layer or point names an error message lists
# Pack config fields that only matter with quantized activations; left out of the metadata
# without them, so that files packed without --act-bits stay byte-identical.
_ACT_FIELDS = ("act_bits", "calib", "calib_images", "calib_percentile")
# Fine-tuning fields (``--finetune-epochs`` > 0); left out of the metadata without fine-tuning.
_FINETUNE_FIELDS = (
    "finetune_epochs",
    "finetune_steps",
    "finetune_lr",
    "quantized_lr",
    "distill_weight",
    "temperature",
    "l1",
    "prune_steps",
    "val_fraction",
    "seed",
)
# Byte budget fields (``--target-ratio``/``--target-size``); left out of the metadata without one.
_BUDGET_FIELDS = ("target_ratio", "target_size")


@dataclass(frozen=True)
class LayerInfo:
    """What a bits rule can select on: the layer's name and kind."""

    name: str
    op: str  # "conv2d" or "linear"
    depthwise: bool = False
    pointwise: bool = False
    first: bool = False

    def groups(self) -> set[str]:
        """The ``--bits`` group names this layer belongs to."""
        found = {"conv" if self.op == "conv2d" else "fc"}
        if self.depthwise:
            found.add("dw")
        if self.pointwise:
            found.add("pw")
        if self.first:
            found.add("first")
        return found


@dataclass(frozen=True)
class ActPoint:
    """What an ``--act-bits`` rule can select on: the name of the node whose output is
    quantized (``input`` for the network input) and its group (one of ACT_GROUPS)."""

    name: str
    group: str

    def groups(self) -> set[str]:
        """The ``--act-bits`` group this point belongs to."""
        return {self.group}


class SelectorError(MbzError):
    """A ``--bits`` or ``--act-bits`` selector that names no group and matches nothing in the
    model; ``option`` is the flag it came from."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(message)
        self.option = option


def parse_bits(text: str) -> dict[str, int]:
    """Parse ``conv=4,fc=2,features.18.*=8`` into an ordered {selector: bits} dict.

    Raises ValueError with a message that says what is accepted (a selector given twice is an
    error).
    """
    rules: dict[str, int] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"'{item}' is not SELECTOR=BITS (for example conv=4 or fc=2)")
        try:
            bits = int(value)
        except ValueError:
            raise ValueError(f"'{value}' in '{item}' is not a number of bits") from None
        if bits not in VALID_BITS:
            raise ValueError(f"{bits} bits in '{item}': use 1 to 8, or 16/32 to keep floats")
        if key in rules:
            raise ValueError(f"'{key}' is given twice ({key}={rules[key]}, {item}): give it once")
        rules[key] = bits
    if not rules:
        raise ValueError("no bits given: use for example conv=4,fc=2")
    return rules


def weight_bits(value: str | Mapping[str, int]) -> dict[str, int]:
    """``--bits`` rules (text or a dict) overlaid on DEFAULT_BITS: a group the rules do not
    name keeps its default, so ``fc=2`` gives conv layers 4 bits and linear layers 2."""
    rules = parse_bits(value) if isinstance(value, str) else dict(value)
    return {**DEFAULT_BITS, **rules}


def activation_bits(value: str | int | Mapping[str, int] | None) -> dict[str, int]:
    """``--act-bits`` rules from text, a number (relu, add and proj points) or a dict; None or
    an empty dict keeps every activation float32. Points no rule selects stay float32."""
    if value is None:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    return parse_act_bits(str(value))


def parse_act_bits(text: str) -> dict[str, int]:
    """Parse ``--act-bits``: a bare ``8`` (relu, add and proj points), rules such as
    ``relu=4,add=8,input=8``, node-name globs, or a mix (``8,input=8``). 32 keeps float.

    Raises ValueError with a message that says what is accepted.
    """
    items = [part.strip() for part in text.split(",") if part.strip()]
    if not items:
        raise ValueError("no activation bits given: use for example 8, or relu=4,add=8")
    rules: dict[str, int] = {}
    bare = [item for item in items if "=" not in item]
    if len(bare) > 1:
        raise ValueError(f"several bare numbers ({', '.join(bare)}): give one, then GROUP=BITS")
    for item in bare:
        try:
            rules.update(dict.fromkeys(ACT_ALL, int(item)))
        except ValueError:
            raise ValueError(f"'{item}' is neither BITS nor GROUP=BITS (e.g. relu=4)") from None
    named = [item for item in items if "=" in item]
    if named:
        rules.update(parse_bits(",".join(named)))
    wrong = {key: bits for key, bits in rules.items() if bits not in VALID_ACT_BITS}
    if wrong:
        raise ValueError(f"activation bits {wrong}: use 1 to 8, or 32 to keep float activations")
    return rules


def check_selectors(
    rules: Mapping[str, int], groups: Iterable[str], names: list[str], option: str
) -> None:
    """SelectorError unless every selector of ``rules`` is one of ``groups`` or a name glob
    matching at least one of ``names`` (the model's layers or activation points)."""
    groups = tuple(groups)
    wrong = [
        key
        for key in rules
        if key not in groups and not any(fnmatch.fnmatchcase(name, key) for name in names)
    ]
    if not wrong:
        return
    listed = ", ".join(names[:_LISTED_NAMES])
    more = f", and {len(names) - _LISTED_NAMES} more" if len(names) > _LISTED_NAMES else ""
    raise SelectorError(
        f"{', '.join(repr(key) for key in wrong)} is neither a group nor a name in the model: "
        f"use a group ({', '.join(groups)}) or a name glob matching one of {listed}{more}",
        option,
    )


def bits_for(
    rules: dict[str, int],
    layer: LayerInfo | ActPoint,
    default: int,
    precedence: dict[str, int] = _PRECEDENCE,
) -> int:
    """The bits the rules give ``layer``: the most specific matching rule, ``default`` if none.

    ``precedence`` ranks the group selectors (name globs rank above them all)."""
    best, best_rank = default, -1
    groups = layer.groups()
    for selector, bits in rules.items():
        if selector in precedence:
            rank = precedence[selector] if selector in groups else -1
        else:
            rank = _GLOB_PRECEDENCE if fnmatch.fnmatchcase(layer.name, selector) else -1
        if rank >= best_rank and rank >= 0:
            best, best_rank = bits, rank
    return best


def act_bits_for(rules: dict[str, int], point: ActPoint, default: int = ACT_FLOAT) -> int:
    """The activation bits the rules give ``point``; ``default`` (float32 unless given) when
    none matches."""
    return bits_for(rules, point, default, _ACT_PRECEDENCE)


@dataclass
class PackConfig:
    """Everything that decides the bytes of a .mbz file; stored in its metadata."""

    bits: dict[str, int] = field(default_factory=lambda: dict(DEFAULT_BITS))
    method: str = "kmeans"
    prune: float = 0.0
    prune_mode: str = "channel"
    symmetric: bool = False
    per_channel: bool = True
    huffman: bool = True  # per index stream, Huffman when that is smaller (never larger)
    default_bits: int = 8
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
    kmeans_iters: int = 30
    # kmeans: scaled (SPEC 3.6), plain (3.3), int (3.7); auto: int when act_bits quantizes
    # activations, else the smaller error of scaled and plain
    codebook: str = "auto"
    bias_correction: bool = True  # with --data: restore channel means/spreads (mbz.correct)
    act_bits: dict[str, int] = field(default_factory=dict)  # empty: float activations
    calib: str = "mse"
    calib_images: int = 256
    calib_percentile: float = 99.99
    finetune_epochs: float = 0  # passes of the whole fine-tuning, fractions allowed; 0: none
    finetune_steps: int = 0  # optimizer steps of the whole fine-tuning instead; 0: none
    finetune_lr: float | None = None  # peak learning rate of each pruning run; None: by mode
    # peak learning rate of the run that trains the quantized model: with 0.01, 2-bit QAT of
    # the README's tv model fell from 36% to 16% held-out, with 0.003 it reached 42%
    # (mbz pack --method uniform --bits conv=2,fc=2 --finetune-epochs 3 --quantized-lr LR);
    # k-means QAT at 0.01 against 0.003: held-out +0.5 (tv) and -1.7 (w1) at conv=3,fc=3,
    # +6.2 (tv) and start kept (w1) at --prune 0.36 --bits conv=4,fc=2 (slimming at 0.01)
    quantized_lr: float = 0.003
    distill_weight: float = 0.7  # share of the loss that is KL to the float model's logits
    temperature: float = 4.0  # softening of both logits in the distillation loss
    l1: float = 1e-4  # L1 penalty on BatchNorm gammas while fine-tuning channel pruning
    prune_steps: int = 2  # rounds of channel pruning, each followed by fine-tuning
    val_fraction: float = 0.1  # share of the train split held out to pick the best epoch
    seed: int = 0  # the held-out split, shuffling and augmentation of fine-tuning
    target_ratio: float = 0.0  # bits per layer chosen so FP32 bytes / file bytes >= this; 0: none
    target_size: int = 0  # bits per layer chosen so the file has at most this many bytes; 0: none
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if self.method not in METHODS:
            raise ValueError(f"method '{self.method}': choose one of {', '.join(METHODS)}")
        if self.codebook not in CODEBOOK_KINDS:
            raise ValueError(f"codebook '{self.codebook}': choose {', '.join(CODEBOOK_KINDS)}")
        if self.prune_mode not in PRUNE_MODES:
            raise ValueError(f"prune mode '{self.prune_mode}': choose {' or '.join(PRUNE_MODES)}")
        if not 0.0 <= self.prune < 1.0:
            raise ValueError(f"prune fraction {self.prune} must be in [0, 1)")
        if self.default_bits not in VALID_BITS:
            raise ValueError(f"default bits {self.default_bits} must be 1-8, 16 or 32")
        if any(b not in VALID_BITS for b in self.bits.values()):
            raise ValueError(f"bits {self.bits}: every value must be 1-8, 16 or 32")
        if self.symmetric and self.method == "uniform" and 1 in self.bits.values():
            raise ValueError("symmetric uniform quantization needs at least 2 bits")
        if any(s <= 0 for s in self.std) or len(self.std) != 3 or len(self.mean) != 3:
            raise ValueError("mean and std need 3 values each, std > 0")
        self._validate_activations()
        self._validate_finetuning()
        self._validate_budget()

    def _validate_activations(self) -> None:
        if any(b not in VALID_ACT_BITS for b in self.act_bits.values()):
            raise ValueError(f"activation bits {self.act_bits}: every value must be 1-8 or 32")
        if self.calib not in CALIB_METHODS:
            choices = ", ".join(CALIB_METHODS)
            raise ValueError(f"calibration '{self.calib}': choose one of {choices}")
        if self.calib_images < 1:
            raise ValueError(f"calibration images {self.calib_images} must be at least 1")
        if not 50.0 < self.calib_percentile <= 100.0:
            raise ValueError(f"calibration percentile {self.calib_percentile} must be in (50, 100]")

    def _validate_finetuning(self) -> None:
        checks = {
            f"fine-tuning epochs {self.finetune_epochs} must be >= 0": self.finetune_epochs >= 0,
            f"fine-tuning steps {self.finetune_steps} must be >= 0": self.finetune_steps >= 0,
            "give fine-tuning epochs or steps, not both": not (
                self.finetune_epochs and self.finetune_steps
            ),
            f"distillation weight {self.distill_weight} must be in [0, 1]": (
                0 <= self.distill_weight <= 1
            ),
            f"temperature {self.temperature} must be > 0": self.temperature > 0,
            f"fine-tuning learning rate {self.finetune_lr} must be > 0": self.pruning_lr() > 0,
            f"quantized learning rate {self.quantized_lr} must be > 0": self.quantized_lr > 0,
            f"L1 penalty {self.l1} must be >= 0": self.l1 >= 0,
            f"prune steps {self.prune_steps} must be >= 1": self.prune_steps >= 1,
            f"held-out fraction {self.val_fraction} must be in (0, 1)": 0 < self.val_fraction < 1,
        }
        problems = [message for message, ok in checks.items() if not ok]
        if problems:
            raise ValueError("; ".join(problems))

    def _validate_budget(self) -> None:
        if self.target_ratio and self.target_size:
            raise ValueError("give a target ratio or a target size, not both")
        if self.target_ratio < 0 or (0 < self.target_ratio < 1):
            raise ValueError(f"target ratio {self.target_ratio} must be at least 1 (or 0: none)")
        if self.target_size < 0:
            raise ValueError(f"target size {self.target_size} must be >= 0 bytes (0: none)")

    @property
    def budgeted(self) -> bool:
        """Whether the bits per layer are chosen to fit a file size (``target_*`` given)."""
        return bool(self.target_ratio or self.target_size)

    @property
    def finetuning(self) -> bool:
        """Whether packing fine-tunes (``finetune_epochs`` or ``finetune_steps`` given)."""
        return bool(self.finetune_epochs or self.finetune_steps)

    def pruning_lr(self) -> float:
        """The peak learning rate of each pruning run: ``finetune_lr``, else the one chosen
        for ``prune_mode`` (``PRUNING_LR``)."""
        return self.finetune_lr if self.finetune_lr is not None else PRUNING_LR[self.prune_mode]

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples as lists); the activation fields only with ``act_bits``, the
        fine-tuning fields only when fine-tuning, the budget fields (and ``calib_images``, the
        images sensitivities were measured on) only with a budget."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
        if not self.act_bits:
            for key in _ACT_FIELDS:
                if key != "calib_images" or not self.budgeted:
                    del out[key]
        if not self.budgeted:
            for key in _BUDGET_FIELDS:
                del out[key]
        if not self.finetuning:
            for key in _FINETUNE_FIELDS:
                del out[key]
        return out

    @classmethod
    def from_dict(cls, data: dict) -> PackConfig:
        """Build from a dict, accepting only known keys (an allow-list)."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown pack config keys: {', '.join(unknown)}")
        values = dict(data)
        for key in ("mean", "std"):
            if key in values:
                values[key] = tuple(values[key])
        return cls(**values)


def config_from_options(**options: Any) -> PackConfig:
    """A PackConfig from options named like its fields (and ``mbz pack``'s flags): ``bits`` as
    text or a dict overlaid on DEFAULT_BITS, ``act_bits`` as text, a number or a dict, ``mean``
    and ``std`` as sequences. Raises ValueError naming an unknown option or an invalid value."""
    known = [f.name for f in fields(PackConfig) if f.name != "version"]
    unknown = sorted(set(options) - set(known))
    if unknown:
        raise ValueError(f"unknown pack option {', '.join(unknown)}: use {', '.join(known)}")
    values = dict(options)
    if "bits" in values:
        values["bits"] = weight_bits(values["bits"])
    if "act_bits" in values:
        values["act_bits"] = activation_bits(values["act_bits"])
    for key in ("mean", "std"):
        if key in values:
            values[key] = tuple(float(v) for v in values[key])
    return PackConfig(**values)
