"""The training methods of vitlab.optim and vitlab.train, each shown to change what it should: Muon, no weight
decay on norms, biases and tokens, gradient clipping, the weight average (EMA) and the warmup's share."""

import pytest
import torch
from cifar_fakes import separable_split

from vitlab.checkpoint import Normalization
from vitlab.evaluate import evaluate
from vitlab.models import build_model
from vitlab.optim import build_optimizers
from vitlab.params import TrainParams
from vitlab.train import _grad_norm, _lr_factor, split_train_val, train

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
