"""The pipeline's stages: each reads its params section, calls the library and writes its outputs.

``dvc.yaml`` runs them through ``pipeline/run.py`` and users through ``vitlab stage NAME``: one code path.
Every output is written atomically, and a stage that fails raises VitlabError before writing anything that
could pass for a result.

One module per stage (``vitlab.stages.evaluate`` ...), imported only when that stage runs, so that each DVC
stage depends on exactly the files its code runs: editing the evaluate stage re-runs evaluate, not download
(``tests/test_stage_deps.py`` checks every stage's deps in ``dvc.yaml`` against its import closure).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from vitlab import files
from vitlab.errors import VitlabError

if TYPE_CHECKING:
    from vitlab.params import Params

# dvc.yaml's order: download -> validate -> teacher -> train -> evaluate -> attention -> export -> inference
NAMES = ("download", "validate", "teacher", "train", "evaluate", "attention", "export", "inference")


@dataclass(frozen=True)
class Layout:
    """Where each stage reads and writes: the cookiecutter-data-science folders, relative to the repo."""

    raw_dir: Path = Path("data/raw")  # download cache, md5-verified on reuse
    prepared_dir: Path = Path("data/prepared")
    validation: Path = Path("reports/validation.json")
    teacher: Path = Path("models/teacher.pt")  # the CNN a ViT with model.distillation learns from
    teacher_state: Path = Path("models/teacher_state.pt")  # resume point while training the teacher
    teacher_metrics: Path = Path("reports/teacher/metrics.json")
    teacher_run: Path = Path("reports/teacher/run.json")  # the machine it trained on, in words
    checkpoint: Path = Path("models/model.pt")
    train_state: Path = Path("models/train_state.pt")  # resume point while training; deleted at the end
    train_metrics: Path = Path("reports/train/metrics.json")
    train_run: Path = Path("reports/train/run.json")  # the machine, and what decides the bits (vitlab.cpu)
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
    export_run: Path = Path("reports/export/run.json")  # how the int8 model was quantized, in words
    predictions: Path = Path("reports/inference/predictions.csv")
    inference_metrics: Path = Path("reports/inference/metrics.json")
    inference_run: Path = Path("reports/inference/run.json")  # the ONNX Runtime provider

    @classmethod
    def under(cls, root: Path) -> Layout:
        """The same layout below ``root`` instead of the working directory (tests, other checkouts)."""
        return cls(**{f.name: root / getattr(cls, f.name) for f in fields(cls)})


def write_metrics(
    metrics_path: Path, run_path: Path, metrics: dict[str, Any], words: dict[str, Any] | None = None
) -> None:
    """Write the numbers (and flags) of ``metrics`` to ``metrics_path``, and its strings with ``words`` to
    ``run_path``, each file keeping the nesting: a metrics file holds what people compare across runs (`dvc
    metrics show`, `dvc exp show`), the report beside it what describes the run (hardware, quantization)."""
    numbers, strings = _split(metrics)
    files.write_json(metrics_path, numbers)
    files.write_json(run_path, strings | (words or {}))


def _split(metrics: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    numbers: dict[str, Any] = {}
    strings: dict[str, Any] = {}
    for key, value in metrics.items():
        if isinstance(value, dict):
            inner_numbers, inner_strings = _split(value)
            numbers |= {key: inner_numbers} if inner_numbers else {}
            strings |= {key: inner_strings} if inner_strings else {}
        elif isinstance(value, str):
            strings[key] = value
        else:
            numbers[key] = value
    return numbers, strings


def stage_function(name: str) -> Callable[[Params, Layout], None]:
    """The ``run(params, layout)`` function of stage ``name``; VitlabError for an unknown name."""
    if name not in NAMES:
        raise VitlabError(f"unknown stage {name!r} (stages: {', '.join(NAMES)})")
    return importlib.import_module(f"vitlab.stages.{name}").run


def run_stage(name: str, params_path: str | Path = "params.yaml") -> None:
    """Run stage ``name`` in the working directory with the params file at ``params_path``, as dvc does.

    Raises VitlabError for an unknown stage, invalid params or any failure the stage reports.
    """
    run = stage_function(name)  # an unknown name is reported before the params are read
    from vitlab.params import load_params

    run(load_params(params_path), Layout())
