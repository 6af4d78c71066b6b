"""Loading the model to compress from a PyTorch file, and saving mbz's own checkpoints.

Accepted: TorchScript archives, state_dicts of mbz's MobileNet-v2 (bare or inside a checkpoint
dict, DDP ``module.`` prefixes allowed), mbz checkpoints (which record the architecture), and,
only with ``trust_pickle``, whole pickled modules. Files are read with ``weights_only=True``
unless the user trusts them, because unpickling anything else can run code from the file.
"""

from __future__ import annotations

import hashlib
import io
import pickle
import warnings
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from mbz.errors import MbzError
from mbz.models import ArchConfig, describe_mismatches, infer_arch, state_dict_mismatches

STATE_DICT_KEYS = ("state_dict", "model", "net", "model_state_dict")
_EXPECTED = (
    "expected a state_dict, or a checkpoint dict holding one under "
    f"{', '.join(repr(k) for k in STATE_DICT_KEYS)}"
)
_DDP_PREFIX = "module."
_LISTED_KEYS = 8
_ZIP_MAGIC = b"PK\x03\x04"
# What torch.save's legacy (non-zip) format starts with: its magic number, pickled (protocol 2).
_LEGACY_MAGIC = b"\x80\x02\x8a\x0a\x6c\xfc\x9c\x46\xf9\x20\x6a\xa8\x50\x19"


@dataclass
class LoadedModel:
    """A model ready to compress: on the CPU, in eval mode, with facts about its source file."""

    module: nn.Module
    source_sha256: str  # of the file's bytes
    fp32_bytes: int  # 4 bytes per element of the parameters and floating-point buffers
    arch: ArchConfig | None  # None for TorchScript and whole pickled modules
    extra: dict = field(default_factory=dict)  # other plain checkpoint fields (epoch, accuracy)


def load_model(path: str | Path, trust_pickle: bool = False) -> LoadedModel:
    """Load the model in ``path`` (see the module docstring for the accepted files).

    Without ``trust_pickle`` a file holding pickled Python objects other than tensors (such as
    a whole ``nn.Module``) is refused, since loading it would run code from the file.
    """
    path = Path(path)
    if not path.is_file():
        raise MbzError(
            f"model file {path} not found (or not a file); pass a file written by torch.save "
            "or torch.jit.save"
        )
    data = path.read_bytes()
    if _is_torchscript(data):
        module, arch, extra = _load_torchscript(path, data), None, {}
    else:
        module, arch, extra = _resolve(path, _load_torch(path, data, trust_pickle))
    module.eval()
    return LoadedModel(module, hashlib.sha256(data).hexdigest(), _fp32_bytes(module), arch, extra)


def save_checkpoint(path: str | Path, module: nn.Module, arch: ArchConfig, **extra: object) -> None:
    """Write ``module``'s weights (as CPU tensors) with its architecture, loadable by
    ``load_model``.

    ``extra`` fields (epoch, accuracy, ...) must be plain ints, floats, strs, lists and dicts,
    or tensors and dicts of them (such as an optimizer's state_dict), so that the file stays
    loadable with ``weights_only=True``; ``load_model`` keeps the plain ones in ``extra``.
    """
    if "state_dict" in extra:
        raise ValueError("'state_dict' is reserved for the module's weights")
    weights = {key: value.cpu() for key, value in module.state_dict().items()}
    torch.save({"state_dict": weights, "arch": arch.to_dict(), **extra}, path)


def _fp32_bytes(module: nn.Module) -> int:
    """Size of the model as float32: parameters and floating-point buffers, 4 bytes each."""
    buffers = (b for b in module.buffers() if b.is_floating_point())
    return 4 * (sum(p.numel() for p in module.parameters()) + sum(b.numel() for b in buffers))


def _zip_names(data: bytes) -> list[str]:
    """Entry names when ``data`` is a zip archive, else an empty list."""
    buffer = io.BytesIO(data)
    if not zipfile.is_zipfile(buffer):
        return []
    try:
        with zipfile.ZipFile(buffer) as archive:
            return archive.namelist()
    except zipfile.BadZipFile:
        return []


def _is_torchscript(data: bytes) -> bool:
    """A TorchScript archive: a zip with ``constants.pkl`` or a ``code/`` folder."""
    return any(n.endswith("constants.pkl") or "/code/" in n for n in _zip_names(data))


def _is_torch_save_file(data: bytes) -> bool:
    """Written by ``torch.save`` (zip with ``data.pkl``, or the legacy format's magic number)."""
    return data.startswith(_LEGACY_MAGIC) or any(n.endswith("data.pkl") for n in _zip_names(data))


def _load_torchscript(path: Path, data: bytes) -> nn.Module:
    try:
        with warnings.catch_warnings():  # torch.jit's deprecation notice is not for our user
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(io.BytesIO(data), map_location="cpu")
    except Exception as exc:  # torch reports a damaged archive with assorted exception types
        raise MbzError(f"could not read {path} as a TorchScript archive: {exc}") from exc


def _load_torch(path: Path, data: bytes, trust_pickle: bool) -> object:
    """What ``torch.load`` gives: weights only, or anything when the user trusts the file."""
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as exc:
        if trust_pickle or not _is_torch_save_file(data):
            raise _unreadable(path, data, exc) from exc
        raise MbzError(
            f"{path} holds pickled Python objects besides tensors (such as a whole module saved "
            "with torch.save(model)), and loading them runs code from the file. If you trust "
            "the file, re-run with --trust-pickle; else save model.state_dict() instead"
        ) from exc
    except Exception as exc:  # torch.load reports a foreign or damaged file many ways
        raise _unreadable(path, data, exc) from exc


def _unreadable(path: Path, data: bytes, exc: Exception) -> MbzError:
    """The error for a file torch cannot load; torch's reason only if torch wrote the file."""
    reason = "it was not written by torch.save or torch.jit.save"
    if data.startswith((_ZIP_MAGIC, _LEGACY_MAGIC)):
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return MbzError(
        f"could not read {path} as a PyTorch checkpoint: {reason}; pass a file written by "
        "torch.save (a state_dict or checkpoint dict) or torch.jit.save"
    )


def _is_state_dict(value: object) -> bool:
    return (
        isinstance(value, Mapping)
        and len(value) > 0
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())
    )


def _is_plain(value: object) -> bool:
    """JSON-like data (what ``extra`` keeps; optimizer states and tensors are left out)."""
    if isinstance(value, list | tuple):
        return all(_is_plain(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _is_plain(v) for k, v in value.items())
    return value is None or isinstance(value, bool | int | float | str)


def _resolve(path: Path, obj: object) -> tuple[nn.Module, ArchConfig | None, dict]:
    """The module, architecture and extra fields held by a loaded file's object."""
    if isinstance(obj, nn.Module):
        return obj, None, {}
    if _is_state_dict(obj):
        module, arch = _build(path, obj, None)
        return module, arch, {}
    if not isinstance(obj, Mapping):
        raise MbzError(f"{path} holds a {type(obj).__name__}; {_EXPECTED}")
    key = next((k for k in STATE_DICT_KEYS if _is_state_dict(obj.get(k))), None)
    key = key or next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), nn.Module)), None)
    if key is None:
        raise MbzError(f"{path} holds a dict with keys {_listed(obj)}; {_EXPECTED}")
    extra = {k: v for k, v in obj.items() if k not in (key, "arch") and _is_plain(v)}
    if isinstance(obj[key], nn.Module):
        return obj[key], None, extra
    arch = ArchConfig.from_dict(obj["arch"]) if "arch" in obj else None
    module, arch = _build(path, obj[key], arch)
    return module, arch, extra


def _listed(mapping: Mapping) -> str:
    """The first few keys of ``mapping``, for messages."""
    keys = ", ".join(repr(k) for k in list(mapping)[:_LISTED_KEYS]) or "(none)"
    return keys + (", ..." if len(mapping) > _LISTED_KEYS else "")


def _strip_ddp(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Keys without DistributedDataParallel's ``module.`` prefix, when every key has it."""
    if all(k.startswith(_DDP_PREFIX) for k in state_dict):
        return {k[len(_DDP_PREFIX) :]: v for k, v in state_dict.items()}
    return dict(state_dict)


def _build(
    path: Path, state_dict: Mapping[str, torch.Tensor], arch: ArchConfig | None
) -> tuple[nn.Module, ArchConfig]:
    """mbz's MobileNet-v2 of the recorded (or recognised) architecture, with the weights."""
    weights = _strip_ddp(state_dict)
    arch = arch or infer_arch(weights)
    module = arch.build()
    problems = state_dict_mismatches(module, weights)
    if problems:
        raise MbzError(
            f"{path}: the weights do not fit the architecture it records (width "
            f"{arch.width_mult:g}, {arch.num_classes} classes): {describe_mismatches(problems)}"
        )
    # Keys and shapes are checked above; strict=False only lets missing BN counters through.
    module.load_state_dict(weights, strict=False)
    return module, arch
