"""Distillation through attention: DeiT's hard-label distillation (Touvron et al., 2021, "Training
data-efficient image transformers & distillation through attention"; facebookresearch/deit's
``DistillationLoss`` with ``distillation_type="hard"``).

A ViT built with ``distillation`` (``vitlab.models.vit``) carries a distillation token beside its CLS token,
each read by a head of its own. In training the class head learns the true labels and the distillation head
the labels a trained CNN, the teacher, gives the same augmented batch; the teacher stage trains that CNN with
the train section's recipe and writes ``models/teacher.pt``, which ``load_teacher`` reads. At inference the
ViT averages its two heads (``forward``), so nothing after training knows about the teacher.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.checkpoint import load_checkpoint
from vitlab.errors import VitlabError

# DeiT's weight of the distillation term for hard distillation: the two heads' losses count equally.
ALPHA = 0.5
# What the teacher stage writes in place of a teacher when model.distillation is off: models/teacher.pt stays
# the DVC out that train depends on (deps cannot be conditional), at a few bytes instead of 94 s of training.
NO_TEACHER = b"vitlab: no teacher trained (model.distillation is off)\n"


def distillation_loss(
    cls_logits: torch.Tensor,
    dist_logits: torch.Tensor,
    targets: torch.Tensor,
    teacher_logits: torch.Tensor,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """DeiT's hard-label distillation loss, a scalar: ``(1 - ALPHA) * CE(cls_logits, targets) + ALPHA *
    CE(dist_logits, teacher_logits.argmax(1))``, each cross-entropy the mean over the batch.

    ``cls_logits``, ``dist_logits`` and ``teacher_logits`` are float (B, classes); ``targets`` are int64 (B,)
    class indices or float (B, classes) probabilities (MixUp, CutMix). ``label_smoothing`` applies to the
    true-label term only, as in DeiT, whose base criterion smooths and whose teacher labels are hard.
    """
    teacher_labels = teacher_logits.argmax(dim=1)
    true_term = F.cross_entropy(cls_logits, targets, label_smoothing=label_smoothing)
    return (1 - ALPHA) * true_term + ALPHA * F.cross_entropy(dist_logits, teacher_labels)


class BothHeads(nn.Module):
    """Exposes a distilled ViT's ``forward_heads`` as ``forward``: DistributedDataParallel and
    torch.compile wrap ``forward`` alone, and training needs both heads' logits, (B, classes) each."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalized images (B, C, H, W) -> the class and distillation heads' logits."""
        return self.model.forward_heads(x)


def load_teacher(path: str | Path, class_names: Sequence[str], geometry: tuple[int, int]) -> nn.Module:
    """The teacher saved at ``path`` by the teacher stage (a ``save_checkpoint`` file), on the CPU in eval
    mode with its weights frozen, for a student of ``class_names`` (in logit order) and images of
    ``geometry``, (image_size, channels).

    The teacher sees the student's normalized batches: the teacher stage trains it on the same training
    images, so with the same normalization.

    Raises VitlabError naming ``path`` for a missing file or ``NO_TEACHER`` (run the teacher stage with
    model.distillation on), one that is not a readable checkpoint, or a teacher of other images or other
    classes.
    """
    path = Path(path)
    if not path.is_file() or _starts_with(path, NO_TEACHER):
        raise VitlabError(
            f"{path}: no teacher model; a ViT with model.distillation learns from one: run the teacher stage "
            "first with model.distillation on (`vitlab stage teacher`; `dvc repro` runs it before train)"
        )
    ckpt = load_checkpoint(path, geometry=geometry)
    if ckpt.class_names != list(class_names):
        theirs, ours = ckpt.class_names, list(class_names)
        differ = ""
        if len(theirs) == len(ours):
            i = next(i for i, (a, b) in enumerate(zip(theirs, ours, strict=True)) if a != b)
            differ = f" (class {i} is {theirs[i]!r} there, {ours[i]!r} here)"
        raise VitlabError(
            f"{path}: a teacher for {len(theirs)} classes ({ckpt.dataset}), not for these {len(ours)}"
            f"{differ}: retrain it on this dataset (`vitlab stage teacher`)"
        )
    return ckpt.model.requires_grad_(False)


def _starts_with(path: Path, prefix: bytes) -> bool:
    with path.open("rb") as handle:
        return handle.read(len(prefix)) == prefix
