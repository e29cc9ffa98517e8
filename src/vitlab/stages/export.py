"""Stage ``export``: ONNX (fp32, int8, and a ViT's attention model), each checked against PyTorch."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from vitlab import files
from vitlab.checkpoint import load_checkpoint
from vitlab.data.prepared import load_prepared
from vitlab.export import (
    compare_accuracy,
    ensure_int8_accuracy,
    ensure_parity,
    export_onnx,
    quantize_onnx,
    verify_onnx,
)
from vitlab.models import has_attention
from vitlab.params import Params
from vitlab.stages import Layout


def run(params: Params, layout: Layout) -> None:
    """Export ``layout.checkpoint`` to ONNX; raise VitlabError when ONNX Runtime disagrees with PyTorch beyond
    ``export.max_abs_diff`` / ``min_top1_agreement``, when int8 loses more than ``max_int8_accuracy_drop``, or
    when any test image gets another int8 top-1 at batch 1 than in a full batch."""
    ckpt = load_checkpoint(layout.checkpoint)
    eval_metrics = json.loads(layout.eval_metrics.read_text()) if layout.eval_metrics.exists() else {}
    metadata = {
        "dataset": ckpt.dataset,
        "model_preset": params.model.preset or "",
        "params_sha256": params_digest(params),
        "test_accuracy": str(eval_metrics.get("test_accuracy", "")),
    }
    p = params.export
    dataset = load_prepared(layout.prepared_dir)
    test = dataset.test
    variants = {"fp32": (layout.onnx, False)}
    # An empty folder for the models without attention: DVC still finds the output it declares.
    layout.onnx_attention_dir.mkdir(parents=True, exist_ok=True)
    if p.attention_model and has_attention(ckpt.model):
        variants["attention"] = (layout.onnx_attention_dir / "model.onnx", True)
    result: dict[str, Any] = {}
    for name, (path, with_attention) in variants.items():
        export_onnx(
            ckpt.model,
            path,
            ckpt.class_names,
            ckpt.normalization,
            p.opset,
            metadata,
            with_attention=with_attention,
            ort_fusions=p.ort_fusions,
        )
        check = verify_onnx(path, ckpt.model, test.images, ckpt.normalization)
        # The fp32 figures stay at the top level, where `dvc metrics` and earlier runs have them.
        result = result | check if name == "fp32" else result | {name: check}
        files.write_json(layout.export_metrics, result)  # the evidence, also when the check below fails
        ensure_parity(check, p.max_abs_diff, p.min_top1_agreement)
        print(
            f"exported {path}: max |logit diff| {check['max_abs_diff']:.2e}, "
            f"top-1 agreement {check['top1_agreement']:.4f} on {check['num_images']} test images"
        )
    quantize_onnx(layout.onnx, layout.onnx_int8, p.quantize, dataset.train.images[:512])
    int8 = compare_accuracy(layout.onnx, layout.onnx_int8, test.images, test.labels)
    files.write_json(layout.export_metrics, result | {"int8": int8})
    ensure_int8_accuracy(int8, p.max_int8_accuracy_drop)
    print(
        f"quantized ({p.quantize}) {layout.onnx_int8}: test accuracy {int8['int8_accuracy']:.4f} "
        f"(batch 1: {int8['int8_accuracy_batch1']:.4f}) vs fp32 {int8['fp32_accuracy']:.4f}, top-1 agreement "
        f"{int8['top1_agreement']:.4f}, {int8['top1_batch_changes']} top-1 changes between batch 1 and "
        f"{int8['batch_size']}"
    )


def params_digest(params: Params) -> str:
    """sha256 of the validated params (defaults included): the ONNX metadata ties a model to its run."""
    return hashlib.sha256(json.dumps(params.model_dump(by_alias=True), sort_keys=True).encode()).hexdigest()
