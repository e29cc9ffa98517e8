"""vitlab's CUDA path through its own train, evaluate and checkpoint code: device auto-selection, bf16
autocast, TF32, channels_last, resume, DDP over NCCL in a group of one, a checkpoint loaded onto the GPU.

Every test is marked ``cuda``: without a CUDA device it is skipped (conftest.py), so CI collects and skips
them; ``bash benchmarks/gpu_check.sh OUT`` runs them on a GPU machine and records each outcome in its JSON.
They import only what such a machine has beside torch and the check's wheels (no dvc, wandb or typer).
"""

import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from cifar_fakes import separable_split
from test_ddp import train_alone
from torch import nn

from vitlab.checkpoint import Normalization, load_checkpoint, save_checkpoint
from vitlab.data.prepared import Split
from vitlab.device import select_device
from vitlab.evaluate import evaluate
from vitlab.models import build_model
from vitlab.params import TrainParams
from vitlab.train import TrainResult, split_train_val, train

pytestmark = pytest.mark.cuda

TINY_VIT = ("vit", {"num_classes": 2, "patch_size": 8, "dim": 32, "depth": 2, "heads": 2, "mlp_dim": 64})
TINY_RESNET = ("resnet", {"num_classes": 2, "widths": [8, 16], "blocks": [1, 1]})
# train.device stays "auto" (and train.amp "auto"): the tests check what vitlab picks on a GPU machine.
OPTIONS = {"epochs": 3, "batch_size": 32, "learning_rate": 3e-3, "warmup_epochs": 1}
TRAIN, VAL = split_train_val(separable_split(256, seed=1), 0.25, 0)
NORM = Normalization.from_images(TRAIN.images)


def _model(spec: tuple[str, dict]) -> nn.Module:
    torch.manual_seed(0)  # the same starting weights each time: a resumed run must find its own state
    return build_model(*spec)


def _fit(
    model: nn.Module,
    on_epoch: Callable[[dict[str, float]], Any] | None = None,
    state_path: Path | None = None,
    **options: Any,
) -> TrainResult:
    """``train`` on 192 dark-or-bright images, validated on 64, with OPTIONS and ``options``."""
    return train(model, TRAIN, VAL, NORM, TrainParams(**OPTIONS | options), on_epoch, state_path)


def _accuracy(model: nn.Module, split: Split, norm: Normalization) -> float:
    return evaluate(model, split, norm, num_classes=2, device="cuda").accuracy


def test_auto_selects_the_gpu_and_trains_there():
    assert select_device("auto").type == "cuda"
    model = _model(TINY_VIT)
    result = _fit(model)
    assert result.device == "cuda"
    assert all(p.is_cuda for p in model.parameters())
    assert result.metrics(0, len(TRAIN))["hardware"] == torch.cuda.get_device_name()
    assert result.best_val_accuracy >= 0.9


@pytest.mark.parametrize(("amp", "training_dtype"), [("auto", torch.bfloat16), ("off", torch.float32)])
def test_autocast_runs_the_training_forward_in_bf16_unless_off_and_keeps_fp32_weights(amp, training_dtype):
    assert torch.cuda.is_bf16_supported()
    model = _model(TINY_VIT)
    seen = set()
    model.head.register_forward_hook(lambda module, args, out: seen.add((module.training, out.dtype)))
    result = _fit(model, amp=amp)
    # Validation (eval mode) runs outside autocast, in fp32.
    assert seen == {(True, training_dtype), (False, torch.float32)}
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert all(math.isfinite(row["train_loss"]) for row in result.history)


def test_training_turns_on_tf32_matrix_products_and_the_cudnn_autotuner():
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.benchmark = False
    _fit(_model(TINY_VIT))
    assert torch.backends.cuda.matmul.allow_tf32
    assert torch.backends.cudnn.allow_tf32
    assert torch.backends.cudnn.benchmark
    # The GPU really rounds fp32 products to TF32's 10-bit mantissa: relative errors near 1e-3, where fp32
    # accumulation stays near 1e-7.
    a, b = torch.randn(2, 1024, 1024, dtype=torch.float64, device="cuda")
    exact = a @ b
    error = ((a.float() @ b.float()).double() - exact).abs().max() / exact.abs().max()
    assert error > 1e-5


def test_conv_nets_train_channels_last_on_the_gpu():
    model = _model(TINY_RESNET)
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    layouts = set()
    convs[0].register_forward_pre_hook(
        lambda module, args: layouts.add(
            (module.training, args[0].is_contiguous(memory_format=torch.channels_last))
        )
    )
    _fit(model)
    assert (True, True) in layouts and (True, False) not in layouts  # every training batch
    assert all(conv.weight.is_contiguous(memory_format=torch.channels_last) for conv in convs)


class _Stop(Exception):
    """Stands for a run killed after an epoch's state was saved."""


def test_a_stopped_run_resumes_on_the_gpu_and_its_checkpoint_loads_there(tmp_path, capsys):
    state = tmp_path / "train_state.pt"
    first: list[dict] = []

    def stop_after_epoch_2(row: dict) -> None:
        first.append(row)
        if row["epoch"] == 2:
            raise _Stop

    with pytest.raises(_Stop):
        _fit(_model(TINY_VIT), stop_after_epoch_2, state)
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == 2
    assert "cuda" in saved["rng"][0]  # the GPU's generator is saved with the CPU's

    model, resumed = _model(TINY_VIT), []
    result = _fit(model, resumed.append, state)
    assert "resuming from" in capsys.readouterr().err
    assert [row["epoch"] for row in resumed] == [3]
    assert result.history == [*first, *resumed]

    path = tmp_path / "model.pt"
    save_checkpoint(path, model, ["dark", "bright"], NORM, "separable")
    loaded = load_checkpoint(path, device="cuda")
    assert all(p.is_cuda for p in loaded.model.parameters())
    assert _accuracy(loaded.model, VAL, loaded.normalization) == _accuracy(model, VAL, NORM)
    assert _accuracy(model, VAL, NORM) == result.best_val_accuracy


def test_ddp_over_nccl_trains_in_a_group_of_one_process(tmp_path):
    alone = train_alone(tmp_path, "auto", under_torchrun=True)
    assert alone["wrapped"] == ["DistributedDataParallel"]
    assert alone["backends"] == ["nccl"] * len(alone["history"])
    assert alone["device"] == "cuda:0"
    assert all(math.isfinite(row["train_loss"]) for row in alone["history"])
