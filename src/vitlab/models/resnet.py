"""A CIFAR ResNet (He et al., 2016, section 4.2): the strong CNN baseline a ViT should be measured against.

conv3x3 stem -> stages of torchvision's BasicBlocks (two conv3x3-BN, identity shortcut; a 1x1 conv-BN
shortcut where the shape changes), each stage after the first halving the side and its width doubling ->
global average pooling -> linear. The defaults, widths (16, 32, 64) with 3 blocks each, are ResNet-20
(0.27M parameters), which trains in minutes on a CPU and holds its own against ViTs on small data.
"""

from __future__ import annotations

import torch
from torch import nn

from vitlab.compat import import_torchvision
from vitlab.params import ResNetConfig


class ResNet(nn.Module):
    """conv3x3-BN-ReLU stem, a stage of torchvision BasicBlocks per width (each after the first halving the
    side), global average pooling, dropout, linear head (He et al., 2016, section 4.2)."""

    def __init__(self, config: ResNetConfig):
        super().__init__()
        import_torchvision()
        from torchvision.models.resnet import BasicBlock

        self.config = config
        width = config.widths[0]
        self.stem = nn.Sequential(
            nn.Conv2d(config.in_channels, width, 3, padding=1, bias=False),
            nn.BatchNorm2d(width),
            nn.ReLU(True),
        )
        blocks: list[nn.Module] = []
        for stage, (out, n) in enumerate(zip(config.widths, config.blocks, strict=True)):
            for i in range(n):
                stride = 2 if stage > 0 and i == 0 else 1
                blocks.append(BasicBlock(width, out, stride, _projection(width, out, stride)))
                width = out
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Sequential(
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
            nn.Dropout(config.dropout),
            nn.Linear(width, config.num_classes),
        )
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
        # Each residual branch starts as zero, so the net starts as its shortcuts (Goyal et al., 2017).
        for block in blocks:
            nn.init.zeros_(block.bn2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized float images (B, C, H, W) -> logits (B, num_classes)."""
        x = self.blocks(self.stem(x))  # (B, C, H, W) -> (B, widths[-1], H/2^(stages-1), ...)
        return self.head(x)  # (B, classes)


def _projection(width_in: int, width_out: int, stride: int) -> nn.Module | None:
    """The 1x1 conv-BN shortcut of a block that changes the shape; None keeps the identity."""
    if stride == 1 and width_in == width_out:
        return None
    return nn.Sequential(nn.Conv2d(width_in, width_out, 1, stride, bias=False), nn.BatchNorm2d(width_out))
