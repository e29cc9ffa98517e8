"""Time to accuracy on a real CIFAR subset: vitlab's training recipe against the seed notebooks' recipe,
over training seeds; and a validation mode that chooses recipes without reading the test set.

    python benchmarks/time_to_accuracy.py                        # the whole grid: about 85 minutes on 2 cores
    python benchmarks/time_to_accuracy.py --budgets 60 --seeds 0 1 2 --recipes vitlab    # training noise
    python benchmarks/time_to_accuracy.py --select --dataset cifar100 --models resnet vit-c100 --budgets 60
    python benchmarks/time_to_accuracy.py --budgets 5 --quick    # smoke run: 5 s budgets on 1,024 images

For each model (by default cnn-small, the strong CNN "resnet", tinyvit; ``--models`` takes any preset),
wall-clock budget (1, 3 and 10 minutes) and training seed (``--seeds``; 0 by default), the same architecture
from the same initial weights (those of the seed) is trained on the training images of the subset
(``--dataset``: ``../shared/data/cifar-10-subset-python.tar.gz``, 5,482 train / 1,017 test images, or the
CIFAR-100 one, 1,117 / 916) until the budget is spent, then tested on its test images:

- vitlab: ``vitlab.train.train`` with ``time_budget_s`` and a named recipe of ``vitlab.recipes``
  (``train.recipe`` in params.yaml): data in memory, batched crop and flip, AdamW, warmup and a cosine decay
  that ends with the budget, label smoothing, RandAugment for the ViTs from 10 minutes on (see
  ``RECIPE_OF``; a preset without an entry takes its architecture's, ``ARCH_RECIPES``); ``--set KEY=VALUE``
  changes a train key of it (a recipe to try);
- seeds: what the educational ViT repositories this project started from do (the "seed" repositories; not
  to be confused with ``--seeds``, the training seeds): a per-image PIL pipeline (RandomCrop(32, 4),
  RandomHorizontalFlip, ToTensor, Normalize) in a DataLoader with 2 workers, batch 64, Adam at a constant
  1e-3, plain cross-entropy.

``--select`` is for choosing recipes: it holds out a seeded random share of the training images
(``data.val_fraction`` and ``data.seed``'s defaults, as the pipeline does), trains on the rest and reports
accuracy on the held-out images only; the test images are never evaluated. The normal mode then reads the
test set once per reported figure.

Budgets are wall-clock, so figures depend on the machine and its load: run it on an otherwise idle machine.
Each (model, recipe, budget, seed) row is appended to ``--out``.json as soon as it is measured, with its
per-image correctness, and a Markdown table is rewritten beside it (``--out``.md); a run that is stopped and
started again skips the rows already there. The table gives each (model, recipe, budget) its mean accuracy
over seeds ± their standard deviation and, for rows with per-image results, the per-seed figures, the
bootstrap interval and the paired difference to resnet (``vitlab.stats.over_seeds`` defines each).
"""

from __future__ import annotations

# ruff: noqa: E402 (prepare_process runs before torch loads: the imports below it load torch)
from vitlab.cpu import prepare_process

prepare_process()  # as every vitlab entry point: OpenMP's wait policy; the pins with VITLAB_BIT_IDENTICAL=1

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from bench_data import PilImages
from torch import nn
from torch.utils.data import DataLoader

from vitlab import files
from vitlab.checkpoint import Normalization
from vitlab.compare import accuracy_cell, difference_cell, per_seed_cell
from vitlab.data.archive import prepare_dataset
from vitlab.data.prepared import PreparedDataset, Split
from vitlab.data.sources import DATASETS
from vitlab.device import hardware_description
from vitlab.errors import one_line
from vitlab.evaluate import evaluate
from vitlab.models import PRESETS, build_model, count_parameters, preset_config
from vitlab.params import DataParams, TrainParams
from vitlab.stats import over_seeds
from vitlab.train import split_train_val, train

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared/data"
# --dataset -> (archive, its md5 from ../shared/data/README.md, name in the tables)
SUBSETS = {
    "cifar10": (SHARED / "cifar-10-subset-python.tar.gz", "91ae8aa50275d155e103205bccbd1642", "CIFAR-10"),
    "cifar100": (SHARED / "cifar-100-subset-python.tar.gz", "6915434a66f48efbf1b9174138f9965c", "CIFAR-100"),
}
MODELS = ("cnn-small", "resnet", "tinyvit")
RECIPES = ("vitlab", "seeds")
BASELINE = (
    "resnet"  # the detail table's paired differences are to resnet's runs of the same recipe and budget
)
# The recipe (vitlab.recipes, where each is described and the choices are explained) each model trains with.
RECIPE_OF = {"cnn-small": "cnn-budget", "resnet": "resnet-budget", "tinyvit": "vit-budget"}
# A preset without a RECIPE_OF entry trains with its architecture's (until --select has chosen one for it).
ARCH_RECIPES = {"vit": "vit-budget", "cnn": "cnn-budget", "resnet": "resnet-budget", "mlp": "cnn-budget"}
LONG_BUDGET_S = 600
LONG_RECIPES = {"vit-budget": "vit-budget-randaugment"}  # from LONG_BUDGET_S on
SEED_BATCH, SEED_LR = 64, 1e-3


def load_archive(archive: Path, md5: str | None, quick: bool, dataset: str = "cifar10") -> PreparedDataset:
    """A copy of ``dataset`` (the CIFAR-10 subset by default) through vitlab's verified extraction and
    parsing (``md5``: the archive's, needed unless its files are the official ones); 1,024 / 512 images if
    quick."""
    with tempfile.TemporaryDirectory(prefix="vitlab-tta-") as work:
        data = prepare_dataset(
            DATASETS[dataset], str(archive), md5, Path(work, "raw"), Path(work, "prepared"), progress=False
        )
    if not quick:
        return data
    return replace(
        data,
        train=Split(data.train.images[:1024], data.train.labels[:1024]),
        test=Split(data.test.images[:512], data.test.labels[:512]),
    )


@dataclass(frozen=True)
class Task:
    """What every run trains on and is scored on: ``scored`` is the test split, or with --select the
    validation images held out of the training split (``split`` "val"; the test split is not passed on)."""

    train: Split
    scored: Split
    split: str  # "test" | "val": the row's accuracy is f"{split}_accuracy"
    num_classes: int
    norm: Normalization  # of the training images the runs train on


def recipe_of(name: str, budget_s: float = 0.0) -> str:
    """The recipe preset ``name`` trains with for ``budget_s`` seconds: its own, else its architecture's
    (ARCH_RECIPES), the LONG_RECIPES one from LONG_BUDGET_S on."""
    recipe = RECIPE_OF.get(name) or ARCH_RECIPES[PRESETS[name].arch]
    return LONG_RECIPES.get(recipe, recipe) if budget_s >= LONG_BUDGET_S else recipe


def our_recipe(name: str, model: nn.Module, task: Task, budget_s: float, seed: int, changes: dict) -> float:
    """vitlab.train for ``budget_s`` seconds from ``seed`` with ``recipe_of(name)`` and ``changes``
    (train keys) on top; returns the epochs done (the last one may be partial)."""
    train_params = TrainParams(
        recipe=recipe_of(name, budget_s), time_budget_s=budget_s, device="cpu", seed=seed, **changes
    )
    history = train(model, task.train, None, task.norm, train_params).history
    return sum(row["images"] for row in history) / len(task.train)


def seeds_recipe(name: str, model: nn.Module, task: Task, budget_s: float, seed: int, changes: dict) -> float:
    """The seed notebooks' loop (the same for every model; ``changes`` must be empty), stopped when
    ``budget_s`` seconds have passed; its shuffling draws from torch's generator, which ``run_row`` seeds.
    Returns the epochs done."""
    loader = DataLoader(
        PilImages(task.train.images, task.train.labels, task.norm, []),
        batch_size=SEED_BATCH,
        shuffle=True,
        num_workers=2,
    )
    optimizer = torch.optim.Adam(model.parameters(), lr=SEED_LR)
    model.train()
    start, images = time.perf_counter(), 0
    while time.perf_counter() - start < budget_s:
        for x, y in loader:
            if time.perf_counter() - start >= budget_s:
                break
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            images += len(y)
    return images / len(task.train)


def run_row(name: str, recipe: str, budget_s: float, seed: int, changes: dict, task: Task) -> dict:
    """Train preset ``name`` with ``recipe`` for ``budget_s`` seconds from training seed ``seed`` and score
    it on ``task.scored``: its row of the results file, with each scored image's correctness ("0"/"1")."""
    torch.manual_seed(seed)  # both recipes start from the same weights
    arch, config = preset_config(name)
    model = build_model(arch, config | {"num_classes": task.num_classes})
    fit = our_recipe if recipe == "vitlab" else seeds_recipe
    start = time.perf_counter()
    epochs = fit(name, model, task, budget_s, seed, changes)
    train_s = time.perf_counter() - start
    scores = evaluate(model, task.scored, task.norm, task.num_classes)
    correct = scores.predictions == task.scored.labels
    return {
        "model": name,
        "recipe": recipe,
        **({"changes": changes} if changes else {}),
        "budget_s": budget_s,
        "seed": seed,
        f"{task.split}_accuracy": round(float(correct.mean()), 4),
        "epochs": round(epochs, 2),
        "train_s": round(train_s, 1),
        "parameters": count_parameters(model),
        "correct": "".join("1" if c else "0" for c in correct),
    }


def label(budget_s: float) -> str:
    return f"{budget_s / 60:g} min" if budget_s >= 60 else f"{budget_s:g} s"


def recipe_label(row: dict) -> str:
    """The recipe as the tables name it: ``vitlab``, ``seeds``, or ``vitlab batch_size=32`` with changes."""
    changes = row.get("changes", {})
    return " ".join([row["recipe"], *(f"{key}={value}" for key, value in sorted(changes.items()))])


def cell_key(row: dict) -> tuple[str, str, float]:
    """The (model, recipe label, budget) a row is one seed of."""
    return row["model"], recipe_label(row), row["budget_s"]


def run_key(row: dict) -> tuple[str, str, float, int]:
    """A row's identity: its cell and seed (the rows written before --seeds are seed 0's)."""
    return (*cell_key(row), row.get("seed", 0))


def markdown(rows: list[dict], settings: dict) -> str:
    """The grid (mean accuracy over seeds ± sd, epochs), then the detail table of the cells whose rows hold
    per-image results: mean ± sd, per seed, bootstrap interval and the paired difference to resnet."""
    split = "val" if "val_images" in settings else "test"
    metric = f"{split}_accuracy"
    cells: dict[tuple, list[dict]] = {}
    for row in rows:
        cells.setdefault(cell_key(row), []).append(row)
    for members in cells.values():
        members.sort(key=lambda r: r.get("seed", 0))
    several = any(len(members) > 1 for members in cells.values())
    budgets = sorted({row["budget_s"] for row in rows})
    dataset = SUBSETS[settings.get("dataset", "cifar10")][2]  # no "dataset": written before --dataset
    if split == "test":
        scored = f"Test accuracy on {settings['test_images']:,} {dataset} test images after training on"
    else:
        scored = (
            f"Validation accuracy on {settings['val_images']:,} {dataset} training images held out at random "
            f"({settings['val_fraction']:.0%}, split seed {settings['split_seed']}; the test images were not "
            "read) after training on the other"
        )
    lines = [
        f"{scored} {settings['train_images']:,} for a wall-clock budget (epochs done in brackets"
        f"{'; mean ± standard deviation over training seeds, ddof=1' if several else ''}); "
        f"{settings['hardware']}, torch {settings['torch']}.",  # hardware names the threads
        "",
        "| model | recipe | " + " | ".join(label(b) for b in budgets) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in budgets) + " |",
    ]
    for name in dict.fromkeys(r["model"] for r in rows):
        ran = {recipe_label(r) for r in rows if r["model"] == name}
        for recipe in [*(r for r in RECIPES if r in ran), *sorted(ran - set(RECIPES))]:
            line = []
            for budget in budgets:
                members = cells.get((name, recipe, budget))
                if not members:
                    line.append("")
                    continue
                accuracies = [r[metric] for r in members]
                sd = f" ± {100 * np.std(accuracies, ddof=1):.1f}" if len(members) > 1 else ""
                epochs = np.mean([r["epochs"] for r in members])
                line.append(f"{np.mean(accuracies):.1%}{sd} ({epochs:.1f})")
            lines.append(f"| {name} | {recipe} | " + " | ".join(line) + " |")
    detailed = {key: members for key, members in cells.items() if all("correct" in r for r in members)}
    if detailed:
        lines += ["", *detail_table(detailed, split)]
    return "\n".join(lines) + "\n"


def detail_table(cells: dict[tuple, list[dict]], split: str) -> list[str]:
    """Markdown lines: each cell's accuracy over seeds with its interval, and its paired difference to the
    BASELINE's cell of the same recipe (without changes) and budget (``vitlab.stats.over_seeds``)."""

    def correct(members: list[dict]) -> dict[int, np.ndarray]:
        return {r.get("seed", 0): np.frombuffer(r["correct"].encode(), np.uint8) - ord("0") for r in members}

    images = "validation" if split == "val" else "test"
    lines = [
        f"| model | recipe | budget | seeds | {images} accuracy, mean ± sd [95% CI] | per seed "
        f"| vs {BASELINE}: Δ accuracy, mean ± sd [95% CI] | per seed |",
        "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |",
    ]
    order = {name: i for i, name in enumerate(dict.fromkeys(key[0] for key in cells))}
    for key in sorted(cells, key=lambda k: (k[2], order[k[0]], k[1])):
        name, recipe, budget = key
        base_key = (BASELINE, cells[key][0]["recipe"], budget)  # the recipe without changes
        baseline = cells.get(base_key)
        paired = correct(baseline) if baseline and key != base_key else None
        stats = over_seeds(correct(cells[key]), paired)
        several = len(cells[key]) > 1
        spread = stats.accuracy_over_seeds if several else None
        diff_spread = stats.vs_baseline_over_seeds if several else None
        if stats.vs_baseline is not None:
            delta = difference_cell(stats.vs_baseline, diff_spread)
        else:
            delta = "baseline" if key == base_key else "–"
        seeds = ", ".join(str(s) for s in stats.accuracy_over_seeds.seeds)
        lines.append(
            f"| {name} | {recipe} | {label(budget)} | {seeds} | {accuracy_cell(stats.accuracy, spread)} "
            f"| {per_seed_cell(stats.accuracy_over_seeds)} | {delta} | {per_seed_cell(diff_spread, '+')} |"
        )
    lines += [
        "",
        f"Mean ± sd: over the training seeds (sample standard deviation, ddof=1): training noise. Intervals: "
        f"95% BCa bootstrap over the {images} images of each image's correctness averaged over the seeds: "
        f"{images}-set sampling, the seeds' models held fixed. Δ: that seed average minus {BASELINE}'s (same "
        "recipe and budget), bootstrapped in pairs (the same images for both), ± the sd of the per-seed "
        f"differences (each seed against {BASELINE}'s run of the same seed, when both ran the same seeds).",
    ]
    return lines


def saved_rows(results: Path, settings: dict) -> list[dict]:
    """The rows already in ``results`` (JSON), to be extended; none if it does not exist. Exits with an error
    when they were measured with other ``settings`` (data, hardware, torch), which would mix two machines."""
    saved = json.loads(results.read_text()) if results.exists() else {"settings": settings, "rows": []}
    if saved["settings"] != settings:
        sys.exit(f"error: {results} holds rows measured with {saved['settings']}; use another --out")
    return saved["rows"]


def parse_changes(pairs: list[str]) -> dict:
    """``--set KEY=VALUE`` pairs as train keys, each value converted and checked by TrainParams (32, 5e-4,
    randaugment); exits with the problem otherwise."""
    changes = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or key not in TrainParams.model_fields:
            sys.exit(f"error: --set {pair}: expected KEY=VALUE with KEY a train key")
        changes[key] = value
    try:
        params = TrainParams(recipe="vit-budget", time_budget_s=1.0, **changes)
    except ValueError as error:
        sys.exit(f"error: --set: {one_line(error)}")
    return {key: getattr(params, key) for key in changes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", type=float, default=[60, 180, 600], help="seconds")
    parser.add_argument("--models", nargs="+", choices=PRESETS, default=list(MODELS), metavar="PRESET")
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="training seeds (train.seed)")
    parser.add_argument("--set", nargs="+", default=[], metavar="KEY=VALUE", help="change vitlab's recipe")
    parser.add_argument("--dataset", choices=SUBSETS, default="cifar10", help="which subset")
    parser.add_argument("--data", type=Path, help="the subset's archive (default: ../shared/data's)")
    parser.add_argument("--md5", help="the archive's md5 (default: the subset's)")
    parser.add_argument("--select", action="store_true", help="score on validation images, not the test set")
    parser.add_argument(
        "--out", type=Path, help="default: benchmarks/results/time_to_accuracy[_DATASET][_select]"
    )
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1,024 train / 512 test images (smoke run)")
    args = parser.parse_args(argv)
    changes = parse_changes(args.set)
    if changes and "seeds" in args.recipes:
        sys.exit("error: --set changes vitlab's recipe: add --recipes vitlab")
    torch.set_num_threads(args.threads)
    archive, md5, _ = SUBSETS[args.dataset]
    data = load_archive(args.data or archive, args.md5 or md5, args.quick, args.dataset)
    settings = {} if args.dataset == "cifar10" else {"dataset": args.dataset}
    if args.select:
        held_out = DataParams()  # the pipeline's hold-out: data.val_fraction, data.seed
        train_split, scored = split_train_val(data.train, held_out.val_fraction, held_out.seed)
        split = "val"
        settings |= {"val_fraction": held_out.val_fraction, "split_seed": held_out.seed}
    else:
        train_split, scored, split = data.train, data.test, "test"
    norm = Normalization.from_images(train_split.images)
    task = Task(train_split, scored, split, data.num_classes, norm)
    settings |= {
        "train_images": len(train_split),
        f"{split}_images": len(scored),
        "threads": args.threads,
        "hardware": hardware_description("cpu"),
        "torch": torch.__version__,
    }
    suffix = ("" if args.dataset == "cifar10" else f"_{args.dataset}") + ("_select" if args.select else "")
    out = args.out or REPO / f"benchmarks/results/time_to_accuracy{suffix}"
    results = out.with_suffix(".json")
    rows = saved_rows(results, settings)
    done = {run_key(r) for r in rows}
    for budget in args.budgets:
        for name in args.models:
            for recipe in args.recipes:
                for seed in args.seeds:
                    row = {
                        "model": name,
                        "recipe": recipe,
                        "changes": changes,
                        "budget_s": budget,
                        "seed": seed,
                    }
                    if run_key(row) in done:
                        continue
                    borrowed = (
                        f" ({recipe_of(name, budget)})"
                        if recipe == "vitlab" and name not in RECIPE_OF
                        else ""
                    )
                    what = f"{name}, {recipe_label(row)}{borrowed}, {label(budget)}, seed {seed}"
                    print(f"{what} ...", file=sys.stderr, flush=True)
                    rows.append(run_row(name, recipe, budget, seed, changes, task))
                    brief = {k: v for k, v in rows[-1].items() if k != "correct"}
                    print(json.dumps(brief), file=sys.stderr, flush=True)
                    files.write_json(results, {"settings": settings, "rows": rows})
                    files.write_text(out.with_suffix(".md"), markdown(rows, settings))
    table = markdown(rows, settings)
    files.write_text(out.with_suffix(".md"), table)  # also when nothing new ran
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
