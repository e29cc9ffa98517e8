"""Compare finished runs on the same test images: intervals, paired differences, a table and plots.

Each run is a plain ``RunRecord`` (its per-test-image predictions and per-epoch history), so the statistics
need no DVC; ``run_study`` and ``dvc_records`` are the DVC side: they run the patch-size study as experiments
(``dvc exp run --temp``, which leaves the workspace untouched) and read each experiment's git-tracked
outputs back with ``dvc.api.read`` (``collect_maps`` their attention or Grad-CAM pictures, side by side).

Accuracy and loss get BCa bootstrap intervals over the test images; each run's accuracy minus the
baseline's (the CNN) is bootstrapped over the same images for both (``vitlab.stats``), which is only
meaningful when both runs saw the same test set, so runs on different test sets are refused.

Runs of one configuration that differ only in ``train.seed`` form a group (``RunRecord.group``; DVC
experiments named NAME-sSEED by ``seed_variants``) and make one row: the mean and standard deviation of test
accuracy over the seeds (training noise) beside the bootstrap interval of the seed-averaged correctness
(test-set sampling), and the same for the difference to the baseline (``vitlab.stats.over_seeds`` defines
each). A run of its own is a group of one, with the row it always had.
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
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
from vitlab.presets import preset_of
from vitlab.stats import CONFIDENCE, RESAMPLES, Interval, SeedSpread, bootstrap_ci, over_seeds

PREDICTION_COLUMNS = ("index", "label", "predicted", "confidence", "correct", "loss")
CNN_ARCHS = ("cnn", "resnet")


@dataclass(frozen=True)
class RunRecord:
    """One finished run as ``compare_runs`` reads it: its model and its results on the test images.

    ``predictions`` holds one row per test image with PREDICTION_COLUMNS (``correct`` 0/1, ``loss`` the
    image's cross-entropy in nats, ``confidence`` in [0, 1]); ``history`` one row per epoch. Runs with the
    same ``group`` are one configuration trained with different ``seed``s (``seed_groups``).
    """

    name: str
    model: str  # the label shown: the preset the built model is (vitlab.presets.preset_of), else its arch
    arch: str  # vit | cnn | resnet | mlp
    patch_size: int | None  # ViTs only
    num_parameters: int
    predictions: pd.DataFrame  # one row per test image, PREDICTION_COLUMNS
    history: pd.DataFrame  # one row per epoch: epoch, val_loss, val_accuracy, ...
    seed: int | None = None  # train.seed, where known
    group: str | None = None  # the configuration's name, shared by its seeds' runs; None: the run's name

    @property
    def group_name(self) -> str:
        """The row this run is compared in: its ``group``, else its own name."""
        return self.group or self.name


@dataclass(frozen=True)
class ComparisonRow:
    """One configuration's line of the comparison (a run, or a group of seeds' runs, named ``run``): its
    model, test loss (nats) and accuracy (a share of the test images) with bootstrap intervals, and the
    paired accuracy difference to the baseline; for a group of several seeds also the per-seed accuracies
    and differences (``vitlab.stats.over_seeds``: the intervals are then those of the seed-averaged
    per-image values, ``epochs`` the most any seed trained)."""

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
    accuracy_over_seeds: SeedSpread | None = None  # each seed's test accuracy; None for a single run
    vs_baseline_over_seeds: SeedSpread | None = None  # each seed's minus the baseline's of the same seed


def compare_runs(
    records: Sequence[RunRecord],
    baseline: str | None = None,
    confidence: float = CONFIDENCE,
    resamples: int = RESAMPLES,
    seed: int = 0,
) -> list[ComparisonRow]:
    """One row per configuration (a run, or a group of runs differing only in seed: ``seed_groups``), ViTs
    by patch size first; ``baseline`` names the configuration the others are paired with (default: the
    only CNN among them; no differences when there is none).

    A group's test accuracy and difference to the baseline are ``vitlab.stats.over_seeds``'s: the bootstrap
    intervals resample the test images of each image's correctness averaged over the group's seeds (paired
    with the baseline group's seed average), and the per-seed figures give their mean and sample standard
    deviation (ddof=1) over seeds; the test loss is bootstrapped the same way, averaged over seeds.
    """
    if not records:
        raise VitlabError("no runs to compare")
    names = [r.name for r in records]
    if len(set(names)) != len(names):
        raise VitlabError(f"run names must be unique, got {', '.join(names)}")
    groups = seed_groups(records)
    baseline = pick_baseline(records, baseline)
    predictions = paired_predictions(records)

    def by_seed(members: list[RunRecord], column: str) -> dict[int | None, np.ndarray]:
        return {m.seed: predictions[m.name][column].to_numpy(float) for m in members}

    reference = by_seed(groups[baseline], "correct") if baseline else None
    rows = []
    for name, members in sorted(groups.items(), key=lambda item: _study_order(item[1][0])):
        paired = reference if name != baseline else None
        stats = over_seeds(by_seed(members, "correct"), paired, confidence, resamples, seed)
        loss = np.mean(list(by_seed(members, "loss").values()), axis=0)
        several = len(members) > 1
        first = members[0]
        rows.append(
            ComparisonRow(
                run=name,
                model=first.model,
                arch=first.arch,
                patch_size=first.patch_size,
                num_parameters=first.num_parameters,
                epochs=max(len(m.history) for m in members),
                test_images=len(predictions[first.name]),
                test_loss=bootstrap_ci(loss, confidence, resamples, seed),
                test_accuracy=stats.accuracy,
                vs_baseline=stats.vs_baseline,
                accuracy_over_seeds=stats.accuracy_over_seeds if several else None,
                vs_baseline_over_seeds=stats.vs_baseline_over_seeds if several else None,
            )
        )
    return rows


def seed_groups(records: Sequence[RunRecord]) -> dict[str, list[RunRecord]]:
    """The runs by configuration (``RunRecord.group_name``), in order of first appearance, each group's runs
    by seed.

    Raises:
        VitlabError: two runs of a group share a seed (or lack one), or differ in model, architecture,
            patch size or parameter count (then they are not one configuration).
    """
    groups: dict[str, list[RunRecord]] = {}
    for record in records:
        groups.setdefault(record.group_name, []).append(record)
    for name, members in groups.items():
        if len(members) == 1:
            continue
        seeds = [m.seed for m in members]
        if None in seeds or len(set(seeds)) != len(seeds):
            listed = ", ".join(f"{m.name} (seed {m.seed})" for m in members)
            raise VitlabError(f"group {name!r}: its runs need distinct train seeds, got {listed}")
        first, *others = members
        for field in ("model", "arch", "patch_size", "num_parameters"):
            for other in others:
                if getattr(other, field) != getattr(first, field):
                    raise VitlabError(
                        f"group {name!r}: runs {first.name!r} and {other.name!r} differ in {field} "
                        f"({getattr(first, field)} vs {getattr(other, field)}), so they are not one "
                        "configuration's seeds"
                    )
        members.sort(key=lambda m: m.seed)
    return groups


def _study_order(record: RunRecord) -> tuple:
    is_vit = record.patch_size is not None
    return (not is_vit, record.model, record.patch_size or 0, record.group_name)


def pick_baseline(records: Sequence[RunRecord], baseline: str | None) -> str | None:
    """The configuration the others are paired with (a run's or a seed group's name, ``group_name``):
    ``baseline`` if given, else the only CNN (None without one).

    Raises:
        VitlabError: ``baseline`` names no configuration, or it is None and there are several CNN ones.
    """
    names = list(dict.fromkeys(r.group_name for r in records))
    if baseline is not None:
        if baseline not in names:
            raise VitlabError(f"baseline {baseline!r} is not among the runs ({', '.join(names)})")
        return baseline
    cnns = list(dict.fromkeys(r.group_name for r in records if r.arch in CNN_ARCHS))
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
# After TABLE_FIELDS when some configuration ran several seeds: the seeds (space-separated) and, per seed in
# that order, the test accuracy and its difference to the baseline's run of the same seed, with their
# sample standard deviations (ddof=1) over seeds. Their means are test_accuracy and accuracy_vs_baseline.
SEED_FIELDS = (
    "seeds",
    "test_accuracy_std",
    "test_accuracy_per_seed",
    "accuracy_vs_baseline_std",
    "accuracy_vs_baseline_per_seed",
)


def table_csv(rows: Sequence[ComparisonRow], baseline: str | None) -> str:
    """The rows as CSV text with TABLE_FIELDS as header (and SEED_FIELDS when a configuration ran several
    seeds): each interval as estimate, low, high (6 decimals; accuracies as shares, not percent), empty
    cells where a run has no difference to the baseline or no seeds' spread."""
    seeded = _seeded(rows)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, TABLE_FIELDS + (SEED_FIELDS if seeded else ()), lineterminator="\n")
    writer.writeheader()
    for row in rows:
        diff = row.vs_baseline
        seed_cells = {}
        if seeded:
            seed_cells = _spread_fields("test_accuracy", row.accuracy_over_seeds)
            seed_cells |= _spread_fields("accuracy_vs_baseline", row.vs_baseline_over_seeds)
            spread = row.accuracy_over_seeds
            seed_cells["seeds"] = " ".join(map(str, spread.seeds)) if spread else ""
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
                **seed_cells,
            }
        )
    return buffer.getvalue()


def _seeded(rows: Sequence[ComparisonRow]) -> bool:
    return any(row.accuracy_over_seeds is not None for row in rows)


def _spread_fields(name: str, spread: SeedSpread | None) -> dict[str, str]:
    if spread is None:
        return {f"{name}_std": "", f"{name}_per_seed": ""}
    return {
        f"{name}_std": "" if spread.std is None else f"{spread.std:.6f}",
        f"{name}_per_seed": " ".join(f"{value:.6f}" for value in spread.values),
    }


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
    the intervals were computed (``resamples`` and ``seed`` as given to ``compare_runs``). When a
    configuration ran several seeds, accuracy and difference also give the standard deviation over seeds
    and the per-seed figures, and the note says what each figure covers."""
    seeded = _seeded(rows)
    confidence = f"{rows[0].test_accuracy.confidence:.0%}"
    if seeded:
        vs = f"vs {baseline}: Δ accuracy, mean ± sd [{confidence} CI]" if baseline else "Δ accuracy"
        head = (
            f"seeds | test loss ({confidence} CI) | test accuracy, mean ± sd [{confidence} CI] | per seed "
            f"| {vs} | per seed"
        )
    else:
        vs = f"vs {baseline}: Δ accuracy ({confidence} CI)" if baseline else "Δ accuracy"
        head = f"test loss ({confidence} CI) | test accuracy ({confidence} CI) | {vs}"
    columns = 8 + 3 * seeded
    lines = [
        f"| run | model | patch | params | epochs | {head} |",
        "| --- | --- |" + " ---: |" * (columns - 2),
    ]
    for row in rows:
        loss, acc, diff = row.test_loss, row.test_accuracy, row.vs_baseline
        spread, diff_spread = row.accuracy_over_seeds, row.vs_baseline_over_seeds
        if diff is not None:
            delta = difference_cell(diff, diff_spread)
        else:
            delta = "baseline" if row.run == baseline else "–"
        cells = [
            row.run,
            row.model,
            "–" if row.patch_size is None else str(row.patch_size),
            f"{row.num_parameters:,}",
            str(row.epochs),
            *([", ".join(map(str, spread.seeds)) if spread else "–"] if seeded else []),
            f"{loss.estimate:.3f} [{loss.low:.3f}, {loss.high:.3f}]",
            accuracy_cell(acc, spread),
            *([per_seed_cell(spread)] if seeded else []),
            delta,
            *([per_seed_cell(diff_spread, "+")] if seeded else []),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        f"{rows[0].test_images:,} test images, the same for every run. Intervals: BCa bootstrap over "
        f"the test images ({resamples:,} resamples, seed {seed}). Δ accuracy is paired: each resample "
        "draws the same images for both runs, so an interval that excludes 0 is a difference the test set "
        "resolves.",
    ]
    if seeded:
        lines[-1] += (
            " A configuration trained with several seeds (train.seed) is one row: its accuracy is the mean "
            "over seeds ± their sample standard deviation (ddof=1), the spread training noise causes; its "
            "interval bootstraps each image's correctness averaged over the seeds, so it covers test-set "
            "sampling only, the seeds' models held fixed. Its Δ is that seed average's paired difference to "
            "the baseline's, ± the standard deviation of the per-seed differences (each seed against the "
            "baseline's run of the same seed; shown when both ran the same seeds)."
        )
    return "\n".join(lines) + "\n"


def accuracy_cell(accuracy: Interval, spread: SeedSpread | None = None) -> str:
    """An accuracy (a share) as Markdown: ``60.0% [55.2, 64.5]``, or over several seeds
    ``60.0% ± 1.0 [55.2, 64.5]`` (± the standard deviation over seeds, in points)."""
    return (
        f"{100 * accuracy.estimate:.1f}%{_sd(spread)} [{100 * accuracy.low:.1f}, {100 * accuracy.high:.1f}]"
    )


def difference_cell(diff: Interval, spread: SeedSpread | None = None) -> str:
    """An accuracy difference (a share) as Markdown points: ``+5.0 pts [+1.2, +8.8]``, or with the per-seed
    differences' standard deviation ``+5.0 ± 1.0 pts [+1.2, +8.8]``."""
    return f"{100 * diff.estimate:+.1f}{_sd(spread)} pts [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]"


def per_seed_cell(spread: SeedSpread | None, sign: str = "") -> str:
    """Each seed's figure in percent, in seed order (``sign`` "+": signed points); – without a spread."""
    return "–" if spread is None else ", ".join(f"{100 * value:{sign}.1f}" for value in spread.values)


def _sd(spread: SeedSpread | None) -> str:
    """`` ± 1.2`` (points) for a spread over several seeds, else nothing."""
    return "" if spread is None or spread.std is None else f" ± {100 * spread.std:.1f}"


def plot_accuracy_vs_patch(rows: Sequence[ComparisonRow], path: str | Path) -> Path:
    """Test accuracy with its interval per patch size, one line per ViT model; other models as bands. A
    configuration of several seeds is its seeds' mean, with each seed's accuracy as a dot."""
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
        line = ax.errorbar(x, y, yerr=np.abs(err - y), marker="o", capsize=4, label=model)
        for row in group:
            if row.accuracy_over_seeds is not None:
                values = 100 * np.array(row.accuracy_over_seeds.values)
                ax.plot(
                    [row.patch_size] * len(values), values, ".", color=line.lines[0].get_color(), alpha=0.5
                )
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
    dots = "; dots: seeds" if _seeded(rows) else ""
    ax.set_title(f"test accuracy vs patch size ({confidence} bootstrap intervals{dots})", fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return save_png(fig, path)


def _label(run: str, model: str) -> str:
    return run if run == model else f"{run} ({model})"


def _non_vits(rows: Sequence[ComparisonRow]) -> list[ComparisonRow]:
    return [r for r in rows if r.patch_size is None]


def validated(history: pd.DataFrame) -> bool:
    """Whether a run's history (history.tsv) holds validation measurements: a run without a validation split
    has none, or empty val_ columns (kept for dvc.yaml's plots)."""
    return "val_accuracy" in history.columns and bool(history["val_accuracy"].notna().any())


def plot_val_curves(records: Sequence[RunRecord], path: str | Path) -> Path:
    """Validation loss and accuracy per epoch of every run, on one figure."""
    fig = Figure(figsize=(12.0, 4.5), dpi=DPI, layout="constrained")
    axes = fig.subplots(1, 2)
    for record in sorted(records, key=_study_order):
        history = record.history
        if not validated(history):
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
    (else none: a previous comparison's is removed) in ``out_dir``; returns the rows."""
    out_dir = Path(out_dir)
    baseline = pick_baseline(records, baseline)
    rows = compare_runs(records, baseline, resamples=resamples, seed=seed)
    files.write_text(out_dir / "table.csv", table_csv(rows, baseline))
    files.write_text(out_dir / "table.md", table_markdown(rows, baseline, resamples, seed))
    plot_accuracy_vs_patch(rows, out_dir / "accuracy_vs_patch.png")
    if any(validated(record.history) for record in records):
        plot_val_curves(records, out_dir / "val_curves.png")
    else:
        (out_dir / "val_curves.png").unlink(missing_ok=True)
    return rows


# --- DVC experiments -------------------------------------------------------------------------------------


def study_variants(patch_sizes: Sequence[int], prefix: str) -> dict[str, list[str]]:
    """The patch-size study as experiment name -> ``-S`` settings: one ViT per patch size, then the CNN, each
    the architecture's defaults (no preset) with params.yaml's other model keys."""
    vits = {
        f"{prefix}-p{p}": ["++model.preset=null", "model.name=vit", f"model.patch_size={p}"]
        for p in patch_sizes
    }
    return vits | {f"{prefix}-cnn": ["++model.preset=null", "model.name=cnn"]}


def seed_variants(variants: dict[str, list[str]], seeds: Sequence[int]) -> dict[str, list[str]]:
    """Each variant once per training seed: NAME-sSEED with ``train.seed=SEED`` added to its settings.

    Only ``train.seed`` changes (initial weights, data order, augmentation, dropout); ``data.seed`` stays
    what params.yaml (or ``-S``) says, so every seed holds out the same validation images and the seeds'
    runs differ by training noise alone. ``group_of`` maps the names back to NAME.
    """
    return {
        f"{name}-s{s}": [*settings, f"train.seed={s}"] for name, settings in variants.items() for s in seeds
    }


def group_of(name: str, seed: int | None) -> str | None:
    """The configuration a run named by ``seed_variants`` belongs to: NAME for NAME-sSEED with its own seed
    (None for any other name: a run of its own)."""
    suffix = f"-s{seed}"
    return name.removesuffix(suffix) if seed is not None and name.endswith(suffix) else None


def run_study(
    variants: dict[str, list[str]], settings: Sequence[str] = (), force: bool = False, repo: str | Path = "."
) -> list[str]:
    """Run each variant as ``dvc exp run --temp -n NAME -S ...`` (plus ``settings`` for all), one by one.

    ``--temp`` runs each experiment in a temporary copy of the repository, so params.yaml and the workspace
    outputs stay as they were. Every variant's params are validated (``check_variants``) before the first
    runs. Returns the experiment names.
    """
    check_variants(variants, settings, repo)
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


def check_variants(
    variants: dict[str, list[str]], settings: Sequence[str] = (), repo: str | Path = "."
) -> None:
    """Validate each variant as its experiment would read params.yaml: ``repo``'s params.yaml with
    ``settings`` and the variant's own ``-S`` values applied by DVC's own code (``dvc exp run -S``'s), then
    ``vitlab.params``'s schema. Settings of other params files are DVC's alone and are not checked.

    Raises VitlabError naming the first variant refused and why, before any experiment has run.
    """
    from dvc.exceptions import DvcException
    from dvc.utils.cli_parse import to_path_overrides
    from dvc.utils.hydra import apply_overrides

    from vitlab.params import parse_params, read_yaml

    read_yaml(Path(repo) / "params.yaml")  # a missing file or a key given twice: said as load_params says it
    with tempfile.TemporaryDirectory(prefix="vitlab-variants-") as tmp:
        path = Path(tmp) / "params.yaml"
        for name, variant in variants.items():
            overrides = to_path_overrides([*settings, *variant]).get("params.yaml", [])
            origin = f"experiment {name} (" + " ".join(f"-S {o}" for o in overrides) + ")"
            shutil.copyfile(Path(repo) / "params.yaml", path)
            try:
                apply_overrides(path, overrides)
            except DvcException as error:  # an unknown key, a malformed value: hydra's reason is the cause
                raise VitlabError(f"{origin}: {one_line(error.__cause__ or error)}") from None
            parse_params(read_yaml(path), origin=origin)


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

    records, configs = [], {}
    for name in names:
        texts = [_read(path, name, repo) for path in (files.predictions, files.history, files.model)]
        params = dvc.api.params_show(repo=str(repo), rev=name)
        records.append(parse_record(name, *texts, params))
        configs[name] = {k: v for k, v in _flat(params).items() if k != "train.seed"}
    for members in seed_groups(records).values():
        first, *others = members
        for other in others:
            differ = sorted(
                k
                for k in configs[first.name].keys() | configs[other.name].keys()
                if configs[first.name].get(k) != configs[other.name].get(k)
            )
            if differ:
                raise VitlabError(
                    f"experiments {first.name!r} and {other.name!r} are named as seeds of one configuration "
                    f"but differ in {', '.join(differ)} besides train.seed"
                )
    return records


def _flat(params: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested params as dotted keys: {"train": {"seed": 0}} -> {"train.seed": 0}."""
    flat = {}
    for key, value in params.items():
        if isinstance(value, dict):
            flat |= _flat(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


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
    """A RunRecord from a run's files: predictions.csv, history.tsv, model.json and its params; its seed is
    params' ``train.seed``, its group ``group_of`` its name.

    Its label is what model.json says was built: the preset that architecture and config are, else the
    architecture. Never params' ``model.preset``, which a preset rule may have set aside
    (``-S model.name=cnn`` beside ``model.preset: tinyvit`` builds a CNN).
    """
    model = json.loads(model_json)
    arch, config = model["arch"], model["config"]
    seed = params.get("train", {}).get("seed")
    return RunRecord(
        name=name,
        model=preset_of(arch, config) or arch,
        arch=arch,
        patch_size=config.get("patch_size") if arch == "vit" else None,
        num_parameters=int(model["num_parameters"]),
        predictions=pd.read_csv(io.StringIO(predictions_csv)),
        history=pd.read_csv(io.StringIO(history_tsv), sep="\t"),
        seed=seed,
        group=group_of(name, seed),
    )
