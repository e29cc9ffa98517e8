from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from fake_wandb import use_fake_run
from PIL import Image
from png_checks import assert_picture

from vitlab import compare
from vitlab.compare import RunRecord
from vitlab.errors import VitlabError
from vitlab.stats import Interval, bootstrap_ci, over_seeds, paired_bootstrap_diff

N = 200
LABELS = [f"class_{i % 10}" for i in range(N)]


def _correct(accuracy: float, seed: int) -> np.ndarray:
    flags = np.zeros(N, dtype=int)
    flags[np.random.default_rng(seed).choice(N, round(accuracy * N), replace=False)] = 1
    return flags


def _record(
    name: str, arch: str, patch: int | None, correct: np.ndarray, labels: list[str] = LABELS, **kw
) -> RunRecord:
    n = len(correct)
    predictions = pd.DataFrame(
        {
            "index": range(n),
            "label": labels[:n],
            "predicted": [label if c else "other" for label, c in zip(labels, correct, strict=False)],
            "confidence": 0.8,
            "correct": correct,
            "loss": np.where(correct == 1, 0.5, 2.0),
        }
    )
    epochs = kw.get("epochs", 3)
    history = pd.DataFrame(
        {
            "epoch": range(1, epochs + 1),
            "val_loss": np.linspace(2.0, 1.0, epochs),
            "val_accuracy": np.linspace(0.2, correct.mean(), epochs),
        }
    )
    return RunRecord(name, kw.get("model", arch), arch, patch, kw.get("params", 1000), predictions, history)


@pytest.fixture
def study() -> list[RunRecord]:
    return [
        _record("cnn", "cnn", None, _correct(0.55, 0), params=20_000),
        _record("p8", "vit", 8, _correct(0.40, 1)),
        _record("p2", "vit", 2, _correct(0.60, 2)),
        _record("p4", "vit", 4, _correct(0.50, 3)),
    ]


def test_rows_give_accuracy_loss_and_the_paired_difference_to_the_cnn(study):
    rows = compare.compare_runs(study, resamples=2000)
    assert [r.run for r in rows] == ["p2", "p4", "p8", "cnn"]  # ViTs by patch size, then the rest
    by_name = {r.run: r for r in rows}
    cnn = study[0].predictions["correct"].to_numpy(float)
    for record in study:
        row = by_name[record.name]
        correct = record.predictions["correct"].to_numpy(float)
        assert row.test_accuracy == bootstrap_ci(correct, resamples=2000)
        assert row.test_loss.estimate == pytest.approx(record.predictions["loss"].mean())
        assert (row.num_parameters, row.epochs, row.test_images) == (record.num_parameters, 3, N)
        if record.name == "cnn":
            assert row.vs_baseline is None
        else:
            assert row.vs_baseline == paired_bootstrap_diff(correct, cnn, resamples=2000)
    assert by_name["p2"].vs_baseline.estimate == pytest.approx(0.05)
    assert by_name["p8"].vs_baseline.high < 0  # 15 points worse on 200 images: resolved


def test_runs_are_paired_by_test_image_index_not_by_row_order(study):
    shuffled = study[1].predictions.sample(frac=1.0, random_state=0)
    reordered = [study[0], RunRecord(**{**study[1].__dict__, "predictions": shuffled}), *study[2:]]
    assert compare.compare_runs(reordered, resamples=500) == compare.compare_runs(study, resamples=500)


def test_runs_on_different_test_sets_are_refused(study):
    smaller = _record("small", "vit", 4, _correct(0.5, 4)[:150])
    with pytest.raises(VitlabError, match=r"runs 'cnn' and 'small' were evaluated on different test sets \("):
        compare.compare_runs([study[0], smaller])
    relabelled = _record("relabelled", "vit", 4, _correct(0.5, 4), labels=LABELS[1:] + LABELS[:1])
    with pytest.raises(VitlabError, match=f"the true labels of {N} of {N} images differ"):
        compare.compare_runs([study[0], relabelled])


def test_baseline_is_the_only_cnn_unless_named(study):
    assert compare.pick_baseline(study, None) == "cnn"
    assert compare.pick_baseline(study, "p4") == "p4"
    rows = compare.compare_runs(study, baseline="p4", resamples=500)
    assert [r.run for r in rows if r.vs_baseline is None] == ["p4"]
    with pytest.raises(VitlabError, match="baseline 'nope' is not among the runs"):
        compare.pick_baseline(study, "nope")
    two_cnns = [*study, _record("resnet", "resnet", None, _correct(0.7, 5))]
    with pytest.raises(VitlabError, match=r"several CNN runs \(cnn, resnet\): choose the baseline"):
        compare.pick_baseline(two_cnns, None)


def test_identical_runs_differ_by_exactly_zero_and_a_perfect_run_is_certain():
    # Constant per-image values have no BCa interval in scipy (NaN); every resample has the same mean.
    correct = _correct(0.55, 0)
    perfect = np.ones(N, dtype=int)
    records = [_record("cnn", "cnn", None, correct), _record("same", "vit", 4, correct)]
    records.append(_record("perfect", "vit", 2, perfect))
    rows = {r.run: r for r in compare.compare_runs(records, resamples=500)}
    assert rows["same"].vs_baseline == Interval(0.0, 0.0, 0.0)
    assert rows["perfect"].test_accuracy == Interval(1.0, 1.0, 1.0)
    assert rows["perfect"].test_loss == Interval(0.5, 0.5, 0.5)
    table = compare.table_markdown(list(rows.values()), "cnn", 500, 0)
    assert "| +0.0 pts [+0.0, +0.0] |" in table
    assert "| 100.0% [100.0, 100.0] |" in table


def test_without_a_cnn_there_are_no_differences(study):
    rows = compare.compare_runs(study[1:], resamples=500)
    assert all(r.vs_baseline is None for r in rows)
    assert "| p2 | vit | 2 |" in compare.table_markdown(rows, None, 500, 0)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda p: p.drop(columns=["loss"]), "p2: predictions lack the columns loss"),
        (lambda p: pd.concat([p, p.head(1)]), "p2: predictions must list each test image once"),
        (lambda p: p.head(0), "p2: predictions must list each test image once"),
    ],
)
def test_malformed_predictions_are_refused(change, message):
    record = _record("p2", "vit", 2, _correct(0.5, 0))
    broken = RunRecord(**{**record.__dict__, "predictions": change(record.predictions)})
    with pytest.raises(VitlabError, match=message):
        compare.compare_runs([broken])


def test_no_runs_or_duplicate_names_are_refused(study):
    with pytest.raises(VitlabError, match="no runs to compare"):
        compare.compare_runs([])
    with pytest.raises(VitlabError, match="run names must be unique"):
        compare.compare_runs([study[0], study[0]])


def test_write_comparison_writes_the_tables_and_plots(study, tmp_path):
    rows = compare.write_comparison(study, tmp_path / "out", resamples=1000, seed=1)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir()) == [
        "accuracy_vs_patch.png",
        "table.csv",
        "table.md",
        "val_curves.png",
    ]
    table = pd.read_csv(out / "table.csv")
    assert tuple(table.columns) == compare.TABLE_FIELDS
    assert table["run"].tolist() == ["p2", "p4", "p8", "cnn"]
    assert table["test_accuracy"].tolist() == pytest.approx([0.6, 0.5, 0.4, 0.55])
    assert table["accuracy_vs_baseline"].tolist()[:3] == pytest.approx([0.05, -0.05, -0.15])
    assert np.isnan(table["accuracy_vs_baseline"].iloc[3]) and (table["baseline"] == "cnn").all()
    assert (table["test_accuracy_low"] < table["test_accuracy"]).all()
    assert (table["test_accuracy"] < table["test_accuracy_high"]).all()
    assert table["patch_size"].tolist()[:3] == [2, 4, 8]

    markdown = (out / "table.md").read_text().splitlines()
    assert markdown[0].startswith("| run | model | patch | params | epochs | test loss (95% CI)")
    assert "vs cnn: Δ accuracy (95% CI)" in markdown[0]
    p2 = rows[0]
    assert markdown[2] == (
        f"| p2 | vit | 2 | 1,000 | 3 | 1.100 [{p2.test_loss.low:.3f}, {p2.test_loss.high:.3f}] "
        f"| 60.0% [{100 * p2.test_accuracy.low:.1f}, {100 * p2.test_accuracy.high:.1f}] "
        f"| +5.0 pts [{100 * p2.vs_baseline.low:+.1f}, {100 * p2.vs_baseline.high:+.1f}] |"
    )
    assert markdown[5] == "| cnn | cnn | – | 20,000 | 3 | 1.175 [" + markdown[5].split("[", 1)[1]
    assert markdown[5].endswith("| baseline |")
    assert "200 test images" in markdown[7] and "1,000 resamples, seed 1" in markdown[7]

    assert_picture(out / "accuracy_vs_patch.png", (700, 450))
    assert_picture(out / "val_curves.png", (1200, 450))


@pytest.mark.parametrize("columns", ["absent", "empty"])
def test_runs_without_a_validation_split_get_no_validation_curves(study, tmp_path, columns):
    """Runs trained on every training image (the full-data benchmark) have no validation history: no val_
    columns, or (the train stage's history.tsv, for dvc.yaml's plots) empty ones."""
    empty = {"absent": {}, "empty": {"val_loss": np.nan, "val_accuracy": np.nan}}[columns]
    no_val = [replace(r, history=r.history[["epoch"]].assign(**empty)) for r in study]
    compare.write_comparison(no_val, tmp_path, resamples=1000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["accuracy_vs_patch.png", "table.csv", "table.md"]


def test_parse_record_reads_the_files_a_run_leaves():
    predictions = "index,label,predicted,confidence,correct,loss\n0,cat,cat,0.9,1,0.1\n1,dog,cat,0.6,0,0.9\n"
    history = "epoch\tlr\ttrain_loss\tval_loss\tval_accuracy\n1\t0.001\t2.0\t1.9\t0.3\n"
    model = json.dumps({"arch": "vit", "config": {"patch_size": 4, "depth": 3}, "num_parameters": 1234})
    record = compare.parse_record("p4", predictions, history, model, {"model": {"name": "vit"}})
    assert (record.name, record.model, record.arch, record.patch_size, record.num_parameters) == (
        "p4",
        "vit",  # no preset has 3 blocks
        "vit",
        4,
        1234,
    )
    assert record.predictions["correct"].tolist() == [1, 0]
    assert record.history["val_accuracy"].tolist() == [0.3]


@pytest.mark.parametrize(
    ("arch", "config", "label"),
    [
        ("cnn", {"channels": [16, 32]}, "cnn-small"),
        ("cnn", {"channels": [8, 16]}, "cnn"),
        ("vit", {"patch_size": 2, "dim": 64, "depth": 6, "heads": 4, "mlp_dim": 128}, "tinyvit"),  # p2 study
        (
            "vit",
            {"patch_size": 2, "dim": 64, "depth": 10, "heads": 3, "head_dim": 32, "mlp_dim": 128},
            "vit-p2",
        ),
        ("resnet", {"num_classes": 100}, "resnet"),
    ],
)
def test_the_label_is_what_was_built_never_the_raw_preset_param(arch, config, label):
    """The default study's CNN runs `-S model.name=cnn` beside params.yaml's `model.preset: tinyvit`: it built
    a CNN, and the table, CSV and legend called it tinyvit."""
    predictions = "index,label,predicted,confidence,correct,loss\n0,cat,cat,0.9,1,0.1\n"
    model = json.dumps({"arch": arch, "config": config, "num_parameters": 9})
    params = {"model": {"preset": "tinyvit", "name": arch}}
    assert compare.parse_record("r", predictions, "epoch\n1\n", model, params).model == label


def test_study_variants_are_one_vit_per_patch_size_and_the_cnn():
    assert compare.study_variants([2, 8], "s") == {
        "s-p2": ["++model.preset=null", "model.name=vit", "model.patch_size=2"],
        "s-p8": ["++model.preset=null", "model.name=vit", "model.patch_size=8"],
        "s-cnn": ["++model.preset=null", "model.name=cnn"],
    }


def test_compare_command_errors_are_one_line(tmp_path, monkeypatch, capsys):
    from vitlab.cli import main

    assert main(["compare", "--run", "--patch-sizes", "2,x"]) == 2
    assert capsys.readouterr().err == "error: --patch-sizes: expected comma-separated integers, got '2,x'\n"
    assert main(["compare", "--run", "--patch-sizes", "2,5"]) == 2
    assert capsys.readouterr().err.startswith("error: --patch-sizes: model.patch_size=5 does not divide")
    monkeypatch.chdir(tmp_path)
    assert main(["compare"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("error: cannot list the DVC experiments of . (") and error.count("\n") == 1


# --- seeds: runs of one configuration that differ only in train.seed ---------------------------------------


def _seeds(group: str, arch: str, patch: int | None, accuracies: list[float], **kw) -> list[RunRecord]:
    """One run per accuracy, seeds 0, 1, ..., named GROUP-sSEED as seed_variants names them."""
    return [
        replace(_record(f"{group}-s{s}", arch, patch, _correct(a, 10 + s), **kw), seed=s, group=group)
        for s, a in enumerate(accuracies)
    ]


def test_a_configurations_seeds_make_one_row_with_mean_sd_and_per_seed_figures(tmp_path):
    vits = _seeds("p4", "vit", 4, [0.50, 0.55, 0.60])
    vits[1] = replace(vits[1], history=_record("x", "vit", 4, _correct(0.5, 0), epochs=5).history)
    cnns = _seeds("cnn", "cnn", None, [0.60, 0.60, 0.65], params=20_000)
    records = [*cnns, *vits]
    rows = compare.compare_runs(records, resamples=1000)
    assert [r.run for r in rows] == ["p4", "cnn"]
    p4, cnn = rows
    assert p4.accuracy_over_seeds.seeds == (0, 1, 2)
    assert p4.accuracy_over_seeds.values == pytest.approx((0.50, 0.55, 0.60))
    assert p4.accuracy_over_seeds.std == pytest.approx(0.05)  # ddof=1
    assert p4.vs_baseline_over_seeds.values == pytest.approx((-0.10, -0.05, -0.05))
    assert (p4.epochs, p4.test_images, cnn.num_parameters) == (5, N, 20_000)  # the most any seed trained

    def correct(group: list[RunRecord]) -> dict[int, np.ndarray]:
        return {r.seed: r.predictions["correct"].to_numpy(float) for r in group}

    expected = over_seeds(correct(vits), correct(cnns), resamples=1000)
    assert (p4.test_accuracy, p4.vs_baseline) == (expected.accuracy, expected.vs_baseline)
    assert p4.test_accuracy.estimate == pytest.approx(0.55)
    losses = np.mean([r.predictions["loss"] for r in vits], axis=0)
    assert p4.test_loss == bootstrap_ci(losses, resamples=1000)
    assert cnn.vs_baseline is None and cnn.vs_baseline_over_seeds is None
    assert cnn.accuracy_over_seeds.std == pytest.approx(np.std([0.6, 0.6, 0.65], ddof=1))

    compare.write_comparison(records, tmp_path, resamples=1000)
    table = pd.read_csv(tmp_path / "table.csv", dtype={"seeds": str})
    assert tuple(table.columns) == compare.TABLE_FIELDS + compare.SEED_FIELDS
    assert table["seeds"].tolist() == ["0 1 2", "0 1 2"]
    assert table["test_accuracy_std"].tolist() == pytest.approx(
        [0.05, np.std([0.6, 0.6, 0.65], ddof=1)],
        abs=1e-6,  # 6 decimals
    )
    assert table["test_accuracy_per_seed"][0] == "0.500000 0.550000 0.600000"
    assert table["accuracy_vs_baseline_per_seed"][0] == "-0.100000 -0.050000 -0.050000"
    assert np.isnan(table["accuracy_vs_baseline_std"][1])

    markdown = (tmp_path / "table.md").read_text().splitlines()
    assert markdown[0] == (
        "| run | model | patch | params | epochs | seeds | test loss (95% CI) | test accuracy, mean ± sd "
        "[95% CI] | per seed | vs cnn: Δ accuracy, mean ± sd [95% CI] | per seed |"
    )
    acc, diff = p4.test_accuracy, p4.vs_baseline
    assert markdown[2].endswith(
        f"| 55.0% ± 5.0 [{100 * acc.low:.1f}, {100 * acc.high:.1f}] | 50.0, 55.0, 60.0 "
        f"| -6.7 ± 2.9 pts [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}] | -10.0, -5.0, -5.0 |"
    )
    assert markdown[2].startswith("| p4 | vit | 4 | 1,000 | 5 | 0, 1, 2 | ")
    assert markdown[3].endswith("| 60.0, 60.0, 65.0 | baseline | – |")
    assert "sample standard deviation (ddof=1)" in markdown[5] and "test-set sampling only" in markdown[5]
    assert_picture(tmp_path / "accuracy_vs_patch.png", (700, 450))


def test_a_single_seed_group_gives_the_row_a_run_always_had(study, tmp_path):
    seeded = [replace(r, name=f"{r.name}-s7", seed=7, group=r.name) for r in study]
    rows = compare.compare_runs(seeded, resamples=500)
    assert rows == compare.compare_runs(study, resamples=500)
    assert all(r.accuracy_over_seeds is None and r.vs_baseline_over_seeds is None for r in rows)
    assert compare.table_csv(rows, "cnn").splitlines()[0] == ",".join(compare.TABLE_FIELDS)
    assert compare.table_markdown(rows, "cnn", 500, 0) == compare.table_markdown(
        compare.compare_runs(study, resamples=500), "cnn", 500, 0
    )


def test_runs_that_are_not_one_configurations_seeds_are_refused():
    twice = _seeds("p4", "vit", 4, [0.5, 0.6])
    twice[1] = replace(twice[1], seed=0)
    with pytest.raises(
        VitlabError, match=r"group 'p4': its runs need distinct train seeds, got p4-s0 \(seed 0\)"
    ):
        compare.compare_runs(twice)
    mixed = _seeds("p4", "vit", 4, [0.5, 0.6])
    mixed[1] = replace(mixed[1], patch_size=8)
    with pytest.raises(VitlabError, match=r"runs 'p4-s0' and 'p4-s1' differ in patch_size \(4 vs 8\)"):
        compare.compare_runs(mixed)


def test_seed_variants_name_each_run_and_group_of_reads_the_names_back():
    variants = compare.seed_variants(compare.study_variants([4], "s"), [0, 3])
    assert variants == {
        "s-p4-s0": ["++model.preset=null", "model.name=vit", "model.patch_size=4", "train.seed=0"],
        "s-p4-s3": ["++model.preset=null", "model.name=vit", "model.patch_size=4", "train.seed=3"],
        "s-cnn-s0": ["++model.preset=null", "model.name=cnn", "train.seed=0"],
        "s-cnn-s3": ["++model.preset=null", "model.name=cnn", "train.seed=3"],
    }
    assert compare.group_of("s-p4-s3", 3) == "s-p4"
    assert compare.group_of("s-p4-s3", 2) is None  # the name does not match its own seed: a run of its own
    assert compare.group_of("s-p4", None) is None
    predictions = "index,label,predicted,confidence,correct,loss\n0,cat,cat,0.9,1,0.1\n"
    model = json.dumps({"arch": "vit", "config": {"patch_size": 4}, "num_parameters": 1})
    record = compare.parse_record("s-p4-s3", predictions, "epoch\n1\n", model, {"train": {"seed": 3}})
    assert (record.seed, record.group, record.group_name) == (3, "s-p4", "s-p4")


def test_experiments_named_as_seeds_must_differ_only_in_the_seed(monkeypatch):
    import dvc.api

    texts = {
        "p.csv": "index,label,predicted,confidence,correct,loss\n0,cat,cat,0.9,1,0.1\n1,dog,cat,0.6,0,0.9\n",
        "h.tsv": "epoch\tval_loss\tval_accuracy\n1\t1.0\t0.5\n",
        "m.json": json.dumps({"arch": "vit", "config": {"patch_size": 4}, "num_parameters": 9}),
    }
    params = {
        "x-s0": {"model": {"dim": 64}, "train": {"seed": 0, "epochs": 3}},
        "x-s1": {"model": {"dim": 64}, "train": {"seed": 1, "epochs": 3}},
    }
    monkeypatch.setattr(compare, "_read", lambda path, rev, repo, mode="r": texts[path])
    monkeypatch.setattr(dvc.api, "params_show", lambda repo, rev: params[rev])
    run_files = compare.RunFiles("p.csv", "h.tsv", "m.json")
    records = compare.dvc_records(["x-s0", "x-s1"], run_files)
    assert [(r.group_name, r.seed) for r in records] == [("x", 0), ("x", 1)]
    params["x-s1"] = {"model": {"dim": 32}, "train": {"seed": 1, "epochs": 4}}
    with pytest.raises(
        VitlabError,
        match=r"'x-s0' and 'x-s1' are named as seeds of one configuration but "
        r"differ in model\.dim, train\.epochs besides train\.seed",
    ):
        compare.dvc_records(["x-s0", "x-s1"], run_files)


def test_compare_run_with_seeds_runs_every_variant_once_per_seed(monkeypatch):
    import vitlab.stages.compare
    from vitlab.cli import main

    commands = []
    monkeypatch.setattr(
        compare.subprocess,
        "run",
        lambda command, **_: commands.append(command) or subprocess.CompletedProcess(command, 0),
    )
    collected = {}
    monkeypatch.setattr(
        vitlab.stages.compare,
        "compare_experiments",
        lambda layout, names, baseline, resamples, seed, out: collected.update(
            names=names, baseline=baseline
        ),
    )
    assert main(["compare", "--run", "--patch-sizes", "4", "--seeds", "0,2", "-S", "train.epochs=5"]) == 0
    assert all(c[:7] == [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n"] for c in commands)
    names = ["study-p4-s0", "study-p4-s2", "study-cnn-s0", "study-cnn-s2"]
    assert [c[7] for c in commands] == names
    assert commands[1][8:] == [
        *[
            "-S",
            "train.epochs=5",
            "-S",
            "++model.preset=null",
            "-S",
            "model.name=vit",
            "-S",
            "model.patch_size=4",
            "-S",
            "train.seed=2",
        ]
    ]
    assert commands[2][8:] == [
        "-S",
        "train.epochs=5",
        "-S",
        "++model.preset=null",
        "-S",
        "model.name=cnn",
        "-S",
        "train.seed=0",
    ]
    assert not any("data.seed" in flag for c in commands for flag in c)  # one validation split for all seeds
    assert collected == {"names": names, "baseline": "study-cnn"}


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--seeds", "0,1"], "--seeds says which seeds --run trains: add --run"),
        (["--run", "--seeds", "0,x"], "--seeds: expected comma-separated integers, got '0,x'"),
        (["--run", "--seeds", "1,1"], "--seeds: expected distinct comma-separated integers, got '1,1'"),
        (["--run", "--seeds", "-1"], "--seeds: train.seed: got -1; allowed: >= 0"),
    ],
)
def test_bad_seeds_are_one_line_errors_before_any_run(argv, message, monkeypatch, capsys):
    from vitlab.cli import main

    monkeypatch.setattr(compare.subprocess, "run", lambda *_, **__: pytest.fail("a run started"))
    assert main(["compare", *argv]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {message}") and error.count("\n") == 1


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        # MNIST's 28 pixels take patch sizes 2 and 4 but not 8: the third run would have failed.
        (
            "data.dataset=mnist",
            "experiment t-p8 (-S data.dataset=mnist -S ++model.preset=null "
            "-S model.name=vit -S model.patch_size=8): "
            "model.patch_size=8 does not divide the image size 28",
        ),
        (
            "model.patch_szie=4",
            "experiment t-p2 (-S model.patch_szie=4 -S ++model.preset=null "
            "-S model.name=vit -S model.patch_size=2): "
            "Could not override 'model.patch_szie'",
        ),
        (
            "params.yaml:train.amp=yes",
            "experiment t-p2 (-S train.amp=yes -S ++model.preset=null "
            "-S model.name=vit -S model.patch_size=2): "
            "train.amp: got 'yes'; input should be 'auto', 'bf16' or 'off'",
        ),
    ],
)
def test_every_variant_is_validated_before_any_runs(setting, message, tmp_path, monkeypatch, capsys):
    from vitlab.cli import main

    (tmp_path / "params.yaml").write_text((Path(__file__).resolve().parents[1] / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(compare.subprocess, "run", lambda *_, **__: pytest.fail("a run started"))
    assert main(["compare", "--run", "--prefix", "t", "--set", setting]) == 2
    error = capsys.readouterr().err
    assert error.startswith(f"error: {message}") and error.count("\n") == 1
    (tmp_path / "params.yaml").write_text("train:\n  epochs: 3\n  epochs: 4\n")
    assert main(["compare", "--run", "--prefix", "t"]) == 2
    expected = "error: params.yaml: train.epochs is given twice, on lines 2 and 3\n"
    assert capsys.readouterr().err == expected


# --- through DVC: a fake pipeline whose one stage writes what the real evaluate and train stages write ----

FAKE_STAGE = """
import json, pathlib
from PIL import Image
from ruamel.yaml import YAML
model = YAML(typ="safe").load(open("params.yaml"))["model"]  # as DVC (and vitlab.params) read it
n, patch = 60, model["patch_size"] if model["name"] == "vit" else 0
hits = {"vit": 30 + patch, "cnn": 35}[model["name"]]
rows = [f"{i},c{i % 3},{'c%d' % (i % 3) if i < hits else 'x'},0.5,{int(i < hits)},{0.5 if i < hits else 2.0}"
        for i in range(n)]
pathlib.Path("reports/eval").mkdir(parents=True, exist_ok=True)
pathlib.Path("reports/train").mkdir(parents=True, exist_ok=True)
pathlib.Path("reports/eval/predictions.csv").write_text(
    "index,label,predicted,confidence,correct,loss\\n" + "\\n".join(rows) + "\\n")
pathlib.Path("reports/train/history.tsv").write_text("epoch\\tval_loss\\tval_accuracy\\n1\\t1.0\\t0.5\\n")
tinyvit = {"dim": 64, "depth": 6, "heads": 4, "mlp_dim": 128}
config = {"patch_size": patch, **tinyvit} if model["name"] == "vit" else {"channels": [8, 16]}
pathlib.Path("reports/eval/model.json").write_text(
    json.dumps({"arch": model["name"], "config": config, "num_parameters": 100 + patch}))
picture = "rollout.png" if model["name"] == "vit" else "gradcam.png"
pathlib.Path("reports/attention").mkdir(parents=True, exist_ok=True)
color = (255, 0, 0) if model["name"] == "vit" else (0, 0, 255)
Image.new("RGB", (4, 4), color).save(f"reports/attention/{picture}")
pathlib.Path("reports/attention/summary.json").write_text(
    json.dumps({"supported": True, "files": ["layer_0.png", picture]}))
"""

DVC_YAML = """
stages:
  fake:
    cmd: python fake_stage.py
    deps: [fake_stage.py]
    params: [model]
    outs:
      - reports/eval/predictions.csv: {cache: false}
      - reports/eval/model.json: {cache: false}
      - reports/train/history.tsv: {cache: false}
      - reports/attention: {cache: false}
"""


def _git(root: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=root, check=True, capture_output=True)


@pytest.mark.slow
def test_the_study_runs_as_dvc_experiments_and_is_collected_back(tmp_path, monkeypatch, capsys):
    from vitlab.cli import main

    root = tmp_path / "repo"
    root.mkdir()
    (root / "fake_stage.py").write_text(FAKE_STAGE)
    (root / "dvc.yaml").write_text(textwrap.dedent(DVC_YAML))
    params = "model:\n  preset: tinyvit\n  name: null\n  patch_size: null\n"
    (root / "params.yaml").write_text(params)
    _git(root, "init", "-q")
    _git(root, "config", "user.email", "tests@vitlab.invalid")
    _git(root, "config", "user.name", "vitlab tests")
    subprocess.run([sys.executable, "-m", "dvc", "init", "-q"], cwd=root, check=True)
    _git(root, "add", ".")
    _git(root, "commit", "-q", "-m", "fake pipeline")

    names = compare.run_study(compare.study_variants([2, 8], "t"), repo=root)
    assert names == ["t-p2", "t-p8", "t-cnn"]
    assert (root / "params.yaml").read_text() == params  # untouched
    assert sorted(compare.finished_experiments(root)) == sorted(names)
    with pytest.raises(VitlabError, match=r"dvc exp run -n t-cnn failed \(exit \d+\); its output is above"):
        compare.run_study(
            {"t-cnn": ["++model.preset=null", "model.name=cnn"]}, repo=root
        )  # the name is taken
    assert compare.run_study({"t-cnn": ["++model.preset=null", "model.name=cnn"]}, force=True, repo=root) == [
        "t-cnn"
    ]

    monkeypatch.chdir(root)
    run = use_fake_run(monkeypatch)
    assert main(["compare", "--resamples", "500"]) == 0  # all of this commit's experiments
    assert run.job_types == ["compare"]
    media = run.media()
    assert len(media["comparison"].data) == 3
    assert {"accuracy_vs_patch", "val_curves", "t-p2-rollout", "t-cnn-gradcam"} <= set(media)
    out = root / "reports" / "comparison"
    maps = out / "maps"
    assert sorted(p.name for p in maps.iterdir()) == [
        "t-cnn-gradcam.png",
        "t-p2-rollout.png",
        "t-p8-rollout.png",
    ]
    with Image.open(maps / "t-cnn-gradcam.png") as picture:
        assert picture.getpixel((0, 0)) == (0, 0, 255)  # the CNN's own picture
    printed = capsys.readouterr().out
    assert "| t-p2 | tinyvit | 2 | 102 | 1 |" in printed and "comparison of 3 runs" in printed
    table = pd.read_csv(out / "table.csv")
    assert table["run"].tolist() == ["t-p2", "t-p8", "t-cnn"]
    # Labels are what each run built: the CNN ran beside params.yaml's `model.preset: tinyvit`.
    assert table["model"].tolist() == ["tinyvit", "tinyvit", "cnn"]
    assert table["test_accuracy"].tolist() == pytest.approx([32 / 60, 38 / 60, 35 / 60])
    assert table["accuracy_vs_baseline"].tolist()[:2] == pytest.approx([-3 / 60, 3 / 60])
    # Nothing the comparison wrote is tracked: the workspace is clean, for DVC and for git.
    status = subprocess.run(["git", "status", "--porcelain", "--ignored=no"], cwd=root, capture_output=True)
    assert status.stdout == b""
    # A folder holding tracked files (a comparison committed before) is refused: a checkout restores them.
    (root / "reports" / "compare").mkdir()
    (root / "reports" / "compare" / "table.md").write_text("old\n")
    _git(root, "add", "reports/compare")
    _git(root, "commit", "-q", "-m", "a committed comparison")
    capsys.readouterr()
    assert main(["compare", "--out", "reports/compare"]) == 2
    assert "--out reports/compare: git tracks 1 files there" in capsys.readouterr().err
    assert (root / "reports" / "compare" / "table.md").read_text() == "old\n"

    assert main(["compare", "--exp", "t-p2", "--exp", "nope"]) == 2
    assert "experiment 'nope': cannot read reports/eval/predictions.csv" in capsys.readouterr().err
