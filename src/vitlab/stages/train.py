"""Stage ``train``: the ``model`` section's model trained with the ``train`` section on the prepared data."""

from __future__ import annotations

import numpy as np
import torch

from vitlab import files
from vitlab.checkpoint import Normalization, save_checkpoint
from vitlab.data.prepared import load_prepared
from vitlab.device import hardware_description
from vitlab.distributed import is_main_process
from vitlab.figures import animate_training, plot_training_curves
from vitlab.models import build_model, count_parameters
from vitlab.params import Params
from vitlab.stages import Layout
from vitlab.tracking import Tracker
from vitlab.train import TrainConfig, split_train_val, train


def run(params: Params, layout: Layout) -> None:
    """Train, then save the best-on-validation weights, the history, curves and metrics (rank 0 only under
    torchrun). The resume state ``layout.train_state`` is deleted once every output is written."""
    dataset = load_prepared(layout.prepared_dir)
    train_split, val_split = split_train_val(dataset.train, params.data.val_fraction, params.data.seed)
    norm = Normalization.from_images(train_split.images)
    torch.manual_seed(params.train.seed)  # fixes the weight initialization too
    model = build_model(params.model.name, params.model.arch_config(dataset.num_classes))
    n_params = count_parameters(model)
    print(
        f"{params.model.preset or params.model.name}: {n_params:,} parameters; {len(train_split)} train / "
        f"{len(val_split) if val_split else 0} val images"
    )
    cfg = TrainConfig(**params.train.model_dump())
    if not is_main_process():  # another torchrun process: it trains beside rank 0, which writes everything
        train(model, train_split, val_split, norm, cfg, state_path=layout.train_state)
        return
    tracker = Tracker(config=params.model_dump(by_alias=True) | {"num_parameters": n_params})
    try:
        result = train(
            model,
            train_split,
            val_split,
            norm,
            cfg,
            on_epoch=lambda row: tracker.log(row, step=int(row["epoch"])),
            state_path=layout.train_state,
        )
        save_checkpoint(layout.checkpoint, model, dataset.class_names, norm, dataset.info.get("dataset", ""))
        files.write_tsv(layout.train_history, result.history)
        plot_training_curves(result.history, layout.train_curves)
        animate_training(result.history, layout.train_gif)
        metrics = {
            "best_epoch": result.best_epoch,
            # null, not NaN (which strict JSON readers refuse), when data.val_fraction leaves no validation
            "best_val_accuracy": None if val_split is None else result.best_val_accuracy,
            "final_train_accuracy": result.history[-1]["train_accuracy"],
            "num_parameters": n_params,
            "train_images": len(train_split),
            "wall_time_s": round(result.wall_time_s, 1),
            "images_per_s": round(float(np.mean([r["images_per_s"] for r in result.history])), 1),
            "device": result.device,
            "hardware": hardware_description(result.device),
        }
        files.write_json(layout.train_metrics, metrics)
        # Every output is saved: nothing left to resume, and DVC sees only the declared outputs.
        layout.train_state.unlink(missing_ok=True)
        tracker.summary(metrics)
        tracker.log_images({"training_curves": layout.train_curves, "training_progress": layout.train_gif})
    finally:
        tracker.finish()
    kept = (
        f"best val accuracy {result.best_val_accuracy:.4f} at epoch {result.best_epoch}"
        if val_split is not None
        else f"no validation split: the last epoch ({result.best_epoch}) kept"
    )
    print(f"{kept}; {result.wall_time_s:.0f} s -> {layout.checkpoint}")
