"""The classic small CNN baseline: [conv3x3-ReLU-maxpool] per channel width, then one linear layer.

With the default widths (16, 32) this is the conv16-pool-conv32-pool-linear net the seed notebooks compare
ViTs against.
"""

from __future__ import annotations

import torch
from torch import nn

from vitlab.params import CNNConfig


class CNN(nn.Module):
    """[conv3x3-ReLU-maxpool2] per width in ``config.channels``, then dropout and one linear layer."""

    def __init__(self, config: CNNConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = []
        width = config.in_channels
        for out in config.channels:
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            width = out
        self.features = nn.Sequential(*layers)
        side = config.image_size // 2 ** len(config.channels)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(config.dropout), nn.Linear(width * side * side, config.num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized float images (B, C, H, W) -> logits (B, num_classes)."""
        return self.head(self.features(x))  # (B, C, H, W) -> (B, classes)
