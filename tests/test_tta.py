"""Test-time augmentation (evaluate.tta): what evaluation averages, and the exported model doing the same."""

import json

import numpy as np
import onnx
import onnxruntime as ort
import pandas as pd
import pytest
import torch
from cifar_fakes import make_dataset
from fake_wandb import use_fake_run
from serving_fixtures import NORM, cifar_images, class_names, random_model

from vitlab import stages
from vitlab.data.prepared import Split, save_prepared
from vitlab.errors import VitlabError
from vitlab.evaluate import evaluate, predict_logits
from vitlab.export import export_onnx, verify_onnx
from vitlab.inference import Classifier
from vitlab.models import build_model, eval_mode
from vitlab.models.tta import TTA, views_per_image, with_tta
from vitlab.params import parse_params


def _shifted(x: torch.Tensor, step: int) -> torch.Tensor:
    """``x`` (B, C, H, W) with its content moved one pixel down-right (step 1) or up-left (step -1), the
    border reflected (pixel 1 fills the gap at 0), written out by index rather than by padding."""
    h, w = x.shape[-2:]

    def rows(n: int) -> list[int]:
        return [1, *range(n - 1)] if step == 1 else [*range(1, n), n - 2]

    return x[..., rows(h), :][..., rows(w)]


def test_flip_averages_the_logits_of_the_image_and_its_mirror_image():
    model = random_model("cnn")
    x = NORM.to_tensor(torch.as_tensor(cifar_images(4)[0]))
    with torch.no_grad():
        expected = (model(x) + model(x.flip(-1))) / 2
        torch.testing.assert_close(TTA(model, "flip")(x), expected)
        # So its predictions cannot tell an image from its mirror image; the model's own can.
        torch.testing.assert_close(TTA(model, "flip")(x.flip(-1)), expected)
        assert not torch.allclose(model(x.flip(-1)), model(x), atol=1e-3)


def test_flip_translate_adds_the_pair_shifted_a_pixel_each_way_at_half_the_weight():
    model = random_model("cnn")
    x = NORM.to_tensor(torch.as_tensor(cifar_images(3)[0]))
    with torch.no_grad():

        def pair(v: torch.Tensor) -> torch.Tensor:
            return (model(v) + model(v.flip(-1))) / 2

        expected = pair(x) / 2 + (pair(_shifted(x, 1)) + pair(_shifted(x, -1))) / 4
        torch.testing.assert_close(TTA(model, "flip_translate")(x), expected)
    assert [views_per_image(mode) for mode in ("none", "flip", "flip_translate")] == [1, 2, 6]


def test_evaluation_scores_the_averaged_logits_whatever_the_batch_size():
    model = random_model("vit").train()
    images, labels = cifar_images(40)
    for mode in ("flip", "flip_translate"):
        with eval_mode(model), torch.no_grad():
            expected = TTA(model, mode)(NORM.to_tensor(torch.as_tensor(images)))
        for batch_size in (1, 7, 512):
            torch.testing.assert_close(predict_logits(model, images, NORM, batch_size, tta=mode), expected)
        result = evaluate(model, Split(images, labels), NORM, 10, tta=mode)
        assert (result.predictions == expected.argmax(1).numpy()).all()
    assert model.training  # evaluated in eval mode, given back in its own
    plain = predict_logits(model, images, NORM, 64)
    assert not torch.allclose(plain, predict_logits(model, images, NORM, 64, tta="flip"), atol=1e-3)
    with pytest.raises(ValueError, match="unknown test-time augmentation 'mirror'"):
        with_tta(model, "mirror")


@pytest.mark.parametrize("mode", ["flip", "flip_translate"])
@pytest.mark.parametrize("arch", ["vit", "cnn", "airbench"])
def test_the_exported_model_predicts_what_evaluation_scored(tmp_path, arch, mode):
    model = (
        random_model(arch) if arch != "airbench" else build_model("airbench", {"group_widths": [8, 16, 16]})
    )
    path = export_onnx(model.eval(), tmp_path / "model.onnx", class_names(), NORM, ort_fusions=True, tta=mode)
    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
    assert meta.custom_metadata_map["tta"] == mode
    images, _ = cifar_images(50)
    evaluated = predict_logits(model, images, NORM, 16, tta=mode)
    served = Classifier(path, provider="cpu").predict(images, batch_size=13)  # vitlab predict's path
    np.testing.assert_allclose(served, evaluated.double().softmax(1).numpy(), atol=1e-5, rtol=0)
    check = verify_onnx(path, model, images, NORM, batch_size=16, tta=mode)
    assert check["max_abs_diff"] <= 1e-4 and check["top1_agreement"] == 1.0
    # Checked against the model without its test-time augmentation, the same file fails.
    assert verify_onnx(path, model, images, NORM, tta="none")["max_abs_diff"] > 1e-3


def test_the_plain_export_records_no_tta_and_the_attention_model_refuses_one(tmp_path):
    model = random_model("vit")
    path = export_onnx(model, tmp_path / "model.onnx", class_names(), NORM)
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert props["tta"] == "none" and json.loads(props["class_names"]) == class_names()
    with pytest.raises(VitlabError, match="the attention model has none"):
        export_onnx(model, tmp_path / "attention.onnx", class_names(), NORM, with_attention=True, tta="flip")


def test_the_stages_serve_what_evaluation_scored_with_test_time_augmentation(tmp_path, monkeypatch):
    # airbench with the alternating flip through train, evaluate, export and inference (ONNX Runtime).
    use_fake_run(monkeypatch)
    monkeypatch.chdir(tmp_path)
    layout = stages.Layout.under(tmp_path)
    save_prepared(make_dataset(n_train=120, n_test=60, num_classes=10), layout.prepared_dir)
    params = parse_params(
        {
            "model": {"preset": "airbench", "group_widths": [8, 16]},
            "train": {
                "epochs": 2,
                "warmup_epochs": 1,
                "batch_size": 32,
                "device": "cpu",
                "flip": "alternate",
            },
            "evaluate": {"tta": "flip_translate"},
        }
    )
    for stage in ("train", "evaluate", "export", "inference"):
        stages.stage_function(stage)(params, layout)
    evaluated = json.loads(layout.eval_metrics.read_text())["test_accuracy"]
    served = json.loads(layout.inference_metrics.read_text())["onnxruntime_test_accuracy"]
    assert served == pytest.approx(evaluated, abs=1e-6)
    evaluated_rows, served_rows = (
        pd.read_csv(path) for path in (layout.eval_predictions, layout.predictions)
    )
    assert served_rows["predicted"].tolist() == evaluated_rows["predicted"].tolist()
    np.testing.assert_allclose(served_rows["confidence"], evaluated_rows["confidence"], atol=2e-6)
    props = {p.key: p.value for p in onnx.load(layout.onnx).metadata_props}
    assert props["tta"] == "flip_translate"
    assert json.loads(layout.export_metrics.read_text())["max_abs_diff"] <= 1e-4
