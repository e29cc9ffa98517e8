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
from vitlab.data.prepared import Split
from vitlab.device import select_device
from vitlab.distributed import World, process_group
from vitlab.errors import VitlabError
from vitlab.evaluate import predict_logits
from vitlab.models import model_spec


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128  # global: a DDP run gives each of its processes an equal share
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    crop_padding: int = 4
    flip: bool = True
    augment: str = "none"  # none | randaugment | autoaugment (vitlab.data.augment.POLICIES)
    mixup_alpha: float = 0.0  # 0: off
    cutmix_alpha: float = 0.0  # 0: off; both on: one of the two per batch
    random_erasing: float = 0.0  # probability per image
    amp: str = "auto"  # auto (bf16 on CUDA, fp32 elsewhere: bf16 measured slower on CPU) | bf16 | off
    compile: bool = False
    time_budget_s: float | None = None  # stop after this many seconds; the schedule follows the time
    device: str = "auto"
    seed: int = 0
    resume: bool = True  # continue from a state file of this same run; the result is the same either way


@dataclass
class TrainResult:
    history: list[dict[str, float]] = field(default_factory=list)  # one row per epoch
    best_epoch: int = 0
    best_val_accuracy: float = float("nan")
    wall_time_s: float = 0.0
    device: str = "cpu"


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
    """Seconds of training so far, earlier sessions of a resumed run included. Under DDP every process reads
    rank 0's clock, so that all of them stop at the same step and set the same learning rate."""

    def __init__(self, world: World):
        self.world = world
        self.earlier_s = self.elapsed_s = 0.0
        self._start = time.perf_counter()

    def start(self, earlier_s: float) -> None:
        self.earlier_s, self._start = earlier_s, time.perf_counter()

    def tick(self) -> float:
        self.elapsed_s = self.world.broadcast(self.earlier_s + time.perf_counter() - self._start)
        return self.elapsed_s


def _lr_factor(cfg: TrainConfig, steps_per_epoch: int, clock: _Clock) -> Callable[[int], float]:
    """The schedule over steps, or with a time budget over milliseconds spent (warmup: the same share)."""
    if cfg.time_budget_s is None:
        return warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch)
    budget_ms = round(cfg.time_budget_s * 1000)
    by_time = warmup_cosine(round(cfg.warmup_epochs / cfg.epochs * budget_ms), budget_ms)
    return lambda _step: by_time(int(clock.elapsed_s * 1000))


def train(
    model: nn.Module,
    train_split: Split,
    val_split: Split | None,
    norm: Normalization,
    cfg: TrainConfig,
    on_epoch: Callable[[dict[str, float]], Any] | None = None,
    state_path: str | Path | None = None,
) -> TrainResult:
    """Train ``model`` in place; at the end it holds the weights of the best validation epoch.

    ``on_epoch`` receives each epoch's row (epoch, lr, train_loss, train_accuracy, val_loss, val_accuracy,
    images_per_s) as soon as it is measured, for trackers and live plots; a resumed run reports only the
    epochs it trains.

    With ``state_path`` the training state is written there atomically after every epoch (loadable with
    ``torch.load(weights_only=True)``). If ``cfg.resume`` is on and the file holds a state of this same run
    (``run_digest``), training continues after its last epoch; any other file is ignored and overwritten.
    The file is left in place: the caller deletes it once the final outputs are saved.

    Under torchrun (RANK, WORLD_SIZE set) every process calls this with the same arguments; rank 0 alone
    writes the state and calls ``on_epoch``.

    Raises VitlabError for a batch size the processes cannot share, an unavailable device, or a run that
    diverges: a non-finite loss, gradient norm or weight stops every process at once, naming the epoch, the
    step and the params to change, before that epoch's state is saved (an earlier epoch's stays: only a run
    with the very same params resumes from it, and would diverge again).
    """
    with process_group(select_device(cfg.device)) as world:
        return _train(model, train_split, val_split, norm, cfg, world, on_epoch, state_path)


def _train(
    model: nn.Module,
    train_split: Split,
    val_split: Split | None,
    norm: Normalization,
    cfg: TrainConfig,
    world: World,
    on_epoch: Callable[[dict[str, float]], Any] | None,
    state_path: str | Path | None,
) -> TrainResult:
    if cfg.batch_size % world.size:
        raise VitlabError(
            f"train.batch_size={cfg.batch_size} must be a multiple of the {world.size} training processes"
        )
    torch.manual_seed(cfg.seed + world.rank)  # dropout masks differ from one process to the next
    digest = (
        run_digest(model, train_split, val_split, norm, cfg, world.size) if state_path is not None else ""
    )
    run = _Run(model, train_split, norm, cfg, world)
    result = TrainResult(device=str(world.device))
    best_state = None
    first_epoch, earlier_s = 1, 0.0
    state = _load_state(Path(state_path), digest, cfg, world) if state_path is not None else None
    if state is not None:
        run.restore(state)
        result.history, best_state = state["history"], state["best_model"]
        result.best_epoch, result.best_val_accuracy = state["best_epoch"], state["best_val_accuracy"]
        first_epoch, earlier_s = state["epoch"] + 1, state["wall_time_s"]
    run.start(earlier_s)
    for epoch in range(first_epoch, cfg.epochs + 1):
        row = run.train_epoch(epoch)
        if val_split is not None:
            val_logits = predict_logits(model, val_split.images, norm, 512, world.device)
            val_labels = torch.as_tensor(val_split.labels)
            row["val_loss"] = F.cross_entropy(val_logits, val_labels).item()
            row["val_accuracy"] = (val_logits.argmax(1) == val_labels).float().mean().item()
        # Without a validation split the last epoch is kept.
        if val_split is None or best_state is None or row["val_accuracy"] > result.best_val_accuracy:
            result.best_epoch, result.best_val_accuracy = epoch, row.get("val_accuracy", float("nan"))
            best_state = copy.deepcopy(model.state_dict())
        result.history.append(row)
        if state_path is not None:
            progress = {
                "digest": digest,
                "epoch": epoch,
                "history": result.history,
                "best_epoch": result.best_epoch,
                "best_val_accuracy": result.best_val_accuracy,
                "best_model": _on_cpu(best_state),
            }
            run.save_state(state_path, progress)
        if world.is_main:
            if on_epoch is not None:
                on_epoch(row)
            print(_epoch_line(row, _progress(epoch, cfg, run.clock.elapsed_s)), file=sys.stderr, flush=True)
        if run.out_of_time():
            break
    result.wall_time_s = run.clock.tick()
    model.load_state_dict(best_state)
    return result


class _Run:
    """The moving parts of one run on one process: data on the device, augmentation, model (wrapped for DDP
    and compiled as asked), optimizer, schedule and random generators."""

    def __init__(
        self, model: nn.Module, train_split: Split, norm: Normalization, cfg: TrainConfig, world: World
    ):
        self.model, self.cfg, self.world, device = model, cfg, world, world.device
        _speed_up(device)
        self.generator = torch.Generator().manual_seed(cfg.seed + world.rank)  # augmentation, per process
        self.channels_last = uses_channels_last(model)
        model.to(device)
        if self.channels_last:
            model.to(memory_format=torch.channels_last)
        self.images = torch.as_tensor(train_split.images).permute(0, 3, 1, 2).contiguous().to(device)  # uint8
        self.labels = torch.as_tensor(train_split.labels).to(device)
        self.sampler = world.sampler(len(self.labels), cfg.seed)
        self.local_batch = cfg.batch_size // world.size
        self.steps_per_epoch = math.ceil(len(self.sampler) / self.local_batch)
        mixing = cfg.mixup_alpha or cfg.cutmix_alpha
        self.augment = BatchAugment(
            norm,
            model_spec(model)["config"]["num_classes"] if mixing else 0,
            cfg.augment,
            cfg.crop_padding,
            cfg.flip,
            cfg.random_erasing,
            cfg.mixup_alpha,
            cfg.cutmix_alpha,
        )
        self.optimizer = torch.optim.AdamW(
            model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay
        )
        self.clock = _Clock(world)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, _lr_factor(cfg, self.steps_per_epoch, self.clock)
        )
        self.net = model
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.watch = _Watch(world)

    def restore(self, state: dict[str, Any]) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        _set_rng_states(state["rng"][self.world.rank], self.generator, self.world.device)

    def start(self, earlier_s: float) -> None:
        """Wrap the (restored) model for DDP, which starts by copying rank 0's weights everywhere; compile."""
        self.net = self.world.wrap(self.model)
        if self.cfg.compile:
            self.net = torch.compile(self.net)
        self.clock.start(earlier_s)

    def out_of_time(self) -> bool:
        return self.cfg.time_budget_s is not None and self.clock.tick() >= self.cfg.time_budget_s

    def train_epoch(self, epoch: int) -> dict[str, float]:
        """One pass over this process's share of the data (less if the time budget ends it): its row."""
        cfg, world, device = self.cfg, self.world, self.world.device
        self.sampler.set_epoch(epoch)
        order = torch.as_tensor(list(self.sampler), device=device)
        self.net.train()
        start = time.perf_counter()
        totals = torch.zeros(2, device=device)  # loss sum, correct predictions: this process's
        seen = 0  # images, the same number in every process
        with tqdm(
            range(self.steps_per_epoch),
            desc=_progress(epoch, cfg, self.clock.elapsed_s),
            leave=False,
            disable=_quiet() or not world.is_main,
        ) as bar:
            for step in bar:
                if step > 0 and self.out_of_time():
                    break
                idx = order[step * self.local_batch : (step + 1) * self.local_batch]
                y = self.labels[idx]
                x, targets = self.augment(self.images.index_select(0, idx), y, self.generator)
                if self.channels_last:
                    x = x.contiguous(memory_format=torch.channels_last)
                with _autocast(cfg.amp, device):
                    logits = self.net(x)
                    loss = F.cross_entropy(logits, targets, label_smoothing=cfg.label_smoothing)
                self.optimizer.zero_grad(set_to_none=True)
                loss.backward()
                self.watch.record(step, loss.detach(), _grad_norm(self.params))
                self.optimizer.step()
                self.scheduler.step()
                totals += torch.stack([loss.detach().float() * len(y), (logits.argmax(1) == y).sum().float()])
                seen += len(y)
                if self.watch.due():
                    self._stop_if_diverged(epoch)
                if not bar.disable:  # reading the loss waits for the device: only for a visible bar
                    bar.set_postfix(
                        loss=f"{loss.item():.3f}",
                        lr=f"{self.scheduler.get_last_lr()[0]:.2e}",
                        img_s=f"{seen * world.size / (time.perf_counter() - start):.0f}",
                    )
            # The weights too: the last step's update can overflow them with a finite loss and gradient.
            self._stop_if_diverged(epoch, self.params)
        loss_sum, correct = world.sum(totals).tolist()
        seen *= world.size
        return {
            "epoch": epoch,
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / seen,
            "train_accuracy": correct / seen,
            "images_per_s": seen / (time.perf_counter() - start),
            "images": seen,  # fewer than the split in an epoch cut short by the time budget
        }

    def _stop_if_diverged(self, epoch: int, weights: list[torch.Tensor] | None = None) -> None:
        """Raise VitlabError on every process if any saw a non-finite loss, gradient norm or weight."""
        found = self.watch.divergence(weights)
        if found is None:
            return
        cfg = self.cfg
        what = f"loss {found.loss:.3g}, gradient norm {found.grad_norm:.3g}"
        if found.weights:
            what = f"weights not finite after it; {what}"
        params = [
            f"lower train.learning_rate (now {cfg.learning_rate:g})",
            f"raise train.warmup_epochs (now {cfg.warmup_epochs:g})",
        ]
        if _uses_bf16(cfg.amp, self.world.device):
            params.append(f"set train.amp to off (now {'bf16' if cfg.amp == 'bf16' else 'auto: bf16 here'})")
        raise VitlabError(
            f"training diverged at {_progress(epoch, cfg, self.clock.elapsed_s)}, "
            f"step {found.step + 1}/{self.steps_per_epoch} ({what}): {', '.join(params)} or check the data; "
            "the same params would diverge again"
        )

    def save_state(self, path: str | Path, progress: dict[str, Any]) -> None:
        """Rank 0 writes ``progress`` with the weights, optimizer, schedule and every process's generators."""
        rng = self.world.gather(_rng_states(self.generator, self.world.device))  # collectives: all take part
        elapsed_s = self.clock.tick()
        if self.world.is_main:
            save_torch(
                path,
                progress
                | {
                    "wall_time_s": elapsed_s,
                    "model": _on_cpu(self.model.state_dict()),
                    "optimizer": self.optimizer.state_dict(),
                    "scheduler": self.scheduler.state_dict(),
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

    def __init__(self, world: World):
        self.world = world
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
    cfg: TrainConfig,
    world_size: int = 1,
) -> str:
    """A fingerprint of everything a run's result depends on: architecture, starting weights, data, config
    and the number of processes (each has its own random streams)."""
    config = {k: v for k, v in asdict(cfg).items() if k != "resume"} | {"world_size": world_size}
    digest = hashlib.sha256(json.dumps([model_spec(model), config, asdict(norm)], sort_keys=True).encode())
    arrays = [t.detach().cpu().contiguous().numpy() for t in model.state_dict().values()]
    for split in (train_split, val_split):
        if split is not None:
            arrays += [split.images, split.labels]
    for array in arrays:
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array))
    return digest.hexdigest()


def _load_state(path: Path, digest: str, cfg: TrainConfig, world: World) -> dict[str, Any] | None:
    """The state saved at ``path`` if training should continue from it, else None (saying why on stderr)."""
    if not path.is_file():
        return None
    if not cfg.resume:
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
        print(f"resuming from {path} after epoch {state['epoch']}/{cfg.epochs}", file=sys.stderr, flush=True)
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


def _progress(epoch: int, cfg: TrainConfig, elapsed_s: float) -> str:
    """Where the run stands: by epochs, or by seconds when a time budget schedules it."""
    if cfg.time_budget_s is None:
        return f"epoch {epoch}/{cfg.epochs}"
    return f"epoch {epoch} ({elapsed_s:.0f}/{cfg.time_budget_s:.0f} s)"


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
