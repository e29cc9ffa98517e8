"""Turn a CIFAR "python version" archive into a PreparedDataset, safely.

Neither the archive nor its pickles are trusted: extraction refuses members that would land outside the
target, and the batch files are read by an unpickler that can only rebuild numpy arrays, so a tampered
mirror can at worst fail with a clear error, never run code.
"""

from __future__ import annotations

import gzip
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from pathlib import Path
from typing import Any

import numpy as np

from vitlab.data.download import fetch, source_name
from vitlab.data.prepared import PreparedDataset, Split, save_prepared
from vitlab.data.sources import SAMPLE_DIR, DatasetSpec
from vitlab.errors import VitlabError

_ROW = 3 * 32 * 32  # one image, channel-planar: 1024 R, 1024 G, 1024 B values, each plane 32x32 row-major

# The only globals an official CIFAR pickle names. numpy 2 moved numpy.core to numpy._core (our embedded
# sample was written by it); both spellings map to the running numpy's own function.
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_ALLOWED_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


def extract_archive(archive: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Extract a (gzipped) tar archive into ``target`` and return it.

    Members with absolute paths, ``..``, links pointing outside, or device files are refused (VitlabError),
    as is a corrupt or truncated archive. The archive is extracted into a temporary folder beside ``target``
    that is renamed into place only when complete; an existing ``target`` is replaced.
    """
    archive, target = Path(archive), Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with tarfile.open(archive, "r:*") as tar:
            tar.extractall(tmp, filter=_refuse_absolute_then_data_filter)
        _replace_folder(tmp, target)
    except tarfile.FilterError as error:
        raise VitlabError(f"{archive}: refused unsafe archive member ({error})") from None
    except (tarfile.TarError, EOFError, zlib.error, gzip.BadGzipFile) as error:
        raise VitlabError(f"{archive}: corrupt or truncated archive ({_one_line(error)})") from None
    except OSError as error:
        raise VitlabError(f"{archive}: cannot extract ({error})") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def _one_line(error: Exception) -> str:
    # tarfile's "r:*" lists the failure of every compression it tried, one per line.
    return " ".join(str(error).split())


def _refuse_absolute_then_data_filter(member: tarfile.TarInfo, dest: str) -> tarfile.TarInfo | None:
    # The "data" filter would silently strip a leading "/"; a CIFAR archive never has one, so refuse it.
    if member.name.startswith("/"):
        raise tarfile.AbsolutePathError(member)
    return tarfile.data_filter(member, dest)


def _replace_folder(new: Path, target: Path) -> None:
    """Rename ``new`` onto ``target``; an existing ``target`` is moved aside first and then deleted."""
    if not target.exists():
        os.replace(new, target)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".old", dir=target.parent))
    os.replace(target, old / target.name)
    os.replace(new, target)
    shutil.rmtree(old)


class _NumpyOnlyUnpickler(pickle.Unpickler):
    """Unpickles dicts, lists, strings, numbers and numpy arrays; refuses every other global."""

    def __init__(self, handle: Any, path: Path) -> None:
        # latin1: the files are Python 2 pickles whose str keys and array bytes are 8-bit strings.
        super().__init__(handle, encoding="latin1")
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise VitlabError(f"{self._path}: refused to load global {module}.{name}") from None


def load_pickle(path: str | os.PathLike[str]) -> Any:
    """Load a CIFAR pickle with the numpy-only unpickler; VitlabError when missing, unsafe or malformed."""
    path = Path(path)
    try:
        with open(path, "rb") as handle:
            return _NumpyOnlyUnpickler(handle, path).load()
    except FileNotFoundError:
        raise VitlabError(f"{path}: missing from the archive") from None
    except VitlabError:
        raise
    except Exception as error:  # a malformed pickle fails in many ways, all meaning the same to the user
        raise VitlabError(f"{path}: not a valid CIFAR pickle ({type(error).__name__}: {error})") from None


def parse_cifar(folder: str | os.PathLike[str], spec: DatasetSpec) -> PreparedDataset:
    """Read the extracted archive at ``folder`` (which holds ``spec.folder``) into a PreparedDataset.

    Images become uint8 (N, 32, 32, 3) HWC RGB, labels int64, in the order of ``spec``'s batch files.
    ``info`` holds the dataset name and class count; the caller adds where the archive came from.
    """
    root = Path(folder) / spec.folder
    meta_path = root / spec.meta_file
    meta = load_pickle(meta_path)
    names = meta.get(spec.names_key) if isinstance(meta, dict) else None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise VitlabError(f"{meta_path}: no list of class names under {spec.names_key!r}")
    if len(names) != spec.num_classes:
        raise VitlabError(f"{meta_path}: {len(names)} class names, {spec.name} has {spec.num_classes}")
    return PreparedDataset(
        train=_read_split(root, spec.train_files, spec.label_key),
        test=_read_split(root, spec.test_files, spec.label_key),
        class_names=names,
        info={"dataset": spec.name, "num_classes": len(names)},
    )


def _read_split(root: Path, files: tuple[str, ...], label_key: str) -> Split:
    batches = [_read_batch(root / name, label_key) for name in files]
    rows = np.concatenate([data for data, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    images = np.ascontiguousarray(rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return Split(images=images, labels=labels)


def _read_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """One batch file's checked (n, 3072) uint8 rows and (n,) int64 labels."""
    batch = load_pickle(path)
    if not isinstance(batch, dict):
        raise VitlabError(f"{path}: expected a dict of 'data' and {label_key!r}, got {type(batch).__name__}")
    for key in ("data", label_key):
        if key not in batch:
            raise VitlabError(f"{path}: no {key!r} entry (keys: {', '.join(map(str, batch))})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = f"dtype {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise VitlabError(f"{path}: 'data' is {kind}, expected a uint8 array")
    if data.ndim != 2 or data.shape[1] != _ROW:
        raise VitlabError(f"{path}: 'data' has shape {data.shape}, expected (n, {_ROW})")
    try:
        labels = np.asarray(batch[label_key])
    except ValueError:  # ragged nested lists
        labels = np.asarray(None)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise VitlabError(f"{path}: {label_key!r} is not a list of integers ({labels.dtype}, {labels.shape})")
    if len(labels) != len(data):
        raise VitlabError(f"{path}: {len(data)} images but {len(labels)} labels in {label_key!r}")
    return data, labels.astype(np.int64)


def prepare_dataset(
    spec: DatasetSpec,
    source: str | None,
    md5: str | None,
    raw_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    progress: bool = True,
    expected_train: int | None = None,
    expected_test: int | None = None,
) -> PreparedDataset:
    """The download stage: fetch, verify, extract and parse an archive, and save it to ``out_dir``.

    ``source``/``md5`` default to the dataset's official (or embedded) archive, whose image counts are then
    the expected ones unless given; for another source only the given counts are expected (None: unchecked).
    The verified archive stays in ``raw_dir`` as a cache; the extracted files are deleted.
    """
    raw_dir = Path(raw_dir)
    url = spec.url if source is None else source
    md5 = spec.md5 if md5 is None else md5
    archive = fetch(url, raw_dir / (source_name(url) or spec.archive_name), md5, progress=progress)
    with tempfile.TemporaryDirectory(prefix=".extract-", dir=raw_dir) as tmp:
        dataset = parse_cifar(extract_archive(archive, Path(tmp) / "archive"), spec)
    if source is None:
        expected_train = spec.num_train if expected_train is None else expected_train
        expected_test = spec.num_test if expected_test is None else expected_test
    dataset.info.update(
        source=_portable(url),
        md5=md5.lower(),
        expected_train=expected_train,
        expected_test=expected_test,
    )
    save_prepared(dataset, out_dir)
    return dataset


def _portable(source: str) -> str:
    """``source``, with the embedded sample's absolute path made relative to the repository."""
    # The prepared meta.json is a pipeline output: a machine-specific path in it would differ on every clone.
    try:
        return Path(source).relative_to(SAMPLE_DIR.parents[1]).as_posix()
    except ValueError:
        return source
