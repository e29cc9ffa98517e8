"""Data validation of a prepared dataset with a Great Expectations suite, one row per image.

Each split becomes a table of per-image facts (label, shape, dtype, pixel statistics, content hash), and a
GX suite checks what the training code silently assumes: labels in range, every class present and roughly
balanced, uint8 images of the dataset's size and channels (32x32 RGB for CIFAR, 28x28 grayscale for MNIST)
with plausible pixel statistics, the promised image counts, and no test image that is a copy of a training
image. The thresholds are params.yaml's ``validate`` section, whose pixel ranges default to the dataset's.
"""

from __future__ import annotations

import hashlib
import logging
import warnings
from typing import Any

import numpy as np
import pandas as pd

from vitlab.data.prepared import PreparedDataset, Split
from vitlab.data.sources import DATASETS, DEFAULT_DATASET, DatasetSpec
from vitlab.errors import VitlabError
from vitlab.params import ValidateParams

_STATS_CHUNK = 4096  # images per float64 block: bounds the temporary memory of the pixel statistics


def image_table(split: Split, num_classes: int, train_hashes: set[str] | None = None) -> pd.DataFrame:
    """One row per image of ``split``: what the suite checks.

    ``pixel_mean``/``pixel_std`` are on the 0-255 scale; ``class_share`` is the count of the image's class
    divided by the count a perfectly balanced split would have; ``duplicate_of_train`` says whether the
    image's sha1 is in ``train_hashes`` (always False when none are given, e.g. for the train split itself).
    """
    images, n = split.images, len(split)
    flat = images.reshape(n, int(np.prod(images.shape[1:])))
    means, stds = np.empty(n), np.empty(n)
    for start in range(0, n, _STATS_CHUNK):
        block = flat[start : start + _STATS_CHUNK].astype(np.float64)
        means[start : start + len(block)] = block.mean(axis=1)
        stds[start : start + len(block)] = block.std(axis=1)
    hashes = [hashlib.sha1(row.tobytes(), usedforsecurity=False).hexdigest() for row in flat]
    _, inverse, counts = np.unique(split.labels, return_inverse=True, return_counts=True)
    _, height, width, channels = images.shape if images.ndim == 4 else (n, 0, 0, 0)
    return pd.DataFrame(
        {
            "label": split.labels,
            "height": height,
            "width": width,
            "channels": channels,
            "dtype": str(images.dtype),
            "pixel_mean": means,
            "pixel_std": stds,
            "sha1": hashes,
            "duplicate_of_train": [h in train_hashes for h in hashes] if train_hashes else False,
            "class_share": counts[inverse] / (n / num_classes) if n else np.empty(0),
        },
        index=pd.RangeIndex(n),
    )


def validate_dataset(
    ds: PreparedDataset, thresholds: ValidateParams, spec: DatasetSpec = DATASETS[DEFAULT_DATASET]
) -> dict[str, Any]:
    """Run the suite on the train and test splits of ``ds``, which should be dataset ``spec`` (its image size
    and channels are expected); return a JSON-able report.

    The report is ``{"success", "splits": {name: {"success", "rows", "class_counts", "expectations"}},
    "failed"}``, where each expectation is ``{"expectation", "column", "kwargs", "success", "observed"}``
    and ``failed`` names every failed expectation with what was observed, one string each.
    """
    train = image_table(ds.train, ds.num_classes)
    test = image_table(ds.test, ds.num_classes, train_hashes=set(train["sha1"]))
    tables = {"train": train, "test": test}
    runs = _run_suites(tables, ds.num_classes, thresholds, spec, ds.info)
    splits = {
        name: {
            "success": all(e["success"] for e in runs[name]),
            "rows": len(tables[name]),
            "class_counts": _class_counts(tables[name]["label"].to_numpy(), ds.num_classes),
            "expectations": runs[name],
        }
        for name in tables
    }
    failed = [_describe(name, e) for name in splits for e in splits[name]["expectations"] if not e["success"]]
    return {"success": not failed, "splits": splits, "failed": failed}


def ensure_valid(result: dict[str, Any]) -> None:
    """Raise VitlabError naming every failed expectation of a ``validate_dataset`` report."""
    if not result["success"]:
        raise VitlabError(f"data validation failed: {'; '.join(result['failed'])}")


def _class_counts(labels: np.ndarray, num_classes: int) -> list[int]:
    """Images per class, ignoring out-of-range labels (the suite reports those)."""
    return np.bincount(labels[(labels >= 0) & (labels < num_classes)], minlength=num_classes).tolist()


def _expectations(
    gx: Any, split: str, num_classes: int, t: ValidateParams, spec: DatasetSpec, info: dict
) -> list:
    e = gx.expectations
    checks = [
        e.ExpectColumnValuesToBeBetween(column="label", min_value=0, max_value=num_classes - 1),
        e.ExpectColumnDistinctValuesToEqualSet(column="label", value_set=list(range(num_classes))),
        e.ExpectColumnValuesToBeInSet(column="height", value_set=[spec.image_size]),
        e.ExpectColumnValuesToBeInSet(column="width", value_set=[spec.image_size]),
        e.ExpectColumnValuesToBeInSet(column="channels", value_set=[spec.channels]),
        e.ExpectColumnValuesToBeInSet(column="dtype", value_set=["uint8"]),
        e.ExpectColumnValuesToBeBetween(
            column="class_share",
            min_value=1 - t.class_balance_tolerance,
            max_value=1 + t.class_balance_tolerance,
        ),
        e.ExpectColumnMeanToBeBetween(
            column="pixel_mean", min_value=t.pixel_mean_min, max_value=t.pixel_mean_max
        ),
        e.ExpectColumnMeanToBeBetween(
            column="pixel_std", min_value=t.pixel_std_min, max_value=t.pixel_std_max
        ),
    ]
    expected_rows = info.get(f"expected_{split}")
    if expected_rows is not None:
        checks.append(e.ExpectTableRowCountToEqual(value=expected_rows))
    if split == "test":
        checks.append(
            e.ExpectColumnSumToBeBetween(column="duplicate_of_train", max_value=t.max_cross_split_duplicates)
        )
    return checks


def _run_suites(
    tables: dict[str, pd.DataFrame], num_classes: int, t: ValidateParams, spec: DatasetSpec, info: dict
) -> dict[str, list[dict[str, Any]]]:
    """Run one GX suite per table; return each table's expectation records, in a stable order."""
    # GX logs at INFO while importing and its own imports raise DeprecationWarnings: keep the stage's output
    # to what the user needs.
    logging.getLogger("great_expectations").setLevel(logging.WARNING)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        context = gx.get_context(mode="ephemeral")
        context.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        source = context.data_sources.add_pandas("vitlab")
        records = {}
        for split, table in tables.items():
            batch = source.add_dataframe_asset(split).add_batch_definition_whole_dataframe(split)
            suite = context.suites.add(
                gx.ExpectationSuite(
                    name=split, expectations=_expectations(gx, split, num_classes, t, spec, info)
                )
            )
            run = gx.ValidationDefinition(data=batch, suite=suite, name=split).run(
                batch_parameters={"dataframe": table}
            )
            records[split] = sorted(
                (_record(r.to_json_dict()) for r in run.results),
                key=lambda r: (r["expectation"], r["column"] or ""),
            )
    return records


def _record(result: dict[str, Any]) -> dict[str, Any]:
    """A GX result (already JSON-able) as a short record: what was expected, and what was observed."""
    config, details = result["expectation_config"], result["result"]
    kwargs = {k: v for k, v in config["kwargs"].items() if k not in ("batch_id", "column")}
    # The exception info is flat, or (when a metric failed) nested under the metric's id.
    exception_info = result.get("exception_info") or {}
    infos = [exception_info, *(v for v in exception_info.values() if isinstance(v, dict))]
    error = next((i.get("exception_message") for i in infos if i.get("raised_exception")), None)
    if error:
        observed: Any = {"error": error}
    elif details.get("observed_value") is not None:
        observed = details["observed_value"]
    elif config["type"] == "expect_column_distinct_values_to_equal_set":
        observed = {
            "missing": details.get("partial_missing_list", []),
            "unexpected": details.get("partial_unexpected_list", []),
        }
    else:
        examples = details.get("partial_unexpected_list", [])[:5]
        observed = {"unexpected_count": details.get("unexpected_count"), "examples": examples}
    return {
        "expectation": config["type"],
        "column": config["kwargs"].get("column"),
        "kwargs": kwargs,
        "success": bool(result["success"]),
        "observed": observed,
    }


def _describe(split: str, record: dict[str, Any]) -> str:
    """``test: expect_column_sum_to_be_between(duplicate_of_train) observed 1, expected max_value=0``."""
    expected = ", ".join(f"{k}={_short(v)}" for k, v in record["kwargs"].items())
    observed = _short(record["observed"])
    # The one expectation a data key sets outright: name it, as the user changes that key, not GX's suite.
    key = f" (data.expected_{split})" if record["expectation"] == "expect_table_row_count_to_equal" else ""
    return (
        f"{split}: {record['expectation']}({record['column'] or ''}) observed {observed}, "
        f"expected {expected}{key}"
    )


def _short(value: Any) -> str:
    if isinstance(value, list) and len(value) > 10:
        return f"[{', '.join(map(_short, value[:3]))}, ..., {_short(value[-1])}] ({len(value)} values)"
    if isinstance(value, list):
        return f"[{', '.join(map(_short, value))}]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_short(v)}" for k, v in value.items()) + "}"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
