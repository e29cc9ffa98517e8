"""MNIST's idx files (LeCun et al., 1998, http://yann.lecun.com/exdb/mnist/), read with numpy and checked.

An idx file is a big-endian header, a magic number (0x0000 08 ndim: unsigned bytes, ndim dimensions) and
ndim int32 sizes, followed by the uint8 values in row-major order; MNIST ships each one gzipped. Nothing in a
file is trusted: a wrong magic number, size or length, or a truncated gzip stream is a one-line VitlabError
naming the file.
"""

from __future__ import annotations

import gzip
import math
import os
import zlib
from pathlib import Path

import numpy as np

from vitlab.data.prepared import PreparedDataset, Split
from vitlab.data.sources import DatasetSpec
from vitlab.errors import VitlabError, one_line

IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes in 3 dimensions (images, rows, columns)
LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes in 1 dimension


def read_idx(path: str | os.PathLike[str], magic: int) -> np.ndarray:
    """The uint8 array of the gzipped idx file at ``path``, whose magic number must be ``magic``:
    (n, rows, cols) for IMAGES_MAGIC, (n,) for LABELS_MAGIC.

    Raises VitlabError naming the file when it is missing, not gzip, truncated or corrupt, has another magic
    number, or holds more or fewer values than its header promises.
    """
    path = Path(path)
    try:
        with gzip.open(path, "rb") as handle:
            data = handle.read()
    except FileNotFoundError:
        raise VitlabError(f"{path}: missing") from None
    except (OSError, EOFError, zlib.error) as error:  # gzip.BadGzipFile is an OSError
        raise VitlabError(f"{path}: corrupt or truncated gzip file ({one_line(error)})") from None
    ndim = magic & 0xFF
    header = 4 + 4 * ndim
    found = int.from_bytes(data[:4], "big")
    if len(data) >= 4 and found != magic:
        raise VitlabError(f"{path}: idx magic number {found}, expected {magic}")
    if len(data) < header:
        raise VitlabError(f"{path}: {len(data)} bytes, too short for an idx header of {header}")
    shape = tuple(np.frombuffer(data, ">u4", count=ndim, offset=4).tolist())
    values = len(data) - header
    if values != math.prod(shape):
        raise VitlabError(
            f"{path}: header promises {' x '.join(map(str, shape))} = {math.prod(shape)} values, "
            f"the file holds {values}"
        )
    return np.frombuffer(data, np.uint8, offset=header).reshape(shape).copy()


def read_mnist(root: str | os.PathLike[str], spec: DatasetSpec) -> PreparedDataset:
    """The MNIST-layout dataset ``spec`` from the folder ``root`` holding its idx files.

    Images become uint8 (N, size, size, 1), labels int64 (N,), class names ``spec.class_names``. Raises
    VitlabError naming the file for one ``read_idx`` refuses, images of another size than ``spec``'s, a
    label file whose count differs from its images', or a label outside 0..num_classes-1.
    """
    root = Path(root)
    splits = [_read_split(root, files, spec) for files in (spec.train_files, spec.test_files)]
    return PreparedDataset(
        train=splits[0],
        test=splits[1],
        class_names=list(spec.class_names),
        info={"dataset": spec.name, "num_classes": len(spec.class_names)},
    )


def _read_split(root: Path, files: tuple[str, ...], spec: DatasetSpec) -> Split:
    images_path, labels_path = (root / name for name in files)
    images = read_idx(images_path, IMAGES_MAGIC)
    labels = read_idx(labels_path, LABELS_MAGIC)
    size = spec.image_size
    if images.shape[1:] != (size, size):
        rows, cols = images.shape[1:]
        raise VitlabError(f"{images_path}: images of {rows}x{cols} pixels, {spec.name}'s are {size}x{size}")
    if len(labels) != len(images):
        raise VitlabError(
            f"{labels_path}: {len(labels)} labels for the {len(images)} images of {images_path.name}"
        )
    if len(labels) and labels.max() >= spec.num_classes:
        raise VitlabError(
            f"{labels_path}: label {labels.max()} outside 0-{spec.num_classes - 1} ({spec.name})"
        )
    return Split(images=images[..., None], labels=labels.astype(np.int64))
