"""Loading image sets: .npz archives, cifar-10-batches-py folders, torchvision's CIFAR-10."""

import pickle
import urllib.error
from pathlib import Path

import numpy as np
import pytest
import torchvision.datasets

from mbz.data import CIFAR10_CLASSES, IMAGE_SHAPE, Dataset, check_image_shape, load_split
from mbz.errors import MbzError

FRAGMENT = Path(__file__).resolve().parents[2] / "shared/data/cifar10-fragment.npz"


def images(n: int, seed: int = 0, shape: tuple[int, ...] = (32, 32, 3)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def labels(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 10, n).astype(np.uint8)


def write_npz(path: Path, **arrays: np.ndarray) -> str:
    np.savez(path, **arrays)
    return str(path)


def write_batches(folder: Path, sizes: dict[str, int]) -> dict[str, tuple[np.ndarray, list]]:
    """A fake cifar-10-batches-py folder: pickled dicts with b"data" [N, 3072] and b"labels"."""
    folder.mkdir(parents=True)
    written = {}
    for seed, (name, n) in enumerate(sizes.items()):
        nchw = images(n, seed, (3, 32, 32))
        entry = {b"data": nchw.reshape(n, -1), b"labels": labels(n, seed).tolist()}
        (folder / name).write_bytes(pickle.dumps(entry, protocol=2))
        written[name] = (nchw, entry[b"labels"])
    return written


def test_npz_nhwc(tmp_path):
    x, y = images(5), labels(5)
    dataset = load_split(write_npz(tmp_path / "d.npz", x_test=x, y_test=y), "test")
    np.testing.assert_array_equal(dataset.images, x)
    np.testing.assert_array_equal(dataset.labels, y)
    assert dataset.labels.dtype == np.int64 and dataset.images.dtype == np.uint8
    assert dataset.classes == CIFAR10_CLASSES
    assert dataset.source == "d.npz:test"
    assert len(dataset) == 5


def test_npz_nchw_is_transposed(tmp_path):
    x = images(4, shape=(3, 32, 32))
    source = write_npz(tmp_path / "d.npz", x_train=x, y_train=labels(4))
    dataset = load_split(source, "train")
    np.testing.assert_array_equal(dataset.images, x.transpose(0, 2, 3, 1))
    assert dataset.images.flags.c_contiguous


def test_npz_other_image_size_and_own_classes(tmp_path):
    x, y = images(3, shape=(20, 24, 3)), np.array([0, 1, 1], np.int32)
    source = write_npz(tmp_path / "d.npz", x_test=x, y_test=y, classes=np.array(["cat", "dog"]))
    dataset = load_split(source, "test")
    assert dataset.images.shape == (3, 20, 24, 3)
    assert dataset.classes == ("cat", "dog")


def test_npz_needs_only_requested_split(tmp_path):
    source = write_npz(tmp_path / "d.npz", x_test=images(2), y_test=labels(2))
    assert len(load_split(source, "test")) == 2
    with pytest.raises(MbzError, match=r"no x_train, y_train.*x_train and y_train"):
        load_split(source, "train")


def test_head(tmp_path):
    dataset = load_split(write_npz(tmp_path / "d.npz", x_test=images(6), y_test=labels(6)), "test")
    first = dataset.head(4)
    assert isinstance(first, Dataset) and len(first) == 4
    np.testing.assert_array_equal(first.images, dataset.images[:4])
    assert first.source == dataset.source and len(dataset.head(100)) == 6


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        (
            {"x_test": np.zeros((10, 5)), "y_test": labels(10)},
            r"x_test must be uint8 images of shape \[N, 32, 32, 3\] or \[N, 3, 32, 32\], "
            r"got float64 \[10, 5\]",
        ),
        ({"x_test": images(2, shape=(32, 32, 4)), "y_test": labels(2)}, r"uint8 \[2, 32, 32, 4\]"),
        ({"x_test": images(0), "y_test": labels(0)}, "x_test holds no images"),
        ({"x_test": images(3), "y_test": np.zeros(3)}, "y_test must be a 1-D array of integer"),
        ({"x_test": images(3), "y_test": np.zeros((3, 1), int)}, r"int64 \[3, 1\]"),
        ({"x_test": images(3), "y_test": labels(2)}, "2 labels for 3 images"),
        ({"x_test": images(2), "y_test": np.array([0, 10])}, r"labels 0\.\.10.*10 classes"),
        ({"x_test": images(2), "y_test": np.array([-1, 3])}, r"labels -1\.\.3"),
        (
            {"x_test": images(2), "y_test": np.array([0, 2]), "classes": np.array(["a", "b"])},
            r"labels 0\.\.2, but there are 2 classes",
        ),
        (
            {"x_test": images(1), "y_test": labels(1), "classes": np.array([1, 2])},
            "classes must be a non-empty 1-D array of strings",
        ),
        ({"y_test": labels(1)}, r"has no x_test \(it holds: y_test\)"),
    ],
)
def test_npz_malformed(tmp_path, arrays, message):
    source = write_npz(tmp_path / "bad.npz", **arrays)
    with pytest.raises(MbzError, match=message):
        load_split(source, "test")


def test_npz_with_pickled_objects_is_refused(tmp_path):
    objects = np.array([{"a": 1}], dtype=object)
    source = write_npz(tmp_path / "bad.npz", x_test=objects, y_test=labels(1))
    with pytest.raises(MbzError, match=r"could not read array x_test.*no pickled objects"):
        load_split(source, "test")


def test_unreadable_files(tmp_path):
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"not an archive at all")
    with pytest.raises(MbzError, match=r"garbage.npz is not an intact .npz archive"):
        load_split(str(garbage), "test")
    truncated = tmp_path / "truncated.npz"
    write_npz(tmp_path / "full.npz", x_test=images(50), y_test=labels(50))
    truncated.write_bytes((tmp_path / "full.npz").read_bytes()[:-200])
    with pytest.raises(MbzError, match=r"truncated.npz"):
        load_split(str(truncated), "test")
    np.save(tmp_path / "single.npy", images(1))
    with pytest.raises(MbzError, match=r"single.npy is not an intact .npz archive"):
        load_split(str(tmp_path / "single.npy"), "test")


def test_missing_source_and_bad_split(tmp_path):
    with pytest.raises(MbzError, match=r"not found: pass an .npz file"):
        load_split(str(tmp_path / "nope.npz"), "test")
    with pytest.raises(MbzError, match=r"unknown split 'val'"):
        load_split("cifar10", "val")


def test_batches_folder(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    names = [f"data_batch_{i}" for i in range(1, 6)]
    written = write_batches(folder, {"test_batch": 7, **dict.fromkeys(names, 3)})
    test = load_split(str(folder), "test")
    nchw, batch_labels = written["test_batch"]
    np.testing.assert_array_equal(test.images, nchw.transpose(0, 2, 3, 1))
    np.testing.assert_array_equal(test.labels, batch_labels)
    assert test.source == "cifar-10-batches-py:test" and test.classes == CIFAR10_CLASSES
    train = load_split(str(tmp_path), "train")  # the folder holding cifar-10-batches-py
    assert len(train) == 15
    np.testing.assert_array_equal(train.labels[3:6], written["data_batch_2"][1])


def test_batches_folder_with_str_keys(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    entry = {"data": images(2, shape=(3, 32, 32)).reshape(2, -1), "labels": [1, 2]}
    (folder / "test_batch").write_bytes(pickle.dumps(entry))
    assert load_split(str(folder), "test").labels.tolist() == [1, 2]


def test_batches_folder_malformed(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    write_batches(folder, {"test_batch": 2, "data_batch_1": 2})
    with pytest.raises(MbzError, match=r"lacks data_batch_2, .*data_batch_5"):
        load_split(str(folder), "train")
    (folder / "test_batch").write_bytes(b"\x80\x02garbage")
    with pytest.raises(MbzError, match=r"could not read .*test_batch as a CIFAR-10 python batch"):
        load_split(str(folder), "test")
    (folder / "test_batch").write_bytes(pickle.dumps({b"data": images(2).reshape(2, -1)}))
    with pytest.raises(MbzError, match=r"expected a dict with data, labels"):
        load_split(str(folder), "test")
    entry = {b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]}
    (folder / "test_batch").write_bytes(pickle.dumps(entry))
    with pytest.raises(MbzError, match=r"uint8 rows of 3072 pixels .*got uint8 \[2, 100\]"):
        load_split(str(folder), "test")
    entry = {b"data": images(2).reshape(2, -1), b"labels": [0, 11]}
    (folder / "test_batch").write_bytes(pickle.dumps(entry))
    with pytest.raises(MbzError, match=r"test batch labels holds labels 0\.\.11"):
        load_split(str(folder), "test")


def test_folder_without_batches(tmp_path):
    with pytest.raises(MbzError, match=r"folder without CIFAR-10 python batches"):
        load_split(str(tmp_path), "test")


@pytest.fixture
def offline(monkeypatch) -> list:
    """torchvision's CIFAR10 failing as it does without network; the calls it got."""
    calls = []

    def cifar10(root: str, train: bool, download: bool) -> None:
        calls.append((root, train, download))
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(torchvision.datasets, "CIFAR10", cifar10)
    return calls


class FakeCIFAR10:
    """torchvision's CIFAR10 as far as mbz uses it: NHWC ``data``, ``targets``, ``classes``."""

    def __init__(self, root: str, train: bool, download: bool) -> None:
        self.data = images(4)
        self.targets = [0, 1, 2, 9]
        self.classes = list(CIFAR10_CLASSES)


def test_cifar10_download_failure(tmp_path, monkeypatch, offline):
    root = tmp_path / "cache"
    with pytest.raises(MbzError, match=r"downloading CIFAR-10 into .*cache failed.*--data-root"):
        load_split("cifar10", "test", data_root=str(root))
    assert offline[-1] == (str(root), False, True)
    monkeypatch.setenv("MBZ_DATA_DIR", str(tmp_path / "env"))
    with pytest.raises(MbzError, match=r"env failed"):
        load_split("cifar10", "train")
    assert offline[-1] == (str(tmp_path / "env"), True, True)


def test_cifar10_default_root(tmp_path, monkeypatch, offline):
    monkeypatch.delenv("MBZ_DATA_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(MbzError, match=r"\.cache/mbz/cifar10 failed"):
        load_split("cifar10", "test")


def test_cifar10_through_torchvision(tmp_path, monkeypatch):
    monkeypatch.setattr(torchvision.datasets, "CIFAR10", FakeCIFAR10)
    dataset = load_split("cifar10", "test", data_root=str(tmp_path))
    assert dataset.labels.tolist() == [0, 1, 2, 9] and dataset.images.shape == (4, 32, 32, 3)
    assert dataset.source == "cifar10:test"


def test_cifar10_uses_local_batches_without_download(tmp_path, offline):
    write_batches(tmp_path / "cifar-10-batches-py", {"test_batch": 3})
    for root in (tmp_path, tmp_path / "cifar-10-batches-py"):
        dataset = load_split("cifar10", "test", data_root=str(root))
        assert len(dataset) == 3 and dataset.source == "cifar10:test"
    assert offline == []


@pytest.mark.skipif(not FRAGMENT.is_file(), reason="shared CIFAR-10 fragment not available")
def test_shared_fragment():
    dataset = load_split(str(FRAGMENT), "test")
    assert dataset.images.shape == (1017, 32, 32, 3)
    assert dataset.source == "cifar10-fragment.npz:test"
    assert set(np.unique(dataset.labels)) <= set(range(10))
    assert len(load_split(str(FRAGMENT), "train")) > 0


class _RunsCode:
    """Unpickling this calls a function: what a crafted batch file would do."""

    def __reduce__(self):
        return (print, ("unpickling ran code",))


def test_batch_file_that_would_run_code_is_refused(tmp_path, capsys):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    entry = {b"data": images(2).reshape(2, -1), b"labels": [0, 1], b"x": _RunsCode()}
    (folder / "test_batch").write_bytes(pickle.dumps(entry, protocol=2))
    with pytest.raises(MbzError, match=r"refused to load \w+\.print: not CIFAR-10 data"):
        load_split(str(folder), "test")
    assert "unpickling ran code" not in capsys.readouterr().out


def test_images_are_checked_against_the_models_input_shape():
    images = np.zeros((2, 64, 64, 3), np.uint8)
    big = Dataset(images, np.zeros(2, np.int64), CIFAR10_CLASSES, "size64.npz:test")
    with pytest.raises(MbzError, match=r"^size64.npz:test has 64x64 images with 3 channels, "
                       r"but m.mbz takes 32x32 images with 3: resize") as error:
        check_image_shape(big, [3, 32, 32], "m.mbz")
    assert "\n" not in str(error.value)
    check_image_shape(big, (IMAGE_SHAPE[0], 64, 64), "m.mbz")
    with pytest.raises(MbzError, match="is not"):
        check_image_shape(big, None, "m.mbz")
