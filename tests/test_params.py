import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vitlab.errors import VitlabError
from vitlab.params import Params, TrainParams, load_params, parse_params, read_yaml
from vitlab.recipes import RECIPES

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
        ({"model": {"heads": 3}}, "model.heads=3 does not divide model.dim=128"),  # cct-2-3x2's
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
            {"model": {"preset": "resnet", "widths": [8, 16]}},
            "model.widths has 2 stages but blocks 3",
        ),
        ({"data": {"dataset": "imagenet"}}, "data.dataset: got 'imagenet'; input should be 'cifar10-sample'"),
        ({"train": {"learning_rate": 0}}, "train.learning_rate: got 0; allowed: > 0.0"),
        ({"train": {"learning_rate": -1e-3}}, "train.learning_rate: got -0.001; allowed: > 0.0"),
        ({"train": {"epochs": 0}}, "train.epochs: got 0; allowed: > 0"),
        ({"train": {"batch_size": -8}}, "train.batch_size: got -8; allowed: > 0"),
        ({"train": {"epochs": "ten"}}, "train.epochs: got 'ten'; input should be a valid integer"),
        (
            {"train": {"time_budget_s": "1:30"}},
            "train.time_budget_s: got '1:30'; input should be a valid number",
        ),
        (
            {"data": {"source": 12345}},
            "data.source: got 12345; input should be a valid string (quote it: unquoted digits are a number",
        ),
        (
            {"data": {"md5": "0" * 32}},
            "data.md5 is set but data.source is null: data.md5 checks the archive at data.source",
        ),
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


def test_a_preset_fills_the_keys_left_null_and_any_key_set_beside_it_wins():
    params = parse_params({"model": {"preset": "vit-c100", "depth": 8, "dim": None, "pool": "mean"}})
    m = params.model
    assert (m.name, m.dim, m.heads, m.mlp_dim, m.dropout) == ("vit", 192, 8, 256, 0.1)  # the preset's
    assert (m.depth, m.pool) == (8, "mean")  # set beside it
    assert (m.channels, m.widths) == (None, None)  # keys a vit does not read
    assert params == Params.model_validate(params.model_dump(by_alias=True))  # the dump rebuilds it
    # A key set to the default run's value still wins: vit-small at dim 64 is not vit-small's dim 384.
    small = parse_params({"model": {"preset": "vit-small", "dim": 64, "heads": 4}}).model
    assert (small.dim, small.heads, small.depth, small.mlp_dim) == (64, 4, 7, 1536)
    resnet = parse_params({"model": {"preset": "resnet", "blocks": [2, 2, 2]}}).model
    assert (resnet.name, resnet.widths, resnet.blocks, resnet.dim) == (
        "resnet",
        (16, 32, 64),
        (2, 2, 2),
        None,
    )


@pytest.mark.parametrize(
    ("model", "expected"),
    [
        (
            {"preset": "resnet", "dim": 999},
            "model.dim=999: not read by a resnet (model.preset=resnet); set it to null or remove it",
        ),
        (
            {"preset": None, "name": "cnn", "depth": 2, "hidden": [8]},
            "model.depth=2, model.hidden=[8]: not read by a cnn (model.preset=None)",
        ),
        (
            {"preset": "tinyvit", "name": "cnn"},
            "model.name=cnn contradicts model.preset=tinyvit (a vit); set model.preset to null",
        ),
    ],
)
def test_a_key_the_architecture_does_not_read_or_another_architecture_is_an_error(model, expected):
    with pytest.raises(VitlabError) as error:
        parse_params({"model": model})
    assert str(error.value).startswith(f"params: {expected}")


def test_the_committed_params_file_is_the_default_run_and_a_preset_replaces_its_model():
    committed = load_params(REPO / "params.yaml")
    assert committed == Params()  # the file holds the defaults: it is the default run
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    assert raw["model"]["preset"] == Params().model.preset
    assert all(value is None for key, value in raw["model"].items() if key != "preset")  # null unless set
    # What `dvc exp run -S model.preset=vit-small` writes: only the preset changes in the file.
    small = parse_params(raw | {"model": raw["model"] | {"preset": "vit-small"}}).model
    assert (small.dim, small.depth, small.heads, small.mlp_dim) == (384, 7, 6, 1536)
    # ... and with -S model.depth=8 beside it, the key set overrides the preset.
    deeper = parse_params(raw | {"model": raw["model"] | {"preset": "vit-small", "depth": 8}}).model
    assert (deeper.dim, deeper.depth) == (384, 8)
    # -S model.preset=null -S model.name=resnet: the named architecture with its own defaults.
    resnet = parse_params(raw | {"model": raw["model"] | {"preset": None, "name": "resnet"}}).model
    assert (resnet.preset, resnet.name, resnet.widths) == (None, "resnet", (16, 32, 64))


def test_null_model_keys_take_their_defaults():
    params = parse_params({"model": {"preset": None, "name": None, "dim": None, "channels": None}})
    assert (params.model.name, params.model.dim, params.model.depth, params.model.channels) == (
        "vit",
        64,
        6,
        None,
    )
    cnn = parse_params({"model": {"preset": None, "name": "cnn"}}).model
    assert (cnn.channels, cnn.dim) == ((16, 32), None)
    assert parse_params({"model": {"name": "cnn"}}).model == cnn  # a name and no preset key: no preset


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
    assert f"# vit ({model.preset}: {n:,} parameters for 10 classes)" in (REPO / "params.yaml").read_text()


def test_null_augmentation_and_validation_keys_take_the_datasets_defaults():
    cifar, mnist = parse_params({}), parse_params({"data": {"dataset": "mnist"}})
    assert (cifar.train.flip, cifar.train.crop_padding) == (True, 4)  # CIFAR's: the default run's as before
    assert (mnist.train.flip, mnist.train.crop_padding) == (False, 2)  # digits are not mirrored
    assert (cifar.validate_.pixel_mean_min, cifar.validate_.pixel_std_max) == (90.0, 90.0)
    assert (mnist.validate_.pixel_mean_min, mnist.validate_.pixel_mean_max) == (20.0, 50.0)
    explicit = parse_params({"data": {"dataset": "mnist"}, "train": {"flip": True, "crop_padding": None}})
    assert (explicit.train.flip, explicit.train.crop_padding) == (True, 2)  # set: kept; null: the dataset's
    assert parse_params(mnist.model_dump(by_alias=True)) == mnist  # the resolved dump rebuilds it
    assert (
        parse_params(
            {"data": {"dataset": "mnist"}, "model": {"preset": "tinyvit", "patch_size": 7}}
        ).model.patch_size
        == 7
    )


def test_a_source_without_md5_is_valid_params_the_download_decides():
    # Only the files inside tell whether the copy is official (vitlab.data.archive.prepare_dataset).
    assert parse_params({"data": {"source": "mirror.tar.gz"}}).data.md5 is None


def test_expected_counts_apply_without_a_source():
    # The validate stage checks them against the official data too (only data.md5 needs data.source).
    assert parse_params({"data": {"expected_test": 123}}).data.expected_test == 123


# --- params.yaml is read as DVC reads it: YAML 1.2 ---------------------------------------------------------

# YAML 1.1 (PyYAML) reads each of these differently from DVC: booleans, sexagesimal, octal.
YAML_TRAPS = """\
off: off
no: no
on: on
yes: yes
time: 1:30
octal: 010
digits: 012345
quoted: '012345'
exponent: 1e3
"""


def test_params_files_are_read_as_dvc_reads_them(tmp_path):
    from dvc.utils.serialize import parse_yaml

    path = tmp_path / "traps.yaml"
    path.write_text(YAML_TRAPS)
    read = read_yaml(path)
    assert read == parse_yaml(YAML_TRAPS, str(path))
    assert read == {
        "off": "off",
        "no": "no",
        "on": "on",
        "yes": "yes",
        "time": "1:30",
        "octal": 10,
        "digits": 12345,
        "quoted": "012345",
        "exponent": 1000.0,
    }
    path.write_text("train:\n  amp: off\n  epochs: 010\n")
    train = load_params(path).train
    assert (train.amp, train.epochs) == ("off", 10)  # the choice params.yaml lists; ten epochs, not eight


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "train:\n  learning_rate: 0.002\n  epochs: 3\n  learning_rate: 0.01\n",
            "train.learning_rate is given twice, on lines 2 and 4",
        ),
        ("data:\n  seed: 0\nmodel:\n  dim: 8\ndata:\n  seed: 1\n", "data is given twice, on lines 1 and 5"),
        ("model:\n  channels: [{a: 1, a: 2}]\n", "model.channels[0].a is given twice, on lines 2 and 2"),
        # Equal only as numbers: ruamel's words, with the second one's line.
        ("0x1: 2\n1: 3\n", 'found duplicate key "1" with value "3" (original value: "2") on line 2'),
    ],
)
def test_a_key_given_twice_is_refused_naming_the_key_and_both_lines(tmp_path, text, expected):
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(VitlabError) as error:
        load_params(path)
    assert str(error.value) == f"{path}: {expected}"


def test_the_commands_that_read_params_refuse_a_duplicate_key(tmp_path, monkeypatch, capsys):
    from vitlab.cli import main

    (tmp_path / "params.yaml").write_text("train:\n  epochs: 3\n  epochs: 4\n")
    monkeypatch.chdir(tmp_path)
    for argv in (["params"], ["stage", "train"], ["stage", "download"]):
        assert main(argv) == 2
        assert (
            capsys.readouterr().err == "error: params.yaml: train.epochs is given twice, on lines 2 and 3\n"
        )


def _dvc(root: Path, *args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"DVC_NO_ANALYTICS": "1"}
    return subprocess.run(
        [sys.executable, "-m", "dvc", *args], cwd=root, env=env, check=True, capture_output=True, text=True
    )


@pytest.mark.slow
def test_what_dvc_exp_run_sets_means_the_same_to_vitlab(tmp_path):
    root = tmp_path / "repo"
    root.mkdir()
    (root / "params.yaml").write_text((REPO / "params.yaml").read_text())
    # A trivial stage: only DVC's reading and writing of params.yaml is under test, not the pipeline.
    (root / "dvc.yaml").write_text("stages:\n  noop:\n    cmd: python -c pass\n    params: [data, train]\n")
    for args in (["init", "-q"], ["config", "user.email", "t@vitlab.invalid"], ["config", "user.name", "t"]):
        subprocess.run(["git", *args], cwd=root, check=True)
    _dvc(root, "init", "-q")
    subprocess.run(["git", "add", "."], cwd=root, check=True)
    subprocess.run(["git", "commit", "-qm", "params"], cwd=root, check=True)
    settings = ["train.amp=off", "data.source=1:30", "data.md5=" + "0" * 32, "data.expected_test=010"]
    _dvc(root, "exp", "run", *(arg for s in settings for arg in ("-S", s)))  # applied to the workspace
    shown = json.loads(_dvc(root, "params", "diff", "--json").stdout)["params.yaml"]
    read = read_yaml(root / "params.yaml")
    assert {key: read[key.split(".")[0]][key.split(".")[1]] for key in shown} == {
        key: change["new"] for key, change in shown.items()
    }
    data, train = load_params(root / "params.yaml").data, load_params(root / "params.yaml").train
    assert (train.amp, data.source, data.md5) == ("off", "1:30", "0" * 32)


def test_params_files_are_read_by_the_one_loader_only():
    # PyYAML (YAML 1.1) anywhere in the code would read some values differently from DVC and read_yaml.
    code = [REPO / "pipeline", REPO / "benchmarks", REPO / "tools", REPO / "src"]
    files = {path.relative_to(REPO).as_posix(): path.read_text() for f in code for path in f.rglob("*.py")}

    def importing(module: str) -> list[str]:
        pattern = rf"^\s*(import {module}\b|from {module}\b)"
        return sorted(name for name, text in files.items() if re.search(pattern, text, re.MULTILINE))

    assert importing("yaml") == []
    assert importing("ruamel") == ["src/vitlab/params.py"]


def test_a_recipe_fills_the_train_keys_left_null_and_any_key_set_beside_it_wins():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    # What `dvc exp run -S train.recipe=vit-budget -S train.time_budget_s=600` writes.
    train = raw["train"] | {"recipe": "vit-budget", "time_budget_s": 600}
    budget = parse_params(raw | {"train": train}).train
    assert (budget.batch_size, budget.learning_rate, budget.epochs) == (32, 1e-3, None)
    assert (budget.warmup_fraction, budget.warmup_epochs, budget.weight_decay) == (0.05, None, 0.05)
    assert parse_params(raw | {"train": train | {"batch_size": 128}}).train.batch_size == 128
    # A warmup in epochs set beside it replaces the recipe's share (and needs a number of epochs).
    epochs = parse_params(raw | {"train": train | {"epochs": 30, "warmup_epochs": 2}}).train
    assert (epochs.epochs, epochs.warmup_epochs, epochs.warmup_fraction) == (30, 2, None)
    params = parse_params(raw | {"train": train})
    assert params == Params.model_validate(params.model_dump(by_alias=True))  # the dump rebuilds it
    # -S train.recipe=null: no recipe (named null, not the default's name) and the defaults.
    plain = parse_params(raw | {"train": raw["train"] | {"recipe": None}}).train
    assert (plain.recipe, plain.batch_size, plain.learning_rate, plain.epochs) == (None, 128, 2e-3, 40)


def test_the_airbench_readme_row_is_three_keys_on_the_committed_params():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    # What `dvc exp run -S model.preset=airbench -S train.recipe=airbench -S evaluate.tta=flip_translate`
    # writes, on the full CIFAR-10 (data.dataset=cifar10).
    params = parse_params(
        raw
        | {"model": raw["model"] | {"preset": "airbench"}}
        | {"train": raw["train"] | {"recipe": "airbench"}}
        | {"evaluate": raw["evaluate"] | {"tta": "flip_translate"}}
        | {"data": raw["data"] | {"dataset": "cifar10"}}
    )
    assert params.model.name == "airbench" and params.evaluate.tta == "flip_translate"
    train = params.train
    assert (train.epochs, train.batch_size, train.crop_padding, train.flip) == (8, 2000, 2, "alternate")
    assert (train.muon_filters, train.bias_lr_scale, train.whiten_bias_epochs) == (True, 64.0, 3)


def test_a_recipes_crop_and_flip_win_over_the_datasets_but_digits_are_never_flipped_by_one():
    raw = yaml.safe_load((REPO / "params.yaml").read_text())

    def train(dataset, **keys):
        return parse_params(
            raw | {"data": raw["data"] | {"dataset": dataset}} | {"train": raw["train"] | keys}
        ).train

    assert (train("cifar10", recipe="vit-budget-plus", time_budget_s=60).flip) == "alternate"
    assert train("mnist", recipe="vit-budget-plus", time_budget_s=60).flip is False
    assert train("mnist", recipe="vit-budget-plus", time_budget_s=60, flip="alternate").flip == "alternate"
    budget = train("cifar10", recipe="vit-budget", time_budget_s=60)
    assert (budget.flip, budget.crop_padding) == (True, 4)
    assert train("cifar10", recipe="airbench", crop_padding=3).crop_padding == 3  # a key set wins


@pytest.mark.parametrize("name", list(RECIPES))
def test_every_recipe_is_valid_train_keys_for_a_time_budget(name):
    assert set(RECIPES[name].train) <= set(TrainParams.model_fields) - {"recipe", "device", "seed", "resume"}
    params = TrainParams(recipe=name, time_budget_s=60)
    assert all(getattr(params, key) == value for key, value in RECIPES[name].train.items())


@pytest.mark.parametrize(
    ("train", "expected"),
    [
        (
            {"recipe": "fast"},
            "train.recipe: got 'fast'; known recipes: vit-sample, cnn-budget, resnet-budget",
        ),
        (
            {"recipe": "vit-budget"},
            "train.epochs=null trains until a time budget ends: set train.time_budget_s",
        ),
        (
            {"warmup_epochs": 1, "warmup_fraction": 0.1},
            "train.warmup_epochs and train.warmup_fraction are both set: set one",
        ),
        (
            {"recipe": "vit-budget", "time_budget_s": 60, "warmup_epochs": 1},
            "train.epochs=null: warm up over a share of the time budget, train.warmup_fraction",
        ),
        ({"warmup_fraction": 1.0}, "train.warmup_fraction: got 1.0; allowed: >= 0.0 and < 1.0"),
    ],
)
def test_bad_recipes_and_warmups_are_one_line_errors(train, expected):
    with pytest.raises(VitlabError) as error:
        parse_params({"train": train})
    assert expected in str(error.value) and "\n" not in str(error.value)
