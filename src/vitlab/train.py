"""Training: AdamW (or SGD, with Muon for the matrices: vitlab.optim), linear warmup + cosine decay, batched
on-device augmentation, an optional weight average (EMA), best-on-validation weights.

The shape of DeiT's engine: ``train`` is the driver (build, restore, then per epoch ``train_one_epoch``,
validation, keeping the best weights and saving the state); ``_Run.build`` builds what the steps use once,
``_restore`` puts a saved state back, and the divergence check is ``_Watch``.

The whole training split sits in memory as one uint8 tensor on the training device; each step indexes a batch,
augments it there (vitlab.data.augment) and feeds it to the model, so no per-image Python work happens in the
loop. On CUDA the step runs under bf16 autocast (``amp``) with TF32 matmuls; conv nets run channels_last on
every device (measured faster on CPU too); ``compile`` puts the model through ``torch.compile``.

A run can be resumed: after every epoch the whole training state (weights, optimizer, schedule, history, best
epoch and every random generator) is saved, so a run killed at any moment continues after its last complete
epoch and ends bit-identical to one that was never interrupted (on CPU; GPU kernels may not be deterministic).

Under ``torchrun`` the same call trains on every process with DistributedDataParallel (vitlab.distributed):
``batch_size`` is the global batch, split evenly over the processes, so the schedule does not depend on how
many there are (nor, augmentation draws aside, the result); only rank 0 saves state and reports epochs.

With a ``teacher``, the model (a ViT with ``distillation``) learns by DeiT's hard-label distillation
(vitlab.distill): its class head the labels, its distillation head the teacher's predictions on the same
augmented batch.

A run that diverges (a non-finite loss, gradient norm or weight) stops at once with a VitlabError naming the
epoch, the step and the params to change, before anything of that epoch is saved (see ``_Watch``).

With ``time_budget_s`` training stops when that much wall-clock time is spent (or after ``epochs``), and the
learning-rate schedule follows the elapsed share of the budget instead of the step count; such a run depends
on the machine's speed, so it is not reproducible.
"""

from __future__ import annotations

import copy
import hashlib
import itertools
import json
import math
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from vitlab.checkpoint import UNREADABLE, Normalization, save_torch
from vitlab.data.augment import BatchAugment
from vitlab.data.prepared import PreparedDataset, Split
from vitlab.device import autocast, hardware_description, select_device, uses_bf16
from vitlab.distill import BothHeads, distillation_loss
from vitlab.distributed import World, process_group
from vitlab.errors import VitlabError
from vitlab.evaluate import predict_logits
from vitlab.models import describe_model, distills, init_from_data
from vitlab.models.vit import mean_of_heads
from vitlab.models.whitening import WHITENING_IMAGES
from vitlab.optim import Optimizers, build_optimizers
from vitlab.params import DataParams, TrainParams


@dataclass
class TrainResult:
    """What ``train`` measured: one history row per epoch, the epoch whose weights were kept, the wall time
    in seconds (earlier sessions of a resumed run included) and the device it ran on."""

    history: list[dict[str, float]] = field(default_factory=list)
    best_epoch: int = 0
    best_val_accuracy: float = float("nan")  # NaN without a validation split
    wall_time_s: float = 0.0
    device: str = "cpu"

    def metrics(self, num_parameters: int, train_images: int) -> dict[str, Any]:
        """reports/train/metrics.json. best_val_accuracy is null without a validation split (not NaN, which
        strict JSON readers refuse); images_per_s is the mean over the epochs."""
        return {
            "best_epoch": self.best_epoch,
            "best_val_accuracy": None if math.isnan(self.best_val_accuracy) else self.best_val_accuracy,
            "final_train_accuracy": self.history[-1]["train_accuracy"],
            "num_parameters": num_parameters,
            "train_images": train_images,
            "wall_time_s": round(self.wall_time_s, 1),
            "images_per_s": round(float(np.mean([row["images_per_s"] for row in self.history])), 1),
            "device": self.device,
            "hardware": hardware_description(self.device),
        }

    def __str__(self) -> str:
        kept = (
            f"no validation split: the last epoch ({self.best_epoch}) kept"
            if math.isnan(self.best_val_accuracy)
            else f"best val accuracy {self.best_val_accuracy:.4f} at epoch {self.best_epoch}"
        )
        return f"{kept}; {self.wall_time_s:.0f} s"


def split_train_val(split: Split, val_fraction: float, seed: int) -> tuple[Split, Split | None]:
    """A seeded random hold-out of ``val_fraction`` of the training split (None when it rounds to 0 images).

    Raises VitlabError when the hold-out would leave no image to train on.
    """
    n_val = round(len(split) * val_fraction)
    if n_val == 0:
        return split, None
    if n_val >= len(split):
        raise VitlabError(
            f"data.val_fraction={val_fraction} holds out all {len(split)} training images: "
            "lower it so that some are left to train on"
        )
    order = np.random.default_rng(seed).permutation(len(split))
    val_idx, train_idx = np.sort(order[:n_val]), np.sort(order[n_val:])
    return (
        Split(split.images[train_idx], split.labels[train_idx]),
        Split(split.images[val_idx], split.labels[val_idx]),
    )


def training_data(dataset: PreparedDataset, data: DataParams) -> tuple[Split, Split | None, Normalization]:
    """What the train and teacher stages train on: the training split less the seeded hold-out
    (``split_train_val`` with data.val_fraction and data.seed), the hold-out, and the normalization of the
    images trained on; one definition, so that a teacher sees the very inputs its student sees."""
    train_split, val_split = split_train_val(dataset.train, data.val_fraction, data.seed)
    return train_split, val_split, Normalization.from_images(train_split.images)


def warmup_cosine(warmup_steps: int, total_steps: int, decay: str = "cosine") -> Callable[[int], float]:
    """Learning-rate multiplier: linear warmup from 1/warmup to 1, then a decay to 0 at total_steps, cosine
    (Loshchilov and Hutter, 2017, "SGDR") or, with ``decay="linear"``, linear (airbench94_muon)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
        if decay == "linear":
            return 1.0 - progress
        return 0.5 * (1.0 + math.cos(math.pi * progress))

    return factor


def _quiet() -> bool:
    return bool(os.environ.get("CI")) or not sys.stderr.isatty()


class _Clock:
    """Seconds of training so far, earlier sessions of a resumed run included, and the time budget. Under DDP
    every process reads rank 0's clock, so that all of them stop at the same step and set the same learning
    rate."""

    def __init__(self, world: World, params: TrainParams):
        self.world, self.epochs, self.budget_s = world, params.epochs, params.time_budget_s
        self.earlier_s = self.elapsed_s = 0.0
        self._start = time.perf_counter()

    def start(self, earlier_s: float) -> None:
        self.earlier_s, self._start = earlier_s, time.perf_counter()

    def tick(self) -> float:
        self.elapsed_s = self.world.broadcast(self.earlier_s + time.perf_counter() - self._start)
        return self.elapsed_s

    def out_of_time(self) -> bool:
        return self.budget_s is not None and self.tick() >= self.budget_s

    def progress(self, epoch: int) -> str:
        """Where the run stands: by epochs, or by seconds when a time budget schedules it."""
        if self.budget_s is None:
            return f"epoch {epoch}/{self.epochs}"
        return f"epoch {epoch} ({self.elapsed_s:.0f}/{self.budget_s:.0f} s)"


def _lr_factor(params: TrainParams, steps_per_epoch: int, clock: _Clock) -> Callable[[int], float]:
    """The schedule over steps, or with a time budget over milliseconds spent; the warmup is
    ``warmup_fraction`` of either, or ``warmup_epochs`` (with a time budget: the same share of ``epochs``)."""
    if params.time_budget_s is None:
        total = params.epochs * steps_per_epoch
        if params.warmup_fraction is not None:
            return warmup_cosine(round(params.warmup_fraction * total), total, params.lr_schedule)
        return warmup_cosine(round(params.warmup_epochs * steps_per_epoch), total, params.lr_schedule)
    budget_ms = round(params.time_budget_s * 1000)
    share = params.warmup_fraction
    by_time = warmup_cosine(
        round((params.warmup_epochs / params.epochs if share is None else share) * budget_ms),
        budget_ms,
        params.lr_schedule,
    )
    return lambda _step: by_time(int(clock.elapsed_s * 1000))


def train(
    model: nn.Module,
    train_split: Split,
    val_split: Split | None,
    norm: Normalization,
    params: TrainParams,
    on_epoch: Callable[[dict[str, float]], Any] | None = None,
    state_path: str | Path | None = None,
    teacher: nn.Module | None = None,
) -> TrainResult:
    """Train ``model`` in place with ``params`` (params.yaml's train section); at the end it holds the
    weights of the best validation epoch (the last epoch's without ``val_split``); with ``params.ema_decay``
    those are the averaged weights, the ones validated.

    ``train_split``/``val_split`` hold uint8 (N, H, W, C) images and int64 labels; ``norm`` normalizes
    them. ``on_epoch`` receives each epoch's row (epoch, lr, train_loss, train_accuracy, val_loss,
    val_accuracy, images_per_s, images) as soon as it is measured; a resumed run reports only the epochs it
    trains.

    With ``state_path`` the training state is written there atomically after every epoch (loadable with
    ``torch.load(weights_only=True)``). If ``params.resume`` is on and the file holds a state of this same run
    (``run_digest``), training continues after its last epoch; any other file is ignored and overwritten.
    The file is left in place: the caller deletes it once the final outputs are saved.

    ``teacher``, a trained model of the same classes (``vitlab.distill.load_teacher``), is required by a
    model that ``distills`` and refused by any other: each step it predicts the augmented batch, in eval mode
    and without gradients, and the loss is ``distillation_loss`` with the label smoothing on the true labels.
    The train_accuracy of such a run is that of the two heads' mean, what evaluation reads.

    Under torchrun (RANK, WORLD_SIZE set) every process calls this with the same arguments; rank 0 alone
    writes the state and calls ``on_epoch``.

    Raises VitlabError for a missing or unwanted teacher, a batch size the processes cannot share, an
    unavailable device, or a run that diverges: a non-finite loss, gradient norm or weight stops every process
    at once, naming the epoch, the step and the params to change, before that epoch's state is saved (an
    earlier epoch's stays: only a run with the very same params resumes from it, and would diverge again).
    """
    if distills(model) != (teacher is not None):
        raise VitlabError(
            "model.distillation is on: training needs a teacher (the teacher stage's models/teacher.pt)"
            if teacher is None
            else "a teacher teaches only a ViT with model.distillation on"
        )
    with process_group(select_device(params.device)) as world:
        if params.batch_size % world.size:
            raise VitlabError(
                f"train.batch_size={params.batch_size} must be a multiple of the {world.size} training "
                "processes"
            )
        torch.manual_seed(params.seed + world.rank)  # dropout masks differ from one process to the next
        # airbench's whitening conv, a ViT's whiten_stem: from the training images, before the digest sees it
        init_from_data(model, norm.to_tensor(torch.as_tensor(train_split.images[:WHITENING_IMAGES])))
        digest = (
            run_digest(model, train_split, val_split, norm, params, world.size, teacher) if state_path else ""
        )
        run = _Run.build(model, train_split, norm, params, world, teacher)
        result, best_state, first_epoch = TrainResult(device=str(world.device)), None, 1
        state = _load_state(Path(state_path), digest, params, world) if state_path else None
        if state is not None:
            best_state, first_epoch = _restore(state, run, result)
        # DDP starts by copying rank 0's (restored) weights to every process
        net = world.wrap(model if teacher is None else BothHeads(model))
        if params.compile:
            net = torch.compile(net)
        run.clock.start(state["wall_time_s"] if state is not None else 0.0)

        for epoch in (
            itertools.count(first_epoch) if params.epochs is None else range(first_epoch, params.epochs + 1)
        ):
            row = train_one_epoch(net, run, epoch)
            if val_split is not None:
                row |= _validate(run.evaluated, val_split, norm, world.device)
            if val_split is None or best_state is None or row["val_accuracy"] > result.best_val_accuracy:
                result.best_epoch, result.best_val_accuracy = epoch, row.get("val_accuracy", float("nan"))
                best_state = copy.deepcopy(run.evaluated.state_dict())
            result.history.append(row)
            if state_path:
                _save_state(state_path, run, digest, epoch, result, best_state)
            if world.is_main:
                if on_epoch is not None:
                    on_epoch(row)
                print(_epoch_line(row, run.clock.progress(epoch)), file=sys.stderr, flush=True)
            if run.clock.out_of_time():
                break
        result.wall_time_s = run.clock.tick()
        model.load_state_dict(best_state)
        return result


@dataclass
class _Run:
    """What every step of a run uses, built once by ``build``: the model (and its weight average), the
    training images on the device, the augmentation, the optimizers, the clock and the divergence check."""

    model: nn.Module
    ema: AveragedModel | None  # train.ema_decay's average of the model's weights, None when off
    teacher: nn.Module | None
    params: TrainParams
    world: World
    images: torch.Tensor  # uint8 (N, C, H, W), on the device
    labels: torch.Tensor  # int64 (N,)
    sampler: Any  # vitlab.distributed's: this process's share of each epoch's order
    generator: torch.Generator  # augmentation draws, per process
    augment: BatchAugment
    optimizers: Optimizers
    clock: _Clock
    watch: _Watch
    local_batch: int
    steps_per_epoch: int
    channels_last: bool

    @property
    def evaluated(self) -> nn.Module:
        """The weights validated, kept and saved: the average with ``train.ema_decay``, else the model's."""
        return self.model if self.ema is None else self.ema.module

    @classmethod
    def build(
        cls,
        model: nn.Module,
        train_split: Split,
        norm: Normalization,
        params: TrainParams,
        world: World,
        teacher: nn.Module | None,
    ) -> _Run:
        device = world.device
        _speed_up(device)
        generator = torch.Generator().manual_seed(params.seed + world.rank)
        channels_last = uses_channels_last(model)
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(device).eval()  # DeiT's teacher: batch norm on its running statistics
        labels = torch.as_tensor(train_split.labels).to(device)
        sampler = world.sampler(len(labels), params.seed)
        local_batch = params.batch_size // world.size
        steps_per_epoch = math.ceil(len(sampler) / local_batch)
        mixing = params.mixup_alpha or params.cutmix_alpha
        augment = BatchAugment(
            norm,
            describe_model(model)["config"]["num_classes"] if mixing else 0,
            params.augment,
            params.crop_padding,
            params.flip,
            params.random_erasing,
            params.mixup_alpha,
            params.cutmix_alpha,
        )
        clock = _Clock(world, params)
        return cls(
            model=model,
            ema=weight_average(model, params.ema_decay),
            teacher=teacher,
            params=params,
            world=world,
            images=torch.as_tensor(train_split.images).permute(0, 3, 1, 2).contiguous().to(device),
            labels=labels,
            sampler=sampler,
            generator=generator,
            augment=augment,
            optimizers=build_optimizers(model, params, _lr_factor(params, steps_per_epoch, clock)),
            clock=clock,
            watch=_Watch(world, params, steps_per_epoch, uses_bf16(params.amp, device, model)),
            local_batch=local_batch,
            steps_per_epoch=steps_per_epoch,
            channels_last=channels_last,
        )


def frozen_whitening_bias(model: nn.Module, epoch: int, epochs: int | None) -> torch.Tensor | None:
    """airbench's whitening conv bias (``model.whiten.bias``) when epoch ``epoch`` (from 1) must leave it
    as it is: it trains for the first ``epochs`` epochs only (``train.whiten_bias_epochs``; Jordan, 2024),
    null: throughout. Its gradient is dropped after each backward pass rather than switched off, so that
    every process of a DDP run still reduces the same parameters; the optimizer skips a parameter without a
    gradient (no step, no weight decay)."""
    whiten = getattr(model, "whiten", None)
    if epochs is None or epoch <= epochs or not isinstance(whiten, nn.Conv2d) or whiten.bias is None:
        return None
    return whiten.bias


def weight_average(model: nn.Module, decay: float) -> AveragedModel | None:
    """An exponential moving average of ``model``'s weights and buffers (batch-norm statistics included),
    updated after every optimizer step with ``decay`` per step (0: None, no average): Polyak and Juditsky
    (1992), "Acceleration of Stochastic Approximation by Averaging", in the exponential form of Jordan (2024),
    "94% on CIFAR-10 in 3.29 Seconds on a Single GPU" (arXiv 2404.00498) and timm's ModelEma."""
    if not decay:
        return None
    return AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay), use_buffers=True)


def _restore(state: dict[str, Any], run: _Run, result: TrainResult) -> tuple[dict[str, torch.Tensor], int]:
    """Put a saved state (``_load_state``) back into ``run`` and ``result``; returns the best weights so far
    and the first epoch left to train."""
    run.model.load_state_dict(state["model"])
    if run.ema is not None:
        run.ema.load_state_dict(state["ema"])
    run.optimizers.load_state_dict(state["optimizer"])
    _set_rng_states(state["rng"][run.world.rank], run.generator, run.world.device)
    result.history = state["history"]
    result.best_epoch, result.best_val_accuracy = state["best_epoch"], state["best_val_accuracy"]
    return state["best_model"], state["epoch"] + 1


def train_one_epoch(net: nn.Module, run: _Run, epoch: int) -> dict[str, float]:
    """One epoch of steps of ``net`` (``run.model``, wrapped for DDP, the teacher's head or compile); stops
    early when the time budget is spent. Returns the epoch's row: epoch, lr, train_loss, train_accuracy,
    images_per_s and images, summed over every process.

    Raises VitlabError (``_Watch``) when the run diverges.
    """
    params, world, device = run.params, run.world, run.world.device
    run.sampler.set_epoch(epoch)
    order = torch.as_tensor(list(run.sampler), device=device)
    net.train()
    start = time.perf_counter()
    totals = torch.zeros(2, device=device)  # this process's loss sum and correct predictions
    seen = 0  # images, the same number in every process
    trainable = [p for p in run.model.parameters() if p.requires_grad]
    frozen = frozen_whitening_bias(run.model, epoch, params.whiten_bias_epochs)
    bar = tqdm(
        desc=run.clock.progress(epoch),
        total=run.steps_per_epoch,
        leave=False,
        disable=_quiet() or not world.is_main,
    )
    for step in range(run.steps_per_epoch):
        if step > 0 and run.clock.out_of_time():
            break
        idx = order[step * run.local_batch : (step + 1) * run.local_batch]
        y = run.labels[idx]
        x, targets = run.augment(run.images.index_select(0, idx), y, run.generator, idx, epoch)
        if run.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with autocast(params.amp, device, run.model):
            loss, logits = _loss(net, run.teacher, x, targets, params.label_smoothing)
        run.optimizers.zero_grad()
        loss.backward()
        if frozen is not None:
            frozen.grad = None
        run.watch.record(step, loss.detach(), _grad_norm(trainable, params.grad_clip))
        run.optimizers.step()
        if run.ema is not None:
            run.ema.update_parameters(run.model)
        totals += torch.stack([loss.detach().float() * len(y), (logits.argmax(1) == y).sum().float()])
        seen += len(y)
        if run.watch.due():
            run.watch.check(epoch, run.clock)
        if not bar.disable:  # reading the loss waits for the device: only for a visible bar
            img_s = seen * world.size / (time.perf_counter() - start)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{run.optimizers.lr:.2e}", img_s=f"{img_s:.0f}")
            bar.update()
    bar.close()
    # The weights too: the last step's update can overflow them with a finite loss and gradient.
    run.watch.check(epoch, run.clock, trainable)
    loss_sum, correct = world.sum(totals).tolist()
    seen *= world.size
    return {
        "epoch": epoch,
        "lr": run.optimizers.lr,
        "train_loss": loss_sum / seen,
        "train_accuracy": correct / seen,
        "images_per_s": seen / (time.perf_counter() - start),
        "images": seen,  # fewer than the split in an epoch cut short by the time budget
    }


def _loss(
    net: nn.Module, teacher: nn.Module | None, x: torch.Tensor, targets: torch.Tensor, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """The step's loss and the logits its accuracy is read from: cross-entropy, or with a ``teacher`` DeiT's
    distillation loss and the mean of the class and distillation heads."""
    if teacher is None:
        logits = net(x)
        return F.cross_entropy(logits, targets, label_smoothing=label_smoothing), logits
    heads = net(x)  # the class and distillation heads' logits
    with torch.no_grad():
        teacher_logits = teacher(x)
    return distillation_loss(*heads, targets, teacher_logits, label_smoothing), mean_of_heads(*heads)


def _validate(
    model: nn.Module, val_split: Split, norm: Normalization, device: torch.device
) -> dict[str, float]:
    """val_loss and val_accuracy of ``model`` on the held-out split."""
    logits = predict_logits(model, val_split.images, norm, 512, device)
    labels = torch.as_tensor(val_split.labels)
    return {
        "val_loss": F.cross_entropy(logits, labels).item(),
        "val_accuracy": (logits.argmax(1) == labels).float().mean().item(),
    }


def _save_state(
    path: str | Path,
    run: _Run,
    digest: str,
    epoch: int,
    result: TrainResult,
    best_state: dict[str, torch.Tensor],
) -> None:
    """Rank 0 writes the state after ``epoch``: the weights (and their average), the optimizers and schedule,
    every process's generators, the history so far and the best weights."""
    rng = run.world.gather(_rng_states(run.generator, run.world.device))  # a collective: every process's
    elapsed_s = run.clock.tick()
    if run.world.is_main:
        state = {
            "digest": digest,
            "epoch": epoch,
            "history": result.history,
            "best_epoch": result.best_epoch,
            "best_val_accuracy": result.best_val_accuracy,
            "best_model": _on_cpu(best_state),
            "wall_time_s": elapsed_s,
            "model": _on_cpu(run.model.state_dict()),
            "optimizer": run.optimizers.state_dict(),
            "rng": rng,
        }
        save_torch(path, state | ({} if run.ema is None else {"ema": _on_cpu(run.ema.state_dict())}))


# Steps the divergence check lets pass between two reads: reading waits for the device, which costs a CPU
# nothing but leaves a GPU idle until the CPU has queued the next step's kernels.
_CHECK_EVERY = {"cpu": 1}
_CHECK_EVERY_ELSEWHERE = 32


class _Watch:
    """The divergence check: each step's loss and gradient norm stay on the device until ``check`` reads
    them, every ``every`` steps and at the end of an epoch (with the weights). Under DDP every process takes
    part in each read, so that all of them stop at the same step and none waits in a collective another has
    left."""

    def __init__(self, world: World, params: TrainParams, steps_per_epoch: int, bf16: bool):
        self.world, self.params, self.steps_per_epoch, self.bf16 = world, params, steps_per_epoch, bf16
        self.every = _CHECK_EVERY.get(world.device.type, _CHECK_EVERY_ELSEWHERE)
        self.steps: list[int] = []
        self.values: list[torch.Tensor] = []  # (loss, gradient norm) of each step in ``steps``
        self.last: tuple[int, list[float]] = (-1, [math.nan, math.nan])  # the last step read

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        self.steps.append(step)
        self.values.append(torch.stack([loss.float(), grad_norm.float()]))

    def due(self) -> bool:
        return len(self.steps) >= self.every

    def check(self, epoch: int, clock: _Clock, weights: list[torch.Tensor] | None = None) -> None:
        """Raise VitlabError on every process if any recorded a non-finite loss or gradient norm since the
        last check (naming the earliest such step of any process), or else holds non-finite ``weights``. A
        collective: every process calls it at the same step."""
        device = self.world.device
        values = torch.stack(self.values) if self.values else torch.zeros(0, 2, device=device)
        bad = ~values.isfinite().all(1)
        finite = [w.isfinite().all() for w in weights or []]
        weights_bad = (
            ~torch.stack(finite).all() if finite else torch.zeros((), dtype=torch.bool, device=device)
        )
        steps, self.steps, self.values = self.steps, [], []
        if steps:
            self.last = steps[-1], values[-1].tolist()
        if not any(self.world.sum(torch.stack([bad.any(), weights_bad]).float()).tolist()):
            return
        rows = zip(steps, values.tolist(), bad.tolist(), strict=True)
        local = next(((step, *row) for step, row, b in rows if b), None)
        found = [f for f in self.world.gather(local) if f is not None]
        # The process whose loss went non-finite first: the others see it only in the averaged gradients.
        step, loss, grad_norm = (
            min(found, key=lambda f: (f[0], math.isfinite(f[1]))) if found else (self.last[0], *self.last[1])
        )
        what = f"loss {loss:.3g}, gradient norm {grad_norm:.3g}"
        raise VitlabError(
            f"training diverged at {clock.progress(epoch)}, step {step + 1}/{self.steps_per_epoch} "
            f"({what if found else f'weights not finite after it; {what}'}): {', '.join(self._advice())} "
            "or check the data; the same params would diverge again"
        )

    def _advice(self) -> list[str]:
        params = self.params
        advice = [
            f"lower train.learning_rate (now {params.learning_rate:g})",
            f"raise train.warmup_epochs (now {params.warmup_epochs:g})"
            if params.warmup_fraction is None
            else f"raise train.warmup_fraction (now {params.warmup_fraction:g})",
        ]
        if self.bf16:
            advice.append(
                f"set train.amp to off (now {'bf16' if params.amp == 'bf16' else 'auto: bf16 here'})"
            )
        return advice


def _grad_norm(params: list[torch.Tensor], clip: float | None) -> torch.Tensor:
    """The L2 norm of all gradients, on their device (with the check: under 1 ms of a 180+ ms tinyvit step
    on a CPU), measured before ``clip`` (train.grad_clip) scales them down to that norm if they exceed it:
    gradient clipping, Pascanu, Mikolov and Bengio (2013), "On the difficulty of training recurrent neural
    networks"."""
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if clip is not None:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return norm


def _speed_up(device: torch.device) -> None:
    """TF32 matmuls and convolutions, and cuDNN's autotuner, on CUDA (CPU results stay bit-reproducible)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def uses_channels_last(model: nn.Module) -> bool:
    """Whether training runs the model channels_last (measured faster on CPU too): for more than one
    convolution, a CNN or a conv stem (a ViT's patch embedding alone is one)."""
    return sum(isinstance(m, nn.Conv2d) for m in model.modules()) > 1


def run_digest(
    model: nn.Module,
    train_split: Split,
    val_split: Split | None,
    norm: Normalization,
    params: TrainParams,
    world_size: int = 1,
    teacher: nn.Module | None = None,
) -> str:
    """A fingerprint of everything a run's result depends on: architecture, starting weights, data, config,
    the number of processes (each has its own random streams) and the teacher, if any."""
    config = params.model_dump(exclude={"resume"}) | {"world_size": world_size}
    teachers = [] if teacher is None else [teacher]
    described = [describe_model(model), config, asdict(norm), *map(describe_model, teachers)]
    digest = hashlib.sha256(json.dumps(described, sort_keys=True).encode())
    weights = [t for m in (model, *teachers) for t in m.state_dict().values()]
    arrays = [t.detach().cpu().contiguous().numpy() for t in weights]
    for split in (train_split, val_split):
        if split is not None:
            arrays += [split.images, split.labels]
    for array in arrays:
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array))
    return digest.hexdigest()


def _load_state(path: Path, digest: str, params: TrainParams, world: World) -> dict[str, Any] | None:
    """The state saved at ``path`` if training should continue from it, else None (saying why on stderr)."""
    if not path.is_file():
        return None
    if not params.resume:
        return _fresh(f"train.resume is off: starting fresh (replacing {path})", world)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE as error:
        return _fresh(f"{path}: unreadable training state ({type(error).__name__}); starting fresh", world)
    if not isinstance(state, dict) or state.get("digest") != digest:
        return _fresh(
            f"{path}: state of another run (model, data or train params differ); starting fresh", world
        )
    if world.is_main:
        print(
            f"resuming from {path} after epoch {state['epoch']}/{params.epochs or 'the time budget'}",
            file=sys.stderr,
            flush=True,
        )
    return state


def _fresh(reason: str, world: World) -> None:
    if world.is_main:
        print(reason, file=sys.stderr, flush=True)
    return None


def _on_cpu(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v.detach().cpu() for k, v in state_dict.items()}


def _rng_states(generator: torch.Generator, device: torch.device) -> dict[str, torch.Tensor]:
    """Every random generator the loop draws from: torch's (dropout, init), the loop's own, the GPU's."""
    states = {"torch": torch.get_rng_state(), "generator": generator.get_state()}
    if device.type == "cuda":
        states["cuda"] = torch.cuda.get_rng_state(device)
    return states


def _set_rng_states(
    states: dict[str, torch.Tensor], generator: torch.Generator, device: torch.device
) -> None:
    torch.set_rng_state(states["torch"])
    generator.set_state(states["generator"])
    if device.type == "cuda" and "cuda" in states:
        torch.cuda.set_rng_state(states["cuda"], device)


def _epoch_line(row: dict[str, float], progress: str) -> str:
    parts = [
        progress,
        f"loss {row['train_loss']:.4f}",
        f"acc {row['train_accuracy']:.3f}",
    ]
    if "val_accuracy" in row:
        parts += [f"val_loss {row['val_loss']:.4f}", f"val_acc {row['val_accuracy']:.3f}"]
    parts.append(f"{row['images_per_s']:.0f} img/s")
    return "  ".join(parts)
