"""Stage ``train``: the ``model`` section's model trained with the ``train`` section on the prepared data."""

from __future__ import annotations

import torch

from vitlab import files
from vitlab.checkpoint import save_checkpoint
from vitlab.data.prepared import load_prepared
from vitlab.device import compile_backend, cpu_record
from vitlab.distill import load_teacher
from vitlab.distributed import is_main_process
from vitlab.figures import animate_training, plot_training_curves
from vitlab.models import build_model, count_parameters, distills
from vitlab.params import Params
from vitlab.stages import Layout, write_metrics
from vitlab.tracking import Tracker
from vitlab.train import train, training_data

VAL_COLUMNS = ("val_loss", "val_accuracy")  # history.tsv's columns measured on the validation split


def run(params: Params, layout: Layout) -> None:
    """Train, then save the best-on-validation weights, the history, curves and metrics (rank 0 only under
    torchrun). The resume state ``layout.train_state`` is deleted once every output is written. A ViT with
    ``model.distillation`` learns from the teacher stage's ``layout.teacher`` (DeiT)."""
    with compile_backend(params.train.compile, params.train.device):  # checked before anything is read
        _run(params, layout)


def _run(params: Params, layout: Layout) -> None:
    dataset = load_prepared(layout.prepared_dir)
    train_split, val_split, norm = training_data(dataset, params.data)
    torch.manual_seed(params.train.seed)  # fixes the weight initialization too
    model = build_model(params.model.name, params.model.config(dataset.num_classes, *dataset.train.geometry))
    teacher = (
        load_teacher(layout.teacher, dataset.class_names, dataset.train.geometry) if distills(model) else None
    )
    n_params = count_parameters(model)
    n_val = len(val_split) if val_split else 0
    name = params.model.preset or params.model.name
    taught = f"; distilled from {layout.teacher}" if teacher is not None else ""
    print(f"{name}: {n_params:,} parameters; {len(train_split)} train / {n_val} val images{taught}")
    if not is_main_process():  # another torchrun process: it trains beside rank 0, which writes everything
        train(
            model, train_split, val_split, norm, params.train, state_path=layout.train_state, teacher=teacher
        )
        return
    with Tracker(config=params.model_dump(by_alias=True) | {"num_parameters": n_params}) as tracker:

        def on_epoch(row: dict[str, float]) -> None:
            tracker.log(row, step=int(row["epoch"]))

        result = train(
            model, train_split, val_split, norm, params.train, on_epoch, layout.train_state, teacher
        )
        save_checkpoint(layout.checkpoint, model, dataset.class_names, norm, dataset.info.get("dataset", ""))
        # dvc.yaml's Accuracy and Loss plots read the val_ columns, and `dvc plots show` drops a plot whose
        # column is missing: without a validation split (data.val_fraction: 0) they are there, empty.
        rows = [row | {column: row.get(column, "") for column in VAL_COLUMNS} for row in result.history]
        files.write_tsv(layout.train_history, rows)
        plot_training_curves(result.history, layout.train_curves)
        animate_training(result.history, layout.train_gif)
        metrics = result.metrics(n_params, len(train_split))
        write_metrics(layout.train_metrics, layout.train_run, metrics, {"cpu": cpu_record()})
        layout.train_state.unlink(missing_ok=True)  # every output saved: nothing left to resume
        tracker.summary(metrics)
        tracker.log_images({"training_curves": layout.train_curves, "training_progress": layout.train_gif})
    print(f"{result} -> {layout.checkpoint}")
