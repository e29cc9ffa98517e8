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


# CCT's sizes by depth (its reference code's cct_2 ... cct_7): token width, heads, MLP ratio.
_CCT_SIZES = {2: (128, 2, 1), 4: (128, 2, 1), 6: (256, 4, 2), 7: (256, 4, 2)}


def _cct(depth: int, conv_layers: int, pos_embed: str = "learned") -> Preset:
    """CCT-``depth``/3x``conv_layers`` of Hassani et al. (2021), "Escaping the Big Data Paradigm with Compact
    Transformers": the size of ``_CCT_SIZES[depth]``, ``conv_layers`` 3x3 conv stages (our conv stem at
    patch_size 2**conv_layers), sequence pooling, no qkv biases, ``pos_embed`` positions and CCT's
    stochastic depth 0.1. CCT's attention dropout 0.1 is left out: our dropout would drop in the MLP too,
    where CCT has none."""
    dim, heads, mlp_ratio = _CCT_SIZES[depth]
    patch_size = 2**conv_layers
    config = {"stem": "conv", "patch_size": patch_size, "dim": dim, "depth": depth, "heads": heads}
    config |= {"mlp_dim": mlp_ratio * dim, "pool": "seq", "qkv_bias": False, "pos_embed": pos_embed}
    config |= {"drop_path": 0.1}
    stages = f"{conv_layers} conv3x3 stage{'s' * (conv_layers > 1)}"
    description = (
        f"CCT-{depth}/3x{conv_layers}: {stages} (patch {patch_size}), dim {dim}, {depth} blocks of {heads} "
        f"heads, mlp {mlp_ratio * dim}; sequence pooling, no qkv bias, {pos_embed} positions, drop_path 0.1"
    )
    return Preset("vit", config, description)


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
    "cct-2-3x2": _cct(2, 2),
    "cct-4-3x2": _cct(4, 2),
    # Published with sine positions: its 3.168M parameters count none (ours are the 2D sin-cos ones).
    "cct-6-3x1": _cct(6, 1, pos_embed="sincos"),
    "cct-6-3x2": _cct(6, 2),
    "cct-7-3x1": _cct(7, 1),
    "cct-7-3x2": _cct(7, 2),
    # SL-ViT (Lee, Lee and Song, 2021, "Vision Transformer for Small-Size Datasets"): the CIFAR ViT of their
    # official code (patch 4, dim 192, depth 9, 12 heads of width 192 // 12 = 16, mlp ratio 2, no qkv bias,
    # stochastic depth 0.1, there in every block, here rising to it) with shifted patch tokenization and
    # locality self-attention.
    "vit-sl": Preset(
        "vit",
        {"stem": "spt", "lsa": True, "qkv_bias": False, "patch_size": 4, "dim": 192, "depth": 9, "heads": 12}
        | {"mlp_dim": 384, "drop_path": 0.1},
        "SL-ViT: shifted patches (patch 4), dim 192, 9 blocks of 12 heads with LSA, mlp 384; "
        "no qkv bias, drop_path 0.1",
    ),
    "cnn-small": Preset("cnn", {"channels": (16, 32)}, "conv16-pool-conv32-pool-linear"),
    "resnet": Preset(
        "resnet",
        {"widths": (16, 32, 64), "blocks": (3, 3, 3)},
        "ResNet-20: 3 stages of 3 BasicBlocks, widths 16-32-64",
    ),
    "mlp": Preset("mlp", {"hidden": (512, 256)}, "hidden layers 512, 256 on the flattened pixels"),
    # Jordan (2024), "94% on CIFAR-10 in 3.29 seconds on a single GPU" (arXiv 2404.00498): airbench94's net.
    "airbench": Preset(
        "airbench",
        {"group_widths": (64, 256, 256), "whiten_kernel": 2},
        "airbench94: frozen 2x2 patch-whitening conv (24 ch), 3 conv groups 64-256-256 (conv-pool-BN-GELU-"
        "conv-BN-GELU, dirac init), max pool, linear x 1/9",
    ),
}


def preset_of(arch: str, config: dict[str, Any]) -> str | None:
    """The preset a built model is (``arch`` and ``config`` as a checkpoint or model.json describes it), the
    name its reports show; None when it is none of them.

    A preset matches when every key of the built config, defaults filled in, equals the preset's, apart from
    what the data sets (``vitlab.params.FROM_DATA``) and the patch size, which a patch-size study varies and
    reports show on their own: ``-S model.patch_size=2`` beside tinyvit is still tinyvit, at patch 2. Among
    presets that differ only in patch size (cct-7-3x1, cct-7-3x2) the one of the built patch size wins.
    A name from params.yaml (``model.preset``) is not trusted here: a preset rule may have set it aside.
    """
    from vitlab.params import CONFIGS, FROM_DATA  # vitlab.params reads PRESETS: imported when called

    if arch not in CONFIGS:
        return None
    schema, ignored = CONFIGS[arch], {*FROM_DATA, "patch_size"}
    built = schema(**config)
    shape = built.model_dump(mode="json", exclude=ignored)
    patch_size = getattr(built, "patch_size", None)
    matches = sorted(
        (preset.config.get("patch_size") != patch_size, name)
        for name, preset in PRESETS.items()
        if preset.arch == arch and schema(**preset.config).model_dump(mode="json", exclude=ignored) == shape
    )
    return matches[0][1] if matches else None
