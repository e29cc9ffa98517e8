"""A multilayer perceptron on flattened pixels: the floor any image model should clear."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class MLPConfig:
    num_classes: int = 10
    image_size: int = 32
    in_channels: int = 3
    hidden: tuple[int, ...] = (512, 256)
    dropout: float = 0.0


class MLP(nn.Module):
    def __init__(self, cfg: MLPConfig):
        super().__init__()
        self.cfg = cfg
        layers: list[nn.Module] = [nn.Flatten()]
        width = cfg.in_channels * cfg.image_size**2
        for out in cfg.hidden:
            layers += [nn.Linear(width, out), nn.GELU(), nn.Dropout(cfg.dropout)]
            width = out
        layers.append(nn.Linear(width, cfg.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # (B, 3, 32, 32) -> (B, classes)
