"""The train, evaluate and attention stages on tiny data: every picture and table they write, and what they
log to W&B (through a fake run)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from cifar_fakes import make_dataset
from fake_wandb import use_fake_run
from PIL import Image
from png_checks import assert_picture, inches_to_pixels

from vitlab import device, figures, stages
from vitlab.data.prepared import save_prepared
from vitlab.params import parse_params

N_TEST = 40
TRAIN = {"epochs": 3, "warmup_epochs": 1, "batch_size": 32, "device": "cpu"}
MODELS = {
    "vit": {"name": "vit", "patch_size": 8, "dim": 16, "depth": 2, "heads": 2, "mlp_dim": 32},
    "cnn": {"name": "cnn", "channels": [4, 8]},
}


@pytest.fixture(scope="module", params=["vit", "cnn"])
def pipeline(request, tmp_path_factory):
    """Train, evaluate and draw one tiny model, with every Tracker logging into one fake run."""
    monkeypatch = pytest.MonkeyPatch()
    run = use_fake_run(monkeypatch)
    root = tmp_path_factory.mktemp(request.param)
    monkeypatch.chdir(root)  # an offline W&B run would write ./wandb here; the fake writes nothing
    layout = stages.Layout.under(root)
    save_prepared(make_dataset(n_train=120, n_test=N_TEST, num_classes=10), layout.prepared_dir)
    # The other family's pictures from a run before: the attention stage must not leave them beside its own.
    layout.attention_dir.mkdir(parents=True)
    for stale in ("layer_5.png", "rollout.png") if request.param == "cnn" else ("gradcam.png",):
        (layout.attention_dir / stale).write_bytes(b"stale")
    params = parse_params(
        {
            "model": MODELS[request.param],
            "train": TRAIN,
            "evaluate": {"num_mistakes": 8},
            "attention": {"num_images": 3},
        }
    )
    for stage in ("train", "evaluate", "attention"):
        stages.stage_function(stage)(params, layout)
    yield request.param, layout, run
    monkeypatch.undo()


def test_train_writes_the_curves_and_their_animation(pipeline):
    _, layout, run = pipeline
    assert_picture(layout.train_curves, inches_to_pixels(figures.CURVES_INCHES))
    assert_picture(layout.train_gif, inches_to_pixels(figures.CURVES_INCHES, figures.GIF_DPI), kind="GIF")
    with Image.open(layout.train_gif) as gif:
        assert gif.n_frames == TRAIN["epochs"]
    media = run.media()
    assert {"training_curves", "training_progress"} <= set(media)


def test_train_metrics_hold_numbers_and_the_report_beside_them_the_machine(pipeline):
    _, layout, _ = pipeline
    metrics = json.loads(layout.train_metrics.read_text())
    assert metrics["num_parameters"] > 0 and metrics["train_images"] == 108
    assert not [key for key, value in metrics.items() if isinstance(value, str | dict)]
    run = json.loads(layout.train_run.read_text())
    assert run["device"] == "cpu" and run["hardware"].startswith(run["cpu"]["model"])
    assert run["cpu"] == device.cpu_record()  # the mode and what else decides a CPU run's bits


def test_write_metrics_keeps_the_numbers_and_moves_the_words_beside_them(tmp_path):
    metrics = {"accuracy": 0.5, "ok": True, "int8": {"bytes": 3, "quantization": "weight_only int8: ..."}}
    stages.write_metrics(
        tmp_path / "metrics.json", tmp_path / "run.json", metrics, {"cpu": {"mode": "native"}}
    )
    assert json.loads((tmp_path / "metrics.json").read_text()) == {
        "accuracy": 0.5,
        "ok": True,
        "int8": {"bytes": 3},
    }
    assert json.loads((tmp_path / "run.json").read_text()) == {
        "int8": {"quantization": "weight_only int8: ..."},
        "cpu": {"mode": "native"},
    }


def test_evaluate_writes_one_prediction_per_test_image(pipeline):
    _, layout, _ = pipeline
    predictions = pd.read_csv(layout.eval_predictions)
    assert list(predictions.columns) == ["index", "label", "predicted", "confidence", "correct", "loss"]
    assert predictions["index"].tolist() == list(range(N_TEST))
    with np.load(layout.prepared_dir / "test.npz") as test:
        labels = test["labels"]
    names = json.loads((layout.prepared_dir / "meta.json").read_text())["class_names"]
    assert predictions["label"].tolist() == [names[i] for i in labels]
    assert (predictions["correct"] == (predictions["label"] == predictions["predicted"])).all()
    assert predictions["confidence"].between(0.1 - 1e-6, 1).all()  # 10 classes: the top one has >= 1/10
    metrics = json.loads(layout.eval_metrics.read_text())
    assert predictions["correct"].mean() == pytest.approx(metrics["test_accuracy"], abs=1e-6)
    assert predictions["loss"].mean() == pytest.approx(metrics["test_loss"], abs=1e-5)


def test_evaluate_describes_the_model_it_evaluated(pipeline):
    arch, layout, _ = pipeline
    model = json.loads(layout.eval_model.read_text())
    assert model["arch"] == arch
    assert model["num_parameters"] == json.loads(layout.train_metrics.read_text())["num_parameters"]
    if arch == "vit":
        assert model["config"]["patch_size"] == 8


def test_evaluate_draws_the_confusion_matrix_per_class_accuracy_and_mistakes(pipeline):
    _, layout, _ = pipeline
    assert_picture(layout.confusion_png, (800, 700))
    assert_picture(layout.per_class_png, (700, 400))
    wrong = int((pd.read_csv(layout.eval_predictions)["correct"] == 0).sum())
    assert_picture(layout.mistakes_png, inches_to_pixels(figures.mistakes_inches(min(wrong, 8))))


def test_evaluate_logs_its_pictures_and_a_table_of_test_predictions(pipeline):
    _, layout, run = pipeline
    import wandb

    assert "evaluate" in run.job_types
    media = run.media()
    for key in ("confusion", "per_class_accuracy", "most_confident_mistakes"):
        assert isinstance(media[key], wandb.Image)
    table = media["test_predictions"]
    assert table.columns == ["image", "index", "label", "predicted", "confidence", "correct", "loss"]
    assert len(table.data) == N_TEST and isinstance(table.data[0][0], wandb.Image)
    assert run.summary["test_accuracy"] == json.loads(layout.eval_metrics.read_text())["test_accuracy"]


def test_attention_draws_attention_for_a_vit_and_grad_cam_for_a_cnn(pipeline):
    arch, layout, run = pipeline
    summary = json.loads((layout.attention_dir / "summary.json").read_text())
    expected = ["layer_0.png", "layer_1.png", "rollout.png"] if arch == "vit" else ["gradcam.png"]
    assert summary["files"] == expected
    assert sorted(p.name for p in layout.attention_dir.iterdir()) == sorted([*expected, "summary.json"])
    for name in expected:
        maps = 2 if name.startswith("layer_") else 1  # heads, or the rollout / Grad-CAM
        assert_picture(layout.attention_dir / name, inches_to_pixels(figures.overlay_inches(3, maps)))
    assert "attention" in run.job_types
    assert {name.removesuffix(".png") for name in expected} <= set(run.media())
