"""Run one stage of dvc.yaml: ``python pipeline/run.py STAGE``.

The stages themselves are library functions (vitlab.stages); this entry point pins them to this repository's
folders and params.yaml, and reports a failure as one line with a non-zero exit, as the CLI does.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    os.chdir(REPO)  # dvc runs stages from the repo root; this makes a manual run from elsewhere agree
    try:
        from vitlab.cli import main
    except ModuleNotFoundError as error:
        sys.exit(
            f"error: {error.name} is not installed for {sys.executable}; run `make setup` and "
            "`source .venv/bin/activate` (or use `make repro`)"
        )

    sys.exit(main(["stage", *sys.argv[1:]]))
