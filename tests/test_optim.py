"""The training methods of vitlab.optim and vitlab.train, each shown to change what it should: Muon, no weight
decay on norms, biases and tokens, gradient clipping, the weight average (EMA) and the warmup's share."""

import pytest
import torch
from cifar_fakes import separable_split

from vitlab.checkpoint import Normalization
from vitlab.evaluate import evaluate
from vitlab.models import build_model, preset_config
from vitlab.optim import FilterMuon, build_optimizers
from vitlab.params import TrainParams
from vitlab.train import _grad_norm, _lr_factor, split_train_val, train, warmup_cosine

# Every kind of parameter: LSA's temperature, the CLS and distillation tokens, position embeddings, norms,
# biases, 2-D weights, a conv stem's 4-D kernels and the two heads.
VIT = {"num_classes": 2, "dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16, "lsa": True, "distillation": True}
VIT_CONV = VIT | {"stem": "conv", "distillation": False}


def _optimizers(model, **options):
    return build_optimizers(model, TrainParams(**options), lambda step: 1.0).optimizers


def _names(model, params) -> set[str]:
    ids = {id(p) for p in params}
    return {name for name, p in model.named_parameters() if id(p) in ids}


def test_without_options_one_adamw_group_holds_every_parameter_as_before():
    model = build_model("vit", VIT)
    (adamw,) = _optimizers(model)
    assert isinstance(adamw, torch.optim.AdamW) and len(adamw.param_groups) == 1
    assert adamw.param_groups[0]["params"] == list(model.parameters())
    (sgd,) = _optimizers(model, optimizer="sgd")
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["nesterov"]


def test_selective_decay_exempts_norms_biases_tokens_positions_and_the_lsa_temperature():
    model = build_model("vit", VIT)
    (adamw,) = _optimizers(model, selective_decay=True, weight_decay=0.1)
    decayed, exempt = adamw.param_groups
    assert (decayed["weight_decay"], exempt["weight_decay"]) == (0.1, 0.0)
    names = _names(model, exempt["params"])
    assert {"cls_token", "dist_token", "pos_embed"} <= names
    assert any(n.endswith(".scale") for n in names)  # LSA's learned temperature, one per head
    assert all(
        p.ndim <= 1 for n, p in model.named_parameters() if n in names and "token" not in n and "pos" not in n
    )
    assert all(p.ndim > 1 for p in decayed["params"])
    # A step on zero gradients: weight decay alone moves the decayed weights, not the exempt ones.
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    adamw.step()
    after = dict(model.named_parameters())
    assert all(torch.equal(before[n], after[n]) for n in names)
    assert not any(torch.equal(before[n], after[n]) for n in _names(model, decayed["params"]))


def test_muon_takes_the_2d_weights_but_the_heads_and_the_rest_stay_with_adamw():
    model = build_model("vit", VIT_CONV)
    adamw, muon = _optimizers(model, muon=True)
    assert isinstance(muon, torch.optim.Muon)
    muon_names = _names(model, muon.param_groups[0]["params"])
    assert muon_names and all(model.get_parameter(n).ndim == 2 for n in muon_names)
    assert not any(n.startswith("head") for n in muon_names)
    rest = _names(model, [p for g in adamw.param_groups for p in g["params"]])
    assert rest.isdisjoint(muon_names) and rest | muon_names == {n for n, _ in model.named_parameters()}
    assert {"head.weight", "pos_embed"} <= rest and any(model.get_parameter(n).ndim == 4 for n in rest)


def _fit(data, val=None, **options):
    torch.manual_seed(0)
    model = build_model("vit", VIT_CONV | {"dropout": 0.1})
    params = TrainParams(epochs=2, batch_size=32, warmup_epochs=1, device="cpu", seed=1, **options)
    result = train(model, data, val, Normalization.from_images(data.images), params)
    return model, result


@pytest.mark.parametrize(
    "options",
    [
        {"muon": True},
        {"selective_decay": True},
        {"grad_clip": 1e-3},
        {"optimizer": "sgd"},
        {"ema_decay": 0.9},
    ],
    ids=["muon", "selective-decay", "grad-clip", "sgd", "ema"],
)
def test_each_method_changes_the_weights_training_ends_with(options):
    data = separable_split(64, seed=2)
    plain, _ = _fit(data)
    changed, _ = _fit(data, **options)
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), changed.parameters(), strict=True))


def test_grad_clip_scales_the_gradients_down_to_the_norm_and_reports_the_norm_before():
    weights = [torch.nn.Parameter(torch.zeros(3)), torch.nn.Parameter(torch.zeros(4))]
    weights[0].grad, weights[1].grad = torch.full((3,), 3.0), torch.full((4,), 4.0)
    norm = _grad_norm(weights, clip=1.0)
    assert norm.item() == pytest.approx((27 + 64) ** 0.5)
    after = torch.cat([w.grad for w in weights]).norm().item()
    assert after == pytest.approx(1.0, rel=1e-5)
    assert _grad_norm(weights, clip=None).item() == pytest.approx(after)  # under the norm: left alone


def test_the_weight_average_is_what_is_validated_and_kept():
    data = separable_split(96, seed=5)
    tr, va = split_train_val(data, 0.25, 0)
    averaged, result = _fit(tr, va, ema_decay=0.9)
    plain, _ = _fit(tr, va)
    # The model ends with the weights validated at the best epoch: the average's, not the last step's.
    best = result.history[result.best_epoch - 1]
    assert evaluate(averaged, va, Normalization.from_images(tr.images), 2).loss == pytest.approx(
        best["val_loss"], rel=1e-5
    )
    # The same steps trained both (the average does not feed back), so the difference is the averaging.
    assert [r["train_loss"] for r in result.history] == [r["train_loss"] for r in _fit(tr, va)[1].history]
    assert any(not torch.equal(a, b) for a, b in zip(plain.parameters(), averaged.parameters(), strict=True))


class _Clock:
    elapsed_s = 0.0


def test_warmup_fraction_is_a_share_of_the_epochs_or_of_the_time_budget():
    by_steps = _lr_factor(TrainParams(epochs=10, warmup_epochs=None, warmup_fraction=0.2), 5, _Clock())
    assert [by_steps(s) for s in range(10)] == pytest.approx([(s + 1) / 10 for s in range(10)])
    assert by_steps(10) == 1.0  # 20% of 50 steps
    clock = _Clock()
    budget = TrainParams(recipe="vit-budget", time_budget_s=100.0)
    assert (budget.epochs, budget.warmup_epochs, budget.warmup_fraction) == (None, None, 0.05)
    by_time = _lr_factor(budget, 5, clock)
    clock.elapsed_s = 2.5  # half of the warmup's 5 s
    assert by_time(0) == pytest.approx(2501 / 5000)
    clock.elapsed_s = 100.0
    assert by_time(0) == pytest.approx(0.0)


def _airbench(**widths):
    arch, config = preset_config("airbench", group_widths=(8, 16), **widths)
    return build_model(arch, config)


def test_muon_filters_takes_the_conv_filters_and_keeps_each_bank_at_norm_sqrt_out():
    model = _airbench()
    sgd, filter_muon = _optimizers(model, optimizer="sgd", muon_filters=True, muon_filters_lr=0.2)
    assert isinstance(filter_muon, FilterMuon)
    filters = _names(model, filter_muon.param_groups[0]["params"])
    trainable_4d = {n for n, p in model.named_parameters() if p.ndim == 4 and p.requires_grad}
    assert filters == trainable_4d and len(filters) == 4  # two per group; the frozen whitening conv is not
    rest = _names(model, [p for g in sgd.param_groups for p in g["params"]])
    assert rest.isdisjoint(filters) and "head.3.weight" in rest
    before = {n: model.get_parameter(n).detach().clone() for n in filters}
    torch.manual_seed(0)
    for n in filters:
        model.get_parameter(n).grad = torch.randn_like(before[n])
    filter_muon.step()
    for n in filters:
        after = model.get_parameter(n).detach()
        out = len(after)
        # The bank was rescaled to norm sqrt(out), then moved by lr times an orthogonalized update, whose
        # singular values Newton-Schulz brings near 1 (bf16: loosely), so its norm is about sqrt(min side).
        normalized = before[n] * out**0.5 / before[n].norm()
        step = (after - normalized).flatten(1)
        side = min(step.shape)
        assert step.norm().item() == pytest.approx(0.2 * side**0.5, rel=0.5)
        singular = torch.linalg.svdvals(step / 0.2)
        assert singular.max().item() < 1.6 and singular[:side].min().item() > 0.3


def test_bias_lr_scale_multiplies_the_batchnorm_and_whitening_biases_and_divides_their_decay():
    model = _airbench()
    (sgd,) = _optimizers(model, optimizer="sgd", learning_rate=0.5, weight_decay=0.01, bias_lr_scale=64.0)
    base, biases = sgd.param_groups
    assert (base["lr"], base["weight_decay"]) == (0.5, 0.01)
    assert (biases["lr"], biases["weight_decay"]) == (32.0, 0.01 / 64)
    expected = {n for n, _ in model.named_parameters() if n.endswith("bias") and "features" in n}
    assert _names(model, biases["params"]) == expected and "features.0.bias" in expected
    (plain,) = _optimizers(model, optimizer="sgd", momentum=0.85)
    assert len(plain.param_groups) == 1 and plain.param_groups[0]["momentum"] == 0.85


def test_whiten_bias_epochs_freezes_the_whitening_bias_after_those_epochs():
    data = separable_split(64, seed=3)
    model_requires_grad = []

    def fit(whiten_bias_epochs):
        torch.manual_seed(0)
        model = _airbench()
        params = TrainParams(
            epochs=3,
            batch_size=32,
            warmup_epochs=0,
            device="cpu",
            optimizer="sgd",
            learning_rate=0.05,
            whiten_bias_epochs=whiten_bias_epochs,
        )
        biases = []
        model_requires_grad.append(None)
        train(
            model,
            data,
            None,
            Normalization.from_images(data.images),
            params,
            on_epoch=lambda row: biases.append(model.whiten.bias.detach().clone()),
        )
        model_requires_grad[-1] = model.whiten.bias.requires_grad
        return biases

    frozen_after_1 = fit(1)
    # Still a trainable parameter (its gradient is dropped, so every DDP process reduces the same ones).
    assert model_requires_grad[-1]
    assert frozen_after_1[0].equal(frozen_after_1[1]) and frozen_after_1[1].equal(frozen_after_1[2])
    always = fit(None)
    assert not always[1].equal(always[2])  # trained throughout without the key
    assert always[0].equal(frozen_after_1[0])  # the same first epoch either way


def test_linear_schedule_decays_to_zero_in_a_straight_line_after_the_warmup():
    linear = warmup_cosine(2, 10, "linear")
    assert [linear(s) for s in range(10)] == pytest.approx(
        [0.5, 1.0, 1.0, 0.875, 0.75, 0.625, 0.5, 0.375, 0.25, 0.125]
    )
    assert linear(12) == 0.0
    cosine = warmup_cosine(2, 10)
    assert cosine(6) == pytest.approx(0.5)


def test_the_airbench_recipe_is_the_reference_in_vitlabs_terms():
    params = TrainParams(recipe="airbench")
    assert (params.epochs, params.batch_size, params.optimizer, params.momentum) == (8, 2000, "sgd", 0.85)
    # The reference's summed loss and 256/9-times head weights, in vitlab's batch mean: head 0.67 -> 1.656,
    # biases 0.053 -> 106 (64 times), per-step weight decay 0.004 on both.
    assert params.learning_rate == pytest.approx(0.67 * (9 / 256) ** 2 * 2000, rel=1e-3)
    assert params.learning_rate * params.bias_lr_scale == pytest.approx(0.053 * 2000)
    assert params.learning_rate * params.weight_decay == pytest.approx(0.004)
    assert (params.crop_padding, params.flip, params.label_smoothing) == (2, "alternate", 0.2)
    assert (params.muon_filters, params.whiten_bias_epochs, params.lr_schedule) == (True, 3, "linear")
