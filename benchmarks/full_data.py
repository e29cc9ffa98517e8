"""The real benchmarks: the full CIFAR-10 (50,000 training / 10,000 test images) and MNIST (60,000 /
10,000) at fixed wall-clock budgets or epochs.

    python benchmarks/full_data.py                          # the budget runs at 10 and 30 minutes: 6.5 hours
    python benchmarks/full_data.py --epochs 8 --runs airbench --out benchmarks/results/sota_cifar10  # 22 min
    python benchmarks/full_data.py --budgets 600            # the 10-minute column and the study: 1.2 hours
    python benchmarks/full_data.py --screen                 # choose vit-best on a validation split: 11 min
    python benchmarks/full_data.py --dataset mnist --epochs 2 --runs cnn-small resnet tinyvit
    python benchmarks/full_data.py --budgets 2 --quick      # smoke run: 2 s budgets on 1,024 / 512 images

Each model is trained from the same seed for a wall-clock budget (or a number of epochs: ``--epochs``) on
all the training images (no validation split: the last weights are tested), on this machine's CPU cores,
then tested on all 10,000 test images. Training is ``vitlab.train.train`` with ``time_budget_s`` and the
budget recipes of ``vitlab.recipes`` (``train.recipe``: batch and peak learning rate per model, chosen on the
CIFAR-10 subset), with one change to time_to_accuracy.py's choice: no RandAugment for the ViTs, since a
10-minute budget is 7-10 epochs of the full data, where RandAugment cost tinyvit 3.3 points on the subset;
crop padding and flips are the recipe's where it sets them, else the dataset's (never flips for digits).

The runs:

- ``cnn-small``, ``resnet`` (ResNet-20) and ``tinyvit`` (ViT, patch 4), the presets;
- ``vit-p2`` and ``vit-p8``: tinyvit's shape on 2x2 and 8x8 patches, for the seeds' CNN-vs-ViT study (CNN
  and ViT patch 2/4/8 at an equal budget: ``cnn-small``, ``vit-p2``, ``tinyvit``, ``vit-p8``);
- ``vit-best``: the best ViT configuration vitlab has, chosen by ``--screen`` on a validation split (see
  ``SCREEN``);
- ``cct-2-3x2``: the small-data preset ``time_to_accuracy.py --select`` chose on the CIFAR-10 subset's
  validation split (docs/benchmarks.md, "Small data"), with tinyvit's recipe;
- ``resnet-plus`` and ``cct-plus``: ResNet-20 and CCT-2/3x2 with the ``-plus`` recipes (airbench's methods
  that apply to any network) and flip + translate TTA, CCT's tokenizer starting as a patch whitening;
- ``airbench``: airbench94_muon in vitlab (``train.recipe: airbench``, 8 epochs: run it with ``--epochs 8``,
  not in the default runs), to compare with the reference beside it (``benchmarks/reference_airbench.py``).

Each run is appended to ``--out``.json (default benchmarks/results/full_data_DATASET) as soon as it ends,
with its per-image predictions, so an interrupted benchmark loses at most the run in progress and a restart
skips the runs already there. From the file it writes ``--out``.md (accuracy with its 95% BCa bootstrap
interval, epochs, img/s) and, for every budget at which the CIFAR-10 study's four runs exist, ``vitlab
compare``'s table and plots in ``--study-dir``/study-BUDGET/ (paired differences to the CNN). Budgets are
wall-clock: run it on an otherwise idle machine, without ``VITLAB_BIT_IDENTICAL=1`` (its pins cost speed;
README, "Across CPUs").
"""

from __future__ import annotations

# ruff: noqa: E402 (prepare_process runs before torch loads: the imports below it load torch)
from vitlab.cpu import prepare_process

prepare_process()  # as every vitlab entry point: OpenMP's wait policy; the pins with VITLAB_BIT_IDENTICAL=1

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from time_to_accuracy import label, load_archive, saved_rows

from vitlab import files
from vitlab.checkpoint import Normalization
from vitlab.compare import RunRecord, write_comparison
from vitlab.data.prepared import PreparedDataset
from vitlab.data.sources import DATASETS, DatasetSpec
from vitlab.device import hardware_description
from vitlab.evaluate import evaluate
from vitlab.models import build_model, count_parameters, preset_config
from vitlab.params import TrainParams
from vitlab.recipes import RECIPES
from vitlab.stats import bootstrap_ci, paired_bootstrap_diff
from vitlab.train import split_train_val, train

REPO = Path(__file__).resolve().parents[1]
# Copies of the official files (../shared/data/README.md): accepted by their per-file md5s, no data.md5.
ARCHIVES = {
    "cifar10": REPO.parent / "shared/data/cifar-10-full-python.tar.gz",
    "mnist": REPO.parent / "shared/data/mnist-full.tar.gz",
}
# name -> (preset, keys changed beside it, the recipe it trains with: train.recipe, vitlab.recipes)
RUNS: dict[str, tuple[str, dict, str]] = {
    # airbench94_muon in vitlab (--epochs 8), to run beside ../shared/reference/airbench94_cpu.py on the same
    # machine (benchmarks/reference_airbench.py); tested with its test-time augmentation.
    "airbench": ("airbench", {}, "airbench"),
    "cnn-small": ("cnn-small", {}, "cnn-budget"),
    "resnet": ("resnet", {}, "resnet-budget"),
    "tinyvit": ("tinyvit", {}, "vit-budget"),
    # --screen's choice (benchmarks/results/full_data_cifar10_screen.json): 52.5% on the 5,000 validation
    # images after 150 s, against tinyvit's 44.0%, mean pooling's 42.3% and sin-cos positions' 48.4%.
    "vit-best": ("tinyvit", {"stem": "conv", "pool": "mean"}, "vit-budget"),
    "vit-p2": ("tinyvit", {"patch_size": 2}, "vit-budget"),
    "vit-p8": ("tinyvit", {"patch_size": 8}, "vit-budget"),
    "cct-2-3x2": ("cct-2-3x2", {}, "vit-budget"),
    # ResNet-20 and the best ViT with the methods of airbench that apply to them (the "-plus" recipes), the
    # ViT's conv tokenizer starting as a patch whitening (model.whiten_stem).
    "resnet-plus": ("resnet", {}, "resnet-budget-plus"),
    "cct-plus": ("cct-2-3x2", {"whiten_stem": True}, "vit-budget-plus"),
}
# The runs tested with test-time augmentation (evaluate.tta), as their recipe's source does.
TTA = {"airbench": "flip_translate", "resnet-plus": "flip_translate", "cct-plus": "flip_translate"}
STUDY = ("cnn-small", "vit-p2", "tinyvit", "vit-p8")
PAIRED_TO = ("cnn-small", "resnet")  # the .md's paired differences: every run against each of these
BUDGETS = (600, 1800)
# The ViT configurations --screen compares: each trained for SCREEN_BUDGET_S on 45,000 training images and
# scored on the other 5,000 (the test images are not read), at the same budget as the runs, since a slower
# model sees fewer images. Candidates: the options vitlab has for small data (docs/models.md).
SCREEN = {
    "tinyvit": {},
    "mean-pool": {"pool": "mean"},
    "conv-stem": {"stem": "conv", "pool": "mean"},
    "sincos": {"pos_embed": "sincos", "pool": "mean"},
}
SCREEN_BUDGET_S = 150


def recipe(name: str, spec: DatasetSpec, budget_s: float | None, epochs: int | None = None) -> TrainParams:
    """The train section of recipe ``name`` (vitlab.recipes) on the CPU for ``budget_s`` seconds or ``epochs``
    epochs, warming up over the recipe's share of either; the crop padding and flips are the recipe's where it
    sets them, else ``spec``'s (a dataset without flips, MNIST's digits, keeps its own)."""
    dataset = {"crop_padding": spec.crop_padding, "flip": spec.flip}
    recipe_keys = RECIPES[name].train if spec.flip else {}  # digits are never flipped, whatever the recipe
    return TrainParams(
        **{key: value for key, value in dataset.items() if key not in recipe_keys},
        recipe=name,
        epochs=epochs,
        time_budget_s=budget_s,
        device="cpu",
    )


def run(
    name: str,
    spec: DatasetSpec,
    budget_s: float | None,
    epochs: int | None,
    data: PreparedDataset,
    norm: Normalization,
) -> dict:
    """Train run ``name`` on ``data`` for ``budget_s`` seconds or ``epochs`` epochs and test it: its row of
    the results file."""
    preset, changes, recipe_name = RUNS[name]
    image_size, channels = data.train.geometry
    arch, config = preset_config(preset, **changes, image_size=image_size, in_channels=channels)
    torch.manual_seed(0)
    model = build_model(arch, config | {"num_classes": data.num_classes})
    params = recipe(recipe_name, spec, budget_s, epochs)
    load_before = os.getloadavg()[0]
    result = train(model, data.train, None, norm, params)
    images = sum(row["images"] for row in result.history)
    start = time.perf_counter()
    tta = TTA.get(name, "none") if spec.flip else "none"  # its views are mirrored: not for digits
    scores = evaluate(model, data.test, norm, data.num_classes, tta=tta)
    eval_s = time.perf_counter() - start
    correct = (scores.predictions == data.test.labels).astype(float)
    accuracy = bootstrap_ci(correct)
    return {
        "run": name,
        "preset": preset,
        "changes": changes,
        "arch": arch,
        "patch_size": config.get("patch_size") if arch == "vit" else None,
        "parameters": count_parameters(model),
        "budget_s": budget_s,
        "max_epochs": epochs,
        "train_s": round(result.wall_time_s, 1),
        "tta": tta,
        # With train_s, the reference's clock: training and the final test pass, with its TTA (its clock also
        # counts its whitening init, which here runs before training's clock starts: under a second).
        "eval_s": round(eval_s, 1),
        "epochs": round(images / len(data.train), 2),
        "images_per_s": round(images / result.wall_time_s, 1),
        "load_before": round(load_before, 2),  # 1-minute load average as the run started: ~0 when idle
        "test_accuracy": round(accuracy.estimate, 4),
        "test_accuracy_low": round(accuracy.low, 4),
        "test_accuracy_high": round(accuracy.high, 4),
        "test_loss": round(scores.loss, 4),
        "train_params": params.model_dump(),
        # Per-image results, so that the paired study table can be made again without the models.
        "predicted": "".join(map(str, scores.predictions.tolist())),
        "losses": [round(float(x), 5) for x in scores.losses],
    }


def screen(data: PreparedDataset, spec: DatasetSpec, budget_s: float, out: Path) -> dict[str, float]:
    """Validation accuracy of each SCREEN configuration of tinyvit after ``budget_s`` seconds of training;
    written to ``out`` (JSON) as each one ends."""
    train_split, val_split = split_train_val(data.train, 0.1, seed=0)
    norm = Normalization.from_images(train_split.images)
    scores = json.loads(out.read_text()) if out.exists() else {}
    for name, changes in SCREEN.items():
        if name in scores:
            continue
        arch, config = preset_config("tinyvit", **changes)
        torch.manual_seed(0)
        model = build_model(arch, config | {"num_classes": data.num_classes})
        params = recipe("vit-budget", spec, budget_s)
        history = train(model, train_split, None, norm, params).history
        accuracy = evaluate(model, val_split, norm, data.num_classes).accuracy
        epochs = sum(row["images"] for row in history) / len(train_split)
        scores[name] = {"changes": changes, "val_accuracy": round(accuracy, 4), "epochs": round(epochs, 2)}
        scores[name] |= {"budget_s": budget_s, "hardware": hardware_description("cpu")}
        print(name, scores[name], file=sys.stderr, flush=True)
        files.write_json(out, scores)
    return scores


def record(row: dict, labels: np.ndarray, class_names: list[str]) -> RunRecord:
    """``vitlab compare``'s view of a results row (its per-image predictions; no validation history)."""
    predicted = np.array([int(c) for c in row["predicted"]])
    frame = pd.DataFrame(
        {
            "index": np.arange(len(labels)),
            "label": [class_names[i] for i in labels],
            "predicted": [class_names[i] for i in predicted],
            "confidence": np.nan,
            "correct": (predicted == labels).astype(int),
            "loss": row["losses"],
        }
    )
    epochs = pd.DataFrame({"epoch": range(1, int(np.ceil(row["epochs"])) + 1)})
    name, preset = row["run"], row["preset"]
    return RunRecord(name, preset, row["arch"], row["patch_size"], row["parameters"], frame, epochs)


def limit(row: dict) -> tuple[float | None, int | None]:
    """What ended a run: (budget_s, None) or (None, max_epochs)."""
    return row["budget_s"], row["max_epochs"]


def limit_label(budget_s: float | None, epochs: int | None) -> str:
    return label(budget_s) if budget_s is not None else f"{epochs} epochs"


def markdown(rows: list[dict], settings: dict, labels: np.ndarray) -> str:
    """The results table: one line per run, one column group per budget (or number of epochs); then, per
    budget, each run's paired difference in test accuracy to the PAIRED_TO runs of that budget (``labels``:
    the test labels, (N,) int, in the order of the rows' predictions)."""
    limits = sorted({limit(r) for r in rows}, key=lambda x: (x[0] is None, x[0] or 0, x[1] or 0))
    by_key = {(r["run"], limit(r)): r for r in rows}
    head = " | ".join(f"{limit_label(*x)}: test accuracy (95% CI) | epochs | img/s" for x in limits)
    lines = [
        f"{settings['dataset']}: trained on {settings['train_images']:,} images, tested on "
        f"{settings['test_images']:,}; {settings['hardware']}, torch {settings['torch']}. Intervals: BCa "
        "bootstrap over the test images.",
        "",
        f"| run | parameters | {head} |",
        "| --- | ---: |" + " ---: | ---: | ---: |" * len(limits),
    ]
    for name in RUNS:
        cells = []
        for key in limits:
            row = by_key.get((name, key))
            if row is None:
                cells += ["", "", ""]
                continue
            low, high = row["test_accuracy_low"], row["test_accuracy_high"]
            cells += [f"{row['test_accuracy']:.1%} [{low:.1%}, {high:.1%}]", f"{row['epochs']:.1f}"]
            cells.append(f"{row['images_per_s']:,.0f}")
        parameters = next((r["parameters"] for r in rows if r["run"] == name), None)
        if parameters is not None:
            lines.append(f"| {name} | {parameters:,} | " + " | ".join(cells) + " |")
    return "\n".join(lines + paired_differences(rows, labels)) + "\n"


def paired_differences(rows: list[dict], labels: np.ndarray) -> list[str]:
    """Markdown lines: for each limit with a PAIRED_TO run, every other run's test accuracy minus it, in
    points, with its paired 95% BCa bootstrap interval over the test images (``vitlab.stats``)."""
    lines = []
    for key in sorted({limit(r) for r in rows}, key=lambda x: (x[0] is None, x[0] or 0, x[1] or 0)):
        at = {r["run"]: np.array(list(r["predicted"]), dtype=int) == labels for r in rows if limit(r) == key}
        bases = [base for base in PAIRED_TO if base in at]
        if not bases or len(at) < 2:
            continue
        lines += [
            "",
            f"{limit_label(*key)}, paired differences in test accuracy (points, 95% BCa bootstrap interval "
            "over the same test images):",
            "",
            "| run | " + " | ".join(f"− {base}" for base in bases) + " |",
            "| --- |" + " ---: |" * len(bases),
        ]
        for name in (name for name in RUNS if name in at):
            cells = []
            for base in bases:
                if base == name:
                    cells.append("")
                    continue
                diff = paired_bootstrap_diff(at[name].astype(float), at[base].astype(float))
                cells.append(f"{100 * diff.estimate:+.1f} [{100 * diff.low:+.1f}, {100 * diff.high:+.1f}]")
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", choices=ARCHIVES, default="cifar10")
    parser.add_argument("--budgets", nargs="+", type=float, default=list(BUDGETS), help="seconds")
    parser.add_argument("--epochs", type=int, help="train so many epochs instead of for --budgets")
    default_runs = [name for name in RUNS if name != "airbench"]  # an epoch recipe: --epochs 8
    parser.add_argument("--runs", nargs="+", choices=RUNS, default=default_runs)
    parser.add_argument("--data", type=Path, help="the archive (default: ../shared/data's full copy)")
    parser.add_argument("--md5", help="the archive's md5, for a copy whose files are not the official ones")
    parser.add_argument("--out", type=Path, help="default: benchmarks/results/full_data_DATASET")
    parser.add_argument("--study-dir", type=Path, default=REPO / "reports/full_data")
    parser.add_argument("--screen", action="store_true", help="compare the SCREEN ViTs on a validation split")
    parser.add_argument("--quick", action="store_true", help="1,024 train / 512 test images (smoke run)")
    args = parser.parse_args(argv)
    archive = args.data or ARCHIVES[args.dataset]
    out = args.out or REPO / f"benchmarks/results/full_data_{args.dataset}"
    if not archive.exists():
        sys.exit(f"error: {archive} not found (see ../shared/data/README.md)")
    spec = DATASETS[args.dataset]
    data = load_archive(archive, args.md5, args.quick, args.dataset)
    if args.screen:
        budget = SCREEN_BUDGET_S if not args.quick else 2
        print(json.dumps(screen(data, spec, budget, out.with_name(out.name + "_screen.json")), indent=1))
        return 0
    settings = {
        "dataset": spec.name,
        "train_images": len(data.train),
        "test_images": len(data.test),
        "hardware": hardware_description("cpu"),
        "torch": torch.__version__,
    }
    rows = saved_rows(out.with_suffix(".json"), settings)
    norm = Normalization.from_images(data.train.images)  # once: a float64 pass over all training images
    limits = [(None, args.epochs)] if args.epochs else [(budget, None) for budget in args.budgets]
    for key in limits:
        for name in args.runs:
            if any(r["run"] == name and limit(r) == key for r in rows):
                continue
            print(f"{name}, {limit_label(*key)} ...", file=sys.stderr, flush=True)
            start = time.perf_counter()
            rows.append(run(name, spec, *key, data, norm))
            brief = {k: v for k, v in rows[-1].items() if k not in ("predicted", "losses", "train_params")}
            print(f"{json.dumps(brief)} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
            files.write_json(out.with_suffix(".json"), {"settings": settings, "rows": rows})
            files.write_text(out.with_suffix(".md"), markdown(rows, settings, data.test.labels))
    for key in sorted({limit(r) for r in rows if r["budget_s"] is not None}):
        study = [r for r in rows if limit(r) == key and r["run"] in STUDY]
        if len(study) == len(STUDY):
            records = [record(r, data.test.labels, data.class_names) for r in study]
            name = f"study-{limit_label(*key).replace(' ', '')}"
            write_comparison(records, args.study_dir / name, "cnn-small")
    table = markdown(rows, settings, data.test.labels)
    files.write_text(out.with_suffix(".md"), table)  # also when nothing new ran
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
