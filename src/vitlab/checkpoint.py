"""Checkpoints: weights plus everything needed to rebuild and feed the model, loadable with weights_only=True.

A checkpoint is a plain dict of tensors, strings, numbers and lists:
``{"arch", "config", "state_dict", "class_names", "mean", "std", "dataset"}``; ``mean``/``std`` are the
per-channel input normalization on the 0-1 scale: ``x = (pixels / 255 - mean) / std``.
"""

from __future__ import annotations

import io as _io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitlab import io
from vitlab.errors import VitlabError
from vitlab.models import build_model, model_spec

# What torch.load raises for a file that is not a readable torch archive (truncated, foreign, hostile).
UNREADABLE = (RuntimeError, pickle.UnpicklingError, zipfile.BadZipFile, EOFError, ValueError)


@dataclass(frozen=True)
class Normalization:
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def from_images(cls, images: np.ndarray) -> Normalization:
        """Per-channel statistics of uint8 (N, H, W, 3) images, on the 0-1 scale."""
        pixels = images.reshape(-1, images.shape[-1]).astype(np.float64) / 255.0
        return cls(tuple(pixels.mean(0).tolist()), tuple(pixels.std(0).tolist()))

    def to_tensor(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> normalized float32 (N, 3, H, W) on the images' device."""
        return self.normalize(images.permute(0, 3, 1, 2))

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 (N, 3, H, W) -> normalized float32 (N, 3, H, W) on the images' device."""
        mean = torch.tensor(self.mean, device=images.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, 3, 1, 1)
        return images.to(torch.float32, copy=True).div_(255.0).sub_(mean).div_(std)  # one allocation, not 3


@dataclass
class Checkpoint:
    model: nn.Module
    class_names: list[str]
    normalization: Normalization
    dataset: str


def save_checkpoint(
    path: str | Path, model: nn.Module, class_names: list[str], norm: Normalization, dataset: str
) -> None:
    payload = {
        **model_spec(model),
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
    serialized in memory and written by ``io.write_bytes``, which reports it.
    """
    buffer = _io.BytesIO()
    torch.save(payload, buffer)
    io.write_bytes(path, buffer.getbuffer())


def load_checkpoint(path: str | Path, device: str | torch.device = "cpu") -> Checkpoint:
    """Load a ``save_checkpoint`` file; weights_only=True: nothing but tensors and plain data is unpickled."""
    path = Path(path)
    if not path.is_file():
        raise VitlabError(f"{path}: no such checkpoint")
    try:
        payload: dict[str, Any] = torch.load(path, map_location=device, weights_only=True)
    except UNREADABLE as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise VitlabError(f"{path}: not a readable vitlab checkpoint ({reason})") from None
    missing = {"arch", "config", "state_dict", "class_names", "mean", "std"} - set(payload)
    if missing:
        raise VitlabError(f"{path}: not a vitlab checkpoint (missing {', '.join(sorted(missing))})")
    model = build_model(payload["arch"], payload["config"])
    try:
        model.load_state_dict(payload["state_dict"])
    except RuntimeError as error:
        raise VitlabError(
            f"{path}: weights do not fit a {payload['arch']} with config {payload['config']} "
            f"({str(error).splitlines()[0]})"
        ) from None
    model.to(device).eval()
    norm = Normalization(tuple(payload["mean"]), tuple(payload["std"]))
    return Checkpoint(model, list(payload["class_names"]), norm, payload.get("dataset", "unknown"))
