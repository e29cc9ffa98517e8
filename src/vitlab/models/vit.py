"""Vision Transformer for 32x32 images, in the style of nanoGPT's model.py and lucidrains' vit-pytorch.

Tokenizer -> [CLS] + positions -> pre-norm blocks (LayerNorm-MHA, LayerNorm-MLP) -> pooling -> LayerNorm ->
linear head. Attention runs through ``scaled_dot_product_attention`` (fused kernels) unless the caller asks
for the attention weights, which takes the explicit softmax path; both compute the same thing.

The defaults are the plain ViT of Dosovitskiy et al. (2021). Four options, known to matter when a ViT is
trained from scratch on small data, are config fields:

- ``stem="conv"``: CCT's convolutional tokenizer (Hassani et al., 2021) instead of the patch embedding;
- ``pool="mean"``: global average pooling of the patch tokens instead of a CLS token;
- ``pos_embed="sincos"``: fixed 2D sin-cos positions (as in MAE) instead of learned ones;
- ``drop_path``: stochastic depth (Huang et al., 2016), its rate rising linearly over the blocks.
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.compat import import_torchvision
from vitlab.errors import VitlabError

STEMS = ("patch", "conv")
POOLS = ("cls", "mean")
POS_EMBEDS = ("learned", "sincos")
CONV_STEM_WIDTH = 64  # CCT's in_planes: channels between its tokenizer's conv stages


@dataclass(frozen=True)
class ViTConfig:
    num_classes: int = 10
    image_size: int = 32
    in_channels: int = 3
    patch_size: int = 4  # the tokenizer's downsampling: each token covers patch_size x patch_size pixels
    dim: int = 64
    depth: int = 6
    heads: int = 4
    head_dim: int | None = None  # lucidrains' dim_head: lets heads not divide dim (e.g. 3 heads of 64)
    mlp_dim: int = 128
    dropout: float = 0.0
    stem: str = "patch"  # "patch": a linear map per patch; "conv": log2(patch_size) conv-ReLU-maxpool stages
    pool: str = "cls"  # "cls": the CLS token's output; "mean": the mean of the patch tokens' outputs
    pos_embed: str = "learned"  # "learned" or "sincos" (fixed)
    drop_path: float = 0.0  # stochastic depth rate of the last block; 0 at the first

    def __post_init__(self) -> None:
        for key, allowed in (("stem", STEMS), ("pool", POOLS), ("pos_embed", POS_EMBEDS)):
            if getattr(self, key) not in allowed:
                raise VitlabError(f"vit {key}={getattr(self, key)!r}: expected one of {', '.join(allowed)}")
        if self.image_size % self.patch_size:
            raise VitlabError(
                f"vit patch_size={self.patch_size} does not divide image_size={self.image_size}"
            )
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise VitlabError(f"vit stem='conv' needs a patch_size of 2, 4, 8, ... (got {self.patch_size})")
        if self.pos_embed == "sincos" and self.dim % 4:
            raise VitlabError(f"vit pos_embed='sincos' needs dim divisible by 4 (dim={self.dim})")

    @property
    def inner_dim(self) -> int:
        return self.heads * (self.head_dim or self.dim // self.heads)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size  # tokens per side, for either stem

    @property
    def num_patches(self) -> int:
        return self.grid_size**2

    @property
    def num_tokens(self) -> int:
        return self.num_patches + (self.pool == "cls")


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
        # chunk + unflatten rather than one view to (B, T, 3, H, hd): the same tensors, but the exported graph
        # then matches onnxscript's MultiHeadAttention fusion whole (vitlab.export.fuse_for_onnxruntime).
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        p = self.dropout if self.training else 0.0
        if need_weights:
            weights = (q @ k.transpose(-2, -1) * q.shape[-1] ** -0.5).softmax(dim=-1)  # (B, H, T, T)
            y = F.dropout(weights, p, self.training) @ v
        else:
            weights = None
            y = F.scaled_dot_product_attention(q, k, v, dropout_p=p)
        y = y.transpose(1, 2).flatten(2)  # (B, H, T, hd) -> (B, T, H*hd)
        return F.dropout(self.proj(y), p, self.training), weights


class Block(nn.Module):
    def __init__(self, cfg: ViTConfig, drop_path: float = 0.0):
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
        self.drop_path = _stochastic_depth(drop_path)

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        y, weights = self.attn(self.norm1(x), need_weights)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x))), weights


class ViT(nn.Module):
    def __init__(self, cfg: ViTConfig):
        super().__init__()
        self.cfg = cfg
        # The patch embedding is a strided conv: one linear map per non-overlapping patch.
        self.patch_embed = (
            conv_stem(cfg)
            if cfg.stem == "conv"
            else nn.Conv2d(cfg.in_channels, cfg.dim, cfg.patch_size, stride=cfg.patch_size)
        )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.dim)) if cfg.pool == "cls" else None
        if cfg.pos_embed == "sincos":
            positions = sincos_2d(cfg.grid_size, cfg.dim)
            if cfg.pool == "cls":
                positions = torch.cat([torch.zeros(1, cfg.dim), positions])  # CLS has no position (MAE)
            # Not persistent: computed, so checkpoints hold only what was learned.
            self.register_buffer("pos_embed", positions[None], persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, cfg.num_tokens, cfg.dim))
        self.dropout = nn.Dropout(cfg.dropout)
        rates = torch.linspace(0.0, cfg.drop_path, cfg.depth).tolist()
        self.blocks = nn.ModuleList(Block(cfg, rate) for rate in rates)
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.num_classes)
        self.apply(_init_weights)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        if self.cls_token is not None:
            nn.init.trunc_normal_(self.cls_token, std=0.02)

    @property
    def grid_size(self) -> int:
        return self.cfg.grid_size

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, classes) and each layer's attention weights (depth, B, heads, T, T), where T is the
        number of tokens: patches + 1 with a CLS token (token 0), patches alone with mean pooling."""
        logits, weights = self._forward(x, need_weights=True)
        return logits, torch.stack(weights)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._forward(x, need_weights=False)[0]

    def _forward(self, x: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim), N = grid_size**2
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)  # (B, N+1, dim)
        x = self.dropout(x + self.pos_embed)
        weights = []
        for block in self.blocks:
            x, w = block(x, need_weights)
            if w is not None:
                weights.append(w)
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)  # (B, dim)
        return self.head(self.norm(x)), weights


def conv_stem(cfg: ViTConfig) -> nn.Sequential:
    """CCT's tokenizer: [conv3x3-ReLU-maxpool3x3/2] stages until the side shrank by patch_size; 64 channels
    between stages, dim after the last. Overlapping kernels give tokens that share edges with their
    neighbours, the inductive bias a patch embedding lacks."""
    stages = int(math.log2(cfg.patch_size))
    widths = [cfg.in_channels] + [CONV_STEM_WIDTH] * (stages - 1) + [cfg.dim]
    layers: list[nn.Module] = []
    for width_in, width_out in itertools.pairwise(widths):
        conv = nn.Conv2d(width_in, width_out, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight)
        layers += [conv, nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
    return nn.Sequential(*layers)


def sincos_2d(grid_size: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """Fixed 2D positions (grid_size**2, dim), row-major: sin and cos of x and of y at dim/4 frequencies each
    (lucidrains' simple_vit, MAE)."""
    y, x = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    omega = temperature ** -(torch.arange(dim // 4) / (dim // 4))  # (dim/4,)
    y = y.flatten()[:, None] * omega[None, :]  # (N, dim/4)
    x = x.flatten()[:, None] * omega[None, :]
    return torch.cat([x.sin(), x.cos(), y.sin(), y.cos()], dim=1)


def _stochastic_depth(rate: float) -> nn.Module:
    if rate == 0.0:
        return nn.Identity()
    import_torchvision()
    from torchvision.ops import StochasticDepth

    return StochasticDepth(rate, mode="row")  # drops a block's branch for whole samples


def _init_weights(module: nn.Module) -> None:
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
