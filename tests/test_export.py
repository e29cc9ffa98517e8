import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from serving_fixtures import MODELS, NORM, cifar_images, class_names, random_model

from vitlab.checkpoint import Normalization
from vitlab.errors import VitlabError
from vitlab.export import ensure_parity, export_onnx, verify_onnx
from vitlab.inference import Classifier
from vitlab.models import build_model


@pytest.fixture(scope="module", params=list(MODELS))
def exported(request, tmp_path_factory):
    arch = request.param
    model = random_model(arch)
    model.train()  # export must run it in eval mode and hand it back as it was
    path = tmp_path_factory.mktemp(arch) / "model.onnx"
    export_onnx(
        model, path, class_names(), NORM, metadata={"dataset": "cifar10-sample", "test_accuracy": "0.5"}
    )
    assert model.training
    return arch, model.eval(), path


def _torch_logits(model, images):
    with torch.no_grad():
        return model(NORM.to_tensor(torch.as_tensor(images))).numpy()


def test_export_is_one_checked_file_with_a_dynamic_batch_axis(exported):
    _, model, path = exported
    assert [p.name for p in path.parent.iterdir()] == ["model.onnx"]  # no external data, no temp file left
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    (graph_input,) = proto.graph.input
    (graph_output,) = proto.graph.output
    assert (graph_input.name, graph_output.name) == ("images", "logits")
    dims = graph_input.type.tensor_type.shape.dim
    assert dims[0].dim_param and [d.dim_value for d in dims[1:]] == [3, 32, 32]

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    images, _ = cifar_images(7)
    for n in (1, 7):
        x = NORM.to_tensor(torch.as_tensor(images[:n])).numpy()
        (logits,) = session.run(None, {"images": x})
        assert logits.shape == (n, 10)
        np.testing.assert_allclose(logits, _torch_logits(model, images[:n]), atol=1e-4)


def test_metadata_round_trips(exported):
    arch, _, path = exported
    meta = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_modelmeta()
    props = meta.custom_metadata_map
    assert json.loads(props["class_names"]) == class_names()
    assert tuple(json.loads(props["mean"])) == NORM.mean
    assert tuple(json.loads(props["std"])) == NORM.std
    assert props["arch"] == arch
    assert json.loads(props["config"])["num_classes"] == 10
    assert "(pixels/255 - mean)/std" in props["input_layout"]
    assert props["dataset"] == "cifar10-sample" and props["test_accuracy"] == "0.5"


def test_onnx_runtime_matches_pytorch_on_real_images(exported):
    _, model, path = exported
    images, _ = cifar_images(300)
    result = verify_onnx(path, model, images, NORM, batch_size=128)  # 128 + 128 + a partial 44
    assert result["max_abs_diff"] <= 1e-4
    assert result["top1_agreement"] == 1.0
    assert result["num_images"] == 300
    assert result["opset"] == 18
    assert result["onnx_bytes"] == path.stat().st_size
    ensure_parity(result, max_abs_diff=1e-4, min_top1_agreement=1.0)


def test_verify_catches_a_model_that_computes_something_else(exported):
    _, _, path = exported
    other = random_model("mlp", seed=1)
    images, _ = cifar_images(100)
    result = verify_onnx(path, other, images, NORM)
    assert result["max_abs_diff"] > 0.1
    assert result["top1_agreement"] < 0.5
    with pytest.raises(VitlabError, match=r"max \|logit diff\|"):
        ensure_parity(result, max_abs_diff=1e-4, min_top1_agreement=1.0)


@pytest.mark.parametrize(
    ("result", "message"),
    [
        (
            {"max_abs_diff": 2e-4, "top1_agreement": 1.0},
            r"max \|logit diff\| 0.0002 exceeds export.max_abs_diff",
        ),
        ({"max_abs_diff": float("nan"), "top1_agreement": 1.0}, r"max \|logit diff\| nan"),
        ({"max_abs_diff": 0.0, "top1_agreement": 0.999}, r"top-1 agreement 0.9990 is below"),
    ],
)
def test_ensure_parity_names_the_figure_that_is_off(result, message):
    with pytest.raises(VitlabError, match=message):
        ensure_parity({**result, "num_images": 1000}, max_abs_diff=1e-4, min_top1_agreement=1.0)


def test_ensure_parity_accepts_figures_at_the_limits():
    line = ensure_parity({"max_abs_diff": 1e-4, "top1_agreement": 0.99, "num_images": 100}, 1e-4, 0.99)
    assert line == "max |logit diff| 1.00e-04, top-1 agreement 0.9900 on 100 test images"


def test_a_failed_export_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "model.onnx"
    path.write_bytes(b"previous good model")

    def reject(*args, **kwargs):
        raise onnx.checker.ValidationError("Node (x) has input size 0 not in range")

    monkeypatch.setattr(onnx.checker, "check_model", reject)
    with pytest.raises(VitlabError, match="mlp fails the ONNX checker: Node"):
        export_onnx(random_model("mlp"), path, class_names(), NORM)
    assert path.read_bytes() == b"previous good model"
    assert [p.name for p in tmp_path.iterdir()] == ["model.onnx"]


def test_metadata_may_not_overwrite_what_serving_reads(tmp_path):
    with pytest.raises(ValueError, match="class_names"):
        export_onnx(
            random_model("mlp"), tmp_path / "m.onnx", class_names(), NORM, metadata={"class_names": "[]"}
        )
    assert not (tmp_path / "m.onnx").exists()


def test_verify_refuses_an_empty_image_set(exported):
    _, model, path = exported
    with pytest.raises(VitlabError, match="no images"):
        verify_onnx(path, model, np.zeros((0, 32, 32, 3), np.uint8), NORM)


def test_attention_variant_outputs_what_forward_with_attention_computes(tmp_path):
    model = random_model("vit")
    path = export_onnx(model, tmp_path / "model.attention.onnx", class_names(), NORM, with_attention=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [o.name for o in session.get_outputs()] == ["logits", "attention"]
    assert "(depth, N, heads, T, T)" in session.get_modelmeta().custom_metadata_map["attention_layout"]
    images, _ = cifar_images(9)
    x = NORM.to_tensor(torch.as_tensor(images))
    with torch.no_grad():
        logits, weights = model.forward_with_attention(x)
    actual_logits, actual_weights = session.run(None, {"images": x.numpy()})
    assert actual_weights.shape == (2, 9, 2, 65, 65)  # depth, N, heads, 64 patches + CLS
    assert weights.std() > 0.01  # peaked, not uniform: a wrong layer or head would show
    np.testing.assert_allclose(actual_weights, weights.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(actual_logits, logits.numpy(), atol=1e-4, rtol=0)
    # Serving reads the first output, so the variant also classifies like the plain export.
    probabilities = Classifier(path, provider="cpu").predict(images)
    np.testing.assert_allclose(probabilities, logits.double().softmax(1).numpy(), atol=1e-5)


def test_attention_variant_refuses_a_model_without_attention(tmp_path):
    with pytest.raises(VitlabError, match="cnn has no attention to export"):
        export_onnx(random_model("cnn"), tmp_path / "m.onnx", class_names(), NORM, with_attention=True)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("arch", ["vit", "cnn"])
def test_ort_fusions_keep_the_logits_and_record_what_they_fused(arch, tmp_path):
    model = random_model(arch)
    path = export_onnx(model, tmp_path / "model.onnx", class_names(), NORM, ort_fusions=True)
    proto = onnx.load(path)
    onnx.checker.check_model(proto, full_check=True)
    ops = {node.op_type for node in proto.graph.node}
    fused = json.loads({p.key: p.value for p in proto.metadata_props}["ort_fusions"])
    if arch == "vit":
        # Each of the 2 blocks: one attention op; norms merged with the residual adds; bias + GELU in one.
        assert {"MultiHeadAttention", "SkipLayerNormalization", "BiasGelu"} <= ops
        assert not {"Softmax", "Erf"} & ops
        assert [node.op_type for node in proto.graph.node].count("MultiHeadAttention") == 2
        assert fused["sdpa"] == 2 and fused["bias_gelu"] == 2
    else:
        assert fused == {}  # nothing to fuse: the graph is the plain export's
    images, _ = cifar_images(7)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n in (1, 7):
        (logits,) = session.run(None, {"images": NORM.to_tensor(torch.as_tensor(images[:n])).numpy()})
        np.testing.assert_allclose(logits, _torch_logits(model, images[:n]), atol=1e-4, rtol=0)


def test_ort_fusions_keep_the_attention_output(tmp_path):
    model = random_model("vit")
    path = export_onnx(model, tmp_path / "m.onnx", class_names(), NORM, with_attention=True, ort_fusions=True)
    images, _ = cifar_images(5)
    x = NORM.to_tensor(torch.as_tensor(images))
    with torch.no_grad():
        logits, weights = model.forward_with_attention(x)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual_logits, actual_weights = session.run(None, {"images": x.numpy()})
    np.testing.assert_allclose(actual_weights, weights.numpy(), atol=1e-5, rtol=0)
    np.testing.assert_allclose(actual_logits, logits.numpy(), atol=1e-4, rtol=0)


def test_a_distilled_vit_exports_its_heads_mean_and_its_attention_over_both_prefix_tokens(tmp_path):
    model = random_model("vit", distillation=True)
    images, _ = cifar_images(7)
    x = NORM.to_tensor(torch.as_tensor(images))
    with torch.no_grad():
        cls_logits, dist_logits = model.forward_heads(x)
        weights = model.forward_with_attention(x)[1]
    assert (cls_logits - dist_logits).abs().max() > 0.1  # two heads that disagree: the mean is no copy of one
    path = export_onnx(model, tmp_path / "m.onnx", class_names(), NORM, with_attention=True, ort_fusions=True)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    actual_logits, actual_weights = session.run(None, {"images": x.numpy()})
    assert actual_weights.shape == (2, 7, 2, 66, 66)  # depth, N, heads, CLS + distillation + 64 patches
    np.testing.assert_allclose(actual_logits, ((cls_logits + dist_logits) / 2).numpy(), atol=1e-4, rtol=0)
    np.testing.assert_allclose(actual_weights, weights.numpy(), atol=1e-5, rtol=0)
    plain = export_onnx(model, tmp_path / "plain.onnx", class_names(), NORM, ort_fusions=True)
    assert verify_onnx(plain, model, images, NORM)["max_abs_diff"] <= 1e-4


# The small-data options in tiny ViTs: each alone on MNIST's geometry, all together on CIFAR's.
SMALL_DATA_OPTIONS = {
    "seq-pool-mnist": {"stem": "conv", "pool": "seq", "image_size": 28, "in_channels": 1},
    "spt-mnist": {"stem": "spt", "image_size": 28, "in_channels": 1},
    "lsa-mnist": {"lsa": True, "image_size": 28, "in_channels": 1},
    "no-qkv-bias-mnist": {"qkv_bias": False, "image_size": 28, "in_channels": 1},
    "all-cifar": {"stem": "spt", "pool": "seq", "lsa": True, "qkv_bias": False},
}


@pytest.mark.parametrize("option", list(SMALL_DATA_OPTIONS))
def test_small_data_options_export_and_match_pytorch(tmp_path, option):
    torch.manual_seed(0)
    model = build_model(
        "vit", {"depth": 2, "dim": 16, "heads": 2, "mlp_dim": 32} | SMALL_DATA_OPTIONS[option]
    )
    with torch.no_grad():  # varied logits and peaked attention, as random_model's
        for p in model.eval().parameters():
            if p.dim() > 1:
                p.normal_(0.0, p[0].numel() ** -0.5)
    channels, size = model.config.in_channels, model.config.image_size
    norm = Normalization(mean=(0.5,) * channels, std=(0.25,) * channels)
    # The pipeline's export: ONNX Runtime's fusions on (they must keep LSA's mask and temperatures).
    path = export_onnx(model, tmp_path / "model.onnx", class_names(), norm, ort_fusions=True)
    x = torch.randn(5, channels, size, size)
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"images": x.numpy()})
    with torch.no_grad():
        expected, weights = model.forward_with_attention(x)
    assert np.abs(expected.numpy()).max() > 0.1
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4, rtol=0)
    if option == "all-cifar":  # the attention output too, its diagonal masked
        path = export_onnx(model, tmp_path / "attention.onnx", class_names(), norm, with_attention=True)
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        _, actual_weights = session.run(None, {"images": x.numpy()})
        np.testing.assert_allclose(actual_weights, weights.numpy(), atol=1e-5, rtol=0)
