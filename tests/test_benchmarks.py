"""The training benchmarks' own arithmetic, and smoke runs of them (their figures are not tested: speed
belongs to the benchmark, never to a unit test)."""

import json
import os
import re
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pytest
from benchmark_modules import BENCHMARKS, load_benchmark
from cifar_fakes import make_dataset

from vitlab.models import build_model, preset_config
from vitlab.stats import over_seeds

bench = load_benchmark("bench_train_throughput")
tta = load_benchmark("time_to_accuracy")


def test_step_flops_counts_every_matrix_product_of_forward_and_backward():
    arch, config = preset_config("mlp")  # 3072 -> 512 -> 256 -> 10: three Linear layers
    step = bench.trainer(build_model(arch, config), 10)
    forward = 2 * bench.BATCH * (3072 * 512 + 512 * 256 + 256 * 10)
    # Backward: a gradient for every weight, and for every layer's input but the images'.
    backward = 2 * forward - 2 * bench.BATCH * 3072 * 512
    assert bench.step_flops(step) == forward + backward


def test_the_recorder_replays_exactly_the_steps_matrix_products():
    arch, config = preset_config("mlp")
    step = bench.trainer(build_model(arch, config), 10)
    with bench.MatrixProductRecorder() as recorder:
        step()
    ops = [str(func) for func, _ in recorder.calls]
    # Forward: three Linear layers; backward: five products (no gradient for the images).
    assert ops == ["aten.addmm.default"] * 3 + ["aten.mm.default"] * 5
    (_, first, weight), _ = recorder.calls[0][1]
    assert first.shape == (bench.BATCH, 3072) and weight.shape == (3072, 512)
    assert weight.stride == (1, 3072)  # the transposed weight, as Linear passes it
    assert bench.matrix_products_alone_s(step) > 0


def test_vitlab_and_timm_do_the_same_matrix_work_and_the_seed_style_vit_p2_more():
    for preset in ("tinyvit", "vit-p2"):
        arch, config = preset_config(preset, depth=2)
        config |= {"num_classes": 10}
        engines = {
            "vitlab": build_model(arch, config),
            "timm": bench.timm_vit(config),
            "seed-style": bench.SeedViT(config),
        }
        flops = {name: bench.step_flops(bench.trainer(model, 10)) for name, model in engines.items()}
        assert flops["vitlab"] == flops["timm"] > 0, preset
        if preset == "tinyvit":
            assert flops["seed-style"] == flops["vitlab"]
    # nn.MultiheadAttention cannot give 3 heads of 32 to a width of 64: it maps into 96 and back.
    assert flops["seed-style"] > flops["vitlab"]


def test_the_benchmark_runs_and_prints_both_tables():
    run = subprocess.run(
        [
            sys.executable,
            BENCHMARKS / "bench_train_throughput.py",
            "--quick",
            "--presets",
            "tinyvit",
            "--all-presets",
            "cnn-small",
            "mlp",
        ],
        capture_output=True,
        text=True,
        check=True,
    )
    rows = [line for line in run.stdout.splitlines() if line.startswith("| ") and "---" not in line]
    assert [row.split(" | ")[0] for row in rows] == [
        *["| preset", "| tinyvit", "| tinyvit", "| tinyvit"],
        *["| preset", "| tinyvit"],
        *["| preset (vitlab)", "| cnn-small", "| mlp"],
    ]
    assert [row.split(" | ")[1] for row in rows[1:4]] == ["vitlab", "timm", "seed-style"]
    assert all(re.search(r"\| [\d,]+ \(\d+%\) \|", row) for row in rows[1:4])  # GFLOP/s (share of peak)
    assert re.fullmatch(r"\| tinyvit( \| [\d,]+){3} \| \d+\.\d\dx \|", rows[5])  # the ceiling
    assert rows[7].startswith("| cnn-small | 25,578 | ") and rows[8].startswith("| mlp | 1,707,274 | ")


def test_the_under_load_benchmark_runs_every_configuration_idle_and_loaded():
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "bench_under_load.py"), "--quick"],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if line.startswith("| ") and "---" not in line][1:]
    assert [row.split(" | ")[0].strip("| ") for row in rows] == list(
        load_benchmark("bench_under_load").CONFIGS
    )
    assert "| unset, GOMP_SPINCOUNT=300000 |" in rows[0] and "| PASSIVE |" in rows[1]
    assert re.search(r"after / before: idle [\d.]+x, with 1 busy core\(s\) [\d.]+x", done.stdout)


@pytest.mark.parametrize(
    ("env", "expected"),
    [({}, "PASSIVE"), ({"OMP_WAIT_POLICY": "active"}, "active"), ({"GOMP_SPINCOUNT": "1000"}, None)],
)
def test_an_entry_point_makes_openmp_threads_sleep_unless_the_user_chose(env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    probe = "import os, vitlab.cpu; vitlab.cpu.prepare_process(); print(os.environ.get('OMP_WAIT_POLICY'))"
    done = subprocess.run([sys.executable, "-c", probe], env=base | env, capture_output=True, text=True)
    assert done.stdout.strip() == str(expected)


def test_the_committed_time_to_accuracy_table_is_made_again_from_its_rows():
    """Rows measured before --seeds (one seed, no per-image results) make the table the docs quote."""
    results = BENCHMARKS / "results" / "time_to_accuracy"
    saved = json.loads(results.with_suffix(".json").read_text())
    assert tta.markdown(saved["rows"], saved["settings"]) == results.with_suffix(".md").read_text()


def _row(model: str, seed: int, hits: int, n: int = 20, **extra) -> dict:
    """A results row whose first ``hits`` of ``n`` test images are right."""
    correct = "1" * hits + "0" * (n - hits)
    row = {"model": model, "recipe": "vitlab", "budget_s": 60.0, "seed": seed, "epochs": 2.0 + seed}
    return row | {"test_accuracy": hits / n, "train_s": 60.0, "parameters": 1, "correct": correct} | extra


def test_the_time_to_accuracy_table_gives_seeds_mean_sd_interval_and_the_paired_difference_to_resnet():
    settings = {"train_images": 100, "test_images": 20, "threads": 1, "hardware": "cpu", "torch": "2"}
    rows = [_row("resnet", 0, 12), _row("resnet", 1, 14), _row("tinyvit", 1, 11), _row("tinyvit", 0, 10)]
    old = {
        k: v for k, v in _row("cnn-small", 0, 16).items() if k not in ("seed", "correct")
    }  # before --seeds
    rows += [old, _row("cnn-small", 1, 18)]
    lines = tta.markdown(rows, settings).splitlines()
    assert lines[0].startswith(
        "Test accuracy on 20 CIFAR-10 test images after training on 100 for a wall-clock budget (epochs done "
        "in brackets; mean ± standard deviation over training seeds, ddof=1); cpu, torch 2."
    )
    # Grid: mean over seeds ± sd (ddof=1: 60% and 70% -> 7.1 points), mean epochs.
    # Grid: a line per (model, recipe) that ran, here only vitlab's.
    assert lines[4] == "| resnet | vitlab | 65.0% ± 7.1 (2.5) |"
    assert lines[5] == "| tinyvit | vitlab | 52.5% ± 3.5 (2.5) |"
    assert lines[6] == "| cnn-small | vitlab | 85.0% ± 7.1 (2.5) |"  # the old row is seed 0
    assert lines[7] == ""
    detail = [line for line in lines if line.startswith("| ") and " min | " in line]
    # cnn-small's seed 0 has no per-image results: no interval for its cell, so no detail line.
    assert [line.split(" | ")[0] for line in detail] == ["| resnet", "| tinyvit"]
    bits = {
        m: {r["seed"]: np.array([int(c) for c in r["correct"]]) for r in rows[i : i + 2]}
        for m, i in (("r", 0), ("t", 2))
    }
    stats = over_seeds(bits["t"], bits["r"])
    acc, diff = stats.accuracy, stats.vs_baseline
    assert detail[1] == (
        f"| tinyvit | vitlab | 1 min | 0, 1 | 52.5% ± 3.5 [{100 * acc.low:.1f}, {100 * acc.high:.1f}] "
        f"| 50.0, 55.0 | -12.5 ± 3.5 pts [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}] | -10.0, -15.0 |"
    )
    assert detail[0].endswith("| 60.0, 70.0 | baseline | – |")
    assert "sample standard deviation, ddof=1" in lines[-1] and "test-set sampling" in lines[-1]


def test_recipes_for_any_preset_and_changes_to_try():
    assert [tta.recipe_of(name) for name in ("resnet", "vit-p2", "cnn-small")] == [
        "resnet-budget",
        "vit-budget",
        "cnn-budget",
    ]
    assert tta.recipe_of("vit-p2", tta.LONG_BUDGET_S) == "vit-budget-randaugment"
    assert tta.parse_changes(["batch_size=32", "learning_rate=5e-4"]) == {
        "batch_size": 32,
        "learning_rate": 5e-4,
    }
    row = _row("tinyvit", 0, 10, changes={"learning_rate": 5e-4, "batch_size": 32})
    assert tta.recipe_label(row) == "vitlab batch_size=32 learning_rate=0.0005"
    assert tta.run_key(row) == ("tinyvit", "vitlab batch_size=32 learning_rate=0.0005", 60.0, 0)
    for bad in (["batch_size"], ["nope=1"], ["batch_size=0"]):
        with pytest.raises(SystemExit, match="error: --set"):
            tta.parse_changes(bad)


class _Unreadable:
    """Stands for the test split: reading anything of it fails the test."""

    def __getattr__(self, name: str):
        raise AssertionError(f"the test split was read ({name})")

    def __len__(self) -> int:
        raise AssertionError("the test split was read (len)")


def test_select_mode_trains_every_seed_and_scores_held_out_training_images_never_the_test_set(
    tmp_path, monkeypatch, capsys
):
    data = replace(make_dataset(n_train=40, n_test=20), test=_Unreadable())
    monkeypatch.setattr(tta, "load_archive", lambda *args: data)
    seeds, real_train = [], tta.train
    monkeypatch.setattr(tta, "train", lambda *args: seeds.append(args[-1].seed) or real_train(*args))
    out = tmp_path / "select"
    argv = ["--select", "--models", "cnn-small", "resnet", "--recipes", "vitlab", "--budgets", "0.05"]
    argv += ["--seeds", "0", "1", "--threads", "1", "--out", str(out)]
    assert tta.main(argv) == 0
    assert seeds == [0, 1, 0, 1]
    saved = json.loads(out.with_suffix(".json").read_text())
    assert saved["settings"]["train_images"] == 36 and saved["settings"]["val_images"] == 4  # 10% held out
    assert (saved["settings"]["val_fraction"], saved["settings"]["split_seed"]) == (0.1, 0)
    rows = saved["rows"]
    assert [(r["model"], r["seed"]) for r in rows] == [
        ("cnn-small", 0),
        ("cnn-small", 1),
        ("resnet", 0),
        ("resnet", 1),
    ]
    for row in rows:
        assert "test_accuracy" not in row and len(row["correct"]) == 4
        assert row["val_accuracy"] == pytest.approx(row["correct"].count("1") / 4, abs=1e-4)
    table = out.with_suffix(".md").read_text()
    assert table.startswith(
        "Validation accuracy on 4 CIFAR-10 training images held out at random (10%, split"
    )
    assert "| resnet | vitlab | 0.05 s | 0, 1 |" in table and "| validation accuracy, mean ± sd" in table
    assert "over the validation images" in table and "validation-set sampling" in table
    assert "test-set" not in table
    # Started again, it finds every row done and trains nothing.
    monkeypatch.setattr(tta, "train", lambda *args: pytest.fail("trained a row that was done"))
    assert tta.main(argv) == 0
    assert json.loads(out.with_suffix(".json").read_text())["rows"] == rows


SHARED = BENCHMARKS.parents[1] / "shared" / "data"


@pytest.mark.slow
def test_the_full_data_benchmark_keeps_every_run_and_makes_the_study_table(tmp_path):
    """A smoke run on the CIFAR-10 subset (the full archive takes the same path, 10x longer to extract); a
    second call finds every run done and trains nothing."""
    subset = SHARED / "cifar-10-subset-python.tar.gz"
    if not subset.exists():
        pytest.skip(f"{subset} not found (the real CIFAR-10 subset; see ../shared/data/README.md)")
    full_data = load_benchmark("full_data")
    command = [sys.executable, str(BENCHMARKS / "full_data.py"), "--quick", "--budgets", "1"]
    command += ["--data", str(subset), "--md5", "91ae8aa50275d155e103205bccbd1642"]
    command += ["--runs", *full_data.STUDY, "--out", str(tmp_path / "full"), "--study-dir", str(tmp_path)]
    first = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stderr
    rows = json.loads((tmp_path / "full.json").read_text())["rows"]
    assert [r["run"] for r in rows] == list(full_data.STUDY)
    for row in rows:
        assert row["test_accuracy_low"] <= row["test_accuracy"] <= row["test_accuracy_high"]
        assert len(row["predicted"]) == len(row["losses"]) == 512 and row["epochs"] > 0
        assert row["train_params"]["time_budget_s"] == 1
    table = (tmp_path / "study-1s" / "table.md").read_text()
    assert "vs cnn-small: Δ accuracy (95% CI)" in table and "| vit-p2 | tinyvit | 2 |" in table
    assert (tmp_path / "full.md").read_text() in first.stdout
    assert "1 s, paired differences in test accuracy" in first.stdout
    assert "| run | − cnn-small |" in first.stdout
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and " ..." not in again.stderr  # nothing trained the second time
    assert json.loads((tmp_path / "full.json").read_text())["rows"] == rows


def test_the_full_data_tables_paired_differences_are_each_runs_against_the_baselines():
    """Per limit, each run minus cnn-small and resnet in points, from the rows' predictions: 3 test images,
    resnet right on all, cnn-small on 2, tinyvit on 1; a limit without a baseline gets no table."""
    full_data = load_benchmark("full_data")
    labels = np.array([0, 1, 2])
    rows = [
        {"run": "cnn-small", "budget_s": 60.0, "max_epochs": None, "predicted": "011"},
        {"run": "resnet", "budget_s": 60.0, "max_epochs": None, "predicted": "012"},
        {"run": "tinyvit", "budget_s": 60.0, "max_epochs": None, "predicted": "000"},
        {"run": "tinyvit", "budget_s": 600.0, "max_epochs": None, "predicted": "000"},
    ]
    lines = full_data.paired_differences(rows, labels)
    assert lines[1].startswith("1 min, paired differences") and lines[3] == "| run | − cnn-small | − resnet |"
    by_run = {line.split(" | ")[0][2:]: line for line in lines[5:]}
    assert by_run["cnn-small"].startswith("| cnn-small |  | -33.3 [")
    assert by_run["resnet"].startswith("| resnet | +33.3 [") and by_run["resnet"].endswith(" |  |")
    assert by_run["tinyvit"].startswith("| tinyvit | -33.3 [") and "| -66.7 [" in by_run["tinyvit"]
    assert not any("10 min" in line for line in lines)


def test_the_serve_benchmark_compares_each_concurrency_with_the_mean_in_process_figures():
    serve = load_benchmark("bench_serve")
    before = {"batch1_img_s": 500.0, "p50_ms": 2.0, "p99_ms": 3.0, "img_s": 1000.0}
    after = {"batch1_img_s": 250.0, "p50_ms": 4.0, "p99_ms": 5.0, "img_s": 3000.0}  # means: 3 ms, 2,000 img/s
    loads = [
        serve.Load(1, 4, 2.0, [4.0, 5.0, 6.0, 100.0], wrong=0),
        serve.Load(8, 10, 1.0, [1.0] * 10, wrong=1),
        serve.Load(64, 1500, 1.0, [2.0] * 1500, wrong=0),
    ]
    memory = {"warm": 100.0, 1: 100.5, 8: 101.0, 64: 102.0, "peak": 103.0}
    lines = serve.markdown(before, after, loads, memory, threads=2).splitlines()
    assert lines[2] == "| in process, batch 1 (before / after) | 500 / 250 | 2.00 / 4.00 | 3.00 / 5.00 | |"
    assert lines[3] == "| in process, batch 256 (before / after) | 1,000 / 3,000 | | | |"
    # 4 answers in 2 s; p50 5.5 ms, 2.5 ms over the mean 3 ms; 2 img/s of 2,000.
    assert lines[4].startswith("| serve, 1 connection(s), 4 requests | 2 | 5.50 | ")
    assert lines[4].endswith("| p50 +2.50 ms over batch 1; 0% of batch 256 img/s |")
    assert (
        lines[6]
        == "| serve, 64 connection(s), 1,500 requests | 1,500 | 2.00 | 2.00 | 75% of batch 256 img/s |"
    )
    assert "on 2 ONNX Runtime thread(s); 1 answers differed" in lines[8]
    assert lines[9].endswith("peak 103.0; growth after the warm-up +2.0.")


def test_the_full_data_runs_keep_their_recipes_crop_and_flip_else_take_the_datasets():
    from vitlab.data.sources import DATASETS

    full_data = load_benchmark("full_data")
    airbench = full_data.recipe("airbench", DATASETS["cifar10"], None, 8)
    assert (airbench.crop_padding, airbench.flip, airbench.epochs) == (2, "alternate", 8)
    resnet = full_data.recipe("resnet-budget", DATASETS["mnist"], 600.0)
    assert (resnet.crop_padding, resnet.flip) == (DATASETS["mnist"].crop_padding, False)
    assert full_data.TTA["airbench"] == "flip_translate"


REFERENCE_OUTPUT = """\
---------------------------------------------------------------------------------
|  run     |  epoch  |  train_acc  |  val_acc  |  tta_val_acc  |  time_seconds  |
---------------------------------------------------------------------------------
|       0  |      0  |     0.7030  |   0.6736  |               |      155.6056  |
|          |      1  |     0.7800  |   0.7700  |               |      260.0000  |
|          |   eval  |     0.9500  |   0.9300  |       0.9411  |      300.5000  |
---------------------------------------------------------------------------------
TTA accuracy: 0.9411
"""


def test_the_reference_runs_table_is_read_epoch_by_epoch_and_an_unfinished_run_refused(tmp_path):
    reference = load_benchmark("reference_airbench")
    figures = reference.parse(REFERENCE_OUTPUT)
    assert [e["epoch"] for e in figures["epochs"]] == [1, 2]
    assert figures["epochs"][0] == {
        "epoch": 1,
        "train_accuracy": 0.703,
        "test_accuracy": 0.6736,
        "time_s": 155.6056,
    }
    assert (figures["tta_test_accuracy"], figures["time_s"]) == (0.9411, 300.5)
    with pytest.raises(ValueError, match="did it finish"):
        reference.parse(REFERENCE_OUTPUT.split("|   eval")[0])
    log = tmp_path / "run.log"
    log.write_text(REFERENCE_OUTPUT)
    out = tmp_path / "reference.json"
    done = subprocess.run(
        [sys.executable, str(BENCHMARKS / "reference_airbench.py"), "--log", str(log), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "94.11% with TTA in 300 s" in done.stderr
    record = json.loads(out.read_text())
    assert record["output"] == REFERENCE_OUTPUT and record["tta_test_accuracy"] == 0.9411


def test_the_threads_benchmark_measures_one_thread_and_torchs_default(tmp_path):
    out = tmp_path / "threads.json"
    command = [sys.executable, str(BENCHMARKS / "bench_threads.py"), "--quick", "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text())
    assert [r["threads"] for r in result["runs"]["1"]] == [1]
    # Left alone, torch takes a thread per physical core this process may use (at least 1).
    assert result["threads_default"] >= 1 and result["cores_allowed"] == len(os.sched_getaffinity(0))
    assert result["images_per_s_1_thread"] > 0 and result["images_per_s_default"] > 0
    assert "img/s on 1 thread" in done.stdout
