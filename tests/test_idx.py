"""MNIST: idx parsing (vitlab.data.idx) and the download stage's handling of its official files and copies."""

import dataclasses
import gzip

import numpy as np
import pytest
from idx_fakes import MNIST, idx_bytes, make_mnist_archive, make_mnist_folder

from vitlab.data.archive import prepare_dataset
from vitlab.data.idx import IMAGES_MAGIC, LABELS_MAGIC, read_idx, read_mnist
from vitlab.data.prepared import load_prepared
from vitlab.errors import VitlabError

IMAGES, LABELS = MNIST.train_files


def _error(path, magic):
    with pytest.raises(VitlabError) as error:
        read_idx(path, magic)
    message = str(error.value)
    assert "\n" not in message and message.startswith(str(path))
    return message


def test_read_idx_reads_images_and_labels(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    (tmp_path / "i.gz").write_bytes(gzip.compress(idx_bytes(images)))
    (tmp_path / "l.gz").write_bytes(gzip.compress(idx_bytes(np.array([7, 1], np.uint8))))
    np.testing.assert_array_equal(read_idx(tmp_path / "i.gz", IMAGES_MAGIC), images)
    assert read_idx(tmp_path / "l.gz", LABELS_MAGIC).tolist() == [7, 1]


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (gzip.compress(idx_bytes(np.zeros(5, np.uint8)), mtime=0), "idx magic number 2049, expected 2051"),
        (
            gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8)), mtime=0)[:-30],
            "corrupt or truncated gzip file",
        ),
        (idx_bytes(np.zeros((2, 28, 28), np.uint8)), "corrupt or truncated gzip file"),  # not gzipped
        (gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8))[:-5], mtime=0), "the file holds 1563"),
        (gzip.compress(idx_bytes(np.zeros((2, 28, 28), np.uint8)) + b"x", mtime=0), "the file holds 1569"),
        (gzip.compress(b"\x00\x00\x08\x03\x00", mtime=0), "too short for an idx header of 16"),
        (b"", "0 bytes, too short for an idx header"),
    ],
)
def test_broken_idx_files_are_one_line_errors_naming_the_file(tmp_path, payload, expected):
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(payload)
    assert expected in _error(path, IMAGES_MAGIC)


def test_a_missing_idx_file_is_named(tmp_path):
    assert "missing" in _error(tmp_path / "t10k-labels-idx1-ubyte.gz", LABELS_MAGIC)


def test_read_mnist_gives_grayscale_hwc_images_and_digit_names(tmp_path):
    make_mnist_folder(tmp_path, n_train=30, n_test=10)
    dataset = read_mnist(tmp_path, MNIST)
    assert dataset.train.images.shape == (30, 28, 28, 1) and dataset.train.images.dtype == np.uint8
    assert dataset.test.labels.dtype == np.int64 and len(dataset.test) == 10
    assert dataset.class_names == [str(d) for d in range(10)] and dataset.train.geometry == (28, 1)
    raw = np.frombuffer(gzip.decompress((tmp_path / IMAGES).read_bytes()), np.uint8, offset=16)
    np.testing.assert_array_equal(dataset.train.images[3, :, :, 0], raw.reshape(30, 28, 28)[3])


def _replace(name, payload):
    return lambda files: files.__setitem__(name, gzip.compress(payload))


@pytest.mark.parametrize(
    ("mutate", "file", "expected"),
    [
        (_replace(IMAGES, idx_bytes(np.zeros((30, 27, 27), np.uint8))), IMAGES, "images of 27x27 pixels"),
        (_replace(LABELS, idx_bytes(np.zeros(29, np.uint8))), LABELS, "29 labels for the 30 images"),
        (_replace(LABELS, idx_bytes(np.full(30, 10, np.uint8))), LABELS, "label 10 outside 0-9"),
        (
            _replace(LABELS, idx_bytes(np.zeros((30, 28, 28), np.uint8))),
            LABELS,
            "magic number 2051, expected 2049",
        ),
    ],
)
def test_inconsistent_mnist_files_are_one_line_errors_naming_the_file(tmp_path, mutate, file, expected):
    make_mnist_folder(tmp_path, n_train=30, n_test=10, mutate=mutate)
    with pytest.raises(VitlabError) as error:
        read_mnist(tmp_path, MNIST)
    message = str(error.value)
    assert expected in message and str(tmp_path / file) in message and "\n" not in message


# --- the download stage: official md5s of each file -------------------------------------------------------


def _official(md5s, n_train=60, n_test=20):
    """MNIST's spec with the fakes' md5s as the official ones (and their counts)."""
    return dataclasses.replace(MNIST, file_md5s=md5s, num_train=n_train, num_test=n_test)


def test_an_official_copy_in_an_archive_needs_no_md5_and_is_recorded_as_official(tmp_path):
    spec = _official(make_mnist_folder(tmp_path / "files"))
    make_mnist_archive(tmp_path / "mnist-full.tar.gz")  # repacked: the same files, another archive md5
    dataset = prepare_dataset(
        spec, str(tmp_path / "mnist-full.tar.gz"), None, tmp_path / "raw", tmp_path / "p"
    )
    assert dataset.info["official"] is True and dataset.info["md5"] is None
    assert (dataset.info["expected_train"], dataset.info["expected_test"]) == (60, 20)  # the official counts
    saved = load_prepared(tmp_path / "p")
    assert saved.train.images.shape == (60, 28, 28, 1) and saved.info["official"] is True


def test_an_official_copy_in_a_folder_is_read_in_place(tmp_path):
    spec = _official(make_mnist_folder(tmp_path / "mnist"))
    dataset = prepare_dataset(spec, str(tmp_path / "mnist"), None, tmp_path / "raw", tmp_path / "p")
    assert dataset.info["official"] is True and len(dataset.test) == 20
    assert list((tmp_path / "raw").iterdir()) == []  # nothing to cache
    with pytest.raises(VitlabError, match=r"a folder, not an archive: data\.md5"):
        prepare_dataset(spec, str(tmp_path / "mnist"), "0" * 32, tmp_path / "raw", tmp_path / "p")


def test_the_official_download_fetches_each_file_with_its_md5(tmp_path):
    md5s = make_mnist_folder(tmp_path / "mirror")
    spec = dataclasses.replace(_official(md5s), url=(tmp_path / "mirror").as_uri() + "/")
    dataset = prepare_dataset(spec, None, None, tmp_path / "raw", tmp_path / "p", progress=False)
    assert dataset.info["official"] is True and dataset.info["source"] == spec.url
    assert sorted(p.name for p in (tmp_path / "raw" / "mnist").iterdir()) == sorted(md5s)  # the cache
    broken = dataclasses.replace(spec, file_md5s=md5s | {LABELS: "0" * 32})
    with pytest.raises(VitlabError, match=f"{LABELS}: md5 mismatch"):
        prepare_dataset(broken, None, None, tmp_path / "raw2", tmp_path / "p2", progress=False)
    assert not (tmp_path / "p2").exists()


def test_an_unofficial_copy_needs_data_md5(tmp_path):
    spec = _official(make_mnist_folder(tmp_path / "official"))
    archive = tmp_path / "subset.tar.gz"
    md5 = make_mnist_archive(archive, n_train=40)  # other files: not the official ones
    with pytest.raises(VitlabError) as error:
        prepare_dataset(spec, str(archive), None, tmp_path / "raw", tmp_path / "p")
    message = str(error.value)
    assert "data.md5 is required: not the official mnist files (train-images-idx3-ubyte.gz has md5" in message
    assert "\n" not in message and not (tmp_path / "p").exists()
    assert not (tmp_path / "raw" / archive.name).exists()  # the unverified copy is no cache
    dataset = prepare_dataset(spec, str(archive), md5, tmp_path / "raw", tmp_path / "p")
    assert dataset.info["official"] is False and dataset.info["expected_train"] is None  # as for CIFAR
    make_mnist_folder(tmp_path / "unofficial", n_train=40)
    with pytest.raises(VitlabError, match="a folder must hold the official files"):
        prepare_dataset(spec, str(tmp_path / "unofficial"), None, tmp_path / "raw", tmp_path / "p")


def test_official_files_with_other_counts_than_promised_are_refused(tmp_path):
    spec = _official(make_mnist_folder(tmp_path / "mnist"), n_train=60_000)
    with pytest.raises(VitlabError, match="60 train images in the official mnist files, not 60000"):
        prepare_dataset(spec, str(tmp_path / "mnist"), None, tmp_path / "raw", tmp_path / "p")
