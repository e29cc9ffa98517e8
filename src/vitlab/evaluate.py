"""Test-set evaluation: loss, accuracy, per-class accuracy, the confusion matrix and per-image results."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from vitlab.checkpoint import Normalization
from vitlab.data.prepared import Split
from vitlab.models import eval_mode


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    norm: Normalization,
    batch_size: int,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Logits (N, classes) on the CPU for uint8 (N, 32, 32, 3) images, in eval mode, batch by batch."""
    images = torch.as_tensor(images)
    with eval_mode(model):
        outputs = [
            model(norm.to_tensor(images[i : i + batch_size].to(device))).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    return torch.cat(outputs)


@dataclass(frozen=True)
class EvalResult:
    loss: float
    accuracy: float
    per_class_accuracy: list[float]
    confusion: np.ndarray  # (classes, classes): rows are true labels, columns predictions
    predictions: np.ndarray  # (N,) predicted labels
    confidences: np.ndarray  # (N,) probability of the predicted label
    losses: np.ndarray  # (N,) cross-entropy of each image; their mean is ``loss``


def evaluate(
    model: nn.Module,
    split: Split,
    norm: Normalization,
    num_classes: int,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
) -> EvalResult:
    logits = predict_logits(model, split.images, norm, batch_size, device)
    labels = torch.as_tensor(split.labels)
    probabilities = logits.softmax(dim=1)
    confidences, predictions = probabilities.max(dim=1)
    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(confusion, (split.labels, predictions.numpy()), 1)
    per_class = confusion.diagonal() / np.maximum(confusion.sum(axis=1), 1)
    losses = F.cross_entropy(logits, labels, reduction="none")
    return EvalResult(
        loss=losses.mean().item(),
        accuracy=(predictions == labels).float().mean().item(),
        per_class_accuracy=per_class.tolist(),
        confusion=confusion,
        predictions=predictions.numpy(),
        confidences=confidences.numpy(),
        losses=losses.numpy(),
    )


def prediction_rows(result: EvalResult, labels: np.ndarray, class_names: list[str]) -> list[dict[str, Any]]:
    """One row per test image, in test-set order: what ``vitlab compare`` pairs runs by."""
    return [
        {
            "index": i,
            "label": class_names[int(t)],
            "predicted": class_names[int(p)],
            "confidence": round(float(c), 6),
            "correct": int(t == p),
            "loss": round(float(loss), 6),
        }
        for i, (t, p, c, loss) in enumerate(
            zip(labels, result.predictions, result.confidences, result.losses, strict=True)
        )
    ]
