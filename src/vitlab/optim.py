"""The optimizer of a training run, built in one place: parameter groups, AdamW or SGD, Muon, the schedule.

- ``train.optimizer``: AdamW (Loshchilov and Hutter, 2019, "Decoupled Weight Decay Regularization") or SGD
  with Nesterov momentum ``train.momentum`` (0.9: the CIFAR ResNets' optimizer, He et al., 2016).
- ``train.muon``: Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks";
  ``torch.optim.Muon``) for the 2-D weight matrices but the classifier head's, which, like every other
  parameter, stay with ``train.optimizer``, as Muon's authors advise. Its update is scaled to AdamW's RMS
  (Liu et al., 2025, "Muon is Scalable for LLM Training", arXiv 2502.16982), so the one learning rate and
  weight decay serve both.
- ``train.muon_filters``: Muon for the conv filters too, as airbench94_muon trains them (Jordan, 2024, "94% on
  CIFAR-10 in 3.29 seconds on a single GPU", arXiv 2404.00498, and its repository's Muon variant): each
  filter bank flattened to (out, in x k x k), orthogonalized, and kept at a Frobenius norm of sqrt(out)
  (``FilterMuon``), at its own learning rate and momentum. Meant for convs followed by BatchNorm, whose
  output ignores the filters' scale.
- ``train.bias_lr_scale``: the BatchNorm biases and the whitening conv's bias at a multiple of the learning
  rate (airbench's 64; Page, 2018, "How to train your ResNet"), their weight decay divided by it so that they
  decay as much per step as the rest.
- ``train.selective_decay``: no weight decay on norms, biases, position embeddings and tokens (1-D
  parameters, the LSA temperature among them, and those of ``NO_DECAY_NAMES``), as in He et al., 2019, "Bag
  of Tricks for Image Classification", section 3.1, and DeiT's timm recipe; off, every parameter decays.

Every optimizer follows the same learning-rate multiplier (``lr_factor``), one ``LambdaLR`` each.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# torch's own Newton-Schulz iteration (private, but torch's pin is exact): torch.optim.Muon refuses filters.
from torch.optim._muon import DEFAULT_A, DEFAULT_B, DEFAULT_C, EPS, _zeropower_via_newtonschulz

from vitlab.models import batchnorm_biases
from vitlab.params import TrainParams

# Parameters that are embeddings rather than weights: added to the tokens, never multiplied by an input.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token")
# The classifier heads (every architecture's top-level ``head``; DeiT's ``head_dist``): not for Muon.
HEAD_NAMES = ("head", "head_dist")
# airbench94_muon's Newton-Schulz steps for the filters (torch's default is 5).
FILTER_NS_STEPS = 3


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether ``selective_decay`` leaves weight decay on parameter ``name``: not for 1-D parameters (norm
    scales and shifts, biases, LSA's per-head temperature) nor for ``NO_DECAY_NAMES``."""
    return param.ndim > 1 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def for_muon(name: str, param: torch.Tensor) -> bool:
    """Whether ``train.muon`` optimizes parameter ``name``: a 2-D weight matrix outside the classifier
    head."""
    return param.ndim == 2 and name.split(".", 1)[0] not in HEAD_NAMES


def for_filter_muon(name: str, param: torch.Tensor) -> bool:
    """Whether ``train.muon_filters`` optimizes parameter ``name``: a conv filter bank (4-D)."""
    return param.ndim == 4


def is_bias_lr_scaled(model: nn.Module) -> set[int]:
    """The ids of the parameters ``train.bias_lr_scale`` multiplies: the BatchNorm biases and the bias of
    airbench's whitening conv (``model.whiten``)."""
    ids = {id(p) for p in batchnorm_biases(model)}
    whiten = getattr(model, "whiten", None)
    if isinstance(whiten, nn.Conv2d) and whiten.bias is not None:
        ids.add(id(whiten.bias))
    return ids


class FilterMuon(torch.optim.Optimizer):
    """Muon for conv filters, in airbench94_muon's form (Jordan, 2024; Jordan et al., 2024, "Muon: An
    optimizer for hidden layers in neural networks"): SGD momentum (Nesterov), the update orthogonalized by
    Newton-Schulz iterations on the filter bank flattened to (out, in x k x k), and each filter bank rescaled
    to a Frobenius norm of sqrt(out) before its step, so that the step's size relative to the weights stays
    ``lr``. Meant for filters followed by BatchNorm, whose output does not depend on their scale. No weight
    decay.

    ``torch.optim.Muon`` takes 2-D parameters only; this uses its Newton-Schulz iteration (bf16).
    """

    def __init__(self, params: list[torch.Tensor], lr: float, momentum: float):
        super().__init__(params, {"lr": lr, "momentum": momentum})

    @torch.no_grad()
    def step(self, closure: None = None) -> None:  # noqa: D102 (torch.optim.Optimizer's)
        for group in self.param_groups:
            lr, momentum = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.mul_(momentum).add_(p.grad)
                g = p.grad.add(buf, alpha=momentum)  # Nesterov
                p.mul_(len(p) ** 0.5 / p.norm())
                update = _zeropower_via_newtonschulz(
                    g.reshape(len(g), -1), (DEFAULT_A, DEFAULT_B, DEFAULT_C), FILTER_NS_STEPS, EPS
                )
                p.add_(update.view_as(p).to(p.dtype), alpha=-lr)


class Optimizers:
    """The run's torch optimizers (``train.optimizer``'s, and Muon's with ``train.muon``), each under its own
    ``LambdaLR`` of the same multiplier, stepped, zeroed, saved and restored as one."""

    def __init__(self, optimizers: list[torch.optim.Optimizer], lr_factor: Callable[[int], float]):
        self.optimizers = optimizers
        self.schedulers = [torch.optim.lr_scheduler.LambdaLR(o, lr_factor) for o in optimizers]

    def zero_grad(self) -> None:
        """Every gradient to None."""
        for optimizer in self.optimizers:
            optimizer.zero_grad(set_to_none=True)

    def step(self) -> None:
        """One optimizer step, then one schedule step."""
        for optimizer, scheduler in zip(self.optimizers, self.schedulers, strict=True):
            optimizer.step()
            scheduler.step()

    @property
    def lr(self) -> float:
        """The base learning rate of the step to come (``train.learning_rate`` times the schedule)."""
        return self.optimizers[0].param_groups[0]["lr"]

    def state_dict(self) -> dict[str, Any]:
        """Every optimizer's and schedule's state, for ``load_state_dict``."""
        return {
            "optimizers": [o.state_dict() for o in self.optimizers],
            "schedulers": [s.state_dict() for s in self.schedulers],
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what ``state_dict`` saved, of optimizers built the same way."""
        for optimizer, saved in zip(self.optimizers, state["optimizers"], strict=True):
            optimizer.load_state_dict(saved)
        for scheduler, saved in zip(self.schedulers, state["schedulers"], strict=True):
            scheduler.load_state_dict(saved)


def build_optimizers(model: nn.Module, params: TrainParams, lr_factor: Callable[[int], float]) -> Optimizers:
    """The optimizers of ``model``'s trainable parameters for ``params`` (params.yaml's train section), the
    learning rate ``params.learning_rate`` times ``lr_factor(step)``.

    Without ``selective_decay``, ``muon``, ``muon_filters`` and ``bias_lr_scale`` this is one AdamW (or SGD)
    over ``model.parameters()`` in one group, the same optimizer as before these options existed.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    filters = [p for n, p in named if params.muon_filters and for_filter_muon(n, p)]
    named = [(n, p) for n, p in named if not (params.muon_filters and for_filter_muon(n, p))]
    muon = [p for n, p in named if params.muon and for_muon(n, p)]
    rest = [(n, p) for n, p in named if not (params.muon and for_muon(n, p))]
    lr, decay, scale = params.learning_rate, params.weight_decay, params.bias_lr_scale
    scaled = is_bias_lr_scaled(model) if scale != 1 else set()
    groups = []
    for bias_group in (False, True):
        members = [(n, p) for n, p in rest if (id(p) in scaled) == bias_group]
        options = {"lr": lr * scale, "weight_decay": decay / scale} if bias_group else {}
        if params.selective_decay:
            groups.append({"params": [p for n, p in members if decays(n, p)]} | options)
            groups.append(
                {"params": [p for n, p in members if not decays(n, p)]} | options | {"weight_decay": 0.0}
            )
        else:
            groups.append({"params": [p for _, p in members]} | options)
    groups = [g for g in groups if g["params"]]
    optimizers: list[torch.optim.Optimizer] = []
    if groups:
        if params.optimizer == "adamw":
            optimizers.append(torch.optim.AdamW(groups, lr=lr, weight_decay=decay))
        else:
            optimizers.append(
                torch.optim.SGD(groups, lr=lr, momentum=params.momentum, nesterov=True, weight_decay=decay)
            )
    if muon:
        optimizers.append(torch.optim.Muon(muon, lr=lr, weight_decay=decay, adjust_lr_fn="match_rms_adamw"))
    if filters:
        optimizers.append(FilterMuon(filters, params.muon_filters_lr, params.muon_filters_momentum))
    return Optimizers(optimizers, lr_factor)
