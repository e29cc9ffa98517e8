"""Vision Transformer for 32x32 images, in the style of nanoGPT's model.py and lucidrains' vit-pytorch.

Patch embedding -> [CLS] + learned positions -> pre-norm blocks (LayerNorm-MHA, LayerNorm-MLP) -> LayerNorm ->
linear head on the CLS token. Attention runs through ``scaled_dot_product_attention`` (fused kernels) unless
the caller asks for the attention weights, which takes the explicit softmax path; both compute the same thing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


@dataclass(frozen=True)
class ViTConfig:
    num_classes: int = 10
    image_size: int = 32
    in_channels: int = 3
    patch_size: int = 4
    dim: int = 64
    depth: int = 6
    heads: int = 4
    head_dim: int | None = None  # lucidrains' dim_head: lets heads not divide dim (e.g. 3 heads of 64)
    mlp_dim: int = 128
    dropout: float = 0.0

    @property
    def inner_dim(self) -> int:
        return self.heads * (self.head_dim or self.dim // self.heads)

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


class Attention(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.heads = cfg.heads
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.inner_dim)
        self.proj = nn.Linear(cfg.inner_dim, cfg.dim)
        self.dropout = cfg.dropout

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        B, T, _ = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.heads, -1).permute(2, 0, 3, 1, 4)  # each (B, H, T, hd)
        p = self.dropout if self.training else 0.0
        if need_weights:
            weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, H, T, T)
            y = F.dropout(weights, p, self.training) @ v
        else:
            weights = None
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        y = y.transpose(1, 2).reshape(B, T, -1)  # (B, T, H*hd)
        return F.dropout(self.proj(y), p, self.training), weights


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim)
        self.attn = Attention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim)
        self.mlp = nn.Sequential(
            nn.Linear(cfg.dim, cfg.mlp_dim),
            nn.GELU(),
            nn.Dropout(cfg.dropout),
            nn.Linear(cfg.mlp_dim, cfg.dim),
            nn.Dropout(cfg.dropout),
        )

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, weights = self.attn(self.norm1(x), need_weights)
        x = x + y
        return x + self.mlp(self.norm2(x)), weights


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        # A strided conv is the patch embedding: one linear map per non-overlapping patch.
        self.patch_embed = nn.Conv2d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_patches + 1, cfg.dim))
        self.dropout = nn.Dropout(cfg.dropout)
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.apply(_init_weights)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, classes) and each layer's attention weights (depth, B, heads, T, T), T = patches + 1."""
        logits, weights = self._forward(x, need_weights=True)
        return logits, torch.stack(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, need_weights=False)[0]

    def _forward(self, x: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed  # (B, N+1, dim)
        x = self.dropout(x)
        weights = []
        for block in self.blocks:
            x, w = block(x, need_weights)
            if w is not None:
                weights.append(w)
        return self.head(self.norm(x[:, 0])), weights


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
