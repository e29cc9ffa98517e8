"""The real full data sets in ../shared/data through the download stage's per-file md5 check (slow).

mnist-full.tar.gz and cifar-10-full-python.tar.gz hold the official files in archives of our own packing:
their archive md5s are not the official ones, so they are accepted only because every file inside has its
official md5. The CIFAR-10 test runs download, validate, train (1 epoch of cnn-small) and evaluate.
"""

import json
from pathlib import Path

import numpy as np
import pytest

from vitlab.data.archive import prepare_dataset
from vitlab.data.sources import DATASETS
from vitlab.params import parse_params
from vitlab.stages import Layout, stage_function
from vitlab.validate import validate_dataset

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
MNIST_FULL = SHARED_DATA / "mnist-full.tar.gz"
CIFAR10_FULL = SHARED_DATA / "cifar-10-full-python.tar.gz"

pytestmark = pytest.mark.slow


def _needs(path: Path) -> pytest.MarkDecorator:
    return pytest.mark.skipif(not path.is_file(), reason=f"the real data set is not at {path}")


@_needs(MNIST_FULL)
def test_the_real_mnist_is_official_28x28x1_and_passes_its_validation(tmp_path):
    spec = DATASETS["mnist"]
    dataset = prepare_dataset(spec, str(MNIST_FULL), None, tmp_path / "raw", tmp_path / "p", progress=False)
    assert dataset.info["official"] is True and dataset.info["md5"] is None
    assert dataset.train.images.shape == (60_000, 28, 28, 1) and dataset.test.images.shape == (
        10_000,
        28,
        28,
        1,
    )
    assert np.bincount(dataset.test.labels).tolist() == [
        980,
        1135,
        1032,
        1010,
        982,
        892,
        958,
        1028,
        974,
        1009,
    ]
    assert dataset.train.labels[:5].tolist() == [5, 0, 4, 1, 9]  # the official order
    result = validate_dataset(dataset, parse_params({"data": {"dataset": "mnist"}}).validate_, spec)
    assert result["success"], result["failed"]


@_needs(CIFAR10_FULL)
def test_the_full_cifar10_through_the_pipeline_is_recorded_as_official(tmp_path, capsys):
    params = parse_params(
        {
            "data": {"dataset": "cifar10", "source": str(CIFAR10_FULL)},
            "model": {"preset": "cnn-small"},
            "train": {"epochs": 1, "warmup_epochs": 0, "batch_size": 256, "device": "cpu"},
        }
    )
    layout = Layout.under(tmp_path)
    for name in ("download", "validate", "train", "evaluate"):
        stage_function(name)(params, layout)
    out = capsys.readouterr().out
    assert "prepared cifar10 (official files, per-file md5s verified): 50000 train, 10000 test images" in out
    meta = json.loads((layout.prepared_dir / "meta.json").read_text())
    assert (meta["official"], meta["md5"], meta["expected_train"], meta["expected_test"]) == (
        True,
        None,
        50_000,
        10_000,
    )
    validation = json.loads(layout.validation.read_text())
    assert validation["success"] and [validation["splits"][s]["rows"] for s in ("train", "test")] == [
        50_000,
        10_000,
    ]
    metrics = json.loads(layout.eval_metrics.read_text())
    assert metrics["test_images"] == 10_000 and metrics["test_accuracy"] > 0.2  # chance is 0.1
