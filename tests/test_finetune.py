"""Fine-tuning inside ``mbz pack``: masks that stay zero, centroids that move, QAT codes that
decode to what was trained, activation quantization in the loop, reproducibility, CLI errors.

Small on purpose: a width-0.25 MobileNet-v2, a few dozen synthetic images, one epoch.
"""

import copy
import dataclasses
import json

import numpy as np
import pytest
import torch

from mbz.capture import capture
from mbz.config import PackConfig
from mbz.correct import correct_quantization
from mbz.data import CIFAR10_CLASSES, Dataset
from mbz.finetune import (
    BATCH_SIZE,
    Tuning,
    finetune_quantized,
    gmp_fraction,
    prune_weights,
    reestimate_batchnorm,
    slim,
    taylor_importance,
)
from mbz.fold import fold_batchnorm
from mbz.format import (
    CodebookTensor,
    DenseTensor,
    ScaledCodebookTensor,
    UniformTensor,
    read_mbz,
)
from mbz.graph_ops import weight_nodes
from mbz.pack import quantize_graph
from mbz.prune import (
    batchnorm_keep_masks,
    magnitude_masks,
    plan_channels,
    prune_channels,
    prune_zeroed_channels,
)
from mbz.qat import TrainableGraph, UniformWeight
from mbz.quantize import step_quantize
from mbz.runtime import load_program
from mbz.torch_graph import GraphModule, preprocess_images
from tests.helpers import invoke, narrow_mobilenet, recalibrate_batchnorm, save_mbz_checkpoint

IMAGES = 24  # 18 to train on (one step), 6 held out


@pytest.fixture(scope="module")
def data() -> Dataset:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (IMAGES, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, IMAGES).astype(np.int64)
    return Dataset(images, labels, CIFAR10_CLASSES, "synthetic")


@pytest.fixture(scope="module")
def model(data):
    return recalibrate_batchnorm(narrow_mobilenet(), data.images)


@pytest.fixture(scope="module")
def folded(model):
    captured = capture(model)
    fold_batchnorm(captured.graph, captured.params)
    return captured.graph, captured.params


@pytest.fixture(scope="module")
def npz(tmp_path_factory, data):
    path = tmp_path_factory.mktemp("data") / "data.npz"
    np.savez(path, x_train=data.images, y_train=data.labels, x_test=data.images[:16],
             y_test=data.labels[:16])
    return path


@pytest.fixture(scope="module")
def model_file(tmp_path_factory, model):
    path = tmp_path_factory.mktemp("model") / "model.pt"
    return save_mbz_checkpoint(path, model)


def tuning_for(data: Dataset, keep_start: bool = False, **fields) -> Tuning:
    """One epoch on ``data``; by default the trained epoch is kept even when the start scores
    better on the held-out images (random labels here), so the mechanics can be checked."""
    config = PackConfig(finetune_epochs=1, val_fraction=0.25, **fields)
    tuning = Tuning.of(data, config, device=torch.device("cpu"))
    return dataclasses.replace(tuning, keep_start=keep_start)


def logits(graph: dict, params: dict, images: np.ndarray) -> np.ndarray:
    x = preprocess_images(images, {"mean": PackConfig.mean, "std": PackConfig.std}, "cpu")
    with torch.no_grad():
        return GraphModule(graph, params)(x).numpy()


def test_slimming_holds_channels_at_zero_and_removes_exactly_them(data, model):
    original = copy.deepcopy(model.state_dict())
    slimmed = slim(model, tuning_for(data, prune=0.36, prune_steps=2))
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in original.items())
    captured = capture(slimmed)
    zeroed = {name: gamma == 0 for name, gamma in captured.bn_gamma.items()}
    assert sum(z.sum() for z in zeroed.values()) > 0
    for name, zero in zeroed.items():
        bn = slimmed.get_submodule(name)
        assert torch.all(bn.bias.detach()[torch.from_numpy(zero)] == 0), name
    trained = [k for k, v in slimmed.state_dict().items() if not torch.equal(v, original[k])]
    assert any(k.endswith("conv.2.weight") for k in trained), "fine-tuning changed nothing"

    graph, params = copy.deepcopy(captured.graph), dict(captured.params)
    gamma = dict(captured.bn_gamma)
    prune_zeroed_channels(graph, params, gamma)
    weights = {n["params"]["weight"] for n in weight_nodes(graph)}
    before = sum(captured.params[name].size for name in weights)
    after = sum(params[name].size for name in weights)
    assert after <= 0.64 * before
    assert all(np.all(g != 0) for g in gamma.values()), "a zeroed channel survived"
    masked, smaller = logits(captured.graph, captured.params, data.images), logits(
        graph, params, data.images
    )
    np.testing.assert_allclose(smaller, masked, rtol=0, atol=1e-5 * np.abs(masked).max())


def test_batchnorm_statistics_are_reestimated_on_the_images_given():
    """Running statistics become those of the images (the mean of equal batches' means and
    unbiased variances); the mode and the momentum stay."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4)).eval()
    images = np.random.default_rng(1).integers(0, 256, (2 * BATCH_SIZE, 8, 8, 3), np.uint8)
    preprocess = {"mean": PackConfig.mean, "std": PackConfig.std}
    reestimate_batchnorm(model, images, preprocess, "cpu")
    bn = model[1]
    assert not model.training and bn.momentum == 0.1
    with torch.no_grad():
        y = model[0](preprocess_images(images, preprocess, "cpu"))
    halves = y.split(BATCH_SIZE)
    means = torch.stack([h.mean((0, 2, 3)) for h in halves]).mean(0)
    variances = torch.stack([h.transpose(0, 1).flatten(1).var(1) for h in halves]).mean(0)
    torch.testing.assert_close(bn.running_mean, means)
    torch.testing.assert_close(bn.running_var, variances)
    assert bn.num_batches_tracked.item() == 2


def test_gradual_magnitude_pruning_reaches_the_target_and_keeps_zeros(data, folded):
    graph, original = folded
    params = dict(original)
    masks = prune_weights(graph, params, tuning_for(data, prune=0.5, prune_mode="weight"))
    total = sum(mask.size for mask in masks.values())
    assert total - sum(int(mask.sum()) for mask in masks.values()) == round(0.5 * total)
    for name, mask in masks.items():
        assert np.all(params[name][~mask] == 0), name
    kept_changed = [n for n, m in masks.items() if not np.array_equal(params[n][m], original[n][m])]
    assert kept_changed, "the kept weights were not fine-tuned"
    schedule = [gmp_fraction(step, 12, 0.5) for step in range(15)]
    assert schedule[0] == 0 and schedule[12] == schedule[14] == 0.5
    assert np.all(np.diff(schedule[:13]) > 0)


@pytest.mark.parametrize("codebook", ["plain", "scaled"])
def test_kmeans_qat_moves_centroids_and_weights_between_them(data, folded, codebook):
    """k-means QAT trains the centroids and lets weights change centroid; the file holds
    exactly the weights the model trained with."""
    graph, params = folded
    config = PackConfig(bits={"conv": 4, "fc": 2}, codebook=codebook)
    tensors, _ = quantize_graph(graph, params, config, {})
    model = TrainableGraph(graph, params, tensors)
    tuning_for(data).fit(model, "qat", 0.0, lr=0.01, after_step=TrainableGraph.apply_masks)
    tuned, used = model.export(tensors), model.float_values()
    codebooks = [n["params"]["weight"] for n in weight_nodes(graph)]
    moved = [n for n in codebooks if not np.array_equal(tuned[n].codebook, tensors[n].codebook)]
    # one step on random images: float16 centroids (scaled) swallow the smallest moves
    assert len(moved) > len(codebooks) // 3
    reassigned = [n for n in codebooks if not np.array_equal(tuned[n].indices, tensors[n].indices)]
    assert reassigned
    kind = CodebookTensor if codebook == "plain" else ScaledCodebookTensor
    for name in codebooks:
        assert isinstance(tuned[name], kind) and isinstance(tensors[name], kind)
        assert tuned[name].codebook.size == tensors[name].codebook.size <= 2 ** tuned[name].bits
        np.testing.assert_array_equal(tuned[name].decode(), used[name])
        if codebook == "scaled":  # only the shared centroids train, the channel scales stay
            np.testing.assert_array_equal(tuned[name].scale, tensors[name].scale)
    bias = weight_nodes(graph)[-1]["params"]["bias"]
    assert not np.array_equal(tuned[bias].values, tensors[bias].values)


@pytest.mark.parametrize("method", ["kmeans", "uniform"])
@pytest.mark.parametrize("pruned", [0.0, 0.5])
def test_finetuning_starts_from_the_packed_model_and_keeps_its_bytes(
    data, folded, method, pruned
):
    """The trainable graph runs what the file holds (bias correction included; weight
    pruning's masks too), and exports the float16 biases it started from as float16, and
    weights that decode to the stored ones, unchanged before any step."""
    graph, params = copy.deepcopy(folded)
    config = PackConfig(bits={"conv": 2, "fc": 2}, method=method)
    masks = magnitude_masks(graph, params, pruned) if pruned else {}
    tensors, _ = quantize_graph(graph, params, config, masks)
    preprocess = {"mean": config.mean, "std": config.std}
    correct_quantization(graph, params, tensors, preprocess, data.images)
    biases = [n["params"]["bias"] for n in weight_nodes(graph)]
    assert any(not np.allclose(tensors[b].decode(), params[b]) for b in biases)
    model = TrainableGraph(graph, params, tensors)
    x = preprocess_images(data.images, preprocess, "cpu")
    decoded = {name: tensor.decode() for name, tensor in tensors.items()}
    with torch.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), logits(graph, decoded, data.images))
    exported = model.export(tensors)
    for name in biases:
        stored, out = tensors[name], exported[name]
        assert isinstance(stored, DenseTensor) and isinstance(out, DenseTensor)
        assert out.values.dtype == stored.values.dtype == np.float16
        np.testing.assert_array_equal(out.values, stored.values)
    for node in weight_nodes(graph):
        name = node["params"]["weight"]
        np.testing.assert_array_equal(exported[name].decode(), decoded[name])


def test_qat_codes_stay_in_range_and_decode_to_the_trained_model(data, folded):
    graph, params = folded
    config = PackConfig(bits={"conv": 2, "fc": 2}, method="uniform")
    tensors, _ = quantize_graph(graph, params, config, {})
    model = TrainableGraph(graph, params, tensors)
    tuning_for(data).fit(model, "qat", 0.0, after_step=TrainableGraph.apply_masks)
    exported, used = model.export(tensors), model.float_values()
    names = [n["params"]["weight"] for n in weight_nodes(graph)]
    for name in names:
        tensor = exported[name]
        assert isinstance(tensor, UniformTensor) and tensor.bits == 2
        tensor.validate()  # codes and zero points < 2**bits, scales finite and > 0
        np.testing.assert_array_equal(tensor.decode(), used[name])
        # trained scales are float16 values, so the lean file keeps storing them in 2 bytes
        assert tensor.lean and np.array_equal(tensor.scale.astype(np.float16), tensor.scale)
    moved = [n for n in names if not np.array_equal(exported[n].scale, tensors[n].scale)]
    assert len(moved) > len(names) // 2
    x = preprocess_images(data.images, {"mean": config.mean, "std": config.std}, "cpu")
    decoded = {name: tensor.decode() for name, tensor in exported.items()}
    with torch.no_grad():
        np.testing.assert_array_equal(model(x).numpy(), logits(graph, decoded, data.images))


@pytest.mark.slow
def test_cli_channel_pruning_with_finetuning(tmp_path, model_file, npz):
    out = tmp_path / "slim.mbz"
    report = json.loads(
        invoke(
            "pack", model_file, "--prune", 0.36, "--prune-steps", 1, "--finetune-epochs", 1,
            "--l1", 1e-4, "--val-fraction", 0.25, "--seed", 3, "--data", npz, "-o", out, "--json",
        ).output
    )
    stages = list(dict.fromkeys(row["stage"] for row in report["finetune"]))  # each: 0, 1
    assert [row["epoch"] for row in report["finetune"]] == [0, 1, 0, 1]
    assert stages[0].startswith("channel pruning 1/1 (")
    assert "k-means QAT" in stages[1]
    assert all(sum(row["packed"] for row in report["finetune"] if row["stage"] == s) == 1
               for s in stages)
    mbz = read_mbz(out)
    config = mbz.metadata["pack_config"]
    assert (config["finetune_epochs"], config["prune_steps"], config["seed"]) == (1, 1, 3)
    assert config["l1"] == 1e-4 and config["val_fraction"] == 0.25
    layers = mbz.metadata["layers"]
    assert any(f["shape_after"][0] < f["shape_before"][0] for f in layers.values())
    assert all(getattr(t, "mask", None) is None for t in mbz.tensors.values())
    runtime = load_program(out).predict(np.load(npz)["x_test"]).argmax(1)
    stored = mbz.metadata["accuracy"]["top1"]
    assert (runtime == np.load(npz)["y_test"]).mean() == stored


@pytest.mark.slow
def test_cli_qat_with_quantized_activations_keeps_runtime_parity(tmp_path, model_file, npz):
    out = tmp_path / "w2a4.mbz"
    report = json.loads(
        invoke("pack", model_file, "--method", "uniform", "--bits", "conv=2,fc=2", "--act-bits",
               4, "--calib-images", 16, "--finetune-epochs", 1, "--val-fraction", 0.25,
               "--data", npz, "-o", out, "--json").output
    )
    assert [(row["stage"], row["epoch"]) for row in report["finetune"]] == [
        ("uniform QAT (LSQ scales), quantized activations", epoch) for epoch in (0, 1)
    ]
    mbz = read_mbz(out)
    assert any(node["op"] == "quantize" for node in mbz.metadata["graph"]["nodes"])
    assert PackConfig.from_dict(mbz.metadata["pack_config"]).finetune_epochs == 1
    assert "finetune_epochs" not in PackConfig(act_bits={"relu": 4}).to_dict()
    report = json.loads(invoke("eval", out, "--data", npz, "--runtime", "all", "--json").output)
    assert report["ok"], report["failures"]
    accuracies = {r["runtime"]: r["accuracy"] for r in report["results"]}
    assert accuracies["numpy"] == accuracies["torch"] == mbz.metadata["accuracy"]["top1"]


def test_the_seed_makes_finetuning_reproducible(data, folded):
    graph, params = folded
    tensors, _ = quantize_graph(graph, params, PackConfig(bits={"conv": 3, "fc": 3}), {})
    runs = [finetune_quantized(graph, params, tensors, tuning_for(data, seed=s)) for s in (5, 5, 6)]
    same = [np.array_equal(runs[0][n].decode(), runs[1][n].decode()) for n in tensors]
    other = [np.array_equal(runs[0][n].decode(), runs[2][n].decode()) for n in tensors]
    assert all(same) and not all(other)


def test_finetuning_needs_a_train_split(tmp_path, model_file, data):
    test_only = tmp_path / "test_only.npz"
    np.savez(test_only, x_test=data.images[:8], y_test=data.labels[:8])
    failed = invoke("pack", model_file, "--finetune-epochs", 1, "--data", test_only,
                    "-o", tmp_path / "m.mbz", expect=1)
    assert "train split" in failed.output and "Traceback" not in failed.output
    missing = invoke("pack", model_file, "--finetune-epochs", 1, "-o", tmp_path / "m.mbz",
                     expect=2)
    assert "--finetune-epochs needs --data" in missing.output
    bad = invoke("pack", model_file, "--finetune-epochs", 1, "--val-fraction", 1.5, expect=2)
    assert "--val-fraction" in bad.output


def test_qat_keeps_step_codes_in_their_range():
    weight = np.random.default_rng(3).standard_normal((8, 16, 3, 3)).astype(np.float32)
    stored = step_quantize(weight, None, 2)  # codes 2..6 of 3 bits (zero point 4)
    module = UniformWeight(weight, stored)
    optimizer = torch.optim.SGD(module.parameters(), lr=1.0)
    for _ in range(3):  # a loss that pushes every weight outwards, past the largest code
        optimizer.zero_grad()
        (-module().abs().sum()).backward()
        optimizer.step()
    codes = module.export(stored).qdata
    assert codes.min() == 2 and codes.max() == 6 and module.weight.detach().abs().max() > 3


def ranks(values: np.ndarray) -> np.ndarray:
    return np.argsort(np.argsort(values)).astype(np.float64)


def test_taylor_importance_tracks_the_loss_each_channel_costs(data, model):
    """Each BatchNorm channel's first-order estimate follows the measured rise of the
    cross-entropy when that channel's gamma and beta are zeroed (rank correlation over a
    layer's channels); a channel already zeroed scores exactly 0."""
    model = copy.deepcopy(model)
    preprocess = {"mean": PackConfig.mean, "std": PackConfig.std}
    bn = model.get_submodule("features.17.conv.3")
    with torch.no_grad():
        bn.weight[0], bn.bias[0] = 0.0, 0.0
    importance = taylor_importance(model, data, preprocess, "cpu")
    batchnorms = {n for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)}
    assert set(importance) == batchnorms
    estimate = importance["features.17.conv.3"]
    assert estimate[0] == 0.0

    images = preprocess_images(data.images, preprocess, "cpu")
    labels = torch.from_numpy(data.labels)

    @torch.no_grad()
    def loss() -> float:
        return torch.nn.functional.cross_entropy(model(images), labels).item()

    start, measured = loss(), []
    for channel in range(bn.weight.numel()):
        kept = bn.weight[channel].item(), bn.bias[channel].item()
        with torch.no_grad():
            bn.weight[channel], bn.bias[channel] = 0.0, 0.0
            measured.append((loss() - start) ** 2)
            bn.weight[channel], bn.bias[channel] = kept
    correlation = np.corrcoef(ranks(estimate), ranks(np.array(measured)))[0, 1]
    assert correlation > 0.8, correlation


def test_measured_importance_prunes_the_least_loss_per_weight_first(model):
    """With ``importance``, channels go in order of importance per weight they remove: the
    last 1x1 conv's channels (90 weights each) matter twice as much as the first expansion's
    (25 weights each: its two BatchNorms add up), yet go first, and alone."""
    captured = capture(model)
    importance = {name: np.ones_like(g) for name, g in captured.bn_gamma.items()}
    importance["features.18.1"] = np.full_like(importance["features.18.1"], 4e-6)
    for name in ("features.2.conv.0.1", "features.2.conv.1.1"):
        importance[name] = np.full_like(importance[name], 1e-6)
    plan = plan_channels(captured.graph, captured.params, captured.bn_gamma, 0.02, importance)
    masks = batchnorm_keep_masks(plan, captured.bn_gamma)
    assert {name for name, mask in masks.items() if not mask.all()} == {"features.18.1"}


def test_post_training_pruning_with_calibration_images_ranks_by_measured_loss(
    tmp_path, data, model
):
    """``mbz pack --prune`` with ``--data`` ranks channels by ``taylor_importance`` on the
    calibration images (labelled here by the model itself, so that their loss is its own):
    the file keeps exactly that plan's channels, and on those images the pruned model's loss
    rises less than with the |gamma| ranking a pack without images uses."""
    import mbz

    images, preprocess = data.images, {"mean": PackConfig.mean, "std": PackConfig.std}
    with torch.no_grad():
        own = model(preprocess_images(images, preprocess, "cpu")).argmax(1).numpy()
    labelled = tmp_path / "own.npz"
    np.savez(labelled, x_train=images, y_train=own, x_test=images[:8], y_test=own[:8])
    mbz.pack(model, tmp_path / "m.mbz", prune=0.36, bits="conv=32,fc=32", data=str(labelled))
    stored = {name: tuple(t.shape) for name, t in read_mbz(tmp_path / "m.mbz").tensors.items()}

    def pruned(importance: dict | None) -> tuple[dict, dict]:
        captured = capture(model)
        graph, params = copy.deepcopy(captured.graph), dict(captured.params)
        prune_channels(graph, params, dict(captured.bn_gamma), 0.36, importance)
        return graph, params

    def loss(graph: dict, params: dict) -> float:
        scores = torch.from_numpy(logits(graph, params, images))
        return torch.nn.functional.cross_entropy(scores, torch.from_numpy(own)).item()

    calibration = Dataset(images, own, CIFAR10_CLASSES, "own")
    measured = pruned(taylor_importance(model, calibration, preprocess, "cpu"))
    assert loss(*measured) < loss(*pruned(None))
    graph, params = measured
    fold_batchnorm(graph, params)
    weights = {n["params"]["weight"] for n in weight_nodes(graph)}
    assert {name: stored[name] for name in weights} == {
        name: tuple(params[name].shape) for name in weights
    }
