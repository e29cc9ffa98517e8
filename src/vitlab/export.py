"""Export a trained model to one self-describing ONNX file, and prove it computes what PyTorch computes.

The file carries everything serving needs in its ``metadata_props`` (class names, normalization, input
layout), so ``vitlab.inference`` runs it with ONNX Runtime alone. The graph takes already-normalized images:
normalization stays in numpy on the serving side, where it is cheap and easy to inspect.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import nn

from vitlab import io
from vitlab.checkpoint import Normalization
from vitlab.errors import VitlabError
from vitlab.models import model_spec

INPUT_NAME = "images"
OUTPUT_NAME = "logits"
INPUT_LAYOUT = "NCHW float32 RGB 32x32, x = (pixels/255 - mean)/std"


def export_onnx(
    model: nn.Module,
    path: str | Path,
    class_names: list[str],
    norm: Normalization,
    opset: int = 18,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` as a single-file ONNX graph images (N, 3, 32, 32) -> logits (N, classes), any N."""
    path = Path(path)
    spec = model_spec(model)
    props = {
        "class_names": json.dumps(list(class_names)),
        "mean": json.dumps(list(norm.mean)),
        "std": json.dumps(list(norm.std)),
        "input_layout": INPUT_LAYOUT,
        "arch": spec["arch"],
        "config": json.dumps(spec["config"]),
    }
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
                model,
                (example,),
                dynamo=True,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                opset_version=opset,
                dynamic_shapes=({0: torch.export.Dim("batch")},),
                verbose=False,
            )
    finally:
        model.train(was_training)

    proto = program.model_proto
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
