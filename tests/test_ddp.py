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
from vitlab.params import TrainParams
from vitlab.train import train

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
from vitlab.params import TrainParams
from vitlab.train import train

torch.set_num_threads(1)
data = make_dataset(n_train=64, num_classes=4).train
torch.manual_seed(0)
model = build_model("vit", {TINY_VIT!r})
result = train(model, data, None, Normalization.from_images(data.images), TrainParams(**{CONFIG!r}))
torch.save({{"history": result.history, "weights": model.state_dict()}},
           f"{{sys.argv[1]}}/rank{{os.environ['RANK']}}.pt")
"""


# One process on argv[2] ("cpu", "auto"...): trains and saves what it ends with, the backend of its process
# group (None outside torchrun) and what World.wrap made of the model, under argv[1] as alone.pt.
CHILD_ALONE = f"""
import sys, torch
import torch.distributed as dist
from cifar_fakes import make_dataset
from vitlab import distributed
from vitlab.checkpoint import Normalization
from vitlab.models import build_model
from vitlab.params import TrainParams
from vitlab.train import train

wrap, wrapped, backends = distributed.World.wrap, [], []

def recording_wrap(world, model):
    net = wrap(world, model)
    wrapped.append(type(net).__name__)
    return net

distributed.World.wrap = recording_wrap
torch.set_num_threads(1)
data = make_dataset(n_train=64, num_classes=4).train
torch.manual_seed(0)
model = build_model("vit", {TINY_VIT!r})
params = TrainParams(**{CONFIG!r} | {{"device": sys.argv[2]}})
result = train(model, data, None, Normalization.from_images(data.images), params,
               on_epoch=lambda row: backends.append(dist.get_backend() if dist.is_initialized() else None))
torch.save({{"history": result.history, "weights": model.state_dict(), "device": result.device,
            "wrapped": wrapped, "backends": backends}}, f"{{sys.argv[1]}}/alone.pt")
"""


def _env() -> dict[str, str]:
    """The children's environment: cifar_fakes importable, beside whatever makes vitlab importable here."""
    path = os.pathsep.join([str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    return os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def _torchrun(args: list[str], cwd: Path, processes: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={processes}"]
    return subprocess.run([*command, *args], cwd=cwd, env=_env(), capture_output=True, text=True, timeout=120)


def train_alone(folder: Path, device: str, under_torchrun: bool) -> dict:
    """What one process trained on ``device`` (CHILD_ALONE), under ``torchrun --nproc_per_node=1`` or as a
    plain ``python`` run, in a subfolder of ``folder``."""
    work = folder / ("torchrun" if under_torchrun else "python")
    work.mkdir()
    script = work / "alone.py"
    script.write_text(CHILD_ALONE)
    args = [str(script), str(work), device]
    if under_torchrun:
        run = _torchrun(args, work, processes=1)
    else:
        run = subprocess.run(
            [sys.executable, *args], cwd=work, env=_env(), capture_output=True, text=True, timeout=120
        )
    assert run.returncode == 0, run.stderr
    return torch.load(work / "alone.pt", weights_only=True)


def _without_key_bias(qkv_bias: torch.Tensor) -> torch.Tensor:
    q_bias, _, v_bias = qkv_bias.chunk(3)
    return torch.cat([q_bias, v_bias])


def _measured(history: list[dict]) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in history]


def _run_ranks(child: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, dict, dict]:
    """Run the ``child`` script under torchrun in 2 processes: the run, and what ranks 0 and 1 saved."""
    script = tmp_path / "child.py"
    script.write_text(child)
    run = _torchrun([str(script), str(tmp_path)], tmp_path)
    assert run.returncode == 0, run.stderr
    return run, *(torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))


def test_two_processes_stay_in_sync_and_match_one_process_with_the_same_global_batch(tmp_path):
    run, rank0, rank1 = _run_ranks(CHILD, tmp_path)

    # Gradients are averaged at every step, so both processes end with the very same weights...
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])
    assert _measured(rank0["history"]) == _measured(rank1["history"])  # metrics summed over both
    assert rank0["history"][-1]["train_loss"] < rank0["history"][0]["train_loss"]
    # ... and, each taking half of every global batch, the weights one process training alone would reach.
    data = make_dataset(n_train=64, num_classes=4).train
    torch.manual_seed(0)
    model = build_model("vit", TINY_VIT)
    norm = Normalization.from_images(data.images)
    alone = train(model, data, None, norm, TrainParams(**CONFIG))
    # The two runs differ only in float32 summation order: one process sums each weight gradient over the
    # global batch's tokens, two sum half each and add. Reordering a sum of n terms moves it by at most
    # n * u * sum|terms| (u = 2^-24), so a gradient whose terms do not cancel has a relative error below
    # n * u; AdamW's update is invariant to the gradient's scale, so its error is at most 2 * n * u of its
    # size, the learning rate, and the errors of `steps` updates add up. n: the longest reduction the split
    # changes (batch x tokens). A gradient whose terms cancel has a larger relative error, which AdamW's
    # normalization passes on whole (seen once: 1 weight in 3,072 at 1.2x the bound): so the bound holds for
    # each tensor's root-mean-square difference, and no weight may differ by more than AdamW can move it in
    # `steps` updates (about the learning rate each), twice over.
    steps = CONFIG["epochs"] * 64 // CONFIG["batch_size"]
    tokens = (32 // TINY_VIT["patch_size"]) ** 2 + 1
    atol = steps * CONFIG["learning_rate"] * 2 * CONFIG["batch_size"] * tokens * 2.0**-24
    for key, weight in model.state_dict().items():
        ddp_weight = rank0["weights"][key]
        if key.endswith("attn.qkv.bias"):
            # The key bias adds the same q.b_k to every logit of a softmax row, so its gradient is exactly 0:
            # it gets rounding noise alone, which AdamW rescales, so no bound from rounding applies to it.
            # It has no effect on the outputs either: the logits below check it. Queries' and values' do.
            ddp_weight, weight = _without_key_bias(ddp_weight), _without_key_bias(weight)
        difference = (ddp_weight - weight).double()
        assert difference.square().mean().sqrt() <= atol, key
        assert difference.abs().max() <= 2 * steps * CONFIG["learning_rate"], key
    ddp_model = build_model("vit", TINY_VIT)
    ddp_model.load_state_dict(rank0["weights"])
    with torch.no_grad():
        x = norm.to_tensor(torch.as_tensor(data.images))
        torch.testing.assert_close(ddp_model.eval()(x), model.eval()(x), rtol=0, atol=atol)
    for ddp_row, row in zip(rank0["history"], alone.history, strict=True):
        assert ddp_row["train_loss"] == pytest.approx(row["train_loss"], rel=1e-4)
        assert ddp_row["train_accuracy"] == row["train_accuracy"]
    # Rank 0 alone reports the epochs.
    assert run.stderr.count("epoch 3/3") == 1


def test_one_process_under_torchrun_trains_through_ddp_and_gloo_as_a_plain_run_would(tmp_path):
    alone = train_alone(tmp_path, "cpu", under_torchrun=True)
    assert alone["wrapped"] == ["DistributedDataParallel"]
    assert alone["backends"] == ["gloo"] * CONFIG["epochs"]
    plain = train_alone(tmp_path, "cpu", under_torchrun=False)
    assert plain["wrapped"] == ["ViT"] and plain["backends"] == [None] * CONFIG["epochs"]
    # A group of one averages each gradient over one process: the very same weights as without the group.
    assert _measured(alone["history"]) == _measured(plain["history"])
    assert all(torch.equal(alone["weights"][k], w) for k, w in plain["weights"].items())


def test_the_train_stage_under_torchrun_writes_its_outputs_from_rank_0(tmp_path):
    save_prepared(make_dataset(n_train=60, n_test=10, num_classes=4), tmp_path / "data/prepared")
    params = {
        "model": {"name": "mlp", "hidden": [8]},
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


# One process of a distilled run: a ViT with a distillation token learns from a small CNN; saves what it ends
# with under argv[1] as rank{RANK}.pt.
DISTILL_CHILD = f"""
import os, sys, torch
from cifar_fakes import make_dataset
from vitlab.checkpoint import Normalization
from vitlab.models import build_model
from vitlab.params import TrainParams
from vitlab.train import train

torch.set_num_threads(1)
data = make_dataset(n_train=64, num_classes=4).train
torch.manual_seed(0)
model = build_model("vit", {TINY_VIT!r} | {{"distillation": True}})
teacher = build_model("cnn", {{"num_classes": 4, "channels": [4]}})
start = {{k: v.clone() for k, v in model.state_dict().items()}}
train(model, data, None, Normalization.from_images(data.images), TrainParams(**{CONFIG!r}), teacher=teacher)
out = f"{{sys.argv[1]}}/rank{{os.environ['RANK']}}.pt"
torch.save({{"start": start, "weights": model.state_dict()}}, out)
"""


def test_two_processes_distilling_keep_both_heads_in_sync(tmp_path):
    _, rank0, rank1 = _run_ranks(DISTILL_CHILD, tmp_path)
    # Each process saw half of every batch: only averaged gradients of both heads end in the same weights.
    assert all(torch.equal(rank0["weights"][k], rank1["weights"][k]) for k in rank0["weights"])
    for key in ("head.weight", "head_dist.weight", "dist_token"):
        assert not torch.equal(rank0["weights"][key], rank0["start"][key]), key
