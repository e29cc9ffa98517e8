"""Model registry: build any architecture from its name and a plain dict of its config.

Checkpoints store ``{"arch": name, "config": asdict(cfg)}`` beside the weights, so a checkpoint rebuilds its
own model without params.yaml. Named configurations live in ``vitlab.presets`` (plain data, which params
validation reads without importing torch).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Iterator
from typing import Any

from torch import nn

from vitlab.errors import VitlabError
from vitlab.models.cnn import CNN, CNNConfig
from vitlab.models.mlp import MLP, MLPConfig
from vitlab.models.resnet import ResNet, ResNetConfig
from vitlab.models.vit import ViT, ViTConfig
from vitlab.presets import PRESETS, Preset

ARCHITECTURES: dict[str, tuple[type, type[nn.Module]]] = {
    "vit": (ViTConfig, ViT),
    "cnn": (CNNConfig, CNN),
    "resnet": (ResNetConfig, ResNet),
    "mlp": (MLPConfig, MLP),
}

__all__ = [
    "ARCHITECTURES",
    "PRESETS",
    "Preset",
    "build_model",
    "count_parameters",
    "model_spec",
    "preset_spec",
]


def build_model(arch: str, config: dict[str, Any]) -> nn.Module:
    config_cls, model_cls = ARCHITECTURES[_check_config(arch, config)]
    values = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
    return model_cls(config_cls(**values))


def preset_spec(name: str, **overrides: Any) -> tuple[str, dict[str, Any]]:
    """The (arch, config) of a preset, with ``overrides`` replacing its values key by key."""
    if name not in PRESETS:
        raise VitlabError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    preset = PRESETS[name]
    config = preset.config | overrides
    return _check_config(preset.arch, config), config


def model_spec(model: nn.Module) -> dict[str, Any]:
    """The {"arch", "config"} pair that ``build_model`` turns back into this model."""
    for arch, (_, model_cls) in ARCHITECTURES.items():
        if type(model) is model_cls:
            return {
                "arch": arch,
                "config": {
                    k: list(v) if isinstance(v, tuple) else v
                    for k, v in dataclasses.asdict(model.cfg).items()
                },
            }
    raise TypeError(f"not a registered vitlab model: {type(model).__name__}")


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Run ``model`` in eval mode (dropout off, batch norm on its running statistics) inside the block, and
    give it back in the train/eval mode it had, also when the block raises."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)


def has_attention(model: nn.Module) -> bool:
    """Whether ``model`` returns its attention weights (``forward_with_attention``): a ViT does, the CNN,
    ResNet and MLP baselines do not."""
    return callable(getattr(model, "forward_with_attention", None))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check_config(arch: str, config: dict[str, Any]) -> str:
    if arch not in ARCHITECTURES:
        raise VitlabError(f"unknown architecture {arch!r} (known: {', '.join(ARCHITECTURES)})")
    fields = {f.name for f in dataclasses.fields(ARCHITECTURES[arch][0])}
    unknown = set(config) - fields
    if unknown:
        raise VitlabError(f"{arch} config has unknown keys: {', '.join(sorted(unknown))}")
    return arch
