"""The pipeline's stages as library functions: each reads its params, calls the library, writes its outputs.

``dvc.yaml`` runs them through ``pipeline/run.py`` and users through ``vitlab stage NAME``: one code path.
Every output is written atomically, and a stage that fails raises VitlabError before writing anything that
could pass for a result.
"""

from __future__ import annotations

import csv
import hashlib
import io as _io
import json
import platform
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np

from vitlab import io
from vitlab.params import ARCH_PARAMS, Params


@dataclass(frozen=True)
class Layout:
    """Where each stage reads and writes: the cookiecutter-data-science folders, relative to the repo."""

    raw_dir: Path = Path("data/raw")  # download cache, md5-verified on reuse
    prepared_dir: Path = Path("data/prepared")
    validation: Path = Path("reports/validation.json")
    checkpoint: Path = Path("models/model.pt")
    train_state: Path = Path("models/train_state.pt")  # resume point while training; deleted at the end
    train_metrics: Path = Path("reports/train/metrics.json")
    train_history: Path = Path("reports/train/history.tsv")
    train_curves: Path = Path("reports/train/curves.png")
    train_gif: Path = Path("reports/train/curves.gif")  # the same curves growing epoch by epoch
    eval_metrics: Path = Path("reports/eval/metrics.json")
    confusion: Path = Path("reports/eval/confusion.csv")
    per_class: Path = Path("reports/eval/per_class.tsv")
    eval_predictions: Path = Path("reports/eval/predictions.csv")  # per test image: pairs runs in compare
    eval_model: Path = Path("reports/eval/model.json")  # architecture, config and size of the evaluated model
    confusion_png: Path = Path("reports/eval/confusion.png")
    per_class_png: Path = Path("reports/eval/per_class.png")
    mistakes_png: Path = Path("reports/eval/mistakes.png")
    attention_dir: Path = Path("reports/attention")
    onnx: Path = Path("models/model.onnx")
    onnx_int8: Path = Path("models/model.int8.onnx")
    onnx_attention_dir: Path = Path("models/attention")  # model.onnx with an attention output, for a ViT
    export_metrics: Path = Path("reports/export/metrics.json")
    predictions: Path = Path("reports/inference/predictions.csv")
    inference_metrics: Path = Path("reports/inference/metrics.json")

    @classmethod
    def under(cls, root: Path) -> Layout:
        return cls(**{f.name: root / getattr(cls, f.name) for f in fields(cls)})


def download(params: Params, layout: Layout) -> None:
    from vitlab.data.archive import prepare_dataset
    from vitlab.data.sources import DATASETS

    p = params.data
    dataset = prepare_dataset(
        DATASETS[p.dataset],
        p.source,
        p.md5,
        layout.raw_dir,
        layout.prepared_dir,
        expected_train=p.expected_train,
        expected_test=p.expected_test,
    )
    print(
        f"prepared {p.dataset}: {len(dataset.train)} train, {len(dataset.test)} test images, "
        f"{dataset.num_classes} classes -> {layout.prepared_dir}"
    )


def validate(params: Params, layout: Layout) -> None:
    from vitlab.data.prepared import load_prepared
    from vitlab.validate import ValidationThresholds, ensure_valid, validate_dataset

    result = validate_dataset(
        load_prepared(layout.prepared_dir), ValidationThresholds(**params.validate_.model_dump())
    )
    io.write_json(layout.validation, result)
    ensure_valid(result)
    print(f"validation passed -> {layout.validation}")


def train(params: Params, layout: Layout) -> None:
    import torch

    from vitlab.checkpoint import Normalization, save_checkpoint
    from vitlab.data.prepared import load_prepared
    from vitlab.distributed import is_main_process
    from vitlab.figures import animate_training, plot_training_curves
    from vitlab.models import build_model, count_parameters
    from vitlab.tracking import Tracker
    from vitlab.train import TrainConfig, split_train_val
    from vitlab.train import train as fit

    dataset = load_prepared(layout.prepared_dir)
    train_split, val_split = split_train_val(dataset.train, params.data.val_fraction, params.data.seed)
    norm = Normalization.from_images(train_split.images)
    torch.manual_seed(params.train.seed)  # fixes the weight initialization too
    model = build_model(params.model.name, model_config(params, dataset.num_classes))
    n_params = count_parameters(model)
    print(
        f"{params.model.preset or params.model.name}: {n_params:,} parameters; {len(train_split)} train / "
        f"{len(val_split) if val_split else 0} val images"
    )
    cfg = TrainConfig(**params.train.model_dump())
    if not is_main_process():  # another torchrun process: it trains beside rank 0, which writes everything
        fit(model, train_split, val_split, norm, cfg, state_path=layout.train_state)
        return
    tracker = Tracker(config=params.model_dump(by_alias=True) | {"num_parameters": n_params})
    try:
        result = fit(
            model,
            train_split,
            val_split,
            norm,
            cfg,
            on_epoch=lambda row: tracker.log(row, step=int(row["epoch"])),
            state_path=layout.train_state,
        )
        save_checkpoint(layout.checkpoint, model, dataset.class_names, norm, dataset.info.get("dataset", ""))
        io.write_tsv(layout.train_history, result.history)
        plot_training_curves(result.history, layout.train_curves)
        animate_training(result.history, layout.train_gif)
        metrics = {
            "best_epoch": result.best_epoch,
            "best_val_accuracy": result.best_val_accuracy,
            "final_train_accuracy": result.history[-1]["train_accuracy"],
            "num_parameters": n_params,
            "train_images": len(train_split),
            "wall_time_s": round(result.wall_time_s, 1),
            "images_per_s": round(float(np.mean([r["images_per_s"] for r in result.history])), 1),
            "device": result.device,
            "hardware": hardware_description(result.device),
        }
        io.write_json(layout.train_metrics, metrics)
        # Every output is saved: nothing left to resume, and DVC sees only the declared outputs.
        layout.train_state.unlink(missing_ok=True)
        tracker.summary(metrics)
        tracker.log_images({"training_curves": layout.train_curves, "training_progress": layout.train_gif})
    finally:
        tracker.finish()
    print(
        f"best val accuracy {result.best_val_accuracy:.4f} at epoch {result.best_epoch}; "
        f"{result.wall_time_s:.0f} s -> {layout.checkpoint}"
    )


def evaluate(params: Params, layout: Layout) -> None:
    from vitlab.checkpoint import load_checkpoint
    from vitlab.data.prepared import load_prepared
    from vitlab.evaluate import evaluate as run_eval
    from vitlab.evaluate import prediction_rows
    from vitlab.figures import plot_confusion, plot_mistakes, plot_per_class_accuracy
    from vitlab.models import count_parameters, model_spec
    from vitlab.tracking import Tracker
    from vitlab.train import select_device

    device = select_device(params.train.device)
    ckpt = load_checkpoint(layout.checkpoint, device)
    test = load_prepared(layout.prepared_dir).test
    result = run_eval(
        ckpt.model, test, ckpt.normalization, len(ckpt.class_names), params.evaluate.batch_size, device
    )
    names = ckpt.class_names
    metrics = {
        "test_loss": round(result.loss, 6),
        "test_accuracy": round(result.accuracy, 6),
        "test_images": len(test),
    }
    # per-class figures go to per_class.tsv: 100 metric columns would swamp `dvc exp show`
    io.write_json(layout.eval_metrics, metrics)
    support = result.confusion.sum(1)
    io.write_tsv(
        layout.per_class,
        [
            {"class": n, "accuracy": a, "support": int(s)}
            for n, a, s in zip(names, result.per_class_accuracy, support, strict=True)
        ],
    )
    _write_csv(
        layout.confusion,
        ["actual", "predicted"],
        [(names[a], names[p]) for a, p in zip(test.labels, result.predictions, strict=True)],
    )
    rows = prediction_rows(result, test.labels, names)
    _write_csv(layout.eval_predictions, list(rows[0]), [tuple(row.values()) for row in rows])
    io.write_json(
        layout.eval_model, model_spec(ckpt.model) | {"num_parameters": count_parameters(ckpt.model)}
    )
    pictures = {
        "confusion": plot_confusion(result.confusion, names, layout.confusion_png),
        "per_class_accuracy": plot_per_class_accuracy(
            result.per_class_accuracy, support, names, layout.per_class_png
        ),
        "most_confident_mistakes": plot_mistakes(
            test.images,
            test.labels,
            result.predictions,
            result.confidences,
            names,
            layout.mistakes_png,
            params.evaluate.num_mistakes,
        ),
    }
    tracker = Tracker(config=params.model_dump(by_alias=True), job_type="evaluate")
    try:
        tracker.summary(metrics)
        tracker.log_images(pictures)
        tracker.log_table(
            "test_predictions",
            ["image", *rows[0]],
            [[image, *row.values()] for image, row in zip(test.images, rows, strict=True)],
        )
    finally:
        tracker.finish()
    print(f"test accuracy {result.accuracy:.4f}, loss {result.loss:.4f} on {len(test)} images")


def attention(params: Params, layout: Layout) -> None:
    from vitlab.attention import render_attention
    from vitlab.checkpoint import load_checkpoint
    from vitlab.data.prepared import load_prepared
    from vitlab.tracking import Tracker

    ckpt = load_checkpoint(layout.checkpoint)
    test = load_prepared(layout.prepared_dir).test
    n = min(params.attention.num_images, len(test))
    layout.attention_dir.mkdir(parents=True, exist_ok=True)
    summary = render_attention(
        ckpt.model,
        test.images[:n],
        test.labels[:n],
        ckpt.class_names,
        ckpt.normalization,
        layout.attention_dir,
    )
    io.write_json(layout.attention_dir / "summary.json", summary)
    if not summary.get("supported"):
        print(f"no attention maps: {summary.get('reason')} (the stage completes without pictures)")
        return
    tracker = Tracker(config=params.model_dump(by_alias=True), job_type="attention")
    try:
        tracker.log_images({Path(name).stem: layout.attention_dir / name for name in summary["files"]})
    finally:
        tracker.finish()
    print(f"{summary['method']} maps of {n} test images -> {layout.attention_dir}")


def compare_experiments(
    layout: Layout, names: list[str], baseline: str | None, resamples: int, seed: int, out_dir: Path
) -> None:
    """Collect finished DVC experiments (all of this commit's when ``names`` is empty) into a comparison."""
    from vitlab.compare import RunFiles, collect_maps, dvc_records, finished_experiments, write_comparison
    from vitlab.errors import VitlabError
    from vitlab.tracking import Tracker

    names = names or finished_experiments()
    if not names:
        raise VitlabError("no finished experiments to compare: run the study first (vitlab compare --run)")
    files = RunFiles(str(layout.eval_predictions), str(layout.train_history), str(layout.eval_model))
    write_comparison(dvc_records(names, files), out_dir, baseline, resamples, seed)
    maps = collect_maps(names, str(layout.attention_dir), out_dir / "maps")
    with open(out_dir / "table.csv", newline="") as handle:
        header, *rows = list(csv.reader(handle))
    tracker = Tracker(
        config={"runs": names, "baseline": baseline, "resamples": resamples}, job_type="compare"
    )
    try:
        tracker.log_table("comparison", header, rows)
        tracker.log_images({name: out_dir / f"{name}.png" for name in ("accuracy_vs_patch", "val_curves")})
        tracker.log_images({path.stem: path for path in maps})
    finally:
        tracker.finish()
    print((out_dir / "table.md").read_text(), end="")
    print(f"comparison of {len(names)} runs -> {out_dir}")


def export(params: Params, layout: Layout) -> None:
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
    if p.attention_model and hasattr(ckpt.model, "forward_with_attention"):
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
        io.write_json(layout.export_metrics, result)  # the evidence, also when the check below fails
        ensure_parity(check, p.max_abs_diff, p.min_top1_agreement)
        print(
            f"exported {path}: max |logit diff| {check['max_abs_diff']:.2e}, "
            f"top-1 agreement {check['top1_agreement']:.4f} on {check['num_images']} test images"
        )
    quantize_onnx(layout.onnx, layout.onnx_int8, p.quantize, dataset.train.images[:512])
    int8 = compare_accuracy(layout.onnx, layout.onnx_int8, test.images, test.labels)
    io.write_json(layout.export_metrics, result | {"int8": int8})
    ensure_int8_accuracy(int8, p.max_int8_accuracy_drop)
    print(
        f"quantized ({p.quantize}) {layout.onnx_int8}: test accuracy {int8['int8_accuracy']:.4f} "
        f"vs fp32 {int8['fp32_accuracy']:.4f}, top-1 agreement {int8['top1_agreement']:.4f}"
    )


def inference(params: Params, layout: Layout) -> None:
    import time

    from vitlab.data.prepared import load_prepared
    from vitlab.inference import Classifier

    classifier = Classifier(layout.onnx, provider=params.inference.provider)
    test = load_prepared(layout.prepared_dir).test
    start = time.perf_counter()
    probabilities = classifier.predict(test.images, batch_size=params.inference.batch_size)
    seconds = time.perf_counter() - start
    predictions = probabilities.argmax(1)
    names = classifier.class_names
    _write_csv(
        layout.predictions,
        ["index", "label", "predicted", "confidence"],
        [
            (i, names[t], names[p], f"{probabilities[i, p]:.6f}")
            for i, (t, p) in enumerate(zip(test.labels, predictions, strict=True))
        ],
    )
    accuracy = float((predictions == test.labels).mean())
    io.write_json(
        layout.inference_metrics,
        {
            "onnxruntime_test_accuracy": round(accuracy, 6),
            "onnxruntime_provider": classifier.providers[0],
        },
    )
    print(
        f"ONNX Runtime ({classifier.providers[0]}): test accuracy {accuracy:.4f} on {len(test)} images, "
        f"{len(test) / seconds:.0f} img/s"
    )


STAGES: dict[str, Callable[[Params, Layout], None]] = {
    "download": download,
    "validate": validate,
    "train": train,
    "evaluate": evaluate,
    "attention": attention,
    "export": export,
    "inference": inference,
}


def model_config(params: Params, num_classes: int) -> dict:
    """The config dict of architecture ``params.model.name`` (see vitlab.models) from the ``model`` section of
    params, which already holds a preset's values."""
    m = params.model
    return {"num_classes": num_classes} | {key: getattr(m, name) for key, name in ARCH_PARAMS[m.name].items()}


def params_digest(params: Params) -> str:
    return hashlib.sha256(json.dumps(params.model_dump(by_alias=True), sort_keys=True).encode()).hexdigest()


def hardware_description(device: str) -> str:
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(0)
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{_cpu_model()}, {cores} CPU cores"


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine()


def _write_csv(path: Path, header: list[str], rows: list[tuple]) -> None:
    buffer = _io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(header)
    writer.writerows(rows)
    io.write_text(path, buffer.getvalue())
