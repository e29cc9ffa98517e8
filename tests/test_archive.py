import codecs
import io
import json
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from cifar_fakes import as_bytes, dump_pickle, make_cifar_archive, official_files, write_tar

from vitlab.data.archive import extract_archive, load_pickle, parse_cifar, prepare_dataset
from vitlab.data.download import md5sum
from vitlab.data.prepared import load_prepared
from vitlab.data.sources import DATASETS
from vitlab.errors import VitlabError

SAMPLE = DATASETS["cifar10-sample"]
SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
needs_shared_data = pytest.mark.skipif(
    not SHARED_DATA.is_dir(), reason=f"the real CIFAR subsets are not at {SHARED_DATA}"
)


def _one_line_naming(error: pytest.ExceptionInfo, name: str) -> str:
    message = str(error.value)
    assert "\n" not in message
    assert name in message
    return message


# --- extraction ------------------------------------------------------------------------------------------


def test_extract_archive_extracts_into_place_and_replaces_an_old_target(tmp_path):
    archive = tmp_path / "a.tar.gz"
    write_tar(archive, {"top/file.txt": b"new"})
    target = tmp_path / "out"
    (target / "stale").mkdir(parents=True)
    assert extract_archive(archive, target) == target
    assert (target / "top" / "file.txt").read_bytes() == b"new"
    assert not (target / "stale").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.tar.gz", "out"]  # no temporary folders left


def _tar_with(path: Path, *members: tarfile.TarInfo) -> None:
    with tarfile.open(path, "w:gz") as tar:
        for member in members:
            payload = b"evil" if member.isfile() else None
            if payload is not None:
                member.size = len(payload)
            tar.addfile(member, io.BytesIO(payload) if payload is not None else None)


def _member(name: str, kind: bytes = tarfile.REGTYPE, linkname: str = "") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, linkname
    return info


@pytest.mark.parametrize(
    "members",
    [
        lambda root: [_member("top/ok"), _member("../evil")],
        lambda root: [_member(str(root / "evil"))],
        lambda root: [_member("top/link", tarfile.SYMTYPE, "../../evil")],
        lambda root: [_member("top/link", tarfile.SYMTYPE, str(root)), _member("top/link/evil")],
        lambda root: [_member("top/dev", tarfile.CHRTYPE)],
    ],
    ids=["dotdot", "absolute", "symlink-up", "symlink-absolute", "device"],
)
def test_unsafe_members_are_refused_and_nothing_is_written(tmp_path, members):
    root = tmp_path / "root"
    root.mkdir()
    archive = root / "a.tar.gz"
    _tar_with(archive, *members(root))
    target = root / "sub" / "out"
    with pytest.raises(VitlabError, match="refused unsafe archive member") as caught:
        extract_archive(archive, target)
    _one_line_naming(caught, str(archive))
    assert sorted(os.listdir(root)) == ["a.tar.gz", "sub"]
    assert os.listdir(root / "sub") == []  # neither the target nor a half-extracted temporary folder
    assert not (tmp_path / "evil").exists()


@pytest.mark.parametrize("damage", ["truncated", "not-gzip", "empty"])
def test_corrupt_archives_raise_naming_the_archive_and_leave_no_target(tmp_path, damage):
    archive = tmp_path / "a.tar.gz"
    make_cifar_archive(archive)
    data = archive.read_bytes()
    archive.write_bytes(
        {"truncated": data[: len(data) // 2], "not-gzip": b"<html>404</html>", "empty": b""}[damage]
    )
    target = tmp_path / "out"
    with pytest.raises(VitlabError, match="corrupt or truncated archive") as caught:
        extract_archive(archive, target)
    _one_line_naming(caught, str(archive))
    assert sorted(os.listdir(tmp_path)) == ["a.tar.gz"]


# --- the restricted unpickler -----------------------------------------------------------------------------


class _RunsACommand:
    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


class _Evals:
    def __reduce__(self):
        return (eval, ("1 + 1",))


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_pickle_that_calls_os_system_is_refused_without_running_it(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": _RunsACommand(f"touch {marker}")}, protocol=protocol))
    with pytest.raises(VitlabError, match=r"refused to load global (posix|os)\.system") as caught:
        load_pickle(path)
    _one_line_naming(caught, str(path))
    assert not marker.exists()


def test_only_the_numpy_array_globals_are_allowed(tmp_path):
    path = tmp_path / "meta"
    path.write_bytes(pickle.dumps([_Evals()], protocol=2))
    with pytest.raises(VitlabError, match=r"refused to load global (__builtin__|builtins)\.eval"):
        load_pickle(path)
    array = np.arange(12, dtype=np.uint8).reshape(3, 4)
    path.write_bytes(pickle.dumps({"data": array, "labels": [1, 2, 3]}, protocol=4))
    loaded = load_pickle(path)
    assert loaded["labels"] == [1, 2, 3]
    np.testing.assert_array_equal(loaded["data"], array)


def test_a_hostile_batch_inside_an_archive_is_refused_by_prepare(tmp_path):
    marker = tmp_path / "pwned"
    hostile = pickle.dumps(_RunsACommand(f"touch {marker}"), protocol=2)
    archive = tmp_path / "c.tar.gz"
    md5 = make_cifar_archive(archive, mutate=lambda files: files.update(data_batch_2=hostile))
    with pytest.raises(VitlabError, match="data_batch_2: refused to load global"):
        prepare_dataset(DATASETS["cifar10"], str(archive), md5, tmp_path / "raw", tmp_path / "prepared")
    assert not marker.exists()
    assert not (tmp_path / "prepared").exists()


# Every writer of the official layout: Python 2 (which wrote the official files: 8-bit strings, numpy 1) and
# Python 3 with str keys, or with the bytes keys a file loaded with encoding="bytes" has, by numpy 2 and 1.
_WRITERS = {
    "python2": lambda payload, protocol: dump_pickle(as_bytes(payload), protocol, python2=True),
    "str-keys": lambda payload, protocol: dump_pickle(payload, protocol),
    "bytes-keys": lambda payload, protocol: dump_pickle(as_bytes(payload), protocol),
    "str-keys-numpy1": lambda payload, protocol: dump_pickle(payload, protocol, numpy1=True),
    "bytes-keys-numpy1": lambda payload, protocol: dump_pickle(as_bytes(payload), protocol, numpy1=True),
}


@pytest.mark.parametrize(
    ("writer", "protocol"),
    [(w, p) for w in _WRITERS for p in range(6) if w != "python2" or p <= 2],
)
def test_every_pickle_protocol_of_the_official_layout_loads_for_both_datasets(tmp_path, writer, protocol):
    for spec in (DATASETS["cifar10"], DATASETS["cifar100"]):
        files = official_files(spec, n_train=12, n_test=6)
        folder = tmp_path / spec.name
        (folder / spec.folder).mkdir(parents=True)
        for name, payload in files.items():
            (folder / spec.folder / name).write_bytes(_WRITERS[writer](payload, protocol))

        # The arrays come back equal, dtype and shape included, whatever the writer.
        first = spec.train_files[0]
        loaded = load_pickle(folder / spec.folder / first)
        data = loaded["data" if "data" in loaded else b"data"]
        assert data.dtype == np.uint8 and data.shape == files[first]["data"].shape
        np.testing.assert_array_equal(data, files[first]["data"])

        dataset = parse_cifar(folder, spec)
        for split, names in (("train", spec.train_files), ("test", spec.test_files)):
            rows = np.concatenate([files[name]["data"] for name in names])
            labels = [label for name in names for label in files[name][spec.label_key]]
            np.testing.assert_array_equal(
                getattr(dataset, split).images, rows.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
            )
            assert getattr(dataset, split).labels.tolist() == labels
        assert dataset.class_names == files[spec.meta_file][spec.names_key]  # str, whatever the writer


def test_a_cifar_archive_repickled_by_python3_at_protocol_2_prepares(tmp_path):
    # The case: the official batches loaded with encoding="bytes" and written again by Python 3.
    def repickle(files):
        files.update({name: dump_pickle(as_bytes(payload), 2) for name, payload in files.items()})

    archive = tmp_path / "c.tar.gz"
    md5 = make_cifar_archive(archive, DATASETS["cifar100"], n_train=30, n_test=10, mutate=repickle)
    dataset = prepare_dataset(
        DATASETS["cifar100"], str(archive), md5, tmp_path / "raw", tmp_path / "p", progress=False
    )
    assert (len(dataset.train), len(dataset.test), dataset.class_names[1]) == (30, 10, "class_1")


class _Reduces:
    """Pickles as ``function(*args)``: what a tampered pickle can ask the unpickler to call."""

    def __init__(self, function, *args) -> None:
        self.function, self.args = function, args

    def __reduce__(self):
        return self.function, self.args


class _Spy:
    """A codec that records every use: proof that a refused ``_codecs.encode`` never ran."""

    def __init__(self) -> None:
        self.calls = []

    def search(self, name):
        if name != "vitlab_spy":
            return None
        return codecs.CodecInfo(lambda text, errors="strict": self.calls.append(text) or (b"", 0), None)


@pytest.fixture
def spy_codec():
    spy = _Spy()
    codecs.register(spy.search)
    yield spy
    codecs.unregister(spy.search)


_SOLID = np.arange(6, dtype=np.uint8)
_RECONSTRUCT = np.empty(0).__reduce__()[0]
_FROMBUFFER = _SOLID.__reduce_ex__(5)[0]


_CALL = "refused to call "
_GLOBAL = "refused to load global "


@pytest.mark.parametrize(
    ("hostile", "refusal"),
    [
        (_Reduces(codecs.encode, "x", "vitlab_spy"), _CALL + r"_codecs\.encode\(str, 'vitlab_spy'\)"),
        (_Reduces(codecs.encode, "x", "utf-16"), _CALL + r"_codecs\.encode\(str, 'utf-16'\)"),
        (_Reduces(codecs.encode, "x", "rot13"), _CALL + r"_codecs\.encode\(str, 'rot13'\)"),
        (_Reduces(codecs.encode, b"x\x9c", "zlib"), _CALL + r"_codecs\.encode\(bytes, 'zlib'\)"),
        (
            _Reduces(codecs.encode, "x", "latin1", "strict"),
            _CALL + r"_codecs\.encode\(str, 'latin1', 'strict'\)",
        ),
        (_Reduces(codecs.decode, b"x", "zlib"), _GLOBAL + r"_codecs\.decode"),
        (_Reduces(bytes, 10**12), _CALL + r"bytes\(1000000000000,\)"),
        (_Reduces(bytearray, 10**12), _GLOBAL + r"(__builtin__|builtins)\.bytearray"),
        (
            _Reduces(_RECONSTRUCT, np.ndarray, (10**12,), b"b"),
            _CALL + r"_reconstruct\(numpy\.ndarray, \(10+,\)",
        ),
        (_Reduces(_FROMBUFFER, "text", np.dtype("u1"), (4,), "C"), _CALL + "_frombuffer with str"),
        (
            _Reduces(_FROMBUFFER, b"12345678", np.dtype("O"), (1,), "C"),
            _CALL + "_frombuffer with bytes, dtype",
        ),
        (_Reduces(np.frombuffer, b"1234"), _GLOBAL + r"numpy\.frombuffer"),
        (_Reduces(np.load, "/etc/passwd"), _GLOBAL + r"numpy\.load"),
        (_Reduces(getattr, 1, "real"), _GLOBAL + r"(__builtin__|builtins)\.getattr"),
    ],
    ids=[
        "encode-spy-codec",
        "encode-utf16",
        "encode-rot13",
        "encode-bytes-zlib",
        "encode-three-args",
        "decode",
        "bytes-of-a-size",
        "bytearray",
        "reconstruct-a-shape",
        "frombuffer-str",
        "frombuffer-objects",
        "numpy-frombuffer",
        "numpy-load",
        "getattr",
    ],
)
@pytest.mark.parametrize("protocol", [2, 5])
def test_allowed_globals_refuse_every_call_no_writer_makes(tmp_path, spy_codec, hostile, refusal, protocol):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps({"data": hostile}, protocol=protocol))
    with pytest.raises(VitlabError, match=refusal) as caught:
        load_pickle(path)
    _one_line_naming(caught, str(path))
    assert spy_codec.calls == []


def test_numpy_ndarray_itself_is_never_called(tmp_path):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(_Reduces(np.ndarray, (10**6, 10**6)), protocol=2))
    with pytest.raises(VitlabError, match=r"not a valid CIFAR pickle .*not callable"):
        load_pickle(path)


def test_a_key_both_as_str_and_as_bytes_is_an_error(tmp_path):
    files = official_files(n_train=5, n_test=5)
    files["data_batch_1"][b"data"] = files["data_batch_1"]["data"]
    (tmp_path / "cifar-10-batches-py").mkdir()
    for name, payload in files.items():
        (tmp_path / "cifar-10-batches-py" / name).write_bytes(pickle.dumps(payload, 2))
    with pytest.raises(VitlabError, match="the same key both as str and as bytes") as caught:
        parse_cifar(tmp_path, DATASETS["cifar10"])
    _one_line_naming(caught, "cifar-10-batches-py/data_batch_1")


# --- parsing ----------------------------------------------------------------------------------------------


def _set(batch: str, key: str, value):
    return lambda files: files[batch].__setitem__(key, value(files[batch][key]))


@pytest.mark.parametrize(
    ("mutate", "file", "problem"),
    [
        (lambda files: files.pop("data_batch_3"), "data_batch_3", "missing from the archive"),
        (_set("data_batch_2", "data", lambda d: d.reshape(-1, 1536)), "data_batch_2", r"shape \(40, 1536\)"),
        (_set("data_batch_1", "data", lambda d: d.astype(np.float32)), "data_batch_1", "dtype float32"),
        (_set("data_batch_1", "data", lambda d: d.tolist()), "data_batch_1", "'data' is list"),
        (_set("test_batch", "labels", lambda labels: labels[:-1]), "test_batch", "20 images but 19 labels"),
        (
            _set("test_batch", "labels", lambda labels: [str(x) for x in labels]),
            "test_batch",
            "not a list of int",
        ),
        (lambda files: files["test_batch"].pop("labels"), "test_batch", "no 'labels' entry"),
        (lambda files: files.update(data_batch_4=[1, 2]), "data_batch_4", "expected a dict"),
        (lambda files: files.update(data_batch_5=b"<html>"), "data_batch_5", "not a valid CIFAR pickle"),
        (_set("batches.meta", "label_names", lambda names: names[:9]), "batches.meta", "9 class names"),
    ],
    ids=[
        "missing-file",
        "shape",
        "dtype",
        "not-array",
        "label-count",
        "label-type",
        "no-labels",
        "not-dict",
        "garbage",
        "class-names",
    ],
)
def test_malformed_batches_raise_naming_the_file_and_the_problem(tmp_path, mutate, file, problem):
    archive = tmp_path / "c.tar.gz"
    make_cifar_archive(archive, n_train=100, n_test=20, mutate=mutate)
    folder = extract_archive(archive, tmp_path / "x")
    with pytest.raises(VitlabError, match=problem) as caught:
        parse_cifar(folder, DATASETS["cifar10"])
    _one_line_naming(caught, f"cifar-10-batches-py/{file}")


def _hand_decoded(row: np.ndarray) -> np.ndarray:
    """An official row as (32, 32, 3): the first 1024 bytes are the red plane, row-major, then green, blue."""
    image = np.zeros((32, 32, 3), np.uint8)
    for channel in range(3):
        for y in range(32):
            for x in range(32):
                image[y, x, channel] = row[channel * 1024 + y * 32 + x]
    return image


@pytest.fixture(scope="module")
def sample(tmp_path_factory):
    """The embedded sample, prepared once: (prepared dataset, the folder it came from, the raw batches)."""
    tmp = tmp_path_factory.mktemp("sample")
    folder = extract_archive(SAMPLE.url, tmp / "extracted")
    dataset = prepare_dataset(SAMPLE, None, None, tmp / "raw", tmp / "prepared", progress=False)
    return dataset, tmp, folder


def test_the_embedded_sample_parses_to_its_promised_counts_in_hwc_order(sample):
    dataset, _, folder = sample
    assert (len(dataset.train), len(dataset.test), dataset.num_classes) == (2250, 500, 10)
    assert dataset.train.images.shape == (2250, 32, 32, 3) and dataset.train.images.dtype == np.uint8
    assert dataset.test.labels.dtype == np.int64
    assert dataset.class_names[:3] == ["airplane", "automobile", "bird"]

    # Decoded independently of the code under test: the standard unpickler on our own trusted file.
    with open(folder / SAMPLE.folder / "test_batch", "rb") as handle:
        raw_test = pickle.load(handle, encoding="latin1")
    np.testing.assert_array_equal(dataset.test.images[7], _hand_decoded(raw_test["data"][7]))
    assert dataset.test.labels.tolist() == raw_test["labels"]
    with open(folder / SAMPLE.folder / "data_batch_2", "rb") as handle:
        raw_batch_2 = pickle.load(handle, encoding="latin1")
    assert dataset.train.labels[450:900].tolist() == raw_batch_2["labels"]  # batches kept in file order
    np.testing.assert_array_equal(dataset.train.images[450], _hand_decoded(raw_batch_2["data"][0]))


def test_prepare_dataset_saves_the_sample_with_its_provenance(sample):
    dataset, tmp, _ = sample
    assert dataset.info == {
        "dataset": "cifar10-sample",
        "num_classes": 10,
        "source": "data/sample/cifar-10-sample-python.tar.gz",
        "md5": SAMPLE.md5,
        "official": False,  # the sample's files are not CIFAR-10's: its archive md5 vouches for them
        "expected_train": 2250,
        "expected_test": 500,
    }
    saved = load_prepared(tmp / "prepared")
    np.testing.assert_array_equal(saved.train.images, dataset.train.images)
    np.testing.assert_array_equal(saved.test.labels, dataset.test.labels)
    assert json.loads((tmp / "prepared" / "meta.json").read_text())["class_names"] == dataset.class_names
    assert os.listdir(tmp / "raw") == [SAMPLE.archive_name]  # the cache stays; the extraction is gone
    assert md5sum(tmp / "raw" / SAMPLE.archive_name) == SAMPLE.md5


def test_prepare_dataset_from_another_source_expects_only_the_given_counts(tmp_path):
    archive = tmp_path / "mirror.tar.gz"
    md5 = make_cifar_archive(archive, DATASETS["cifar100"], n_train=300, n_test=100)
    spec = DATASETS["cifar100"]
    dataset = prepare_dataset(spec, archive.as_uri(), md5, tmp_path / "raw", tmp_path / "p", progress=False)
    assert (len(dataset.train), len(dataset.test), dataset.num_classes) == (300, 100, 100)
    assert dataset.info["expected_train"] is None and dataset.info["expected_test"] is None
    assert dataset.info["source"] == archive.as_uri()
    assert os.listdir(tmp_path / "raw") == ["mirror.tar.gz"]
    dataset = prepare_dataset(spec, str(archive), md5, tmp_path / "raw", tmp_path / "p", False, 300, 99)
    assert (dataset.info["expected_train"], dataset.info["expected_test"]) == (300, 99)


def test_prepare_dataset_with_a_wrong_md5_writes_no_prepared_data(tmp_path):
    archive = tmp_path / "mirror.tar.gz"
    make_cifar_archive(archive)
    with pytest.raises(VitlabError, match="md5 mismatch"):
        prepare_dataset(
            DATASETS["cifar10"], str(archive), "0" * 32, tmp_path / "raw", tmp_path / "p", progress=False
        )
    assert not (tmp_path / "p").exists()


@needs_shared_data
def test_the_real_cifar100_subset_parses_with_its_fine_labels(tmp_path):
    dataset = prepare_dataset(
        DATASETS["cifar100"],
        str(SHARED_DATA / "cifar-100-subset-python.tar.gz"),
        "6915434a66f48efbf1b9174138f9965c",
        tmp_path / "raw",
        tmp_path / "p",
        progress=False,
    )
    assert (len(dataset.train), len(dataset.test), dataset.num_classes) == (1117, 916, 100)
    assert dataset.class_names[:2] == ["apple", "aquarium_fish"]
    assert set(dataset.train.labels.tolist()) == set(range(100)) == set(dataset.test.labels.tolist())
    assert dataset.test.images.shape == (916, 32, 32, 3)


@needs_shared_data
def test_the_real_cifar10_subset_trusts_the_arrays_not_the_meta_counts(tmp_path):
    # Its batches lack 'filenames', and batches.meta still claims 10000 images per batch.
    dataset = prepare_dataset(
        DATASETS["cifar10"],
        (SHARED_DATA / "cifar-10-subset-python.tar.gz").as_uri(),
        "91ae8aa50275d155e103205bccbd1642",
        tmp_path / "raw",
        tmp_path / "p",
        progress=False,
    )
    assert (len(dataset.train), len(dataset.test)) == (5482, 1017)
    assert np.bincount(dataset.train.labels).tolist() == [542, 571, 531, 530, 567, 527, 545, 553, 577, 539]
    assert np.bincount(dataset.test.labels).tolist() == [105, 93, 100, 104, 92, 87, 114, 102, 110, 110]


def test_a_killed_extractions_folder_is_removed_by_the_next_run_but_never_a_running_one(tmp_path):
    """A killed extraction left a hidden data/raw/.extract-* folder (157 MB for CIFAR-10) that no run removed;
    one in use by another process (a dvc queue worker sharing data/raw) must survive."""
    import fcntl

    raw = tmp_path / "raw"
    stale = raw / ".extract-killed"
    (stale / "archive" / "cifar-10-batches-py").mkdir(parents=True)
    (stale / "archive" / "cifar-10-batches-py" / "data_batch_1").write_bytes(b"x" * 1000)
    running = os.open(raw, os.O_RDONLY)  # another process, extracting right now, holds raw's shared lock
    try:
        fcntl.flock(running, fcntl.LOCK_SH)
        prepare_dataset(SAMPLE, None, None, raw, tmp_path / "prepared", progress=False)
        assert stale.exists()  # it could be that process's folder
    finally:
        os.close(running)
    prepare_dataset(SAMPLE, None, None, raw, tmp_path / "prepared", progress=False)
    assert not list(raw.glob(".extract-*"))
