"""mbz's training loop, for ``mbz train`` and for fine-tuning while packing.

SGD with Nesterov momentum under the recipe's per-step schedule (``mbz.train_recipe``), label
smoothing, mixup and random crop + horizontal flip on whole batches on the training device
(``mbz.train_augment``). The model trains in channels_last memory format (on the CPU too, where
it measured about 1.4x faster than NCHW for MobileNet-v2) and, on CUDA, in mixed precision
(bfloat16 where supported, else float16 with loss scaling). Launched by ``torchrun``, every
process trains a shard of each epoch under DistributedDataParallel (``mbz.train_dist``); only
rank 0 calls the callbacks. The loop prints nothing: progress goes to the callbacks.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mbz.data import CIFAR10_MEAN, CIFAR10_STD, Dataset
from mbz.errors import MbzError
from mbz.torch_graph import image_batches, preprocess_images
from mbz.train_augment import Mixed, augment_batch, mixup
from mbz.train_dist import Process, all_sum, broadcast_buffers, process_group
from mbz.train_distill import Distillation
from mbz.train_recipe import Recipe, lr_at


@dataclass
class StepReport:
    """What ``on_step`` gets after each optimizer step (on rank 0)."""

    epoch: int  # from 1
    epochs: int
    step: int  # within the epoch, from 1
    steps: int  # steps per epoch
    images: int  # images this process trained on so far in the epoch
    started: float  # time.perf_counter() when the epoch began
    sums: torch.Tensor  # this process's running (loss sum, correct) of the epoch, on the device

    def running(self) -> dict[str, float]:
        """The epoch's mean loss, accuracy and images/s so far on this process. It waits for
        the device, so a progress display calls it only every few steps."""
        loss, correct = self.sums.tolist()
        seconds = max(time.perf_counter() - self.started, 1e-9)
        return {
            "loss": loss / self.images,
            "accuracy": correct / self.images,
            "images_per_s": self.images / seconds,
        }


@dataclass
class FitResult:
    """What ``fit`` returns; the model itself is left with the weights of the last epoch."""

    history: list[dict]  # one dict per epoch trained by this call (see ``fit``)
    best_state: dict  # state_dict (CPU tensors) of the epoch with the best val accuracy
    best_epoch: int  # that epoch, counted from 1 like history's "epoch" (0: the start kept)
    best_val_accuracy: float | None  # None without val


def _seed(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` (seed, epoch, rank)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> 1)


def _cpu_state(state: dict) -> dict:
    """A CPU copy of a state_dict in the default memory format."""
    return {
        key: value.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        for key, value in state.items()
    }


@torch.no_grad()
def _loss_sum_and_predictions(
    model: nn.Module,
    images: np.ndarray,
    labels: np.ndarray,
    preprocess: dict,
    device: torch.device,
    batch_size: int,
) -> tuple[float, np.ndarray]:
    """Summed cross-entropy and predicted classes of ``model`` (in eval mode) on the images."""
    loss_sum, predictions = 0.0, [np.zeros(0, np.int64)]
    for part, x in image_batches(images, preprocess, device, batch_size):
        target = torch.as_tensor(labels[part], device=device)
        logits = model(x).float()
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        predictions.append(logits.argmax(1).cpu().numpy())
    return loss_sum, np.concatenate(predictions)


def evaluate_model(
    model: nn.Module,
    dataset: Dataset,
    *,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    device: torch.device | None = None,
    batch_size: int = 256,
) -> tuple[float, float, np.ndarray]:
    """(mean cross-entropy, top-1 accuracy, predicted classes) of ``model`` on ``dataset``.

    The model runs in eval mode on ``device`` (default: where its parameters are) in float32;
    its training mode is restored afterwards.
    """
    if len(dataset) == 0:
        raise MbzError(f"{dataset.source} holds no images to evaluate on")
    device = device or next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        loss_sum, predictions = _loss_sum_and_predictions(
            model, dataset.images, dataset.labels, {"mean": mean, "std": std}, device, batch_size
        )
    finally:
        model.train(was_training)
    accuracy = float((predictions == dataset.labels).mean())
    return loss_sum / len(dataset), accuracy, predictions


def confusion_matrix(labels: np.ndarray, predictions: np.ndarray, classes: int) -> np.ndarray:
    """Counts [true class, predicted class] of a set of predictions."""
    pairs = np.asarray(labels, np.int64) * classes + np.asarray(predictions, np.int64)
    return np.bincount(pairs, minlength=classes * classes).reshape(classes, classes)


def split_holdout(dataset: Dataset, fraction: float, seed: int) -> tuple[Dataset, Dataset]:
    """(rest, holdout): a random ``fraction`` of the images held out, e.g. for validation.

    The same seed gives the same split; both parts keep the dataset's order.
    """
    count = round(len(dataset) * fraction)
    if not 0 < fraction < 1 or not 0 < count < len(dataset):
        raise MbzError(
            f"cannot hold out a fraction {fraction:g} of the {len(dataset)} images of "
            f"{dataset.source}: both parts need at least one image (use 0 < fraction < 1)"
        )
    order = np.random.default_rng(seed).permutation(len(dataset))
    rest, held = np.sort(order[count:]), np.sort(order[:count])
    return (
        _subset(dataset, rest, f"{dataset.source} without holdout"),
        _subset(dataset, held, f"{dataset.source} holdout {fraction:g}"),
    )


def _subset(dataset: Dataset, indices: np.ndarray, source: str) -> Dataset:
    images, labels = dataset.images[indices], dataset.labels[indices]
    return replace(dataset, images=images, labels=labels, source=source)


@dataclass
class _Plan:
    """How one process walks the training images: its shard, batch and step counts."""

    images: torch.Tensor  # uint8 NHWC, all training images, on the device
    labels: torch.Tensor
    shard: int  # images per process per epoch (the epoch's order is padded to divide evenly)
    batch: int  # images per process per step
    steps: int  # optimizer steps per epoch

    @classmethod
    def of(cls, train: Dataset, recipe: Recipe, process: Process) -> _Plan:
        shard = math.ceil(len(train) / process.world)
        batch = max(1, math.ceil(recipe.batch_size / process.world))
        images = torch.as_tensor(np.ascontiguousarray(train.images), device=process.device)
        labels = torch.as_tensor(train.labels, dtype=torch.int64, device=process.device)
        return cls(images, labels, shard, batch, math.ceil(shard / batch))

    def order(self, seed: int, process: Process) -> torch.Tensor:
        """This process's image indices for an epoch: a shared shuffle, every world-th one."""
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.labels), generator=generator)
        order = order.repeat(math.ceil(self.shard * process.world / len(order)))
        return order[: self.shard * process.world][process.rank :: process.world].to(process.device)


@dataclass
class Objective:
    """What ``fit`` adds to the recipe's cross-entropy: a ``penalty(model)`` term, a teacher to
    distil from, a different learning rate for some parameters, and ``max_steps`` to stop
    before the recipe's last epoch ends (the learning rate then decays over those steps)."""

    penalty: Callable[[nn.Module], torch.Tensor] | None = None
    distill: Distillation | None = None
    lr_scales: Callable[[nn.Module], dict[nn.Parameter, float]] | None = None  # lr multipliers
    max_steps: int | None = None


def _param_groups(model: nn.Module, objective: Objective) -> list[dict]:
    """The optimizer's parameter groups: one per learning-rate multiplier (1 for the rest)."""
    scales = objective.lr_scales(model) if objective.lr_scales else {}
    groups: dict[float, list] = {}
    for parameter in model.parameters():
        groups.setdefault(scales.get(parameter, 1.0), []).append(parameter)
    return [{"params": params, "lr_scale": scale} for scale, params in groups.items()]


class _Trainer:
    """One ``fit`` call's state: the model (DDP-wrapped when distributed), optimizer, AMP."""

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        process: Process,
        plan: _Plan,
        mean,
        std,
        objective: Objective,
        after_step,
    ) -> None:
        self.model, self.recipe, self.process, self.plan = model, recipe, process, plan
        self.penalty, self.after_step = objective.penalty, after_step
        self.distill = objective.distill.to(process.device) if objective.distill else None
        self.preprocess = {"mean": mean, "std": std}
        cuda = process.device.type == "cuda"
        self.net = (
            DistributedDataParallel(model, device_ids=[process.device.index] if cuda else None)
            if process.world > 1
            else model
        )
        self.optimizer = torch.optim.SGD(
            _param_groups(model, objective),
            lr=recipe.lr,
            momentum=recipe.momentum,
            nesterov=recipe.nesterov,
            weight_decay=recipe.weight_decay,
        )
        half = torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float16
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=half)) if cuda else contextlib.nullcontext
        )
        self.scaler = torch.amp.GradScaler("cuda", enabled=cuda and half == torch.float16)
        steps = recipe.epochs * plan.steps
        self.total_steps = min(steps, objective.max_steps) if objective.max_steps else steps
        self.warmup_steps = round(recipe.warmup_epochs * plan.steps)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, mixed: Mixed):
        """Criterion loss and (soft) count of correct predictions."""
        smoothing = self.recipe.label_smoothing
        hits = logits.argmax(1)
        if mixed is None:
            loss = F.cross_entropy(logits, target, label_smoothing=smoothing)
            return loss, (hits == target).sum()
        other, weight = mixed
        loss = weight * F.cross_entropy(logits, target, label_smoothing=smoothing) + (
            1 - weight
        ) * F.cross_entropy(logits, other, label_smoothing=smoothing)
        return loss, weight * (hits == target).sum() + (1 - weight) * (hits == other).sum()

    def step(self, indices: torch.Tensor, step: int, generator, rng) -> tuple[torch.Tensor, ...]:
        """One optimizer step on the images at ``indices``; (loss sum, correct) on the device."""
        images, target = self.plan.images[indices], self.plan.labels[indices]
        if self.recipe.augment:
            images = augment_batch(images, generator)
        x = preprocess_images(images, self.preprocess, self.process.device, torch.channels_last)
        x, mixed = mixup(x, target, self.recipe.mixup, generator, rng)
        lr = lr_at(step, self.total_steps, self.warmup_steps, self.recipe.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)
        with self.autocast():
            logits = self.net(x)
            loss, correct = self._loss(logits.float(), target, mixed)
            if self.distill:
                loss = self.distill.mix(loss, logits, x)
        total = loss + self.penalty(self.model) if self.penalty else loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.after_step:
            self.after_step(self.model)
        return loss.detach() * len(target), correct.detach()

    def epoch(self, epoch: int, on_step: Callable[[StepReport], None] | None) -> dict:
        """Train one epoch; its loss, accuracy, last learning rate and speed."""
        recipe, plan, process = self.recipe, self.plan, self.process
        seed = _seed(recipe.seed, epoch, process.rank)
        torch.manual_seed(seed)  # dropout
        generator = torch.Generator(process.device).manual_seed(seed)
        rng = np.random.default_rng(seed)
        order = plan.order(_seed(recipe.seed, epoch), process)
        self.net.train()
        sums = torch.zeros(2, dtype=torch.float64, device=process.device)
        start = time.perf_counter()
        steps = min(plan.steps, self.total_steps - epoch * plan.steps)
        for index in range(steps):
            indices = order[index * plan.batch : (index + 1) * plan.batch]
            loss, correct = self.step(indices, epoch * plan.steps + index, generator, rng)
            sums += torch.stack([loss.double(), correct.double()])
            if on_step:
                done = min((index + 1) * plan.batch, plan.shard)
                on_step(StepReport(epoch + 1, recipe.epochs, index + 1, steps, done, start, sums))
        trained = min(steps * plan.batch, plan.shard)
        loss_total, correct_total, count = all_sum([*sums.tolist(), trained], process)
        seconds = time.perf_counter() - start
        return {
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": loss_total / count,
            "train_accuracy": correct_total / count,
            "images_per_s": count / seconds,
        }

    def validate(self, val: Dataset, mean, std) -> tuple[float, float]:
        """(val loss, val accuracy), each process scoring a shard of ``val``."""
        broadcast_buffers(self.model, self.process)
        rank, world = self.process.rank, self.process.world
        images, labels = val.images[rank::world], val.labels[rank::world]
        self.model.eval()
        loss_sum, predictions = _loss_sum_and_predictions(
            self.model, images, labels, {"mean": mean, "std": std}, self.process.device, 256
        )
        correct = float((predictions == labels).sum())
        loss_sum, correct, count = all_sum([loss_sum, correct, len(labels)], self.process)
        return loss_sum / count, correct / count


def fit(
    model: nn.Module,
    train: Dataset,
    recipe: Recipe,
    *,
    val: Dataset | None = None,
    mean=CIFAR10_MEAN,
    std=CIFAR10_STD,
    device: torch.device | None = None,
    penalty: Callable[[nn.Module], torch.Tensor] | None = None,
    after_step: Callable[[nn.Module], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
    on_checkpoint: Callable[[dict], None] | None = None,
    start_epoch: int = 0,
    optimizer_state: dict | None = None,
    on_step: Callable[[StepReport], None] | None = None,
    objective: Objective | None = None,
    keep_start: bool = False,
) -> FitResult:
    """Train ``model`` (its forward takes a preprocessed float32 NCHW batch) on ``train``.

    Epochs ``start_epoch`` to ``recipe.epochs`` run; to resume, pass the epoch reached and the
    optimizer state saved then. The model is moved to ``device`` (default CUDA when present)
    and trained in place. Each epoch's shuffle, augmentation, mixup and dropout draw from
    seeds made of ``recipe.seed`` and the epoch (this resets torch's global RNG), so a
    resumed run repeats an uninterrupted one. ``penalty(model)`` is added to each step's
    loss; ``after_step(model)`` runs after each optimizer step. On rank 0 only,
    ``on_epoch(stats)`` gets each epoch's history entry: epoch (from 1), lr (of the last
    step), train_loss and train_accuracy (criterion loss without the penalty, on the
    augmented/mixed batches), val_loss and val_accuracy (plain cross-entropy on ``val``, None
    without it), images_per_s (training, all processes), seconds; then
    ``on_checkpoint(optimizer_state)`` gets what ``optimizer_state`` takes to resume.
    ``on_step(report)`` gets a ``StepReport`` after every optimizer step, e.g. to draw progress.
    ``objective`` adds a penalty, distillation, per-parameter learning rates or a step limit
    (``penalty`` alone may be passed as its own argument). With ``keep_start`` and ``val``, the
    model is scored before training too (history entry of epoch 0, on_epoch told, train stats
    None): an epoch is kept only when it beats every earlier one, the start included, so the
    best state is never worse than the start on ``val``.
    """
    objective = objective or Objective()
    if penalty is not None:
        objective = replace(objective, penalty=penalty)
    if not 0 <= start_epoch <= recipe.epochs:
        raise MbzError(f"cannot start at epoch {start_epoch} of a {recipe.epochs}-epoch recipe")
    if len(train) == 0:
        raise MbzError(f"{train.source} holds no training images")
    if val is not None and len(val) == 0:
        raise MbzError(f"{val.source} holds no validation images; pass val=None to skip it")
    with process_group(device) as process:
        if process.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        model.to(process.device).to(memory_format=torch.channels_last)
        plan = _Plan.of(train, recipe, process)
        trainer = _Trainer(model, recipe, process, plan, mean, std, objective, after_step)
        if optimizer_state is not None:
            trainer.optimizer.load_state_dict(optimizer_state)
        result = FitResult([], _cpu_state(model.state_dict()), start_epoch, None)
        if keep_start and val is not None:
            result = _score_start(trainer, val, mean, std, result)
            if process.main and on_epoch:
                on_epoch(result.history[-1])
        epochs = math.ceil(trainer.total_steps / plan.steps)
        for epoch in range(start_epoch, epochs):
            step_callback = on_step if process.main else None
            result = _run_epoch(trainer, epoch, val, mean, std, step_callback, result)
            if process.main and on_epoch:
                on_epoch(result.history[-1])
            if process.main and on_checkpoint:
                on_checkpoint(trainer.optimizer.state_dict())
        model.to(memory_format=torch.contiguous_format)
    return result


def _score_start(trainer: _Trainer, val: Dataset, mean, std, result: FitResult) -> FitResult:
    """``result`` with the untrained model's val scores as its best (history entry 0)."""
    start = time.perf_counter()
    val_loss, val_accuracy = trainer.validate(val, mean, std)
    stats = {
        "epoch": result.best_epoch,
        "lr": None,
        "train_loss": None,
        "train_accuracy": None,
        "images_per_s": None,
        "val_loss": val_loss,
        "val_accuracy": val_accuracy,
        "seconds": time.perf_counter() - start,
    }
    return replace(result, history=[*result.history, stats], best_val_accuracy=val_accuracy)


def _run_epoch(
    trainer: _Trainer,
    epoch: int,
    val: Dataset | None,
    mean,
    std,
    on_step: Callable[[StepReport], None] | None,
    result: FitResult,
) -> FitResult:
    """Train and validate one epoch; ``result`` with its stats and the best state so far."""
    start = time.perf_counter()
    stats = {"epoch": epoch + 1, **trainer.epoch(epoch, on_step)}
    val_loss, val_accuracy = (None, None) if val is None else trainer.validate(val, mean, std)
    stats.update(val_loss=val_loss, val_accuracy=val_accuracy)
    stats["seconds"] = time.perf_counter() - start
    history = [*result.history, stats]
    best = result.best_val_accuracy
    if val_accuracy is None or best is None or val_accuracy > best:
        state = _cpu_state(trainer.model.state_dict())
        return FitResult(history, state, epoch + 1, val_accuracy)
    return replace(result, history=history)
