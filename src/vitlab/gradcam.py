"""Grad-CAM (Selvaraju et al., 2017) for convolutional networks, with two forward hooks and no dependencies.

The map of class c over a feature map A (C channels, h x w) is ReLU(sum_k alpha_k A_k), where alpha_k is the
spatial mean of d logit_c / d A_k. For a network that ends in global average pooling and a linear layer this
is exactly the class activation map (Zhou et al., 2016), which the tests check.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from vitlab.models import eval_mode


def find_target_layer(model: nn.Module, example: torch.Tensor) -> tuple[str, nn.Module] | None:
    """The last module (in execution order) that outputs a spatial feature map (B, C, h, w) with h, w > 1.

    A container finishes after its children, so for ``features = Sequential(conv, relu, pool, ...)`` this is
    ``features`` itself: the whole convolutional trunk, the usual Grad-CAM layer. None for a model without
    one (an MLP, or a CNN that pools down to 1x1).
    """
    finished: list[tuple[str, nn.Module, object]] = []
    handles = [
        module.register_forward_hook(lambda m, args, out, name=name: finished.append((name, m, out)))
        for name, module in model.named_modules()
        if name  # the model itself outputs logits
    ]
    try:
        with eval_mode(model), torch.no_grad():
            model(example[:1])
    finally:
        for handle in handles:
            handle.remove()
    spatial = [
        (name, module)
        for name, module, out in finished
        if isinstance(out, torch.Tensor) and out.dim() == 4 and min(out.shape[-2:]) > 1
    ]
    return spatial[-1] if spatial else None


def grad_cam(
    model: nn.Module, x: torch.Tensor, layer: nn.Module, classes: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, classes) and Grad-CAM maps (B, h, w) at ``layer``, each scaled to a maximum of 1.

    ``classes`` (B,) picks the class to explain per image; by default the predicted one. The model runs in
    eval mode and its parameters' ``.grad`` are left untouched.
    """
    captured: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, args, out: captured.append(out))
    try:
        with eval_mode(model), torch.enable_grad():
            # Inputs that require grad keep the graph even when every parameter is frozen.
            logits = model(x.detach().requires_grad_(True))
            activations = captured[-1]  # (B, C, h, w)
            if classes is None:
                classes = logits.argmax(dim=1)
            score = logits.gather(1, classes.view(-1, 1).to(logits.device)).sum()
            (grads,) = torch.autograd.grad(score, activations)
    finally:
        handle.remove()
    alpha = grads.mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1): each channel's importance for the class
    cam = F.relu((alpha * activations).sum(dim=1)).detach()  # (B, h, w)
    cam = cam / cam.amax(dim=(1, 2), keepdim=True).clamp_min(1e-12)
    return logits.detach(), cam
