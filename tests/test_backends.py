"""An optional backend that is missing or fails (torch.compile's C++ compiler or Triton; the ONNX Runtime
providers: test_inference.py) is one line naming the param to change, exit 2, before any training."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch._dynamo.exc import BackendCompilerFailed

from vitlab.device import check_compile, compile_backend
from vitlab.errors import VitlabError


def _stage(name: str, cwd: Path, cxx: str) -> subprocess.CompletedProcess:
    """``vitlab stage NAME`` with train.compile on, in a folder with no data, CXX (what TorchInductor reads
    for its compiler when it is imported) set to ``cxx``."""
    # The teacher stage trains only for a distilled model (else it writes a note and returns).
    distill = "model:\n  preset: tinyvit\n  distillation: true\n" if name == "teacher" else ""
    (cwd / "params.yaml").write_text(f"{distill}train:\n  compile: true\n  device: cpu\n")
    env = dict(os.environ, CXX=cxx)
    command = [sys.executable, "-m", "vitlab.cli", "stage", name]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("stage", ["train", "teacher"])
def test_compile_without_a_compiler_fails_before_training_in_one_line(stage, tmp_path):
    """It was a 127-line traceback from inside the first training step, exit 1."""
    done = _stage(stage, tmp_path, str(tmp_path / "no-such-c++"))
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("error: train.compile: true needs a C++ compiler for torch.compile (")
    assert done.stderr.rstrip().endswith(
        "set train.compile: false, or install g++ (or set CXX to a compiler)"
    )


def test_a_compiler_that_cannot_compile_is_named(tmp_path):
    broken = tmp_path / "broken-c++"
    broken.write_text(
        "#!/bin/sh\ncase \"$1\" in --version) echo broken 1.0;; *) echo 'cc1plus: fatal' >&2; exit 1;; esac\n"
    )
    broken.chmod(0o755)
    done = _stage("train", tmp_path, str(broken))
    assert done.returncode == 2 and done.stderr.count("\n") == 1, done.stderr
    assert f"{broken} cannot compile a trivial file (cc1plus: fatal); set train.compile: false" in done.stderr


def test_a_working_compiler_passes_the_check():
    if subprocess.run(["sh", "-c", 'command -v "${CXX:-g++}"'], capture_output=True).returncode:
        pytest.skip("no C++ compiler on this machine")
    check_compile(torch.device("cpu"))


def test_a_backend_failure_while_training_is_one_line_naming_the_param(monkeypatch):
    import vitlab.device

    monkeypatch.setattr(vitlab.device, "check_compile", lambda device: None)  # the compiler is there
    inner = RuntimeError("C++ compile error\n/tmp/x.cpp:1: error: ...")
    with (
        pytest.raises(
            VitlabError, match=r"^train.compile: torch.compile failed \(C\+\+ compile error\); set"
        ),
        compile_backend(True, "cpu"),
    ):
        raise BackendCompilerFailed(lambda: None, inner, None)
    for enabled in (True, False):  # any other error passes unchanged
        with pytest.raises(ValueError, match="not a backend's"), compile_backend(enabled, "cpu"):
            raise ValueError("not a backend's")
