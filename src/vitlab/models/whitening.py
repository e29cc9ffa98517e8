"""Patch whitening: a first convolution that starts as the whitening of the training images' patches.

Jordan (2024), "94% on CIFAR-10 in 3.29 seconds on a single GPU" (arXiv 2404.00498), after Page's "How to
train your ResNet" (2018): the first layer's filters are the eigenvectors of the covariance of the images'
k x k patches, each scaled by 1/sqrt(eigenvalue + eps), together with their negations (so a following ReLU
or GELU keeps both signs of each component). On the training patches the outputs then have (nearly) the
identity covariance: every direction of pixel variation enters the network at the same scale, the fine
detail (small eigenvalues) as loudly as the mean colour (large ones).

The filters need the training images, which a model's constructor does not have: ``init_from_data`` (in
``vitlab.models``) runs once before training, and a checkpoint then stores the result with the weights.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

WHITENING_IMAGES = 5000  # training images the covariance is estimated on, as airbench
WHITENING_EPS = 5e-4  # added to each eigenvalue: caps the gain of the near-constant directions
_CHUNK = 256  # images per step of the covariance sum: bounds the memory of the unfolded patches


def patch_whitening(
    images: torch.Tensor, kernel_size: int, eps: float = WHITENING_EPS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The whitening filters of the ``kernel_size`` x ``kernel_size`` patches of ``images`` and their mean.

    ``images``: float (N, C, H, W), normalized as the network sees them. Returns ``filters``, float32
    (2 * D, C, k, k) with D = C * k * k, in pairs (v_1, -v_1, v_2, -v_2, ...), largest eigenvalue first, each
    v_i = e_i / sqrt(lambda_i + eps) for the eigenpairs (lambda_i, e_i) of the patches' covariance; and the
    patches' mean, float32 (D,), from which a conv's bias centres its outputs (``whiten_conv_``). Every
    patch inside the image counts (stride 1, no padding); the sums run in float64.

    Raises ValueError for images smaller than a patch.
    """
    _, channels, height, width = images.shape
    if min(height, width) < kernel_size:
        raise ValueError(f"{height}x{width} images have no {kernel_size}x{kernel_size} patch")
    dim = channels * kernel_size**2
    total, outer, count = torch.zeros(dim, dtype=torch.float64), torch.zeros(dim, dim, dtype=torch.float64), 0
    for chunk in images.split(_CHUNK):
        patches = F.unfold(chunk.detach().cpu().double(), kernel_size)  # (n, D, L), D in (C, kh, kw) order
        patches = patches.transpose(1, 2).reshape(-1, dim)  # (n * L, D)
        total += patches.sum(0)
        outer += patches.T @ patches
        count += len(patches)
    mean = total / count
    covariance = outer / count - torch.outer(mean, mean)
    eigenvalues, eigenvectors = torch.linalg.eigh(covariance)  # ascending
    scaled = (eigenvectors / (eigenvalues.clamp_min(0) + eps).sqrt()).T.flip(0)  # (D, D): rows, largest first
    filters = torch.stack([scaled, -scaled], dim=1).reshape(2 * dim, channels, kernel_size, kernel_size)
    return filters.float(), mean.float()


@torch.no_grad()
def whiten_conv_(conv: nn.Conv2d, images: torch.Tensor, eps: float = WHITENING_EPS) -> None:
    """Set ``conv``'s first filters to the whitening filters of ``images``' patches (``patch_whitening``),
    in place: all 2 * C * k * k of them when the conv has as many output channels (or more: the rest keep
    their initialization), else the leading ones, the patches' strongest components. A bias, if the conv
    has one, is set to centre those outputs on the images (zero mean).

    ``images``: float (N, C, H, W) as the conv receives them. Raises ValueError for a conv that is not
    square-kerneled, is grouped or dilated, or whose input channels are not the images'.
    """
    k = conv.kernel_size[0]
    if conv.kernel_size != (k, k) or conv.groups != 1 or conv.dilation != (1, 1):
        raise ValueError(f"can only whiten a plain square-kernel conv, not {conv}")
    if conv.in_channels != images.shape[1]:
        raise ValueError(f"{conv} takes {conv.in_channels} channels; the images have {images.shape[1]}")
    filters, mean = patch_whitening(images, k, eps)
    n = min(conv.out_channels, len(filters))
    filters = filters[:n].to(conv.weight)
    conv.weight[:n] = filters
    if conv.bias is not None:
        conv.bias[:n] = -(filters.flatten(1) @ mean.to(filters))
