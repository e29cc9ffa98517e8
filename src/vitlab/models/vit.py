"""Vision Transformer for small images (CIFAR's 32x32, MNIST's 28x28), in the style of nanoGPT's model.py
and lucidrains' vit-pytorch.

Tokenizer -> [CLS] + positions -> pre-norm blocks (LayerNorm-MHA, LayerNorm-MLP) -> pooling -> LayerNorm ->
linear head. Attention runs through ``scaled_dot_product_attention`` (fused kernels) unless the caller asks
for the attention weights, which takes the explicit softmax path; both compute the same thing.

The defaults are the plain ViT of Dosovitskiy et al. (2021). The options known to matter when a ViT is
trained from scratch on small data are config fields:

- ``stem="conv"``: CCT's convolutional tokenizer (Hassani et al., 2021) instead of the patch embedding;
- ``stem="spt"``: shifted patch tokenization (Lee, Lee and Song, 2021, "Vision Transformer for Small-Size
  Datasets"): each patch also sees its neighbours' pixels;
- ``pool="mean"``: global average pooling of the patch tokens instead of a CLS token;
- ``pool="seq"``: CCT's sequence pooling, a learned softmax-weighted average of the normalized tokens;
- ``qkv_bias=False``: no biases on the query, key and value projections (CCT, SPT/LSA);
- ``lsa``: locality self-attention (Lee et al., 2021): a learned temperature per head, and no token attends
  to itself, so attention cannot stay on the token's own value;
- ``pos_embed="sincos"``: fixed 2D sin-cos positions (as in MAE) instead of learned ones;
- ``drop_path``: stochastic depth (Huang et al., 2016), its rate rising linearly over the blocks;
- ``whiten_stem``: the first conv of the patch embedding or conv stem starts as a whitening of the training
  images' patches (airbench: Jordan, 2024; ``init_from_data``, vitlab.models.whitening), and trains on.

``distillation`` makes it DeiT's distilled ViT (Touvron et al., 2021; facebookresearch/deit's
DistilledVisionTransformer): a distillation token after the CLS token and a second head on it, which learns
a teacher's predictions (``forward_heads``, vitlab.distill); ``forward`` returns the mean of the two heads'
logits, DeiT's prediction, so evaluation, export and serving see one output as for any other model.

The presets ``cct-*`` (CCT) and ``vit-sl`` (SPT + LSA) combine them (vitlab.presets).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.compat import import_torchvision
from vitlab.errors import VitlabError
from vitlab.models.whitening import whiten_conv_
from vitlab.params import ViTConfig

CONV_STEM_WIDTH = 64  # CCT's in_planes: channels between its tokenizer's conv stages


class Attention(nn.Module):
    """Multi-head self-attention (Vaswani et al., 2017) with one fused qkv projection, as timm's
    ``Attention``; heads may have a width of their own (``config.head_dim``, lucidrains' dim_head).

    With ``config.lsa``, locality self-attention (Lee, Lee and Song, 2021): each head scales its
    scores by a learned temperature (``scale``, (heads,), initialised to head_dim**-0.5, as the official
    code), and the diagonal is masked out, so each token's attention goes to the others.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.heads = config.heads
        self.qkv = nn.Linear(config.dim, 3 * config.inner_dim, bias=config.qkv_bias)
        self.proj = nn.Linear(config.inner_dim, config.dim)
        self.dropout = config.dropout
        head_dim = config.inner_dim // config.heads
        self.scale = nn.Parameter(torch.full((config.heads,), head_dim**-0.5)) if config.lsa else None

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens (B, T, dim) -> (B, T, dim), and with ``need_weights`` the softmax weights (B, heads, T, T)
        (else None: the fused ``scaled_dot_product_attention`` path, which does not form them)."""
        # chunk + unflatten rather than one view to (B, T, 3, H, hd): the same tensors, but the exported graph
        # then matches onnxscript's MultiHeadAttention fusion whole (vitlab.export.fuse_for_onnxruntime).
        q, k, v = (t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(x).chunk(3, dim=-1))
        p = self.dropout if self.training else 0.0
        mask = None
        if self.scale is not None:
            # The learned temperature scales q (the same scores), so SDPA's fused kernels still apply.
            q = q * self.scale[:, None, None]
            mask = ~torch.eye(q.shape[-2], dtype=torch.bool, device=q.device)  # True: may attend
        if need_weights:
            scores = q @ k.transpose(-2, -1)  # (B, H, T, T)
            if mask is None:
                scores = scores * q.shape[-1] ** -0.5
            else:
                scores = scores.masked_fill(~mask, float("-inf"))
            weights = scores.softmax(dim=-1)
            y = F.dropout(weights, p, self.training) @ v
        else:
            weights = None
            scale = None if mask is None else 1.0  # None: SDPA's own head_dim**-0.5
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p, scale=scale)
        y = y.transpose(1, 2).flatten(2)  # (B, H, T, hd) -> (B, T, H*hd)
        return F.dropout(self.proj(y), p, self.training), weights


class Block(nn.Module):
    """A pre-norm transformer block: x + attn(LN(x)), then x + MLP(LN(x)), each branch under stochastic
    depth at rate ``drop_path`` (Huang et al., 2016).

    The CCT presets keep this block: CCT's own applies its second LayerNorm to the residual stream itself,
    x = LN(x + attn(LN(x))), then x + MLP(x); the parameters are the same, the normalization slightly not.
    """

    def __init__(self, config: ViTConfig, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = nn.LayerNorm(config.dim)
        self.attn = Attention(config)
        self.norm2 = nn.LayerNorm(config.dim)
        self.mlp = nn.Sequential(
            nn.Linear(config.dim, config.mlp_dim),
            nn.GELU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.mlp_dim, config.dim),
            nn.Dropout(config.dropout),
        )
        self.drop_path = _stochastic_depth(drop_path)

    def forward(
        self, x: torch.Tensor, need_weights: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Tokens (B, T, dim) -> (B, T, dim), and the attention weights (B, heads, T, T) or None."""
        y, weights = self.attn(self.norm1(x), need_weights)
        x = x + self.drop_path(y)
        return x + self.drop_path(self.mlp(self.norm2(x))), weights


class ViT(nn.Module):
    """The Vision Transformer (Dosovitskiy et al., 2021) for small images: tokenizer (patch embedding, CCT's
    conv stem or shifted patches) -> [CLS] + position embedding -> ``depth`` pre-norm blocks -> CLS token or
    mean pooling -> LayerNorm -> linear head; or, with sequence pooling, LayerNorm -> sequence pooling ->
    linear head (CCT). ``config`` (``vitlab.params.ViTConfig``) fixes every size.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.config = config
        if config.stem == "conv":
            self.patch_embed = conv_stem(config)
        elif config.stem == "spt":
            self.patch_embed = ShiftedPatchTokenizer(config)
        else:  # a strided conv: one linear map per non-overlapping patch
            self.patch_embed = nn.Conv2d(
                config.in_channels, config.dim, config.patch_size, stride=config.patch_size
            )
        self.cls_token = nn.Parameter(torch.zeros(1, 1, config.dim)) if config.pool == "cls" else None
        self.dist_token = nn.Parameter(torch.zeros(1, 1, config.dim)) if config.distillation else None
        if config.pos_embed == "sincos":
            positions = sincos_2d(config.grid_size, config.dim)
            # CLS (and DeiT's distillation token) have no position (MAE)
            positions = torch.cat([torch.zeros(config.num_prefix_tokens, config.dim), positions])
            # Not persistent: computed, so checkpoints hold only what was learned.
            self.register_buffer("pos_embed", positions[None], persistent=False)
        else:
            self.pos_embed = nn.Parameter(torch.zeros(1, config.num_tokens, config.dim))
        self.dropout = nn.Dropout(config.dropout)
        rates = torch.linspace(0.0, config.drop_path, config.depth).tolist()
        self.blocks = nn.ModuleList(Block(config, rate) for rate in rates)
        self.norm = nn.LayerNorm(config.dim)
        # CCT's sequence pooling: one score per token, softmaxed over the tokens.
        self.attention_pool = nn.Linear(config.dim, 1) if config.pool == "seq" else None
        self.head = nn.Linear(config.dim, config.num_classes)
        self.head_dist = nn.Linear(config.dim, config.num_classes) if config.distillation else None
        self.apply(_init_weights)
        if isinstance(self.pos_embed, nn.Parameter):
            nn.init.trunc_normal_(self.pos_embed, std=0.02)
        for token in (self.cls_token, self.dist_token):
            if token is not None:
                nn.init.trunc_normal_(token, std=0.02)

    @property
    def grid_size(self) -> int:
        """Tokens per side of the patch grid (image_size // patch_size, for any stem)."""
        return self.config.grid_size

    def init_from_data(self, images: torch.Tensor) -> bool:
        """With ``config.whiten_stem``, set the stem's first conv (the patch embedding, or the conv stem's
        first conv) to the whitening of ``images``' patches, float (N, C, H, W) normalized as training feeds
        them: as many of the strongest components (with their negations) as it has output channels. Returns
        whether it changed anything (False without ``whiten_stem``)."""
        if not self.config.whiten_stem:
            return False
        stem = self.patch_embed
        whiten_conv_(stem if isinstance(stem, nn.Conv2d) else stem[0], images)
        return True

    def forward_with_attention(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (B, classes) and each layer's attention weights (depth, B, heads, T, T), where T is
        ``config.num_tokens``: the prefix tokens (a CLS token, token 0, then with ``distillation`` DeiT's
        distillation token, token 1), then the patches; patches alone with mean or sequence pooling."""
        return self.forward_with_maps(x)[:2]

    def forward_with_maps(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``forward_with_attention``'s logits and attention weights, and with ``pool="seq"`` the weights
        (B, T) sequence pooling gives the final tokens (each row sums to 1); None with a CLS token or mean
        pooling. Everything an attention map is drawn from (vitlab.attention)."""
        logits, weights, pool_weights = self._forward(x, need_weights=True)
        return logits, torch.stack(weights), pool_weights

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalized float images (B, in_channels, image_size, image_size) -> logits (B, num_classes); with
        ``distillation`` the mean of the class and distillation heads' logits (DeiT's prediction)."""
        return self._forward(x, need_weights=False)[0]

    def forward_heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """DeiT's training output: images as ``forward`` takes them -> the class head's logits (B, classes),
        read from the CLS token, and the distillation head's (B, classes), from the distillation token.

        Raises VitlabError for a ViT built without ``distillation``.
        """
        if self.head_dist is None:
            raise VitlabError("this ViT has no distillation head: build it with distillation=true")
        return self._heads(self._tokens(x, need_weights=False)[0])

    def _forward(
        self, x: torch.Tensor, need_weights: bool
    ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
        x, weights = self._tokens(x, need_weights)
        if self.head_dist is not None:
            return mean_of_heads(*self._heads(x)), weights, None
        if self.attention_pool is not None:
            x = self.norm(x)  # CCT scores and averages the normalized tokens
            pool_weights = self.attention_pool(x).squeeze(-1).softmax(dim=-1)  # (B, T)
            return self.head((pool_weights[:, None] @ x).squeeze(1)), weights, pool_weights
        x = x[:, 0] if self.cls_token is not None else x.mean(dim=1)  # (B, dim)
        return self.head(self.norm(x)), weights, None

    def _tokens(self, x: torch.Tensor, need_weights: bool) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Images -> the last block's tokens (B, T, dim), and each block's attention weights if asked for."""
        x = self.patch_embed(x).flatten(2).transpose(1, 2)  # (B, N, dim), N = grid_size**2
        prefix = [t.expand(x.shape[0], -1, -1) for t in (self.cls_token, self.dist_token) if t is not None]
        if prefix:
            x = torch.cat([*prefix, x], dim=1)  # (B, num_prefix_tokens + N, dim)
        x = self.dropout(x + self.pos_embed)
        weights = []
        for block in self.blocks:
            x, w = block(x, need_weights)
            if w is not None:
                weights.append(w)
        return x, weights

    def _heads(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The last block's tokens (B, T, dim) -> the class and distillation heads' logits (B, classes)."""
        cls, dist = self.norm(x[:, :2]).unbind(dim=1)
        return self.head(cls), self.head_dist(dist)


def mean_of_heads(cls_logits: torch.Tensor, dist_logits: torch.Tensor) -> torch.Tensor:
    """DeiT's prediction from its two heads' logits (B, classes) each: their mean (Touvron et al., 2021)."""
    return (cls_logits + dist_logits) / 2


def conv_stem(config: ViTConfig) -> nn.Sequential:
    """CCT's tokenizer: [conv3x3-ReLU-maxpool3x3/2] stages until the side shrank by patch_size; 64 channels
    between stages, dim after the last. Overlapping kernels give tokens that share edges with their
    neighbours, the inductive bias a patch embedding lacks."""
    stages = int(math.log2(config.patch_size))
    widths = [config.in_channels] + [CONV_STEM_WIDTH] * (stages - 1) + [config.dim]
    layers: list[nn.Module] = []
    for width_in, width_out in itertools.pairwise(widths):
        conv = nn.Conv2d(width_in, width_out, 3, padding=1, bias=False)
        nn.init.kaiming_normal_(conv.weight)
        layers += [conv, nn.ReLU(inplace=True), nn.MaxPool2d(3, stride=2, padding=1)]
    return nn.Sequential(*layers)


class ShiftedPatchTokenizer(nn.Module):
    """Shifted patch tokenization (Lee, Lee and Song, 2021; the diagonal shifts of their official code): the
    image and its 4 diagonal shifts by half a patch (zero-filled), stacked as 5 x in_channels channels, cut
    into patch_size x patch_size patches, each LayerNorm-ed and mapped linearly to dim. A token so also sees
    the pixels just across its patch's borders.

    Images (B, in_channels, S, S) -> (B, dim, S/patch_size, S/patch_size), the layout of the other stems.
    """

    def __init__(self, config: ViTConfig):
        super().__init__()
        self.patch_size = config.patch_size
        width = 5 * config.in_channels * config.patch_size**2
        self.norm = nn.LayerNorm(width)
        self.proj = nn.Linear(width, config.dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) -> patch tokens (B, dim, H/patch_size, W/patch_size)."""
        shift = self.patch_size // 2
        height, width = x.shape[-2:]
        padded = F.pad(x, (shift, shift, shift, shift))
        shifted = [
            padded[..., top : top + height, left : left + width]
            for top in (0, 2 * shift)
            for left in (0, 2 * shift)
        ]
        x = torch.cat([x, *shifted], dim=1)  # (B, 5C, H, W)
        patches = F.pixel_unshuffle(x, self.patch_size).permute(0, 2, 3, 1)  # (B, H/p, W/p, 5C*p*p)
        return self.proj(self.norm(patches)).permute(0, 3, 1, 2)


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
        if module.bias is not None:
            nn.init.zeros_(module.bias)
    elif isinstance(module, nn.LayerNorm):
        nn.init.ones_(module.weight)
        nn.init.zeros_(module.bias)
