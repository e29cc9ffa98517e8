"""Stage ``teacher``: the CNN a ViT with ``model.distillation`` learns from (DeiT), the ``teacher`` section's
preset trained by the ``train`` section's recipe on the train stage's images; with model.distillation off, a
note that no teacher was trained, in seconds."""

from __future__ import annotations

import torch

from vitlab import files
from vitlab.checkpoint import save_checkpoint
from vitlab.data.prepared import load_prepared
from vitlab.device import compile_backend
from vitlab.distill import NO_TEACHER
from vitlab.distributed import is_main_process
from vitlab.models import build_model, count_parameters, preset_config
from vitlab.params import Params
from vitlab.stages import Layout, write_metrics
from vitlab.train import train, training_data


def run(params: Params, layout: Layout) -> None:
    """Train the teacher, then save its best-on-validation weights to ``layout.teacher`` and its metrics
    (rank 0 only under torchrun). The resume state ``layout.teacher_state`` is deleted once both are
    written. With ``model.distillation`` off nothing learns from a teacher: ``layout.teacher`` holds
    ``NO_TEACHER`` and the metrics ``{"trained": false}``."""
    if not params.model.distillation:
        if is_main_process():
            files.write_bytes(layout.teacher, NO_TEACHER)
            write_metrics(layout.teacher_metrics, layout.teacher_run, {"trained": False})
            # a teacher's run, stopped before distillation went off
            layout.teacher_state.unlink(missing_ok=True)
        print(f"teacher: none trained, model.distillation is off -> {layout.teacher}")
        return
    with compile_backend(params.train.compile, params.train.device):  # checked before anything is read
        _run(params, layout)


def _run(params: Params, layout: Layout) -> None:
    dataset = load_prepared(layout.prepared_dir)
    train_split, val_split, norm = training_data(dataset, params.data)
    recipe = params.teacher.recipe(params.train)
    torch.manual_seed(recipe.seed)  # fixes the weight initialization too
    size, channels = dataset.train.geometry
    arch, config = preset_config(
        params.teacher.preset, num_classes=dataset.num_classes, image_size=size, in_channels=channels
    )
    model = build_model(arch, config)
    n_params = count_parameters(model)
    print(f"teacher {params.teacher.preset}: {n_params:,} parameters, {recipe.epochs} epochs")
    result = train(model, train_split, val_split, norm, recipe, state_path=layout.teacher_state)
    if not is_main_process():  # another torchrun process: rank 0 writes everything
        return
    save_checkpoint(layout.teacher, model, dataset.class_names, norm, dataset.info.get("dataset", ""))
    metrics = {"trained": True} | result.metrics(n_params, len(train_split))
    write_metrics(layout.teacher_metrics, layout.teacher_run, metrics)
    layout.teacher_state.unlink(missing_ok=True)  # every output saved: nothing left to resume
    print(f"teacher: {result} -> {layout.teacher}")
