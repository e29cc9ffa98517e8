"""Export a trained model to one self-describing ONNX file, prove it computes what PyTorch computes, and
derive its int8 and attention variants.

The file carries everything serving needs in its ``metadata_props`` (class names, normalization, input
layout), so ``vitlab.inference`` runs it with ONNX Runtime alone. The graph takes already-normalized images:
normalization stays in numpy on the serving side, where it is cheap and easy to inspect.
"""

from __future__ import annotations

import json
import logging
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

from vitlab import files
from vitlab.checkpoint import Normalization
from vitlab.errors import VitlabError, one_line
from vitlab.inference import Classifier
from vitlab.models import describe_model, eval_mode, has_attention
from vitlab.models.tta import with_tta

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
ATTENTION_NAME = "attention"
ATTENTION_LAYOUT = (
    "(depth, N, heads, T, T) softmax weights; T = patches, + 1 with a CLS token (token 0), + 1 more with a "
    "distillation token (token 1)"
)
QUANTIZATION_METHODS = ("weight_only", "static")
WEIGHT_BLOCK_SIZE = 32  # input rows per weight scale (as llama.cpp's Q8_0); divides every ViT preset's widths


def input_layout(image_size: int, channels: int) -> str:
    """The ``input_layout`` metadata: ``NCHW float32 RGB 32x32, x = (pixels/255 - mean)/std`` for CIFAR."""
    color = {1: "grayscale", 3: "RGB"}.get(channels, f"{channels}-channel")
    return f"NCHW float32 {color} {image_size}x{image_size}, x = (pixels/255 - mean)/std"


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
    tta: str = "none",
) -> Path:
    """Write ``model`` as a single-file ONNX graph images (N, C, S, S) -> logits (N, classes), any N, where
    S x S x C is the geometry the model was built for (``config.image_size``, ``in_channels``), which the
    metadata records (``image_size``, ``channels``, ``input_layout``) for ``vitlab.inference`` to read.

    ``with_attention`` adds a second output, ``attention`` (depth, N, heads, T, T), the weights of
    ``forward_with_attention``, to draw attention maps from ONNX Runtime; only a ViT has it.

    ``ort_fusions`` rewrites the graph with ONNX Runtime's fused operators (see ``fuse_for_onnxruntime``):
    faster in ONNX Runtime, but no longer plain ONNX, so other runtimes cannot load it.

    ``tta`` ("flip", "flip_translate"; vitlab.models.tta) puts test-time augmentation inside the graph: its
    logits are the average over each image's views, as ``vitlab.evaluate`` computes them with the same
    ``tta``, at 2x or 6x the cost; the metadata's ``tta`` records it. Not with ``with_attention``.
    """
    path = Path(path)
    described = describe_model(model)
    if with_attention and not has_attention(model):
        raise VitlabError(f"{described['arch']} has no attention to export (with_attention needs a ViT)")
    if with_attention and tta != "none":
        raise VitlabError(f"test-time augmentation ({tta}) averages logits; the attention model has none")
    config = model.config
    props = {
        "class_names": json.dumps(list(class_names)),
        "mean": json.dumps(list(norm.mean)),
        "std": json.dumps(list(norm.std)),
        "image_size": str(config.image_size),
        "channels": str(config.in_channels),
        "input_layout": input_layout(config.image_size, config.in_channels),
        "arch": described["arch"],
        "config": json.dumps(described["config"]),
        "tta": tta,
    }
    if with_attention:
        props["attention_layout"] = ATTENTION_LAYOUT
    clashes = set(props) & set(metadata or {})
    if clashes:
        raise ValueError(f"metadata keys {sorted(clashes)} are written by export_onnx itself")
    props.update(metadata or {})

    device = next(model.parameters()).device
    # Batch 2, not 1: torch.export specializes sizes 0 and 1, which would pin the batch axis.
    example = torch.randn(2, config.in_channels, config.image_size, config.image_size, device=device)
    # The exporter warns about its own internals (pytree deprecations, ...); none concerns the user.
    with eval_mode(model), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        program = torch.onnx.export(
            _WithAttention(model) if with_attention else with_tta(model, tta),
            (example,),
            dynamo=True,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME, ATTENTION_NAME] if with_attention else [OUTPUT_NAME],
            opset_version=opset,
            dynamic_shapes=({0: torch.export.Dim("batch")},),
            verbose=False,
        )

    proto = program.model_proto
    if ort_fusions:
        proto, fused = fuse_for_onnxruntime(proto)
        props["ort_fusions"] = json.dumps(fused, sort_keys=True)
    onnx.helper.set_model_props(proto, props)
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as error:
        raise VitlabError(
            f"exported {described['arch']} fails the ONNX checker: {one_line(error)}"
        ) from error
    with files.atomic_path(path) as tmp:
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
    tta: str = "none",
) -> dict[str, Any]:
    """Run PyTorch and ONNX Runtime (CPU) on the same normalized images and compare their logits; with
    ``tta``, PyTorch's are those of ``model`` under that test-time augmentation (``vitlab.evaluate``'s)."""
    onnx_path = Path(onnx_path)
    if len(images_uint8) == 0:
        raise VitlabError("no images to verify the ONNX export on")
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    device = next(model.parameters()).device
    model = with_tta(model, tta)
    batch_diffs: list[float] = []
    agree = 0
    with eval_mode(model), torch.no_grad():
        for start in range(0, len(images_uint8), batch_size):
            x = norm.to_tensor(torch.as_tensor(images_uint8[start : start + batch_size], device=device))
            expected = model(x).float().cpu().numpy()
            actual = session.run([OUTPUT_NAME], {INPUT_NAME: x.cpu().numpy()})[0]
            batch_diffs.append(float(np.abs(expected - actual).max()))
            agree += int((expected.argmax(1) == actual.argmax(1)).sum())
    graph = onnx.load(onnx_path, load_external_data=False)
    return {
        # np.max, unlike max(), propagates a NaN from either side, and a NaN must fail ensure_parity.
        "max_abs_diff": float(np.max(batch_diffs)),
        "top1_agreement": agree / len(images_uint8),
        "num_images": len(images_uint8),
        "opset": next(o.version for o in graph.opset_import if o.domain in ("", "ai.onnx")),
        "onnx_bytes": onnx_path.stat().st_size,
    }


def ensure_parity(result: dict[str, Any], max_abs_diff: float, min_top1_agreement: float) -> str:
    """Raise VitlabError when ``verify_onnx``'s figures miss the tolerances (a NaN always misses); else
    return them as one line for the log."""
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
    return (
        f"max |logit diff| {result['max_abs_diff']:.2e}, top-1 agreement {result['top1_agreement']:.4f} on "
        f"{n} test images"
    )


def quantize_onnx(
    fp32_path: str | Path,
    int8_path: str | Path,
    method: str = "weight_only",
    calibration_images: np.ndarray | None = None,
) -> Path:
    """Write an int8 copy of a vitlab ONNX model, with the same inputs, outputs and metadata.

    Neither method scales anything by the other images in a call, so an image gets the same answer in any
    batch; ``compare_accuracy`` measures it and ``ensure_int8_accuracy`` enforces it.

    "weight_only" (the default): every MatMul weight (a ViT's attention and MLP projections) becomes int8,
    symmetric, one fp32 scale per block of 32 input rows, run by ONNX Runtime's ``MatMulNBits`` contrib
    operator with fp32 activations (accuracy_level 1); written by ONNX Runtime's ``MatMulNBitsQuantizer``
    (bits=8). ``calibration_images`` is ignored. Gemm layers (a classifier head, an MLP's layers) and
    convolutions stay fp32: on a CNN, a ResNet or an MLP nothing is quantized. Measured on every ViT preset:
    logits bit for bit the same at batch 1, 3, 7, 32 and 64 (and 1 vs 256 on a trained tinyvit), 1 or 2
    threads, within a few hundredths of fp32's. Turning the Gemms into MatMulNBits too (ORT's
    ``replace_gemm_with_matmul``) would quantize the head, but on a 2-D input ORT's MatMul kernels round one
    row differently from many: its logits moved by ~1e-6 at batch 1.
    The price is batch-1 speed (0.7x fp32 on tinyvit, 2 cores; batch 256 within noise of fp32).

    "static": a QDQ graph (uint8 activations, int8 weights per tensor) whose activation ranges are fixed in
    advance from ``calibration_images`` (uint8 (N, H, W, C), real training images), by ONNX Runtime's
    ``quantize_static``; batch-independent too, but every activation is rounded to a fixed range: on trained
    tinyvits its logits moved 0.2-0.45 from fp32's, 20-30x more than weight-only's, and 2-3% of top-1s.
    Quantizes Gemm layers too.

    ONNX Runtime's ``quantize_dynamic`` is not offered: it scales each MatMul's input by the range of the
    whole batch at run time, so an image's answer depended on the other images in the call (top-1 changed
    on 4 to 11 of 1,017 real test images between batch 1 and batch 256, depending on the model).

    Raises VitlabError for an unknown method, "static" without calibration images, a model without vitlab
    metadata, or a result that fails the ONNX checker; ``int8_path`` is replaced only on success.
    """
    fp32_path, int8_path = Path(fp32_path), Path(int8_path)
    if method not in QUANTIZATION_METHODS:
        raise VitlabError(f"unknown quantization method {method!r} ({' or '.join(QUANTIZATION_METHODS)})")
    if method == "static" and (calibration_images is None or len(calibration_images) == 0):
        raise VitlabError("static quantization needs calibration images")
    props = {p.key: p.value for p in onnx.load(fp32_path, load_external_data=False).metadata_props}
    if "class_names" not in props:
        raise VitlabError(f"{fp32_path}: no vitlab metadata; quantize a model written by export_onnx")

    if method == "weight_only":
        proto = _quantize_weight_only(onnx.load(fp32_path))
        quantized = sum(node.op_type == "MatMulNBits" for node in proto.graph.node)
        description = (
            f"weight_only int8: {quantized} MatMul weights int8 symmetric in blocks of {WEIGHT_BLOCK_SIZE} "
            "(MatMulNBits), fp32 activations; Gemm and Conv fp32"
        )
    else:
        proto = _quantize_static(fp32_path, props, calibration_images)
        description = f"static int8 QDQ: min-max ranges of {len(calibration_images)} calibration images"

    onnx.helper.set_model_props(proto, {**props, "quantization": description})
    try:
        onnx.checker.check_model(proto, full_check=True)
    except onnx.checker.ValidationError as error:
        raise VitlabError(f"int8 model fails the ONNX checker: {one_line(error)}") from error
    with files.atomic_path(int8_path) as tmp:
        onnx.save_model(proto, tmp, format="protobuf", save_as_external_data=False)
    return int8_path


def _quantize_weight_only(proto: onnx.ModelProto) -> onnx.ModelProto:
    # The module calls logging.basicConfig(level=INFO) on import, which would print every later INFO record of
    # the process, and logs a line per node: undo the first, silence the second.
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    for handler in root.handlers[len(handlers) :]:
        root.removeHandler(handler)
    root.setLevel(level)
    logger = logging.getLogger("onnxruntime.quantization.matmul_nbits_quantizer")
    logger_level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        config = DefaultWeightOnlyQuantConfig(
            block_size=WEIGHT_BLOCK_SIZE,
            is_symmetric=True,
            # fp32 activations; 4 (int8 activations per row and block) was slower at batch 256, less exact.
            accuracy_level=1,
            bits=8,
            op_types_to_quantize=("MatMul",),
        )
        quantizer = MatMulNBitsQuantizer(proto, algo_config=config)
        quantizer.process()
    finally:
        logger.setLevel(logger_level)
    return quantizer.model.model


def _quantize_static(
    fp32_path: Path, props: dict[str, str], calibration_images: np.ndarray
) -> onnx.ModelProto:
    # Imported here: the quantization tools pull in sympy and more, which plain exports never need.
    from onnxruntime import quantization
    from onnxruntime.quantization.shape_inference import quant_pre_process

    with tempfile.TemporaryDirectory(prefix="vitlab-quantize-") as work:
        # Required, not optional: the dynamo export's stale value_info makes the quantizer's own shape
        # inference fail ("Inferred shape and existing shape differ"); pre-processing re-infers every shape.
        prepared = Path(work) / "prepared.onnx"
        quant_pre_process(str(fp32_path), str(prepared))
        quantized = Path(work) / "int8.onnx"
        quantization.quantize_static(
            prepared,
            quantized,
            _CalibrationReader(calibration_images, props),
            quant_format=quantization.QuantFormat.QDQ,
            activation_type=quantization.QuantType.QUInt8,
            weight_type=quantization.QuantType.QInt8,
        )
        return onnx.load(quantized)


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
    fp32_path: str | Path,
    int8_path: str | Path,
    images: np.ndarray,
    labels: np.ndarray,
    batch_size: int = 256,
) -> dict[str, Any]:
    """Top-1 accuracy of both models through the serving path (``Classifier``, CPU) on labelled images, and
    whether the int8 model answers each image the same alone as in a batch.

    ``images`` uint8 (N, H, W, C), ``labels`` int (N,). Both models run at ``batch_size``; the int8
    model runs again one image per call. Returns fp32_accuracy, int8_accuracy (at ``batch_size``),
    int8_accuracy_batch1, accuracy_delta_points (int8 at ``batch_size`` minus fp32, in points),
    top1_agreement (fp32 vs int8), batch_size, top1_batch_changes (images whose int8 top-1 differs between
    batch 1 and ``batch_size``), probability_batch_changes (images whose int8 probabilities are not bit for
    bit the same), max_probability_batch_diff, num_images, int8_bytes and quantization (the int8 file's own
    description). Raises VitlabError when there are no images or not one label per image.
    """
    if len(images) == 0 or len(images) != len(labels):
        raise VitlabError(f"need as many labels as images, and some: got {len(images)} and {len(labels)}")
    fp32 = Classifier(fp32_path, provider="cpu").predict(images, batch_size=batch_size).argmax(1)
    int8_model = Classifier(int8_path, provider="cpu")
    batched = int8_model.predict(images, batch_size=batch_size)
    alone = int8_model.predict(images, batch_size=1)
    int8, int8_alone = batched.argmax(1), alone.argmax(1)
    fp32_accuracy = float((fp32 == labels).mean())
    int8_accuracy = float((int8 == labels).mean())
    props = {p.key: p.value for p in onnx.load(int8_path, load_external_data=False).metadata_props}
    return {
        "fp32_accuracy": fp32_accuracy,
        "int8_accuracy": int8_accuracy,
        "int8_accuracy_batch1": float((int8_alone == labels).mean()),
        "accuracy_delta_points": round(100 * (int8_accuracy - fp32_accuracy), 4),
        "top1_agreement": float((fp32 == int8).mean()),
        "batch_size": batch_size,
        "top1_batch_changes": int((int8 != int8_alone).sum()),
        "probability_batch_changes": int((batched != alone).any(axis=1).sum()),
        "max_probability_batch_diff": float(np.abs(batched - alone).max()),
        "num_images": len(images),
        "int8_bytes": Path(int8_path).stat().st_size,
        "quantization": props.get("quantization", ""),
    }


def ensure_int8_accuracy(result: dict[str, Any], max_drop_points: float) -> str:
    """Raise VitlabError (one line) when ``compare_accuracy``'s int8 model gives any image a different top-1
    at batch 1 than at its batch size, or its top-1 accuracy falls more than ``max_drop_points`` below fp32's;
    else return its figures as one line for the log.
    """
    if result["top1_batch_changes"]:
        raise VitlabError(
            f"int8 model's answer depends on the batch: {result['top1_batch_changes']} of "
            f"{result['num_images']} images change top-1 between batch 1 and batch {result['batch_size']}"
        )
    if not -result["accuracy_delta_points"] <= max_drop_points:
        raise VitlabError(
            f"int8 model loses {-result['accuracy_delta_points']:.2f} points of top-1 accuracy "
            f"({result['fp32_accuracy']:.4f} -> {result['int8_accuracy']:.4f} on {result['num_images']} "
            f"images), more than export.max_int8_accuracy_drop {max_drop_points:.2f}"
        )
    return (
        f"test accuracy {result['int8_accuracy']:.4f} (batch 1: {result['int8_accuracy_batch1']:.4f}) "
        f"vs fp32 {result['fp32_accuracy']:.4f}, top-1 agreement {result['top1_agreement']:.4f}, "
        f"{result['top1_batch_changes']} top-1 changes between batch 1 and {result['batch_size']}"
    )
