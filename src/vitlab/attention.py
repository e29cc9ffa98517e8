"""Where a ViT looks: per-head CLS attention maps and attention rollout, rendered to PNG.

Rollout follows Abnar & Zuidema (2020), "Quantifying Attention Flow in Transformers": average the heads, add
the identity for the residual stream, renormalize rows, multiply the layers; the [CLS] row then says how much
each input patch flowed into the representation the head classifies.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.axes import Axes

# The object-oriented API renders with Agg and keeps no global figure registry: nothing to close or leak.
from matplotlib.figure import Figure
from torch import nn

from vitlab import io
from vitlab.checkpoint import Normalization
from vitlab.errors import VitlabError
from vitlab.models import model_spec

CELL_INCHES = 1.8  # each image panel; at DPI this shows a 32x32 image upscaled ~5x
DPI = 100
CMAP = "inferno"


def attention_rollout(weights: torch.Tensor) -> torch.Tensor:
    """(depth, B, heads, T, T) attention -> (B, T-1): the [CLS] token's rolled-out attention to each patch.

    Each rolled-out row sums to 1 over all T tokens, so a row's patch entries sum to 1 minus what stays on
    [CLS] itself.
    """
    tokens = weights.shape[-1]
    eye = torch.eye(tokens, dtype=weights.dtype, device=weights.device)
    layers = weights.mean(dim=2) + eye  # (depth, B, T, T): heads averaged, residual added
    layers = layers / layers.sum(dim=-1, keepdim=True)
    rollout = layers[0]
    for layer in layers[1:]:
        rollout = layer @ rollout  # later layers mix the token mixtures of earlier ones
    return rollout[:, 0, 1:]


def cls_attention(weights: torch.Tensor) -> torch.Tensor:
    """(depth, B, heads, T, T) -> (depth, B, heads, T-1): each layer's and head's [CLS]-to-patch attention."""
    return weights[..., 0, 1:]


def render_attention(
    model: nn.Module,
    images_uint8: np.ndarray,
    labels: Sequence[int],
    class_names: list[str],
    norm: Normalization,
    out_dir: Path,
) -> dict[str, Any]:
    """Write ``layer_{i}.png`` (per layer: image, then each head's [CLS] map) and ``rollout.png``.

    Returns a JSON-able summary; for a model without attention (CNN, MLP) writes nothing and says why.
    """
    arch = model_spec(model)["arch"]
    if not hasattr(model, "forward_with_attention"):
        return {"supported": False, "reason": f"{arch} has no attention"}
    if len(images_uint8) == 0:
        raise VitlabError("no images to render attention maps for")
    out_dir = Path(out_dir)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            x = norm.to_tensor(torch.as_tensor(images_uint8, device=device))
            logits, weights = model.forward_with_attention(x)
    finally:
        model.train(was_training)
    weights = weights.float().cpu()
    probabilities = logits.float().softmax(dim=1).cpu()
    confidence, predicted = probabilities.max(dim=1)
    depth, _, heads, tokens, _ = weights.shape
    side = math.isqrt(tokens - 1)
    titles = [
        f"true {class_names[int(t)]}\npred {class_names[int(p)]} {c:.0%}"
        for t, p, c in zip(labels, predicted.tolist(), confidence.tolist(), strict=True)
    ]

    per_head = cls_attention(weights).reshape(depth, len(images_uint8), heads, side, side)
    files = []
    for layer in range(depth):
        maps = [(f"head {h}", per_head[layer, :, h]) for h in range(heads)]
        fig = _grid(f"layer {layer}: [CLS] attention per head", images_uint8, titles, maps)
        files.append(_save(fig, out_dir / f"layer_{layer}.png"))
    rollout = attention_rollout(weights)
    fig = _grid(
        "attention rollout over all layers",
        images_uint8,
        titles,
        [("rollout", rollout.reshape(-1, side, side))],
    )
    files.append(_save(fig, out_dir / "rollout.png"))

    return {
        "supported": True,
        "arch": arch,
        "layers": depth,
        "heads": heads,
        "images": len(images_uint8),
        "patch_grid": [side, side],
        "correct": int((predicted == torch.as_tensor(np.asarray(labels))).sum()),
        "files": files,
        # Entropies over patches scaled to [0, 1]: 1 is attention spread evenly, 0 all on one patch.
        "rollout_patch_entropy": round(float(_patch_entropy(rollout).mean()), 4),
        "cls_patch_entropy_by_layer": [
            round(float(v), 4) for v in _patch_entropy(cls_attention(weights)).mean(dim=(1, 2))
        ],
    }


def _patch_entropy(attention: torch.Tensor) -> torch.Tensor:
    """Entropy over the last axis (patches), each row renormalized, divided by its maximum log(patches)."""
    patches = attention.shape[-1]
    if patches == 1:
        return torch.zeros(attention.shape[:-1])
    p = attention / attention.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return -torch.special.xlogy(p, p).sum(dim=-1) / math.log(patches)


def _grid(
    heading: str, images: np.ndarray, titles: list[str], maps: list[tuple[str, torch.Tensor]]
) -> Figure:
    """One row per image: the image, then each (name, (N, side, side)) map overlaid on it."""
    rows, cols = len(images), 1 + len(maps)
    fig = Figure(figsize=(CELL_INCHES * cols, CELL_INCHES * rows), dpi=DPI)
    axes = fig.subplots(rows, cols, squeeze=False)
    for i, image in enumerate(images):
        _show(axes[i, 0], image, titles[i])
        for j, (name, attention) in enumerate(maps, start=1):
            _show(axes[i, j], image, name if i == 0 else "")
            heat = attention[i].numpy()
            # Min-max per map shows where each head looks, not how much: raw values shrink as patches grow.
            heat = (heat - heat.min()) / max(float(heat.max() - heat.min()), 1e-12)
            # The patch grid stretched over the image: nearest keeps each patch's square honest.
            height, width = image.shape[:2]
            extent = (-0.5, width - 0.5, height - 0.5, -0.5)
            axes[i, j].imshow(heat, cmap=CMAP, alpha=0.6, extent=extent, interpolation="nearest")
    fig.suptitle(heading, fontsize=9)
    fig.tight_layout()
    return fig


def _show(ax: Axes, image: np.ndarray, title: str) -> None:
    ax.imshow(image, interpolation="nearest")
    ax.set_title(title, fontsize=8)
    ax.set_axis_off()


def _save(fig: Figure, path: Path) -> str:
    with io.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png")
    return path.name
