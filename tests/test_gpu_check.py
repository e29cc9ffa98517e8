"""The GPU check (benchmarks/gpu_check.sh): its dry run on the CPU, which CI runs, and its image cache. The
real run needs a GPU; here it must refuse in one line."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from benchmark_modules import BENCHMARKS, load_benchmark
from cifar_fakes import make_dataset

from vitlab.errors import VitlabError
from vitlab.models import PRESETS
from vitlab.params import ExportParams


@pytest.fixture(scope="module")
def gpu_check():
    sys.path.insert(0, str(BENCHMARKS))  # gpu_check imports time_to_accuracy, as it does when run
    try:
        yield load_benchmark("gpu_check")
    finally:
        sys.path.remove(str(BENCHMARKS))


def _script(*args: str) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHON": sys.executable}
    command = ["bash", str(BENCHMARKS / "gpu_check.sh"), *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=900)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    run = _script("--dry-run", str(out))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return out


def test_the_dry_run_passes_every_section_and_writes_its_files(dry_run):
    results = json.loads((dry_run / "gpu_check.json").read_text())
    assert results["status"] == "passed"
    assert results["environment"]["dry_run"] and results["environment"]["device"] == "cpu"
    assert results["environment"]["cpu_mode"] == "native"
    assert "sample" in results["data"]["source"]
    assert list(results["sections"]) == ["cuda_tests", "time_to_accuracy", "onnx", "throughput"]
    assert "passed" in (dry_run / "gpu_check.log").read_text()
    assert (dry_run / "cuda_tests.xml").is_file()


def test_the_dry_run_collects_the_cuda_tests_and_skips_them_without_a_gpu(dry_run):
    if torch.cuda.is_available():
        pytest.skip("the dry run runs the CUDA tests on a machine that has a GPU")
    tests = json.loads((dry_run / "gpu_check.json").read_text())["sections"]["cuda_tests"]
    assert "test_ddp_over_nccl_trains_in_a_group_of_one_process" in tests["tests"]
    assert {test["outcome"] for test in tests["tests"].values()} == {"skipped"}
    assert (tests["exit_code"], tests["passed"], tests["failed"], tests["errors"]) == (0, 0, 0, 0)
    assert tests["skipped"] == len(tests["tests"]) >= 7


def test_the_dry_run_trains_to_its_targets_within_the_cap(dry_run, gpu_check):
    results = json.loads((dry_run / "gpu_check.json").read_text())
    sizes = results["sizes"]
    for name, target in gpu_check.TARGETS.items():
        run = results["sections"]["time_to_accuracy"][name]
        assert run["target_val_accuracy"] == target
        assert run["train_images"] + run["val_images"] == sizes["train_images"]
        assert run["epochs"] and all(0 <= epoch["val_accuracy"] <= 1 for epoch in run["epochs"])
        reached = [epoch for epoch in run["epochs"] if epoch["val_accuracy"] >= target]
        assert run["reached"] == bool(reached)
        assert run["epochs_to_target"] == (reached[0]["epoch"] if reached else None)
        assert 0 <= run["test_accuracy"] <= 1 and run["test_images"] == sizes["test_images"]


def test_the_dry_run_checks_the_onnx_export_against_onnx_runtime(dry_run):
    onnx = json.loads((dry_run / "gpu_check.json").read_text())["sections"]["onnx"]
    assert onnx["preset"] == "tinyvit" and onnx["torch_device"] == "cpu"
    assert onnx["max_abs_diff"] <= ExportParams().max_abs_diff
    assert onnx["top1_agreement"] == 1.0
    assert onnx["parity"].startswith("max |logit diff| ")


def test_the_dry_run_times_every_preset_eager_and_through_torch_compile(dry_run):
    throughput = json.loads((dry_run / "gpu_check.json").read_text())["sections"]["throughput"]
    assert throughput["torch_compile"] == "off: TORCH_COMPILE_DISABLE=1"
    assert throughput["amp"] == "off"
    assert list(throughput["presets"]) == list(PRESETS)
    for preset, kinds in throughput["presets"].items():
        for kind in ("eager", "compiled"):
            run = kinds[kind]
            assert run["images_per_s"] > 0 and run["first_epoch_s"] > 0, (preset, kind)
            assert run["peak_gpu_mib"] is None and run["parameters"] > 0


def test_the_cached_images_come_back_bit_for_bit(tmp_path, gpu_check):
    data = make_dataset(n_train=20, n_test=6)
    gpu_check.save_images(data, tmp_path / "images.npz", n_train=12, n_test=5)
    loaded = gpu_check.load_images(tmp_path / "images.npz")
    assert np.array_equal(loaded.train.images, data.train.images[:12])
    assert np.array_equal(loaded.train.labels, data.train.labels[:12])
    assert np.array_equal(loaded.test.images, data.test.images[:5])
    assert loaded.class_names == data.class_names


def test_without_prepared_images_the_error_says_how_to_make_them(tmp_path, gpu_check):
    with pytest.raises(VitlabError, match=r"no prepared images .*bash benchmarks/gpu_check\.sh --prepare"):
        gpu_check.load_images(tmp_path / "missing.npz")


def test_without_a_cuda_device_the_real_run_is_a_one_line_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    run = _script(str(tmp_path / "out"))
    assert run.returncode == 2
    assert run.stdout.splitlines()[-1].startswith("error: no CUDA device: torch ")
    assert "--dry-run" in run.stdout.splitlines()[-1]
    assert not (tmp_path / "out" / "gpu_check.json").exists()


def test_a_wrong_command_line_prints_the_usage():
    for args in ([], ["--dry-run"], ["a", "b"], ["--prepare", "out"]):
        run = _script(*args)
        assert run.returncode == 2 and run.stderr.startswith("usage: "), args
