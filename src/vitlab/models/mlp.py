"""A multilayer perceptron on flattened pixels: the floor any image model should clear."""

from __future__ import annotations

import torch
from torch import nn

from vitlab.params import MLPConfig


class MLP(nn.Module):
    """Flatten, then [linear-GELU-dropout] per width in ``config.hidden``, then a linear head."""

    def __init__(self, config: MLPConfig):
        super().__init__()
        self.config = config
        layers: list[nn.Module] = [nn.Flatten()]
        width = config.in_channels * config.image_size**2
        for out in config.hidden:
            layers += [nn.Linear(width, out), nn.GELU(), nn.Dropout(config.dropout)]
            width = out
        layers.append(nn.Linear(width, config.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized float images (B, C, H, W) -> logits (B, num_classes)."""
        return self.net(x)  # (B, C, H, W) -> (B, classes)
