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
from vitlab.models.tta import views_per_image, with_tta


@torch.no_grad()
def predict_logits(
    model: nn.Module,
    images: np.ndarray | torch.Tensor,
    norm: Normalization,
    batch_size: int,
    device: torch.device | str = "cpu",
    tta: str = "none",
) -> torch.Tensor:
    """Logits (N, classes) on the CPU for uint8 (N, H, W, C) images, in eval mode, batch by batch.

    ``tta`` ("none", "flip", "flip_translate"; vitlab.models.tta) averages each image's logits over its
    views, as the exported model does; a batch then holds ``batch_size`` views, so memory stays as without.
    """
    images = torch.as_tensor(images)
    batch_size = max(1, batch_size // views_per_image(tta))
    with eval_mode(model):
        net = with_tta(model, tta)
        outputs = [
            net(norm.to_tensor(images[i : i + batch_size].to(device))).float().cpu()
            for i in range(0, len(images), batch_size)
        ]
    return torch.cat(outputs)


@dataclass(frozen=True)
class EvalResult:
    """Scores of one model on a test split: mean loss, accuracy (0-1) and per-class/per-image results."""

    loss: float
    accuracy: float
    per_class_accuracy: list[float]
    confusion: np.ndarray  # (classes, classes): rows are true labels, columns predictions
    predictions: np.ndarray  # (N,) predicted labels
    confidences: np.ndarray  # (N,) probability of the predicted label
    losses: np.ndarray  # (N,) cross-entropy of each image; their mean is ``loss``

    def metrics(self) -> dict[str, float | int]:
        """test_loss, test_accuracy (rounded to 6 digits) and test_images: reports/eval/metrics.json."""
        return {
            "test_loss": round(self.loss, 6),
            "test_accuracy": round(self.accuracy, 6),
            "test_images": len(self.predictions),
        }

    def per_class_rows(self, class_names: list[str]) -> list[dict[str, Any]]:
        """One row per class: its name, accuracy (recall) and support (test images of that class)."""
        support = self.confusion.sum(1)
        return [
            {"class": name, "accuracy": accuracy, "support": int(count)}
            for name, accuracy, count in zip(class_names, self.per_class_accuracy, support, strict=True)
        ]

    def confusion_pairs(self, labels: np.ndarray, class_names: list[str]) -> list[tuple[str, str]]:
        """(actual, predicted) class names per test image, in test-set order: DVC's confusion plot's input."""
        return [(class_names[a], class_names[p]) for a, p in zip(labels, self.predictions, strict=True)]


def evaluate(
    model: nn.Module,
    split: Split,
    norm: Normalization,
    num_classes: int,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    tta: str = "none",
) -> EvalResult:
    """Score ``model`` on ``split`` (uint8 (N, H, W, C) images, int64 labels) in eval mode, batch by batch
    on ``device``: mean cross-entropy, accuracy, per-class accuracy, the (classes, classes) confusion matrix
    (rows: true labels) and each image's prediction, confidence and loss; with ``tta``, of the logits
    averaged over each image's views (``predict_logits``)."""
    logits = predict_logits(model, split.images, norm, batch_size, device, tta)
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
