"""Resumable training: a run killed with SIGKILL and started again ends bit-identical to an unbroken one."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cifar_fakes import make_dataset

from vitlab import files
from vitlab.checkpoint import Normalization
from vitlab.cli import main
from vitlab.data.prepared import save_prepared
from vitlab.models import build_model
from vitlab.params import TrainParams
from vitlab.train import split_train_val, train

EPOCHS = 6
TINY_VIT = {"num_classes": 4, "patch_size": 8, "dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16}

# One training run in a fresh process: argv = state file, result file, seconds to pause after each epoch (so
# that a kill lands mid-run), train options as JSON. Dropout makes the run draw from torch's global RNG as
# well as the loop's own.
CHILD = f"""
import json, sys, time, torch
from cifar_fakes import make_dataset
from vitlab import checkpoint
from vitlab.checkpoint import Normalization
from vitlab.models import build_model
from vitlab.params import TrainParams
from vitlab.train import split_train_val, train

torch.set_num_threads(1)  # bit-exact across processes
state_path, out, pause, options = sys.argv[1], sys.argv[2], float(sys.argv[3]), json.loads(sys.argv[4])
tr, va = split_train_val(make_dataset(n_train=120, num_classes=4).train, 0.25, 0)
torch.manual_seed(0)
model = build_model("vit", {TINY_VIT!r} | {{"dropout": 0.1}})
train_params = TrainParams(epochs={EPOCHS}, batch_size=32, learning_rate=3e-3, warmup_epochs=1, device="cpu",
                  **options)
norm = Normalization.from_images(tr.images)
result = train(model, tr, va, norm, train_params, on_epoch=lambda row: time.sleep(pause),
               state_path=state_path)
torch.save({{"history": result.history, "best": (result.best_epoch, result.best_val_accuracy),
            "weights": model.state_dict()}}, out)
"""


def _child(state: Path, out: Path, options: dict, pause: float = 0.0, **kwargs) -> subprocess.Popen:
    # The tests' helpers, then the code under test (a checkout's PYTHONPATH=src, as test_ddp does).
    path = os.pathsep.join([str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = os.environ | {"PYTHONPATH": path}
    argv = [sys.executable, "-c", CHILD, str(state), str(out), str(pause), json.dumps(options)]
    return subprocess.Popen(argv, env=env, text=True, **kwargs)


def _finished(state: Path, out: Path, options: dict) -> tuple[dict, str]:
    child = _child(state, out, options, stderr=subprocess.PIPE)
    _, stderr = child.communicate(timeout=120)
    assert child.returncode == 0, stderr
    return torch.load(out, weights_only=True), stderr


def _assert_same_run(a: dict, b: dict) -> None:
    def measured(history):  # images_per_s is a timing, the rest is computed
        return [{k: v for k, v in row.items() if k != "images_per_s"} for row in history]

    assert measured(a["history"]) == measured(b["history"])
    assert a["best"] == b["best"]
    assert a["weights"].keys() == b["weights"].keys()
    assert all(torch.equal(a["weights"][k], b["weights"][k]) for k in a["weights"])


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"augment": "randaugment", "mixup_alpha": 0.2, "cutmix_alpha": 1.0, "random_erasing": 0.25},
        # The weight average and both optimizers' states are resumed too.
        {"ema_decay": 0.9, "muon": True, "selective_decay": True, "grad_clip": 1.0},
    ],
    ids=["defaults", "every-augmentation", "ema-muon"],
)
def test_a_killed_run_resumes_after_its_last_epoch_and_ends_bit_identical(tmp_path, options):
    whole, stderr = _finished(tmp_path / "whole.pt", tmp_path / "whole-result.pt", options)
    assert "resuming" not in stderr and len(whole["history"]) == EPOCHS

    state, out = tmp_path / "state.pt", tmp_path / "result.pt"
    child = _child(state, out, options, pause=0.3, stderr=subprocess.PIPE)
    for line in child.stderr:
        if line.startswith(f"epoch 2/{EPOCHS}"):  # printed once epoch 2's state is saved
            child.send_signal(signal.SIGKILL)
            break
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL
    assert not out.exists()
    saved = torch.load(state, weights_only=True)  # tensors and plain data only
    assert 2 <= saved["epoch"] < EPOCHS
    assert {"model", "optimizer", "history", "best_model", "rng", "digest"} <= set(saved)
    assert ("ema" in saved) == bool(options.get("ema_decay"))

    resumed, stderr = _finished(state, out, options)
    assert f"resuming from {state} after epoch {saved['epoch']}/{EPOCHS}" in stderr
    assert f"epoch 1/{EPOCHS}" not in stderr  # the finished epochs are not trained again
    _assert_same_run(resumed, whole)


def _fit(state: Path | None, epochs: int, resume: bool = True) -> tuple[dict, list[int]]:
    tr, va = split_train_val(make_dataset(n_train=80, num_classes=4).train, 0.25, 0)
    torch.manual_seed(0)
    model = build_model("vit", TINY_VIT)
    train_params = TrainParams(epochs=epochs, batch_size=32, warmup_epochs=1, device="cpu", resume=resume)
    seen = []
    result = train(model, tr, va, Normalization.from_images(tr.images), train_params, seen.append, state)
    run = {"history": result.history, "best": (result.best_epoch, result.best_val_accuracy)}
    return run | {"weights": model.state_dict()}, [int(row["epoch"]) for row in seen]


@pytest.mark.parametrize(
    ("epochs", "resume", "message"),
    [(3, True, "state of another run"), (2, False, "train.resume is off: starting fresh")],
    ids=["other-config", "resume-off"],
)
def test_a_state_that_does_not_apply_is_ignored_and_replaced(tmp_path, capsys, epochs, resume, message):
    state = tmp_path / "state.pt"
    _fit(state, epochs=2)  # leaves the state of a finished 2-epoch run
    fresh, _ = _fit(None, epochs)
    capsys.readouterr()

    result, trained = _fit(state, epochs, resume)
    assert message in capsys.readouterr().err
    assert trained == list(range(1, epochs + 1))
    _assert_same_run(result, fresh)
    assert torch.load(state, weights_only=True)["epoch"] == epochs


def test_the_train_stage_deletes_its_state_once_its_outputs_are_saved(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    save_prepared(make_dataset(n_train=60, n_test=10, num_classes=4), "data/prepared")
    params = {
        "model": {"name": "mlp", "hidden": [8]},
        "train": {"epochs": 2, "warmup_epochs": 1, "batch_size": 32, "device": "cpu"},
    }
    Path("params.yaml").write_text(yaml.safe_dump(params))
    state_while_saving = []

    # Patched where every torch file is written: the stage module may hold save_checkpoint under its own name,
    # imported before this test by another that ran the stage.
    def write_bytes(path, data):
        if Path(path).name == "model.pt":
            state_while_saving.append(Path("models/train_state.pt").is_file())
        write(path, data)

    write = files.write_bytes
    monkeypatch.setattr(files, "write_bytes", write_bytes)
    assert main(["stage", "train"]) == 0, capsys.readouterr().err
    assert state_while_saving == [True]
    assert sorted(p.name for p in Path("models").iterdir()) == ["model.pt"]
