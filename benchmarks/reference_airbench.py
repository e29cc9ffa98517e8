"""Run the reference fast-training CNN, airbench94_muon's CPU port (``../shared/reference/airbench94_cpu.py``,
code from elsewhere, kept outside the project), on this machine and record its figures beside vitlab's.

    python benchmarks/reference_airbench.py                     # one run: 22 min on 2 Zen 5 cores with bf16
    python benchmarks/reference_airbench.py --log run.log       # record a run already made (its output)
    python benchmarks/full_data.py --epochs 8 --runs airbench   # then vitlab's airbench, on the same machine

The reference prints a table (epoch, train and test accuracy, seconds of training so far) and its final
accuracy with test-time augmentation; its clock counts the whitening init, the training steps and the final
test pass, not the per-epoch test passes nor loading the archive. This script keeps that output beside the
parsed figures in ``--out`` (default benchmarks/results/reference_airbench.json), with the machine's
description: compare it only with vitlab runs made in the same session on the same machine, one at a time.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

from vitlab import files
from vitlab.device import hardware_description

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO.parent / "shared/reference/airbench94_cpu.py"
ARCHIVE = REPO.parent / "shared/data/cifar-10-full-python.tar.gz"
# A row of its table: |  run  |  epoch  |  train_acc  |  val_acc  |  tta_val_acc  |  time_seconds  |
ROW = re.compile(r"^\|\s*(\S*)\s*\|\s*(\S+)\s*\|\s*(\S*)\s*\|\s*(\S*)\s*\|\s*(\S*)\s*\|\s*([\d.]+)\s*\|$")


def parse(output: str) -> dict:
    """The reference's figures from its printed ``output``: per epoch (1-based) the last batch's training
    accuracy, the test accuracy without TTA and the seconds so far, then the TTA accuracy and total seconds.

    Raises ValueError when the output has no final TTA row (a run that did not finish)."""
    epochs, final = [], None
    for line in output.splitlines():
        match = ROW.match(line.strip())
        if match is None:
            continue
        _, epoch, train_acc, val_acc, tta_acc, seconds = match.groups()
        if epoch == "eval":
            final = {"tta_test_accuracy": float(tta_acc), "time_s": float(seconds)}
        else:
            epochs.append(
                {
                    "epoch": int(epoch) + 1,
                    "train_accuracy": float(train_acc),
                    "test_accuracy": float(val_acc),
                    "time_s": float(seconds),
                }
            )
    if final is None:
        raise ValueError("the reference's output has no final (eval) row: did it finish?")
    return {"epochs": epochs} | final


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--log", type=Path, help="the output of a run already made, instead of running it")
    parser.add_argument("--data", type=Path, default=ARCHIVE, help="the full CIFAR-10 python archive")
    parser.add_argument("--amp", choices=("0", "1"), default="1", help="bf16 autocast (AB_AMP), as published")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/reference_airbench.json")
    args = parser.parse_args(argv)
    if args.log is not None:
        output = args.log.read_text()
    else:
        if not SCRIPT.exists() or not args.data.exists():
            sys.exit(f"error: needs {SCRIPT} and {args.data}")
        env = os.environ | {"AB_AMP": args.amp, "AB_DATA": str(args.data)}
        start = time.perf_counter()
        done = subprocess.run(
            [sys.executable, str(SCRIPT)], env=env, capture_output=True, text=True, check=False
        )
        output = done.stdout
        if done.returncode:
            last = done.stderr.strip().splitlines()[-1:]
            sys.exit(f"error: the reference exited {done.returncode}: {last}")
        print(f"reference: {time.perf_counter() - start:.0f} s with loading", file=sys.stderr)
    try:
        figures = parse(output)
    except ValueError as error:
        sys.exit(f"error: {error}")
    record = {
        "command": f"AB_AMP={args.amp} AB_DATA={args.data.name} python {SCRIPT.name}",
        "hardware": hardware_description("cpu"),
        "threads": int(os.environ.get("AB_THREADS", "2")),
        **figures,
        "output": output,
    }
    files.write_json(args.out, record)
    accuracy, seconds = figures["tta_test_accuracy"], figures["time_s"]
    print(f"reference airbench94_muon: {accuracy:.2%} with TTA in {seconds:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
