"""Training: AdamW, linear warmup + cosine decay, batched on-device augmentation, best-on-validation weights.

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

import contextlib
import copy
import hashlib
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
from tqdm import tqdm

from vitlab.checkpoint import UNREADABLE, Normalization, save_torch
from vitlab.data.augment import BatchAugment
from vitlab.data.prepared import PreparedDataset, Split
from vitlab.device import hardware_description, select_device
from vitlab.distill import BothHeads, distillation_loss
from vitlab.distributed import World, process_group
from vitlab.errors import VitlabError
from vitlab.evaluate import predict_logits
from vitlab.models import describe_model, distills, init_from_data
from vitlab.models.vit import mean_of_heads
from vitlab.models.whitening import WHITENING_IMAGES
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


def warmup_cosine(warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """Learning-rate multiplier: linear warmup from 1/warmup to 1, then cosine decay to 0 at total_steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

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
    """The schedule over steps, or with a time budget over milliseconds spent (warmup: the same share)."""
    if params.time_budget_s is None:
        return warmup_cosine(round(params.warmup_epochs * steps_per_epoch), params.epochs * steps_per_epoch)
    budget_ms = round(params.time_budget_s * 1000)
    by_time = warmup_cosine(round(params.warmup_epochs / params.epochs * budget_ms), budget_ms)
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
    weights of the best validation epoch (the last epoch's without ``val_split``).

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
        device = world.device
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
        _speed_up(device)
        generator = torch.Generator().manual_seed(params.seed + world.rank)  # augmentation, per process
        channels_last = uses_channels_last(model)
        model.to(device)
        if channels_last:
            model.to(memory_format=torch.channels_last)
        if teacher is not None:
            teacher.to(device).eval()  # DeiT's teacher: batch norm on its running statistics
        images = torch.as_tensor(train_split.images).permute(0, 3, 1, 2).contiguous().to(device)  # uint8 NCHW
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
        optimizer = torch.optim.AdamW(
            model.parameters(), lr=params.learning_rate, weight_decay=params.weight_decay
        )
        clock = _Clock(world, params)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _lr_factor(params, steps_per_epoch, clock))
        trainable = [p for p in model.parameters() if p.requires_grad]
        watch = _Watch(world, params, steps_per_epoch)

        result, best_state, first_epoch = TrainResult(device=str(device)), None, 1
        state = _load_state(Path(state_path), digest, params, world) if state_path else None
        if state is not None:
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            scheduler.load_state_dict(state["scheduler"])
            _set_rng_states(state["rng"][world.rank], generator, device)
            result.history, best_state = state["history"], state["best_model"]
            result.best_epoch, result.best_val_accuracy = state["best_epoch"], state["best_val_accuracy"]
            first_epoch = state["epoch"] + 1
        # DDP starts by copying rank 0's (restored) weights to every process
        net = world.wrap(model if teacher is None else BothHeads(model))
        if params.compile:
            net = torch.compile(net)
        clock.start(state["wall_time_s"] if state is not None else 0.0)

        for epoch in range(first_epoch, params.epochs + 1):
            sampler.set_epoch(epoch)
            order = torch.as_tensor(list(sampler), device=device)
            net.train()
            start = time.perf_counter()
            totals = torch.zeros(2, device=device)  # this process's loss sum and correct predictions
            seen = 0  # images, the same number in every process
            bar = tqdm(
                desc=clock.progress(epoch),
                total=steps_per_epoch,
                leave=False,
                disable=_quiet() or not world.is_main,
            )
            for step in range(steps_per_epoch):
                if step > 0 and clock.out_of_time():
                    break
                idx = order[step * local_batch : (step + 1) * local_batch]
                y = labels[idx]
                x, targets = augment(images.index_select(0, idx), y, generator, idx, epoch)
                if channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with _autocast(params.amp, device):
                    if teacher is None:
                        logits = net(x)
                        loss = F.cross_entropy(logits, targets, label_smoothing=params.label_smoothing)
                    else:
                        heads = net(x)  # the class and distillation heads' logits
                        with torch.no_grad():
                            teacher_logits = teacher(x)
                        loss = distillation_loss(*heads, targets, teacher_logits, params.label_smoothing)
                        logits = mean_of_heads(*heads)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                watch.record(step, loss.detach(), _grad_norm(trainable))
                optimizer.step()
                scheduler.step()
                totals += torch.stack([loss.detach().float() * len(y), (logits.argmax(1) == y).sum().float()])
                seen += len(y)
                if watch.due():
                    watch.stop_if_diverged(epoch, clock)
                if not bar.disable:  # reading the loss waits for the device: only for a visible bar
                    img_s = seen * world.size / (time.perf_counter() - start)
                    bar.set_postfix(
                        loss=f"{loss.item():.3f}",
                        lr=f"{scheduler.get_last_lr()[0]:.2e}",
                        img_s=f"{img_s:.0f}",
                    )
                    bar.update()
            bar.close()
            # The weights too: the last step's update can overflow them with a finite loss and gradient.
            watch.stop_if_diverged(epoch, clock, trainable)

            loss_sum, correct = world.sum(totals).tolist()
            seen *= world.size
            row = {
                "epoch": epoch,
                "lr": optimizer.param_groups[0]["lr"],
                "train_loss": loss_sum / seen,
                "train_accuracy": correct / seen,
                "images_per_s": seen / (time.perf_counter() - start),
                "images": seen,  # fewer than the split in an epoch cut short by the time budget
            }
            if val_split is not None:
                row |= _validate(model, val_split, norm, device)
            if val_split is None or best_state is None or row["val_accuracy"] > result.best_val_accuracy:
                result.best_epoch, result.best_val_accuracy = epoch, row.get("val_accuracy", float("nan"))
                best_state = copy.deepcopy(model.state_dict())
            result.history.append(row)
            if state_path:
                progress = {
                    "digest": digest,
                    "epoch": epoch,
                    "history": result.history,
                    "best_epoch": result.best_epoch,
                    "best_val_accuracy": result.best_val_accuracy,
                    "best_model": _on_cpu(best_state),
                }
                _save_state(state_path, progress, model, optimizer, scheduler, generator, clock, world)
            if world.is_main:
                if on_epoch is not None:
                    on_epoch(row)
                print(_epoch_line(row, clock.progress(epoch)), file=sys.stderr, flush=True)
            if clock.out_of_time():
                break
        result.wall_time_s = clock.tick()
        model.load_state_dict(best_state)
        return result


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
    progress: dict[str, Any],
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: torch.optim.lr_scheduler.LRScheduler,
    generator: torch.Generator,
    clock: _Clock,
    world: World,
) -> None:
    """Rank 0 writes ``progress`` with the weights, optimizer, schedule and every process's generators."""
    rng = world.gather(_rng_states(generator, world.device))  # a collective: every process takes part
    elapsed_s = clock.tick()
    if world.is_main:
        save_torch(
            path,
            progress
            | {
                "wall_time_s": elapsed_s,
                "model": _on_cpu(model.state_dict()),
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": rng,
            },
        )


# Steps the divergence check lets pass between two reads: reading waits for the device, which costs a CPU
# nothing but leaves a GPU idle until the CPU has queued the next step's kernels.
_CHECK_EVERY = {"cpu": 1}
_CHECK_EVERY_ELSEWHERE = 32


@dataclass(frozen=True)
class _Diverged:
    step: int  # 0-based, in its epoch: the first step with a non-finite value, or the last one for weights
    loss: float
    grad_norm: float
    weights: bool  # only the weights are non-finite (checked at the end of an epoch)


class _Watch:
    """The divergence check: each step's loss and gradient norm stay on the device until ``divergence``
    reads them, every ``every`` steps and at the end of an epoch. Under DDP every process takes part in each
    read, so that all of them stop at the same step and none waits in a collective another has left."""

    def __init__(self, world: World, params: TrainParams, steps_per_epoch: int):
        self.world, self.params, self.steps_per_epoch = world, params, steps_per_epoch
        self.every = _CHECK_EVERY.get(world.device.type, _CHECK_EVERY_ELSEWHERE)
        self.steps: list[int] = []
        self.values: list[torch.Tensor] = []
        self.last: tuple[int, torch.Tensor] | None = None

    def record(self, step: int, loss: torch.Tensor, grad_norm: torch.Tensor) -> None:
        values = torch.stack([loss.float(), grad_norm.float()])
        self.steps.append(step)
        self.values.append(values)
        self.last = step, values

    def due(self) -> bool:
        return len(self.steps) >= self.every

    def stop_if_diverged(self, epoch: int, clock: _Clock, weights: list[torch.Tensor] | None = None) -> None:
        """Raise VitlabError on every process if any saw a non-finite loss, gradient norm or weight."""
        found = self.divergence(weights)
        if found is None:
            return
        params = self.params
        what = f"loss {found.loss:.3g}, gradient norm {found.grad_norm:.3g}"
        if found.weights:
            what = f"weights not finite after it; {what}"
        advice = [
            f"lower train.learning_rate (now {params.learning_rate:g})",
            f"raise train.warmup_epochs (now {params.warmup_epochs:g})",
        ]
        if _uses_bf16(params.amp, self.world.device):
            advice.append(
                f"set train.amp to off (now {'bf16' if params.amp == 'bf16' else 'auto: bf16 here'})"
            )
        raise VitlabError(
            f"training diverged at {clock.progress(epoch)}, step {found.step + 1}/{self.steps_per_epoch} "
            f"({what}): {', '.join(advice)} or check the data; the same params would diverge again"
        )

    def divergence(self, weights: list[torch.Tensor] | None = None) -> _Diverged | None:
        """The earliest non-finite step recorded since the last read on any process, else non-finite
        ``weights``, else None. A collective: every process calls it at the same step."""
        device = self.world.device
        values = torch.stack(self.values) if self.values else torch.zeros(0, 2, device=device)
        bad = ~values.isfinite().all(1)
        weights_bad = torch.zeros((), dtype=torch.bool, device=device)
        if weights:
            weights_bad = ~torch.stack([w.isfinite().all() for w in weights]).all()
        steps, self.steps, self.values = self.steps, [], []
        if not any(self.world.sum(torch.stack([bad.any(), weights_bad]).float()).tolist()):
            return None
        local = next(
            ((step, *row) for step, row, b in zip(steps, values.tolist(), bad.tolist(), strict=True) if b),
            None,
        )
        found = [f for f in self.world.gather(local) if f is not None]
        if found:  # the process whose loss went non-finite: the others see it only in the averaged gradients
            step, loss, grad_norm = min(found, key=lambda f: (f[0], math.isfinite(f[1])))
            return _Diverged(step, loss, grad_norm, weights=False)
        step, last = self.last if self.last is not None else (-1, torch.full((2,), math.nan))
        return _Diverged(step, *last.tolist(), weights=True)


def _grad_norm(params: list[torch.Tensor]) -> torch.Tensor:
    """The L2 norm of all gradients, on their device (with the check: under 1 ms of a 180+ ms tinyvit step
    on a CPU)."""
    return torch.nn.utils.get_total_norm([p.grad for p in params if p.grad is not None])


def _speed_up(device: torch.device) -> None:
    """TF32 matmuls and convolutions, and cuDNN's autotuner, on CUDA (CPU results stay bit-reproducible)."""
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
        torch.backends.cudnn.benchmark = True


def _uses_bf16(amp: str, device: torch.device) -> bool:
    return amp == "bf16" or (amp == "auto" and device.type == "cuda" and torch.cuda.is_bf16_supported())


def _autocast(amp: str, device: torch.device) -> contextlib.AbstractContextManager:
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=_uses_bf16(amp, device))


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
            f"resuming from {path} after epoch {state['epoch']}/{params.epochs}", file=sys.stderr, flush=True
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
