import hashlib
import json
from dataclasses import replace

import numpy as np
import pytest
from cifar_fakes import make_dataset

from vitlab.data.archive import extract_archive, parse_cifar
from vitlab.data.prepared import PreparedDataset, Split
from vitlab.data.sources import DATASETS
from vitlab.errors import VitlabError
from vitlab.params import ValidateParams
from vitlab.validate import ensure_valid, image_table, validate_dataset

SAMPLE = DATASETS["cifar10-sample"]


@pytest.fixture(scope="module")
def sample_result(tmp_path_factory):
    folder = extract_archive(SAMPLE.url, tmp_path_factory.mktemp("sample") / "x")
    dataset = parse_cifar(folder, SAMPLE)
    dataset.info.update(expected_train=SAMPLE.num_train, expected_test=SAMPLE.num_test)
    return validate_dataset(dataset, ValidateParams())


def test_image_table_describes_each_image():
    images = np.zeros((4, 32, 32, 3), np.uint8)
    images[0] = 100
    images[1, :16] = 255  # top half white: mean 127.5, std 127.5
    images[3] = images[1]
    split = Split(images, np.array([0, 0, 0, 1]))
    table = image_table(split, num_classes=2, train_hashes={hashlib.sha1(images[1].tobytes()).hexdigest()})
    assert table["label"].tolist() == [0, 0, 0, 1]
    assert (table[["height", "width", "channels"]].to_numpy() == [32, 32, 3]).all()
    assert set(table["dtype"]) == {"uint8"}
    np.testing.assert_allclose(table["pixel_mean"], [100, 127.5, 0, 127.5])
    np.testing.assert_allclose(table["pixel_std"], [0, 127.5, 0, 127.5])
    assert table["duplicate_of_train"].tolist() == [False, True, False, True]
    np.testing.assert_allclose(table["class_share"], [1.5, 1.5, 1.5, 0.5])  # 3 and 1 images, 2 expected
    assert table["sha1"][0] == hashlib.sha1(images[0].tobytes()).hexdigest()


def test_the_real_sample_passes_every_expectation(sample_result):
    assert sample_result["success"] and sample_result["failed"] == []
    json.dumps(sample_result)  # the stage writes it as JSON
    train, test = sample_result["splits"]["train"], sample_result["splits"]["test"]
    assert (train["rows"], test["rows"]) == (2250, 500)
    assert sum(test["class_counts"]) == 500
    checked = {(e["expectation"], e["column"]) for e in test["expectations"]}
    assert {
        ("expect_column_values_to_be_between", "label"),
        ("expect_column_distinct_values_to_equal_set", "label"),
        ("expect_column_values_to_be_in_set", "height"),
        ("expect_column_values_to_be_in_set", "dtype"),
        ("expect_column_values_to_be_between", "class_share"),
        ("expect_column_mean_to_be_between", "pixel_mean"),
        ("expect_column_mean_to_be_between", "pixel_std"),
        ("expect_table_row_count_to_equal", None),
        ("expect_column_sum_to_be_between", "duplicate_of_train"),
    } <= checked
    assert ("expect_column_sum_to_be_between", "duplicate_of_train") not in {
        (e["expectation"], e["column"]) for e in train["expectations"]
    }
    rows = next(e for e in test["expectations"] if e["expectation"] == "expect_table_row_count_to_equal")
    assert rows["observed"] == 500 and rows["kwargs"] == {"value": 500}
    ensure_valid(sample_result)


def _relabel_test_class(ds: PreparedDataset, old: int, new: int) -> PreparedDataset:
    labels = np.where(ds.test.labels == old, new, ds.test.labels)
    return replace(ds, test=Split(ds.test.images, labels))


def _out_of_range_label(ds: PreparedDataset) -> PreparedDataset:
    labels = ds.train.labels.copy()
    labels[0] = 10
    return replace(ds, train=Split(ds.train.images, labels))


def _test_copies_train(ds: PreparedDataset) -> PreparedDataset:
    images = ds.test.images.copy()
    images[3] = ds.train.images[17]
    return replace(ds, test=Split(images, ds.test.labels))


def _dark(ds: PreparedDataset) -> PreparedDataset:
    return replace(ds, train=Split(ds.train.images // 4, ds.train.labels))


@pytest.mark.parametrize(
    ("damage", "failures"),
    [
        (
            _out_of_range_label,
            {
                "train: expect_column_values_to_be_between(label) observed "
                "{unexpected_count: 1, examples: [10]}",
                "train: expect_column_distinct_values_to_equal_set(label) observed "
                "{missing: [], unexpected: [10]}",
                "train: expect_column_values_to_be_between(class_share)",
            },
        ),
        (
            lambda ds: _relabel_test_class(ds, 3, 4),
            {
                "test: expect_column_distinct_values_to_equal_set(label) observed "
                "{missing: [3], unexpected: []}",
                "test: expect_column_values_to_be_between(class_share) observed {unexpected_count: 10",
            },
        ),
        (
            _test_copies_train,
            {"test: expect_column_sum_to_be_between(duplicate_of_train) observed 1, expected max_value=0"},
        ),
        (
            lambda ds: replace(ds, info=ds.info | {"expected_train": 2000}),
            {
                "train: expect_table_row_count_to_equal() observed 200, expected value=2000 "
                "(data.expected_train)"
            },
        ),
        (
            _dark,
            {
                "train: expect_column_mean_to_be_between(pixel_mean) observed 31.",
                "train: expect_column_mean_to_be_between(pixel_std) observed 18.",
            },
        ),
    ],
    ids=["label-out-of-range", "class-missing", "test-copies-train", "row-count", "too-dark"],
)
def test_each_broken_dataset_fails_naming_exactly_the_broken_expectations(damage, failures, capsys):
    dataset = damage(make_dataset(n_train=200, n_test=50, num_classes=10, info={"expected_test": 50}))
    result = validate_dataset(dataset, ValidateParams())
    assert not result["success"]
    assert len(result["failed"]) == len(failures)
    for failure in failures:
        assert any(line.startswith(failure) for line in result["failed"]), (failure, result["failed"])
    with pytest.raises(VitlabError, match=r"^data validation failed: ") as caught:
        ensure_valid(result)
    assert "\n" not in str(caught.value)
    assert all(line in str(caught.value) for line in result["failed"])
    assert "Calculating Metrics" not in capsys.readouterr().err  # GX's progress bars are off


def test_thresholds_are_applied():
    dataset = make_dataset(n_train=200, n_test=50)
    strict = ValidateParams(pixel_std_max=50.0, class_balance_tolerance=1.0)
    result = validate_dataset(dataset, strict)
    assert {line.split(" observed")[0] for line in result["failed"]} == {
        "train: expect_column_mean_to_be_between(pixel_std)",
        "test: expect_column_mean_to_be_between(pixel_std)",
    }
    allowed = ValidateParams(max_cross_split_duplicates=1)
    assert validate_dataset(_test_copies_train(dataset), allowed)["success"]
