"""airbench's CNN (Jordan, 2024) and the patch-whitening initialisation it shares with a ViT's stem."""

import numpy as np
import onnxruntime as ort
import pytest
import torch
import torch.nn.functional as F
from serving_fixtures import NORM, cifar_images
from torch import nn

from vitlab.errors import VitlabError
from vitlab.export import export_onnx
from vitlab.gradcam import find_target_layer, grad_cam
from vitlab.models import batchnorm_biases, build_model, count_parameters, init_from_data, preset_config
from vitlab.models.airbench import BN_EPS, BN_MOMENTUM, LOGIT_SCALE, Airbench
from vitlab.models.whitening import WHITENING_EPS, patch_whitening, whiten_conv_


def _airbench(**config) -> Airbench:
    arch, keys = preset_config("airbench", **config)
    return build_model(arch, keys)


def _images(n: int) -> torch.Tensor:
    """Real CIFAR-10 images, normalized: their patches' covariance is far from the identity."""
    return NORM.to_tensor(torch.as_tensor(cifar_images(n)[0]))


def _patch_covariance(x: torch.Tensor, k: int) -> torch.Tensor:
    patches = F.unfold(x.double(), k).transpose(1, 2).flatten(0, 1)  # (N * L, C * k * k)
    return torch.cov(patches.T, correction=0)


def test_the_preset_is_the_papers_network():
    model = _airbench()
    whiten = model.features[0]
    assert (whiten.in_channels, whiten.out_channels, whiten.kernel_size, whiten.padding) == (
        3,
        24,
        (2, 2),
        (0, 0),
    )
    assert not whiten.weight.requires_grad and whiten.bias.requires_grad  # frozen filters, a learned bias
    assert isinstance(model.features[1], nn.GELU)
    convs = [m for m in model.features[2:].modules() if isinstance(m, nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(24, 64), (64, 64), (64, 256), (256, 256)] + [
        (256, 256)
    ] * 2
    assert all(c.kernel_size == (3, 3) and c.bias is None for c in convs)
    norms = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert len(norms) == 6
    assert all((n.momentum, n.eps) == (BN_MOMENTUM, BN_EPS) == (0.6, 1e-12) for n in norms)
    assert all(not n.weight.requires_grad and (n.weight == 1).all() for n in norms)
    assert [type(m).__name__ for m in model.features[2]] == [
        "Conv2d",
        "MaxPool2d",
        "BatchNorm2d",
        "GELU",
        "Conv2d",
        "BatchNorm2d",
        "GELU",
    ]
    assert model.head[-1].bias is None
    # Trainable: the whitening bias, the 6 convs, the BN biases, the linear head (no bias).
    convs_weights = 24 * 64 * 9 + 64 * 64 * 9 + 64 * 256 * 9 + 3 * 256 * 256 * 9
    assert count_parameters(model) == 24 + convs_weights + 2 * (64 + 256 + 256) + 256 * 10 == 1_971_352
    # 32 -> 31 (2x2 conv, no padding) -> 15 -> 7 -> 3 -> global max pooling (the paper's 3x3 max pooling)
    x = torch.randn(2, 3, 32, 32)
    assert model.features(x).shape == (2, 256, 3, 3)
    with torch.no_grad():
        pooled = model.eval().features(x).amax(dim=(2, 3))
        torch.testing.assert_close(model(x), model.head[-1](pooled) * LOGIT_SCALE)


def test_convs_after_the_whitening_start_as_partial_identities():
    model = _airbench(group_widths=(8, 16)).eval()
    group = model.features[2]
    x = torch.randn(4, 24, 9, 9)
    with torch.no_grad():
        widened = group[0](x)  # 24 -> 8 channels: fewer outputs than inputs, all identities
        torch.testing.assert_close(widened, x[:, :8])
        second = model.features[3][0]  # 8 -> 16: the first 8 filters pass their channels through
        y = torch.randn(4, 8, 5, 5)
        torch.testing.assert_close(second(y)[:, :8], y)
        assert not torch.allclose(second(y)[:, 8:], torch.zeros(4, 8, 5, 5))  # the rest: default init
        z = torch.randn(4, 8, 5, 5)
        torch.testing.assert_close(group[4](z), z)  # 8 -> 8: the whole identity


def test_whitening_filters_give_the_patches_identity_covariance():
    x = _images(200)
    covariance = _patch_covariance(x, 2)
    assert (covariance - torch.eye(12)).abs().max() > 0.5  # neighbouring pixels correlate strongly
    conv = nn.Conv2d(3, 24, 2)
    whiten_conv_(conv, x)
    with torch.no_grad():
        out = conv(x)  # (N, 24, 31, 31)
    flat = out.permute(1, 0, 2, 3).flatten(1).double()
    assert flat.mean(1).abs().max() < 1e-4  # the bias centres every output
    eigenvalues = torch.linalg.eigvalsh(covariance).flip(0)  # largest first, as the filters
    expected = torch.diag(eigenvalues / (eigenvalues + WHITENING_EPS))  # the identity, less eps's share
    torch.testing.assert_close(torch.cov(flat[0::2], correction=0), expected, atol=2e-4, rtol=0)
    torch.testing.assert_close(out[:, 1::2], -out[:, 0::2])  # each component and its negation


def test_a_narrower_conv_takes_the_strongest_components_and_a_wider_one_keeps_the_rest():
    x = _images(50)
    filters, _ = patch_whitening(x, 4)  # (96, 3, 4, 4)
    torch.manual_seed(0)
    narrow, wide = nn.Conv2d(3, 64, 4, stride=4), nn.Conv2d(3, 100, 4, stride=4, bias=False)
    before = wide.weight.detach().clone()
    whiten_conv_(narrow, x)
    whiten_conv_(wide, x)
    torch.testing.assert_close(narrow.weight, filters[:64])
    torch.testing.assert_close(wide.weight[:96], filters)
    assert wide.weight[96:].equal(before[96:])
    gains = filters[0::2].flatten(1).norm(dim=1)  # 1/sqrt(eigenvalue + eps): the strongest come first
    assert (gains[1:] >= gains[:-1]).all()
    with pytest.raises(ValueError, match="takes 1 channels"):
        whiten_conv_(nn.Conv2d(1, 8, 2), x)


def test_init_from_data_sets_only_the_whitening_conv():
    model = _airbench(group_widths=(8, 16))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = _images(64)
    assert init_from_data(model, x)
    after = model.state_dict()
    changed = {k for k in before if not before[k].equal(after[k])}
    assert changed == {"features.0.weight", "features.0.bias"}
    torch.testing.assert_close(model.features[0].weight, patch_whitening(x, 2)[0])
    assert not init_from_data(build_model("resnet", {}), x)  # nothing to do


def test_training_moves_the_batchnorm_biases_but_not_the_frozen_weights():
    model = _airbench(group_widths=(8, 16))
    init_from_data(model, _images(32))
    frozen = {n: p.clone() for n, p in model.named_parameters() if not p.requires_grad}
    biases = batchnorm_biases(model)
    assert len(biases) == 4 and all(b.requires_grad for b in biases)
    starts = [b.clone() for b in biases]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    F.cross_entropy(model(_images(8)), torch.arange(8) % 10).backward()
    optimizer.step()
    assert all(model.get_parameter(n).equal(p) for n, p in frozen.items())
    assert len(frozen) == 1 + 4  # the whitening filters and the BatchNorm scales
    assert all(not b.equal(s) for b, s in zip(biases, starts, strict=True))
    assert len(batchnorm_biases(build_model("resnet", {}))) == 19 + 2
    assert batchnorm_biases(build_model("vit", {})) == []


def test_airbench_fits_mnist_and_refuses_more_groups_than_the_image_has_halvings():
    model = build_model("airbench", {"image_size": 28, "in_channels": 1, "group_widths": [8, 8, 8, 8]})
    assert model.features[0].out_channels == 2 * 1 * 4
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    with pytest.raises(VitlabError, match="group_widths has 5 conv groups"):
        build_model("airbench", {"group_widths": [8] * 5})


def test_airbench_exports_to_onnx_and_explains_with_grad_cam(tmp_path):
    model = _airbench(group_widths=(16, 32, 32)).eval()
    init_from_data(model, _images(64))
    path = export_onnx(model, tmp_path / "model.onnx", [str(i) for i in range(10)], NORM)
    x = _images(5)
    (logits,) = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(
        None, {"images": x.numpy()}
    )
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(x).numpy(), atol=1e-5)
    name, layer = find_target_layer(model, x)
    assert name == "features"  # its 3x3 output, before the global max pooling
    _, cams = grad_cam(model, x, layer)
    assert cams.shape == (5, 3, 3)


def test_vit_whiten_stem_whitens_the_first_conv_of_either_stem():
    x = _images(64)
    conv = build_model("vit", {"stem": "conv", "whiten_stem": True})  # 3x3 conv 3 -> 64: 54 filters whitened
    first = conv.patch_embed[0].weight.detach().clone()
    rest = conv.state_dict()
    assert init_from_data(conv, x)
    torch.testing.assert_close(conv.patch_embed[0].weight[:54], patch_whitening(x, 3)[0])
    assert conv.patch_embed[0].weight[54:].equal(first[54:])
    assert all(v.equal(rest[k]) for k, v in conv.state_dict().items() if k != "patch_embed.0.weight")
    assert conv.patch_embed[0].weight.requires_grad  # a start, not a frozen layer
    patch = build_model("vit", {"whiten_stem": True})  # the 4x4 patch embedding, 64 of 96 filters
    init_from_data(patch, x)
    torch.testing.assert_close(patch.patch_embed.weight, patch_whitening(x, 4)[0][:64])
    plain = build_model("vit", {"stem": "conv"})
    weights = {k: v.clone() for k, v in plain.state_dict().items()}
    assert not init_from_data(plain, x)
    assert all(v.equal(weights[k]) for k, v in plain.state_dict().items())
    with pytest.raises(VitlabError, match="whiten_stem=true needs a conv"):
        build_model("vit", {"stem": "spt", "whiten_stem": True})
    assert count_parameters(conv) == count_parameters(plain)
