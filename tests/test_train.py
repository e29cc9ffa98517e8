import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from cifar_fakes import make_dataset, separable_split

from vitlab import train as train_module
from vitlab.checkpoint import Normalization
from vitlab.cli import main
from vitlab.data import augment as augment_module
from vitlab.data.augment import alternating_flips
from vitlab.data.prepared import Split, save_prepared
from vitlab.device import select_device
from vitlab.errors import VitlabError
from vitlab.evaluate import evaluate
from vitlab.models import build_model
from vitlab.models.whitening import patch_whitening
from vitlab.params import TrainParams, parse_params
from vitlab.train import split_train_val, train, warmup_cosine

REPO = Path(__file__).resolve().parents[1]


def test_split_train_val_is_seeded_disjoint_and_complete():
    split = Split(np.arange(100, dtype=np.uint8).reshape(100, 1, 1, 1).repeat(3, -1), np.arange(100))
    tr, va = split_train_val(split, 0.2, seed=3)
    _, va2 = split_train_val(split, 0.2, seed=3)
    assert len(va) == 20 and len(tr) == 80
    assert np.array_equal(va.labels, va2.labels)
    assert sorted(np.concatenate([tr.labels, va.labels]).tolist()) == list(range(100))
    assert split_train_val(split, 0.0, 0)[1] is None


def test_warmup_then_cosine_schedule():
    f = warmup_cosine(warmup_steps=4, total_steps=14)
    assert [f(s) for s in range(4)] == [0.25, 0.5, 0.75, 1.0]
    assert f(4) == 1.0
    assert math.isclose(f(9), 0.5)
    assert f(14) == pytest.approx(0.0)


def test_training_learns_a_separable_problem_and_keeps_the_best_epoch():
    data = separable_split(256)
    tr, va = split_train_val(data, 0.25, 0)
    norm = Normalization.from_images(tr.images)
    model = build_model("mlp", {"num_classes": 2, "hidden": [32]})
    seen = []
    train_params = TrainParams(epochs=4, batch_size=32, learning_rate=3e-3, warmup_epochs=1, device="cpu")
    result = train(model, tr, va, norm, train_params, on_epoch=seen.append)
    assert [row["epoch"] for row in seen] == [1, 2, 3, 4]
    assert result.history == seen
    assert result.best_val_accuracy == max(row["val_accuracy"] for row in seen) >= 0.9
    # The model is left holding the best epoch's weights.
    assert evaluate(model, va, norm, 2).accuracy == pytest.approx(result.best_val_accuracy)


TINY_VIT = ("vit", {"num_classes": 2, "dim": 16, "depth": 1, "heads": 2, "mlp_dim": 16, "dropout": 0.1})
EVERY_AUGMENTATION = {
    "augment": "randaugment",
    "mixup_alpha": 0.2,
    "cutmix_alpha": 1.0,
    "random_erasing": 0.25,
}


def _run(spec: tuple[str, dict], data: Split, **options) -> tuple[list[dict], dict[str, torch.Tensor]]:
    train_params = TrainParams(
        **{"epochs": 2, "batch_size": 32, "warmup_epochs": 1, "device": "cpu", "seed": 5} | options
    )
    torch.manual_seed(0)  # the train stage seeds before building the model, so the init is fixed too
    model = build_model(*spec)
    torch.manual_seed(123)  # training must not depend on the global RNG state when it starts
    history = train(model, data, None, Normalization.from_images(data.images), train_params).history
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in history], model.state_dict()


@pytest.mark.parametrize(
    ("spec", "options"),
    [
        (TINY_VIT, {}),
        (TINY_VIT, EVERY_AUGMENTATION),
        (("cnn", {"num_classes": 2, "channels": [4, 8]}), EVERY_AUGMENTATION),  # channels_last
    ],
    ids=["vit", "vit-every-augmentation", "cnn-every-augmentation"],
)
def test_same_seed_gives_identical_training_on_cpu(spec, options):
    data = separable_split(128, seed=1)
    (h1, w1), (h2, w2) = _run(spec, data, **options), _run(spec, data, **options)
    assert h1 == h2
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    h3, _ = _run(spec, data, **options | {"seed": 6})
    assert h3 != h1


def test_airbench_trains_on_the_whitening_of_its_training_images():
    data = separable_split(96, seed=3)
    norm = Normalization.from_images(data.images)
    model = build_model("airbench", {"num_classes": 2, "group_widths": [4, 8]})
    params = TrainParams(epochs=1, batch_size=32, warmup_epochs=0, device="cpu")
    train(model, data, None, norm, params)
    whitening, _ = patch_whitening(norm.to_tensor(torch.as_tensor(data.images)), 2)
    torch.testing.assert_close(model.whiten.weight, whitening)  # set before training, then frozen


def test_the_alternating_flip_sees_every_training_image_once_per_epoch_with_its_epoch(monkeypatch):
    calls = []

    def recording(indices, epoch):
        calls.append((epoch, indices.tolist()))
        return alternating_flips(indices, epoch)

    monkeypatch.setattr(augment_module, "alternating_flips", recording)
    data = separable_split(80, seed=4)
    _run(("cnn", {"num_classes": 2, "channels": [4]}), data, flip="alternate")
    for epoch in (1, 2):
        seen = [i for e, indices in calls if e == epoch for i in indices]
        assert sorted(seen) == list(range(80))
    assert {e for e, _ in calls} == {1, 2}


def test_bf16_autocast_trains_a_float32_model():
    data = separable_split(64, seed=2)
    fp32, _ = _run(TINY_VIT, data, amp="off")
    bf16, weights = _run(TINY_VIT, data, amp="bf16")
    assert all(w.dtype == torch.float32 for w in weights.values())
    assert all(math.isfinite(row["train_loss"]) for row in bf16)
    assert bf16 != fp32  # the forward pass really ran in bf16
    assert bf16[0]["train_loss"] == pytest.approx(fp32[0]["train_loss"], abs=0.05)


@pytest.mark.slow  # inductor compiles C++ kernels on a CPU: about 20 s
def test_compiled_model_trains_like_the_eager_one():
    data = separable_split(64, seed=3)
    spec = ("mlp", {"num_classes": 2, "hidden": [8]})
    (eager, w_eager), (compiled, w_compiled) = _run(spec, data), _run(spec, data, compile=True)
    assert w_compiled.keys() == w_eager.keys()  # the model itself, not the compiled wrapper
    for row, row_eager in zip(compiled, eager, strict=True):
        assert row["train_loss"] == pytest.approx(row_eager["train_loss"], rel=1e-5)


def test_a_time_budget_stops_training_and_anneals_the_learning_rate_by_the_clock(capsys):
    data = separable_split(128, seed=4)
    norm = Normalization.from_images(data.images)
    model = build_model(*TINY_VIT)
    train_params = TrainParams(
        epochs=10_000, warmup_epochs=100, batch_size=16, device="cpu", time_budget_s=2.0
    )
    result = train(model, data, None, norm, train_params)
    assert 2.0 <= result.wall_time_s < 60
    assert 1 <= len(result.history) < train_params.epochs
    lrs = [row["lr"] for row in result.history]
    assert (
        lrs[-1] < 0.2 * train_params.learning_rate
    )  # the cosine reached its end with the budget, not the epochs
    log = capsys.readouterr().err
    assert re.search(r"^epoch 1 \(\d+/2 s\)  loss", log, re.MULTILINE)  # progress by the clock
    assert "/10000" not in log


def test_unavailable_device_is_a_clear_error():
    if not torch.cuda.is_available():
        with pytest.raises(VitlabError, match=r"train\.device='cuda' is not available"):
            select_device("cuda")
    assert select_device("cpu").type == "cpu"
    assert select_device("auto").type in {"cuda", "mps", "cpu"}


def test_evaluate_confusion_and_per_class_accuracy():
    class Fixed(torch.nn.Module):
        def forward(self, x):  # predicts class 0 for every image
            return torch.tensor([[2.0, 0.0, 0.0]]).expand(len(x), 3)

    split = Split(np.zeros((4, 32, 32, 3), np.uint8), np.array([0, 0, 1, 2]))
    result = evaluate(Fixed(), split, Normalization((0.5,) * 3, (0.5,) * 3), 3)
    assert result.accuracy == 0.5
    assert result.per_class_accuracy == [1.0, 0.0, 0.0]
    assert result.confusion.tolist() == [[2, 0, 0], [1, 0, 0], [1, 0, 0]]
    assert result.predictions.tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"augment": "trivialaugment"}, "train.augment: got 'trivialaugment'"),
        ({"random_erasing": 1.5}, "train.random_erasing: got 1.5; allowed: >= 0.0 and <= 1.0"),
        ({"time_budget_s": 0}, "train.time_budget_s: got 0; allowed: > 0.0"),
        ({"amp": "fp16"}, "train.amp: got 'fp16'"),
    ],
)
def test_bad_train_options_are_one_line_errors_naming_the_key(train, message):
    with pytest.raises(VitlabError, match=re.escape(message)):
        parse_params({"train": train})


# Diverges with learning_rate 100 and no warmup within 2 epochs of 4 steps (that of test_report_stages).
DIVERGING_VIT = ("vit", {"num_classes": 2, "patch_size": 8, "dim": 16, "depth": 2, "heads": 2, "mlp_dim": 32})
DIVERGED = re.compile(
    r"training diverged at epoch (\d)/(\d+), step (\d+)/(\d+) \((.*)\): lower train\.learning_rate "
    r"\(now ([\d.e+-]+)\), raise train\.warmup_epochs \(now ([\d.]+)\) or check the data; "
    r"the same params would diverge again"
)


def _diverging(spec, data, tmp_path, **options) -> tuple[VitlabError, list[dict], Path]:
    """Train until the VitlabError that stops a diverged run: it, the epochs reported, the state file."""
    base = {"epochs": 2, "batch_size": 32, "learning_rate": 1e-3, "warmup_epochs": 1, "device": "cpu"}
    base["seed"] = 5
    train_params = TrainParams(**base | options)
    torch.manual_seed(0)
    model = build_model(*spec) if isinstance(spec, tuple) else spec
    seen, state = [], tmp_path / "state.pt"
    with pytest.raises(VitlabError) as error:
        train(model, data, None, Normalization.from_images(data.images), train_params, seen.append, state)
    assert "\n" not in str(error.value)
    return error.value, seen, state


def _assert_no_state_of(epoch: int, state: Path) -> None:
    """The resume state holds the epoch before the diverged one (no file for epoch 1), with finite weights."""
    if epoch == 1:
        assert not state.exists()
        return
    saved = torch.load(state, weights_only=True)
    assert saved["epoch"] == epoch - 1
    for weights in (saved["model"], saved["best_model"]):
        assert all(w.isfinite().all() for w in weights.values())


def test_a_diverging_run_stops_at_once_naming_the_step_and_the_params_to_change(tmp_path):
    error, seen, state = _diverging(
        DIVERGING_VIT, separable_split(128, seed=1), tmp_path, learning_rate=100, warmup_epochs=0
    )
    found = DIVERGED.fullmatch(str(error))
    assert found, error
    epoch, epochs, step, steps, what, lr, warmup = found.groups()
    assert (epochs, steps, lr, warmup) == ("2", "4", "100", "0")
    assert 1 <= int(step) <= 4
    assert re.fullmatch(r"loss \S+, gradient norm \S+", what)
    assert not all(math.isfinite(float(v)) for v in re.findall(r"(?:loss|norm) (\S+?)(?:,|$)", what))
    assert [row["epoch"] for row in seen] == list(range(1, int(epoch)))  # the diverged epoch is not reported
    _assert_no_state_of(int(epoch), state)


def _poisoned_cross_entropy(monkeypatch, call: int) -> None:
    """The loss of the ``call``-th training step (1-based) becomes NaN, gradients and all."""
    calls = iter(range(1, 10**6))
    cross_entropy = torch.nn.functional.cross_entropy

    def poisoned(*args, **kwargs):
        loss = cross_entropy(*args, **kwargs)
        return loss * math.nan if next(calls) == call else loss

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", poisoned)


@pytest.mark.parametrize("every", [1, 3], ids=["read-every-step", "read-every-3-steps"])
def test_a_nan_loss_names_its_own_step_however_often_the_check_reads(tmp_path, monkeypatch, every):
    # Every 3 steps: as on a GPU, where reading each step would stall it; the NaN of step 2 is read at 3.
    monkeypatch.setitem(train_module._CHECK_EVERY, "cpu", every)
    _poisoned_cross_entropy(monkeypatch, call=4 + 2)  # 4 steps an epoch: epoch 2, step 2
    error, seen, state = _diverging(TINY_VIT, separable_split(128, seed=1), tmp_path, epochs=3)
    assert str(error).startswith("training diverged at epoch 2/3, step 2/4 (loss nan, gradient norm nan): ")
    assert DIVERGED.fullmatch(str(error))
    assert [row["epoch"] for row in seen] == [1]
    _assert_no_state_of(2, state)


def test_an_infinite_gradient_with_a_finite_loss_stops_training(tmp_path):
    torch.manual_seed(0)
    model = build_model(*TINY_VIT)
    calls = iter(range(1, 10**6))
    model.head.weight.register_hook(lambda g: torch.full_like(g, math.inf) if next(calls) == 3 else g)
    error, seen, state = _diverging(model, separable_split(128, seed=1), tmp_path)
    assert re.match(
        r"training diverged at epoch 1/2, step 3/4 \(loss \d\.\d+, gradient norm inf\): ", str(error)
    )
    assert seen == []
    _assert_no_state_of(1, state)


def test_weights_that_overflow_at_the_last_step_of_an_epoch_stop_training(tmp_path):
    # A weight decay past float32's range makes AdamW's decoupled decay overflow the weights, while the
    # loss and gradient of that step are finite: only the check of the weights at the epoch's end sees it.
    error, _, state = _diverging(
        TINY_VIT, separable_split(32, seed=1), tmp_path, batch_size=32, weight_decay=1e45, warmup_epochs=0
    )
    assert re.match(
        r"training diverged at epoch 1/2, step 1/1 \(weights not finite after it; loss \d\.\d+, "
        r"gradient norm \d\.\d+\): lower train\.learning_rate \(now 0\.001\), raise train\.warmup_epochs",
        str(error),
    )
    _assert_no_state_of(1, state)


def test_bf16_names_train_amp_among_the_params_to_change(tmp_path, monkeypatch):
    _poisoned_cross_entropy(monkeypatch, call=1)
    error, _, _ = _diverging(TINY_VIT, separable_split(32, seed=1), tmp_path, amp="bf16")
    assert ", set train.amp to off (now bf16) or check the data" in str(error)


def _stage_folder(folder: Path, model: dict, train_options: dict) -> None:
    """Prepared fake data and a params.yaml in ``folder``: what the train stage reads."""
    save_prepared(make_dataset(n_train=120, n_test=10, num_classes=4), folder / "data" / "prepared")
    train_options = {"epochs": 2, "batch_size": 32, "device": "cpu"} | train_options
    (folder / "params.yaml").write_text(yaml.safe_dump({"model": model, "train": train_options}))


def _assert_no_result(folder: Path) -> None:
    """Nothing that could pass for a trained model: no checkpoint, no metrics, no history."""
    assert not (folder / "models" / "model.pt").exists()
    assert not (folder / "reports" / "train").exists()


def test_the_train_stage_of_a_diverging_run_fails_in_one_line_and_saves_no_result(
    tmp_path, monkeypatch, capsys
):
    vit = {"name": "vit", "patch_size": 8, "dim": 16, "depth": 2, "heads": 2, "mlp_dim": 32}
    _stage_folder(tmp_path, vit, {"learning_rate": 100, "warmup_epochs": 0})
    monkeypatch.chdir(tmp_path)
    assert main(["stage", "train"]) == 2
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.startswith("error: training diverged at epoch ")
    found = DIVERGED.fullmatch(err.removeprefix("error: "))
    assert found and found.group(6, 7) == ("100", "0"), err
    _assert_no_result(tmp_path)
    _assert_no_state_of(int(found.group(1)), tmp_path / "models" / "train_state.pt")


# Under torchrun: the gradient norm rank 1 sees at its 6th step (epoch 2, step 2) is infinite, on rank 1
# alone: rank 0, with nothing wrong in sight, must stop too rather than wait for it in the next collective.
DDP_STAGE = """
import math, os, sys, torch
from vitlab import train
from vitlab.cli import main

if os.environ["RANK"] == "1":
    norms, calls = train._grad_norm, iter(range(1, 10**6))
    train._grad_norm = lambda params, clip: norms(params, clip) * (math.inf if next(calls) == 6 else 1)
sys.exit(main(["stage", "train"]))
"""


def test_under_torchrun_every_process_stops_at_the_step_one_of_them_diverged(tmp_path):
    _stage_folder(tmp_path, {"name": "mlp", "hidden": [8]}, {"warmup_epochs": 1})
    script = tmp_path / "stage.py"
    script.write_text(DDP_STAGE)
    path = os.pathsep.join([str(Path(__file__).parent), *filter(None, [os.environ.get("PYTHONPATH")])])
    env = os.environ | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    run = subprocess.run(
        [*torchrun, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120
    )
    assert run.returncode != 0
    errors = [line for line in run.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 2, run.stderr  # one per process: each stopped
    assert errors[0] == errors[1]
    assert re.match(
        r"error: training diverged at epoch 2/2, step 2/4 \(loss \d\.\d+, gradient norm inf\)", errors[0]
    )
    _assert_no_result(tmp_path)
    _assert_no_state_of(2, tmp_path / "models" / "train_state.pt")


def test_without_a_validation_split_the_metrics_say_null_not_nan(tmp_path, monkeypatch, capsys):
    _stage_folder(tmp_path, {"name": "mlp", "hidden": [8]}, {"warmup_epochs": 1})
    params = yaml.safe_load((tmp_path / "params.yaml").read_text()) | {"data": {"val_fraction": 0.0}}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    monkeypatch.chdir(tmp_path)
    assert main(["stage", "train"]) == 0
    text = (tmp_path / "reports" / "train" / "metrics.json").read_text()
    metrics = json.loads(text, parse_constant=lambda name: pytest.fail(f"{name} in metrics.json"))
    assert metrics["best_val_accuracy"] is None and metrics["best_epoch"] == 2
    assert "no validation split: the last epoch (2) kept" in capsys.readouterr().out
    # dvc.yaml's plots of the history survive a run without validation: DVC drops a plot naming a missing
    # column. Shown by DVC itself, from dvc.yaml's own plot definitions.
    history = tmp_path / "reports" / "train" / "history.tsv"
    plotted = [
        plot
        for plot in yaml.safe_load((REPO / "dvc.yaml").read_text())["plots"]
        if isinstance(plot, dict) and str(history.relative_to(tmp_path)) in next(iter(plot.values()))["y"]
    ]
    assert {"Accuracy", "Loss"} <= {name for plot in plotted for name in plot}
    shown = tmp_path / "shown"
    (shown / "reports" / "train").mkdir(parents=True)
    (shown / "reports" / "train" / "history.tsv").write_bytes(history.read_bytes())
    (shown / "dvc.yaml").write_text(yaml.safe_dump({"plots": plotted}))
    dvc = [sys.executable, "-m", "dvc"]
    subprocess.run([*dvc, "init", "--no-scm", "-q"], cwd=shown, check=True)
    done = subprocess.run([*dvc, "plots", "show", "--json"], cwd=shown, capture_output=True, text=True)
    plots = json.loads(done.stdout)
    assert "errors" not in plots, plots["errors"]
    assert all(plots["data"][name] for plot in plotted for name in plot)
