"""Batched augmentation on the training device: no per-image PIL work in the training loop."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def random_crop_flip(
    images: torch.Tensor, padding: int, flip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Random crop after zero padding, and random horizontal flip, of a (N, C, H, W) batch, in one gather.

    Every image gets its own offsets; the crop is done by indexing a padded copy with per-image row and column
    indices, so the whole batch costs a few tensor ops whatever N is.
    """
    n, _, h, w = images.shape
    device = images.device
    rows = torch.arange(h, device=device).expand(n, h)
    cols = torch.arange(w, device=device).expand(n, w)
    if padding:
        images = F.pad(images, (padding, padding, padding, padding))
        offsets = torch.randint(0, 2 * padding + 1, (2, n, 1), generator=generator, device="cpu").to(device)
        rows, cols = rows + offsets[0], cols + offsets[1]
    if flip:
        mirrored = torch.rand(n, 1, generator=generator, device="cpu").to(device) < 0.5
        cols = torch.where(mirrored, cols.flip(1), cols)
    batch = torch.arange(n, device=device)[:, None, None]
    # (N, H, W, C) after advanced indexing on dims 0, 2, 3; back to (N, C, H, W).
    return images.permute(0, 2, 3, 1)[batch, rows[:, :, None], cols[:, None, :]].permute(0, 3, 1, 2)
