"""The optimizer of a training run, built in one place: parameter groups, AdamW or SGD, Muon, the schedule.

- ``train.optimizer``: AdamW (Loshchilov and Hutter, 2019, "Decoupled Weight Decay Regularization") or SGD
  with Nesterov momentum 0.9, the CIFAR ResNets' optimizer (He et al., 2016).
- ``train.muon``: Muon (Jordan et al., 2024, "Muon: An optimizer for hidden layers in neural networks";
  ``torch.optim.Muon``) for the 2-D weight matrices but the classifier head's, which, like every other
  parameter, stay with ``train.optimizer``, as Muon's authors advise. Its update is scaled to AdamW's RMS
  (Liu et al., 2025, "Muon is Scalable for LLM Training", arXiv 2502.16982), so the one learning rate and
  weight decay serve both.
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

from vitlab.params import TrainParams

# Parameters that are embeddings rather than weights: added to the tokens, never multiplied by an input.
NO_DECAY_NAMES = ("pos_embed", "cls_token", "dist_token")
# The classifier heads (every architecture's top-level ``head``; DeiT's ``head_dist``): not for Muon.
HEAD_NAMES = ("head", "head_dist")
SGD_MOMENTUM = 0.9


def decays(name: str, param: torch.Tensor) -> bool:
    """Whether ``selective_decay`` leaves weight decay on parameter ``name``: not for 1-D parameters (norm
    scales and shifts, biases, LSA's per-head temperature) nor for ``NO_DECAY_NAMES``."""
    return param.ndim > 1 and name.rsplit(".", 1)[-1] not in NO_DECAY_NAMES


def for_muon(name: str, param: torch.Tensor) -> bool:
    """Whether ``train.muon`` optimizes parameter ``name``: a 2-D weight matrix outside the classifier
    head."""
    return param.ndim == 2 and name.split(".", 1)[0] not in HEAD_NAMES


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
        """The learning rate of the step to come (every group has the same)."""
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

    Without ``selective_decay`` and ``muon`` this is one AdamW (or SGD) over ``model.parameters()`` in one
    group, the same optimizer as before either option existed.
    """
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    muon = [p for n, p in named if params.muon and for_muon(n, p)]
    rest = [(n, p) for n, p in named if not (params.muon and for_muon(n, p))]
    decay = params.weight_decay
    if params.selective_decay:
        groups = [
            {"params": [p for n, p in rest if decays(n, p)]},
            {"params": [p for n, p in rest if not decays(n, p)], "weight_decay": 0.0},
        ]
    else:
        groups = [{"params": [p for _, p in rest]}]
    groups = [g for g in groups if g["params"]]
    lr = params.learning_rate
    if params.optimizer == "adamw":
        base: torch.optim.Optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=decay)
    else:
        base = torch.optim.SGD(groups, lr=lr, momentum=SGD_MOMENTUM, nesterov=True, weight_decay=decay)
    optimizers = [base]
    if muon:
        optimizers.append(torch.optim.Muon(muon, lr=lr, weight_decay=decay, adjust_lr_fn="match_rms_adamw"))
    return Optimizers(optimizers, lr_factor)
