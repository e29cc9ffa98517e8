"""Training-data throughput: vitlab's batched on-device augmentation against a per-image PIL pipeline.

    python benchmarks/bench_data.py            # about 2 minutes on 2 cores
    python benchmarks/bench_data.py --quick    # fewer images and rounds, for a smoke run

Every pipeline delivers augmented, normalized batches of 128 CIFAR-sized images from uint8 images in memory:

- vitlab: ``BatchAugment`` on the whole batch, indexed out of one uint8 tensor, in the training process
  (2 intra-op threads);
- torchvision: the classic per-image pipeline of the seed notebooks, ``Image.fromarray`` -> RandomCrop(32, 4)
  -> RandomHorizontalFlip -> ToTensor -> Normalize, batched by a DataLoader with 2 worker processes
  (persistent, so that their start-up is not counted);
- the training step itself: tinyvit forward, backward and AdamW step on a batch of 128, the rate the data
  pipeline has to outrun.

The pipelines take turns, round after round, so that each sees the same machine load; each figure is the
median over the rounds. Prints a Markdown table with the ratios against torchvision and the training step.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F

from vitlab.checkpoint import Normalization
from vitlab.compat import import_torchvision
from vitlab.data.augment import BatchAugment
from vitlab.models import build_model, preset_config

import_torchvision()
from PIL import Image  # noqa: E402
from torch.utils.data import DataLoader, Dataset  # noqa: E402
from torchvision import transforms  # noqa: E402

BATCH = 128
THREADS = 2
NORM = Normalization(mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
# Batched option sets: name -> BatchAugment keyword arguments (crop 4 and flip always on).
OURS = {
    "crop + flip": {},
    "crop + flip + RandAugment": {"policy": "randaugment"},
    "crop + flip + RandAugment + MixUp/CutMix + erasing": {
        "policy": "randaugment",
        "mixup_alpha": 0.2,
        "cutmix_alpha": 1.0,
        "random_erasing": 0.25,
    },
}
# The same work per image in PIL: name -> extra transforms before ToTensor.
PIL = {"crop + flip": [], "crop + flip + RandAugment": [transforms.RandAugment()]}


class PilImages(Dataset):
    """uint8 (N, 32, 32, 3) images through a per-image torchvision transform, as the seed notebooks do:
    random crop and flip, ``extra`` transforms, ToTensor, Normalize."""

    def __init__(self, images: np.ndarray, labels: np.ndarray, norm: Normalization, extra: list):
        self.images, self.labels = images, labels
        self.transform = transforms.Compose(
            [
                transforms.RandomCrop(32, padding=4),
                transforms.RandomHorizontalFlip(),
                *extra,
                transforms.ToTensor(),
                transforms.Normalize(norm.mean, norm.std),
            ]
        )

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(Image.fromarray(self.images[i])), int(self.labels[i])


def batched(images: torch.Tensor, labels: torch.Tensor, options: dict) -> Callable[[], Iterator]:
    """An epoch of vitlab batches: a random order, indexed batch by batch, augmented on the spot."""
    augment = BatchAugment(NORM, 10, **options)
    generator = torch.Generator().manual_seed(0)

    def epoch() -> Iterator:
        order = torch.randperm(len(labels), generator=generator)
        for idx in order.split(BATCH):
            yield augment(images.index_select(0, idx), labels[idx], generator)

    return epoch


def per_image(images: np.ndarray, labels: np.ndarray, extra: list) -> Callable[[], Iterator]:
    loader = DataLoader(
        PilImages(images, labels, NORM, extra), BATCH, shuffle=True, num_workers=2, persistent_workers=True
    )
    next(iter(loader))  # start the workers before anything is timed
    return lambda: iter(loader)


def training_steps(n_batches: int) -> Callable[[], Iterator]:
    """tinyvit's forward + backward + AdamW step on batch after batch of 128 (random inputs)."""
    torch.manual_seed(0)
    model = build_model(*preset_config("tinyvit"))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    x, y = torch.randn(BATCH, 3, 32, 32), torch.randint(0, 10, (BATCH,))

    def epoch() -> Iterator:
        for _ in range(n_batches):
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            yield loss

    return epoch


def batches_per_s(epoch: Callable[[], Iterator]) -> float:
    start, count = time.perf_counter(), 0
    for _ in epoch():
        count += 1
    return count / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer images and rounds (noisier figures)")
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    n_images, rounds, train_batches = (4_096, 2, 2) if args.quick else (10_240, 5, 8)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (n_images, 32, 32, 3), dtype=np.uint8)
    labels = rng.integers(0, 10, n_images)
    on_device = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()  # as vitlab.train keeps them
    pipelines = {
        f"vitlab {name}": batched(on_device, torch.from_numpy(labels), o) for name, o in OURS.items()
    }
    pipelines |= {f"torchvision PIL {name}": per_image(images, labels, e) for name, e in PIL.items()}
    pipelines["training step (tinyvit)"] = training_steps(train_batches)
    rates: dict[str, list[float]] = {name: [] for name in pipelines}
    for _ in range(rounds):
        for name, epoch in pipelines.items():
            rates[name].append(batches_per_s(epoch))
    median = {name: statistics.median(r) for name, r in rates.items()}
    step = median["training step (tinyvit)"]
    print(
        f"torch {torch.__version__}, {THREADS} threads, {n_images:,} images, batch {BATCH}, {rounds} rounds"
    )
    print()
    print("| pipeline | batches/s | images/s | vs torchvision PIL | vs training step |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for name, rate in median.items():
        option = name.removeprefix("vitlab ").removeprefix("torchvision PIL ")
        pil = median.get(f"torchvision PIL {option}")
        versus_pil = f"{rate / pil:.1f}x" if pil and name.startswith("vitlab") else ""
        print(f"| {name} | {rate:,.1f} | {rate * BATCH:,.0f} | {versus_pil} | {rate / step:.1f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
