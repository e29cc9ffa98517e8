"""Where a model looks: per-head attention maps and attention rollout for ViTs, Grad-CAM for CNNs, as PNGs.

Rollout follows Abnar & Zuidema (2020), "Quantifying Attention Flow in Transformers": average the heads, add
the identity for the residual stream, renormalize rows, multiply the layers; the [CLS] row then says how much
each input patch flowed into the representation the head classifies. A distilled ViT (DeiT) has a second
token before the patches, its distillation token: the maps still read the [CLS] row, over the patches alone.
A ViT that mean-pools its tokens has no [CLS] token: its classifier reads the average of all token rows, so
the maps average the query rows instead (the attention each patch receives), which for the rollout is exact.
Sequence pooling (CCT) reads a weighted average of the token rows, with weights of its own per image: the
maps weigh the query rows with them (rollout = pooling weights @ rollout, again exact), and the weights
themselves are drawn beside the rollout.

Both families are drawn in the same layout (one row per test image, the image titled with its prediction,
then the maps overlaid on it, on one color scale), so a ViT's rollout and a CNN's Grad-CAM can be set side by
side on the same images.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitlab.checkpoint import Normalization
from vitlab.errors import VitlabError
from vitlab.figures import plot_overlays, prediction_title
from vitlab.gradcam import find_target_layer, grad_cam
from vitlab.models import describe_model, eval_mode, has_attention

RELATIVE = "relative to the map's maximum"
# Per pooling (ViTConfig.pool): what a layer's map shows, and what the rollout's title adds.
QUERIES = {
    "cls": ("[CLS] attention", ""),
    "mean": (
        "mean attention received (no [CLS] token: mean pooling)",
        " (mean of all tokens: no [CLS] token)",
    ),
    "seq": (
        "attention received, weighted by sequence pooling (no [CLS] token)",
        " (tokens weighted by sequence pooling), and the pooling weights",
    ),
}


def attention_rollout(
    weights: torch.Tensor, prefix_tokens: int = 1, pool_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """(depth, B, heads, T, T) attention -> (B, patches): each patch's rolled-out share in the pooled token.

    ``prefix_tokens`` come before the patches (``ViTConfig.num_prefix_tokens``): a [CLS] token (token 0),
    then DeiT's distillation token. With a [CLS] token the result is its row over the patches (the row sums
    to 1 over all T tokens, so the patch entries sum to 1 minus what stays on the prefix tokens); with none
    (0), the mean of all rows, as the classifier mean-pools the tokens; with sequence pooling's
    ``pool_weights`` (B, T), the rows weighted by them (no prefix tokens then, so ``prefix_tokens`` is not
    read).
    """
    tokens = weights.shape[-1]
    eye = torch.eye(tokens, dtype=weights.dtype, device=weights.device)
    layers = weights.mean(dim=2) + eye  # (depth, B, T, T): heads averaged, residual added
    layers = layers / layers.sum(dim=-1, keepdim=True)
    rollout = layers[0]
    for layer in layers[1:]:
        rollout = layer @ rollout  # later layers mix the token mixtures of earlier ones
    if pool_weights is not None:
        return (pool_weights[:, None] @ rollout).squeeze(1)
    return rollout[:, 0, prefix_tokens:] if prefix_tokens else rollout.mean(dim=1)


def patch_attention(
    weights: torch.Tensor, prefix_tokens: int = 1, pool_weights: torch.Tensor | None = None
) -> torch.Tensor:
    """(depth, B, heads, T, T) -> (depth, B, heads, patches): the [CLS] row over the patches, which follow
    ``prefix_tokens`` tokens ([CLS], then a distillation token), or without any (0: no [CLS] token) the mean
    of all query rows (the attention each patch receives), or with sequence pooling's ``pool_weights``
    (B, T) the query rows weighted by them (``prefix_tokens`` is then not read)."""
    if pool_weights is not None:
        return torch.einsum("bq,lbhqk->lbhk", pool_weights, weights)
    return weights[..., 0, prefix_tokens:] if prefix_tokens else weights.mean(dim=-2)


def render_attention(
    model: nn.Module,
    images_uint8: np.ndarray,
    labels: Sequence[int],
    class_names: list[str],
    norm: Normalization,
    out_dir: Path,
) -> dict[str, Any]:
    """ViT: ``layer_{i}.png`` (per layer: image, then each head's map) and ``rollout.png``; a convolutional
    model: ``gradcam.png`` in the rollout's layout. Returns a JSON-able summary; for a model with neither
    attention nor a spatial feature map (an MLP) writes nothing and says why.
    """
    if len(images_uint8) == 0:
        raise VitlabError("no images to render attention maps for")
    arch = describe_model(model)["arch"]
    device = next(model.parameters()).device
    x = norm.to_tensor(torch.as_tensor(images_uint8, device=device))
    if has_attention(model):
        return _render_vit(model, arch, x, images_uint8, labels, class_names, Path(out_dir))
    target = find_target_layer(model, x)
    if target is None:
        return {"supported": False, "reason": f"{arch} has neither attention nor a spatial feature map"}
    layer_name, layer = target
    logits, cams = grad_cam(model, x, layer)
    titles, correct = _titles(logits, labels, class_names)
    side_h, side_w = cams.shape[-2:]
    path = plot_overlays(
        f"Grad-CAM of the predicted class\nat layer '{layer_name}' ({side_h}x{side_w} feature map)",
        images_uint8,
        titles,
        correct,
        [("Grad-CAM", cams.cpu().numpy())],
        f"Grad-CAM {RELATIVE}",
        Path(out_dir) / "gradcam.png",
        smooth=True,
    )
    return {
        "supported": True,
        "arch": arch,
        "method": "grad-cam",
        "layer": layer_name,
        "feature_grid": [side_h, side_w],
        "images": len(images_uint8),
        "correct": int(sum(correct)),
        "files": [path.name],
    }


def _render_vit(
    model: nn.Module,
    arch: str,
    x: torch.Tensor,
    images_uint8: np.ndarray,
    labels: Sequence[int],
    class_names: list[str],
    out_dir: Path,
) -> dict[str, Any]:
    with eval_mode(model), torch.no_grad():
        logits, weights, pool_weights = model.forward_with_maps(x)
    weights = weights.float().cpu()
    pool_weights = None if pool_weights is None else pool_weights.float().cpu()
    pool = model.config.pool
    prefix_tokens = model.config.num_prefix_tokens
    depth, n, heads, _, _ = weights.shape
    side = model.grid_size  # a conv stem makes its own grid: not always 32 / patch_size
    query, rollout_note = QUERIES[pool]
    titles, correct = _titles(logits, labels, class_names)
    layer_maps = patch_attention(weights, prefix_tokens, pool_weights)
    per_head = _relative(layer_maps).reshape(depth, n, heads, side, side).numpy()
    files = []
    for layer in range(depth):
        path = plot_overlays(
            f"layer {layer}: {query} per head",
            images_uint8,
            titles,
            correct,
            [(f"head {h}", per_head[layer, :, h]) for h in range(heads)],
            f"attention {RELATIVE}",
            out_dir / f"layer_{layer}.png",
        )
        files.append(path.name)
    rollout = attention_rollout(weights, prefix_tokens, pool_weights)
    maps = [("rollout", rollout)] + ([] if pool_weights is None else [("sequence pooling", pool_weights)])
    path = plot_overlays(
        f"attention rollout over all {depth} layers{rollout_note}",
        images_uint8,
        titles,
        correct,
        [(name, _relative(m).reshape(n, side, side).numpy()) for name, m in maps],
        f"{' and '.join(name for name, _ in maps)} {RELATIVE}",
        out_dir / "rollout.png",
    )
    files.append(path.name)
    return {
        "supported": True,
        "arch": arch,
        "method": "attention",
        "query": pool,
        "layers": depth,
        "heads": heads,
        "images": n,
        "patch_grid": [side, side],
        "correct": int(sum(correct)),
        "files": files,
        # Entropies over patches scaled to [0, 1]: 1 is attention spread evenly, 0 all on one patch.
        "rollout_patch_entropy": round(float(_patch_entropy(rollout).mean()), 4),
        "patch_entropy_by_layer": [round(float(v), 4) for v in _patch_entropy(layer_maps).mean(dim=(1, 2))],
    }


def _titles(
    logits: torch.Tensor, labels: Sequence[int], class_names: list[str]
) -> tuple[list[str], list[bool]]:
    """Each image's prediction and confidence (with the true class), and whether it is right."""
    confidence, predicted = logits.detach().float().softmax(dim=1).max(dim=1)
    titles, correct = [], []
    for true, pred, conf in zip(labels, predicted.tolist(), confidence.tolist(), strict=True):
        titles.append(prediction_title(class_names[pred], conf, class_names[int(true)]))
        correct.append(pred == int(true))
    return titles, correct


def _relative(maps: torch.Tensor) -> torch.Tensor:
    """Each map (last axis) divided by its maximum: where a head looks, on a common 0-1 scale.

    Dividing by the maximum (not min-max) keeps a flat map flat instead of stretching noise into a pattern.
    """
    return maps / maps.amax(dim=-1, keepdim=True).clamp_min(1e-12)


def _patch_entropy(attention: torch.Tensor) -> torch.Tensor:
    """Entropy over the last axis (patches), each row renormalized, divided by its maximum log(patches)."""
    patches = attention.shape[-1]
    if patches == 1:
        return torch.zeros(attention.shape[:-1])
    p = attention / attention.sum(dim=-1, keepdim=True).clamp_min(1e-12)
    return -torch.special.xlogy(p, p).sum(dim=-1) / math.log(patches)
