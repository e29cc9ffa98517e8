"""Where each dataset comes from and what its archive must contain."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

# The embedded sample lives in the repository, next to the code that reads it.
SAMPLE_DIR = Path(__file__).resolve().parents[3] / "data" / "sample"


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset's archive (url, md5) and its layout: the CIFAR "python version" pickled batches of
    Krizhevsky (2009), https://www.cs.toronto.edu/~kriz/cifar.html, and the counts it promises."""

    name: str
    url: str  # official URL, or a path for the embedded sample
    md5: str  # md5 of the whole archive
    folder: str  # top-level folder inside the archive
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    meta_file: str
    label_key: str  # key of the labels in each batch dict
    names_key: str  # key of the class names in the meta dict
    num_classes: int
    num_train: int  # images the archive promises
    num_test: int
    image_size: int = 32  # height = width of every image, in pixels
    channels: int = 3  # 3: RGB; 1: grayscale

    @property
    def archive_name(self) -> str:
        """The archive's file name: the last "/"-separated part of ``url`` (cifar-10-python.tar.gz)."""
        return self.url.rsplit("/", 1)[-1]


_CIFAR10_LAYOUT = dict(
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
)

DATASETS: dict[str, DatasetSpec] = {
    "cifar10-sample": DatasetSpec(
        name="cifar10-sample",
        url=str(SAMPLE_DIR / "cifar-10-sample-python.tar.gz"),
        md5="295a33dca0b37c5fbe4c92d8d25eda9d",  # tools/make_sample.py prints it
        num_train=2250,
        num_test=500,
        **_CIFAR10_LAYOUT,
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        num_train=50_000,
        num_test=10_000,
        **_CIFAR10_LAYOUT,
    ),
    "cifar100": DatasetSpec(
        name="cifar100",
        url="https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz",
        md5="eb9058c3a382ffc7106e4002c42a8d85",
        folder="cifar-100-python",
        train_files=("train",),
        test_files=("test",),
        meta_file="meta",
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
        num_train=50_000,
        num_test=10_000,
    ),
}
