"""The classic small CNN baseline: [conv3x3-ReLU-maxpool] per channel width, then one linear layer.

With the default widths (16, 32) this is the conv16-pool-conv32-pool-linear net the seed notebooks compare
ViTs against.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class CNNConfig:
    num_classes: int = 10
    image_size: int = 32
    in_channels: int = 3
    channels: tuple[int, ...] = (16, 32)
    dropout: float = 0.0


class CNN(nn.Module):
    def __init__(self, cfg: CNNConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = []
        width = cfg.in_channels
        for out in cfg.channels:
            layers += [nn.Conv2d(width, out, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            width = out
        self.features = nn.Sequential(*layers)
        side = cfg.image_size // 2 ** len(cfg.channels)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Dropout(cfg.dropout), nn.Linear(width * side * side, cfg.num_classes)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, 3, 32, 32) -> (B, classes)
