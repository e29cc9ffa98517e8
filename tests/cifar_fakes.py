"""Tiny synthetic CIFAR data for tests: archives in the official "python version" layout, and datasets.

    from cifar_fakes import make_cifar_archive, make_dataset

    md5 = make_cifar_archive(tmp_path / "c10.tar.gz", n_train=50, n_test=20)
    md5 = make_cifar_archive(path, DATASETS["cifar100"], mutate=lambda files: files.pop("test"))
    ds = make_dataset(n_train=200, n_test=50, num_classes=10)
    split = separable_split(256)  # two classes a model learns in a few steps
    payload = dump_pickle(as_bytes(official_files()["data_batch_1"]), protocol=2, numpy1=True)

Images are uniform random bytes (pixel mean ~127, std ~74: inside the default validation thresholds), every
image distinct, labels balanced (``i % num_classes``, shuffled); ``separable_split``'s are dark or bright.
"""

from __future__ import annotations

import io
import pickle
import tarfile
import types
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
_ROW = 3 * 32 * 32  # one official row: the 1024 red values, then green, then blue


def random_rows(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` random images as official CIFAR rows: uint8 (n, 3072), channel-planar."""
    return rng.integers(0, 256, size=(n, _ROW), dtype=np.uint8)


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


def official_files(
    spec: DatasetSpec = DATASETS["cifar10"], n_train: int = 50, n_test: int = 20
) -> dict[str, Any]:
    """:func:`cifar_files` with every key the official pickles hold: ``filenames`` in each batch, CIFAR-100's
    ``coarse_labels`` and ``coarse_label_names``, CIFAR-10's ``num_cases_per_batch`` and ``num_vis``."""
    files = cifar_files(spec, n_train, n_test)
    for name, payload in files.items():
        if name == spec.meta_file:
            if spec.label_key == "fine_labels":
                payload["coarse_label_names"] = [f"superclass_{i}" for i in range(20)]
            else:
                payload |= {"num_cases_per_batch": 10000, "num_vis": _ROW}
        else:
            payload["filenames"] = [f"image_{i:05d}.png" for i in range(len(payload["data"]))]
            if spec.label_key == "fine_labels":
                payload["coarse_labels"] = [label // 5 for label in payload["fine_labels"]]
    return files


def as_bytes(value: Any) -> Any:
    """``value`` with every str (dict keys, list items) as latin1 bytes: how Python 3 loads an official file
    with ``encoding="bytes"``, as the CIFAR page suggests."""
    if isinstance(value, str):
        return value.encode("latin-1")
    if isinstance(value, dict):
        return {as_bytes(key): as_bytes(item) for key, item in value.items()}
    if isinstance(value, list):
        return [as_bytes(item) for item in value]
    return value


class _Writer(pickle._Pickler):  # the pure-Python pickler: its dispatch table and save_global can be changed
    """A pickle writer that spells numpy's globals as numpy 1 did (``numpy.core``) and, with ``python2``,
    writes bytes as Python 2 8-bit strings (STRING/BINSTRING), as the official files were written."""

    def __init__(self, file: io.BytesIO, protocol: int, numpy1: bool, python2: bool) -> None:
        super().__init__(file, protocol)
        self.numpy1 = numpy1 or python2
        # The class's table saves Python functions (numpy's _frombuffer) with the base class's save_global.
        self.dispatch = {**self.dispatch, types.FunctionType: _Writer.save_global}
        if python2:
            self.dispatch[bytes] = _Writer._save_python2_str

    def save_global(self, obj: Any, name: str | None = None) -> None:
        module = getattr(obj, "__module__", "")
        if not (self.numpy1 and module.startswith("numpy._core.")):
            return super().save_global(obj, name)
        module, name = "numpy.core." + module.removeprefix("numpy._core."), name or obj.__qualname__
        if self.proto >= 4:
            self.save(module)
            self.save(name)
            self.write(pickle.STACK_GLOBAL)
        else:
            self.write(pickle.GLOBAL + f"{module}\n{name}\n".encode("ascii"))
        self.memoize(obj)
        return None

    def _save_python2_str(self, obj: bytes) -> None:
        if self.proto == 0:
            self.write(pickle.STRING + repr(obj)[1:].encode("ascii") + b"\n")
        elif len(obj) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(obj)]) + obj)
        else:
            self.write(pickle.BINSTRING + len(obj).to_bytes(4, "little") + obj)
        self.memoize(obj)


def dump_pickle(payload: Any, protocol: int, *, numpy1: bool = False, python2: bool = False) -> bytes:
    """``payload`` pickled at ``protocol`` as a given writer would: ``numpy1`` spells numpy's globals
    ``numpy.core...`` (numpy 1, which wrote the official files); ``python2`` (protocols 0-2, numpy 1) writes
    bytes as Python 2 strings, which load as str. Without either, it writes what ``pickle.dumps`` does."""
    if python2 and protocol > 2:
        raise ValueError("Python 2 wrote pickle protocols 0-2 only")
    file = io.BytesIO()
    _Writer(file, protocol, numpy1, python2).dump(payload)
    return file.getvalue()


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


def separable_split(n: int, seed: int = 0) -> Split:
    """Two classes a linear model can tell apart: dark images vs bright images, with noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    base = np.where(labels[:, None, None, None] == 1, 170, 80)
    images = np.clip(base + rng.normal(0, 30, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
    return Split(images, labels.astype(np.int64))
