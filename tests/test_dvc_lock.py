"""dvc.lock describes the committed pipeline: the code, data and params every stage recorded are the tree's.

DVC compares them itself (`dvc status`: the md5 of each dep, the value of each param). What a fresh clone
lacks is not a disagreement: the outputs are not in its cache, and a stage's output that another stage
reads (data/prepared, models/model.pt...) is missing or made anew with it. Whoever changes a stage's code,
its params or the embedded data remakes the committed run (`dvc repro`) and commits dvc.lock with it.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def stage_outputs(root: Path) -> set[str]:
    """Every path a stage of ``root``'s dvc.yaml writes (its outs, metrics and plots)."""
    stages = yaml.safe_load((root / "dvc.yaml").read_text())["stages"]
    return {
        next(iter(entry)) if isinstance(entry, dict) else entry
        for stage in stages.values()
        for kind in ("outs", "metrics", "plots")
        for entry in stage.get(kind, [])
    }


def disagreements(root: Path) -> dict[str, list[object]]:
    """Stage -> what `dvc status` finds changed in ``root`` other than outputs: changed code and data deps,
    changed params, a changed command."""
    done = subprocess.run(
        [sys.executable, "-m", "dvc", "status", "--json"],
        cwd=root,
        capture_output=True,
        text=True,
    )
    assert done.returncode == 0, done.stderr
    outputs = stage_outputs(root)
    found: dict[str, list[object]] = {}
    for stage, changes in json.loads(done.stdout or "{}").items():
        for change in changes:
            if isinstance(change, dict) and "changed deps" in change:
                deps = {k: v for k, v in change["changed deps"].items() if k not in outputs}
                change = {"changed deps": deps} if deps else None
            elif isinstance(change, dict) and set(change) == {"changed outs"}:
                change = None
            if change:
                found.setdefault(stage, []).append(change)
    return found


def test_dvc_lock_records_the_committed_code_data_and_params():
    assert disagreements(REPO) == {}, (
        "dvc.lock disagrees with the tree: remake the committed run (`make repro`) and commit dvc.lock"
    )
