"""The prepared dataset: uint8 images (N, H, W, C) HWC (CIFAR: 32x32 RGB; MNIST: 28x28x1 grayscale), int64
labels and class names, on disk as npz."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from vitlab import files
from vitlab.errors import VitlabError


@dataclass(frozen=True)
class Split:
    """One split: uint8 (N, size, size, channels) HWC images and int64 (N,) class indices; ``len()`` is N."""

    images: np.ndarray  # uint8 (N, size, size, channels): (N, 32, 32, 3) for CIFAR, (N, 28, 28, 1) for MNIST
    labels: np.ndarray  # int64 (N,)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def geometry(self) -> tuple[int, int]:
        """(image_size, channels) of the images: what a model's config must say to read them."""
        return self.images.shape[1], self.images.shape[3]


@dataclass(frozen=True)
class PreparedDataset:
    """Train and test splits, class names (a label indexes them) and ``info``: what meta.json records besides
    the class names."""

    train: Split
    test: Split
    class_names: list[str]
    info: dict[str, Any] = field(default_factory=dict)  # dataset name, source, md5, official, promised counts

    @property
    def num_classes(self) -> int:
        """The number of class names."""
        return len(self.class_names)


def save_prepared(dataset: PreparedDataset, folder: str | Path) -> None:
    """Write ``folder``/train.npz and test.npz (uncompressed arrays ``images``, ``labels``) and meta.json
    (``class_names`` plus ``info``), creating ``folder``; each file is atomic on its own, not the set.
    A failed write is a VitlabError naming the file."""
    folder = Path(folder)
    for name, split in (("train", dataset.train), ("test", dataset.test)):
        with files.atomic_path(folder / f"{name}.npz") as tmp, open(tmp, "wb") as handle:
            np.savez(handle, images=split.images, labels=split.labels)
    files.write_json(folder / "meta.json", {"class_names": dataset.class_names, **dataset.info})


def load_prepared(folder: str | Path) -> PreparedDataset:
    """Read what ``save_prepared`` wrote (no pickles allowed); array shapes and dtypes are not checked.

    Raises VitlabError naming ``folder`` when a file is missing or unreadable, meta.json is not JSON, or an
    npz lacks ``images`` or ``labels``.
    """
    folder = Path(folder)
    try:
        meta = json.loads((folder / "meta.json").read_text())
        splits = {}
        for name in ("train", "test"):
            with np.load(folder / f"{name}.npz", allow_pickle=False) as arrays:
                splits[name] = Split(images=arrays["images"], labels=arrays["labels"])
    except (OSError, KeyError, ValueError) as error:
        raise VitlabError(
            f"{folder}: not a prepared dataset ({error}); run the download stage first"
        ) from None
    class_names = meta.pop("class_names")
    return PreparedDataset(train=splits["train"], test=splits["test"], class_names=class_names, info=meta)
