import json
import typing

import numpy as np
import onnx
import pytest
import torch
from serving_fixtures import MODELS, NORM, SAMPLE, class_names, export_plain_onnx, random_model

from vitlab.data.archive import extract_archive, parse_cifar
from vitlab.data.sources import DATASETS
from vitlab.errors import VitlabError
from vitlab.export import (
    QUANTIZATION_METHODS,
    compare_accuracy,
    ensure_int8_accuracy,
    export_onnx,
    quantize_onnx,
)
from vitlab.inference import Classifier
from vitlab.models import build_model
from vitlab.params import ExportParams, TrainParams
from vitlab.train import train

# Every value params.yaml may choose for export.quantize: each one is quantized and checked below.
METHODS = typing.get_args(ExportParams.model_fields["quantize"].annotation)


def test_every_allowed_method_is_one_the_code_implements():
    assert set(METHODS) == set(QUANTIZATION_METHODS)
    assert ExportParams().quantize == "weight_only"


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    folder = extract_archive(SAMPLE, tmp_path_factory.mktemp("sample") / "extracted")
    return parse_cifar(folder, DATASETS["cifar10-sample"])


@pytest.fixture(scope="module")
def fp32(sample, tmp_path_factory):
    """A small ViT trained for a few seconds on the real sample: well above chance, so accuracy means
    something, with the small logit margins of a real model, where int8 rounding flips predictions."""
    torch.manual_seed(0)  # the initial weights: train() seeds only what it draws itself
    model = build_model("vit", MODELS["vit"])
    train_params = TrainParams(epochs=4, batch_size=64, learning_rate=2e-3, warmup_epochs=0.5, device="cpu")
    train(model, sample.train, None, NORM, train_params)
    # Fused, as the export stage ships it: int8 is derived from that graph.
    folder = tmp_path_factory.mktemp("fp32")
    return export_onnx(model.eval(), folder / "model.onnx", sample.class_names, NORM, ort_fusions=True)


@pytest.fixture(scope="module", params=METHODS)
def int8(request, fp32, sample, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param) / "model.int8.onnx"
    return request.param, quantize_onnx(
        fp32, path, request.param, calibration_images=sample.train.images[:256]
    )


def test_int8_model_is_a_checked_smaller_file_that_serves_with_the_same_metadata(fp32, int8, sample):
    method, path = int8
    assert [p.name for p in path.parent.iterdir()] == ["model.int8.onnx"]  # no temporary file left
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    ops = {node.op_type for node in proto.graph.node}
    assert ops & {"MatMulNBits", "QuantizeLinear"}
    assert not ops & {"DynamicQuantizeLinear", "DynamicQuantizeMatMul"}  # no scale computed from the batch
    props = {p.key: p.value for p in proto.metadata_props}
    fp32_props = {p.key: p.value for p in onnx.load(fp32).metadata_props}
    assert props == {**fp32_props, "quantization": props["quantization"]}
    assert props["quantization"].startswith(method)
    # QDQ keeps fp32 copies of what the fused operators (SkipLayerNormalization, BiasGelu) read.
    assert path.stat().st_size < fp32.stat().st_size * (0.6 if method == "weight_only" else 0.65)

    classifier = Classifier(path, provider="cpu")
    assert classifier.class_names == sample.class_names == json.loads(props["class_names"])
    probabilities = classifier.predict(sample.test.images[:5])
    assert probabilities.shape == (5, 10)
    np.testing.assert_allclose(probabilities.sum(1), 1.0, atol=1e-9)


def test_int8_accuracy_stays_close_to_fp32_on_real_test_images(fp32, int8, sample):
    method, path = int8
    result = compare_accuracy(fp32, path, sample.test.images, sample.test.labels)
    assert result["num_images"] == 500
    assert result["fp32_accuracy"] > 0.22  # trained: chance is 0.10
    # The 1-point target is the shipped default's. Static QDQ also rounds every activation to ranges fixed
    # in advance, so it flips more of this barely trained model's close calls (measured: 1-2 points).
    max_points, min_agreement = (1.0, 0.98) if method == "weight_only" else (2.0, 0.9)
    assert abs(result["accuracy_delta_points"]) <= max_points
    assert result["top1_agreement"] >= min_agreement
    # Alone or 256 at a time, every image gets the same probabilities, bit for bit.
    assert result["batch_size"] == 256
    assert result["int8_accuracy_batch1"] == result["int8_accuracy"]
    assert result["top1_batch_changes"] == result["probability_batch_changes"] == 0
    assert result["max_probability_batch_diff"] == 0.0
    assert result["quantization"].startswith(method)
    ensure_int8_accuracy(result, max_drop_points=max_points)


def _dynamic_int8(fp32, path):
    """What the export stage shipped before: ORT's dynamic quantization, the input scale taken per batch."""
    from onnxruntime import quantization
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = path.with_suffix(".prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))
    quantization.quantize_dynamic(prepared, path, op_types_to_quantize=["MatMul"])
    return path


def _alone_and_in_a_batch(path, images):
    """Probabilities of each image run alone, and all together in one batch."""
    classifier = Classifier(path, provider="cpu")
    return classifier.predict(images, batch_size=1), classifier.predict(images, batch_size=len(images))


def _mixed_batch(sample):
    """Real test images with one of extreme pixels: a white-black checkerboard, whose normalized values
    (-1.9 to 2.1, sharp edges) widen every activation range of the batch, hence any scale taken from it."""
    checkerboard = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)[..., None].repeat(3, -1)
    return np.concatenate([sample.test.images[:16], checkerboard[None]])


def test_an_image_gets_the_same_int8_answer_alone_and_in_a_batch_of_very_different_images(fp32, int8, sample):
    _, path = int8
    alone, batched = _alone_and_in_a_batch(path, _mixed_batch(sample))
    np.testing.assert_array_equal(batched, alone)  # bit for bit, so the top-1 too


def test_the_mixed_batch_exposes_batch_dependent_quantization(fp32, sample, tmp_path):
    """The check above is strong enough: today's dynamic quantization fails it on the same images."""
    images = _mixed_batch(sample)
    alone, batched = _alone_and_in_a_batch(_dynamic_int8(fp32, tmp_path / "dynamic.onnx"), images)
    assert (batched != alone).any(axis=1).all()  # every image's probabilities move with its batch
    assert np.abs(batched - alone).max() > 1e-3
    result = compare_accuracy(fp32, tmp_path / "dynamic.onnx", images, np.zeros(len(images), np.int64))
    assert result["probability_batch_changes"] == len(images) and result["max_probability_batch_diff"] > 1e-3


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("arch", ["cnn", "mlp"])
def test_every_method_quantizes_every_architecture_into_a_batch_independent_model(arch, method, tmp_path):
    """Weight-only leaves a CNN's or an MLP's Gemm and Conv layers fp32 (nothing to quantize), static QDQ
    quantizes them; either way the model serves and answers an image alike alone and in a batch."""
    fp32 = export_onnx(random_model(arch), tmp_path / "model.onnx", class_names(), NORM, ort_fusions=True)
    images = np.random.default_rng(0).integers(0, 256, (24, 32, 32, 3), dtype=np.uint8)
    path = quantize_onnx(fp32, tmp_path / "model.int8.onnx", method, calibration_images=images)
    props = {p.key: p.value for p in onnx.load(path).metadata_props}
    assert props["quantization"].startswith(method)
    if method == "weight_only":
        assert "0 MatMul weights" in props["quantization"]
    alone, batched = _alone_and_in_a_batch(path, images)
    np.testing.assert_array_equal(batched, alone)
    result = compare_accuracy(fp32, path, images, np.zeros(len(images), np.int64), batch_size=8)
    assert result["top1_batch_changes"] == result["probability_batch_changes"] == 0
    assert result["top1_agreement"] >= (1.0 if method == "weight_only" else 0.9)


def test_compare_accuracy_exposes_a_model_that_lost_its_training(fp32, sample, tmp_path):
    untrained = export_onnx(random_model("vit"), tmp_path / "untrained.onnx", sample.class_names, NORM)
    result = compare_accuracy(fp32, untrained, sample.test.images, sample.test.labels)
    assert result["accuracy_delta_points"] < -10
    assert result["top1_agreement"] < 0.5
    with pytest.raises(VitlabError, match=r"int8 model loses \d+\.\d\d points .* more than"):
        ensure_int8_accuracy(result, max_drop_points=1.0)


def _figures(delta=0.0, changes=0):
    return {
        "accuracy_delta_points": delta,
        "fp32_accuracy": 0.5,
        "int8_accuracy": 0.5,
        "int8_accuracy_batch1": 0.5,
        "top1_agreement": 0.99,
        "num_images": 1017,
        "top1_batch_changes": changes,
        "batch_size": 256,
    }


def test_ensure_int8_accuracy_accepts_a_drop_at_the_limit_and_any_gain():
    for delta in (-1.0, 0.0, 2.0):
        line = ensure_int8_accuracy(_figures(delta), max_drop_points=1.0)
        assert line == (
            "test accuracy 0.5000 (batch 1: 0.5000) vs fp32 0.5000, top-1 agreement 0.9900, "
            "0 top-1 changes between batch 1 and 256"
        )


def test_ensure_int8_accuracy_refuses_an_answer_that_depends_on_the_batch():
    with pytest.raises(
        VitlabError, match=r"^int8 model's answer depends on the batch: 6 of 1017 images change "
    ):
        ensure_int8_accuracy(_figures(changes=6), max_drop_points=1.0)
    with pytest.raises(VitlabError) as error:
        ensure_int8_accuracy(_figures(delta=5.0, changes=1), max_drop_points=100.0)
    assert "\n" not in str(error.value) and "between batch 1 and batch 256" in str(error.value)


def test_quantize_refuses_bad_requests_and_keeps_the_previous_file(fp32, tmp_path):
    target = tmp_path / "model.int8.onnx"
    target.write_bytes(b"previous good model")
    with pytest.raises(VitlabError, match=r"unknown quantization method 'fp16' \(weight_only or static\)"):
        quantize_onnx(fp32, target, "fp16")
    with pytest.raises(VitlabError, match="unknown quantization method 'dynamic'"):
        quantize_onnx(fp32, target, "dynamic")  # batch-dependent: no longer offered
    with pytest.raises(VitlabError, match="static quantization needs calibration images"):
        quantize_onnx(fp32, target, "static")
    foreign = export_plain_onnx(random_model("mlp"), (1, 3, 32, 32), tmp_path / "foreign.onnx")
    with pytest.raises(VitlabError, match="no vitlab metadata"):
        quantize_onnx(foreign, target)
    with pytest.raises(VitlabError, match="need as many labels as images"):
        compare_accuracy(fp32, fp32, np.zeros((2, 32, 32, 3), np.uint8), np.zeros(3, np.int64))
    assert target.read_bytes() == b"previous good model"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["foreign.onnx", "model.int8.onnx"]
