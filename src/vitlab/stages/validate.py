"""Stage ``validate``: the Great Expectations suite over the prepared data; fails the pipeline on bad data."""

from __future__ import annotations

from vitlab import files
from vitlab.data.prepared import load_prepared
from vitlab.params import Params
from vitlab.stages import Layout
from vitlab.validate import ValidationThresholds, ensure_valid, validate_dataset


def run(params: Params, layout: Layout) -> None:
    """Write the validation result to ``layout.validation``, then raise VitlabError if any check failed."""
    result = validate_dataset(
        load_prepared(layout.prepared_dir), ValidationThresholds(**params.validate_.model_dump())
    )
    files.write_json(layout.validation, result)
    ensure_valid(result)
    print(f"validation passed -> {layout.validation}")
