"""mbz's training loop, for ``mbz train`` and for fine-tuning while packing.

SGD with Nesterov momentum and a per-step schedule (linear warm-up from 0, then cosine decay to
0), label smoothing, mixup, and random crop + horizontal flip done on whole batches on the
training device. The model trains in channels_last memory format (on the CPU too, where it
measured about 1.4x faster than NCHW for MobileNet-v2) and, on CUDA, in mixed precision
(bfloat16 where supported, else float16 with loss scaling). Launched by ``torchrun``
(``WORLD_SIZE`` > 1), every process trains a shard of each epoch under DistributedDataParallel
(gloo on the CPU, nccl on CUDA); only rank 0 prints and calls the callbacks.
"""

from __future__ import annotations

import contextlib
import functools
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace

import click
import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from mbz.data import CIFAR10_MEAN, CIFAR10_STD, Dataset
from mbz.errors import MbzError
from mbz.evaluate import pick_device
from mbz.records import check_record
from mbz.torch_graph import preprocess_images

CROP_PADDING = 4  # pixels of zero padding around each image before the random crop
_REFRESH_STEPS = 10  # progress-bar text refreshes (each one waits for the device)


@dataclass
class Recipe:
    """How to train; every field is a flag of ``mbz train`` with the same default.

    The defaults follow the reference reports (batch 128, peak LR 0.1, 5 warm-up epochs,
    weight decay 5e-4); the reports also used label smoothing 0.1 and mixup 0.2.
    """

    epochs: int = 30  # passes over the training images
    batch_size: int = 128  # images per optimizer step, all processes together
    lr: float = 0.1  # peak learning rate, reached at the end of the warm-up
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 5e-4  # L2 penalty on every parameter (SGD's weight_decay)
    warmup_epochs: float = 5.0  # linear warm-up from 0 to lr; cosine decay to 0 follows
    label_smoothing: float = 0.0
    mixup: float = 0.0  # alpha of the Beta(alpha, alpha) mixing weight; 0 turns mixup off
    augment: bool = True  # random crop (zero padding 4) and horizontal flip
    seed: int = 0  # shuffling, augmentation, mixup and dropout

    def __post_init__(self) -> None:
        """ValueError naming every out-of-range field."""
        checks = {
            "epochs must be >= 1": self.epochs >= 1,
            "batch_size must be >= 1": self.batch_size >= 1,
            "lr must be > 0": self.lr > 0,
            "momentum must be in [0, 1)": 0 <= self.momentum < 1,
            "nesterov needs momentum > 0": not self.nesterov or self.momentum > 0,
            "weight_decay must be >= 0": self.weight_decay >= 0,
            "warmup_epochs must be >= 0": self.warmup_epochs >= 0,
            "label_smoothing must be in [0, 1)": 0 <= self.label_smoothing < 1,
            "mixup must be >= 0": self.mixup >= 0,
        }
        problems = [message for message, ok in checks.items() if not ok]
        if problems:
            raise ValueError("; ".join(problems))

    def to_dict(self) -> dict:
        """Plain JSON-ready dict."""
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> Recipe:
        """Inverse of ``to_dict``; MbzError for unknown keys or out-of-range values."""
        try:
            return cls(**check_record(cls, data, "training recipe"))
        except ValueError as error:
            raise MbzError(f"invalid training recipe: {error}") from error


@dataclass
class FitResult:
    """What ``fit`` returns; the model itself is left with the weights of the last epoch."""

    history: list[dict]  # one dict per epoch trained by this call (see ``fit``)
    best_state: dict  # state_dict (CPU tensors) of the epoch with the best val accuracy
    best_epoch: int  # that epoch, counted from 1 like history's "epoch"
    best_val_accuracy: float | None  # None without val


@dataclass(frozen=True)
class _Process:
    """This process's place in a (possibly one-process) training run."""

    rank: int
    world: int
    device: torch.device

    @property
    def main(self) -> bool:
        return self.rank == 0


def is_main_process() -> bool:
    """False only in the processes of rank > 0 of a ``torchrun`` launch."""
    return int(os.environ.get("RANK", "0")) == 0


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Learning rate of optimizer step ``step`` (from 0): linear warm-up, then cosine to 0."""
    if step < warmup_steps:
        return peak * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return 0.5 * peak * (1 + math.cos(math.pi * min(1.0, progress)))


def augment_batch(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding ``CROP_PADDING``) and horizontal flip of each image.

    ``images`` is a batch [N, H, W, C] of any dtype on any device; one gather over the batch,
    no per-image loop. Each output image is an H x W window of its zero-padded input, mirrored
    left-right with probability 1/2.
    """
    n, height, width, _ = images.shape
    device = images.device
    padded = F.pad(images, (0, 0, CROP_PADDING, CROP_PADDING, CROP_PADDING, CROP_PADDING))
    span = 2 * CROP_PADDING + 1
    top = torch.randint(0, span, (n, 1), generator=generator, device=device)
    left = torch.randint(0, span, (n, 1), generator=generator, device=device)
    flip = torch.rand((n, 1), generator=generator, device=device) < 0.5
    rows = top + torch.arange(height, device=device)
    cols = left + torch.arange(width, device=device)
    cols = torch.where(flip, cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None]
    return padded[batch, rows[:, :, None], cols[:, None, :]]


class _Normalizer:
    """uint8 NHWC batch -> float32 NCHW ``(x / 255 - mean) / std``, as SPEC.md section 6."""

    def __init__(self, mean, std, device: torch.device) -> None:
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = images.permute(0, 3, 1, 2).float().div_(255)
        # The permuted NHWC batch is channels_last already; this keeps it so.
        return ((x - self.mean) / self.std).contiguous(memory_format=torch.channels_last)


def _seed(*parts: int) -> int:
    """A 63-bit seed mixing ``parts`` (seed, epoch, rank)."""
    return int(np.random.SeedSequence(list(parts)).generate_state(2, np.uint64)[0] >> 1)


def _cpu_state(state: dict) -> dict:
    """A CPU copy of a state_dict in the default memory format."""
    return {
        key: value.detach().to("cpu", memory_format=torch.contiguous_format, copy=True)
        for key, value in state.items()
    }


@contextlib.contextmanager
def _process_group(device: torch.device | None) -> Iterator[_Process]:
    """This process's rank, world size and device; joins torchrun's process group if any."""
    device = device or pick_device()
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        yield _Process(0, 1, device)
        return
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    created = not dist.is_initialized()
    if created:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield _Process(dist.get_rank(), dist.get_world_size(), device)
    finally:
        if created:
            dist.destroy_process_group()


def _all_sum(values: list[float], process: _Process) -> list[float]:
    """Element-wise sum of ``values`` over all processes."""
    if process.world == 1:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=process.device)
    dist.all_reduce(tensor)
    return tensor.tolist()


def _broadcast_buffers(model: nn.Module, process: _Process) -> None:
    """Give every process rank 0's BatchNorm statistics (they drift apart within an epoch)."""
    if process.world > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


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
    loss_sum, predictions = 0.0, []
    for begin in range(0, len(labels), batch_size):
        x = preprocess_images(images[begin : begin + batch_size], preprocess, device)
        target = torch.as_tensor(labels[begin : begin + batch_size], device=device)
        logits = model(x).float()
        loss_sum += float(F.cross_entropy(logits, target, reduction="sum"))
        predictions.append(logits.argmax(1).cpu().numpy())
    return loss_sum, np.concatenate(predictions) if predictions else np.zeros(0, np.int64)


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
    parts = np.sort(order[count:]), np.sort(order[:count])
    names = (f"{dataset.source} without holdout", f"{dataset.source} holdout {fraction:g}")
    return tuple(
        replace(dataset, images=dataset.images[part], labels=dataset.labels[part], source=name)
        for part, name in zip(parts, names, strict=True)
    )


@dataclass
class _Plan:
    """How one process walks the training images: its shard, batch and step counts."""

    images: torch.Tensor  # uint8 NHWC, all training images, on the device
    labels: torch.Tensor
    shard: int  # images per process per epoch (the epoch's order is padded to divide evenly)
    batch: int  # images per process per step
    steps: int  # optimizer steps per epoch

    @classmethod
    def of(cls, train: Dataset, recipe: Recipe, process: _Process) -> _Plan:
        shard = math.ceil(len(train) / process.world)
        batch = max(1, math.ceil(recipe.batch_size / process.world))
        images = torch.as_tensor(np.ascontiguousarray(train.images), device=process.device)
        labels = torch.as_tensor(train.labels, dtype=torch.int64, device=process.device)
        return cls(images, labels, shard, batch, math.ceil(shard / batch))

    def order(self, seed: int, process: _Process) -> torch.Tensor:
        """This process's image indices for an epoch: a shared shuffle, every world-th one."""
        generator = torch.Generator().manual_seed(seed)
        order = torch.randperm(len(self.labels), generator=generator)
        order = order.repeat(math.ceil(self.shard * process.world / len(order)))
        return order[: self.shard * process.world][process.rank :: process.world].to(process.device)


class _Trainer:
    """One ``fit`` call's state: the model (DDP-wrapped when distributed), optimizer, AMP."""

    def __init__(
        self,
        model: nn.Module,
        recipe: Recipe,
        process: _Process,
        plan: _Plan,
        mean,
        std,
        penalty,
        after_step,
    ) -> None:
        self.model, self.recipe, self.process, self.plan = model, recipe, process, plan
        self.penalty, self.after_step = penalty, after_step
        self.normalize = _Normalizer(mean, std, process.device)
        cuda = process.device.type == "cuda"
        self.net = (
            DistributedDataParallel(model, device_ids=[process.device.index] if cuda else None)
            if process.world > 1
            else model
        )
        self.optimizer = torch.optim.SGD(
            model.parameters(),
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
        self.total_steps = recipe.epochs * plan.steps
        self.warmup_steps = round(recipe.warmup_epochs * plan.steps)

    def _loss(self, logits: torch.Tensor, target: torch.Tensor, mixed: tuple | None):
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

    def _mix(self, x: torch.Tensor, target: torch.Tensor, generator, rng) -> tuple:
        """Mixup: the batch blended with a shuffled copy of itself."""
        if self.recipe.mixup <= 0:
            return x, None
        weight = float(rng.beta(self.recipe.mixup, self.recipe.mixup))
        shuffle = torch.randperm(len(target), generator=generator, device=x.device)
        return weight * x + (1 - weight) * x[shuffle], (target[shuffle], weight)

    def step(self, indices: torch.Tensor, step: int, generator, rng) -> tuple[torch.Tensor, ...]:
        """One optimizer step on the images at ``indices``; (loss sum, correct) on the device."""
        images, target = self.plan.images[indices], self.plan.labels[indices]
        if self.recipe.augment:
            images = augment_batch(images, generator)
        x, mixed = self._mix(self.normalize(images), target, generator, rng)
        lr = lr_at(step, self.total_steps, self.warmup_steps, self.recipe.lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        with self.autocast():
            logits = self.net(x)
        loss, correct = self._loss(logits.float(), target, mixed)
        total = loss + self.penalty(self.model) if self.penalty else loss
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(total).backward()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        if self.after_step:
            self.after_step(self.model)
        return loss.detach() * len(target), correct.detach()

    def epoch(self, epoch: int, progress: bool) -> dict:
        """Train one epoch; its loss, accuracy, last learning rate and speed."""
        recipe, plan, process = self.recipe, self.plan, self.process
        seed = _seed(recipe.seed, epoch, process.rank)
        torch.manual_seed(seed)  # dropout
        generator = torch.Generator(process.device).manual_seed(seed)
        rng = np.random.default_rng(seed)
        order = plan.order(_seed(recipe.seed, epoch), process)
        self.net.train()
        sums = torch.zeros(2, dtype=torch.float64, device=process.device)
        start, label = time.perf_counter(), f"epoch {epoch + 1}/{recipe.epochs}"
        with _progress(plan.steps, label, progress and process.main) as update:
            for index in range(plan.steps):
                indices = order[index * plan.batch : (index + 1) * plan.batch]
                loss, correct = self.step(indices, epoch * plan.steps + index, generator, rng)
                sums += torch.stack([loss.double(), correct.double()])
                done = min((index + 1) * plan.batch, plan.shard)
                update(functools.partial(_speed, sums, done, start))
        loss_sum, correct, count = _all_sum([*sums.tolist(), plan.shard], process)
        seconds = time.perf_counter() - start
        return {
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / count,
            "train_accuracy": correct / count,
            "images_per_s": count / seconds,
        }

    def validate(self, val: Dataset, mean, std) -> tuple[float, float]:
        """(val loss, val accuracy), each process scoring a shard of ``val``."""
        _broadcast_buffers(self.model, self.process)
        rank, world = self.process.rank, self.process.world
        images, labels = val.images[rank::world], val.labels[rank::world]
        self.model.eval()
        loss_sum, predictions = _loss_sum_and_predictions(
            self.model, images, labels, {"mean": mean, "std": std}, self.process.device, 256
        )
        correct = float((predictions == labels).sum())
        loss_sum, correct, count = _all_sum([loss_sum, correct, len(labels)], self.process)
        return loss_sum / count, correct / count


def _speed(sums: torch.Tensor, images: int, start: float) -> str:
    """Progress-bar text: running loss, accuracy and images/s of this process."""
    loss, correct = sums.tolist()
    rate = images / max(time.perf_counter() - start, 1e-9)
    return f"loss {loss / images:.3f}  acc {100 * correct / images:5.1f}%  {rate:,.0f} img/s"


@contextlib.contextmanager
def _progress(steps: int, label: str, enabled: bool) -> Iterator[Callable]:
    """A click progress bar on stderr; yields ``update(text)``, where ``text()`` builds the
    bar's text and is only called every few steps (it waits for the device)."""
    if not enabled:
        yield lambda text: None
        return
    bar = click.progressbar(
        length=steps,
        label=label,
        file=click.get_text_stream("stderr"),
        item_show_func=lambda text: text,
    )
    done, shown = 0, ""
    with bar:

        def update(text: Callable[[], str]) -> None:
            nonlocal done, shown
            done += 1
            if done % _REFRESH_STEPS == 0 or done == steps:
                shown = text()
            bar.update(1, shown)

        yield update


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
    progress: bool = True,
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
    """
    if not 0 <= start_epoch <= recipe.epochs:
        raise MbzError(f"cannot start at epoch {start_epoch} of a {recipe.epochs}-epoch recipe")
    if len(train) == 0:
        raise MbzError(f"{train.source} holds no training images")
    if val is not None and len(val) == 0:
        raise MbzError(f"{val.source} holds no validation images; pass val=None to skip it")
    with _process_group(device) as process:
        if process.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        model.to(process.device, memory_format=torch.channels_last)
        plan = _Plan.of(train, recipe, process)
        trainer = _Trainer(model, recipe, process, plan, mean, std, penalty, after_step)
        if optimizer_state is not None:
            trainer.optimizer.load_state_dict(optimizer_state)
        result = FitResult([], _cpu_state(model.state_dict()), start_epoch, None)
        for epoch in range(start_epoch, recipe.epochs):
            result = _run_epoch(trainer, epoch, val, mean, std, progress, result)
            if process.main and on_epoch:
                on_epoch(result.history[-1])
            if process.main and on_checkpoint:
                on_checkpoint(trainer.optimizer.state_dict())
        model.to(memory_format=torch.contiguous_format)
    return result


def _run_epoch(
    trainer: _Trainer,
    epoch: int,
    val: Dataset | None,
    mean,
    std,
    progress: bool,
    result: FitResult,
) -> FitResult:
    """Train and validate one epoch; ``result`` with its stats and the best state so far."""
    start = time.perf_counter()
    stats = {"epoch": epoch + 1, **trainer.epoch(epoch, progress)}
    val_loss, val_accuracy = (None, None) if val is None else trainer.validate(val, mean, std)
    stats.update(val_loss=val_loss, val_accuracy=val_accuracy)
    stats["seconds"] = time.perf_counter() - start
    history = [*result.history, stats]
    best = result.best_val_accuracy
    if val is None or best is None or val_accuracy > best:
        state = _cpu_state(trainer.model.state_dict())
        return FitResult(history, state, epoch + 1, val_accuracy)
    return replace(result, history=history)
