"""Test-time augmentation: a model's prediction averaged over a few views of each image (``evaluate.tta``).

As in airbench (Jordan, 2024, "94% on CIFAR-10 in 3.29 seconds on a single GPU", arXiv 2404.00498, section
on test-time augmentation): "flip" averages the logits of the image and its mirror image; "flip_translate"
gives that pair half the weight and the other half to the same pair translated by one pixel up-left and by
one pixel down-right (reflection-padded), 6 views in all. It is a module, so the exported ONNX graph computes
exactly what evaluation reports, and ``vitlab predict`` answers the same.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.params import TTA_MODES

# Each view's weight in the average, in the order ``TTA._views`` makes them.
_WEIGHTS = {
    "flip": (0.5, 0.5),
    "flip_translate": (0.25, 0.25, 0.125, 0.125, 0.125, 0.125),
}


class TTA(nn.Module):
    """Wraps ``model``: images (B, C, H, W) -> the weighted mean of its logits (B, classes) over the views of
    ``mode`` ("flip": 2, "flip_translate": 6; see the module docstring). All views go through the model as
    one batch of views x B images, so the model sees each view exactly as it would alone (eval mode: no
    statistic crosses images). Raises ValueError for an unknown mode or "none" (use the model itself)."""

    def __init__(self, model: nn.Module, mode: str):
        super().__init__()
        if mode not in _WEIGHTS:
            raise ValueError(f"unknown test-time augmentation {mode!r} (known: {', '.join(_WEIGHTS)})")
        self.model, self.mode = model, mode
        self.training = model.training  # so eval_mode(wrapper) gives the model back in its own mode
        # Not persistent: fixed by the mode, so a state dict holds only the model's weights.
        self.register_buffer("weights", torch.tensor(_WEIGHTS[mode]).view(-1, 1, 1), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> the views' weighted mean logits (B, classes)."""
        views = self._views(x)
        logits = self.model(torch.cat(views)).unflatten(0, (len(views), -1))  # (views, B, classes)
        return (logits * self.weights.to(logits.dtype)).sum(0)

    def _views(self, x: torch.Tensor) -> list[torch.Tensor]:
        views = [x, x.flip(-1)]
        if self.mode == "flip_translate":
            height, width = x.shape[-2:]
            padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
            for top, left in ((0, 0), (2, 2)):  # content moved one pixel down-right, then up-left
                shifted = padded[..., top : top + height, left : left + width]
                views += [shifted, shifted.flip(-1)]
        return views


def with_tta(model: nn.Module, mode: str) -> nn.Module:
    """``model`` itself for mode "none", else ``model`` wrapped in ``TTA(model, mode)``.
    Raises ValueError for a mode that is not one of ``vitlab.params.TTA_MODES``."""
    if mode not in TTA_MODES:
        raise ValueError(f"unknown test-time augmentation {mode!r} (known: {', '.join(TTA_MODES)})")
    return model if mode == "none" else TTA(model, mode)


def views_per_image(mode: str) -> int:
    """Forward passes per image under ``mode``: 1, 2 or 6 (the factor test-time augmentation costs)."""
    return 1 if mode == "none" else len(_WEIGHTS[mode])
