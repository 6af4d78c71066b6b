"""Distillation, step budgets and the kept checkpoint of fine-tuning, on a tiny network and
random images (seconds on a CPU); unlabelled .npz data through ``mbz pack``."""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch
from torch import nn

from mbz.commands.finetune import finetune_summary
from mbz.config import PackConfig
from mbz.data import CIFAR10_CLASSES, Dataset
from mbz.finetune import BATCH_SIZE, Tuning, planned_runs
from mbz.torch_graph import preprocess_images
from mbz.train_distill import Distillation, distillation_loss
from mbz.train_recipe import Recipe
from mbz.training import Objective, evaluate_model, fit
from tests.helpers import invoke, narrow_mobilenet, recalibrate_batchnorm, save_mbz_checkpoint

PREPROCESS = {"mean": PackConfig.mean, "std": PackConfig.std}


def tiny_net(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(4),
        nn.Flatten(), nn.Linear(128, 10),
    )


def random_images(count: int, seed: int) -> Dataset:
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (count, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, count).astype(np.int64)
    return Dataset(images, labels, CIFAR10_CLASSES, "random")


def four_batches() -> Dataset:
    """Random images that leave 4 fine-tuning steps per epoch after a 0.1 validation split."""
    return random_images(round(4 * BATCH_SIZE / 0.9), 3)


def kl_to(teacher: nn.Module, student: nn.Module, data: Dataset) -> float:
    x = preprocess_images(data.images, PREPROCESS, "cpu")
    with torch.no_grad():
        return float(distillation_loss(student.eval()(x), teacher.eval()(x), 4.0))


RECIPE = Recipe(epochs=4, batch_size=64, lr=0.05, warmup_epochs=0, weight_decay=0, augment=False)


def test_distillation_pulls_the_student_to_the_teachers_logits():
    data, teacher = random_images(256, 0), tiny_net(1).eval()
    before = kl_to(teacher, tiny_net(2), data)
    students = {}
    for weight in (0.0, 1.0):
        student = tiny_net(2)
        objective = Objective(distill=Distillation.of(teacher, weight, 4.0))
        fit(student, data, RECIPE, device=torch.device("cpu"), objective=objective)
        students[weight] = kl_to(teacher, student, data)
    assert students[1.0] < 0.5 * before
    assert students[1.0] < 0.5 * students[0.0]  # the labels alone do not get there
    assert all(p.requires_grad for p in teacher.parameters()), "the teacher was left as it was"


def test_the_kept_state_is_the_best_epoch_or_the_start():
    data = random_images(320, 1)
    train, val = data.head(256), dataclasses.replace(data, images=data.images[256:],
                                                     labels=data.labels[256:])
    model = tiny_net(3)
    start = copy.deepcopy(model.state_dict())
    result = fit(model, train, dataclasses.replace(RECIPE, lr=0.3), val=val,
                 device=torch.device("cpu"), keep_start=True)
    scores = [row["val_accuracy"] for row in result.history]
    assert [row["epoch"] for row in result.history] == [0, 1, 2, 3, 4]
    assert result.history[0]["train_loss"] is None
    assert result.best_epoch == int(np.argmax(scores)) and result.best_val_accuracy == max(scores)
    kept = tiny_net(3)
    kept.load_state_dict(result.best_state)
    assert evaluate_model(kept, val)[1] == max(scores)
    if result.best_epoch == 0:
        assert all(torch.equal(v, start[k]) for k, v in result.best_state.items())


def test_the_start_is_kept_when_no_epoch_beats_it():
    data = random_images(192, 2)
    teacher = tiny_net(4).eval()
    labelled = dataclasses.replace(data, labels=evaluate_model(teacher, data)[2])
    model = copy.deepcopy(teacher)
    start = copy.deepcopy(model.state_dict())
    recipe = dataclasses.replace(RECIPE, epochs=2, lr=5.0)  # destroys the model
    result = fit(model, labelled, recipe, val=labelled, device=torch.device("cpu"),
                 keep_start=True)
    assert result.history[0]["val_accuracy"] == 1.0
    assert all(row["val_accuracy"] < 1.0 for row in result.history[1:])
    assert result.best_epoch == 0
    assert all(torch.equal(v, start[k]) for k, v in result.best_state.items())


@pytest.mark.parametrize(("fields", "steps"), [
    ({"finetune_epochs": 0.5}, 2), ({"finetune_epochs": 1.5}, 6), ({"finetune_steps": 3}, 3),
])
def test_fractions_of_an_epoch_and_step_budgets(fields, steps):
    data = four_batches()
    tuning = Tuning.of(data, PackConfig(val_fraction=0.1, **fields), torch.device("cpu"))
    seen = []
    tuning = dataclasses.replace(tuning, on_step=lambda report: seen.append(report.steps))
    tuning.fit(tiny_net(5), "stage", 0.0)
    assert len(seen) == steps == tuning.steps()
    assert [row["epoch"] for row in tuning.history] == list(range(1 + -(-steps // 4)))
    with pytest.raises(ValueError, match="not both"):
        PackConfig(finetune_epochs=1, finetune_steps=3)


@pytest.mark.parametrize(("fields", "runs"), [
    ({}, 1),  # the quantized model
    ({"prune": 0.36}, 3),  # two channel-pruning rounds, then the quantized model
    ({"prune": 0.36, "prune_steps": 3, "act_bits": {"relu": 8}}, 4),
    ({"prune": 0.5, "prune_mode": "weight"}, 2),
    ({"prune": 0.5, "prune_mode": "weight", "bits": {"conv": 32, "fc": 32}, "default_bits": 32}, 1),
    ({"bits": {"conv": 32, "fc": 32}, "default_bits": 32, "target_ratio": 10}, 1),
])
def test_the_budget_is_shared_by_the_runs_of_the_command(fields, runs):
    data = four_batches()
    config = PackConfig(val_fraction=0.1, finetune_steps=12, **fields)
    assert planned_runs(config) == runs
    epochs = dataclasses.replace(config, finetune_steps=0, finetune_epochs=3)
    for budget in (config, epochs):
        tuning = Tuning.of(data, budget, torch.device("cpu"))
        steps = []
        for run in range(runs):
            steps.append(tuning.steps())
            tuning.fit(tiny_net(run), f"run {run}", 0.0)
        assert sum(steps) == 12
        assert steps == sorted(steps) and (runs == 1 or steps[-1] > steps[0])
        assert len({row["stage"] for row in tuning.history}) == runs


@pytest.mark.slow
def test_unlabelled_images_are_labelled_by_the_float_model(tmp_path):
    data = random_images(48, 4)
    model = recalibrate_batchnorm(narrow_mobilenet(), data.images)
    model_file = save_mbz_checkpoint(tmp_path / "model.pt", model)
    npz = tmp_path / "unlabelled.npz"
    np.savez(npz, x_train=data.images[:40], x_test=data.images[40:], y_test=data.labels[40:])
    report = json.loads(invoke(
        "pack", model_file, "--bits", "conv=8,fc=8", "--finetune-steps", 1, "--val-fraction",
        0.25, "--data", npz, "-o", tmp_path / "m.mbz", "--json",
    ).output)
    start = report["finetune"][0]  # accuracy = agreement with the float model's labels
    assert start["epoch"] == 0 and start["val_accuracy"] >= 0.8
    failed = invoke("pack", model_file, "--finetune-steps", 1, "--distill-weight", 0, "--data",
                    npz, "-o", tmp_path / "m.mbz", expect=1)
    assert "y_train" in failed.output


@pytest.mark.parametrize(("val_accuracies", "said"), [
    ((0.5, 0.4), "the start kept: its epoch did not beat it"),
    ((0.5, 0.4, 0.45), "the start kept: none of its 2 epochs beat it"),
    ((0.4, 0.3, 0.5), "epoch 2 of 2 kept"),
])
def test_the_summary_says_which_state_each_stage_kept(val_accuracies, said):
    best = max(range(len(val_accuracies)), key=val_accuracies.__getitem__)
    history = [
        {"stage": "QAT", "epoch": epoch, "train_loss": None if epoch == 0 else 0.5,
         "val_accuracy": accuracy, "packed": epoch == best}
        for epoch, accuracy in enumerate(val_accuracies)
    ]
    accuracy = f"{100 * max(val_accuracies):.2f}%"
    assert finetune_summary(history) == f"fine-tuned QAT: held-out accuracy {accuracy} ({said})"


@pytest.mark.parametrize(("epochs", "said"), [
    (1, "the start kept: its epoch did not beat it"),
    (2, "the start kept: none of its 2 epochs beat it"),
])
def test_the_summary_of_a_real_run_says_the_start_was_kept(epochs, said):
    data = random_images(2 * BATCH_SIZE, 2)
    teacher = tiny_net(4).eval()
    labelled = dataclasses.replace(data, labels=evaluate_model(teacher, data)[2])
    config = PackConfig(finetune_epochs=epochs)
    tuning = Tuning(labelled, labelled, config, torch.device("cpu"))
    tuning.fit(copy.deepcopy(teacher), "QAT", 0.0, lr=5.0)  # lr 5 destroys the model
    assert [row["packed"] for row in tuning.history] == [True] + [False] * epochs
    assert finetune_summary(tuning.history) == f"fine-tuned QAT: held-out accuracy 100.00% ({said})"
