"""DistributedDataParallel through torchrun: two CPU processes with the gloo backend on tiny fake data."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from cifar_fakes import make_dataset

from vitlab.checkpoint import Normalization
from vitlab.data.prepared import save_prepared
from vitlab.models import build_model
from vitlab.train import TrainConfig, train

TINY_VIT = {"num_classes": 4, "patch_size": 8, "dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16}
# No augmentation: the two processes' batches together are then exactly the one-process run's batches.
CONFIG = {"epochs": 3, "batch_size": 16, "learning_rate": 3e-3, "warmup_epochs": 1, "crop_padding": 0}
CONFIG |= {"flip": False, "device": "cpu"}

# One process of the run: trains and saves what it ends with under argv[1] as rank{RANK}.pt.
CHILD = f"""
import os, sys, torch
from cifar_fakes import make_dataset
from vitlab.checkpoint import Normalization
from vitlab.models import build_model
from vitlab.train import TrainConfig, train

torch.set_num_threads(1)
data = make_dataset(n_train=64, num_classes=4).train
torch.manual_seed(0)
model = build_model("vit", {TINY_VIT!r})
result = train(model, data, None, Normalization.from_images(data.images), TrainConfig(**{CONFIG!r}))
torch.save({{"history": result.history, "weights": model.state_dict()}},
           f"{{sys.argv[1]}}/rank{{os.environ['RANK']}}.pt")
"""


def _torchrun(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {"PYTHONPATH": str(Path(__file__).parent), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=120)


def _measured(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in history]


def test_two_processes_stay_in_sync_and_match_one_process_with_the_same_global_batch(tmp_path):
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    run = _torchrun([str(script), str(tmp_path)], tmp_path)
    assert run.returncode == 0, run.stderr
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))

    # Gradients are averaged at every step, so both processes end with the very same weights...
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])
    assert _measured(rank0["history"]) == _measured(rank1["history"])  # metrics summed over both
    assert rank0["history"][-1]["train_loss"] < rank0["history"][0]["train_loss"]
    # ... and, each taking half of every global batch, the weights one process training alone would reach.
    data = make_dataset(n_train=64, num_classes=4).train
    torch.manual_seed(0)
    model = build_model("vit", TINY_VIT)
    alone = train(model, data, None, Normalization.from_images(data.images), TrainConfig(**CONFIG))
    for key, weight in model.state_dict().items():
        torch.testing.assert_close(rank0["weights"][key], weight, rtol=1e-4, atol=1e-5)
    for ddp_row, row in zip(rank0["history"], alone.history, strict=True):
        assert ddp_row["train_loss"] == pytest.approx(row["train_loss"], rel=1e-4)
        assert ddp_row["train_accuracy"] == row["train_accuracy"]
    # Rank 0 alone reports the epochs.
    assert run.stderr.count("epoch 3/3") == 1


def test_the_train_stage_under_torchrun_writes_its_outputs_from_rank_0(tmp_path):
    save_prepared(make_dataset(n_train=60, n_test=10, num_classes=4), tmp_path / "data/prepared")
    params = {
        "model": {"name": "mlp", "mlp_hidden": [8]},
        "train": {"epochs": 2, "warmup_epochs": 1, "batch_size": 32, "device": "cpu"},
    }
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    script = tmp_path / "stage.py"  # what pipeline/run.py does, in this folder instead of the repository
    script.write_text("import sys\nfrom vitlab.cli import main\nsys.exit(main(['stage', 'train']))\n")
    run = _torchrun([str(script)], tmp_path)
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == ["model.pt"]  # state deleted
    history = (tmp_path / "reports/train/history.tsv").read_text().splitlines()
    assert len(history) == 1 + 2
    assert "best val accuracy" in run.stdout
