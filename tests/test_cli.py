"""The CLI's contract: --help everywhere, one-line errors with exit code 2, tracebacks only with --debug."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from vitlab.cli import app, main

REPO = Path(__file__).resolve().parents[1]


def _vitlab(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "vitlab.cli", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.parametrize("command", [[], ["predict"], ["stage"], ["params"]])
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
    assert "unknown stage 'trian' (stages: download, validate, train" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "model.onnx"), str(tmp_path)]) == 2
    assert "model.onnx: no such model file" in capsys.readouterr().err


def test_stage_runs_from_the_given_params_in_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    assert main(["stage", "download"]) == 0
    assert (tmp_path / "data" / "prepared" / "train.npz").is_file()
    assert (tmp_path / "data" / "prepared" / "meta.json").is_file()


def test_app_lists_the_three_commands():
    names = {c.name or c.callback.__name__ for c in app.registered_commands}
    assert names == {"predict", "stage", "params"}
