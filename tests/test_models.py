import itertools

import numpy as np
import onnxruntime as ort
import pytest
import torch

from vitlab.checkpoint import Normalization
from vitlab.errors import VitlabError
from vitlab.export import export_onnx
from vitlab.models import build_model, count_parameters, describe_model
from vitlab.models.resnet import ResNet, ResNetConfig
from vitlab.models.vit import ViT, ViTConfig, sincos_2d

SMALL_VIT = {"dim": 32, "depth": 2, "heads": 4, "mlp_dim": 64}


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("vit", {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2, "mlp_dim": 64}),
        ("vit", {"patch_size": 2, "dim": 64, "depth": 1, "heads": 3, "head_dim": 16, "mlp_dim": 64}),
        ("vit", SMALL_VIT | {"stem": "conv", "pool": "mean", "pos_embed": "sincos", "drop_path": 0.2}),
        ("vit", SMALL_VIT | {"stem": "spt", "pool": "seq", "qkv_bias": False, "lsa": True, "drop_path": 0.1}),
        ("cnn", {"channels": [16, 32]}),
        ("resnet", {"widths": [8, 16], "blocks": [1, 2]}),
        ("mlp", {"hidden": [64]}),
        ("airbench", {"group_widths": [8, 16, 16]}),
        ("vit", SMALL_VIT | {"stem": "conv", "whiten_stem": True}),
    ],
)
def test_models_map_images_to_logits_and_rebuild_from_their_spec(arch, config):
    torch.manual_seed(0)
    model = build_model(arch, {"num_classes": 7, **config}).eval()
    x = torch.randn(5, 3, 32, 32)
    assert model(x).shape == (5, 7)
    spec = describe_model(model)
    rebuilt = build_model(spec["arch"], spec["config"]).eval()
    rebuilt.load_state_dict(model.state_dict())
    torch.testing.assert_close(rebuilt(x), model(x), atol=0, rtol=0)


def test_parameter_counts_match_the_architectures():
    # conv16: 3*16*9+16, conv32: 16*32*9+32, linear: 32*8*8*10+10
    assert count_parameters(build_model("cnn", {})) == 448 + 4640 + 20490
    assert count_parameters(build_model("mlp", {"hidden": [100]})) == 3072 * 100 + 100 + 100 * 10 + 10
    vit = build_model("vit", {"patch_size": 4, "dim": 64, "depth": 6, "heads": 4, "mlp_dim": 128})
    per_block = 2 * 2 * 64 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 128 + 128) + (128 * 64 + 64)
    embed = 3 * 16 * 64 + 64 + 64 + 65 * 64
    assert count_parameters(vit) == embed + 6 * per_block + 2 * 64 + 64 * 10 + 10
    # Mean pooling drops the CLS token and its position; sin-cos positions are not parameters.
    mean = build_model("vit", {"pool": "mean"})
    assert count_parameters(mean) == count_parameters(vit) - 64 - 64
    sincos = build_model("vit", {"pos_embed": "sincos"})
    assert count_parameters(sincos) == count_parameters(vit) - 65 * 64
    # CCT's tokenizer for patch 4: conv3x3 3->64 and 64->64, no biases, in place of the 4x4 patch conv.
    conv = build_model("vit", {"stem": "conv"})
    assert count_parameters(conv) == count_parameters(vit) - (3 * 16 * 64 + 64) + 3 * 9 * 64 + 64 * 9 * 64
    # Sequence pooling: no CLS token or its position, one Linear(dim, 1) to score the tokens.
    seq = build_model("vit", {"pool": "seq"})
    assert count_parameters(seq) == count_parameters(mean) + 64 + 1
    no_bias = build_model("vit", {"qkv_bias": False})
    assert count_parameters(no_bias) == count_parameters(vit) - 6 * 192
    lsa = build_model("vit", {"lsa": True})
    assert count_parameters(lsa) == count_parameters(vit) + 6 * 4  # a temperature per head and block
    # SPT: LayerNorm and Linear over the 5 x 3 x 4 x 4 values of a patch and its 4 shifts.
    spt = build_model("vit", {"stem": "spt"})
    assert count_parameters(spt) == count_parameters(vit) - (3 * 16 * 64 + 64) + 2 * 240 + 240 * 64 + 64


def test_resnet20_has_the_published_layout():
    model = ResNet(ResNetConfig())
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert sum(m.kernel_size == (3, 3) for m in convs) == 19  # + the linear head: the 20 layers
    assert [m.in_channels for m in convs if m.kernel_size == (1, 1)] == [
        16,
        32,
    ]  # shortcuts where shape changes
    stem = 3 * 16 * 9 + 2 * 16
    stage1 = 3 * 2 * (16 * 16 * 9 + 2 * 16)
    stage2 = (16 * 32 * 9 + 32 * 32 * 9 + 4 * 32) + (16 * 32 + 2 * 32) + 2 * 2 * (32 * 32 * 9 + 2 * 32)
    stage3 = (32 * 64 * 9 + 64 * 64 * 9 + 4 * 64) + (32 * 64 + 2 * 64) + 2 * 2 * (64 * 64 * 9 + 2 * 64)
    assert count_parameters(model) == stem + stage1 + stage2 + stage3 + 64 * 10 + 10 == 272_474
    features = model.blocks(model.stem(torch.randn(2, 3, 32, 32)))
    assert features.shape == (2, 64, 8, 8)


def test_resnet_blocks_start_as_their_shortcuts():
    # bn2 starts at zero, so an identity block passes its input through ReLU unchanged.
    block = ResNet(ResNetConfig(widths=(8,), blocks=(1,))).blocks[0].eval()
    x = torch.randn(2, 8, 16, 16).relu()
    torch.testing.assert_close(block(x), x)


def test_head_dim_lets_heads_not_divide_dim():
    config = ViTConfig(dim=64, heads=3, head_dim=32, depth=1)
    model = ViT(config)
    assert model.blocks[0].attn.qkv.out_features == 3 * 3 * 32
    logits, weights = model.forward_with_attention(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert weights.shape == (1, 2, 3, 65, 65)


OPTIONS = list(
    itertools.product(("patch", "conv", "spt"), ("cls", "mean", "seq"), ("learned", "sincos"), (False, True))
)


@pytest.mark.parametrize(("stem", "pool", "pos_embed", "lsa"), OPTIONS)
@pytest.mark.parametrize("training", [False, True])
def test_fused_and_explicit_attention_agree_and_weights_are_distributions(
    stem, pool, pos_embed, lsa, training
):
    torch.manual_seed(0)
    config = ViTConfig(
        depth=3, dim=32, heads=4, mlp_dim=64, patch_size=8, stem=stem, pool=pool, pos_embed=pos_embed, lsa=lsa
    )
    model = ViT(config).train(training)  # no dropout: the training path (SDPA) is deterministic too
    if lsa:  # temperatures of their own, so a path that ignored them (or used head_dim**-0.5) would differ
        for block in model.blocks:
            block.attn.scale.data = torch.tensor([0.1, 0.3, 0.6, 1.2])
    x = torch.randn(4, 3, 32, 32)
    fused = model(x)
    explicit, weights = model.forward_with_attention(x)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    tokens = 16 + (pool == "cls")
    assert config.num_tokens == tokens
    assert weights.shape == (3, 4, 4, tokens, tokens)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 4, tokens))
    assert (weights.diagonal(dim1=-2, dim2=-1) == 0).all() == lsa  # LSA: no token attends to itself


def test_fused_and_explicit_attention_agree_with_head_dim_and_stochastic_depth_at_eval():
    torch.manual_seed(0)
    model = ViT(ViTConfig(depth=4, dim=48, heads=5, head_dim=8, patch_size=4, drop_path=0.3)).eval()
    x = torch.randn(3, 3, 32, 32)
    torch.testing.assert_close(model(x), model.forward_with_attention(x)[0], atol=1e-5, rtol=1e-5)


def test_today_checkpoints_keep_loading():
    # A checkpoint written before stem/pool/pos_embed/drop_path existed: its config lacks them, and its
    # weights have exactly these names and shapes.
    config = {"num_classes": 3, "image_size": 32, "in_channels": 3, "patch_size": 8, "dim": 16, "depth": 1}
    config |= {"heads": 2, "head_dim": None, "mlp_dim": 32, "dropout": 0.0}
    linears = {"blocks.0.attn.qkv": (48, 16), "blocks.0.attn.proj": (16, 16), "head": (3, 16)}
    linears |= {"blocks.0.mlp.0": (32, 16), "blocks.0.mlp.3": (16, 32)}
    shapes = {"cls_token": (1, 1, 16), "pos_embed": (1, 17, 16), "patch_embed.weight": (16, 3, 8, 8)}
    shapes |= {"patch_embed.bias": (16,)} | {f"{name}.weight": shape for name, shape in linears.items()}
    shapes |= {f"{name}.bias": shape[:1] for name, shape in linears.items()}
    shapes |= {
        f"{norm}.{p}": (16,)
        for norm in ("blocks.0.norm1", "blocks.0.norm2", "norm")
        for p in ("weight", "bias")
    }
    torch.manual_seed(0)
    old_weights = {name: torch.randn(shape) for name, shape in shapes.items()}
    model = build_model("vit", config)
    model.load_state_dict(old_weights)  # strict: no key missing, none unexpected
    assert describe_model(model)["config"] == config | {
        "qkv_bias": True,
        "lsa": False,
        "stem": "patch",
        "pool": "cls",
        "pos_embed": "learned",
        "drop_path": 0.0,
        "distillation": False,
        "whiten_stem": False,
    }


def test_mean_pooling_has_no_cls_token_and_averages_the_patch_tokens():
    torch.manual_seed(0)
    model = ViT(ViTConfig(pool="mean", **SMALL_VIT)).eval()
    assert model.cls_token is None
    assert model.pos_embed.shape == (1, 64, 32)
    x = torch.randn(2, 3, 32, 32)
    tokens = model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed
    for block in model.blocks:
        tokens = block(tokens)[0]
    torch.testing.assert_close(model(x), model.head(model.norm(tokens.mean(dim=1))))


def test_sequence_pooling_averages_the_normalized_tokens_with_learned_weights():
    torch.manual_seed(0)
    model = ViT(ViTConfig(pool="seq", **SMALL_VIT)).eval()
    assert model.cls_token is None and model.pos_embed.shape == (1, 64, 32)
    x = torch.randn(2, 3, 32, 32)
    tokens = model.patch_embed(x).flatten(2).transpose(1, 2) + model.pos_embed
    for block in model.blocks:
        tokens = block(tokens)[0]
    tokens = model.norm(tokens)
    scores = tokens @ model.attention_pool.weight[0] + model.attention_pool.bias  # (B, T)
    expected_weights = scores.softmax(dim=1)
    pooled = (expected_weights[..., None] * tokens).sum(dim=1)
    logits, attention, pool_weights = model.forward_with_maps(x)
    torch.testing.assert_close(model(x), model.head(pooled))
    torch.testing.assert_close(logits, model.head(pooled))
    torch.testing.assert_close(pool_weights, expected_weights)
    assert attention.shape == (2, 2, 4, 64, 64)  # (depth, B, heads, T, T): no CLS token
    assert ViT(ViTConfig(pool="mean", **SMALL_VIT)).forward_with_maps(x)[2] is None


def test_lsa_scales_each_head_by_its_learned_temperature_and_masks_the_diagonal():
    torch.manual_seed(0)
    model = ViT(ViTConfig(lsa=True, qkv_bias=False, **SMALL_VIT)).eval()
    attn = model.blocks[0].attn
    torch.testing.assert_close(attn.scale.data, torch.full((4,), 8**-0.5))  # head_dim 32 / 4 = 8
    assert attn.qkv.bias is None
    attn.scale.data = torch.tensor([0.0, 0.2, 0.4, 2.0])
    x = torch.randn(2, 65, 32)
    q, k, _ = attn.qkv(x).view(2, 65, 3, 4, 8).permute(2, 0, 3, 1, 4)  # each (B, heads, T, head_dim)
    scores = (q @ k.transpose(-2, -1)) * attn.scale[:, None, None]
    expected = scores.masked_fill(torch.eye(65, dtype=torch.bool), float("-inf")).softmax(-1)
    _, weights = attn(x, need_weights=True)
    torch.testing.assert_close(weights, expected)
    torch.testing.assert_close(weights[0, 0], torch.full((65, 65), 1 / 64) * (1 - torch.eye(65)))  # scale 0
    # The temperature learns through the fused path (SDPA) as through the explicit one.
    model.train()(torch.randn(2, 3, 32, 32)).sum().backward()
    assert all((block.attn.scale.grad != 0).all() for block in model.blocks)


def test_shifted_patch_tokens_see_the_image_and_its_four_diagonal_half_patch_shifts():
    torch.manual_seed(0)
    model = ViT(ViTConfig(stem="spt", patch_size=4, image_size=8, in_channels=2, **SMALL_VIT)).eval()
    x = torch.randn(1, 2, 8, 8)

    def shifted(dy: int, dx: int) -> torch.Tensor:  # out[y, x] = image[y + dy, x + dx], zero outside
        out = torch.zeros_like(x)
        for y, col in itertools.product(range(8), range(8)):
            if 0 <= y + dy < 8 and 0 <= col + dx < 8:
                out[..., y, col] = x[..., y + dy, col + dx]
        return out

    stack = torch.cat([x] + [shifted(dy, dx) for dy in (-2, 2) for dx in (-2, 2)], dim=1)  # (1, 10, 8, 8)
    assert (stack[:, 2:] != 0).any() and not torch.equal(stack[:, 2:4], stack[:, 4:6])
    spt = model.patch_embed
    for row, col in itertools.product(range(2), range(2)):
        patch = stack[0, :, 4 * row : 4 * row + 4, 4 * col : 4 * col + 4].flatten()  # (10 * 4 * 4,)
        expected = spt.proj(spt.norm(patch))
        torch.testing.assert_close(spt(x)[0, :, row, col], expected)


@pytest.mark.parametrize(
    "config",
    [
        {"pool": "seq", "stem": "conv", "patch_size": 2},
        {"pool": "seq", "stem": "conv", "patch_size": 4},
        {"stem": "spt", "patch_size": 4},
        {"stem": "spt", "patch_size": 7},  # an odd patch: shifts of 3 pixels
        {"lsa": True, "qkv_bias": False},
    ],
    ids=str,
)
def test_small_data_options_fit_mnist(config):
    torch.manual_seed(0)
    model = build_model("vit", SMALL_VIT | {"image_size": 28, "in_channels": 1} | config).eval()
    x = torch.randn(3, 1, 28, 28)
    grid = 28 // model.config.patch_size
    logits, weights, _ = model.forward_with_maps(x)
    assert model.patch_embed(x).shape == (3, 32, grid, grid)
    assert weights.shape[-1] == grid**2 + (model.config.pool == "cls")
    torch.testing.assert_close(model(x), logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("patch_size", "stages"), [(2, 1), (4, 2), (8, 3)])
def test_conv_stem_reaches_the_grid_of_its_patch_size(patch_size, stages):
    model = ViT(ViTConfig(stem="conv", patch_size=patch_size, **SMALL_VIT))
    convs = [m for m in model.patch_embed if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == stages
    assert all(conv.kernel_size == (3, 3) and conv.bias is None for conv in convs)
    assert model.grid_size == 32 // patch_size
    tokens = model.patch_embed(torch.randn(2, 3, 32, 32))
    assert tokens.shape == (2, 32, model.grid_size, model.grid_size)


def test_sincos_positions_are_fixed_sines_of_row_and_column():
    grid, dim = 4, 16
    positions = sincos_2d(grid, dim)
    assert positions.shape == (grid * grid, dim)
    row, col = 2, 3
    token = positions[row * grid + col]
    omega = 10000.0 ** -(np.arange(4) / 4)
    expected = np.concatenate(
        [np.sin(col * omega), np.cos(col * omega), np.sin(row * omega), np.cos(row * omega)]
    )
    np.testing.assert_allclose(token.numpy(), expected, atol=1e-6)
    assert len({tuple(p.tolist()) for p in positions}) == grid * grid  # every token its own position
    model = ViT(ViTConfig(pos_embed="sincos", **SMALL_VIT))
    assert "pos_embed" not in model.state_dict()  # computed, never stored
    torch.testing.assert_close(model.pos_embed[0, 0], torch.zeros(32))  # the CLS token has no position
    torch.testing.assert_close(model.pos_embed[0, 1:], sincos_2d(8, 32))


def test_stochastic_depth_rises_linearly_and_is_off_at_eval():
    torch.manual_seed(0)
    model = ViT(ViTConfig(**(SMALL_VIT | {"depth": 4, "drop_path": 0.3})))
    rates = [getattr(block.drop_path, "p", 0.0) for block in model.blocks]
    assert rates == pytest.approx([0.0, 0.1, 0.2, 0.3])
    plain = ViT(ViTConfig(**(SMALL_VIT | {"depth": 4})))
    plain.load_state_dict(model.state_dict())
    x = torch.randn(64, 3, 32, 32)
    torch.testing.assert_close(model.eval()(x), plain.eval()(x))


def test_stochastic_depth_skips_a_block_for_whole_samples():
    torch.manual_seed(0)
    model = ViT(ViTConfig(**(SMALL_VIT | {"drop_path": 0.5})))  # depth 2: rates 0 and 0.5
    seen = {}
    for i, block in enumerate(model.blocks):
        block.register_forward_hook(lambda m, args, out, i=i: seen.update({i: (args[0], out[0])}))

    def skipped() -> list[int]:
        return [int((y == x).all(dim=(1, 2)).sum()) for x, y in (seen[0], seen[1])]

    model.train()(torch.randn(64, 3, 32, 32))
    first, last = skipped()
    # A sample skips the last block where both of its branches drew "drop" (1 in 4).
    assert first == 0 and 4 < last < 32
    model.eval()(torch.randn(64, 3, 32, 32))
    assert skipped() == [0, 0]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"stem": "conv", "patch_size": 1}, "vit config: stem=conv .*: patch_size=1 must be 2, 4, 8"),
        ({"pool": "max"}, "vit config: pool: Input should be 'cls', 'mean' or 'seq'"),
        ({"stem": "spt", "patch_size": 1}, "vit config: stem=spt .*: patch_size=1 must be 2 or more"),
        ({"lsa": True, "patch_size": 32, "pool": "seq"}, "lsa=true .* needs 2 tokens or more"),
        ({"pos_embed": "sincos", "dim": 18, "heads": 2}, "needs dim=18 to be divisible by 4"),
        (
            {"patch_size": 5},
            r"patch_size=5 does not divide the image size 32 \(allowed: 1, 2, 4, 8, 16, 32\)",
        ),
    ],
)
def test_impossible_vit_configs_are_one_line_errors(config, message):
    with pytest.raises(VitlabError, match=message):
        build_model("vit", config)


def test_resnet_needs_one_block_count_per_stage():
    with pytest.raises(VitlabError, match="resnet config: widths has 2 stages but blocks 1"):
        build_model("resnet", {"widths": [16, 32], "blocks": [3]})


def test_unknown_architecture_or_config_key_is_a_clear_error():
    with pytest.raises(VitlabError, match="unknown architecture 'transformer'"):
        build_model("transformer", {})
    with pytest.raises(VitlabError, match="cnn config: patch: unknown key"):
        build_model("cnn", {"patch": 4})


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("vit", SMALL_VIT | {"stem": "conv", "pool": "mean", "pos_embed": "sincos", "drop_path": 0.1}),
        ("resnet", {"widths": [8, 16], "blocks": [1, 1]}),
        ("airbench", {"group_widths": [8, 16, 16]}),
    ],
)
def test_new_architectures_export_to_onnx_and_match_pytorch(tmp_path, arch, config):
    torch.manual_seed(0)
    model = build_model(arch, config).eval()
    norm = Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    path = export_onnx(model, tmp_path / "model.onnx", [str(i) for i in range(10)], norm)
    x = torch.randn(3, 3, 32, 32)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x).numpy(), atol=1e-4)
