"""The pack configuration: a dataclass that round-trips through the .mbz metadata as JSON."""

from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field, fields

CONFIG_VERSION = 1
FLOAT_BITS = (16, 32)  # 32 keeps float32, 16 stores float16
VALID_BITS = (*range(1, 9), *FLOAT_BITS)
GROUPS = ("conv", "fc", "dw", "pw", "first")
METHODS = ("kmeans", "uniform")
PRUNE_MODES = ("channel", "weight")
# Which rule wins when several match a layer: a name glob beats ``first``, which beats the kind
# of convolution (``dw``/``pw``), which beats the layer family (``conv``/``fc``).
_PRECEDENCE = {"conv": 0, "fc": 0, "dw": 1, "pw": 1, "first": 2}
_GLOB_PRECEDENCE = 3


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


def parse_bits(text: str) -> dict[str, int]:
    """Parse ``conv=4,fc=2,features.18.*=8`` into an ordered {selector: bits} dict.

    Raises ValueError with a message that says what is accepted.
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
        rules[key] = bits
    if not rules:
        raise ValueError("no bits given: use for example conv=4,fc=2")
    return rules


def bits_for(rules: dict[str, int], layer: LayerInfo, default: int) -> int:
    """The bits the rules give ``layer``: the most specific matching rule, ``default`` if none."""
    best, best_rank = default, -1
    groups = layer.groups()
    for selector, bits in rules.items():
        if selector in GROUPS:
            rank = _PRECEDENCE[selector] if selector in groups else -1
        else:
            rank = _GLOB_PRECEDENCE if fnmatch.fnmatchcase(layer.name, selector) else -1
        if rank >= best_rank and rank >= 0:
            best, best_rank = bits, rank
    return best


@dataclass
class PackConfig:
    """Everything that decides the bytes of a .mbz file; stored in its metadata."""

    bits: dict[str, int] = field(default_factory=lambda: {"conv": 4, "fc": 4})
    method: str = "kmeans"
    prune: float = 0.0
    prune_mode: str = "channel"
    symmetric: bool = False
    per_channel: bool = True
    huffman: bool = False
    default_bits: int = 8
    mean: tuple[float, float, float] = (0.4914, 0.4822, 0.4465)
    std: tuple[float, float, float] = (0.2470, 0.2435, 0.2616)
    kmeans_iters: int = 30
    version: int = CONFIG_VERSION

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the first invalid field."""
        if self.method not in METHODS:
            raise ValueError(f"method '{self.method}': choose one of {', '.join(METHODS)}")
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

    def to_dict(self) -> dict:
        """JSON-ready dict (tuples as lists)."""
        out = asdict(self)
        out["mean"], out["std"] = list(self.mean), list(self.std)
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
