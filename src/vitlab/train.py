"""Training: AdamW, linear warmup + cosine decay, batched on-device augmentation, best-on-validation weights.

The whole training split sits in memory as one uint8 tensor on the training device; each step indexes a batch,
augments it there and normalizes it, so no per-image Python work happens in the loop.

A run can be resumed: after every epoch the whole training state (weights, optimizer, schedule, history, best
epoch and every random generator) is saved, so a run killed at any moment continues after its last complete
epoch and ends bit-identical to one that was never interrupted.
"""

from __future__ import annotations

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
from vitlab.data.augment import random_crop_flip
from vitlab.data.prepared import Split
from vitlab.errors import VitlabError
from vitlab.evaluate import predict_logits
from vitlab.models import model_spec


@dataclass(frozen=True)
class TrainConfig:
    epochs: int = 30
    batch_size: int = 128
    learning_rate: float = 1e-3
    weight_decay: float = 0.05
    warmup_epochs: float = 2.0
    label_smoothing: float = 0.1
    crop_padding: int = 4
    flip: bool = True
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


def select_device(choice: str = "auto") -> torch.device:
    """cuda, then mps, then cpu for "auto"; an explicit device that is not there is an error."""
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if choice == "auto":
        return torch.device(next(name for name, ok in available.items() if ok))
    if not available.get(choice, False):
        raise VitlabError(f"train.device={choice!r} is not available on this machine (use auto or cpu)")
    return torch.device(choice)


def split_train_val(split: Split, val_fraction: float, seed: int) -> tuple[Split, Split | None]:
    """A seeded random hold-out of ``val_fraction`` of the training split (None when the fraction is 0)."""
    n_val = round(len(split) * val_fraction)
    if n_val == 0:
        return split, None
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
    """
    torch.manual_seed(cfg.seed)
    device = select_device(cfg.device)
    generator = torch.Generator().manual_seed(cfg.seed)
    digest = run_digest(model, train_split, val_split, norm, cfg) if state_path is not None else ""
    model.to(device)
    images = torch.as_tensor(train_split.images).to(device)  # uint8 (N, 32, 32, 3)
    labels = torch.as_tensor(train_split.labels).to(device)
    steps_per_epoch = math.ceil(len(labels) / cfg.batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, warmup_cosine(round(cfg.warmup_epochs * steps_per_epoch), cfg.epochs * steps_per_epoch)
    )
    result = TrainResult(device=str(device))
    best_state = None
    first_epoch, earlier_s = 1, 0.0
    state = _load_state(Path(state_path), digest, cfg) if state_path is not None else None
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_states(state["rng"], generator, device)
        result.history, best_state = state["history"], state["best_model"]
        result.best_epoch, result.best_val_accuracy = state["best_epoch"], state["best_val_accuracy"]
        first_epoch, earlier_s = state["epoch"] + 1, state["wall_time_s"]
    start = time.perf_counter()
    for epoch in range(first_epoch, cfg.epochs + 1):
        model.train()
        epoch_start = time.perf_counter()
        order = torch.randperm(len(labels), generator=generator).to(device)
        loss_sum = correct = 0.0
        bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch}/{cfg.epochs}", leave=False, disable=_quiet())
        for step in bar:
            idx = order[step * cfg.batch_size : (step + 1) * cfg.batch_size]
            x = random_crop_flip(norm.to_tensor(images[idx]), cfg.crop_padding, cfg.flip, generator)
            y = labels[idx]
            logits = model(x)
            loss = F.cross_entropy(logits, y, label_smoothing=cfg.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * len(y)
            correct += (logits.argmax(1) == y).sum().item()
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        seconds = time.perf_counter() - epoch_start
        row = {
            "epoch": epoch,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": loss_sum / len(labels),
            "train_accuracy": correct / len(labels),
            "images_per_s": len(labels) / seconds,
        }
        if val_split is not None:
            val_logits = predict_logits(model, val_split.images, norm, 512, device)
            val_labels = torch.as_tensor(val_split.labels)
            row["val_loss"] = F.cross_entropy(val_logits, val_labels).item()
            row["val_accuracy"] = (val_logits.argmax(1) == val_labels).float().mean().item()
        # Without a validation split the last epoch is kept.
        if val_split is None or best_state is None or row["val_accuracy"] > result.best_val_accuracy:
            result.best_epoch, result.best_val_accuracy = epoch, row.get("val_accuracy", float("nan"))
            best_state = copy.deepcopy(model.state_dict())
        result.history.append(row)
        if state_path is not None:
            save_torch(
                state_path,
                {
                    "digest": digest,
                    "epoch": epoch,
                    "wall_time_s": earlier_s + time.perf_counter() - start,
                    "model": _on_cpu(model.state_dict()),
                    "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(),
                    "history": result.history,
                    "best_epoch": result.best_epoch,
                    "best_val_accuracy": result.best_val_accuracy,
                    "best_model": _on_cpu(best_state),
                    "rng": _rng_states(generator, device),
                },
            )
        if on_epoch is not None:
            on_epoch(row)
        print(_epoch_line(row, cfg.epochs), file=sys.stderr, flush=True)
    result.wall_time_s = earlier_s + time.perf_counter() - start
    model.load_state_dict(best_state)
    return result


def run_digest(
    model: nn.Module, train_split: Split, val_split: Split | None, norm: Normalization, cfg: TrainConfig
) -> str:
    """A fingerprint of everything a run's result depends on: architecture, starting weights, data, config."""
    config = {k: v for k, v in asdict(cfg).items() if k != "resume"}
    digest = hashlib.sha256(json.dumps([model_spec(model), config, asdict(norm)], sort_keys=True).encode())
    arrays = [t.detach().cpu().contiguous().numpy() for t in model.state_dict().values()]
    for split in (train_split, val_split):
        if split is not None:
            arrays += [split.images, split.labels]
    for array in arrays:
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(np.ascontiguousarray(array))
    return digest.hexdigest()


def _load_state(path: Path, digest: str, cfg: TrainConfig) -> dict[str, Any] | None:
    """The state saved at ``path`` if training should continue from it, else None (saying why on stderr)."""
    if not path.is_file():
        return None
    if not cfg.resume:
        return _fresh(f"train.resume is off: starting fresh (replacing {path})")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except UNREADABLE as error:
        return _fresh(f"{path}: unreadable training state ({type(error).__name__}); starting fresh")
    if not isinstance(state, dict) or state.get("digest") != digest:
        return _fresh(f"{path}: state of another run (model, data or train params differ); starting fresh")
    print(f"resuming from {path} after epoch {state['epoch']}/{cfg.epochs}", file=sys.stderr, flush=True)
    return state


def _fresh(reason: str) -> None:
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


def _epoch_line(row: dict[str, float], epochs: int) -> str:
    parts = [
        f"epoch {row['epoch']}/{epochs}",
        f"loss {row['train_loss']:.4f}",
        f"acc {row['train_accuracy']:.3f}",
    ]
    if "val_accuracy" in row:
        parts += [f"val_loss {row['val_loss']:.4f}", f"val_acc {row['val_accuracy']:.3f}"]
    parts.append(f"{row['images_per_s']:.0f} img/s")
    return "  ".join(parts)
