"""Named training recipes (``train.recipe`` in params.yaml), beside the model presets (vitlab.presets).

A recipe is data, like airbench's ``hyp``: the train keys it fixes. It is applied the way ``model.preset`` is:
a train key set in params.yaml (or with ``-S``) wins over the recipe, a null key takes the recipe's value,
else its default. So ``dvc exp run -S model.preset=cct-2-3x2 -S train.recipe=vit-budget -S
train.time_budget_s=600`` trains a README row. The budget recipes train until ``train.time_budget_s`` is
spent (``epochs: null``), warming up over a share of it (``warmup_fraction``) before a cosine decay that ends
with it. The crop padding and flips stay the dataset's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Recipe:
    """The train keys a named recipe fixes (``train``), and what it is for and where it was chosen."""

    train: dict[str, Any]
    description: str = ""


# AdamW (weight decay 0.05), label smoothing 0.1, crop and flip; warmup over the first 5% of the time budget,
# then a cosine decay that ends with it.
_BUDGET = {"epochs": None, "warmup_fraction": 0.05, "weight_decay": 0.05, "label_smoothing": 0.1}

# Batch and peak learning rate per model were chosen on the CIFAR-10 subset by training a fixed number of
# epochs (comparisons that machine load cannot skew): batches of 32-64 beat 128 at these short horizons. Over
# 86 epochs (tinyvit's 10 minutes on the subset) RandAugment took tinyvit from 57.5% to 61.7% (MixUp/CutMix:
# 59.4%): a ViT, without a CNN's built-in locality, needs stronger augmentation once it has seen the images
# many times; within 1 minute (8 epochs) it cost 3.3 points (benchmarks/time_to_accuracy.py).
RECIPES: dict[str, Recipe] = {
    # The default run's (params.yaml): chosen on the embedded sample's 225 validation images, seed 0, 40
    # epochs of cct-2-3x2: best validation accuracy 58.2% with it against 52.0% with the train section's
    # defaults (batch 128, AdamW at 2e-3), and tinyvit 42.2% (benchmarks/results/sample_default_run.json).
    "vit-sample": Recipe(
        {"epochs": 40, "batch_size": 32, "learning_rate": 1e-3, "warmup_epochs": 3},
        "the default run's: 40 epochs, batch 32, AdamW at 1e-3 after 3 warmup epochs, weight decay 0.05",
    ),
    "cnn-budget": Recipe(
        _BUDGET | {"batch_size": 64, "learning_rate": 3e-3},
        "cnn-small's for a time budget: batch 64, AdamW at 3e-3, 5% warmup",
    ),
    "resnet-budget": Recipe(
        _BUDGET | {"batch_size": 64, "learning_rate": 2e-3},
        "ResNet-20's for a time budget: batch 64, AdamW at 2e-3, 5% warmup",
    ),
    "vit-budget": Recipe(
        _BUDGET | {"batch_size": 32, "learning_rate": 1e-3},
        "the ViTs' for a time budget: batch 32, AdamW at 1e-3, 5% warmup",
    ),
    "vit-budget-randaugment": Recipe(
        _BUDGET | {"batch_size": 32, "learning_rate": 1e-3, "augment": "randaugment"},
        "vit-budget with RandAugment: the ViTs' from 10 minutes on the CIFAR-10 subset (80+ epochs)",
    ),
}
