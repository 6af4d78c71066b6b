"""CIFAR-10 style image sets: from an .npz, a ``cifar-10-batches-py`` folder, or torchvision.

Every source comes out as uint8 NHWC images with int64 labels, checked on the way in so that a
malformed file gives an MbzError that says what was expected instead of a shape error later.
"""

from __future__ import annotations

import os
import pickle
import tarfile
import zipfile
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import ClassVar

import numpy as np

from mbz.errors import MbzError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)

IMAGE_SHAPE = (3, 32, 32)  # [C, H, W] of CIFAR-10 images, what mbz's networks are made for
SPLITS = ("train", "test")
BATCHES_FOLDER = "cifar-10-batches-py"
_BATCH_FILES = {"train": tuple(f"data_batch_{i}" for i in range(1, 6)), "test": ("test_batch",)}
_PIXELS = 3 * 32 * 32  # one row of a python batch's b"data"
_IMAGE_SHAPES = "[N, 32, 32, 3] or [N, 3, 32, 32]"
_SOURCES = "an .npz file with x_test/y_test, a cifar-10-batches-py folder, or 'cifar10'"
_READ_ERRORS = (OSError, ValueError, EOFError, zipfile.BadZipFile, zlib.error)


@dataclass
class Dataset:
    """Labelled images: uint8 NHWC ``images`` [N, H, W, 3] and int64 ``labels`` [N]."""

    images: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]
    source: str  # human-readable origin, e.g. "cifar10-fragment.npz:test"

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def head(self, n: int) -> Dataset:
        """The first ``n`` images (all of them when there are fewer)."""
        if n < 0:
            raise ValueError(f"head() needs n >= 0, got {n}")
        return replace(self, images=self.images[:n], labels=self.labels[:n])


def check_image_shape(dataset: Dataset, input_shape: Sequence[int], model: str) -> None:
    """MbzError, in one line, unless ``dataset``'s images have the height, width and channels
    of ``input_shape`` ([C, H, W], what ``model`` takes); mbz never resizes images."""
    shaped = isinstance(input_shape, list | tuple) and len(input_shape) == 3
    if not shaped or not all(type(n) is int for n in input_shape):
        raise MbzError(f"{model}: its input shape {input_shape!r} is not [channels, height, width]")
    channels, height, width = input_shape
    got_height, got_width, got_channels = dataset.images.shape[1:]
    if (got_height, got_width, got_channels) != (height, width, channels):
        raise MbzError(
            f"{dataset.source} has {got_height}x{got_width} images with {got_channels} channels, "
            f"but {model} takes {height}x{width} images with {channels}: resize the images "
            "(mbz does not)"
        )


def load_split(source: str, split: str, data_root: str | None = None) -> Dataset:
    """The ``split`` ("train" or "test") of ``source``.

    ``source`` is a path to an .npz (``x_<split>``/``y_<split>``, optional ``classes``), a path
    to a ``cifar-10-batches-py`` folder (or a folder holding one), or ``cifar10``: torchvision's
    CIFAR-10 under ``data_root`` (default ``$MBZ_DATA_DIR`` or ``~/.cache/mbz/cifar10``),
    downloaded there when it is not present yet. The batches of a ``cifar-10-batches-py`` folder
    are pickles (the official format), trusted as the user's own copy of the dataset.
    """
    if split not in SPLITS:
        raise MbzError(f"unknown split {split!r}: use 'train' or 'test'")
    if source == "cifar10":
        return _load_cifar10(split, data_root)
    path = Path(source).expanduser()
    if path.is_dir():
        return _load_batches(_batches_folder_in(path), split)
    if path.is_file():
        return _load_npz(path, split)
    raise MbzError(f"data source {source!r} not found: pass {_SOURCES}")


def _checked_images(where: str, name: str, array: np.ndarray) -> np.ndarray:
    """uint8 NHWC images from NHWC or NCHW (3 channels, any height and width)."""
    nhwc = array.ndim == 4 and array.shape[3] == 3
    nchw = array.ndim == 4 and array.shape[1] == 3
    if array.dtype != np.uint8 or not (nhwc or nchw):
        raise MbzError(
            f"{where}: {name} must be uint8 images of shape {_IMAGE_SHAPES}, "
            f"got {array.dtype} {list(array.shape)}"
        )
    if array.size == 0:
        raise MbzError(f"{where}: {name} holds no images ({list(array.shape)}); give at least one")
    return np.ascontiguousarray(array if nhwc else array.transpose(0, 2, 3, 1))


def _checked_labels(
    where: str, name: str, array: np.ndarray, count: int, classes: tuple[str, ...]
) -> np.ndarray:
    """int64 labels, one per image, each a valid class index."""
    if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
        raise MbzError(
            f"{where}: {name} must be a 1-D array of integer class indices, "
            f"got {array.dtype} {list(array.shape)}"
        )
    if array.shape[0] != count:
        raise MbzError(
            f"{where}: {name} has {array.shape[0]} labels for {count} images; "
            "give exactly one label per image"
        )
    low, high = int(array.min()), int(array.max())
    if low < 0 or high >= len(classes):
        raise MbzError(
            f"{where}: {name} holds labels {low}..{high}, but there are {len(classes)} classes "
            f"(labels 0..{len(classes) - 1})"
        )
    return array.astype(np.int64)


def _dataset(
    where: str,
    names: tuple[str, str],
    images: np.ndarray,
    labels: np.ndarray,
    classes: tuple[str, ...],
    source: str,
) -> Dataset:
    """A checked Dataset; ``names`` are what the images and labels are called in messages."""
    images = _checked_images(where, names[0], images)
    labels = _checked_labels(where, names[1], labels, images.shape[0], classes)
    return Dataset(images, labels, classes, source)


def _load_npz(path: Path, split: str) -> Dataset:
    """``x_<split>``/``y_<split>`` (and optional ``classes``) of an .npz archive."""
    names = (f"x_{split}", f"y_{split}")
    arrays = _read_npz(path, names)
    classes = _npz_classes(path, arrays.get("classes"))
    images, labels = (arrays[n] for n in names)
    return _dataset(str(path), names, images, labels, classes, f"{path.name}:{split}")


def load_unlabelled(source: str, split: str) -> tuple[np.ndarray, tuple[str, ...], str] | None:
    """(images, class names, source name) of ``x_<split>`` when ``source`` is an .npz that has
    it but no ``y_<split>`` (unlabelled images, e.g. for distillation); None otherwise."""
    path = Path(source).expanduser()
    if not path.is_file() or not zipfile.is_zipfile(path):
        return None
    with _open_npz(path) as archive:
        if f"x_{split}" not in archive.files or f"y_{split}" in archive.files:
            return None
    arrays = _read_npz(path, (f"x_{split}",))
    images = _checked_images(str(path), f"x_{split}", arrays[f"x_{split}"])
    return images, _npz_classes(path, arrays.get("classes")), f"{path.name}:{split}"


def _read_npz(path: Path, required: tuple[str, ...]) -> dict[str, np.ndarray]:
    """The ``required`` arrays of an .npz archive, plus ``classes`` when it has one."""
    with _open_npz(path) as archive:
        missing = [name for name in required if name not in archive.files]
        if missing:
            raise MbzError(
                f"{path} has no {', '.join(missing)} (it holds: {', '.join(archive.files) or '-'})"
                f"; an .npz source needs {' and '.join(required)} (images and labels)"
            )
        wanted = [*required, *(["classes"] if "classes" in archive.files else [])]
        return {name: _read_member(path, archive, name) for name in wanted}


def _open_npz(path: Path) -> np.lib.npyio.NpzFile:
    """The archive, opened without unpickling anything."""
    not_npz = (
        f"{path} is not an intact .npz archive (a zip of arrays as np.savez writes); "
        f"pass {_SOURCES}"
    )
    if not zipfile.is_zipfile(path):
        raise MbzError(not_npz)
    try:
        archive = np.load(path, allow_pickle=False)
    except _READ_ERRORS as exc:
        raise MbzError(f"could not read {path} as an .npz archive: {exc}") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise MbzError(not_npz)
    return archive


def _read_member(path: Path, archive: np.lib.npyio.NpzFile, name: str) -> np.ndarray:
    try:
        return archive[name]
    except _READ_ERRORS as exc:
        raise MbzError(
            f"could not read array {name} of {path}: {exc}; arrays must be plain numeric "
            "or string arrays (no pickled objects) in an intact .npz"
        ) from exc


def _npz_classes(path: Path, array: np.ndarray | None) -> tuple[str, ...]:
    """The archive's class names, or CIFAR-10's when it has none."""
    if array is None:
        return CIFAR10_CLASSES
    if array.ndim != 1 or array.size == 0 or array.dtype.kind not in "US":
        raise MbzError(
            f"{path}: classes must be a non-empty 1-D array of strings, "
            f"got {array.dtype} {list(array.shape)}"
        )
    return tuple(c.decode() if isinstance(c, bytes) else str(c) for c in array.tolist())


def _batches_folder_in(path: Path) -> Path:
    """``path`` itself or its ``cifar-10-batches-py`` subfolder, whichever holds the batches."""
    inner = path / BATCHES_FOLDER
    if inner.is_dir():
        return inner
    names = [name for files in _BATCH_FILES.values() for name in files]
    if path.name == BATCHES_FOLDER or any((path / name).is_file() for name in names):
        return path
    raise MbzError(
        f"{path} is a folder without CIFAR-10 python batches: expected data_batch_1..5 and "
        f"test_batch in it or in a {BATCHES_FOLDER} subfolder; else pass {_SOURCES}"
    )


def _load_batches(folder: Path, split: str) -> Dataset:
    """The python-pickle batches of the official CIFAR-10 release (``cifar-10-batches-py``).

    The batches are pickles, and unpickling can run code: the folder is trusted as the user's
    own copy of the dataset, like torchvision trusts it.
    """
    files = [folder / name for name in _BATCH_FILES[split]]
    missing = [file.name for file in files if not file.is_file()]
    if missing:
        raise MbzError(
            f"{folder} lacks {', '.join(missing)}: the {split} split of a {BATCHES_FOLDER} "
            f"folder needs {', '.join(_BATCH_FILES[split])}"
        )
    batches = [_read_batch(file) for file in files]
    images = np.concatenate([images for images, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    names = (f"{split} batch data", f"{split} batch labels")
    return _dataset(str(folder), names, images, labels, CIFAR10_CLASSES, f"{folder.name}:{split}")


class _BatchUnpickler(pickle.Unpickler):
    """Unpickles only what CIFAR-10 batch files hold (dicts, lists, numpy arrays): any other
    global, such as a function a crafted file would call, is refused instead of imported."""

    ALLOWED: ClassVar[set[tuple[str, str]]] = {
        ("_codecs", "encode"),  # how protocol-2 pickles written by Python 3 spell bytes
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.multiarray", "scalar"),
        ("numpy._core.multiarray", "scalar"),
    }

    def find_class(self, module: str, name: str) -> object:
        if (module, name) not in self.ALLOWED:
            raise pickle.UnpicklingError(f"refused to load {module}.{name}: not CIFAR-10 data")
        return super().find_class(module, name)


def _read_batch(file: Path) -> tuple[np.ndarray, np.ndarray]:
    """NCHW images and labels of one batch file (a pickled dict with b"data" and b"labels")."""
    try:
        with file.open("rb") as handle:
            entry = _BatchUnpickler(handle, encoding="bytes").load()
    except Exception as exc:  # unpickling a damaged file can fail with almost any exception
        raise MbzError(f"could not read {file} as a CIFAR-10 python batch: {exc!r}") from exc
    data, labels = (_batch_field(entry, key) for key in ("data", "labels"))
    if data is None or labels is None:
        raise MbzError(f"{file} is not a CIFAR-10 python batch: expected a dict with data, labels")
    data = np.asarray(data)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != _PIXELS:
        raise MbzError(
            f"{file}: data must be uint8 rows of {_PIXELS} pixels ([N, {_PIXELS}]), "
            f"got {data.dtype} {list(data.shape)}"
        )
    return data.reshape(-1, 3, 32, 32), np.asarray(labels)


def _batch_field(entry: object, key: str) -> object | None:
    """``entry[b"key"]`` (the official files) or ``entry["key"]`` (batches re-pickled in py3)."""
    if not isinstance(entry, dict):
        return None
    return entry.get(key.encode(), entry.get(key))


def _default_root() -> Path:
    """Where ``cifar10`` lives without ``--data-root``: ``$MBZ_DATA_DIR`` or mbz's cache."""
    configured = os.environ.get("MBZ_DATA_DIR")
    return Path(configured) if configured else Path.home() / ".cache" / "mbz" / "cifar10"


def _load_cifar10(split: str, data_root: str | None) -> Dataset:
    """CIFAR-10 from a local ``cifar-10-batches-py`` under the root, else torchvision's download."""
    root = (Path(data_root) if data_root else _default_root()).expanduser()
    local = root if root.name == BATCHES_FOLDER else root / BATCHES_FOLDER
    if all((local / name).is_file() for name in _BATCH_FILES[split]):
        return replace(_load_batches(local, split), source=f"cifar10:{split}")
    return _download_cifar10(root, split)


def _download_cifar10(root: Path, split: str) -> Dataset:
    """torchvision's CIFAR-10 split, downloaded into ``root`` first."""
    from torchvision.datasets import CIFAR10  # slow import, needed only here

    try:
        dataset = CIFAR10(root=str(root), train=split == "train", download=True)
    except (OSError, RuntimeError, EOFError, tarfile.TarError) as exc:
        raise MbzError(
            f"downloading CIFAR-10 into {root} failed ({exc}); pass --data-root pointing at an "
            f"existing {BATCHES_FOLDER} folder (or the folder holding it), or --data with a "
            f"{BATCHES_FOLDER} folder or an .npz file"
        ) from exc
    names = ("torchvision CIFAR10.data", "torchvision CIFAR10.targets")
    images, labels = np.asarray(dataset.data), np.asarray(dataset.targets)
    return _dataset(str(root), names, images, labels, tuple(dataset.classes), f"cifar10:{split}")
