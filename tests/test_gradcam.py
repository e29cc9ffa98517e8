import torch
from serving_fixtures import NORM, cifar_images, random_model
from torch import nn

from vitlab.gradcam import find_target_layer, grad_cam
from vitlab.models import build_model


def _gap_net(seed: int = 0) -> nn.Module:
    """conv-ReLU features, global average pooling, linear: the network class activation maps were made for."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.ReLU()),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(6, 4),
    )


def _images(n: int = 3) -> torch.Tensor:
    return NORM.to_tensor(torch.as_tensor(cifar_images(n)[0]))


def test_grad_cam_of_a_global_average_pooling_net_is_its_class_activation_map():
    model = _gap_net()
    x = _images()
    logits, cams = grad_cam(model, x, model[0])
    with torch.no_grad():
        features = model[0](x)  # (B, 6, 32, 32)
        classes = model(x).argmax(1)
        cam = torch.einsum("bk,bkhw->bhw", model[3].weight[classes], features).relu()
    expected = cam / cam.amax(dim=(1, 2), keepdim=True)
    torch.testing.assert_close(cams, expected)
    torch.testing.assert_close(logits, model(x).detach())


def test_grad_cam_explains_the_class_it_is_asked_for():
    model = _gap_net()
    x = _images(2)
    predicted = grad_cam(model, x, model[0])[1]
    other = model(x).argmin(1)
    assert not torch.allclose(grad_cam(model, x, model[0], classes=other)[1], predicted)
    assert torch.allclose(grad_cam(model, x, model[0], classes=model(x).argmax(1))[1], predicted)


def test_grad_cam_finds_the_bright_square_a_brightness_detector_sees():
    model = nn.Sequential(
        nn.Conv2d(3, 1, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(1, 2)
    )
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.fill_(-1.0)  # only clearly bright pixels fire
        model[4].weight.copy_(torch.tensor([[1.0], [-1.0]]))
    x = torch.zeros(1, 3, 16, 16)
    x[..., 4:8, 10:14] = 1.0
    _, cams = grad_cam(model, x, model[1], classes=torch.tensor([0]))
    assert (cams[0, 4:8, 10:14] == 1.0).all()
    cams[0, 4:8, 10:14] = 0.0
    assert (cams == 0).all()


def test_grad_cam_leaves_the_model_as_it_found_it():
    model = _gap_net().train()
    for p in model.parameters():
        p.requires_grad_(False)  # frozen weights: the input carries the graph
    _, cams = grad_cam(model, _images(2), model[0])
    assert model.training
    assert all(p.grad is None for p in model.parameters())
    assert cams.shape == (2, 32, 32) and (cams >= 0).all() and (cams.amax(dim=(1, 2)) == 1).all()


def test_target_layer_is_the_last_spatial_feature_map():
    x = _images(1)
    name, layer = find_target_layer(random_model("cnn"), x)
    assert name == "features" and isinstance(layer, nn.Sequential)
    assert find_target_layer(random_model("mlp"), x) is None
    # Five conv blocks pool down to 1x1: the last map with more than one cell is before the last pooling.
    deep = build_model("cnn", {"channels": [4, 4, 4, 4, 4]})
    name, layer = find_target_layer(deep, x)
    assert name == "features.13" and isinstance(layer, nn.ReLU)
    assert grad_cam(deep, x, layer)[1].shape == (1, 2, 2)


def test_a_resnet_is_explained_at_the_output_of_its_last_stage():
    torch.manual_seed(0)
    resnet = build_model("resnet", {"widths": [8, 16], "blocks": [1, 1]})
    x = _images(2)
    _, layer = find_target_layer(resnet, x)
    outputs = []
    handle = layer.register_forward_hook(lambda m, args, out: outputs.append(out))
    logits, cams = grad_cam(resnet, x, layer)
    handle.remove()
    # the second stage's 16 channels at half the image's side, the last map before global pooling
    assert outputs[0].shape == (2, 16, 16, 16)
    assert logits.shape == (2, 10) and cams.shape == (2, 16, 16)
