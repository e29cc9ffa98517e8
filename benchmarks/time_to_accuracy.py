"""Time to accuracy on the real CIFAR-10 subset: vitlab's training recipe against the seed notebooks' recipe.

    python benchmarks/time_to_accuracy.py                        # the whole grid: about 85 minutes on 2 cores
    python benchmarks/time_to_accuracy.py --budgets 5 --quick    # smoke run: 5 s budgets on 1,024 images

For each model (cnn-small, the strong CNN "resnet", tinyvit) and wall-clock budget (1, 3 and 10 minutes), the
same architecture from the same initial weights is trained on the 5,482 training images of
``../shared/data/cifar-10-subset-python.tar.gz`` until the budget is spent, then tested on its 1,017 test
images:

- vitlab: ``vitlab.train.train`` with ``time_budget_s``: data in memory, batched crop and flip, AdamW, warmup
  and a cosine decay that ends with the budget, label smoothing, RandAugment for tinyvit from 10 minutes on
  (see ``OURS``);
- seeds: what the educational ViT repositories this project started from do: a per-image PIL pipeline
  (RandomCrop(32, 4), RandomHorizontalFlip, ToTensor, Normalize) in a DataLoader with 2 workers, batch 64,
  Adam at a constant 1e-3, plain cross-entropy.

Budgets are wall-clock, so figures depend on the machine and its load: run it on an otherwise idle machine.
Each (model, recipe, budget) row is appended to ``--out``.json as soon as it is measured, and a Markdown table
is rewritten beside it (``--out``.md); a run that is stopped and started again skips the rows already there.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F
from bench_data import PilImages
from torch import nn
from torch.utils.data import DataLoader

from vitlab import files
from vitlab.checkpoint import Normalization
from vitlab.data.archive import prepare_dataset
from vitlab.data.prepared import PreparedDataset, Split
from vitlab.data.sources import DATASETS
from vitlab.device import hardware_description
from vitlab.evaluate import evaluate
from vitlab.models import build_model, count_parameters, preset_config
from vitlab.params import TrainParams
from vitlab.train import train

REPO = Path(__file__).resolve().parents[1]
SUBSET = REPO.parent / "shared/data/cifar-10-subset-python.tar.gz"
SUBSET_MD5 = "91ae8aa50275d155e103205bccbd1642"  # /work/shared/data/README.md
MODELS = ("cnn-small", "resnet", "tinyvit")
RECIPES = ("vitlab", "seeds")
EPOCH_CAP = 100_000  # the budget ends every run long before; warmup_epochs / EPOCH_CAP: the warmup's share
# Our recipe: AdamW (weight decay 0.05), warmup over the first 5% of the budget then a cosine decay that ends
# with it, label smoothing 0.1, crop and flip; batch and peak learning rate per model, and RandAugment for the
# ViT once the budget is long. Chosen by training a fixed number of epochs on this subset (comparisons that
# machine load cannot skew): batches of 32-64 beat 128 at these short horizons. Over 86 epochs (tinyvit's 10
# minutes) RandAugment took tinyvit from 57.5% to 61.7% (MixUp/CutMix: 59.4%): a ViT, without a CNN's built-in
# locality, needs stronger augmentation once it has seen the images many times; within 1 minute (8 epochs)
# it cost 3.3 points (39.6% against 42.9%).
OURS = {
    "cnn-small": {"batch_size": 64, "learning_rate": 3e-3},
    "resnet": {"batch_size": 64, "learning_rate": 2e-3},
    "tinyvit": {"batch_size": 32, "learning_rate": 1e-3},
}
LONG_BUDGET_S = 600
OURS_LONG = {"tinyvit": {"augment": "randaugment"}}  # from LONG_BUDGET_S on
COMMON = {"warmup_epochs": 0.05 * EPOCH_CAP, "label_smoothing": 0.1, "crop_padding": 4}
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


def our_recipe(
    name: str, model: nn.Module, data: PreparedDataset, norm: Normalization, budget_s: float
) -> float:
    """vitlab.train for ``budget_s`` seconds; returns the epochs done (the last one may be partial)."""
    options = OURS[name] | COMMON | (OURS_LONG.get(name, {}) if budget_s >= LONG_BUDGET_S else {})
    train_params = TrainParams(epochs=EPOCH_CAP, time_budget_s=budget_s, device="cpu", **options)
    history = train(model, data.train, None, norm, train_params).history
    return sum(row["images"] for row in history) / len(data.train)


def seeds_recipe(
    name: str, model: nn.Module, data: PreparedDataset, norm: Normalization, budget_s: float
) -> float:
    """The seed notebooks' loop (the same for every model), stopped when ``budget_s`` seconds have passed;
    returns the epochs done."""
    loader = DataLoader(
        PilImages(data.train.images, data.train.labels, norm, []),
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
    return images / len(data.train)


def run_row(name: str, recipe: str, budget_s: float, data: PreparedDataset, norm: Normalization) -> dict:
    torch.manual_seed(0)  # both recipes start from the same weights
    arch, config = preset_config(name)
    model = build_model(arch, config | {"num_classes": data.num_classes})
    fit = our_recipe if recipe == "vitlab" else seeds_recipe
    start = time.perf_counter()
    epochs = fit(name, model, data, norm, budget_s)
    train_s = time.perf_counter() - start
    accuracy = evaluate(model, data.test, norm, data.num_classes).accuracy
    return {
        "model": name,
        "recipe": recipe,
        "budget_s": budget_s,
        "test_accuracy": round(accuracy, 4),
        "epochs": round(epochs, 2),
        "train_s": round(train_s, 1),
        "parameters": count_parameters(model),
    }


def label(budget_s: float) -> str:
    return f"{budget_s / 60:g} min" if budget_s >= 60 else f"{budget_s:g} s"


def markdown(rows: list[dict], settings: dict) -> str:
    budgets = sorted({row["budget_s"] for row in rows})
    by_key = {(r["model"], r["recipe"], r["budget_s"]): r for r in rows}
    lines = [
        f"Test accuracy on {settings['test_images']:,} CIFAR-10 test images after training on "
        f"{settings['train_images']:,} for a wall-clock budget (epochs done in brackets); "
        f"{settings['hardware']}, {settings['threads']} threads, torch {settings['torch']}.",
        "",
        "| model | recipe | " + " | ".join(label(b) for b in budgets) + " |",
        "| --- | --- | " + " | ".join("---:" for _ in budgets) + " |",
    ]
    for name in dict.fromkeys(r["model"] for r in rows):
        for recipe in RECIPES:
            cells = []
            for budget in budgets:
                row = by_key.get((name, recipe, budget))
                cells.append(f"{row['test_accuracy']:.1%} ({row['epochs']:.1f})" if row else "")
            lines.append(f"| {name} | {recipe} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def saved_rows(results: Path, settings: dict) -> list[dict]:
    """The rows already in ``results`` (JSON), to be extended; none if it does not exist. Exits with an error
    when they were measured with other ``settings`` (data, hardware, torch), which would mix two machines."""
    saved = json.loads(results.read_text()) if results.exists() else {"settings": settings, "rows": []}
    if saved["settings"] != settings:
        sys.exit(f"error: {results} holds rows measured with {saved['settings']}; use another --out")
    return saved["rows"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budgets", nargs="+", type=float, default=[60, 180, 600], help="seconds")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--recipes", nargs="+", choices=RECIPES, default=list(RECIPES))
    parser.add_argument("--data", type=Path, default=SUBSET, help="the CIFAR-10 subset archive")
    parser.add_argument("--md5", default=SUBSET_MD5)
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/time_to_accuracy")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1,024 train / 512 test images (smoke run)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    data = load_archive(args.data, args.md5, args.quick)
    norm = Normalization.from_images(data.train.images)
    settings = {
        "train_images": len(data.train),
        "test_images": len(data.test),
        "threads": args.threads,
        "hardware": hardware_description("cpu"),
        "torch": torch.__version__,
    }
    results = args.out.with_suffix(".json")
    rows = saved_rows(results, settings)
    done = {(r["model"], r["recipe"], r["budget_s"]) for r in rows}
    for budget in args.budgets:
        for name in args.models:
            for recipe in args.recipes:
                if (name, recipe, budget) in done:
                    continue
                print(f"{name}, {recipe} recipe, {label(budget)} ...", file=sys.stderr, flush=True)
                rows.append(run_row(name, recipe, budget, data, norm))
                print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
                files.write_json(results, {"settings": settings, "rows": rows})
                files.write_text(args.out.with_suffix(".md"), markdown(rows, settings))
    print(markdown(rows, settings))
    return 0


if __name__ == "__main__":
    sys.exit(main())
