"""Grayscale 28x28 data (MNIST's geometry) end to end through the stages: download, validate, train, evaluate,
attention, export and inference, then `vitlab predict` on PNG files of any size and mode."""

import dataclasses
import json

import numpy as np
import onnx
import pytest
import torch
from idx_fakes import make_mnist_folder
from PIL import Image
from png_checks import assert_picture, inches_to_pixels

from vitlab.attention import render_attention
from vitlab.checkpoint import Normalization, load_checkpoint
from vitlab.cli import main
from vitlab.data.prepared import load_prepared
from vitlab.data.sources import DATASETS
from vitlab.errors import VitlabError
from vitlab.figures import overlay_inches
from vitlab.models import build_model
from vitlab.params import parse_params
from vitlab.stages import Layout, stage_function

N_TRAIN, N_TEST = 120, 40


@pytest.fixture(scope="module")
def mnist_run(tmp_path_factory):
    """Every stage on fake MNIST files made official (their md5s in the table), with a tiny ViT."""
    root = tmp_path_factory.mktemp("mnist")
    md5s = make_mnist_folder(root / "files", n_train=N_TRAIN, n_test=N_TEST)
    fake = dataclasses.replace(DATASETS["mnist"], file_md5s=md5s, num_train=N_TRAIN, num_test=N_TEST)
    patch = pytest.MonkeyPatch()
    patch.setitem(DATASETS, "mnist", fake)
    params = parse_params(
        {
            "data": {"dataset": "mnist", "source": str(root / "files")},
            # Random pixels, not digits: mean ~127.5, std ~74, outside MNIST's ranges.
            "validate": {"pixel_mean_min": 100.0, "pixel_mean_max": 160.0, "pixel_std_max": 90.0},
            "model": {"preset": None, "dim": 16, "depth": 2, "heads": 2, "mlp_dim": 32, "patch_size": 4},
            "train": {"epochs": 1, "warmup_epochs": 0, "batch_size": 32, "device": "cpu"},
            "attention": {"num_images": 2},
            "export": {"max_int8_accuracy_drop": 100.0},
        }
    )
    layout = Layout.under(root)
    try:
        for name in ("download", "validate", "train", "evaluate", "attention", "export", "inference"):
            stage_function(name)(params, layout)
        yield layout
    finally:
        patch.undo()


def test_the_data_is_grayscale_28x28_and_the_dataset_defaults_apply(mnist_run):
    dataset = load_prepared(mnist_run.prepared_dir)
    assert dataset.train.images.shape == (N_TRAIN, 28, 28, 1) and dataset.info["official"] is True
    assert dataset.class_names == [str(d) for d in range(10)]
    validation = json.loads(mnist_run.validation.read_text())
    assert validation["success"]
    checks = {(e["column"], e["expectation"]): e for e in validation["splits"]["train"]["expectations"]}
    assert checks[("channels", "expect_column_values_to_be_in_set")]["kwargs"]["value_set"] == [1]
    assert checks[("height", "expect_column_values_to_be_in_set")]["kwargs"]["value_set"] == [28]


def test_the_model_is_built_for_the_data_and_refuses_other_images(mnist_run):
    ckpt = load_checkpoint(mnist_run.checkpoint, geometry=(28, 1))
    assert (ckpt.model.config.image_size, ckpt.model.config.in_channels, ckpt.model.grid_size) == (28, 1, 7)
    assert len(ckpt.normalization.mean) == 1
    with pytest.raises(VitlabError) as error:
        load_checkpoint(mnist_run.checkpoint, geometry=(32, 3))
    assert str(error.value) == (
        f"{mnist_run.checkpoint}: a model for 28x28x1 images (mnist), not for these 32x32x3 ones: "
        "train it on this dataset"
    )


def test_attention_maps_on_the_7x7_grid_draw_the_grayscale_images(mnist_run):
    summary = json.loads((mnist_run.attention_dir / "summary.json").read_text())
    assert summary["patch_grid"] == [7, 7] and summary["files"] == [
        "layer_0.png",
        "layer_1.png",
        "rollout.png",
    ]
    pixels = assert_picture(mnist_run.attention_dir / "rollout.png", inches_to_pixels(overlay_inches(2, 1)))
    assert pixels.shape[-1] == 3
    assert_picture(mnist_run.mistakes_png, Image.open(mnist_run.mistakes_png).size)


def test_the_onnx_model_records_its_geometry(mnist_run):
    model = onnx.load(mnist_run.onnx)
    props = {p.key: p.value for p in model.metadata_props}
    assert (props["image_size"], props["channels"]) == ("28", "1")
    assert props["input_layout"].startswith("NCHW float32 grayscale 28x28")
    assert [d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim[1:]] == [1, 28, 28]
    metrics = json.loads(mnist_run.inference_metrics.read_text())
    assert 0.0 <= metrics["onnxruntime_test_accuracy"] <= 1.0


def test_predict_converts_any_picture_to_what_the_model_takes(mnist_run, tmp_path, capsys):
    test = load_prepared(mnist_run.prepared_dir).test
    Image.fromarray(test.images[0, :, :, 0]).save(tmp_path / "digit.png")  # mode L, 28x28: as is
    Image.fromarray(np.repeat(test.images[1], 3, axis=2)).resize((84, 56)).save(tmp_path / "photo.png")
    assert main(["predict", str(mnist_run.onnx), str(tmp_path), "--json", "--top-k", "1"]) == 0
    predictions = {
        p["path"].rsplit("/", 1)[-1]: p for p in json.loads(capsys.readouterr().out)["predictions"]
    }
    assert predictions["photo.png"]["error"] is None
    ckpt = load_checkpoint(mnist_run.checkpoint)
    with torch.no_grad():
        logits = ckpt.model(ckpt.normalization.to_tensor(torch.as_tensor(test.images[:1])))
    assert predictions["digit.png"]["labels"] == [ckpt.class_names[int(logits.argmax())]]
    assert predictions["digit.png"]["probabilities"][0] == pytest.approx(
        float(logits.softmax(1).max()), abs=1e-5
    )


def test_grad_cam_of_a_cnn_on_grayscale_images(tmp_path):
    model = build_model("cnn", {"image_size": 28, "in_channels": 1, "channels": [8, 8, 8, 8]})  # 28-14-7-3-1
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28, 1), dtype=np.uint8)
    norm = Normalization.from_images(images)
    summary = render_attention(model, images, [0, 1, 2], [str(d) for d in range(10)], norm, tmp_path)
    assert summary["method"] == "grad-cam" and summary["feature_grid"] == [3, 3]
    assert_picture(tmp_path / "gradcam.png", inches_to_pixels(overlay_inches(3, 1)))
