"""Stage ``validate``: the Great Expectations suite over the prepared data; fails the pipeline on bad data."""

from __future__ import annotations

from vitlab import files
from vitlab.data.prepared import load_prepared
from vitlab.data.sources import DATASETS
from vitlab.params import Params
from vitlab.stages import Layout
from vitlab.validate import ensure_valid, validate_dataset


def run(params: Params, layout: Layout) -> None:
    """Write the validation result to ``layout.validation``, then raise VitlabError if any check failed.

    The images must have ``data.dataset``'s size and channels; the thresholds are ``params.validate_``."""
    result = validate_dataset(
        load_prepared(layout.prepared_dir), params.validate_, DATASETS[params.data.dataset]
    )
    files.write_json(layout.validation, result)
    ensure_valid(result)
    print(f"validation passed -> {layout.validation}")
