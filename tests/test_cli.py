"""The CLI's contract: --help everywhere, one-line errors with exit code 2, tracebacks only with --debug."""

import errno
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
from cifar_fakes import make_dataset

from vitlab import files
from vitlab.checkpoint import Normalization, save_checkpoint
from vitlab.cli import app, main
from vitlab.data.prepared import save_prepared
from vitlab.models import build_model

REPO = Path(__file__).resolve().parents[1]


def _vitlab(*args: str, cwd: Path = REPO, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitlab.cli", *args], capture_output=True, text=True, cwd=cwd, **kwargs
    )


@pytest.mark.parametrize("command", [[], ["predict"], ["serve"], ["stage"], ["params"], ["compare"]])
def test_every_command_has_help(command):
    done = _vitlab(*command, "--help")
    assert done.returncode == 0
    assert "Usage: vitlab" in done.stdout


def test_params_prints_the_validated_params_with_defaults():
    done = _vitlab("params")
    assert done.returncode == 0, done.stderr
    params = json.loads(done.stdout)
    assert params["model"]["name"] == "vit" and params["validate"]["max_cross_split_duplicates"] == 0


def test_bad_params_file_is_one_line_and_exit_2(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("model:\n  patch_size: 5\n")
    done = _vitlab("params", "-p", str(bad))
    assert done.returncode == 2
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith(f"error: {bad}: model.patch_size=5 does not divide the image size 32")
    assert "Traceback" not in done.stderr


def test_debug_shows_the_traceback(tmp_path):
    done = _vitlab("--debug", "params", "-p", str(tmp_path / "missing.yaml"))
    assert done.returncode != 0
    assert "Traceback" in done.stderr and "VitlabError" in done.stderr


def test_unknown_stage_and_missing_model_are_clear_errors(tmp_path, capsys):
    assert main(["stage", "trian"]) == 2
    assert "unknown stage 'trian' (stages: download, validate, teacher, train" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "model.onnx"), str(tmp_path)]) == 2
    assert "model.onnx: no such model file" in capsys.readouterr().err


def test_stage_runs_from_the_given_params_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    assert main(["stage", "download"]) == 0
    assert (tmp_path / "data" / "prepared" / "train.npz").is_file()
    assert (tmp_path / "data" / "prepared" / "meta.json").is_file()


def test_app_lists_its_commands():
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert names == {"predict", "serve", "stage", "params", "metrics", "compare"}


def _ready_to_evaluate(folder: Path) -> None:
    """A prepared dataset and a checkpoint in ``folder``: what the evaluate stage reads."""
    dataset = make_dataset(n_train=20, n_test=10)
    save_prepared(dataset, folder / "data" / "prepared")
    model = build_model("mlp", {"num_classes": 10, "hidden": [8]})
    norm = Normalization.from_images(dataset.train.images)
    save_checkpoint(folder / "models" / "model.pt", model, dataset.class_names, norm, "fake")
    (folder / "params.yaml").write_text("train:\n  device: cpu\n")


def _disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


@pytest.mark.parametrize(
    ("break_it", "reason"),
    [
        (lambda mp: Path("reports").write_text("a file where a folder should be"), "Not a directory"),
        (lambda mp: mp.setattr(files.os, "replace", _disk_full), "No space left on device"),
    ],
    ids=["parent-is-a-file", "disk-full"],
)
def test_a_stage_that_cannot_write_its_output_fails_in_one_line_and_leaves_none(
    tmp_path, monkeypatch, capsys, break_it, reason
):
    _ready_to_evaluate(tmp_path)
    monkeypatch.chdir(tmp_path)
    break_it(monkeypatch)
    assert main(["stage", "evaluate"]) == 2
    assert capsys.readouterr().err == f"error: cannot write reports/eval/metrics.json: {reason}\n"
    assert not Path("reports/eval").is_dir() or list(Path("reports/eval").iterdir()) == []


def test_a_real_write_failure_is_one_line_and_leaves_no_output(tmp_path):
    (tmp_path / "params.yaml").write_text("")

    def one_mib_files() -> None:  # writing past it fails with EFBIG, as a full disk fails with ENOSPC
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))

    done = _vitlab("stage", "download", cwd=tmp_path, preexec_fn=one_mib_files)
    assert done.returncode == 2
    assert done.stderr == "error: cannot write data/raw/cifar-10-sample-python.tar.gz.part: File too large\n"
    assert [p.name for p in (tmp_path / "data" / "raw").iterdir()] == ["cifar-10-sample-python.tar.gz.part"]
    assert not (tmp_path / "data" / "prepared").exists()


def test_failed_validation_stops_the_pipeline_with_its_evidence(tmp_path, monkeypatch, capsys):
    dataset = make_dataset(n_train=100, n_test=20)
    dataset.test.images[3] = dataset.train.images[7]  # a test image that is a copy of a training image
    save_prepared(dataset, tmp_path / "data" / "prepared")
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    monkeypatch.chdir(tmp_path)
    assert main(["stage", "validate"]) == 2
    err = capsys.readouterr().err
    failed = "test: expect_column_sum_to_be_between(duplicate_of_train) observed 1, expected max_value=0"
    assert err == f"error: data validation failed: {failed}\n"  # one line, naming the expectation
    report = json.loads(Path("reports/validation.json").read_text())
    assert report["success"] is False
    assert report["failed"] == [failed]
    assert sorted(str(p) for p in Path().rglob("*") if p.is_file()) == [
        "data/prepared/meta.json",
        "data/prepared/test.npz",
        "data/prepared/train.npz",
        "params.yaml",
        "reports/validation.json",
    ]


def test_an_error_about_a_name_that_is_not_utf8_is_one_escaped_line(tmp_path, capsys):
    """Any name the file system holds is printed, escaped, in every command's messages too."""
    missing = os.fsdecode(os.path.join(bytes(tmp_path), b"caf\xe9\t.yaml"))
    assert main(["params", "--params", missing]) == 2
    assert capsys.readouterr().err == f"error: {tmp_path}/caf\\xe9\\t.yaml: no such params file\n"
