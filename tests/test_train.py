"""``mbz train`` and the training loop: short runs on synthetic data and on the fragment."""

import copy
import csv
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from mbz.checkpoint import load_model
from mbz.commands.progress import REFRESH_STEPS, EpochBars
from mbz.data import CIFAR10_MEAN, CIFAR10_STD, Dataset, load_split
from mbz.errors import MbzError
from mbz.models import ArchConfig, cifar_mobilenet_v2
from mbz.train_augment import CROP_PADDING, augment_batch
from mbz.train_recipe import Recipe, lr_at
from mbz.training import StepReport, evaluate_model, fit, split_holdout
from tests.helpers import fragment_path, invoke

# One short CPU run: a narrow network, a few dozen images, one epoch.
QUICK = (
    "--width",
    0.25,
    "--epochs",
    1,
    "--batch-size",
    16,
    "--warmup-epochs",
    0.5,
    "--device",
    "cpu",
)


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Networks this small train faster on one thread than on two, which also slow down
    sharply when other processes share the cores."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def synthetic(rng: np.random.Generator, count: int, classes: tuple[str, ...]) -> Dataset:
    labels = rng.integers(0, len(classes), count)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    return Dataset(images, labels.astype(np.int64), classes, "synthetic")


@pytest.fixture(scope="module")
def data_path(tmp_path_factory) -> Path:
    rng = np.random.default_rng(0)
    train, test = synthetic(rng, 48, ("a", "b", "c")), synthetic(rng, 24, ("a", "b", "c"))
    path = tmp_path_factory.mktemp("data") / "tiny.npz"
    np.savez(
        path,
        x_train=train.images,
        y_train=train.labels,
        x_test=test.images,
        y_test=test.labels,
        classes=np.array(train.classes),
    )
    return path


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_path) -> tuple[Path, dict]:
    """One quick ``mbz train --json`` run: the checkpoint path and the printed summary."""
    output = tmp_path_factory.mktemp("run") / "model.pt"
    result = invoke(
        "train", "--data", data_path, "-o", output, "--json", *QUICK, catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    return output, json.loads(result.stdout)


def independent_accuracy(module: nn.Module, images: np.ndarray, labels: np.ndarray) -> float:
    """Top-1 accuracy computed here from the preprocessing definition (SPEC.md section 6)."""
    x = torch.tensor(images, dtype=torch.float32).permute(0, 3, 1, 2) / 255
    x = (x - torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1)) / torch.tensor(CIFAR10_STD).view(
        1, 3, 1, 1
    )
    with torch.no_grad():
        return float((module.eval()(x).argmax(1).numpy() == labels).mean())


def test_train_writes_a_checkpoint_that_packs_without_flags(run, data_path, tmp_path):
    output, summary = run
    loaded = load_model(output)
    assert loaded.arch == ArchConfig(num_classes=3, width_mult=0.25, dropout=0.2)
    recipe = Recipe(epochs=1, batch_size=16, warmup_epochs=0.5)
    assert loaded.extra["recipe"] == recipe.to_dict()
    assert loaded.extra["seed"] == 0 and loaded.extra["epoch"] == 1
    assert set(loaded.extra["versions"]) >= {"mbz", "torch", "torchvision", "numpy", "python"}
    test = load_split(str(data_path), "test")
    accuracy = independent_accuracy(loaded.module, test.images, test.labels)
    assert summary["test_accuracy"] == pytest.approx(accuracy)
    assert loaded.extra["accuracy"] == pytest.approx(accuracy)
    assert summary["test_images"] == 24 and summary["epochs_run"] == 1

    packed = invoke("pack", output, "-o", tmp_path / "model.mbz", "--json")
    assert packed.exit_code == 0, packed.output
    assert json.loads(packed.stdout)["file_bytes"] == (tmp_path / "model.mbz").stat().st_size


def test_train_writes_history_and_charts(run):
    _, summary = run
    with open(summary["history_csv"], newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [row["epoch"] for row in rows] == ["1"]
    assert float(rows[0]["val_accuracy"]) == pytest.approx(summary["test_accuracy"])
    assert float(rows[0]["images_per_s"]) > 0
    names = [Path(p).name for p in summary["plots"]]
    assert names == ["model.loss.png", "model.accuracy.png", "model.confusion.png"]
    for path in summary["plots"]:
        assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_same_seed_gives_the_same_model_twice(run, data_path, tmp_path):
    first, _ = run
    again = invoke("train", "--data", data_path, "-o", tmp_path / "again.pt", *QUICK)
    assert again.exit_code == 0, again.output
    assert "epoch 1/1: train loss" in again.output and "img/s" in again.output
    assert "test accuracy" in again.stdout
    a, b = (torch.load(p, weights_only=True) for p in (first, tmp_path / "again.pt"))
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key, value in a["state_dict"].items():
        assert torch.equal(value, b["state_dict"][key]), key
    timing = ("images_per_s", "seconds")
    strip = [{k: v for k, v in row.items() if k not in timing} for row in a["history"]]
    assert strip == [{k: v for k, v in row.items() if k not in timing} for row in b["history"]]


@pytest.mark.slow
def test_resume_continues_the_saved_run(run, data_path, tmp_path):
    output = tmp_path / "model.pt"
    shutil.copy(run[0], output)
    refused = invoke(
        "train", "--data", data_path, "-o", output, "--resume", "--width", 0.5, expect=2
    )
    assert "drop --width" in refused.output
    resumed = invoke(
        "train", "--data", data_path, "-o", output, "--resume", "--epochs", 2, "--json"
    )
    assert resumed.exit_code == 0, resumed.output
    saved = torch.load(output, weights_only=True)
    assert saved["epoch"] == 2 and [row["epoch"] for row in saved["history"]] == [1, 2]
    assert saved["recipe"] == Recipe(epochs=2, batch_size=16, warmup_epochs=0.5).to_dict()
    assert json.loads(resumed.stdout)["epochs_run"] == 1
    with open(output.with_name("model.history.csv"), newline="") as handle:
        assert len(list(csv.DictReader(handle))) == 2


@pytest.mark.slow
def test_interrupted_fit_resumes_to_the_same_weights():
    rng = np.random.default_rng(1)
    train, val = synthetic(rng, 40, ("a", "b")), synthetic(rng, 16, ("a", "b"))
    recipe = Recipe(epochs=2, batch_size=16, warmup_epochs=1, label_smoothing=0.1, mixup=0.2)

    def model() -> nn.Module:
        torch.manual_seed(5)
        return cifar_mobilenet_v2(num_classes=2, width_mult=0.25)

    straight = model()
    whole = fit(straight, train, recipe, val=val, device=torch.device("cpu"))

    class Stop(Exception):
        pass

    saved = {}

    def save_and_stop(optimizer_state: dict) -> None:
        saved["model"] = {k: v.clone() for k, v in first.state_dict().items()}
        saved["optimizer"] = copy.deepcopy(optimizer_state)
        raise Stop

    first = model()
    with pytest.raises(Stop):
        fit(
            first,
            train,
            recipe,
            val=val,
            device=torch.device("cpu"),
            on_checkpoint=save_and_stop,
        )
    second = model()
    second.load_state_dict(saved["model"])
    rest = fit(
        second,
        train,
        recipe,
        val=val,
        device=torch.device("cpu"),
        start_epoch=1,
        optimizer_state=saved["optimizer"],
    )
    for key, value in straight.state_dict().items():
        assert torch.equal(value, second.state_dict()[key]), key
    assert rest.history[0]["train_loss"] == whole.history[1]["train_loss"]
    assert math.isfinite(whole.history[1]["train_loss"])


def test_fit_calls_hooks_and_keeps_the_best_epoch():
    rng = np.random.default_rng(2)
    train, val = synthetic(rng, 32, ("a", "b")), synthetic(rng, 8, ("a", "b"))
    model = cifar_mobilenet_v2(num_classes=2, width_mult=0.25)
    calls = {"penalty": 0, "after_step": 0, "epochs": [], "steps": []}

    def penalty(module: nn.Module) -> torch.Tensor:
        calls["penalty"] += 1
        return module.classifier[1].weight.abs().sum() * 1e-4

    def after_step(module: nn.Module) -> None:
        calls["after_step"] += 1

    recipe = Recipe(epochs=2, batch_size=16, warmup_epochs=0)
    result = fit(
        model,
        train,
        recipe,
        val=val,
        device=torch.device("cpu"),
        penalty=penalty,
        after_step=after_step,
        on_epoch=calls["epochs"].append,
        on_step=lambda report: calls["steps"].append((report, report.running())),
    )
    assert calls["penalty"] == calls["after_step"] == 4  # 2 epochs x 2 steps of 16
    positions = [(r.epoch, r.epochs, r.step, r.steps, r.images) for r, _ in calls["steps"]]
    assert positions == [(1, 2, 1, 2, 16), (1, 2, 2, 2, 32), (2, 2, 1, 2, 16), (2, 2, 2, 2, 32)]
    for (_, running), stats in zip(calls["steps"][1::2], result.history, strict=True):
        # at an epoch's last step the running figures are the epoch's own
        assert running["loss"] == pytest.approx(stats["train_loss"])
        assert running["accuracy"] == pytest.approx(stats["train_accuracy"])
        assert running["images_per_s"] > 0
    assert calls["epochs"] == result.history and [h["epoch"] for h in result.history] == [1, 2]
    accuracies = [h["val_accuracy"] for h in result.history]
    assert result.best_val_accuracy == max(accuracies)
    assert result.best_epoch == 1 + accuracies.index(max(accuracies))
    assert result.history[-1]["lr"] == pytest.approx(lr_at(3, 4, 0, recipe.lr))
    _, accuracy, _ = evaluate_model(model, val)
    assert accuracy == pytest.approx(result.history[-1]["val_accuracy"])


def test_evaluate_model_scores_known_predictions():
    class Brightness(nn.Module):
        """Class 1 for images brighter than the mean colour, else class 0."""

        def __init__(self) -> None:
            super().__init__()
            self.scale = nn.Parameter(torch.ones(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            score = x.mean(dim=(1, 2, 3)) * self.scale
            return torch.stack([-score, score], dim=1)

    images = np.zeros((4, 32, 32, 3), np.uint8)
    images[2:] = 255
    data = Dataset(images, np.array([0, 1, 1, 1]), ("dark", "bright"), "four")
    loss, accuracy, predictions = evaluate_model(Brightness(), data)
    np.testing.assert_array_equal(predictions, [0, 0, 1, 1])
    assert accuracy == 0.75
    assert math.isfinite(loss) and loss > 0


def test_augmentation_crops_windows_of_the_padded_image_and_flips():
    images = torch.randint(0, 256, (64, 32, 32, 3), dtype=torch.uint8)
    out = augment_batch(images, torch.Generator().manual_seed(0))
    assert out.shape == images.shape and out.dtype == images.dtype
    pad = CROP_PADDING
    padded = torch.nn.functional.pad(images, (0, 0, pad, pad, pad, pad))
    offsets, flips = set(), set()
    for index in range(len(images)):
        matches = [
            (top, left, flip)
            for top in range(2 * pad + 1)
            for left in range(2 * pad + 1)
            for flip in (False, True)
            if torch.equal(
                out[index],
                padded[index, top : top + 32, left : left + 32].flip(1)
                if flip
                else padded[index, top : top + 32, left : left + 32],
            )
        ]
        assert matches, f"image {index} is no window of its padded input"
        offsets.add(matches[0][:2])
        flips.add(matches[0][2])
    assert flips == {False, True} and len(offsets) > 10


def test_learning_rate_warms_up_then_follows_a_cosine():
    peak, total, warm = 0.1, 100, 10
    rates = [lr_at(step, total, warm, peak) for step in range(total)]
    assert rates[0] == pytest.approx(peak / warm)
    assert rates[warm - 1] == pytest.approx(peak)
    assert np.all(np.diff(rates[:warm]) > 0) and np.all(np.diff(rates[warm:]) < 0)
    assert lr_at(55, total, warm, peak) == pytest.approx(peak / 2)  # half-way down the cosine
    assert rates[-1] < peak * 1e-3


def test_recipe_round_trips_and_rejects_bad_records():
    recipe = Recipe(epochs=3, mixup=0.2, augment=False)
    assert Recipe.from_dict(recipe.to_dict()) == recipe
    with pytest.raises(MbzError, match="unknown keys in training recipe: colour"):
        Recipe.from_dict({**recipe.to_dict(), "colour": 1})
    with pytest.raises(MbzError, match="momentum must be in"):
        Recipe.from_dict({**recipe.to_dict(), "momentum": 1.5})
    with pytest.raises(ValueError, match="epochs must be >= 1; lr must be > 0"):
        Recipe(epochs=0, lr=0)


def test_split_holdout_partitions_the_images():
    data = synthetic(np.random.default_rng(3), 50, ("a", "b"))
    rest, held = split_holdout(data, 0.2, seed=7)
    assert (len(rest), len(held)) == (40, 10)
    rows = {bytes(image) for image in data.images}
    assert {bytes(i) for i in rest.images} | {bytes(i) for i in held.images} == rows
    assert not {bytes(i) for i in rest.images} & {bytes(i) for i in held.images}
    again, _ = split_holdout(data, 0.2, seed=7)
    np.testing.assert_array_equal(again.images, rest.images)
    with pytest.raises(MbzError, match="both parts"):
        split_holdout(data, 0.001, seed=7)


@pytest.mark.parametrize(
    "make, expected",
    [
        (lambda tmp: tmp / "absent.npz", "not found"),
        (
            lambda tmp: (
                np.savez(
                    tmp / "x.npz",
                    x_test=np.zeros((2, 32, 32, 3), np.uint8),
                    y_test=np.zeros(2, np.int64),
                )
                or tmp / "x.npz"
            ),
            "x_train",
        ),
        (lambda tmp: (tmp / "junk.npz").write_bytes(b"junk") and tmp / "junk.npz", "not an intact"),
    ],
)
def test_bad_data_gets_a_message_not_a_traceback(tmp_path, make, expected):
    result = invoke("train", "--data", make(tmp_path), "-o", tmp_path / "m.pt", *QUICK, expect=1)
    assert expected in result.output and "Traceback" not in result.output
    assert not (tmp_path / "m.pt").exists()


def test_too_few_classes_is_a_usage_error(data_path, tmp_path):
    result = invoke(
        "train", "--data", data_path, "-o", tmp_path / "m.pt", "--num-classes", 2, *QUICK, expect=2
    )
    assert "--num-classes 3" in result.output


@pytest.mark.slow
def test_fragment_slice_trains_and_packs(tmp_path):
    fragment = fragment_path()
    if fragment is None:
        pytest.skip("shared/data/cifar10-fragment.npz is absent (real CIFAR-10 images)")
    output = tmp_path / "fragment.pt"
    result = invoke(
        "train",
        "--data",
        fragment,
        "-o",
        output,
        "--limit-train",
        192,
        "--limit-test",
        64,
        "--json",
        *QUICK,
        "--batch-size",
        64,
    )
    assert result.exit_code == 0, result.output
    loaded = load_model(output)
    assert loaded.arch == ArchConfig(num_classes=10, width_mult=0.25)
    assert loaded.extra["data"] == {"source": str(fragment), "train_images": 192, "test_images": 64}
    test = load_split(str(fragment), "test").head(64)
    accuracy = independent_accuracy(loaded.module, test.images, test.labels)
    assert json.loads(result.stdout)["test_accuracy"] == pytest.approx(accuracy)
    packed = invoke("pack", output, "-o", tmp_path / "fragment.mbz")
    assert packed.exit_code == 0, packed.output


@pytest.mark.slow
def test_torchrun_two_cpu_processes(data_path, tmp_path):
    mbz = shutil.which("mbz") or str(Path(sys.executable).with_name("mbz"))
    output = tmp_path / "ddp.pt"
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        mbz,
        "train",
        "--data",
        str(data_path),
        "-o",
        str(output),
        "--json",
        *map(str, QUICK),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads(done.stdout)  # one JSON document: only rank 0 prints
    saved = torch.load(output, weights_only=True)
    assert saved["world_size"] == 2 and saved["epoch"] == 1
    loaded = load_model(output)
    test = load_split(str(data_path), "test")
    accuracy = independent_accuracy(loaded.module, test.images, test.labels)
    assert summary["test_accuracy"] == pytest.approx(accuracy)


def test_epoch_bars_draw_a_bar_per_epoch_and_read_the_device_rarely(capsys):
    reads = []

    class Counted(StepReport):
        def running(self) -> dict[str, float]:
            reads.append((self.epoch, self.step))
            return super().running()

    steps, sums = REFRESH_STEPS + 2, torch.tensor([24.0, 12.0], dtype=torch.float64)
    with EpochBars() as bars:
        for epoch in (1, 2):
            for step in range(1, steps + 1):
                bars(Counted(epoch, 2, step, steps, 16 * step, time.perf_counter(), sums))
    assert reads == [(1, REFRESH_STEPS), (1, steps), (2, REFRESH_STEPS), (2, steps)]
    drawn = capsys.readouterr().err
    assert "epoch 1/2" in drawn and "epoch 2/2" in drawn
