"""Every numeric and enumerated parameter's allowed range is what the code can do: the schema refuses the
values beyond each bound with the range in the message, and the code runs at the bound itself."""

from __future__ import annotations

import math
import re
import typing

import numpy as np
import pytest
import torch
from pydantic import BaseModel

from vitlab.checkpoint import Normalization
from vitlab.data.prepared import Split
from vitlab.errors import VitlabError
from vitlab.export import export_onnx, verify_onnx
from vitlab.models import build_model
from vitlab.params import CONFIGS, OPSETS, Params, TrainParams, parse_params
from vitlab.train import split_train_val, train

# Keys whose bound can only be reached together with another key (cross-field rules).
PARTNERS = {
    ("model", "dim"): {"heads": 1},
    ("train", "warmup_epochs"): {"epochs": 10_000},
    ("train", "epochs"): {"warmup_epochs": 0},
    ("teacher", "warmup_epochs"): {"epochs": 10_000},
    ("teacher", "epochs"): {"warmup_epochs": 0},
    ("validate", "pixel_mean_min"): {"pixel_mean_max": 255.0},
    ("validate", "pixel_std_min"): {"pixel_std_max": 255.0},
    ("validate", "pixel_mean_max"): {"pixel_mean_min": 0.0},
    ("validate", "pixel_std_max"): {"pixel_std_min": 0.0},
}


def _section(alias: str, keys: dict) -> dict:
    """``keys`` of section ``alias``, a model key beside the name of the architecture that reads it (a key
    another architecture reads is an error: tests/test_params.py)."""
    if alias != "model" or "name" in keys:
        return {alias: keys}
    arch = next(name for name in ("vit", *CONFIGS) if keys.keys() & CONFIGS[name].model_fields.keys())
    return {alias: {"name": arch} | keys}


def _bounds() -> list[tuple[str, str, str, float]]:
    """(section, key, kind, bound) for every bound a numeric key of the schema states."""
    found = []
    for section, field in Params.model_fields.items():
        model: type[BaseModel] = field.annotation
        for key, info in model.model_fields.items():
            for meta in info.metadata:
                found += [
                    (section, key, kind, getattr(meta, kind))
                    for kind in ("ge", "gt", "le", "lt")
                    if hasattr(meta, kind)
                ]
    return found


def _step(value: float, kind: str) -> float:
    """The nearest value on the wrong side of a bound: one integer, or the next float."""
    outward = -1 if kind in ("ge", "gt") else 1
    if isinstance(value, int):
        return value + outward
    return math.nextafter(value, outward * math.inf)


@pytest.mark.parametrize(("section", "key", "kind", "bound"), _bounds())
def test_each_bound_admits_its_edge_and_refuses_beyond_it_naming_the_range(section, key, kind, bound):
    alias = "validate" if section == "validate_" else section
    partners = PARTNERS.get((alias, key), {})
    inside = bound if kind in ("ge", "le") else _step(bound, "le" if kind == "gt" else "ge")
    outside = _step(bound, kind) if kind in ("ge", "le") else bound
    assert getattr(getattr(parse_params(_section(alias, {key: inside} | partners)), section), key) == inside
    with pytest.raises(VitlabError, match=rf"{alias}\.{key}: got {outside!r}; allowed: .*{bound}"):
        parse_params(_section(alias, {key: outside} | partners))


def test_every_enumerated_key_refuses_a_value_outside_its_choices_and_names_them():
    for section, field in Params.model_fields.items():
        alias = "validate" if section == "validate_" else section
        for key, info in field.annotation.model_fields.items():
            if typing.get_origin(info.annotation) is not typing.Literal:
                continue
            choices = typing.get_args(info.annotation)
            with pytest.raises(
                VitlabError,
                match=rf"{alias}\.{key}: got 'bogus'; input should be {re.escape(repr(choices[0]))}",
            ):
                parse_params(_section(alias, {key: "bogus"}))


def _numeric_keys(kind: type) -> list[tuple[str, str]]:
    """(section alias, key) of every key whose value may be a number of ``kind`` (or null)."""
    return [
        (info.alias or section, key)
        for section, info in Params.model_fields.items()
        for key, field in info.annotation.model_fields.items()
        if kind in (field.annotation, *typing.get_args(field.annotation))
    ]


@pytest.mark.parametrize(("section", "key"), _numeric_keys(float))
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_no_float_key_takes_infinity_or_nan(section, key, value):
    with pytest.raises(VitlabError, match=rf"{section}\.{key}: got {value!r}; allowed: a finite number"):
        parse_params(_section(section, {key: value}))


@pytest.mark.parametrize(("section", "key"), _numeric_keys(int) + _numeric_keys(float))
def test_no_numeric_key_reads_true_as_one(section, key):
    with pytest.raises(VitlabError, match=rf"{section}\.{key}: got True; expected a number"):
        parse_params(_section(section, {key: True}))


def _choices(section: str, key: str) -> tuple[str, ...]:
    return typing.get_args(Params.model_fields[section].annotation.model_fields[key].annotation)


def _data(n: int = 48) -> Split:
    rng = np.random.default_rng(0)
    return Split(rng.integers(0, 256, (n, 32, 32, 3), dtype=np.uint8), rng.integers(0, 2, n))


# Each train key at the edge of its range, and every choice of each enumerated train key.
TRAIN_EDGES = [
    {"warmup_epochs": 0.0},
    {"epochs": 2, "warmup_epochs": math.nextafter(2.0, 0.0)},
    {"label_smoothing": math.nextafter(1.0, 0.0)},
    {"crop_padding": 16},
    {"flip": False, "crop_padding": 0},
    {"random_erasing": 1.0},
    {"mixup_alpha": 1e-6},
    {"cutmix_alpha": 1e-6},
    {"mixup_alpha": 100.0, "cutmix_alpha": 100.0},
    {"weight_decay": 0.0},
    {"batch_size": 1},
    {"batch_size": 10_000},
    {"seed": 2**32 - 1},
    {"time_budget_s": 1e-9},
    *({key: choice} for key in ("augment", "amp") for choice in _choices("train", key)),
]


@pytest.mark.parametrize("edge", TRAIN_EDGES, ids=lambda edge: ",".join(f"{k}={v}" for k, v in edge.items()))
def test_training_runs_at_the_edge_of_every_train_key(edge):
    params = parse_params({"train": {"epochs": 1, "warmup_epochs": 0, "device": "cpu"} | edge})
    train_params = TrainParams(**params.train.model_dump())
    data = _data()
    torch.manual_seed(0)
    model = build_model("vit", {"num_classes": 2, "patch_size": 8, "dim": 16, "depth": 1, "heads": 2})
    result = train(model, data, None, Normalization.from_images(data.images), train_params)
    assert all(math.isfinite(row["train_loss"]) for row in result.history)


@pytest.mark.parametrize(
    "model",
    [
        {"patch_size": 1, "dim": 8, "depth": 1, "heads": 1, "mlp_dim": 8},
        {"patch_size": 32},
        {"stem": "conv", "patch_size": 32, "dim": 16, "heads": 2},
        {"stem": "conv", "patch_size": 2, "dim": 16, "heads": 2},
        {"heads": 64, "dim": 64, "depth": 1},
        {"heads": 1, "head_dim": 1, "depth": 1},
        {"dropout": math.nextafter(1.0, 0.0), "drop_path": math.nextafter(1.0, 0.0), "depth": 2},
        {"pos_embed": "sincos", "dim": 4, "heads": 1},
        {"pool": "mean"},
        {"distillation": True, "pos_embed": "sincos", "dim": 4, "heads": 1},
        {"name": "cnn", "channels": [1, 1, 1, 1, 1]},
        {"name": "resnet", "widths": [1] * 7, "blocks": [1] * 7},
        {"name": "mlp", "hidden": [1]},
    ],
    ids=str,
)
def test_models_build_and_train_at_the_edges_of_the_model_keys(model):
    params = parse_params(_section("model", model))
    torch.manual_seed(0)
    net = build_model(params.model.name, params.model.config(3))
    x = torch.randn(2, 3, 32, 32)
    loss = net.train()(x).logsumexp(1).mean()
    loss.backward()
    assert math.isfinite(loss.item())


def test_seeds_at_both_ends_of_their_range_split_the_data():
    for seed in (0, 2**32 - 1):
        train_part, val_part = split_train_val(
            _data(20), 0.25, parse_params({"data": {"seed": seed}}).data.seed
        )
        assert (len(train_part), len(val_part)) == (15, 5)


def test_a_hold_out_that_leaves_nothing_to_train_on_is_a_clear_error():
    fraction = parse_params({"data": {"val_fraction": 0.99}}).data.val_fraction
    with pytest.raises(VitlabError, match=r"data\.val_fraction=0\.99 holds out all 20 training images"):
        split_train_val(_data(20), fraction, 0)


@pytest.mark.parametrize("opset", OPSETS)
def test_export_works_at_both_ends_of_the_opset_range(tmp_path, opset):
    assert parse_params({"export": {"opset": opset}}).export.opset == opset
    torch.manual_seed(0)
    model = build_model("vit", {"num_classes": 3, "patch_size": 8, "dim": 16, "depth": 1, "heads": 2}).eval()
    images = _data(4).images
    norm = Normalization.from_images(images)
    for with_attention in (False, True):
        path = export_onnx(
            model, tmp_path / "m.onnx", ["a", "b", "c"], norm, opset, {}, with_attention, ort_fusions=True
        )
        assert verify_onnx(path, model, images, norm)["top1_agreement"] == 1.0


@pytest.mark.parametrize("opset", [OPSETS[0] - 1, OPSETS[1] + 1])
def test_the_opsets_just_outside_the_range_do_not_export_a_working_vit(tmp_path, opset):
    torch.manual_seed(0)
    model = build_model("vit", {"num_classes": 3, "patch_size": 8, "dim": 16, "depth": 1, "heads": 2}).eval()
    images = _data(4).images
    norm = Normalization.from_images(images)
    with pytest.raises(VitlabError, match="fails the ONNX checker"):
        export_onnx(model, tmp_path / "m.onnx", ["a", "b", "c"], norm, opset, {})
