"""Named architectures (``model.preset`` in params.yaml): the models users of the seed repositories know.

Each preset is an architecture and the config keys it fixes (vitlab.params: ViTConfig ...); every other key
keeps its default, and any key can be overridden (``preset_config(name, dim=128)``, or ``model.dim: 128``
beside the preset in params.yaml). The number of classes comes from the dataset, so no preset fixes it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Preset:
    """A named architecture: ``arch`` (a vitlab.models.MODELS key), the config keys it fixes and a one-line
    ``description`` (shown by ``python -m vitlab.models``)."""

    arch: str
    config: dict[str, Any] = field(default_factory=dict)
    description: str = ""


PRESETS: dict[str, Preset] = {
    "tinyvit": Preset(
        "vit",
        {"patch_size": 4, "dim": 64, "depth": 6, "heads": 4, "mlp_dim": 128},
        "patch 4, dim 64, 6 blocks of 4 heads, mlp 128; CLS token, learned positions, LN + linear head",
    ),
    "vit-tiny": Preset(
        "vit",
        {"patch_size": 4, "dim": 192, "depth": 12, "heads": 3, "mlp_dim": 768},
        "patch 4, dim 192, 12 blocks of 3 heads, mlp 768 (ViT-Ti)",
    ),
    "vit-small": Preset(
        "vit",
        {"patch_size": 4, "dim": 384, "depth": 7, "heads": 6, "mlp_dim": 1536},
        "patch 4, dim 384, 7 blocks of 6 heads, mlp 1536",
    ),
    "vit-c100": Preset(
        "vit",
        {"patch_size": 4, "dim": 192, "depth": 6, "heads": 8, "mlp_dim": 256, "dropout": 0.1},
        "patch 4, dim 192, 6 blocks of 8 heads, mlp 256, dropout 0.1 (~1.5M for CIFAR-100)",
    ),
    "vit-p2": Preset(
        "vit",
        # 3 heads do not divide 64: each head gets its own width (lucidrains' dim_head), 3 x 32 = 96.
        {"patch_size": 2, "dim": 64, "depth": 10, "heads": 3, "head_dim": 32, "mlp_dim": 128},
        "patch 2, dim 64, 10 blocks of 3 heads of width 32, mlp 128",
    ),
    "cnn-small": Preset("cnn", {"channels": (16, 32)}, "conv16-pool-conv32-pool-linear"),
    "resnet": Preset(
        "resnet",
        {"widths": (16, 32, 64), "blocks": (3, 3, 3)},
        "ResNet-20: 3 stages of 3 BasicBlocks, widths 16-32-64",
    ),
    "mlp": Preset("mlp", {"hidden": (512, 256)}, "hidden layers 512, 256 on the flattened pixels"),
}
