"""Tiny synthetic MNIST data for tests: gzipped idx files in the official layout, valid or broken.

    from idx_fakes import idx_bytes, make_mnist_archive, make_mnist_folder

    md5s = make_mnist_folder(tmp_path / "mnist", n_train=60, n_test=20)  # {file name: md5}
    md5 = make_mnist_archive(tmp_path / "m.tar.gz", mutate=lambda files: files.pop(MNIST.test_files[0]))

Images are random bytes, labels balanced (``i % 10``, shuffled), as in cifar_fakes.
"""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import numpy as np
from cifar_fakes import balanced_labels, write_tar

from vitlab.data.download import md5sum
from vitlab.data.sources import DATASETS

MNIST = DATASETS["mnist"]


def idx_bytes(array: np.ndarray, magic: int | None = None) -> bytes:
    """``array`` (uint8) as an uncompressed idx file: magic number (by default the one of its rank), sizes."""
    magic = (0x0800 | array.ndim) if magic is None else magic  # 0x0803 = 2051 images, 0x0801 = 2049 labels
    sizes = np.asarray(array.shape, ">u4").tobytes()
    return magic.to_bytes(4, "big") + sizes + np.ascontiguousarray(array, np.uint8).tobytes()


def mnist_files(n_train: int = 60, n_test: int = 20, seed: int = 0, size: int = 28) -> dict[str, bytes]:
    """MNIST's four files as ``{file name: gzipped idx bytes}``: images (n, size, size), labels (n,)."""
    rng = np.random.default_rng(seed)
    files = {}
    for (images_name, labels_name), n in ((MNIST.train_files, n_train), (MNIST.test_files, n_test)):
        images = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        labels = np.array(balanced_labels(n, 10, rng), np.uint8)
        files[images_name] = gzip.compress(idx_bytes(images), mtime=0)
        files[labels_name] = gzip.compress(idx_bytes(labels), mtime=0)
    return files


def make_mnist_folder(
    folder: str | Path, n_train: int = 60, n_test: int = 20, mutate: Callable[[dict], None] | None = None
) -> dict[str, str]:
    """Write the four files into ``folder`` (``mutate`` may change the dict first); return their md5s."""
    files = mnist_files(n_train, n_test)
    if mutate is not None:
        mutate(files)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for name, payload in files.items():
        (folder / name).write_bytes(payload)
    return {name: md5sum(folder / name) for name in files}


def make_mnist_archive(
    path: str | Path, n_train: int = 60, n_test: int = 20, mutate: Callable[[dict], None] | None = None
) -> str:
    """Write a ``.tar.gz`` of ``mnist/`` and the four files (as mnist-full.tar.gz is); return its md5."""
    files = mnist_files(n_train, n_test)
    if mutate is not None:
        mutate(files)
    write_tar(Path(path), {f"{MNIST.folder}/{name}": payload for name, payload in files.items()})
    return md5sum(path)
