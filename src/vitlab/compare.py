"""Compare finished runs on the same test images: intervals, paired differences, a table and plots.

Each run is a plain ``RunRecord`` (its per-test-image predictions and per-epoch history), so the statistics
need no DVC; ``run_study`` and ``dvc_records`` are the DVC side: they run the patch-size study as experiments
(``dvc exp run --temp``, which leaves the workspace untouched) and read each experiment's git-tracked
outputs back with ``dvc.api.read`` (``collect_maps`` their attention or Grad-CAM pictures, side by side).

Accuracy and loss get BCa bootstrap intervals over the test images; each run's accuracy minus the
baseline's (the CNN) is bootstrapped over the same images for both (``vitlab.stats``), which is only
meaningful when both runs saw the same test set, so runs on different test sets are refused.
"""

from __future__ import annotations

import csv
import io
import json
import os
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from vitlab import files
from vitlab.errors import VitlabError, one_line
from vitlab.figures import DPI, save_png
from vitlab.stats import CONFIDENCE, RESAMPLES, Interval, bootstrap_ci, paired_bootstrap_diff

PREDICTION_COLUMNS = ("index", "label", "predicted", "confidence", "correct", "loss")
CNN_ARCHS = ("cnn", "resnet")


@dataclass(frozen=True)
class RunRecord:
    """One finished run as ``compare_runs`` reads it: its model and its results on the test images.

    ``predictions`` holds one row per test image with PREDICTION_COLUMNS (``correct`` 0/1, ``loss`` the
    image's cross-entropy in nats, ``confidence`` in [0, 1]); ``history`` one row per epoch.
    """

    name: str
    model: str  # the label shown: the preset's name, else the architecture's
    arch: str  # vit | cnn | resnet | mlp
    patch_size: int | None  # ViTs only
    num_parameters: int
    predictions: pd.DataFrame  # one row per test image, PREDICTION_COLUMNS
    history: pd.DataFrame  # one row per epoch: epoch, val_loss, val_accuracy, ...


@dataclass(frozen=True)
class ComparisonRow:
    """One run's line of the comparison: its model, test loss (nats) and accuracy (a share of the test
    images) with bootstrap intervals, and the paired accuracy difference to the baseline."""

    run: str
    model: str
    arch: str
    patch_size: int | None
    num_parameters: int
    epochs: int
    test_images: int
    test_loss: Interval
    test_accuracy: Interval
    vs_baseline: Interval | None  # accuracy minus the baseline's on the same images; None for the baseline


def compare_runs(
    records: Sequence[RunRecord],
    baseline: str | None = None,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> list[ComparisonRow]:
    """One row per run, ViTs by patch size first; ``baseline`` names the run the others are paired with
    (default: the only CNN among the runs; no differences when there is none)."""
    if not records:
        raise VitlabError("no runs to compare")
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise VitlabError(f"run names must be unique, got {', '.join(names)}")
    baseline = pick_baseline(records, baseline)
    predictions = paired_predictions(records)
    reference = predictions[baseline]["correct"].to_numpy(float) if baseline else None

    def interval(values: np.ndarray) -> Interval:
        return bootstrap_ci(values, confidence, resamples, seed)

    rows = []
    for record in sorted(records, key=_study_order):
        frame = predictions[record.name]
        correct = frame["correct"].to_numpy(float)
        diff = None
        if reference is not None and record.name != baseline:
            diff = paired_bootstrap_diff(correct, reference, confidence, resamples, seed)
        rows.append(
            ComparisonRow(
                run=record.name,
                model=record.model,
                arch=record.arch,
                patch_size=record.patch_size,
                num_parameters=record.num_parameters,
                epochs=len(record.history),
                test_images=len(frame),
                test_loss=interval(frame["loss"].to_numpy(float)),
                test_accuracy=interval(correct),
                vs_baseline=diff,
            )
        )
    return rows


def _study_order(record: RunRecord) -> tuple:
    is_vit = record.patch_size is not None
    return (not is_vit, record.model, record.patch_size or 0, record.name)


def pick_baseline(records: Sequence[RunRecord], baseline: str | None) -> str | None:
    """The run the others are paired with: ``baseline`` if given, else the only CNN (None without one).

    Raises:
        VitlabError: ``baseline`` names no run, or it is None and there are several CNN runs.
    """
    names = [r.name for r in records]
    if baseline is not None:
        if baseline not in names:
            raise VitlabError(f"baseline {baseline!r} is not among the runs ({', '.join(names)})")
        return baseline
    cnns = [r.name for r in records if r.arch in CNN_ARCHS]
    if len(cnns) > 1:
        raise VitlabError(f"several CNN runs ({', '.join(cnns)}): choose the baseline with --baseline")
    return cnns[0] if cnns else None


def paired_predictions(records: Sequence[RunRecord]) -> dict[str, pd.DataFrame]:
    """Each run's predictions sorted by test-image index, after checking that all runs saw the same images.

    Same images means the same indices with the same true labels; anything else (another data set, another
    subset, another order of classes) cannot be paired and is refused, naming the two runs.
    """
    frames = {}
    for record in records:
        missing = set(PREDICTION_COLUMNS) - set(record.predictions.columns)
        if missing:
            raise VitlabError(f"{record.name}: predictions lack the columns {', '.join(sorted(missing))}")
        frame = record.predictions.sort_values("index").reset_index(drop=True)
        if frame.empty or frame["index"].duplicated().any():
            raise VitlabError(f"{record.name}: predictions must list each test image once")
        frames[record.name] = frame
    first, *others = records
    reference = frames[first.name]
    for record in others:
        frame = frames[record.name]
        if len(frame) != len(reference) or not (frame["index"] == reference["index"]).all():
            raise VitlabError(
                f"runs {first.name!r} and {record.name!r} were evaluated on different test sets "
                f"({len(reference)} vs {len(frame)} images): compare runs of one data set (choose them "
                "with --exp)"
            )
        differ = int((frame["label"].astype(str) != reference["label"].astype(str)).sum())
        if differ:
            raise VitlabError(
                f"runs {first.name!r} and {record.name!r} were evaluated on different test sets (the true "
                f"labels of {differ} of {len(frame)} images differ): compare runs of one data set (choose "
                "them with --exp)"
            )
    return frames


TABLE_FIELDS = (
    "run",
    "model",
    "arch",
    "patch_size",
    "num_parameters",
    "epochs",
    "test_images",
    "test_loss",
    "test_loss_low",
    "test_loss_high",
    "test_accuracy",
    "test_accuracy_low",
    "test_accuracy_high",
    "baseline",
    "accuracy_vs_baseline",
    "accuracy_vs_baseline_low",
    "accuracy_vs_baseline_high",
)


def table_csv(rows: Sequence[ComparisonRow], baseline: str | None) -> str:
    """The rows as CSV text with TABLE_FIELDS as header: each interval as estimate, low, high (6 decimals;
    accuracies as shares, not percent), empty cells where a run has no difference to the baseline."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, TABLE_FIELDS, lineterminator="\n")
    writer.writeheader()
    for row in rows:
        diff = row.vs_baseline
        writer.writerow(
            {
                "run": row.run,
                "model": row.model,
                "arch": row.arch,
                "patch_size": "" if row.patch_size is None else row.patch_size,
                "num_parameters": row.num_parameters,
                "epochs": row.epochs,
                "test_images": row.test_images,
                **_interval_fields("test_loss", row.test_loss),
                **_interval_fields("test_accuracy", row.test_accuracy),
                "baseline": baseline or "",
                **_interval_fields("accuracy_vs_baseline", diff),
            }
        )
    return buffer.getvalue()


def _interval_fields(name: str, interval: Interval | None) -> dict[str, str]:
    if interval is None:
        return {name: "", f"{name}_low": "", f"{name}_high": ""}
    return {
        name: f"{interval.estimate:.6f}",
        f"{name}_low": f"{interval.low:.6f}",
        f"{name}_high": f"{interval.high:.6f}",
    }


def table_markdown(rows: Sequence[ComparisonRow], baseline: str | None, resamples: int, seed: int) -> str:
    """The rows as a Markdown table (accuracy in percent, its difference in points) and a note saying how
    the intervals were computed (``resamples`` and ``seed`` as given to ``compare_runs``)."""
    confidence = f"{rows[0].test_accuracy.confidence:.0%}"
    vs = f"vs {baseline}: Δ accuracy ({confidence} CI)" if baseline else "Δ accuracy"
    lines = [
        f"| run | model | patch | params | epochs | test loss ({confidence} CI) "
        f"| test accuracy ({confidence} CI) | {vs} |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        loss, acc, diff = row.test_loss, row.test_accuracy, row.vs_baseline
        if diff is not None:
            delta = f"{100 * diff.estimate:+.1f} pts [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]"
        else:
            delta = "baseline" if row.run == baseline else "–"
        cells = [
            row.run,
            row.model,
            "–" if row.patch_size is None else str(row.patch_size),
            f"{row.num_parameters:,}",
            str(row.epochs),
            f"{loss.estimate:.3f} [{loss.low:.3f}, {loss.high:.3f}]",
            f"{100 * acc.estimate:.1f}% [{100 * acc.low:.1f}, {100 * acc.high:.1f}]",
            delta,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"{rows[0].test_images:,} test images, the same for every run. Intervals: BCa bootstrap over "
        f"the test images ({resamples:,} resamples, seed {seed}). Δ accuracy is paired: each resample "
        "draws the same images for both runs, so an interval that excludes 0 is a difference the test set "
        "resolves.",
    ]
    return "\n".join(lines) + "\n"


def plot_accuracy_vs_patch(rows: Sequence[ComparisonRow], path: str | Path) -> Path:
    """Test accuracy with its interval per patch size, one line per ViT model; other models as bands."""
    fig = Figure(figsize=(7.0, 4.5), dpi=DPI, layout="constrained")
    ax = fig.subplots()
    vits = [r for r in rows if r.patch_size is not None]
    for model in dict.fromkeys(r.model for r in vits):
        group = sorted((r for r in vits if r.model == model), key=lambda r: r.patch_size)
        x = [r.patch_size for r in group]
        y = np.array([100 * r.test_accuracy.estimate for r in group])
        err = np.array(
            [[100 * r.test_accuracy.low for r in group], [100 * r.test_accuracy.high for r in group]]
        )
        ax.errorbar(x, y, yerr=np.abs(err - y), marker="o", capsize=4, label=model)
    for color, row in zip(("tab:red", "tab:purple", "tab:brown", "tab:gray"), _non_vits(rows), strict=False):
        acc = row.test_accuracy
        label = f"{_label(row.run, row.model)}: {100 * acc.estimate:.1f}%"
        ax.axhline(100 * acc.estimate, color=color, linestyle="--", label=label)
        ax.axhspan(100 * acc.low, 100 * acc.high, color=color, alpha=0.12)
    sizes = sorted({r.patch_size for r in vits})
    if sizes:
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes, [str(s) for s in sizes])
        ax.set_xlim(sizes[0] / 1.5, sizes[-1] * 1.5)
    ax.set(xlabel="patch size (pixels per side)", ylabel="test accuracy (%)")
    confidence = f"{rows[0].test_accuracy.confidence:.0%}"
    ax.set_title(f"test accuracy vs patch size ({confidence} bootstrap intervals)", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def _label(run: str, model: str) -> str:
    return run if run == model else f"{run} ({model})"


def _non_vits(rows: Sequence[ComparisonRow]) -> list[ComparisonRow]:
    return [r for r in rows if r.patch_size is None]


def plot_val_curves(records: Sequence[RunRecord], path: str | Path) -> Path:
    """Validation loss and accuracy per epoch of every run, on one figure."""
    fig = Figure(figsize=(12.0, 4.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2)
    for record in sorted(records, key=_study_order):
        history = record.history
        if "val_accuracy" not in history.columns:
            continue  # a run without a validation split has no curve to show
        label = _label(record.name, record.model)
        axes[0].plot(history["epoch"], history["val_loss"], label=label)
        axes[1].plot(history["epoch"], 100 * history["val_accuracy"], label=label)
    for ax, title in zip(axes, ("validation loss", "validation accuracy (%)"), strict=True):
        ax.set(title=title, xlabel="epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[1].legend(fontsize=8)
    return save_png(fig, path)


def write_comparison(
    records: Sequence[RunRecord],
    out_dir: str | Path,
    baseline: str | None = None,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> list[ComparisonRow]:
    """table.csv, table.md, accuracy_vs_patch.png and, when a run has a validation history, val_curves.png
    in ``out_dir``; returns the rows."""
    out_dir = Path(out_dir)
    baseline = pick_baseline(records, baseline)
    rows = compare_runs(records, baseline, resamples=resamples, seed=seed)
    files.write_text(out_dir / "table.csv", table_csv(rows, baseline))
    files.write_text(out_dir / "table.md", table_markdown(rows, baseline, resamples, seed))
    plot_accuracy_vs_patch(rows, out_dir / "accuracy_vs_patch.png")
    if any("val_accuracy" in record.history.columns for record in records):
        plot_val_curves(records, out_dir / "val_curves.png")
    return rows


# --- DVC experiments -------------------------------------------------------------------------------------


def study_variants(patch_sizes: Sequence[int], prefix: str) -> dict[str, list[str]]:
    """The patch-size study as experiment name -> ``-S`` settings: one ViT per patch size, then the CNN."""
    variants = {f"{prefix}-p{p}": ["model.name=vit", f"model.patch_size={p}"] for p in patch_sizes}
    return variants | {f"{prefix}-cnn": ["model.name=cnn"]}


def run_study(
    variants: dict[str, list[str]], settings: Sequence[str] = (), force: bool = False, repo: str | Path = "."
) -> list[str]:
    """Run each variant as ``dvc exp run --temp -n NAME -S ...`` (plus ``settings`` for all), one by one.

    ``--temp`` runs each experiment in a temporary copy of the repository, so params.yaml and the workspace
    outputs stay as they were. Returns the experiment names.
    """
    env = dict(os.environ)
    # The stages run `python`: this interpreter's, with its packages, even from a non-activated shell.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    for name, variant in variants.items():
        command = [sys.executable, "-m", "dvc", "exp", "run", "--temp", "-n", name]
        command += ["--force"] if force else []
        for setting in [*settings, *variant]:
            command += ["-S", setting]
        print(f"$ dvc exp run --temp -n {name} " + " ".join(f"-S {s}" for s in [*settings, *variant]))
        done = subprocess.run(command, cwd=repo, env=env)
        if done.returncode:
            raise VitlabError(f"dvc exp run -n {name} failed (exit {done.returncode}); its output is above")
    return list(variants)


@dataclass(frozen=True)
class RunFiles:
    """Where a run's outputs live inside its experiment (repository-relative, git-tracked)."""

    predictions: str
    history: str
    model: str


def finished_experiments(repo: str | Path = ".") -> list[str]:
    """Names of the finished experiments based on the current commit (``dvc exp show``'s rows)."""
    import dvc.api

    try:
        rows = dvc.api.exp_show(repo=str(repo))
    except Exception as error:  # not a DVC repository, no commit yet, a broken git state...
        reason = one_line(error)
        raise VitlabError(f"cannot list the DVC experiments of {repo} ({reason})") from None
    return [r["Experiment"] for r in rows if r.get("Experiment") and r.get("State") in (None, "Success")]


def dvc_records(names: Sequence[str], files: RunFiles, repo: str | Path = ".") -> list[RunRecord]:
    """Read each named experiment's predictions, history and model description with ``dvc.api``."""
    import dvc.api

    records = []
    for name in names:
        texts = [_read(path, name, repo) for path in (files.predictions, files.history, files.model)]
        params = dvc.api.params_show(repo=str(repo), rev=name)
        records.append(parse_record(name, *texts, params))
    return records


def _read(path: str, rev: str, repo: str | Path, mode: str = "r") -> Any:
    """A file of an experiment (or any git revision) through ``dvc.api.read``; a missing one is one line."""
    import dvc.api

    try:
        return dvc.api.read(path, repo=str(repo), rev=rev, mode=mode)
    except Exception as error:  # dvc raises a different type for each way a rev or file can be missing
        reason = one_line(error)
        raise VitlabError(
            f"experiment {rev!r}: cannot read {path} ({reason}); is it a finished experiment of this "
            "pipeline (dvc exp show)?"
        ) from None


def collect_maps(
    names: Sequence[str], attention_dir: str, out_dir: str | Path, repo: str | Path = "."
) -> list[Path]:
    """Copy each experiment's summary map of where it looks (a ViT's rollout.png, a CNN's gradcam.png; the
    same test images in the same layout) to ``out_dir/NAME-FILE``, to set the families side by side."""
    copied = []
    for name in names:
        summary = json.loads(_read(f"{attention_dir}/summary.json", name, repo))
        if summary.get("supported"):
            picture = summary["files"][-1]
            data = _read(f"{attention_dir}/{picture}", name, repo, mode="rb")
            copied.append(Path(out_dir) / f"{name}-{picture}")
            files.write_bytes(copied[-1], data)
    return copied


def parse_record(
    name: str, predictions_csv: str, history_tsv: str, model_json: str, params: dict[str, Any]
) -> RunRecord:
    """A RunRecord from a run's files: predictions.csv, history.tsv, model.json and its params."""
    model = json.loads(model_json)
    arch, config = model["arch"], model["config"]
    preset = params.get("model", {}).get("preset")
    return RunRecord(
        name=name,
        model=preset or arch,
        arch=arch,
        patch_size=config.get("patch_size") if arch == "vit" else None,
        num_parameters=int(model["num_parameters"]),
        predictions=pd.read_csv(io.StringIO(predictions_csv)),
        history=pd.read_csv(io.StringIO(history_tsv), sep="\t"),
    )
