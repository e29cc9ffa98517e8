"""Every DVC stage depends on exactly the project files its command runs (its import closure), so that editing
a stage's code re-runs that stage and what follows it, and nothing else (tools/stage_deps.py)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from benchmark_modules import load_script

from vitlab.params import TeacherParams, TrainParams
from vitlab.stages import NAMES

REPO = Path(__file__).resolve().parents[1]
stage_deps = load_script(REPO / "tools" / "stage_deps.py")
DVC_STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def test_dvc_yaml_declares_every_stage_in_order():
    assert tuple(DVC_STAGES) == NAMES
    assert all(DVC_STAGES[name]["cmd"] == f"python pipeline/run.py {name}" for name in NAMES)


@pytest.mark.parametrize("name", NAMES)
def test_a_stages_code_deps_are_its_import_closure(name):
    declared = sorted(d for d in DVC_STAGES[name]["deps"] if d.startswith(("src/", "pipeline/")))
    closure = stage_deps.stage_code(name)
    missing, extra = sorted(set(closure) - set(declared)), sorted(set(declared) - set(closure))
    assert declared == closure, (
        f"dvc.yaml's {name} deps differ from its import closure: missing {missing}, not run {extra}; "
        f"`python tools/stage_deps.py {name}` prints them"
    )


def test_the_closures_hold_what_each_stage_runs_and_not_other_stages_code():
    code = {name: set(stage_deps.stage_code(name)) for name in NAMES}
    assert {"src/vitlab/checkpoint.py", "src/vitlab/figures.py", "src/vitlab/tracking.py"} <= code["evaluate"]
    assert {"src/vitlab/figures.py", "src/vitlab/tracking.py", "src/vitlab/train.py"} <= code["train"]
    assert {"src/vitlab/inference.py", "src/vitlab/checkpoint.py"} <= code["export"]
    for name in NAMES:
        others = {f"src/vitlab/stages/{other}.py" for other in NAMES if other != name}
        assert not code[name] & others
    # Download and validate never build a model: editing one leaves them up to date.
    assert not any(path.startswith("src/vitlab/models/") for path in code["download"] | code["validate"])


def test_the_teacher_stage_reads_train_less_what_teacher_replaces_and_train_reads_the_teacher():
    """A student's epochs leave the teacher up to date; a new train key reaches the teacher too."""
    teacher = DVC_STAGES["teacher"]
    replaced = TeacherParams.replaced_train_keys()
    declared = sorted(p.removeprefix("train.") for p in teacher["params"] if p.startswith("train."))
    assert declared == sorted(set(TrainParams.model_fields) - set(replaced))
    assert {"teacher", "data.dataset", "data.val_fraction", "data.seed"} <= set(teacher["params"])
    assert (
        "model.distillation" in teacher["params"]
    )  # off, the stage trains nothing: it re-runs when it turns on
    assert teacher["outs"][0] == "models/teacher.pt"
    assert "models/teacher.pt" in DVC_STAGES["train"]["deps"]
    assert "teacher" not in DVC_STAGES["train"]["params"]  # its file is the dependency


def test_type_checking_imports_do_not_count_and_imports_inside_functions_do(tmp_path):
    module = tmp_path / "m.py"
    module.write_text(
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from vitlab.params import Params\n"
        "def f():\n    from vitlab.device import select_device\n"
    )
    assert stage_deps.imported_modules(module) == {"vitlab.device", "vitlab.device.select_device"}


@pytest.mark.parametrize("name", NAMES)
def test_what_a_stage_imports_when_it_runs_lies_inside_its_static_closure(name):
    """A fresh interpreter imports the stage as pipeline/run.py does: every project module it loads (dynamic
    imports included) must be in the static closure, or the scan misses a way this code imports."""
    probe = (
        "import importlib, json, sys\n"
        f"import vitlab.errors, vitlab.stages; importlib.import_module('vitlab.stages.{name}')\n"
        "print(json.dumps(sorted(m.__file__ for n, m in sys.modules.items()"
        " if n.split('.')[0] == 'vitlab' and getattr(m, '__file__', None))))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    loaded = {str(Path(path).resolve().relative_to(REPO)) for path in json.loads(done.stdout)}
    assert loaded <= set(stage_deps.stage_code(name))
