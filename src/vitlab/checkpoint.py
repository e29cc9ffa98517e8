"""Checkpoints: weights plus everything needed to rebuild and feed the model, loadable with weights_only=True.

A checkpoint is a plain dict of tensors, strings, numbers and lists:
``{"arch", "config", "state_dict", "class_names", "mean", "std", "dataset"}``; ``mean``/``std`` are the
per-channel input normalization on the 0-1 scale: ``x = (pixels / 255 - mean) / std``.
"""

from __future__ import annotations

import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitlab import files
from vitlab.errors import VitlabError
from vitlab.models import build_model, describe_model

# What torch.load raises for a file that is not a readable torch archive (truncated, foreign, hostile).
UNREADABLE = (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError)


@dataclass(frozen=True)
class Normalization:
    """Per-channel input normalization on the 0-1 scale: ``x = (pixels / 255 - mean) / std``; one value per
    channel (3 for RGB, 1 for grayscale)."""

    mean: tuple[float, ...]
    std: tuple[float, ...]

    @classmethod
    def from_images(cls, images: np.ndarray) -> Normalization:
        """Per-channel statistics of uint8 (N, H, W, C) images, on the 0-1 scale."""
        pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
        return cls(tuple(pixels.mean(0).tolist()), tuple(pixels.std(0).tolist()))

    def to_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, C) -> normalized float32 (N, C, H, W) on the images' device."""
        return self.normalize(images.permute(0, 3, 1, 2))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, C, H, W) -> normalized float32 (N, C, H, W) on the images' device."""
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return images.to(torch.float32, copy=True).div_(255.0).sub_(mean).div_(std)  # one allocation, not 3


@dataclass
class Checkpoint:
    """A loaded checkpoint: the model (eval mode, on the requested device), class names in logit order, its
    input normalization and the dataset name ("unknown" for a file saved without one)."""

    model: nn.Module
    class_names: list[str]
    normalization: Normalization
    dataset: str


def save_checkpoint(
    path: str | Path, model: nn.Module, class_names: list[str], norm: Normalization, dataset: str
) -> None:
    """Save ``model``'s CPU weights, arch and config, ``class_names``, ``norm`` and ``dataset`` atomically to
    ``path`` in the format ``load_checkpoint`` reads (see the module docstring).

    ``model`` must be the bare vitlab model (not DDP- or torch.compile-wrapped): describe_model raises
    TypeError for anything else. A failed write is a VitlabError naming ``path``.
    """
    payload = {
        **describe_model(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "class_names": list(class_names),
        "mean": list(norm.mean),
        "std": list(norm.std),
        "dataset": dataset,
    }
    save_torch(path, payload)


def save_torch(path: str | Path, payload: Any) -> None:
    """``torch.save`` atomically; a failed write (disk full, read-only folder) is a VitlabError naming it.

    torch.save reports a failed write as a RuntimeError without the OS's reason, so the payload is
    serialized in memory and written by ``files.write_bytes``, which reports it.
    """
    buffer = io.BytesIO()
    torch.save(payload, buffer)
    files.write_bytes(path, buffer.getbuffer())


def load_checkpoint(
    path: str | Path, device: str | torch.device = "cpu", geometry: tuple[int, int] | None = None
) -> Checkpoint:
    """Load a ``save_checkpoint`` file; weights_only=True: nothing but tensors and plain data is unpickled.

    ``geometry``, the (image_size, channels) of the images the model is about to see (``Split.geometry``):
    a model built for another is refused with a VitlabError, rather than failing inside its first layer.

    Raises VitlabError, naming the file, for one that is missing, unreadable or not a vitlab checkpoint; for
    weights that do not fit the architecture it names (the first missing, unexpected and misshapen keys, and
    the wrapper whose prefix every unexpected key has, such as DistributedDataParallel's ``module.``); and
    for non-finite weights, those of a training run that diverged.
    """
    path = Path(path)
    if not path.is_file():
        raise VitlabError(f"{path}: no such checkpoint")
    try:
        payload: dict[str, Any] = torch.load(path, map_location=device, weights_only=True)
    except UNREADABLE as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VitlabError(f"{path}: not a readable vitlab checkpoint ({reason})") from None
    if not isinstance(payload, dict):
        raise VitlabError(f"{path}: not a vitlab checkpoint (a {type(payload).__name__}, not a dict)")
    missing = {"arch", "config", "state_dict", "class_names", "mean", "std"} - set(payload)
    if missing:
        raise VitlabError(f"{path}: not a vitlab checkpoint (missing {', '.join(sorted(missing))})")
    weights = payload["state_dict"]
    if not isinstance(weights, dict) or not all(isinstance(w, torch.Tensor) for w in weights.values()):
        raise VitlabError(f"{path}: not a vitlab checkpoint (its state_dict is not a dict of tensors)")
    model = build_model(payload["arch"], payload["config"])
    built_for = (model.config.image_size, model.config.in_channels)
    if geometry is not None and tuple(geometry) != built_for:
        raise VitlabError(
            f"{path}: a model for {_geometry(*built_for)} images ({payload.get('dataset', 'unknown')}), not "
            f"for these {_geometry(*geometry)} ones: train it on this dataset"
        )
    unfit = f"{path}: weights do not fit a {payload['arch']} with config {payload['config']}"
    mismatch = _mismatch(model.state_dict(), weights)
    if mismatch:
        raise VitlabError(f"{unfit}: {mismatch}")
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:  # keys and shapes fit: something rarer, and torch's detail is past line 1
        raise VitlabError(f"{unfit} ({' '.join(str(error).split())})") from None
    non_finite = [name for name, w in weights.items() if w.is_floating_point() and not w.isfinite().all()]
    if non_finite:
        raise VitlabError(
            f"{path}: {len(non_finite)} of {len(weights)} weight tensors hold NaN or infinite values "
            f"({_first(non_finite)}): the training run diverged; retrain with a lower train.learning_rate"
        )
    model.to(device).eval()
    norm = Normalization(tuple(payload["mean"]), tuple(payload["std"]))
    return Checkpoint(model, list(payload["class_names"]), norm, payload.get("dataset", "unknown"))


# What wraps a model and prefixes every key of its state_dict with the attribute holding the model.
_WRAPPER_PREFIXES = {
    "module.": "DataParallel or DistributedDataParallel",
    "_orig_mod.": "torch.compile",
}


def _mismatch(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> str:
    """Why ``given`` does not load into a model whose state_dict is ``expected`` ("" if it fits)."""
    missing = [k for k in expected if k not in given]
    unexpected = [k for k in given if k not in expected]
    misshapen = [
        f"{k} {tuple(given[k].shape)} vs {tuple(w.shape)}"
        for k, w in expected.items()
        if k in given and given[k].shape != w.shape
    ]
    parts = []
    if missing:
        parts.append(f"missing {_first(missing)}")
    if unexpected:
        parts.append(f"unexpected {_first(unexpected)}")
    if misshapen:
        parts.append(f"shapes (file vs model) differ for {_first(misshapen)}")
    return "; ".join(parts) + _wrapper_hint(unexpected, given, expected)


def _wrapper_hint(unexpected: list[str], given: dict[str, torch.Tensor], expected: dict[str, Any]) -> str:
    """Names the wrapper(s) whose prefix every unexpected key has, and says whether stripping it fits."""
    prefixes = {_wrapper_prefix(k) for k in unexpected}
    if len(prefixes) != 1 or "" in prefixes:
        return ""
    (prefix,) = prefixes
    wrappers = ", then ".join(_WRAPPER_PREFIXES[p + "."] for p in reversed(prefix.split(".")[:-1]))
    stripped = {k.removeprefix(prefix): w.shape for k, w in given.items()}
    if stripped != {k: w.shape for k, w in expected.items()}:
        fix = "even without the prefix the weights do not fit this model"
    else:
        strip = f"{{k.removeprefix({prefix!r}): w for k, w in state_dict.items()}}"
        fix = f"strip the prefix, {strip}, and it fits"
    return f" (every unexpected key starts with {prefix!r}: saved from a model wrapped in {wrappers}; {fix})"


def _wrapper_prefix(key: str) -> str:
    """The wrappers' prefixes at the start of ``key``, nested ones included ("_orig_mod.module.")."""
    prefix = ""
    while found := next((p for p in _WRAPPER_PREFIXES if key.startswith(prefix + p)), None):
        prefix += found
    return prefix


def _geometry(image_size: int, channels: int) -> str:
    return f"{image_size}x{image_size}x{channels}"


def _first(names: list[str], n: int = 3) -> str:
    """The first ``n`` of ``names``, and how many more there are."""
    return ", ".join(names[:n]) + (f" and {len(names) - n} more" if len(names) > n else "")
