import dataclasses
import math
import re

import numpy as np
import pytest
import torch

from vitlab.checkpoint import Normalization
from vitlab.data.prepared import Split
from vitlab.errors import VitlabError
from vitlab.evaluate import evaluate
from vitlab.models import build_model
from vitlab.params import TrainParams, parse_params
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


TINY_VIT = ("vit", {"num_classes": 2, "dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16, "dropout": 0.1})
EVERY_AUGMENTATION = {
    "augment": "randaugment",
    "mixup_alpha": 0.2,
    "cutmix_alpha": 1.0,
    "random_erasing": 0.25,
}


def _run(spec: tuple[str, dict], data: Split, **options) -> tuple[list[dict], dict[str, torch.Tensor]]:
    cfg = TrainConfig(
        **{"epochs": 2, "batch_size": 32, "warmup_epochs": 1, "device": "cpu", "seed": 5} | options
    )
    torch.manual_seed(0)  # the train stage seeds before building the model, so the init is fixed too
    model = build_model(*spec)
    torch.manual_seed(123)  # training must not depend on the global RNG state when it starts
    history = train(model, data, None, Normalization.from_images(data.images), cfg).history
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in history], model.state_dict()


@pytest.mark.parametrize(
    ("spec", "options"),
    [
        (TINY_VIT, {}),
        (TINY_VIT, EVERY_AUGMENTATION),
        (("cnn", {"num_classes": 2, "channels": [4, 8]}), EVERY_AUGMENTATION),  # channels_last
    ],
    ids=["vit", "vit-every-augmentation", "cnn-every-augmentation"],
)
def test_same_seed_gives_identical_training_on_cpu(spec, options):
    data = _separable_split(128, seed=1)
    (h1, w1), (h2, w2) = _run(spec, data, **options), _run(spec, data, **options)
    assert h1 == h2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    h3, _ = _run(spec, data, **options | {"seed": 6})
    assert h3 != h1


def test_bf16_autocast_trains_a_float32_model():
    data = _separable_split(64, seed=2)
    fp32, _ = _run(TINY_VIT, data, amp="off")
    bf16, weights = _run(TINY_VIT, data, amp="bf16")
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert all(math.isfinite(row["train_loss"]) for row in bf16)
    assert bf16 != fp32  # the forward pass really ran in bf16
    assert bf16[0]["train_loss"] == pytest.approx(fp32[0]["train_loss"], abs=0.05)


@pytest.mark.slow  # inductor compiles C++ kernels on a CPU: about 20 s
def test_compiled_model_trains_like_the_eager_one():
    data = _separable_split(64, seed=3)
    spec = ("mlp", {"num_classes": 2, "hidden": [8]})
    (eager, w_eager), (compiled, w_compiled) = _run(spec, data), _run(spec, data, compile=True)
    assert w_compiled.keys() == w_eager.keys()  # the model itself, not the compiled wrapper
    for row, row_eager in zip(compiled, eager, strict=True):
        assert row["train_loss"] == pytest.approx(row_eager["train_loss"], rel=1e-5)


def test_a_time_budget_stops_training_and_anneals_the_learning_rate_by_the_clock(capsys):
    data = _separable_split(128, seed=4)
    norm = Normalization.from_images(data.images)
    model = build_model(*TINY_VIT)
    cfg = TrainConfig(epochs=10_000, warmup_epochs=100, batch_size=16, device="cpu", time_budget_s=2.0)
    result = train(model, data, None, norm, cfg)
    assert 2.0 <= result.wall_time_s < 60
    assert 1 <= len(result.history) < cfg.epochs
    lrs = [row["lr"] for row in result.history]
    assert lrs[-1] < 0.2 * cfg.learning_rate  # the cosine reached its end with the budget, not the epochs
    log = capsys.readouterr().err
    assert re.search(r"^epoch 1 \(\d+/2 s\)  loss", log, re.MULTILINE)  # progress by the clock
    assert "/10000" not in log


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


def test_every_train_param_reaches_the_train_config():
    # The train stage passes params.train as TrainConfig(**...): the two must name the same options.
    assert set(TrainParams.model_fields) == {f.name for f in dataclasses.fields(TrainConfig)}
    assert TrainConfig(**TrainParams().model_dump()) == TrainConfig()  # and share their defaults


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"augment": "trivialaugment"}, "train.augment: got 'trivialaugment'"),
        ({"random_erasing": 1.5}, "train.random_erasing: Input should be less than or equal to 1"),
        ({"time_budget_s": 0}, "train.time_budget_s: Input should be greater than 0"),
        ({"amp": "fp16"}, "train.amp: got 'fp16'"),
    ],
)
def test_bad_train_options_are_one_line_errors_naming_the_key(train, message):
    with pytest.raises(VitlabError, match=re.escape(message)):
        parse_params({"train": train})
