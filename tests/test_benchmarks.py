"""The training benchmarks' own arithmetic, and smoke runs of them (their figures are not tested: speed
belongs to the benchmark, never to a unit test)."""

import json
import os
import re
import subprocess
import sys

import pytest
from benchmark_modules import BENCHMARKS, load_benchmark

from vitlab.models import build_model, preset_config

bench = load_benchmark("bench_train_throughput")


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
def test_importing_vitlab_makes_openmp_threads_sleep_unless_the_user_chose(env, expected):
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    probe = "import os, vitlab; print(os.environ.get('OMP_WAIT_POLICY'))"
    done = subprocess.run([sys.executable, "-c", probe], env=base | env, capture_output=True, text=True)
    assert done.stdout.strip() == str(expected)


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
    again = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and " ..." not in again.stderr  # nothing trained the second time
    assert json.loads((tmp_path / "full.json").read_text())["rows"] == rows
