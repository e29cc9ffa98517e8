import pytest
import torch

from vitlab.errors import VitlabError
from vitlab.models import build_model, count_parameters, model_spec
from vitlab.models.vit import ViT, ViTConfig


@pytest.mark.parametrize(
    ("arch", "config"),
    [
        ("vit", {"patch_size": 4, "dim": 32, "depth": 2, "heads": 2, "mlp_dim": 64}),
        ("vit", {"patch_size": 2, "dim": 64, "depth": 1, "heads": 3, "head_dim": 16, "mlp_dim": 64}),
        ("cnn", {"channels": [16, 32]}),
        ("mlp", {"hidden": [64]}),
    ],
)
def test_models_map_images_to_logits_and_rebuild_from_their_spec(arch, config):
    model = build_model(arch, {"num_classes": 7, **config})
    assert model(torch.randn(5, 3, 32, 32)).shape == (5, 7)
    spec = model_spec(model)
    rebuilt = build_model(spec["arch"], spec["config"])
    assert count_parameters(rebuilt) == count_parameters(model)


def test_parameter_counts_match_the_architectures():
    # conv16: 3*16*9+16, conv32: 16*32*9+32, linear: 32*8*8*10+10
    assert count_parameters(build_model("cnn", {})) == 448 + 4640 + 20490
    assert count_parameters(build_model("mlp", {"hidden": [100]})) == 3072 * 100 + 100 + 100 * 10 + 10
    vit = build_model("vit", {"patch_size": 4, "dim": 64, "depth": 6, "heads": 4, "mlp_dim": 128})
    per_block = 2 * 2 * 64 + (64 * 192 + 192) + (64 * 64 + 64) + (64 * 128 + 128) + (128 * 64 + 64)
    embed = 3 * 16 * 64 + 64 + 64 + 65 * 64
    assert count_parameters(vit) == embed + 6 * per_block + 2 * 64 + 64 * 10 + 10


def test_head_dim_lets_heads_not_divide_dim():
    cfg = ViTConfig(dim=64, heads=3, head_dim=32, depth=1)
    model = ViT(cfg)
    assert model.blocks[0].attn.qkv.out_features == 3 * 3 * 32
    logits, weights = model.forward_with_attention(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 10)
    assert weights.shape == (1, 2, 3, 65, 65)


def test_fused_and_explicit_attention_agree_and_weights_are_distributions():
    torch.manual_seed(0)
    model = ViT(ViTConfig(depth=3, dim=32, heads=4, mlp_dim=64, patch_size=8)).eval()
    x = torch.randn(4, 3, 32, 32)
    fused = model(x)
    explicit, weights = model.forward_with_attention(x)
    torch.testing.assert_close(fused, explicit, atol=1e-5, rtol=1e-5)
    assert weights.shape == (3, 4, 4, 17, 17)
    torch.testing.assert_close(weights.sum(-1), torch.ones(3, 4, 4, 17))


def test_unknown_architecture_or_config_key_is_a_clear_error():
    with pytest.raises(VitlabError, match="unknown architecture 'resnet'"):
        build_model("resnet", {})
    with pytest.raises(VitlabError, match="unknown keys: patch"):
        build_model("cnn", {"patch": 4})
