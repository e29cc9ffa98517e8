"""``vitlab compare``: finished DVC experiments into one comparison (not a dvc.yaml stage).

Nothing a comparison writes is tracked: its folder ignores itself (a ``.gitignore`` of ``*``) and a folder
holding tracked files is refused, so the workspace stays clean for DVC, and neither ``dvc exp apply`` nor a
git checkout can restore an old comparison over the new one.
"""

from __future__ import annotations

import csv
import subprocess
from pathlib import Path

from vitlab import files as outputs
from vitlab.compare import RunFiles, collect_maps, dvc_records, finished_experiments, write_comparison
from vitlab.errors import VitlabError, display_name
from vitlab.stages import Layout
from vitlab.tracking import Tracker


def compare_experiments(
    layout: Layout, names: list[str], baseline: str | None, resamples: int, seed: int, out_dir: Path
) -> None:
    """Collect finished DVC experiments (all of this commit's when ``names`` is empty) into a comparison
    under ``out_dir``, one row per configuration (experiments NAME-sSEED of several seeds share one);
    ``out_dir`` is git-ignored (``ignored_folder``). VitlabError when there is no experiment, or when
    ``out_dir`` holds files git tracks."""
    names = names or finished_experiments()
    if not names:
        raise VitlabError("no finished experiments to compare: run the study first (vitlab compare --run)")
    files = RunFiles(str(layout.eval_predictions), str(layout.train_history), str(layout.eval_model))
    records = dvc_records(names, files)
    ignored_folder(out_dir)
    rows = write_comparison(records, out_dir, baseline, resamples, seed)
    maps = collect_maps(names, str(layout.attention_dir), outputs.fresh_folder(out_dir / "maps"))
    with open(out_dir / "table.csv", newline="") as handle:
        header, *rows = list(csv.reader(handle))
    config = {"runs": names, "baseline": baseline, "resamples": resamples}
    with Tracker(config=config, job_type="compare") as tracker:
        tracker.log_table("comparison", header, rows)
        plots = [out_dir / f"{name}.png" for name in ("accuracy_vs_patch", "val_curves")]
        tracker.log_images({path.stem: path for path in plots if path.exists()})
        tracker.log_images({path.stem: path for path in maps})
    print((out_dir / "table.md").read_text(), end="")
    grouped = f" ({len(rows)} configurations over seeds)" if len(rows) < len(names) else ""
    print(f"comparison of {len(names)} runs{grouped} -> {display_name(str(out_dir))}")


def ignored_folder(folder: Path) -> None:
    """Make ``folder`` a place git ignores: a ``.gitignore`` of ``*`` inside it (written when absent);
    VitlabError from ``refuse_tracked`` first."""
    refuse_tracked(folder)
    if not (folder / ".gitignore").exists():
        outputs.write_text(
            folder / ".gitignore", "# written by vitlab compare: a comparison is not tracked\n*\n"
        )


def refuse_tracked(folder: Path) -> None:
    """Raise VitlabError when git tracks a file in ``folder`` (a comparison committed before): ``dvc exp
    apply`` and ``git checkout`` would put those back over a new comparison, and the workspace would be
    dirty. Outside a git repository (or without git) nothing is tracked, and nothing is refused."""
    if not folder.is_dir():
        return  # git tracks no file in a folder that does not exist
    try:
        listed = subprocess.run(["git", "ls-files", "-z", "--", "."], cwd=folder, capture_output=True)
    except FileNotFoundError:  # no git: nothing is tracked
        return
    tracked = listed.stdout.split(b"\0")[:-1] if listed.returncode == 0 else []
    if tracked:
        raise VitlabError(
            f"--out {folder}: git tracks {len(tracked)} files there (a comparison committed before), which "
            "dvc exp apply and git checkout would restore over a new one: choose another --out, or stop "
            f"tracking them (git rm -r --cached {folder})"
        )
