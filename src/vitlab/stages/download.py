"""Stage ``download``: fetch and md5-verify the data, extract it safely, check every file against its official
md5, write data/prepared."""

from __future__ import annotations

from vitlab.data.archive import prepare_dataset
from vitlab.data.download import local_source
from vitlab.data.sources import DATASETS
from vitlab.params import Params
from vitlab.stages import Layout


def run(params: Params, layout: Layout) -> None:
    """Prepare ``params.data.dataset`` (or the archive at ``data.source``) under ``layout.prepared_dir``."""
    p = params.data
    dataset = prepare_dataset(
        DATASETS[p.dataset],
        p.source and local_source(p.source),
        p.md5,
        layout.raw_dir,
        layout.prepared_dir,
        expected_train=p.expected_train,
        expected_test=p.expected_test,
    )
    verified = (
        "official files, per-file md5s verified" if dataset.info["official"] else "archive md5 verified"
    )
    print(
        f"prepared {p.dataset} ({verified}): {len(dataset.train)} train, {len(dataset.test)} test images, "
        f"{dataset.num_classes} classes -> {layout.prepared_dir}"
    )
