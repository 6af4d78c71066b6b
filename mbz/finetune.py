"""Fine-tuning while packing (``mbz pack --finetune-epochs N``), so compression keeps accuracy.

One schedule with the float model as teacher: the command's fine-tuning budget
(``--finetune-epochs`` or ``--finetune-steps``) is shared by its runs (``planned_runs``), one
after each compression step, in this order, so the last run trains the quantized model that
is packed (with the pruning masks fixed); run k of n gets k / (1 + ... + n) of it, the later
(more compressed) runs more. Each run trains on the train
split of ``--data``, less a held-out part (``--val-fraction``) whose accuracy picks the
checkpoint that goes on; the test split is never seen here.

- Channel pruning, network slimming (Liu et al. 2017): on the torch module, ``--prune-steps``
  rounds each raise the pruned share towards ``--prune`` (ranking the channel spaces of
  ``mbz.prune`` by ``taylor_importance`` per weight removed), zero the dropped channels' gamma
  and beta, re-estimate every BatchNorm's statistics (``reestimate_batchnorm``), hold them at
  zero with masks while fine-tuning under an L1 penalty on every gamma (``--l1``); the packed
  network is then physically smaller (``prune_zeroed_channels``).
- Weight pruning: gradual magnitude pruning (Zhu & Gupta 2017) on the folded graph, the
  pruned share rising on a cubic schedule to ``--prune`` at 3/4 of the fine-tuning steps, the
  masks re-applied after every step; the final masks are what the file stores.
- Quantized weights and activations: the folded graph as a ``TrainableGraph`` (``mbz.qat``):
  k-means QAT (centroids and the weights' assignment to them), uniform QAT with LSQ scales,
  with the calibrated activation ``quantize`` nodes in place. One code path for all of them.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import cast

import numpy as np
import torch
from torch import nn

from mbz.capture import capture
from mbz.config import PackConfig
from mbz.data import Dataset, load_split, load_unlabelled
from mbz.errors import MbzError
from mbz.evaluate import pick_device
from mbz.format import Tensor
from mbz.format.encodings import encoding_of
from mbz.graph_ops import weight_nodes
from mbz.prune import batchnorm_keep_masks, magnitude_masks, plan_channels
from mbz.qat import TRAINABLE, FloatWeight, TrainableGraph
from mbz.torch_graph import preprocess_images
from mbz.train_distill import Distillation
from mbz.train_recipe import Recipe
from mbz.training import FitResult, Objective, StepReport, evaluate_model, fit, split_holdout

# Images per fine-tuning step. Three epochs of the 3,295 images that README's "20-30x" packs
# fine-tune on are 78 steps at 128, 156 at 64; there, at 64 (and with the later runs getting
# more steps, ``Tuning.steps``), 30x packs of two models changed held-out top-1 by -1.2 and
# +0.5 points on average over three seeds, against -5.7 and -1.7 at 128 with equal shares
BATCH_SIZE = 64
PRUNING_WEIGHT_DECAY = 5e-4  # as in training; fine-tuning quantized weights uses none
GMP_END = 0.75  # gradual magnitude pruning reaches its target after this share of the steps
GMP_UPDATES = 16  # mask updates on the way there (every step for short runs)
BN_IMAGES = 1024  # training images that re-estimate BatchNorm statistics after pruning
TAYLOR_IMAGES = 512  # training images whose gradients rank channels before each slimming cut
TAYLOR_BATCH = 32  # images per gradient of that ranking (its squares are averaged over batches)


@dataclass
class Tuning:
    """What fine-tuning trains on and where: ``train`` picks the weights, ``val`` (held out
    from the same train split) picks the best epoch. ``history`` collects every epoch's stats,
    each with the ``stage`` it belongs to."""

    train: Dataset
    val: Dataset
    config: PackConfig
    device: torch.device = field(default_factory=pick_device)
    on_stage: Callable[[str], None] | None = None  # told each stage's name as it starts
    on_step: Callable[[StepReport], None] | None = None  # ``fit``'s, for every stage
    on_epoch: Callable[[dict], None] | None = None  # told each epoch's stats (and the start's)
    history: list[dict] = field(default_factory=list)
    distill: Distillation | None = None  # the float model as teacher (``taught_by``)
    keep_start: bool = True  # False: keep the best trained epoch even if the start was better

    @classmethod
    def of(
        cls,
        training: Dataset,
        config: PackConfig,
        device: torch.device | None = None,
        on_stage: Callable[[str], None] | None = None,
        on_step: Callable[[StepReport], None] | None = None,
        on_epoch: Callable[[dict], None] | None = None,
    ) -> Tuning:
        """Hold out ``config.val_fraction`` of ``training`` (chosen by ``config.seed``)."""
        train, val = split_holdout(training, config.val_fraction, config.seed)
        return cls(train, val, config, device or pick_device(), on_stage, on_step, on_epoch)

    def taught_by(self, teacher: nn.Module) -> Tuning:
        """This tuning distilling from ``teacher`` (the float model before compression) with
        ``config.distill_weight`` and ``config.temperature``; itself when the weight is 0 or
        it has a teacher already. The history is shared."""
        if self.distill is not None or self.config.distill_weight == 0:
            return self
        config = self.config
        return replace(
            self, distill=Distillation.of(teacher, config.distill_weight, config.temperature)
        )

    def fit(
        self,
        model: nn.Module,
        stage: str,
        weight_decay: float,
        *,
        keep_start: bool = True,
        lr: float | None = None,
        objective: Objective | None = None,
        on_epoch: Callable[[dict], None] | None = None,
        penalty: Callable[[nn.Module], torch.Tensor] | None = None,
        after_step: Callable[[nn.Module], None] | None = None,
    ) -> FitResult:
        """``steps()`` optimizer steps of ``mbz.training.fit`` on ``train`` (distilling from
        the teacher, if any), scored on ``val`` after each epoch and, with ``keep_start``,
        before the first: the state kept is the best, the start when no epoch beats it. ``lr``
        is the peak learning rate (default ``config.pruning_lr()``). The stats join ``history``
        under ``stage``."""
        config = self.config
        recipe = Recipe(
            epochs=math.ceil(self.steps() / self.steps_per_epoch()),
            batch_size=BATCH_SIZE,
            lr=lr or config.pruning_lr(),
            weight_decay=weight_decay,
            warmup_epochs=0.0,
            seed=config.seed,
        )
        objective = replace(objective or Objective(), distill=self.distill, max_steps=self.steps())
        if self.on_stage:
            self.on_stage(stage)
        result = fit(
            model,
            self.train,
            recipe,
            val=self.val,
            mean=config.mean,
            std=config.std,
            device=self.device,
            on_step=self.on_step,
            on_epoch=_both(on_epoch, self.on_epoch),
            objective=objective,
            keep_start=keep_start and self.keep_start,
            penalty=penalty,
            after_step=after_step,
        )
        self.history += [{"stage": stage, **stats} for stats in result.history]
        self.mark_packed(result.best_epoch)
        return result

    def mark_packed(self, epoch: int) -> None:
        """Flag ``epoch`` of the last stage as the one whose weights go on (``packed``)."""
        stage = self.history[-1]["stage"]
        for row in self.history:
            if row["stage"] == stage:
                row["packed"] = row["epoch"] == epoch

    def steps_per_epoch(self) -> int:
        """Optimizer steps of one pass over ``train``."""
        return math.ceil(len(self.train) / BATCH_SIZE)

    def steps(self) -> int:
        """Optimizer steps of the next ``fit`` call: run k (the stages in ``history`` so far,
        plus one) of the ``planned_runs`` n gets k / (1 + ... + n) of the command's budget
        (``finetune_steps``, else ``finetune_epochs`` passes over ``train``), at least one
        step. The later runs start further from the float model and get more."""
        config = self.config
        total = config.finetune_steps or config.finetune_epochs * self.steps_per_epoch()
        runs = planned_runs(config)
        done = min(len({row["stage"] for row in self.history}), runs - 1)

        def until(run: int) -> int:  # steps of runs 1..run together
            return round(total * run * (run + 1) / (runs * (runs + 1)))

        return max(1, until(done + 1) - until(done))


def planned_runs(config: PackConfig) -> int:
    """How many fine-tuning runs packing with ``config`` makes: one per channel-pruning round,
    one for gradual weight pruning, one for the quantized model (none when every weight stays
    float32 and activations float)."""
    pruning = config.prune_steps if config.prune_mode == "channel" else 1
    float32 = {*config.bits.values(), config.default_bits} == {32}
    quantized = config.budgeted or bool(config.act_bits) or not float32
    return (pruning if config.prune > 0 else 0) + int(quantized) or 1


def _both(*callbacks: Callable[[dict], None] | None) -> Callable[[dict], None]:
    """One callback calling each of ``callbacks`` that is given."""

    def call(stats: dict) -> None:
        for callback in callbacks:
            if callback is not None:
                callback(stats)

    return call


def load_training(
    source: str,
    data_root: str | None,
    teacher: nn.Module | None = None,
    config: PackConfig | None = None,
) -> Dataset:
    """The train split of ``source`` for fine-tuning. An .npz with ``x_train`` but no
    ``y_train`` gives unlabelled images, which ``teacher`` (the float model, fed images
    normalised as ``config`` says) labels with its predictions, for distillation. An MbzError
    that says what to do when there is no train split (or no teacher for unlabelled images)."""
    try:
        return load_split(source, "train", data_root=data_root)
    except MbzError as error:
        found = None if teacher is None else load_unlabelled(source, "train")
        if teacher is None or found is None:
            raise MbzError(
                f"fine-tuning (--finetune-epochs) trains on the train split of --data, which "
                f"could not be read: {error}. Pass --data with x_train (and y_train), or "
                "--finetune-epochs 0"
            ) from error
    images, classes, name = found
    unlabelled = Dataset(images, np.zeros(len(images), np.int64), classes, name)
    config = config or PackConfig()
    _, _, predicted = evaluate_model(teacher, unlabelled, mean=config.mean, std=config.std)
    return replace(unlabelled, labels=predicted, source=f"{name} (labelled by the float model)")


# Channel pruning: network slimming on the torch module.


def _batchnorms(module: nn.Module, names: list[str]) -> dict[str, nn.BatchNorm2d]:
    """The BatchNorm modules behind the graph's batchnorm nodes (named by module path)."""
    found = {}
    for name in names:
        try:
            bn = module.get_submodule(name)
        except AttributeError:
            bn = None
        if not isinstance(bn, nn.BatchNorm2d) or not bn.affine:
            raise MbzError(
                f"channel fine-tuning needs the affine BatchNorm2d module {name!r} of the "
                "model, which it cannot find; pass --finetune-epochs 0 or --prune-mode weight"
            )
        found[name] = bn
    return found


def _channel_masks(
    module: nn.Module, fraction: float, importance: dict[str, np.ndarray]
) -> dict[str, np.ndarray]:
    """Per BatchNorm (module path): the channels a ``fraction`` channel pruning keeps, ranked
    by ``importance`` (``taylor_importance``) per weight removed."""
    captured = capture(module)
    graph, params, gamma = captured.graph, captured.params, captured.bn_gamma
    plan = plan_channels(graph, params, gamma, fraction, importance)
    return batchnorm_keep_masks(plan, gamma)


def taylor_importance(
    model: nn.Module, data: Dataset, preprocess: dict, device: torch.device | str
) -> dict[str, np.ndarray]:
    """Per affine BatchNorm (module path), each channel's first-order estimate of how much the
    cross-entropy on ``data`` rises when its gamma and beta are zeroed (Molchanov et al. 2019):
    ``(gamma * dL/dgamma + beta * dL/dbeta) ** 2`` averaged over batches of ``TAYLOR_BATCH``,
    the BatchNorms in eval mode. Unlike |gamma|, it compares channels across layers (both are
    loss) and sees what a channel's beta and the layers after it contribute."""
    bns = {
        name: bn
        for name, bn in model.named_modules()
        if isinstance(bn, nn.BatchNorm2d) and bn.affine
    }
    sums = {name: torch.zeros_like(bn.weight) for name, bn in bns.items()}
    training = model.training
    model.eval()
    starts = range(0, len(data), TAYLOR_BATCH)
    for start in starts:
        model.zero_grad()
        images = preprocess_images(data.images[start : start + TAYLOR_BATCH], preprocess, device)
        labels = torch.from_numpy(data.labels[start : start + TAYLOR_BATCH]).to(device)
        nn.functional.cross_entropy(model(images), labels).backward()
        for name, bn in bns.items():
            change = bn.weight * cast(torch.Tensor, bn.weight.grad)
            sums[name] += (change + bn.bias * cast(torch.Tensor, bn.bias.grad)).detach() ** 2
    model.zero_grad()
    model.train(training)
    return {name: (total / len(starts)).cpu().numpy() for name, total in sums.items()}


@torch.no_grad()
def reestimate_batchnorm(
    model: nn.Module, images: np.ndarray, preprocess: dict, device: torch.device | str
) -> None:
    """Re-estimate every BatchNorm's running statistics on the uint8 ``images`` (adaptive
    BatchNorm, Li et al. 2020), in batches of ``BATCH_SIZE``; the model's mode and the
    BatchNorms' momentum are left as they were. After pruning, the layers after the zeroed
    channels see inputs whose mean and spread the statistics of the unpruned model no longer
    describe (a CIFAR-10 MobileNet-v2 with 18% of its weights pruned started fine-tuning at
    11% held-out accuracy with the old statistics, at 41.5% with re-estimated ones)."""
    batchnorms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    momenta = [bn.momentum for bn in batchnorms]
    for bn in batchnorms:
        bn.reset_running_stats()
        bn.momentum = None  # a cumulative average over the batches below
    training = model.training
    model.train()
    for start in range(0, len(images), BATCH_SIZE):
        model(preprocess_images(images[start : start + BATCH_SIZE], preprocess, device))
    for bn, momentum in zip(batchnorms, momenta, strict=True):
        bn.momentum = momentum
    model.train(training)


def slim(module: nn.Module, tuning: Tuning) -> nn.Module:
    """Network slimming: a fine-tuned copy of ``module`` whose pruned channels have exactly
    zero BatchNorm gamma and beta (see the module docstring). ``module`` is left as it is."""
    if isinstance(module, torch.jit.ScriptModule):
        raise MbzError(
            "channel pruning with fine-tuning trains the model's BatchNorm modules, which a "
            "TorchScript file does not expose: pass its state_dict or an mbz checkpoint, or use "
            "--prune-mode weight"
        )
    config = tuning.config
    model = copy.deepcopy(module).to(tuning.device)
    preprocess = {"mean": config.mean, "std": config.std}
    keep: dict[str, np.ndarray] = {}
    for step in range(1, config.prune_steps + 1):
        fraction = config.prune * step / config.prune_steps
        ranking = tuning.train.head(TAYLOR_IMAGES)
        importance = taylor_importance(model, ranking, preprocess, tuning.device)
        found = _channel_masks(model, fraction, importance)
        keep = {name: mask & keep.get(name, True) for name, mask in found.items()}
        bns = _batchnorms(model, list(keep))
        masks = {name: torch.from_numpy(keep[name]).to(tuning.device) for name in bns}

        @torch.no_grad()
        def hold(_: nn.Module, bns=bns, masks=masks) -> None:
            for name, bn in bns.items():
                bn.weight.masked_fill_(~masks[name], 0.0)
                bn.bias.masked_fill_(~masks[name], 0.0)

        def penalty(_: nn.Module, bns=bns) -> torch.Tensor:
            return config.l1 * sum(bn.weight.abs().sum() for bn in bns.values())

        hold(model)
        reestimate_batchnorm(model, tuning.train.images[:BN_IMAGES], preprocess, tuning.device)
        stage = f"channel pruning {step}/{config.prune_steps} ({fraction:.0%} of weights)"
        result = tuning.fit(model, stage, PRUNING_WEIGHT_DECAY, penalty=penalty, after_step=hold)
        model.load_state_dict(result.best_state)
    return model.cpu().eval()


# Weight pruning: gradual magnitude pruning on the folded graph.


def gmp_fraction(step: int, end: int, target: float) -> float:
    """Zhu & Gupta's cubic schedule: the pruned share after ``step`` of ``end`` steps."""
    return target * (1.0 - (1.0 - min(step, end) / end) ** 3)


@dataclass
class _GradualPruning:
    """``after_step`` and ``on_epoch`` of gradual magnitude pruning; remembers the best
    epoch among those that reached the target (the earlier ones hold fewer zeros)."""

    graph: dict
    model: TrainableGraph
    target: float
    end: int
    steps_per_epoch: int
    step: int = 0
    best: tuple[float, int, dict] | None = None  # val accuracy, epoch, state_dict

    def after_step(self, _: nn.Module) -> None:
        self.step += 1
        interval = max(1, self.end // GMP_UPDATES)
        if self.step <= self.end and (self.step % interval == 0 or self.step == self.end):
            self.prune(gmp_fraction(self.step, self.end, self.target))
        else:
            self.model.apply_masks()

    def prune(self, fraction: float) -> None:
        """Global magnitude masks for ``fraction`` over the current weights."""
        names = self.model.weight_names()
        weights = {
            name: _float_weight(self.model, name).weight.detach().cpu().numpy() for name in names
        }
        for name, mask in magnitude_masks(self.graph, weights, fraction).items():
            _float_weight(self.model, name).set_mask(mask)

    def on_epoch(self, stats: dict) -> None:
        reached = stats["epoch"] * self.steps_per_epoch >= self.end
        if reached and (self.best is None or stats["val_accuracy"] > self.best[0]):
            state = {k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()}
            self.best = (stats["val_accuracy"], stats["epoch"], state)


def prune_weights(
    graph: dict, params: dict[str, np.ndarray], tuning: Tuning
) -> dict[str, np.ndarray]:
    """Gradual magnitude pruning of the folded ``graph`` to ``config.prune`` while
    fine-tuning; ``params`` take the fine-tuned values (zero where pruned). Returns the
    keep-masks by weight name."""
    names = [node["params"]["weight"] for node in weight_nodes(graph)]
    model = TrainableGraph(graph, params, masks={n: np.ones(params[n].shape, bool) for n in names})
    end = max(1, round(GMP_END * tuning.steps()))
    schedule = _GradualPruning(graph, model, tuning.config.prune, end, tuning.steps_per_epoch())
    stage = f"gradual magnitude pruning to {tuning.config.prune:.0%} of weights"
    tuning.fit(
        model,
        stage,
        PRUNING_WEIGHT_DECAY,
        keep_start=False,  # the start is not pruned yet
        after_step=schedule.after_step,
        on_epoch=schedule.on_epoch,
    )
    if schedule.best is None:  # the last epoch reaches ``end`` <= the steps run
        raise RuntimeError("gradual pruning ended before it reached its target")
    _, epoch, state = schedule.best
    model.load_state_dict(state)
    tuning.mark_packed(epoch)
    model.cpu()
    params.update(model.float_values())
    masks = {name: _float_weight(model, name).mask for name in model.weight_names()}
    return {name: mask.numpy() for name, mask in masks.items() if mask is not None}


def _float_weight(model: TrainableGraph, name: str) -> FloatWeight:
    # gradual pruning builds its TrainableGraph from float weights only (no stored tensors)
    return cast(FloatWeight, model.weight(name))


# Quantized weights and activations: the trainable folded graph.


def _stage(graph: dict, tensors: dict[str, Tensor]) -> str | None:
    """What quantization fine-tuning does here; None when nothing is quantized."""
    weights = [node["params"]["weight"] for node in graph["nodes"] if "weight" in node["params"]]
    stored = {encoding_of(tensors[name]) for name in weights}  # biases (float16 or 32) aside
    chosen = [t.stage for e, t in TRAINABLE.items() if e in stored and t.stage is not None]
    if any(node["op"] == "quantize" for node in graph["nodes"]):
        chosen.append("quantized activations")
    return ", ".join(chosen) if chosen else None


def finetune_quantized(
    graph: dict, params: dict[str, np.ndarray], tensors: dict[str, Tensor], tuning: Tuning
) -> dict[str, Tensor]:
    """Fine-tune the quantized model (``graph`` with its activation quantize nodes, weights
    stored as ``tensors``, float ``params`` as the latent weights of uniform QAT); returns the
    tensors of its best epoch (or of the start), ``tensors`` themselves when nothing is
    quantized."""
    stage = _stage(graph, tensors)
    if stage is None:
        return tensors
    model = TrainableGraph(graph, params, tensors)
    lr = tuning.config.quantized_lr
    result = tuning.fit(model, stage, 0.0, lr=lr, after_step=lambda _: model.apply_masks())
    model.load_state_dict(result.best_state)
    return model.cpu().export(tensors)
