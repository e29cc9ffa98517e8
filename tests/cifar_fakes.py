"""Tiny synthetic CIFAR data for tests: archives in the official "python version" layout, and datasets.

    from cifar_fakes import make_cifar_archive, make_dataset

    md5 = make_cifar_archive(tmp_path / "c10.tar.gz", n_train=50, n_test=20)
    md5 = make_cifar_archive(path, DATASETS["cifar100"], mutate=lambda files: files.pop("test"))
    ds = make_dataset(n_train=200, n_test=50, num_classes=10)

Images are uniform random bytes (pixel mean ~127, std ~74: inside the default validation thresholds), every
image distinct, labels balanced (``i % num_classes``, shuffled).
"""

from __future__ import annotations

import io
import pickle
import tarfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from vitlab.data.download import md5sum
from vitlab.data.prepared import PreparedDataset, Split
from vitlab.data.sources import DATASETS, DatasetSpec

# Protocol 4 writes bytes natively, so the pickles name only numpy's own globals, as the official ones do
# (protocol 2 from Python 3 would add _codecs.encode; protocol 5 would add numpy._core.numeric._frombuffer).
PICKLE_PROTOCOL = 4


def random_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random images as official CIFAR rows: uint8 (n, 3072), channel-planar."""
    return rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)


def balanced_labels(n: int, num_classes: int, rng: np.random.Generator) -> list[int]:
    """``n`` labels with every class equally often (up to one), in random order."""
    return rng.permutation(np.arange(n) % num_classes).tolist()


def cifar_files(
    spec: DatasetSpec = DATASETS["cifar10"],
    n_train: int = 50,
    n_test: int = 20,
    num_classes: int | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """The archive's files as ``{file name: payload}``: batch dicts for the batch files, a dict for the meta.

    The train images are spread over ``spec.train_files`` as evenly as possible. Labels are lists of ints
    under ``spec.label_key`` and class names ``class_0``... under ``spec.names_key``.
    """
    num_classes = spec.num_classes if num_classes is None else num_classes
    rng = np.random.default_rng(seed)
    files: dict[str, Any] = {}
    for names, total in ((spec.train_files, n_train), (spec.test_files, n_test)):
        for name, n in zip(names, np.array_split(np.arange(total), len(names)), strict=True):
            files[name] = {
                "batch_label": name,
                spec.label_key: balanced_labels(len(n), num_classes, rng),
                "data": random_rows(len(n), rng),
            }
    files[spec.meta_file] = {spec.names_key: [f"class_{i}" for i in range(num_classes)]}
    return files


def write_tar(path: Path, members: dict[str, bytes], mode: str = "w:gz") -> None:
    """Write ``{member name: content}`` as regular files into a tar archive."""
    with tarfile.open(path, mode) as tar:
        for name, payload in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))


def make_cifar_archive(
    path: str | Path,
    spec: DatasetSpec = DATASETS["cifar10"],
    n_train: int = 50,
    n_test: int = 20,
    *,
    num_classes: int | None = None,
    seed: int = 0,
    mutate: Callable[[dict[str, Any]], None] | None = None,
) -> str:
    """Write a synthetic ``.tar.gz`` with ``spec``'s layout (folder, batch and meta files) and return its md5.

    ``mutate`` receives the :func:`cifar_files` dict before it is written and may change it in place:
    delete a file, replace a batch's ``data`` or labels, or set a file to raw ``bytes``, which are written
    as they are (e.g. a hostile pickle); every other payload is pickled.
    """
    files = cifar_files(spec, n_train, n_test, num_classes, seed)
    if mutate is not None:
        mutate(files)
    members = {
        f"{spec.folder}/{name}": payload
        if isinstance(payload, bytes)
        else pickle.dumps(payload, PICKLE_PROTOCOL)
        for name, payload in files.items()
    }
    path = Path(path)
    write_tar(path, members)
    return md5sum(path)


def make_dataset(
    n_train: int = 200, n_test: int = 50, num_classes: int = 10, seed: int = 0, info: dict | None = None
) -> PreparedDataset:
    """A synthetic PreparedDataset: HWC uint8 images, int64 balanced labels, ``class_0``... names."""
    rng = np.random.default_rng(seed)

    def split(n: int) -> Split:
        images = random_rows(n, rng).reshape(n, 3, 32, 32).transpose(0, 2, 3, 1)
        return Split(np.ascontiguousarray(images), np.array(balanced_labels(n, num_classes, rng), np.int64))

    return PreparedDataset(
        train=split(n_train),
        test=split(n_test),
        class_names=[f"class_{i}" for i in range(num_classes)],
        info={"dataset": "fake", "num_classes": num_classes} | (info or {}),
    )
