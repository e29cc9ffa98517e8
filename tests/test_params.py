from pathlib import Path

import pytest

from vitlab.errors import VitlabError
from vitlab.params import Params, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_committed_params_file_is_valid_and_complete():
    params = load_params(REPO / "params.yaml")
    # Every key of the schema is written out in params.yaml, so `dvc exp run -S` can address each one.
    assert params == Params.model_validate(params.model_dump(by_alias=True))
    assert params.data.dataset == "cifar10-sample"


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"model": {"patch_szie": 4}}, "model.patch_szie: unknown key"),
        ({"modle": {}}, "modle: unknown key"),
        (
            {"model": {"patch_size": 5}},
            "model.patch_size=5 does not divide the image size 32 (allowed: 1, 2, 4",
        ),
        ({"model": {"heads": 3}}, "model.heads=3 does not divide model.dim=64"),
        (
            {"model": {"name": "vgg"}},
            "model.name: got 'vgg'; input should be 'vit', 'cnn', 'resnet', 'mlp' or 'airbench'",
        ),
        (
            {"model": {"preset": "vit-huge"}},
            "model.preset: got 'vit-huge'; known presets: tinyvit, vit-tiny, vit-small, vit-c100, vit-p2, "
            "cct-2-3x2, cct-4-3x2, cct-6-3x1, cct-6-3x2, cct-7-3x1, cct-7-3x2, vit-sl, cnn-small, resnet, "
            "mlp",
        ),
        (
            {"model": {"preset": "resnet", "name": "cnn"}},
            "model.name=cnn contradicts model.preset=resnet (a resnet); set model.preset to null",
        ),
        ({"model": {"preset": "vit-small", "heads": 5}}, "model.heads=5 does not divide model.dim=384"),
        ({"model": {"stem": "conv", "patch_size": 1}}, "model.stem=conv halves the image per conv stage"),
        ({"model": {"pos_embed": "sincos", "dim": 30, "heads": 3}}, "model.pos_embed=sincos needs model.dim"),
        ({"model": {"pool": "max"}}, "model.pool: got 'max'; input should be 'cls', 'mean' or 'seq'"),
        ({"model": {"stem": "spt", "patch_size": 1}}, "model.stem=spt shifts the image by half a patch"),
        (
            {"model": {"lsa": True, "patch_size": 32, "pool": "mean"}},
            "model.lsa=true (no token attends to itself) needs 2 tokens or more: model.patch_size=32 with "
            "model.pool=mean gives 1",
        ),
        (
            {"model": {"pool": "mean", "distillation": True}},
            "model.distillation=true needs model.pool=cls, not model.pool=mean",
        ),
        ({"teacher": {"preset": "vgg"}}, "teacher.preset: got 'vgg'; input should be 'tinyvit', 'vit-tiny'"),
        ({"teacher": {"epochs": 1}}, "teacher.warmup_epochs=1.0 must be smaller than teacher.epochs=1"),
        ({"model": {"drop_path": 1.0}}, "model.drop_path: got 1.0; allowed: >= 0.0 and < 1.0"),
        (
            {"model": {"stem": "spt", "whiten_stem": True}},
            "model.whiten_stem=true needs a conv to whiten: model.stem=patch or model.stem=conv",
        ),
        (
            {"model": {"preset": "airbench", "group_widths": [8] * 5}},
            "model.group_widths has 5 conv groups; a 32-pixel image is 31 pixels a side after the whitening",
        ),
        (
            {"train": {"flip": "sometimes"}},
            "train.flip: got 'sometimes'; input should be True, False or 'alternate'",
        ),
        (
            {"evaluate": {"tta": "all"}},
            "evaluate.tta: got 'all'; input should be 'none', 'flip' or 'flip_translate'",
        ),
        (
            {"model": {"name": "resnet", "widths": [8, 16]}},
            "model.widths has 2 stages but blocks 3",
        ),
        ({"data": {"dataset": "imagenet"}}, "data.dataset: got 'imagenet'; input should be 'cifar10-sample'"),
        ({"train": {"learning_rate": 0}}, "train.learning_rate: got 0; allowed: > 0.0"),
        ({"train": {"learning_rate": -1e-3}}, "train.learning_rate: got -0.001; allowed: > 0.0"),
        ({"train": {"epochs": 0}}, "train.epochs: got 0; allowed: > 0"),
        ({"train": {"batch_size": -8}}, "train.batch_size: got -8; allowed: > 0"),
        ({"train": {"epochs": "ten"}}, "train.epochs: Input should be a valid integer"),
        ({"train": {"epochs": 2, "warmup_epochs": 3}}, "train.warmup_epochs=3.0 must be smaller than"),
        (
            {"data": {"dataset": "mnist"}, "model": {"patch_size": 8}},
            "model.patch_size=8 does not divide the image size 28 (allowed: 1, 2, 4, 7, 14, 28)",
        ),
        (
            {"data": {"dataset": "mnist"}, "model": {"preset": "cnn-small", "channels": [8] * 5}},
            "at most 4 fit",
        ),
        (
            {"validate": {"pixel_mean_max": 50.0}},
            "validate.pixel_mean_min=90.0 is above validate.pixel_mean_max",
        ),
        ({"data": {"val_fraction": 1.5}}, "data.val_fraction: got 1.5; allowed: >= 0.0 and < 1.0"),
    ],
)
def test_bad_params_name_the_key(raw, expected):
    with pytest.raises(VitlabError) as error:
        parse_params(raw, origin="params.yaml")
    message = str(error.value)
    assert expected in message
    assert message.startswith("params.yaml: ")
    assert "\n" not in message


def test_a_preset_fills_the_keys_left_unset_and_explicit_keys_override_it():
    params = parse_params({"model": {"preset": "vit-c100", "depth": 8, "dim": None, "pool": "mean"}})
    m = params.model
    assert (m.name, m.dim, m.heads, m.mlp_dim, m.dropout) == ("vit", 192, 8, 256, 0.1)  # the preset's
    assert (m.depth, m.pool) == (8, "mean")  # set beside it
    assert params == Params.model_validate(params.model_dump(by_alias=True))  # the dump rebuilds it
    resnet = parse_params({"model": {"preset": "resnet", "blocks": [2, 2, 2], "dim": 999}}).model
    assert (resnet.name, resnet.widths, resnet.blocks) == ("resnet", (16, 32, 64), (2, 2, 2))


def test_the_committed_params_file_is_the_default_run_and_a_preset_replaces_its_model():
    committed = load_params(REPO / "params.yaml")
    assert committed == Params()  # the file spells out every default: it shows the run
    assert (committed.model.preset, committed.model.dim, committed.train.learning_rate) == (
        "tinyvit",
        64,
        2e-3,
    )
    raw = committed.model_dump(by_alias=True)
    # What `dvc exp run -S model.preset=vit-small` writes: only the preset changes in the file.
    small = parse_params(raw | {"model": raw["model"] | {"preset": "vit-small"}}).model
    assert (small.dim, small.depth, small.heads, small.mlp_dim) == (384, 7, 6, 1536)
    # ... and with -S model.depth=8 beside it, the changed key overrides the preset.
    deeper = parse_params(raw | {"model": raw["model"] | {"preset": "vit-small", "depth": 8}}).model
    assert (deeper.dim, deeper.depth) == (384, 8)
    # -S model.name=resnet alone: the named architecture, the default preset set aside.
    resnet = parse_params(raw | {"model": raw["model"] | {"name": "resnet"}}).model
    assert (resnet.preset, resnet.name, resnet.widths) == (None, "resnet", (16, 32, 64))


def test_null_model_keys_take_their_defaults():
    params = parse_params({"model": {"preset": None, "name": None, "dim": None, "channels": None}})
    assert params.model == parse_params({}).model.model_copy(update={"preset": None})
    assert (params.model.name, params.model.dim, params.model.channels) == ("vit", 64, (16, 32))


@pytest.mark.parametrize("flip", [True, False, "alternate"])
def test_train_flip_is_random_off_or_alternating(flip):
    assert parse_params({"train": {"flip": flip}}).train.flip == flip
    assert parse_params({"train": {"flip": None}}).train.flip is True  # CIFAR's default


def test_heads_need_not_divide_dim_with_an_explicit_head_dim():
    params = parse_params({"model": {"dim": 64, "heads": 3, "head_dim": 32}})
    assert params.model.head_dim == 32


def test_unreadable_files_are_one_line_errors(tmp_path):
    with pytest.raises(VitlabError, match="no such params file"):
        load_params(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: [unclosed\n")
    with pytest.raises(VitlabError, match="not valid YAML"):
        load_params(bad)
    bad.write_text("- a list\n")
    with pytest.raises(VitlabError, match="expected a mapping of sections"):
        load_params(bad)


def test_an_uppercase_md5_is_accepted_and_stored_lowercase(tmp_path):
    digest = "C58F30108F718F92721AF3B95E74349A"  # as PowerShell's Get-FileHash prints it
    params = parse_params({"data": {"source": "mirror.tar.gz", "md5": digest}})
    assert params.data.md5 == digest.lower()
    mixed = tmp_path / "params.yaml"
    mixed.write_text(f"data:\n  source: mirror.tar.gz\n  md5: {digest[:16]}{digest[16:].lower()}\n")
    assert load_params(mixed).data.md5 == digest.lower()
    assert params == Params.model_validate(params.model_dump(by_alias=True))  # the dump rebuilds it


@pytest.mark.parametrize(
    "md5",
    ["a" * 31, "a" * 33, "g" * 32, "C58F30108F718F92721AF3B95E74349 ", "0x" + "a" * 30, "a" * 32 + "\n"],
)
def test_a_malformed_md5_is_a_one_line_error_naming_the_key(md5):
    with pytest.raises(VitlabError) as error:
        parse_params({"data": {"source": "mirror.tar.gz", "md5": md5}}, origin="params.yaml")
    message = str(error.value)
    assert message.startswith("params.yaml: data.md5: ") and "\n" not in message


def test_params_yaml_states_the_default_models_size():
    from vitlab.models import build_model, count_parameters

    model = parse_params({}).model
    n = count_parameters(build_model(model.name, model.config(num_classes=10)))
    assert f"# vit ({n:,} parameters for 10 classes)" in (REPO / "params.yaml").read_text()


def test_null_augmentation_and_validation_keys_take_the_datasets_defaults():
    cifar, mnist = parse_params({}), parse_params({"data": {"dataset": "mnist"}})
    assert (cifar.train.flip, cifar.train.crop_padding) == (True, 4)  # CIFAR's: the default run's as before
    assert (mnist.train.flip, mnist.train.crop_padding) == (False, 2)  # digits are not mirrored
    assert (cifar.validate_.pixel_mean_min, cifar.validate_.pixel_std_max) == (90.0, 90.0)
    assert (mnist.validate_.pixel_mean_min, mnist.validate_.pixel_mean_max) == (20.0, 50.0)
    explicit = parse_params({"data": {"dataset": "mnist"}, "train": {"flip": True, "crop_padding": None}})
    assert (explicit.train.flip, explicit.train.crop_padding) == (True, 2)  # set: kept; null: the dataset's
    assert parse_params(mnist.model_dump(by_alias=True)) == mnist  # the resolved dump rebuilds it
    assert parse_params({"data": {"dataset": "mnist"}, "model": {"patch_size": 7}}).model.patch_size == 7


def test_a_source_without_md5_is_valid_params_the_download_decides():
    # Only the files inside tell whether the copy is official (vitlab.data.archive.prepare_dataset).
    assert parse_params({"data": {"source": "mirror.tar.gz"}}).data.md5 is None
