"""Where each dataset comes from, what its files must be, and what follows from it: image geometry, the
augmentation and validation defaults of params.yaml's null keys."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

# The embedded sample lives in the repository, next to the code that reads it.
SAMPLE_DIR = Path(__file__).resolve().parents[3] / "data" / "sample"


@dataclass(frozen=True)
class DatasetSpec:
    """A dataset: where its official copy is (an archive, or with ``md5`` None files fetched one by one),
    its files with their official md5s, their format and the counts they promise.

    Formats: ``cifar``, the "python version" pickled batches of Krizhevsky (2009),
    https://www.cs.toronto.edu/~kriz/cifar.html (``meta_file``, ``label_key``, ``names_key`` say where the
    labels and class names are); ``idx``, MNIST's gzipped idx files (LeCun et al., 1998), ``train_files``
    and ``test_files`` each an (images, labels) pair, the class names in ``class_names``.
    """

    name: str
    url: str  # official archive URL (a path for the embedded sample); with md5 None the files' folder URL
    md5: str | None  # md5 of the whole archive; None: no archive, each file is fetched from url + its name
    folder: str  # the folder inside an archive that holds the files
    train_files: tuple[str, ...]
    test_files: tuple[str, ...]
    # Official md5 of each file, as torchvision's dataset classes check them: a copy whose files all match is
    # the official data whatever its archive's md5. Empty: no official files (the embedded sample).
    file_md5s: dict[str, str]
    num_classes: int
    num_train: int  # images the official files hold
    num_test: int
    image_size: int  # height = width of every image, in pixels
    channels: int  # 3: RGB; 1: grayscale
    flip: bool  # train.flip's default: random horizontal flips (not for digits: a mirrored 2 is no 2)
    crop_padding: int  # train.crop_padding's default: random crops after padding so many pixels
    pixel_mean: tuple[float, float]  # validate.pixel_mean_min/max's defaults, 0-255 (mean of per-image means)
    pixel_std: tuple[float, float]  # validate.pixel_std_min/max's defaults (mean per-image std)
    format: Literal["cifar", "idx"] = "cifar"
    meta_file: str = ""  # cifar: the pickle with the class names
    label_key: str = ""  # cifar: key of the labels in each batch dict
    names_key: str = ""  # cifar: key of the class names in the meta dict
    class_names: tuple[str, ...] = ()  # idx: the class names, which no file holds

    @property
    def archive_name(self) -> str:
        """The archive's file name: the last "/"-separated part of ``url`` (cifar-10-python.tar.gz)."""
        return self.url.rsplit("/", 1)[-1]

    @property
    def files(self) -> tuple[str, ...]:
        """Every file the dataset reads, relative to ``folder``: the train and test files, then the meta."""
        return self.train_files + self.test_files + ((self.meta_file,) if self.meta_file else ())


# CIFAR-10 and CIFAR-100 (and the sample) share their geometry and defaults: 32x32 RGB photos, flipped
# and cropped by 4 pixels (as in He et al., 2016); pixel means measured ~121 (CIFAR-10) and ~122 (CIFAR-100).
_CIFAR = dict(
    image_size=32, channels=3, flip=True, crop_padding=4, pixel_mean=(90.0, 160.0), pixel_std=(40.0, 90.0)
)
_CIFAR10_LAYOUT = dict(
    folder="cifar-10-batches-py",
    train_files=tuple(f"data_batch_{i}" for i in range(1, 6)),
    test_files=("test_batch",),
    meta_file="batches.meta",
    label_key="labels",
    names_key="label_names",
    num_classes=10,
    **_CIFAR,
)

DEFAULT_DATASET = "cifar10-sample"  # data.dataset's default; what a model config assumes when not told
DATASETS: dict[str, DatasetSpec] = {
    "cifar10-sample": DatasetSpec(
        name="cifar10-sample",
        url=str(SAMPLE_DIR / "cifar-10-sample-python.tar.gz"),
        md5="295a33dca0b37c5fbe4c92d8d25eda9d",  # tools/make_sample.py prints it
        file_md5s={},
        num_train=2250,
        num_test=500,
        **_CIFAR10_LAYOUT,
    ),
    "cifar10": DatasetSpec(
        name="cifar10",
        url="https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz",
        md5="c58f30108f718f92721af3b95e74349a",
        file_md5s={
            "data_batch_1": "c99cafc152244af753f735de768cd75f",
            "data_batch_2": "d4bba439e000b95fd0a9bffe97cbabec",
            "data_batch_3": "54ebc095f3ab1f0389bbae665268c751",
            "data_batch_4": "634d18415352ddfa80567beed471001a",
            "data_batch_5": "482c414d41f54cd18b22e5b47cb7c3cb",
            "test_batch": "40351d587109b95175f43aff81a1287e",
            "batches.meta": "5ff9c542aee3614f3951f8cda6e48888",
        },
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
        file_md5s={
            "train": "16019d7e3df5f24257cddd939b257f8d",
            "test": "f0ef6b0ae62326f3e7ffdfab6717acfc",
            "meta": "7973b15100ade9c7d40fb424638fde48",
        },
        label_key="fine_labels",
        names_key="fine_label_names",
        num_classes=100,
        num_train=50_000,
        num_test=10_000,
        **_CIFAR,
    ),
    # No archive: torchvision's mirror serves the four gzipped idx files, each checked against its md5.
    "mnist": DatasetSpec(
        name="mnist",
        url="https://ossci-datasets.s3.amazonaws.com/mnist/",
        md5=None,
        folder="mnist",
        train_files=("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
        test_files=("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
        file_md5s={
            "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
            "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
            "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
            "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
        },
        format="idx",
        class_names=tuple(str(digit) for digit in range(10)),
        num_classes=10,
        num_train=60_000,
        num_test=10_000,
        image_size=28,
        channels=1,
        # Digits are not mirror-symmetric: no flips; 2 pixels of padding shift a centred digit by up to 2.
        flip=False,
        crop_padding=2,
        # Measured on the official files: mean of per-image means 33.3 (train) / 33.8 (test), mean per-image
        # std 76.8 / 77.4 (white digits on black).
        pixel_mean=(20.0, 50.0),
        pixel_std=(60.0, 95.0),
    ),
}
