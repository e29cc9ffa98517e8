"""The real pipeline, run once per test session and shared by every end-to-end test.

`pipeline_run` (conftest.py) is a temporary git clone of this repository after `dvc repro` on the committed
params.yaml, in the bit-identical mode (vitlab.cpu) where the CPU has it, as the committed run is made:
data/prepared, models/model.pt, models/model.onnx and reports/ are there. Tests that change the clone (an
edited file, a `dvc exp run`) restore what they changed, so the tests that follow see the committed run.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from vitlab.cpu import BIT_IDENTICAL, cpu_has

REPO = Path(__file__).resolve().parents[1]


def run(args: list[str], cwd: Path, env: dict[str, str], timeout: int = 900) -> subprocess.CompletedProcess:
    """Run ``args`` in ``cwd``; fail the test with the command's last output when it exits non-zero."""
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, f"{' '.join(args)} failed:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    return done


def clone_and_repro(base: Path) -> tuple[Path, dict[str, str]]:
    """Clone this repository's HEAD under ``base`` and `dvc repro` it with the clone's own code."""
    root = base / "vitlab"
    subprocess.run(["git", "clone", "--quiet", str(REPO), str(root)], check=True)
    for key, value in (("user.name", "vitlab tests"), ("user.email", "tests@vitlab.invalid")):
        subprocess.run(["git", "config", key, value], cwd=root, check=True)
    env = {
        **os.environ,
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(root / "src"),
        "DVC_NO_ANALYTICS": "1",
        "WANDB_MODE": "disabled",
        "CI": "true",
    }
    if cpu_has("avx2", "fma"):  # the committed run's mode, so that its bits can be checked (test_pipeline.py)
        env[BIT_IDENTICAL] = "1"
    env.pop("DVC_EXP_NAME", None)
    run(["dvc", "repro"], root, env)
    return root, env
