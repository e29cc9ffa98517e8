"""``vitlab compare``: finished DVC experiments into one comparison (not a dvc.yaml stage)."""

from __future__ import annotations

import csv
from pathlib import Path

from vitlab.compare import RunFiles, collect_maps, dvc_records, finished_experiments, write_comparison
from vitlab.errors import VitlabError
from vitlab.stages import Layout
from vitlab.tracking import Tracker


def compare_experiments(
    layout: Layout, names: list[str], baseline: str | None, resamples: int, seed: int, out_dir: Path
) -> None:
    """Collect finished DVC experiments (all of this commit's when ``names`` is empty) into a comparison
    under ``out_dir``, one row per configuration (experiments NAME-sSEED of several seeds share one);
    VitlabError when there is none."""
    names = names or finished_experiments()
    if not names:
        raise VitlabError("no finished experiments to compare: run the study first (vitlab compare --run)")
    files = RunFiles(str(layout.eval_predictions), str(layout.train_history), str(layout.eval_model))
    rows = write_comparison(dvc_records(names, files), out_dir, baseline, resamples, seed)
    maps = collect_maps(names, str(layout.attention_dir), out_dir / "maps")
    with open(out_dir / "table.csv", newline="") as handle:
        header, *rows = list(csv.reader(handle))
    config = {"runs": names, "baseline": baseline, "resamples": resamples}
    with Tracker(config=config, job_type="compare") as tracker:
        tracker.log_table("comparison", header, rows)
        tracker.log_images({name: out_dir / f"{name}.png" for name in ("accuracy_vs_patch", "val_curves")})
        tracker.log_images({path.stem: path for path in maps})
    print((out_dir / "table.md").read_text(), end="")
    grouped = f" ({len(rows)} configurations over seeds)" if len(rows) < len(names) else ""
    print(f"comparison of {len(names)} runs{grouped} -> {out_dir}")
