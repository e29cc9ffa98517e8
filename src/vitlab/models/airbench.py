"""airbench's CNN: the network of Jordan (2024), "94% on CIFAR-10 in 3.29 seconds on a single GPU" (arXiv
2404.00498), which descends from Page's "How to train your ResNet" (2018) via hlb-CIFAR10. Written from the
paper's description.

whitening conv (k x k, no padding, frozen; ``vitlab.models.whitening``) -> GELU -> one conv group per width
(conv3x3 -> maxpool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU) -> global max pooling -> linear (no bias) ->
x 1/9. With the default widths (64, 256, 256) a 32x32 image is 31x31 after the whitening conv, then 15, 7
and 3 pixels a side, and the max pooling over the last 3x3 is the paper's 3x3 max pooling.

The initialisation and normalization details the paper credits:

- the whitening conv's weights come from the training images (``Airbench.init_from_data``, called by
  ``vitlab.models.init_from_data`` before training) and are never trained; its bias is trainable (the paper
  trains it for the first epochs only, a choice of the training recipe);
- every conv after it starts as a partial identity (``nn.init.dirac_``): its first ``in_channels`` filters
  pass their input channel through unchanged, the others keep PyTorch's default initialization;
- BatchNorm with eps 1e-12 and its scale frozen at 1: only its bias is learned, which the recipe trains at a
  higher learning rate (``vitlab.models.batchnorm_biases`` finds those parameters). Its running statistics
  weight each new batch 0.6 (PyTorch's ``momentum``); the paper's "momentum 0.6" is the weight of the old
  statistics (its code passes 1 - 0.6 to PyTorch), a difference found after vitlab's benchmark ran with
  0.6, kept until measured (only evaluation reads the running statistics);
- the logits scaled by a fixed 1/9 (a softmax temperature of 9, inherited from hlb-CIFAR10).
"""

from __future__ import annotations

import torch
from torch import nn

from vitlab.models.whitening import whiten_conv_
from vitlab.params import AirbenchConfig

BN_MOMENTUM = 0.6
BN_EPS = 1e-12
LOGIT_SCALE = 1 / 9


class ConvGroup(nn.Sequential):
    """conv3x3 -> maxpool 2 -> BN -> GELU -> conv3x3 -> BN -> GELU: (B, width_in, H, W) -> (B, width_out,
    H/2, W/2). Both convs start as partial identities (no biases: each is followed by BN)."""

    def __init__(self, width_in: int, width_out: int):
        layers = [
            nn.Conv2d(width_in, width_out, 3, padding=1, bias=False),
            nn.MaxPool2d(2),
            _batchnorm(width_out),
            nn.GELU(),
            nn.Conv2d(width_out, width_out, 3, padding=1, bias=False),
            _batchnorm(width_out),
            nn.GELU(),
        ]
        super().__init__(*layers)
        for conv in (self[0], self[4]):
            with torch.no_grad():
                nn.init.dirac_(conv.weight[: conv.in_channels])


class Airbench(nn.Module):
    """Whitening conv, GELU, a ``ConvGroup`` per ``config.group_widths``, global max pooling, dropout and a
    bias-free linear head whose logits are scaled by 1/9 (Jordan, 2024; see the module docstring).

    The whitening conv has 2 * in_channels * whiten_kernel**2 output channels (24 for RGB 2x2 patches): each
    eigenvector of the patch covariance and its negation.
    """

    def __init__(self, config: AirbenchConfig):
        super().__init__()
        self.config = config
        width = 2 * config.in_channels * config.whiten_kernel**2
        whiten = nn.Conv2d(config.in_channels, width, config.whiten_kernel)
        whiten.weight.requires_grad_(False)
        groups: list[nn.Module] = []
        for width_out in config.group_widths:
            groups.append(ConvGroup(width, width_out))
            width = width_out
        self.features = nn.Sequential(whiten, nn.GELU(), *groups)
        self.head = nn.Sequential(
            nn.AdaptiveMaxPool2d(1),
            nn.Flatten(),
            nn.Dropout(config.dropout),
            nn.Linear(width, config.num_classes, bias=False),
        )

    @property
    def whiten(self) -> nn.Conv2d:
        """The whitening conv, ``features[0]``."""
        return self.features[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized float images (B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.features(x)) * LOGIT_SCALE

    def init_from_data(self, images: torch.Tensor) -> bool:
        """Set the whitening conv from ``images``, float (N, C, H, W) normalized as training feeds them (the
        training images); returns True (it always has data-dependent layers)."""
        whiten_conv_(self.whiten, images)
        return True


def _batchnorm(width: int) -> nn.BatchNorm2d:
    norm = nn.BatchNorm2d(width, eps=BN_EPS, momentum=BN_MOMENTUM)
    norm.weight.requires_grad_(False)  # the scale stays 1: only the bias learns
    return norm
