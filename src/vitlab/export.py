"""Export a trained model to one self-describing ONNX file, prove it computes what PyTorch computes, and
derive its int8 and attention variants.

The file carries everything serving needs in its ``metadata_props`` (class names, normalization, input
layout), so ``vitlab.inference`` runs it with ONNX Runtime alone. The graph takes already-normalized images:
normalization stays in numpy on the serving side, where it is cheap and easy to inspect.
"""

from __future__ import annotations

import json
import tempfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx_ir
import onnxruntime as ort
import torch
from torch import nn

from vitlab import io
from vitlab.checkpoint import Normalization
from vitlab.errors import VitlabError
from vitlab.inference import Classifier
from vitlab.models import model_spec

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
ATTENTION_NAME = "attention"
INPUT_LAYOUT = "NCHW float32 RGB 32x32, x = (pixels/255 - mean)/std"
ATTENTION_LAYOUT = "(depth, N, heads, T, T) softmax weights; T = patches, + 1 with a CLS token (token 0)"
QUANTIZATION_METHODS = ("dynamic", "static")


class _WithAttention(nn.Module):
    """Exposes ``forward_with_attention`` as ``forward``: the exporter traces ``forward`` only."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.model.forward_with_attention(x)


def export_onnx(
    model: nn.Module,
    path: str | Path,
    class_names: list[str],
    norm: Normalization,
    opset: int = 18,
    metadata: dict[str, str] | None = None,
    with_attention: bool = False,
    ort_fusions: bool = False,
) -> Path:
    """Write ``model`` as a single-file ONNX graph images (N, 3, 32, 32) -> logits (N, classes), any N.

    ``with_attention`` adds a second output, ``attention`` (depth, N, heads, T, T), the weights of
    ``forward_with_attention``, to draw attention maps from ONNX Runtime; only a ViT has it.

    ``ort_fusions`` rewrites the graph with ONNX Runtime's fused operators (see ``fuse_for_onnxruntime``):
    faster in ONNX Runtime, but no longer plain ONNX, so other runtimes cannot load it.
    """
    path = Path(path)
    spec = model_spec(model)
    if with_attention and not hasattr(model, "forward_with_attention"):
        raise VitlabError(f"{spec['arch']} has no attention to export (with_attention needs a ViT)")
    props = {
        "class_names": json.dumps(list(class_names)),
        "mean": json.dumps(list(norm.mean)),
        "std": json.dumps(list(norm.std)),
        "input_layout": INPUT_LAYOUT,
        "arch": spec["arch"],
        "config": json.dumps(spec["config"]),
    }
    if with_attention:
        props["attention_layout"] = ATTENTION_LAYOUT
    clashes = set(props) & set(metadata or {})
    if clashes:
        raise ValueError(f"metadata keys {sorted(clashes)} are written by export_onnx itself")
    props.update(metadata or {})

    device = next(model.parameters()).device
    # Batch 2, not 1: torch.export specializes sizes 0 and 1, which would pin the batch axis.
    example = torch.randn(2, 3, 32, 32, device=device)
    was_training = model.training
    model.eval()
    try:
        # The exporter warns about its own internals (pytree deprecations, ...); none concerns the user.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            program = torch.onnx.export(
                _WithAttention(model) if with_attention else model,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME, ATTENTION_NAME] if with_attention else [OUTPUT_NAME],
                opset_version=opset,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
    finally:
        model.train(was_training)

    proto = program.model_proto
    if ort_fusions:
        proto, fused = fuse_for_onnxruntime(proto)
        props["ort_fusions"] = json.dumps(fused, sort_keys=True)
    onnx.helper.set_model_props(proto, props)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as error:
        raise VitlabError(
            f"exported {spec['arch']} fails the ONNX checker: {str(error).splitlines()[0]}"
        ) from error
    with io.atomic_path(path) as tmp:
        # Weights inline (no external data): one file to copy; these models are far below protobuf's 2 GB.
        onnx.save_model(proto, tmp, format="protobuf", save_as_external_data=False)
    return path


def fuse_for_onnxruntime(proto: onnx.ModelProto) -> tuple[onnx.ModelProto, dict[str, int]]:
    """The graph rewritten with ONNX Runtime's contrib operators, and how many of each fusion applied.

    onnxscript's ORT fusions turn each attention block into one MultiHeadAttention, residual add + LayerNorm
    into SkipLayerNormalization and bias + erf-GELU into BiasGelu: a ViT's graph shrinks about 3x in nodes,
    which is what batch-1 latency pays for, and MultiHeadAttention's CPU kernel beats the decomposed
    MatMul-Softmax-MatMul at every batch size. ONNX Runtime's own load-time optimizer finds none of these
    patterns in the dynamo exporter's output.
    """
    from onnxscript.rewriter.ort_fusions import optimize_for_ort

    model, counts = optimize_for_ort(onnx_ir.from_proto(proto))
    return onnx_ir.to_proto(model), {name: n for name, n in sorted(counts.items()) if n}


def verify_onnx(
    onnx_path: str | Path,
    model: nn.Module,
    images_uint8: np.ndarray,
    norm: Normalization,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Run PyTorch and ONNX Runtime (CPU) on the same normalized images and compare their logits."""
    onnx_path = Path(onnx_path)
    if len(images_uint8) == 0:
        raise VitlabError("no images to verify the ONNX export on")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    device = next(model.parameters()).device
    batch_diffs: list[float] = []
    agree = 0
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(images_uint8), batch_size):
                x = norm.to_tensor(torch.as_tensor(images_uint8[start : start + batch_size], device=device))
                expected = model(x).float().cpu().numpy()
                actual = session.run([OUTPUT_NAME], {INPUT_NAME: x.cpu().numpy()})[0]
                batch_diffs.append(float(np.abs(expected - actual).max()))
                agree += int((expected.argmax(1) == actual.argmax(1)).sum())
    finally:
        model.train(was_training)
    graph = onnx.load(onnx_path, load_external_data=False)
    return {
        # np.max, unlike max(), propagates a NaN from either side, and a NaN must fail ensure_parity.
        "max_abs_diff": float(np.max(batch_diffs)),
        "top1_agreement": agree / len(images_uint8),
        "num_images": len(images_uint8),
        "opset": next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
        "onnx_bytes": onnx_path.stat().st_size,
    }


def ensure_parity(result: dict[str, Any], max_abs_diff: float, min_top1_agreement: float) -> None:
    """Raise VitlabError when ``verify_onnx``'s figures miss the tolerances (a NaN always misses)."""
    n = result["num_images"]
    if not result["max_abs_diff"] <= max_abs_diff:
        raise VitlabError(
            f"ONNX export differs from PyTorch: max |logit diff| {result['max_abs_diff']:.3g} exceeds "
            f"export.max_abs_diff {max_abs_diff:.3g} on {n} images"
        )
    if not result["top1_agreement"] >= min_top1_agreement:
        raise VitlabError(
            f"ONNX export differs from PyTorch: top-1 agreement {result['top1_agreement']:.4f} is below "
            f"export.min_top1_agreement {min_top1_agreement:.4f} on {n} images"
        )


def quantize_onnx(
    fp32_path: str | Path,
    int8_path: str | Path,
    method: str = "dynamic",
    calibration_images: np.ndarray | None = None,
) -> Path:
    """Write an int8 copy of a vitlab ONNX model, with the same inputs, outputs and metadata.

    "dynamic" (the default) stores the MatMul weights as per-tensor int8 and quantizes their inputs per batch
    at run time; convolutions stay fp32. "static" writes a QDQ graph whose activation ranges come from
    ``calibration_images`` (uint8 (N, 32, 32, 3), real training images); on our ViT it was slower and no
    more accurate (measured on the committed run: 45.4% vs 45.6% test accuracy, slower than fp32 on CPU).
    """
    # Imported here: the quantization tools pull in sympy and more, which plain exports never need.
    from onnxruntime import quantization
    from onnxruntime.quantization.shape_inference import quant_pre_process

    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if method not in QUANTIZATION_METHODS:
        raise VitlabError(f"unknown quantization method {method!r} (dynamic or static)")
    if method == "static" and (calibration_images is None or len(calibration_images) == 0):
        raise VitlabError("static quantization needs calibration images")
    props = {p.key: p.value for p in onnx.load(fp32_path, load_external_data=False).metadata_props}
    if "class_names" not in props:
        raise VitlabError(f"{fp32_path}: no vitlab metadata; quantize a model written by export_onnx")

    with tempfile.TemporaryDirectory(prefix="vitlab-quantize-") as work:
        # Required, not optional: the dynamo export's stale value_info makes the quantizer's own shape
        # inference fail ("Inferred shape and existing shape differ"); pre-processing re-infers every shape
        # and turns the head's Gemm into a MatMul the quantizer handles like the others.
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantized = Path(work) / "int8.onnx"
        if method == "dynamic":
            # Per-tensor QInt8 weights: on the trained ViT, per-channel and QUInt8 were no more accurate
            # (within 2 of 500 test images) and 3-7% slower.
            # MatMul only (Gemm is a MatMul after pre-processing): ORT's ConvInteger is slower than its fp32
            # Conv, 9x slower on the CNN in benchmarks/bench_inference.py.
            quantization.quantize_dynamic(
                prepared, quantized, op_types_to_quantize=["MatMul"], weight_type=quantization.QuantType.QInt8
            )
            description = "dynamic int8: MatMul weights QInt8 per-tensor, activations uint8 per batch"
        else:
            quantization.quantize_static(
                prepared,
                quantized,
                _CalibrationReader(calibration_images, props),
                quant_format=quantization.QuantFormat.QDQ,
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8,
            )
            description = f"static int8 QDQ: min-max ranges of {len(calibration_images)} calibration images"
        proto = onnx.load(quantized)

    onnx.helper.set_model_props(proto, {**props, "quantization": description})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as error:
        raise VitlabError(f"int8 model fails the ONNX checker: {str(error).splitlines()[0]}") from error
    with io.atomic_path(int8_path) as tmp:
        onnx.save_model(proto, tmp, format="protobuf", save_as_external_data=False)
    return int8_path


class _CalibrationReader:
    """Feeds ORT's calibrator normalized batches of uint8 images, as serving normalizes them."""

    def __init__(self, images: np.ndarray, props: dict[str, str], batch_size: int = 64):
        mean = np.asarray(json.loads(props["mean"]), dtype=np.float32)
        std = np.asarray(json.loads(props["std"]), dtype=np.float32)
        batches = (images[start : start + batch_size] for start in range(0, len(images), batch_size))
        # Lazily, one batch at a time: a large calibration set never sits normalized in memory at once.
        self._batches = (
            {INPUT_NAME: np.ascontiguousarray(((b / np.float32(255.0) - mean) / std).transpose(0, 3, 1, 2))}
            for b in batches
        )

    def get_next(self) -> dict[str, np.ndarray] | None:
        return next(self._batches, None)


def compare_accuracy(
    fp32_path: str | Path, int8_path: str | Path, images: np.ndarray, labels: np.ndarray
) -> dict[str, Any]:
    """Top-1 accuracy of both models through the serving path (``Classifier``, CPU) on labelled images."""
    if len(images) == 0 or len(images) != len(labels):
        raise VitlabError(f"need as many labels as images, and some: got {len(images)} and {len(labels)}")
    fp32 = Classifier(fp32_path, provider="cpu").predict(images).argmax(1)
    int8 = Classifier(int8_path, provider="cpu").predict(images).argmax(1)
    fp32_accuracy = float((fp32 == labels).mean())
    int8_accuracy = float((int8 == labels).mean())
    return {
        "fp32_accuracy": fp32_accuracy,
        "int8_accuracy": int8_accuracy,
        "accuracy_delta_points": round(100 * (int8_accuracy - fp32_accuracy), 4),
        "top1_agreement": float((fp32 == int8).mean()),
        "num_images": len(images),
        "int8_bytes": Path(int8_path).stat().st_size,
    }


def ensure_int8_accuracy(result: dict[str, Any], max_drop_points: float) -> None:
    """Raise VitlabError when int8 top-1 accuracy falls more than ``max_drop_points`` below fp32's."""
    if not -result["accuracy_delta_points"] <= max_drop_points:
        raise VitlabError(
            f"int8 model loses {-result['accuracy_delta_points']:.2f} points of top-1 accuracy "
            f"({result['fp32_accuracy']:.4f} -> {result['int8_accuracy']:.4f} on {result['num_images']} "
            f"images), more than export.max_int8_accuracy_drop {max_drop_points:.2f}"
        )
