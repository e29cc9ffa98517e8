"""Model registry: build any architecture from its name and its config (vitlab.params: ViTConfig ...).

Models with layers that start from the training images (airbench's whitening conv, a ViT with
``whiten_stem``) get them from ``init_from_data``, called once before training.

Checkpoints store ``describe_model(model)``, ``{"arch": name, "config": dict}``, beside the weights, so a
checkpoint rebuilds its own model without params.yaml. Named configs live in ``vitlab.presets`` (plain
data, which params validation reads without importing torch).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from pydantic import ValidationError
from torch import nn

from vitlab.errors import VitlabError
from vitlab.models.airbench import Airbench
from vitlab.models.cnn import CNN
from vitlab.models.mlp import MLP
from vitlab.models.resnet import ResNet
from vitlab.models.vit import ViT
from vitlab.params import CONFIGS, ArchConfig
from vitlab.presets import PRESETS, Preset

MODELS: dict[str, type[nn.Module]] = {
    "vit": ViT,
    "cnn": CNN,
    "resnet": ResNet,
    "mlp": MLP,
    "airbench": Airbench,
}

__all__ = [
    "MODELS",
    "PRESETS",
    "Preset",
    "batchnorm_biases",
    "build_model",
    "count_parameters",
    "describe_model",
    "distills",
    "eval_mode",
    "has_attention",
    "init_from_data",
    "preset_config",
]


def build_model(arch: str, config: ArchConfig | dict[str, Any]) -> nn.Module:
    """A new model of architecture ``arch`` (a ``MODELS`` key) with ``config``: the
    architecture's config, or a dict of its keys (a checkpoint's; missing keys take their defaults).

    Raises VitlabError for an unknown architecture, an unknown key or an impossible config, naming it.
    """
    if arch not in MODELS:
        raise VitlabError(f"unknown architecture {arch!r} (known: {', '.join(MODELS)})")
    if isinstance(config, dict):
        config = _validate(arch, config)
    if not isinstance(config, CONFIGS[arch]):
        raise VitlabError(f"a {arch} needs a {CONFIGS[arch].__name__}, got a {type(config).__name__}")
    return MODELS[arch](config)


def preset_config(name: str, **overrides: Any) -> tuple[str, dict[str, Any]]:
    """The architecture and config keys of preset ``name``, ``overrides`` replacing its values key by key."""
    if name not in PRESETS:
        raise VitlabError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    preset = PRESETS[name]
    config = preset.config | overrides
    _validate(preset.arch, config)
    return preset.arch, config


def describe_model(model: nn.Module) -> dict[str, Any]:
    """The ``{"arch", "config"}`` pair (JSON-ready: lists, not tuples) that ``build_model`` turns back into
    this model. Raises TypeError for a model that is not one of vitlab's architectures."""
    for arch, model_cls in MODELS.items():
        if type(model) is model_cls:
            return {"arch": arch, "config": model.config.model_dump(mode="json")}
    raise TypeError(f"not a registered vitlab model: {type(model).__name__}")


def _validate(arch: str, config: dict[str, Any]) -> ArchConfig:
    """``config`` as architecture ``arch``'s config; a VitlabError naming every problem on one line."""
    try:
        return CONFIGS[arch](**config)
    except ValidationError as error:
        problems = []
        for e in error.errors():
            key = ".".join(map(str, e["loc"]))
            message = (
                "unknown key" if e["type"] == "extra_forbidden" else e["msg"].removeprefix("Value error, ")
            )
            problems.append(f"{key}: {message}" if key else message)
        raise VitlabError(f"{arch} config: {'; '.join(problems)}") from None


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


def distills(model: nn.Module) -> bool:
    """Whether ``model`` learns from a teacher (DeiT): a ViT with ``distillation`` on, whose training reads
    both heads (``forward_heads``, vitlab.distill)."""
    return bool(getattr(model.config, "distillation", False))


def init_from_data(model: nn.Module, images: torch.Tensor) -> bool:
    """Initialise the layers of ``model`` that start from the training images, in place; call it once on a
    new model, before training (a checkpoint's weights already hold the result). ``images``: float
    (N, C, H, W) training images, normalized as training feeds them; vitlab.models.whitening's
    ``WHITENING_IMAGES`` of them are plenty. Returns whether ``model`` had such layers (airbench's whitening
    conv, a ViT's stem with ``whiten_stem``); a model without them is left as it is."""
    init = getattr(model, "init_from_data", None)
    return bool(init(images)) if callable(init) else False


def batchnorm_biases(model: nn.Module) -> list[nn.Parameter]:
    """The biases (shifts) of ``model``'s BatchNorm layers: the parameters airbench trains at a higher
    learning rate (Jordan, 2024), for an optimizer's parameter group. Empty for a model without BatchNorm."""
    return [
        m.bias
        for m in model.modules()
        if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.bias is not None
    ]


def count_parameters(model: nn.Module) -> int:
    """The number of trainable parameters (every element of every tensor that requires grad)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
