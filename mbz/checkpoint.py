"""Loading the model to compress from a PyTorch file, and saving mbz's own checkpoints.

Accepted: TorchScript archives, state_dicts of a MobileNet-v2 in torchvision's layout (bare or
inside a checkpoint dict, DDP ``module.`` prefixes allowed) with the architecture named by the
caller (``arch``, an ``--arch`` choice of ``mbz.models.ARCHS``: the weights do not say which
strides they were trained with), mbz checkpoints (which record the architecture), and, only with
``trust_pickle``, whole pickled modules. Files are read with ``weights_only=True``
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
from typing import TypeGuard

import torch
from torch import nn

from mbz.errors import MbzError
from mbz.models import (
    ARCH_NAME,
    ArchConfig,
    arch_choices,
    arch_named,
    describe_mismatches,
    infer_arch,
    state_dict_mismatches,
)

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
_RUN_KEYS = ("recipe", "epoch", "history", "optimizer")  # what mbz train saves besides weights


@dataclass
class LoadedModel:
    """A model ready to compress: on the CPU, in eval mode, with facts about its source file."""

    module: nn.Module
    source_sha256: str  # of the file's bytes (of the weights, for a module given in memory)
    fp32_bytes: int  # 4 bytes per element of the parameters and floating-point buffers
    arch: ArchConfig | None  # None for TorchScript and whole modules (captured as they are)
    extra: dict = field(default_factory=dict)  # other plain checkpoint fields (epoch, accuracy)

    @classmethod
    def of(cls, module: nn.Module) -> LoadedModel:
        """A module given in memory, captured as it is (its training flags are left alone)."""
        digest = hashlib.sha256()
        for key, value in module.state_dict().items():
            digest.update(key.encode())
            digest.update(value.detach().cpu().contiguous().numpy().tobytes())
        return cls(module, digest.hexdigest(), _fp32_bytes(module), None)


@dataclass
class SavedRun:
    """A training run saved by ``mbz train``, to be resumed."""

    loaded: LoadedModel
    arch: ArchConfig  # loaded.arch, which a run always has
    recipe: dict  # mbz.training.Recipe.to_dict()
    epoch: int
    history: list[dict]
    optimizer: dict  # the optimizer's state_dict


def load_model(
    path: str | Path, trust_pickle: bool = False, arch: str | None = None
) -> LoadedModel:
    """Load the model in ``path`` (see the module docstring for the accepted files).

    Without ``trust_pickle`` a file holding pickled Python objects other than tensors (such as
    a whole ``nn.Module``) is refused, since loading it would run code from the file. ``arch``
    names the network of a state_dict that does not record it (``cifar`` or ``torchvision``,
    the keys of ``mbz.models.ARCHS``).
    """
    return _open(Path(path), trust_pickle, arch)[0]


def load_run(path: str | Path) -> SavedRun:
    """The run saved in ``path`` by ``mbz train`` (weights, architecture, recipe, epoch,
    history, optimizer state), read once; MbzError if another program wrote the file."""
    loaded, saved = _open(Path(path), False, None)
    arch = loaded.arch
    if arch is None or not isinstance(saved, Mapping) or not set(_RUN_KEYS) <= set(saved):
        raise MbzError(
            f"{path} was not written by mbz train (it lacks the architecture, recipe, epoch, "
            "history or optimizer state); start a new run without --resume"
        )
    return SavedRun(loaded, arch, *(saved[key] for key in _RUN_KEYS))


def _open(path: Path, trust_pickle: bool, arch: str | None) -> tuple[LoadedModel, object]:
    """The model in ``path`` and the object ``torch.load`` gave (None for TorchScript)."""
    arch = arch if arch is None else arch_named(arch)
    if not path.is_file():
        raise MbzError(
            f"model file {path} not found (or not a file); pass a file written by torch.save "
            "or torch.jit.save"
        )
    data = path.read_bytes()
    obj: object = None
    extra: dict
    if _is_torchscript(data):
        _no_arch_for_modules(arch, path)
        module, recorded, extra = _load_torchscript(path, data), None, {}
    else:
        obj = _load_torch(path, data, trust_pickle)
        module, recorded, extra = _resolve(path, obj, arch)
    module.eval()
    digest = hashlib.sha256(data).hexdigest()
    return LoadedModel(module, digest, _fp32_bytes(module), recorded, extra), obj


def _no_arch_for_modules(arch: str | None, where: object) -> None:
    """MbzError when an architecture is named for a whole module (which needs none)."""
    if arch is not None:
        raise MbzError(
            f"--arch names the network of a state_dict, but {where} holds a whole module, "
            "which is captured as it is: drop --arch"
        )


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
    except (ModuleNotFoundError, AttributeError) as exc:  # trusted pickle of a class not found
        raise _missing_class(path, exc) from exc
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


def _missing_class(path: Path, exc: ModuleNotFoundError | AttributeError) -> MbzError:
    """The error for a pickled module whose class cannot be imported here."""
    if isinstance(exc, ModuleNotFoundError):
        what = f"needs the Python module {exc.name!r}, which cannot be imported here"
        fix = f"make {exc.name!r} importable (add the folder holding it to PYTHONPATH)"
    else:
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        what = f"needs a class that cannot be found here ({reason})"
        fix = (
            "make its module importable (a class defined in the script that saved the model, "
            "__main__, must move to a module on PYTHONPATH)"
        )
    return MbzError(
        f"{path} holds a pickled module that {what}; {fix}, or save model.state_dict() (a "
        "MobileNet-v2, packed with --arch), or pack the module from Python with mbz.pack(model)"
    )


def _unreadable(path: Path, data: bytes, exc: Exception) -> MbzError:
    """The error for a file torch cannot load; torch's reason only if torch wrote the file."""
    reason = "it was not written by torch.save or torch.jit.save"
    if data.startswith((_ZIP_MAGIC, _LEGACY_MAGIC)):
        reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return MbzError(
        f"could not read {path} as a PyTorch checkpoint: {reason}; pass a file written by "
        "torch.save (a state_dict or checkpoint dict) or torch.jit.save"
    )


def _is_state_dict(value: object) -> TypeGuard[Mapping[str, torch.Tensor]]:
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


def _resolve(
    path: Path, obj: object, arch_name: str | None
) -> tuple[nn.Module, ArchConfig | None, dict]:
    """The module, architecture and extra fields held by a loaded file's object."""
    if isinstance(obj, nn.Module):
        _no_arch_for_modules(arch_name, path)
        return obj, None, {}
    if _is_state_dict(obj):
        module, arch = _build(path, obj, None, arch_name)
        return module, arch, {}
    if not isinstance(obj, Mapping):
        raise MbzError(f"{path} holds a {type(obj).__name__}; {_EXPECTED}")
    key = next((k for k in STATE_DICT_KEYS if _is_state_dict(obj.get(k))), None)
    key = key or next((k for k in STATE_DICT_KEYS if isinstance(obj.get(k), nn.Module)), None)
    if key is None:
        raise MbzError(f"{path} holds a dict with keys {_listed(obj)}; {_EXPECTED}")
    extra = {k: v for k, v in obj.items() if k not in (key, "arch") and _is_plain(v)}
    if isinstance(obj[key], nn.Module):
        _no_arch_for_modules(arch_name, path)
        return obj[key], None, extra
    recorded = ArchConfig.from_dict(obj["arch"]) if "arch" in obj else None
    if recorded is not None and arch_name not in (None, recorded.name):
        raise MbzError(
            f"{path} records the architecture {recorded.name!r}, not {arch_name!r}: drop "
            "--arch, which is for state_dicts that record none"
        )
    module, arch = _build(path, obj[key], recorded, arch_name)
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
    path: Path,
    state_dict: Mapping[str, torch.Tensor],
    arch: ArchConfig | None,
    arch_name: str | None,
) -> tuple[nn.Module, ArchConfig]:
    """The recorded architecture (or the named one, its width and classes read from the
    weights) with the weights; MbzError when neither says which network the weights are."""
    weights = _strip_ddp(state_dict)
    if arch is None:
        arch = infer_arch(weights, arch_name or ARCH_NAME)  # refuses other layouts
        if arch_name is None:
            raise MbzError(_unnamed(path, arch))
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


def _unnamed(path: Path, found: ArchConfig) -> str:
    """Why a state_dict without a recorded architecture needs ``--arch``."""
    return (
        f"{path} holds a MobileNet-v2 state_dict (width {found.width_mult:g}, "
        f"{found.num_classes} classes) that does not record its network, and the weights do "
        f"not say which strides it was trained with: pass --arch {arch_choices()}. "
        "Checkpoints written by mbz train record it and need no --arch"
    )
