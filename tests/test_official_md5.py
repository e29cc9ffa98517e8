"""The download stage's per-file md5 check on CIFAR copies: official files need no data.md5, others do."""

import dataclasses
import json

import pytest
from cifar_fakes import make_cifar_archive

from vitlab.data.archive import extract_archive, prepare_dataset, unofficial_file
from vitlab.data.download import md5sum
from vitlab.data.sources import DATASETS
from vitlab.errors import VitlabError
from vitlab.params import parse_params
from vitlab.stages import Layout, stage_function

CIFAR10 = DATASETS["cifar10"]


@pytest.fixture
def official(tmp_path, monkeypatch):
    """A fake CIFAR-10 archive whose files are made "official": the table holds their md5s (and counts)."""
    archive = tmp_path / "cifar-10-repacked.tar.gz"
    make_cifar_archive(archive, n_train=50, n_test=20)
    files = extract_archive(archive, tmp_path / "x") / CIFAR10.folder
    md5s = {name: md5sum(files / name) for name in CIFAR10.files}
    spec = dataclasses.replace(CIFAR10, file_md5s=md5s, num_train=50, num_test=20)
    monkeypatch.setitem(DATASETS, "cifar10", spec)
    return spec, archive


def test_the_official_md5s_are_torchvisions_for_every_file_each_dataset_reads():
    for spec in DATASETS.values():
        assert set(spec.file_md5s) in (set(), set(spec.files))
    assert CIFAR10.file_md5s["data_batch_1"] == "c99cafc152244af753f735de768cd75f"  # torchvision's CIFAR10
    assert DATASETS["cifar100"].file_md5s["train"] == "16019d7e3df5f24257cddd939b257f8d"


def test_a_repacked_official_copy_needs_no_md5_and_is_recorded_as_official(tmp_path, official):
    spec, archive = official
    dataset = prepare_dataset(spec, archive.as_uri(), None, tmp_path / "raw", tmp_path / "p", progress=False)
    assert dataset.info["official"] is True and dataset.info["md5"] is None
    assert (dataset.info["expected_train"], dataset.info["expected_test"]) == (50, 20)
    assert json.loads((tmp_path / "p" / "meta.json").read_text())["official"] is True
    # With its archive md5 given, too: both checks pass.
    dataset = prepare_dataset(spec, str(archive), md5sum(archive), tmp_path / "raw", tmp_path / "p", False)
    assert dataset.info["official"] is True and dataset.info["md5"] == md5sum(archive)


def test_one_unofficial_file_makes_data_md5_required(tmp_path, official):
    spec, _ = official
    archive = tmp_path / "subset.tar.gz"
    md5 = make_cifar_archive(archive, n_train=50, n_test=20, seed=1)  # other images: other md5s
    with pytest.raises(VitlabError) as error:
        prepare_dataset(spec, str(archive), None, tmp_path / "raw", tmp_path / "p", progress=False)
    message = str(error.value)
    assert message.startswith(
        f"{archive}: data.md5 is required: not the official cifar10 files (data_batch_1"
    )
    assert (
        "\n" not in message
        and not (tmp_path / "p").exists()
        and not (tmp_path / "raw" / archive.name).exists()
    )
    # With data.md5, exactly as before: accepted, not official, only the given counts expected.
    dataset = prepare_dataset(spec, str(archive), md5, tmp_path / "raw", tmp_path / "p", progress=False)
    assert dataset.info["official"] is False and dataset.info["expected_train"] is None


def test_unofficial_file_names_the_first_difference(tmp_path, official):
    spec, archive = official
    files = extract_archive(archive, tmp_path / "y") / spec.folder
    assert unofficial_file(files, spec) is None
    (files / "batches.meta").write_bytes(b"changed")
    assert unofficial_file(files, spec).startswith("batches.meta has md5 ")
    (files / "test_batch").unlink()
    assert unofficial_file(files, spec) == "test_batch is missing"
    assert (
        unofficial_file(files, DATASETS["cifar10-sample"])
        == "cifar10-sample has no official files to compare with"
    )


def test_the_download_stage_says_whether_the_copy_is_official(tmp_path, official, capsys):
    _, archive = official
    params = parse_params({"data": {"dataset": "cifar10", "source": str(archive)}})
    stage_function("download")(params, Layout.under(tmp_path))
    assert (
        "prepared cifar10 (official files, per-file md5s verified): 50 train, 20 test"
        in capsys.readouterr().out
    )
    subset = tmp_path / "subset.tar.gz"
    md5 = make_cifar_archive(subset, seed=1)
    params = parse_params({"data": {"dataset": "cifar10", "source": str(subset), "md5": md5}})
    stage_function("download")(params, Layout.under(tmp_path))
    assert "prepared cifar10 (archive md5 verified): 50 train" in capsys.readouterr().out
