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
from vitlab.models import describe_model, has_attention
from vitlab.params import Params
from vitlab.presets import preset_of
from vitlab.stages import Layout, write_metrics


def run(params: Params, layout: Layout) -> None:
    """Export ``layout.checkpoint`` to ONNX; raise VitlabError when ONNX Runtime disagrees with PyTorch beyond
    ``export.max_abs_diff`` / ``min_top1_agreement``, when int8 loses more than ``max_int8_accuracy_drop``, or
    when any test image gets another int8 top-1 at batch 1 than in a full batch. The metrics are written
    before each check, so a failed export leaves its evidence. The model (fp32 and int8, not the attention
    model) carries ``evaluate.tta`` inside its graph."""
    p, dataset = params.export, load_prepared(layout.prepared_dir)
    ckpt = load_checkpoint(layout.checkpoint, geometry=dataset.test.geometry)
    variants = {"fp32": (layout.onnx, False)}
    files.fresh_folder(layout.onnx_attention_dir)  # DVC's declared output: empty for a CNN, never stale
    if p.attention_model and has_attention(ckpt.model):
        variants["attention"] = (layout.onnx_attention_dir / "model.onnx", True)
    metadata, metrics = _metadata(params, layout, ckpt), {}
    for name, (path, with_attention) in variants.items():
        model, names, norm = ckpt.model, ckpt.class_names, ckpt.normalization
        # The served model predicts as evaluation scored it: with its test-time augmentation, if any.
        tta = "none" if with_attention else params.evaluate.tta
        export_onnx(model, path, names, norm, p.opset, metadata, with_attention, p.ort_fusions, tta)
        check = verify_onnx(path, model, dataset.test.images, norm, tta=tta)
        metrics |= check if name == "fp32" else {name: check}  # fp32 at the top level, for `dvc metrics`
        write_metrics(layout.export_metrics, layout.export_run, metrics)
        print(f"exported {path}: {ensure_parity(check, p.max_abs_diff, p.min_top1_agreement)}")
    quantize_onnx(layout.onnx, layout.onnx_int8, p.quantize, dataset.train.images[:512])
    int8 = compare_accuracy(layout.onnx, layout.onnx_int8, dataset.test.images, dataset.test.labels)
    write_metrics(layout.export_metrics, layout.export_run, metrics | {"int8": int8})
    print(
        f"quantized ({p.quantize}) {layout.onnx_int8}: {ensure_int8_accuracy(int8, p.max_int8_accuracy_drop)}"
    )


def _metadata(params: Params, layout: Layout, ckpt: Any) -> dict[str, str]:
    """What ties an ONNX file to its run: dataset, the preset the checkpoint's model is (not params', which a
    preset rule may set aside), sha256 of the validated params, test accuracy."""
    eval_metrics = json.loads(layout.eval_metrics.read_text()) if layout.eval_metrics.exists() else {}
    dump = json.dumps(params.model_dump(by_alias=True), sort_keys=True)
    return {
        "dataset": ckpt.dataset,
        "model_preset": preset_of(**describe_model(ckpt.model)) or "",
        "params_sha256": hashlib.sha256(dump.encode()).hexdigest(),
        "test_accuracy": str(eval_metrics.get("test_accuracy", "")),
    }
