import math

import numpy as np
import pytest
import torch

from vitlab.checkpoint import Normalization
from vitlab.data.prepared import Split
from vitlab.errors import VitlabError
from vitlab.evaluate import evaluate
from vitlab.models import build_model
from vitlab.train import TrainConfig, select_device, split_train_val, train, warmup_cosine


def _separable_split(n: int, seed: int = 0) -> Split:
    """Two classes a linear model can tell apart: dark images vs bright images, with noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    base = np.where(labels[:, None, None, None] == 1, 170, 80)
    images = np.clip(base + rng.normal(0, 30, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    return Split(images, labels.astype(np.int64))


def test_split_train_val_is_seeded_disjoint_and_complete():
    split = Split(np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1).repeat(3, -1), np.arange(100))
    tr, va = split_train_val(split, 0.2, seed=3)
    _, va2 = split_train_val(split, 0.2, seed=3)
    assert len(va) == 20 and len(tr) == 80
    assert np.array_equal(va.labels, va2.labels)
    assert sorted(np.concatenate([tr.labels, va.labels]).tolist()) == list(range(100))
    assert split_train_val(split, 0.0, 0)[1] is None


def test_warmup_then_cosine_schedule():
    f = warmup_cosine(warmup_steps=4, total_steps=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert math.isclose(f(9), 0.5)
    assert f(14) == pytest.approx(0.0)


def test_training_learns_a_separable_problem_and_keeps_the_best_epoch():
    data = _separable_split(256)
    tr, va = split_train_val(data, 0.25, 0)
    norm = Normalization.from_images(tr.images)
    model = build_model("mlp", {"num_classes": 2, "hidden": [32]})
    seen = []
    cfg = TrainConfig(epochs=4, batch_size=32, learning_rate=3e-3, warmup_epochs=1, device="cpu")
    result = train(model, tr, va, norm, cfg, on_epoch=seen.append)
    assert [row["epoch"] for row in seen] == [1, 2, 3, 4]
    assert result.history == seen
    assert result.best_val_accuracy == max(row["val_accuracy"] for row in seen) >= 0.9
    # The model is left holding the best epoch's weights.
    assert evaluate(model, va, norm, 2).accuracy == pytest.approx(result.best_val_accuracy)


def test_same_seed_gives_identical_training_on_cpu():
    data = _separable_split(128, seed=1)
    norm = Normalization.from_images(data.images)
    cfg = TrainConfig(epochs=2, batch_size=32, warmup_epochs=1, device="cpu", seed=5)
    runs = []
    for _ in range(2):
        torch.manual_seed(0)  # the train stage seeds before building the model, so the init is fixed too
        model = build_model("vit", {"num_classes": 2, "dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16})
        torch.manual_seed(123)  # training must not depend on the global RNG state when it starts
        runs.append((train(model, data, None, norm, cfg).history, model.state_dict()))
    (h1, w1), (h2, w2) = runs
    assert [r["train_loss"] for r in h1] == [r["train_loss"] for r in h2]
    assert all(torch.equal(w1[k], w2[k]) for k in w1)


def test_unavailable_device_is_a_clear_error():
    if not torch.cuda.is_available():
        with pytest.raises(VitlabError, match=r"train\.device='cuda' is not available"):
            select_device("cuda")
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in {"cuda", "mps", "cpu"}


def test_evaluate_confusion_and_per_class_accuracy():
    class Fixed(torch.nn.Module):
        def forward(self, x):  # predicts class 0 for every image
            return torch.tensor([[2.0, 0.0, 0.0]]).expand(len(x), 3)

    split = Split(np.zeros((4, 32, 32, 3), np.uint8), np.array([0, 0, 1, 2]))
    result = evaluate(Fixed(), split, Normalization((0.5,) * 3, (0.5,) * 3), 3)
    assert result.accuracy == 0.5
    assert result.per_class_accuracy == [1.0, 0.0, 0.0]
    assert result.confusion.tolist() == [[2, 0, 0], [1, 0, 0], [1, 0, 0]]
    assert result.predictions.tolist() == [0, 0, 0, 0]
