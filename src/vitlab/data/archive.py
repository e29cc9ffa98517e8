"""Turn a dataset's official files, an archive or a folder of them into a PreparedDataset, safely.

Neither the archive nor its files are trusted: extraction refuses members that would land outside the
target, CIFAR's batch files are read by an unpickler that can only rebuild numpy arrays, and MNIST's idx
files by numpy (vitlab.data.idx), so a tampered mirror can at worst fail with a clear error, never run code.
After extraction every file is compared with its official md5 (``DatasetSpec.file_md5s``): a copy whose
files are all official is the official data, whatever its archive's md5; any other copy is accepted only
through the archive md5 the user gives (``data.md5``).
"""

from __future__ import annotations

import contextlib
import fcntl
import gzip
import os
import pickle
import shutil
import tarfile
import tempfile
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

from vitlab.data.download import fetch, md5sum, source_name
from vitlab.data.idx import read_mnist
from vitlab.data.prepared import PreparedDataset, Split, save_prepared
from vitlab.data.sources import SAMPLE_DIR, DatasetSpec
from vitlab.errors import VitlabError
from vitlab.files import project_root


class _Refused(Exception):
    """An allowed global called with arguments that no CIFAR pickle writer produces; reported as refused."""


class _NdarrayName:
    """What ``numpy.ndarray`` loads as: a name for ``_reconstruct``'s first argument that cannot be called."""

    def __repr__(self) -> str:
        return "numpy.ndarray"


_NDARRAY = _NdarrayName()
_RECONSTRUCT = np.empty(0).__reduce__()[0]


def _empty_array(subtype: Any, shape: Any, typecode: Any) -> np.ndarray:
    """``numpy.core.multiarray._reconstruct`` as numpy pickles call it: an empty array for BUILD to fill."""
    # numpy's __setstate__ then checks the raw data against the shape and dtype it is given.
    if subtype is not _NDARRAY or shape != (0,) or typecode not in (b"b", "b"):
        raise _Refused(f"_reconstruct{(subtype, shape, typecode)!r}")
    return _RECONSTRUCT(np.ndarray, (0,), b"b")


def _array_from_buffer(buffer: Any, dtype: Any, shape: Any, order: Any, axis_order: Any = None) -> np.ndarray:
    """``numpy.core.numeric._frombuffer``: how numpy pickles a contiguous array at protocol 5, its bytes
    written in-band (BYTEARRAY8; out-of-band buffers are never supplied, so pickle itself refuses those)."""
    if not (
        isinstance(buffer, bytes | bytearray)
        and isinstance(dtype, np.dtype)
        and not dtype.hasobject
        and _is_int_tuple(shape)
        and order in ("C", "F", "K")
        and (axis_order is None or _is_int_tuple(axis_order))
    ):
        raise _Refused(f"_frombuffer with {type(buffer).__name__}, {dtype!r}, {shape!r}, {order!r}")
    array = np.frombuffer(buffer, dtype=dtype)
    if order == "K" and axis_order is not None:
        return array.reshape(shape, order="C").transpose(axis_order)
    return array.reshape(shape, order=order)


def _is_int_tuple(value: Any) -> bool:
    return isinstance(value, tuple) and all(type(n) is int for n in value)


def _latin1_bytes(*args: Any) -> bytes:
    """``_codecs.encode(text, "latin1")``: how Python 3 pickles bytes at protocols 0-2; no other codec."""
    if len(args) != 2 or type(args[0]) is not str or args[1] not in ("latin1", "latin-1"):
        described = ", ".join(type(a).__name__ if i == 0 else repr(a) for i, a in enumerate(args))
        raise _Refused(f"_codecs.encode({described})")
    return args[0].encode("latin-1")


def _empty_bytes(*args: Any) -> bytes:
    """``bytes()``: how Python 3 pickles ``b""`` at protocols 0-2; refused with arguments (bytes(10**12))."""
    if args:
        raise _Refused(f"bytes{args!r}")
    return b""


# Every global the standard writers name for the official layout (dicts of str or bytes keys, lists, ints,
# str or bytes, uint8 arrays) at pickle protocols 0-5, each as the narrowest callable that rebuilds it.
# numpy 2 moved numpy.core to numpy._core (our embedded sample was written by it): both spellings load.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    # arrays at protocols 0-4, and non-contiguous ones at 5: _reconstruct(ndarray, (0,), b"b") + __setstate__
    ("numpy.core.multiarray", "_reconstruct"): _empty_array,
    ("numpy._core.multiarray", "_reconstruct"): _empty_array,
    ("numpy", "ndarray"): _NDARRAY,
    ("numpy", "dtype"): np.dtype,
    # contiguous arrays at protocol 5
    ("numpy.core.numeric", "_frombuffer"): _array_from_buffer,
    ("numpy._core.numeric", "_frombuffer"): _array_from_buffer,
    # bytes written by Python 3 at protocols 0-2 (a CIFAR file loaded with encoding="bytes", pickled again)
    ("_codecs", "encode"): _latin1_bytes,
    ("__builtin__", "bytes"): _empty_bytes,
    ("builtins", "bytes"): _empty_bytes,  # the same, pickled with fix_imports=False
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
    """Unpickles dicts, lists, strings, bytes, numbers and numpy arrays; refuses every other global."""

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
    except _Refused as error:
        raise VitlabError(f"{path}: refused to call {error}") from None
    except Exception as error:  # a malformed pickle fails in many ways, all meaning the same to the user
        raise VitlabError(f"{path}: not a valid CIFAR pickle ({type(error).__name__}: {error})") from None


def parse_cifar(folder: str | os.PathLike[str], spec: DatasetSpec) -> PreparedDataset:
    """Read the extracted archive at ``folder`` (which holds ``spec.folder``) into a PreparedDataset.

    Images become uint8 (N, size, size, channels) HWC RGB (32x32x3 for CIFAR), labels int64, in the order
    of ``spec``'s batch files. ``info`` holds the dataset name and class count; the caller adds where the
    archive came from. Raises VitlabError naming the file that is missing, unsafe or malformed.
    """
    return _read_cifar(Path(folder) / spec.folder, spec)


def _read_cifar(root: Path, spec: DatasetSpec) -> PreparedDataset:
    meta_path = root / spec.meta_file
    meta = _text_keys(load_pickle(meta_path), meta_path)
    names = meta.get(spec.names_key) if isinstance(meta, dict) else None
    if isinstance(names, list):
        names = [_text(name) for name in names]
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise VitlabError(f"{meta_path}: no list of class names under {spec.names_key!r}")
    if len(names) != spec.num_classes:
        raise VitlabError(f"{meta_path}: {len(names)} class names, {spec.name} has {spec.num_classes}")
    return PreparedDataset(
        train=_read_split(root, spec.train_files, spec),
        test=_read_split(root, spec.test_files, spec),
        class_names=names,
        info={"dataset": spec.name, "num_classes": len(names)},
    )


def _read_split(root: Path, files: tuple[str, ...], spec: DatasetSpec) -> Split:
    # One image per row, channel-planar: CIFAR's 1024 R, 1024 G, 1024 B values, each plane 32x32 row-major.
    planar = (spec.channels, spec.image_size, spec.image_size)
    batches = [_read_batch(root / name, spec.label_key, int(np.prod(planar))) for name in files]
    rows = np.concatenate([data for data, _ in batches])
    labels = np.concatenate([labels for _, labels in batches])
    images = np.ascontiguousarray(rows.reshape(-1, *planar).transpose(0, 2, 3, 1))
    return Split(images=images, labels=labels)


def _read_batch(path: Path, label_key: str, row: int) -> tuple[np.ndarray, np.ndarray]:
    """One batch file's checked (n, row) uint8 rows (row = 3072 for CIFAR) and (n,) int64 labels."""
    batch = _text_keys(load_pickle(path), path)
    if not isinstance(batch, dict):
        raise VitlabError(f"{path}: expected a dict of 'data' and {label_key!r}, got {type(batch).__name__}")
    for key in ("data", label_key):
        if key not in batch:
            raise VitlabError(f"{path}: no {key!r} entry (keys: {', '.join(map(str, batch))})")
    data = batch["data"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = f"dtype {data.dtype}" if isinstance(data, np.ndarray) else type(data).__name__
        raise VitlabError(f"{path}: 'data' is {kind}, expected a uint8 array")
    if data.ndim != 2 or data.shape[1] != row:
        raise VitlabError(f"{path}: 'data' has shape {data.shape}, expected (n, {row})")
    try:
        labels = np.asarray(batch[label_key])
    except ValueError:  # ragged nested lists
        labels = np.asarray(None)
    if labels.ndim != 1 or (labels.size and labels.dtype.kind not in "iu"):
        raise VitlabError(f"{path}: {label_key!r} is not a list of integers ({labels.dtype}, {labels.shape})")
    if len(labels) != len(data):
        raise VitlabError(f"{path}: {len(data)} images but {len(labels)} labels in {label_key!r}")
    return data, labels.astype(np.int64)


def _text(value: Any) -> Any:
    """Bytes as the str a Python 2 pickle's 8-bit string loads as (latin1); anything else unchanged."""
    return value.decode("latin-1") if isinstance(value, bytes) else value


def _text_keys(loaded: Any, path: Path) -> Any:
    """A dict with its bytes keys as str: a file loaded with ``encoding="bytes"`` (as the CIFAR page shows)
    and pickled again by Python 3 has b"data", b"labels"... where the original has "data", "labels"..."""
    if not isinstance(loaded, dict):
        return loaded
    keys = {_text(key): value for key, value in loaded.items()}
    if len(keys) != len(loaded):
        raise VitlabError(f"{path}: the same key both as str and as bytes ({', '.join(map(repr, loaded))})")
    return keys


_READERS = {"cifar": _read_cifar, "idx": read_mnist}


def unofficial_file(root: str | os.PathLike[str], spec: DatasetSpec) -> str | None:
    """None when every file of ``spec`` under ``root`` (the folder holding them) has its official md5; else
    why the copy is not the official one: the first file missing or whose md5 differs, in one line."""
    if not spec.file_md5s:
        return f"{spec.name} has no official files to compare with"
    for name, official in spec.file_md5s.items():
        path = Path(root) / name
        if not path.is_file():
            return f"{name} is missing"
        actual = md5sum(path)
        if actual != official:
            return f"{name} has md5 {actual}, not the official {official}"
    return None


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
    """The download stage: fetch, verify, extract and parse the dataset, and save it to ``out_dir``.

    ``source`` None is the official copy (or the embedded sample): its archive, md5-checked, or for a
    dataset without one (MNIST) each file, md5-checked. Otherwise ``source`` is a URL or path of an archive
    (with ``spec.folder`` inside) or a local folder holding the files themselves. Every file is then compared
    with its official md5: a copy whose files are all official is accepted without ``md5`` and recorded as
    ``info["official"]``, its counts checked against ``spec``'s; any other archive needs ``md5``, the md5 of
    the archive itself. The official copy's counts (``spec``'s) are the expected ones unless given; for an
    unofficial ``source`` only the given ones (None: unchecked, here and by the validate stage).
    The verified archive (or MNIST's files) stays in ``raw_dir`` as a cache; extracted files are deleted.

    Raises VitlabError for an md5 mismatch, an unofficial copy without ``md5``, ``md5`` given for a folder,
    an official copy with other counts than ``spec``'s, or any file the readers refuse.
    """
    raw_dir = Path(raw_dir)
    raw_dir.mkdir(parents=True, exist_ok=True)
    url = spec.url if source is None else source
    md5 = spec.md5 if source is None else md5
    with extraction_folder(raw_dir) as tmp:
        root, archive = _obtain(spec, source, url, md5, raw_dir, tmp, progress)
        unofficial = unofficial_file(root, spec)
        if unofficial and md5 is None:
            if archive is None:  # a folder: there is no archive md5 to vouch for other files
                raise VitlabError(
                    f"{url}: not the official {spec.name} files ({unofficial}); a folder must hold the "
                    "official files: give another copy as an archive with data.md5"
                )
            archive.unlink()  # unverified: it must not pass for a cache
            raise VitlabError(
                f"{url}: data.md5 is required: not the official {spec.name} files ({unofficial}); "
                "set data.md5 to the archive's md5"
            )
        dataset = _READERS[spec.format](root, spec)
    if unofficial is None:
        _check_official_counts(dataset, spec, url)
    if source is None or unofficial is None:
        expected_train = spec.num_train if expected_train is None else expected_train
        expected_test = spec.num_test if expected_test is None else expected_test
    dataset.info.update(
        source=_portable(url),
        md5=md5.lower() if md5 else None,
        official=unofficial is None,
        expected_train=expected_train,
        expected_test=expected_test,
    )
    save_prepared(dataset, out_dir)
    return dataset


@contextlib.contextmanager
def extraction_folder(raw_dir: Path) -> Iterator[Path]:
    """A new hidden ``raw_dir/.extract-*`` folder to extract into, deleted on the way out; first, the ones
    that runs killed mid-extraction left behind (157 MB for the full CIFAR-10) are deleted.

    A folder in use is never deleted: every extraction holds a shared lock (``flock``) on ``raw_dir`` itself
    from before its folder exists until after it is gone, and the leftovers are removed only under the
    exclusive lock, which no other process can hold while one extracts (``dvc queue`` workers share the
    cache). The kernel drops a killed process's lock, so what it left is stale by then.
    """
    lock = os.open(raw_dir, os.O_RDONLY)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:  # another process is extracting: its folder is not stale
            pass
        else:
            for stale in raw_dir.glob(".extract-*"):
                shutil.rmtree(stale, ignore_errors=True)
        fcntl.flock(lock, fcntl.LOCK_SH)  # shared beside other extractions; waits out a cleaner, if any
        with tempfile.TemporaryDirectory(prefix=".extract-", dir=raw_dir) as tmp:
            yield Path(tmp)
    finally:
        os.close(lock)  # releases the lock


def _obtain(
    spec: DatasetSpec, source: str | None, url: str, md5: str | None, raw_dir: Path, tmp: Path, progress: bool
) -> tuple[Path, Path | None]:
    """The folder holding the dataset's files, and the archive they came from (None: no archive)."""
    if source is None and spec.md5 is None:  # published as separate files: each fetched with its md5
        folder = raw_dir / spec.folder
        for name in spec.files:
            fetch(url + name, folder / name, spec.file_md5s[name], progress=progress)
        return folder, None
    if source is not None and Path(source).is_dir():
        if md5 is not None:
            raise VitlabError(
                f"{source}: a folder, not an archive: data.md5 (an archive's md5) does not apply"
            )
        return Path(source), None
    archive = fetch(url, raw_dir / (source_name(url) or spec.archive_name), md5, progress=progress)
    return extract_archive(archive, tmp / "archive") / spec.folder, archive


def _check_official_counts(dataset: PreparedDataset, spec: DatasetSpec, url: str) -> None:
    for split, found, promised in (
        ("train", len(dataset.train), spec.num_train),
        ("test", len(dataset.test), spec.num_test),
    ):
        if found != promised:
            raise VitlabError(
                f"{url}: {found} {split} images in the official {spec.name} files, not {promised}"
            )


def _portable(source: str) -> str:
    """``source``, with a path inside the repository (the embedded sample's) or the project (found by
    ``local_source`` from an experiment's temporary copy) made relative to it."""
    # The prepared meta.json is a pipeline output: a machine-specific path in it would differ on every clone.
    for root in (SAMPLE_DIR.parents[1], project_root()):
        with contextlib.suppress(ValueError):
            return Path(source).relative_to(root).as_posix()
    return source
