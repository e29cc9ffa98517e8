"""DeiT's hard-label distillation: the distilled ViT's token and heads, the loss, training from a teacher, the
teacher stage and what it refuses."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from cifar_fakes import make_dataset, separable_split
from torch import nn

from vitlab import stages
from vitlab.checkpoint import Normalization, load_checkpoint, save_checkpoint
from vitlab.cli import main
from vitlab.data.prepared import save_prepared
from vitlab.distill import NO_TEACHER, distillation_loss, load_teacher
from vitlab.errors import VitlabError
from vitlab.models import build_model, count_parameters, describe_model, distills
from vitlab.params import TeacherParams, TrainParams, parse_params
from vitlab.train import run_digest, train

SMALL_VIT = {"patch_size": 8, "dim": 16, "depth": 2, "heads": 2, "mlp_dim": 32}


def _distilled(num_classes: int = 3, **config) -> nn.Module:
    torch.manual_seed(0)
    return build_model("vit", SMALL_VIT | {"num_classes": num_classes, "distillation": True} | config)


def test_the_distillation_token_follows_cls_with_a_position_and_a_head_of_its_own():
    model = _distilled().eval()
    plain = build_model("vit", SMALL_VIT | {"num_classes": 3})
    assert distills(model) and not distills(plain)
    assert model.dist_token.shape == (1, 1, 16) and model.pos_embed.shape == (1, 2 + 16, 16)
    assert (model.head_dist.in_features, model.head_dist.out_features) == (16, 3)
    # One token and one position of width 16, and a second 16 -> 3 head.
    assert count_parameters(model) == count_parameters(plain) + 16 + 16 + (16 * 3 + 3)
    x = torch.randn(4, 3, 32, 32)
    tokens = model.patch_embed(x).flatten(2).transpose(1, 2)
    prefix = [model.cls_token.expand(4, -1, -1), model.dist_token.expand(4, -1, -1)]
    tokens = torch.cat([*prefix, tokens], dim=1) + model.pos_embed
    for block in model.blocks:
        tokens = block(tokens)[0]
    cls_logits, dist_logits = model.forward_heads(x)
    assert cls_logits.shape == dist_logits.shape == (4, 3)
    torch.testing.assert_close(cls_logits, model.head(model.norm(tokens[:, 0])))
    torch.testing.assert_close(dist_logits, model.head_dist(model.norm(tokens[:, 1])))
    assert (cls_logits - dist_logits).abs().max() > 1e-3  # two heads on two tokens, not one twice


def test_evaluation_sees_one_output_the_mean_of_the_two_heads():
    model = _distilled().eval()
    x = torch.randn(5, 3, 32, 32)
    cls_logits, dist_logits = model.forward_heads(x)
    assert torch.equal(model(x), (cls_logits + dist_logits) / 2)
    logits, weights = model.forward_with_attention(x)
    torch.testing.assert_close(logits, model(x), atol=1e-5, rtol=1e-5)
    assert weights.shape == (2, 5, 2, 18, 18)  # depth, B, heads, CLS + distillation + 16 patches
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 5, 2, 18))


def test_fixed_positions_leave_both_prefix_tokens_without_one():
    model = _distilled(pos_embed="sincos")
    assert model.pos_embed.shape == (1, 18, 16)
    assert not model.pos_embed[0, :2].any() and model.pos_embed[0, 2:].abs().sum() > 0


def test_distillation_without_a_cls_token_is_refused_and_a_plain_vit_has_no_second_head():
    with pytest.raises(VitlabError, match=r"vit config: distillation=true needs pool=cls, not pool=mean"):
        build_model("vit", {"pool": "mean", "distillation": True})
    with pytest.raises(VitlabError, match="this ViT has no distillation head"):
        build_model("vit", SMALL_VIT).forward_heads(torch.randn(1, 3, 32, 32))


def _cross_entropy(row: list[float], label: int, smoothing: float = 0.0) -> float:
    """By hand, in float64: log-sum-exp minus the target's logit, the target (1 - eps) on the label plus eps
    spread evenly over the classes."""
    lse = math.log(sum(math.exp(v) for v in row))
    return lse - (1 - smoothing) * row[label] - smoothing * sum(row) / len(row)


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_the_loss_is_deits_hard_distillation_on_a_hand_built_batch(smoothing):
    cls_rows, dist_rows = [[2.0, 0.0, 0.0], [0.0, 1.0, 0.0]], [[0.0, 0.0, 3.0], [1.0, 0.0, 0.0]]
    labels, teacher_rows = [0, 2], [[0.1, 0.2, 5.0], [0.3, 0.2, 0.1]]  # the teacher says 2, then 0
    true_term = sum(_cross_entropy(r, y, smoothing) for r, y in zip(cls_rows, labels, strict=True)) / 2
    teacher_term = (_cross_entropy(dist_rows[0], 2) + _cross_entropy(dist_rows[1], 0)) / 2  # never smoothed
    loss = distillation_loss(
        torch.tensor(cls_rows),
        torch.tensor(dist_rows),
        torch.tensor(labels),
        torch.tensor(teacher_rows),
        smoothing,
    )
    assert loss.item() == pytest.approx(0.5 * true_term + 0.5 * teacher_term, rel=1e-6)
    # MixUp's and CutMix's targets are probabilities: one-hot ones give the same loss.
    one_hot = torch.eye(3)[labels]
    mixed = distillation_loss(
        torch.tensor(cls_rows), torch.tensor(dist_rows), one_hot, torch.tensor(teacher_rows), smoothing
    )
    assert mixed.item() == pytest.approx(loss.item(), rel=1e-6)


class _AlwaysZero(nn.Module):
    """A teacher that calls every image class 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[5.0, 0.0]]).expand(len(x), -1)


def test_a_distilled_vit_learns_the_labels_in_one_head_and_the_teachers_in_the_other():
    data = separable_split(256, seed=3)  # dark images are class 0, bright ones class 1
    norm = Normalization.from_images(data.images)
    model = _distilled(num_classes=2, depth=1)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher = _AlwaysZero().train()
    params = TrainParams(epochs=4, batch_size=32, learning_rate=3e-3, warmup_epochs=1, device="cpu")
    result = train(model, data, None, norm, params, teacher=teacher)
    assert not teacher.training  # the teacher predicts in eval mode
    assert all(math.isfinite(row["train_loss"]) for row in result.history)
    after = model.state_dict()
    for name in ("head.weight", "head_dist.weight", "dist_token", "cls_token"):
        assert not torch.equal(before[name], after[name]), name
    with torch.no_grad():
        cls_logits, dist_logits = model.eval().forward_heads(norm.to_tensor(torch.as_tensor(data.images)))
    labels = torch.as_tensor(data.labels)
    assert (cls_logits.argmax(1) == labels).float().mean() > 0.9
    assert (dist_logits.argmax(1) == 0).float().mean() > 0.9  # half of the images are class 1


def test_a_distilled_vit_needs_a_teacher_and_no_other_model_takes_one():
    data = separable_split(32)
    norm = Normalization.from_images(data.images)
    params = TrainParams(epochs=1, warmup_epochs=0, device="cpu")
    with pytest.raises(VitlabError, match=r"model\.distillation is on: training needs a teacher"):
        train(_distilled(num_classes=2), data, None, norm, params)
    plain = build_model("vit", SMALL_VIT | {"num_classes": 2})
    with pytest.raises(VitlabError, match=r"a teacher teaches only a ViT with model\.distillation on"):
        train(plain, data, None, norm, params, teacher=_AlwaysZero())


def test_the_resume_digest_depends_on_the_teacher():
    data = separable_split(16)
    norm, params = Normalization.from_images(data.images), TrainParams(epochs=1, warmup_epochs=0)
    model = _distilled(num_classes=2)
    teachers = [build_model("cnn", {"num_classes": 2, "channels": [4]}) for _ in range(2)]
    digests = {run_digest(model, data, None, norm, params, 1, t) for t in [None, *teachers]}
    assert len(digests) == 3


def _cnn_checkpoint(path, class_names, image_size=32, channels=3):
    model = build_model(
        "cnn", {"num_classes": len(class_names), "image_size": image_size, "in_channels": channels}
    )
    save_checkpoint(path, model, class_names, Normalization((0.5,) * channels, (0.25,) * channels), "fake")
    return path


def test_load_teacher_gives_a_frozen_model_in_eval_mode(tmp_path):
    names = ["cat", "dog"]
    teacher = load_teacher(_cnn_checkpoint(tmp_path / "teacher.pt", names), names, (32, 3))
    assert not teacher.training
    assert not any(p.requires_grad for p in teacher.parameters())


@pytest.mark.parametrize(
    ("saved", "expected"),
    [
        ({"class_names": ["cat", "dog"], "image_size": 28, "channels": 1}, "a model for 28x28x1 images"),
        ({"class_names": ["a", "b", "c", "d"]}, "a teacher for 4 classes (fake), not for these 2: retrain"),
        (
            {"class_names": ["cat", "fox"]},
            "a teacher for 2 classes (fake), not for these 2 (class 1 is 'fox' there, 'dog' here): retrain",
        ),
    ],
    ids=["other-geometry", "other-number-of-classes", "other-classes"],
)
def test_a_teacher_of_other_images_or_classes_is_a_one_line_error(tmp_path, saved, expected):
    path = _cnn_checkpoint(tmp_path / "teacher.pt", **saved)
    with pytest.raises(VitlabError) as error:
        load_teacher(path, ["cat", "dog"], (32, 3))
    assert str(error.value).startswith(f"{path}: ") and expected in str(error.value)
    assert "\n" not in str(error.value)


def test_the_teachers_recipe_is_the_train_section_with_its_own_length():
    assert TeacherParams.replaced_train_keys() == [
        "epochs",
        "warmup_epochs",
        "warmup_fraction",
        "time_budget_s",
    ]
    params = parse_params({"train": {"learning_rate": 1e-3, "time_budget_s": 60}, "teacher": {"epochs": 5}})
    recipe = params.teacher.recipe(params.train)
    assert (recipe.epochs, recipe.warmup_epochs, recipe.time_budget_s) == (5, 1.0, None)
    assert recipe.model_dump(exclude=set(TeacherParams.replaced_train_keys())) == params.train.model_dump(
        exclude=set(TeacherParams.replaced_train_keys())
    )


TINY = {
    "model": {"name": "vit", **SMALL_VIT, "distillation": True},
    "train": {"epochs": 2, "warmup_epochs": 1, "batch_size": 32, "device": "cpu"},
    "teacher": {"preset": "cnn-small", "epochs": 2, "warmup_epochs": 1},
}


def test_the_teacher_stage_trains_the_preset_and_the_train_stage_learns_from_it(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # an offline W&B run would write ./wandb here
    layout = stages.Layout.under(tmp_path)
    save_prepared(make_dataset(n_train=80, n_test=10, num_classes=4), layout.prepared_dir)
    params = parse_params(TINY)
    stages.stage_function("teacher")(params, layout)
    teacher = load_checkpoint(layout.teacher)
    assert describe_model(teacher.model) == {
        "arch": "cnn",
        "config": teacher.model.config.model_dump(mode="json"),
    }
    assert teacher.model.config.channels == (16, 32)  # cnn-small's
    assert teacher.class_names == [f"class_{i}" for i in range(4)]
    metrics = json.loads(layout.teacher_metrics.read_text())
    assert metrics["trained"] and metrics["train_images"] == 72 and metrics["best_epoch"] in (1, 2)
    assert not layout.teacher_state.exists()
    stages.stage_function("train")(params, layout)
    student = load_checkpoint(layout.checkpoint).model
    assert distills(student)
    assert student(torch.zeros(2, 3, 32, 32)).shape == (2, 4)


def test_the_train_stage_of_a_distilled_vit_without_a_teacher_names_the_missing_file(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.chdir(tmp_path)
    save_prepared(make_dataset(n_train=40, n_test=10, num_classes=4), tmp_path / "data" / "prepared")
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(TINY))
    assert main(["stage", "train"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: models/teacher.pt: no teacher model; ") and err.count("\n") == 1
    assert "`vitlab stage teacher`" in err
    assert not (tmp_path / "models" / "model.pt").exists()


def test_without_distillation_the_teacher_stage_trains_nothing_and_its_output_says_so(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    layout = stages.Layout.under(tmp_path)
    save_prepared(make_dataset(n_train=40, n_test=10, num_classes=4), layout.prepared_dir)
    plain = TINY | {"model": TINY["model"] | {"distillation": False}}
    layout.teacher_state.parent.mkdir(parents=True)
    layout.teacher_state.write_bytes(b"a teacher's run stopped before distillation went off")
    stages.stage_function("teacher")(parse_params(plain), layout)
    assert layout.teacher.read_bytes() == NO_TEACHER
    assert json.loads(layout.teacher_metrics.read_text()) == {"trained": False}
    assert not layout.teacher_state.exists()
    stages.stage_function("train")(parse_params(plain), layout)  # a model without distillation never reads it
    assert not distills(load_checkpoint(layout.checkpoint).model)
    with pytest.raises(VitlabError, match=r"teacher\.pt: no teacher model; .* with model\.distillation on"):
        load_teacher(layout.teacher, [f"class_{i}" for i in range(4)], (32, 3))
