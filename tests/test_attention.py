import json

import numpy as np
import pytest
import torch
from png_checks import assert_picture, inches_to_pixels
from serving_fixtures import NORM, cifar_images, class_names, random_model

from vitlab.attention import attention_rollout, patch_attention, render_attention
from vitlab.errors import VitlabError
from vitlab.figures import overlay_inches
from vitlab.models import build_model


def _random_attention(depth=3, batch=2, heads=4, tokens=17, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(depth, batch, heads, tokens, tokens, generator=generator).mul(3).softmax(-1)


def test_rollout_is_the_cls_row_of_a_row_stochastic_product():
    weights = _random_attention()
    rollout = attention_rollout(weights)
    assert rollout.shape == (2, 16)
    assert (rollout > 0).all()
    # Row-stochastic layers keep the product row-stochastic: patches plus what stays on [CLS] sum to 1.
    assert (rollout.sum(-1) < 1).all() and (rollout.sum(-1) > 0.5).all()


def test_rollout_of_one_layer_averages_heads_and_adds_the_residual():
    weights = _random_attention(depth=1)
    expected = 0.5 * weights[0].mean(1)[:, 0, 1:]  # (A + I) / 2; I has no [CLS]-to-patch entries
    torch.testing.assert_close(attention_rollout(weights), expected)


def test_rollout_multiplies_later_layers_onto_earlier_ones():
    tokens = 4
    first, second = torch.eye(tokens), torch.eye(tokens)
    first[1] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # layer 0: patch 1 reads patch 2
    second[0] = torch.tensor([0.0, 1.0, 0.0, 0.0])  # layer 1: [CLS] reads patch 1
    weights = torch.stack([first, second]).view(2, 1, 1, tokens, tokens)
    # [CLS] gets half from patch 1's layer-0 state, which is half patch 1 and half patch 2.
    torch.testing.assert_close(attention_rollout(weights), torch.tensor([[0.25, 0.25, 0.0]]))


def test_rollout_of_uniform_attention_is_uniform_and_of_identity_attention_empty():
    depth, tokens = 3, 5
    uniform = torch.full((depth, 2, 4, tokens, tokens), 1 / tokens)
    # ((J/T + I) / 2)^L = (I + (2^L - 1) J/T) / 2^L, so every patch gets (1 - 2^-L) / T.
    expected = torch.full((2, tokens - 1), (1 - 0.5**depth) / tokens)
    torch.testing.assert_close(attention_rollout(uniform), expected)
    identity = torch.eye(tokens).expand(depth, 2, 4, tokens, tokens)
    assert (attention_rollout(identity) == 0).all()  # [CLS] only ever attended to itself


def test_patch_attention_picks_the_cls_row_over_patches():
    weights = _random_attention()
    maps = patch_attention(weights)
    assert maps.shape == (3, 2, 4, 16)
    torch.testing.assert_close(maps[2, 1, 3], weights[2, 1, 3, 0, 1:])


def test_without_a_cls_token_the_maps_average_the_query_rows():
    weights = _random_attention(tokens=16)  # 16 patches, no [CLS]
    maps = patch_attention(weights, prefix_tokens=0)
    assert maps.shape == (3, 2, 4, 16)
    torch.testing.assert_close(maps[1, 0, 2], weights[1, 0, 2].mean(dim=0))
    torch.testing.assert_close(maps.sum(-1), torch.ones(3, 2, 4))  # the mean of distributions is one


def test_with_a_distillation_token_the_maps_read_the_cls_row_over_the_patches_alone():
    weights = _random_attention(tokens=18)  # [CLS], DeiT's distillation token, 16 patches
    torch.testing.assert_close(patch_attention(weights, prefix_tokens=2), weights[..., 0, 2:])
    rollout = attention_rollout(weights, prefix_tokens=2)
    assert rollout.shape == (2, 16)
    layers = weights.mean(2) + torch.eye(18)
    layers = layers / layers.sum(-1, keepdim=True)
    torch.testing.assert_close(rollout, (layers[2] @ layers[1] @ layers[0])[:, 0, 2:])


def test_rollout_without_a_cls_token_is_what_mean_pooling_reads():
    tokens = 3
    first = torch.eye(tokens)
    first[0] = torch.tensor([0.0, 0.0, 1.0])  # layer 0: token 0 reads token 2
    weights = first.view(1, 1, 1, tokens, tokens)
    # (A + I) / 2 has rows [.5, 0, .5], [0, 1, 0], [0, 0, 1]; their mean is what the pooled token draws on.
    expected = torch.tensor([[0.5, 1.0, 1.5]]) / 3
    torch.testing.assert_close(attention_rollout(weights, prefix_tokens=0), expected)
    uniform = torch.full((4, 2, 2, 5, 5), 0.2)
    torch.testing.assert_close(attention_rollout(uniform, prefix_tokens=0), torch.full((2, 5), 0.2))


def test_rollout_with_sequence_pooling_weighs_the_rows_as_the_pooling_does():
    tokens = 3
    first = torch.eye(tokens)
    first[0] = torch.tensor([0.0, 0.0, 1.0])  # layer 0: token 0 reads token 2
    weights = first.view(1, 1, 1, tokens, tokens)
    # (A + I) / 2 has rows [.5, 0, .5], [0, 1, 0], [0, 0, 1]; pooling reads them with weights .5, .25, .25.
    pool_weights = torch.tensor([[0.5, 0.25, 0.25]])
    expected = torch.tensor([[0.25, 0.25, 0.5]])
    torch.testing.assert_close(attention_rollout(weights, pool_weights=pool_weights), expected)
    # Equal weights are mean pooling; all weight on token 0 is token 0's row, as a CLS token's.
    weights = _random_attention(tokens=16)
    uniform = torch.full((2, 16), 1 / 16)
    mean = attention_rollout(weights, prefix_tokens=0)
    torch.testing.assert_close(attention_rollout(weights, pool_weights=uniform), mean)
    first_token = torch.zeros(2, 16)
    first_token[:, 0] = 1.0
    cls_row = attention_rollout(weights)  # token 0's row over tokens 1..15
    torch.testing.assert_close(attention_rollout(weights, pool_weights=first_token)[:, 1:], cls_row)


def test_patch_attention_with_sequence_pooling_weighs_the_query_rows():
    weights = _random_attention(tokens=16)
    pool_weights = torch.rand(2, 16, generator=torch.Generator().manual_seed(1)).softmax(-1)
    maps = patch_attention(weights, prefix_tokens=0, pool_weights=pool_weights)
    assert maps.shape == (3, 2, 4, 16)
    torch.testing.assert_close(maps[1, 0, 2], pool_weights[0] @ weights[1, 0, 2])
    torch.testing.assert_close(maps.sum(-1), torch.ones(3, 2, 4))  # a weighted mean of distributions


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    model = random_model("vit").train()
    images, labels = cifar_images(3)
    out_dir = tmp_path_factory.mktemp("attention")
    summary = render_attention(model, images, labels, class_names(), NORM, out_dir)
    assert model.training  # handed back in the mode it came in
    return model, out_dir, summary


def test_render_writes_one_png_per_layer_and_a_rollout(rendered):
    _, out_dir, summary = rendered
    assert summary["files"] == ["layer_0.png", "layer_1.png", "rollout.png"]
    assert sorted(p.name for p in out_dir.iterdir()) == summary["files"]  # no temp files left
    for name, maps in (("layer_0.png", 2), ("layer_1.png", 2), ("rollout.png", 1)):
        # 3 rows (images); the image, then 2 heads (or the rollout), then the colorbar
        assert_picture(out_dir / name, inches_to_pixels(overlay_inches(3, maps)))


def test_render_summary_describes_the_maps(rendered):
    model, _, summary = rendered
    assert json.loads(json.dumps(summary)) == summary
    assert summary["supported"] is True and summary["arch"] == "vit"
    assert (summary["method"], summary["query"]) == ("attention", "cls")
    assert (summary["layers"], summary["heads"], summary["images"]) == (2, 2, 3)
    assert summary["patch_grid"] == [8, 8]
    images, labels = cifar_images(3)
    with torch.no_grad():
        predicted = model.eval()(NORM.to_tensor(torch.as_tensor(images))).argmax(1).numpy()
    assert summary["correct"] == int((predicted == labels).sum())
    assert 0 < summary["rollout_patch_entropy"] < 1
    assert len(summary["patch_entropy_by_layer"]) == 2
    assert all(0 < e < 1 for e in summary["patch_entropy_by_layer"])


@pytest.mark.parametrize(
    ("config", "query", "grid"),
    [
        ({"pool": "mean"}, "mean", 8),
        ({"stem": "conv", "patch_size": 8}, "cls", 4),
        ({"stem": "conv", "patch_size": 2, "pool": "mean", "pos_embed": "sincos"}, "mean", 16),
        ({"distillation": True}, "cls", 8),
        ({"stem": "spt", "lsa": True, "qkv_bias": False}, "cls", 8),
        ({"stem": "conv", "pool": "seq", "qkv_bias": False}, "seq", 8),
    ],
)
def test_vit_variants_draw_on_their_own_token_grid(tmp_path, config, query, grid):
    torch.manual_seed(0)
    model = build_model("vit", {"depth": 2, "dim": 32, "heads": 2, "mlp_dim": 64} | config)
    images, labels = cifar_images(2)
    summary = render_attention(model, images, labels, class_names(), NORM, tmp_path)
    assert (summary["query"], summary["patch_grid"]) == (query, [grid, grid])
    assert 0 < summary["rollout_patch_entropy"] <= 1
    # Sequence pooling's weights are drawn beside the rollout.
    rollout_maps = 2 if query == "seq" else 1
    for name, maps in (("layer_1.png", 2), ("rollout.png", rollout_maps)):
        assert_picture(tmp_path / name, inches_to_pixels(overlay_inches(2, maps)))


def test_sequence_pooling_maps_use_the_pooled_row(tmp_path, monkeypatch):
    torch.manual_seed(0)
    model = build_model("vit", {"depth": 2, "dim": 32, "heads": 2, "mlp_dim": 64, "pool": "seq"}).eval()
    model.attention_pool.weight.data.normal_()  # peaked pooling: far from mean pooling's equal weights
    images, labels = cifar_images(3)
    x = NORM.to_tensor(torch.as_tensor(images))
    with torch.no_grad():
        _, weights, pool_weights = model.forward_with_maps(x)
    assert pool_weights.amax() > 4 / 64
    drawn = {}

    def record(heading, images, titles, correct, maps, colorbar_label, path, smooth=False):
        drawn[path.name] = (heading, dict(maps))
        return path

    monkeypatch.setattr("vitlab.attention.plot_overlays", record)
    summary = render_attention(model, images, labels, class_names(), NORM, tmp_path)
    heading, maps = drawn["rollout.png"]
    assert list(maps) == ["rollout", "sequence pooling"] and "sequence pooling" in heading
    rollout = attention_rollout(weights, pool_weights=pool_weights)
    for name, expected in (("rollout", rollout), ("sequence pooling", pool_weights)):
        expected = expected / expected.amax(dim=-1, keepdim=True)
        np.testing.assert_allclose(maps[name], expected.reshape(3, 8, 8).numpy(), rtol=1e-5, atol=1e-6)
    layer = patch_attention(weights, pool_weights=pool_weights)[1]  # (B, heads, patches)
    layer = layer / layer.amax(dim=-1, keepdim=True)
    np.testing.assert_allclose(
        drawn["layer_1.png"][1]["head 1"], layer[:, 1].reshape(3, 8, 8).numpy(), rtol=1e-5
    )
    assert summary["query"] == "seq"


def test_a_cnn_gets_grad_cam_in_the_rollout_layout(tmp_path):
    images, labels = cifar_images(3)
    model = random_model("cnn")
    summary = render_attention(model, images, labels, class_names(), NORM, tmp_path)
    assert summary == {
        "supported": True,
        "arch": "cnn",
        "method": "grad-cam",
        "layer": "features",
        "feature_grid": [8, 8],
        "images": 3,
        "correct": summary["correct"],
        "files": ["gradcam.png"],
    }
    with torch.no_grad():
        predicted = model(NORM.to_tensor(torch.as_tensor(images))).argmax(1).numpy()
    assert summary["correct"] == int((predicted == labels).sum())
    assert_picture(tmp_path / "gradcam.png", inches_to_pixels(overlay_inches(3, 1)))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gradcam.png"]


def test_a_model_without_attention_or_feature_maps_renders_nothing(tmp_path):
    images, labels = cifar_images(2)
    summary = render_attention(random_model("mlp"), images, labels, class_names(), NORM, tmp_path / "out")
    assert summary == {"supported": False, "reason": "mlp has neither attention nor a spatial feature map"}
    assert not (tmp_path / "out").exists()


def test_rendering_no_images_is_an_error(tmp_path):
    with pytest.raises(VitlabError, match="no images"):
        render_attention(
            random_model("vit"), np.zeros((0, 32, 32, 3), np.uint8), [], class_names(), NORM, tmp_path
        )
