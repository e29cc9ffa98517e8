"""Run one stage of dvc.yaml: ``python pipeline/run.py STAGE``.

The stages themselves are library functions (vitlab.stages, one module each); this entry point pins them to
this repository's folders and params.yaml, and reports a failure as one line with a non-zero exit, as the CLI
does (``VITLAB_DEBUG=1`` shows the traceback). It imports the stage's own module and nothing else of vitlab's
command line, so a stage's DVC deps are its import closure (tests/test_stage_deps.py). Before torch loads it
sets up the CPU libraries (vitlab.cpu: OpenMP's wait policy; ``VITLAB_BIT_IDENTICAL=1`` pins the bits).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python pipeline/run.py STAGE")
    os.chdir(REPO)  # dvc runs stages from the repo root; this makes a manual run from elsewhere agree
    try:
        from vitlab.cpu import prepare_process
        from vitlab.errors import exit_code

        if code := exit_code(prepare_process):  # before vitlab.stages imports torch
            sys.exit(code)
        from vitlab.stages import run_stage
    except ModuleNotFoundError as error:
        sys.exit(
            f"error: {error.name} is not installed for {sys.executable}; run `make setup` and "
            "`source .venv/bin/activate` (or use `make repro`)"
        )

    sys.exit(exit_code(lambda: run_stage(sys.argv[1])))
