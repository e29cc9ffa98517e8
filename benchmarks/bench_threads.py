"""Training speed of the default run's step on 1 thread and on every core the process may use: vitlab leaves
torch its own thread count (the cores of ``os.sched_getaffinity``), so a bigger machine trains faster.

    python benchmarks/bench_threads.py            # about 2 minutes on 2 idle cores
    python benchmarks/bench_threads.py --quick    # a smoke run

Each measurement is ``vitlab.train.train`` of params.yaml's default model and recipe (model.preset and
train.recipe) on random 32x32 images for ``EPOCHS`` epochs, in a process of its own that starts as vitlab's
entry points do (``vitlab.cpu.prepare_process``), the default training step as the train stage runs it
(batched augmentation, AdamW, bf16 where ``train.amp: auto`` picks it); the figure is the median of the
epochs after the first. The two settings take turns, ``--rounds`` times, so that load from elsewhere slows
both alike; run it on idle cores. Written to ``--out`` (default benchmarks/results/threads.json).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 4
IMAGES = 1024


def child(threads: int | None, images: int) -> dict:
    """One measurement, in this process: img/s of the default run's training on ``threads`` threads (None:
    torch's own choice)."""
    from vitlab.cpu import prepare_process

    prepare_process()
    import numpy as np
    import torch

    from vitlab.checkpoint import Normalization
    from vitlab.data.prepared import Split
    from vitlab.models import build_model
    from vitlab.params import load_params
    from vitlab.train import train

    if threads is not None:
        torch.set_num_threads(threads)
    params = load_params(REPO / "params.yaml")
    rng = np.random.default_rng(0)
    split = Split(rng.integers(0, 256, (images, 32, 32, 3), dtype=np.uint8), rng.integers(0, 10, images))
    model = build_model(params.model.name, params.model.config(10, 32, 3))
    recipe = params.train.model_copy(update={"epochs": EPOCHS, "warmup_epochs": 0, "device": "cpu"})
    history = train(model, split, None, Normalization.from_images(split.images), recipe).history
    return {
        "threads": torch.get_num_threads(),
        "images_per_s": statistics.median(row["images_per_s"] for row in history[1:]),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="1 round on 256 images")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks/results/threads.json")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        threads = None if args.child[0] == "all" else int(args.child[0])
        print(json.dumps(child(threads, int(args.child[1]))))
        return 0
    from vitlab import files
    from vitlab.device import hardware_description

    rounds, images = (1, 256) if args.quick else (args.rounds, IMAGES)
    runs: dict[str, list[dict]] = {"1": [], "all": []}
    for _ in range(rounds):
        for setting in runs:
            command = [sys.executable, __file__, "--child", setting, str(images)]
            done = subprocess.run(command, capture_output=True, text=True, check=True)
            runs[setting].append(json.loads(done.stdout.strip().splitlines()[-1]))
    one = statistics.median(r["images_per_s"] for r in runs["1"])
    every = statistics.median(r["images_per_s"] for r in runs["all"])
    result = {
        "hardware": hardware_description("cpu"),
        "cores_allowed": len(os.sched_getaffinity(0)),
        "threads_default": runs["all"][0]["threads"],
        "images_per_s_1_thread": round(one, 1),
        "images_per_s_default": round(every, 1),
        "speedup": round(every / one, 2),
        "runs": runs,
    }
    files.write_json(args.out, result)
    print(
        f"default training step: {one:.0f} img/s on 1 thread, {every:.0f} on {result['threads_default']} "
        f"(torch's default here; {result['cores_allowed']} cores allowed): {every / one:.2f}x"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
