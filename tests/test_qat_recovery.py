"""Quantization-aware training recovers on real images: a narrow MobileNet-v2 trained briefly on
the CIFAR-10 fragment, quantized to 2 bits everywhere (post-training near chance), is fine-tuned
for two epochs with the float model as teacher: its best epoch on the held-out part of the
train split must beat the start clearly, be the one packed, and score better on test images."""

import numpy as np
import pytest
import torch

from mbz.capture import capture
from mbz.config import PackConfig
from mbz.data import load_split
from mbz.finetune import Tuning, finetune_quantized
from mbz.fold import fold_batchnorm
from mbz.models import cifar_mobilenet_v2
from mbz.pack import quantize_graph
from mbz.torch_graph import GraphModule, preprocess_images
from mbz.train_recipe import Recipe
from mbz.training import fit
from tests.helpers import fragment_path

TRAIN_IMAGES = 2048  # of the fragment's 4,068: what the float model and the fine-tuning see


@pytest.fixture(scope="module")
def fragment():
    path = fragment_path()
    if path is None:
        pytest.skip("shared/data/cifar10-fragment.npz is absent (real CIFAR-10 images)")
    return load_split(str(path), "train").head(TRAIN_IMAGES), load_split(str(path), "test")


def accuracy(graph: dict, params: dict, images: np.ndarray, labels: np.ndarray) -> float:
    config = PackConfig()
    x = preprocess_images(images, {"mean": config.mean, "std": config.std}, "cpu")
    with torch.no_grad():
        return float((GraphModule(graph, params)(x).argmax(1).numpy() == labels).mean())


@pytest.mark.slow
def test_two_bit_qat_improves_on_its_start(fragment):
    train, test = fragment
    torch.manual_seed(0)
    model = cifar_mobilenet_v2(num_classes=10, width_mult=0.35)
    recipe = Recipe(epochs=3, batch_size=64, lr=0.1, warmup_epochs=0.5, seed=0)
    fit(model, train, recipe, device=torch.device("cpu"))
    captured = capture(model.eval())
    graph, params = captured.graph, dict(captured.params)
    fold_batchnorm(graph, params)
    config = PackConfig(bits={"conv": 2, "fc": 2}, method="uniform", finetune_epochs=2)
    tensors, _ = quantize_graph(graph, params, config, {})
    tuning = Tuning.of(train, config, device=torch.device("cpu")).taught_by(model)
    tuned = finetune_quantized(graph, params, tensors, tuning)
    history = tuning.history
    start, best = history[0], max(history[1:], key=lambda row: row["val_accuracy"])
    assert start["epoch"] == 0 and best["val_accuracy"] > start["val_accuracy"] + 0.05, history
    assert [row["packed"] for row in history] == [row is best for row in history]
    # and on images neither the model nor the fine-tuning saw
    images, labels = test.images, test.labels
    before = accuracy(graph, {n: t.decode() for n, t in tensors.items()}, images, labels)
    after = accuracy(graph, {n: t.decode() for n, t in tuned.items()}, images, labels)
    float_top1 = accuracy(graph, params, images, labels)
    assert after > before + 0.03, (before, after, float_top1)
