"""Training speed when another process keeps a core busy: OpenMP's settings before and after vitlab's default.

    python benchmarks/bench_under_load.py            # about 4 minutes on 2 cores
    python benchmarks/bench_under_load.py --quick    # a smoke run: one short round

torch runs each operator on a team of OpenMP threads (2 on 2 cores) that meet at a barrier when the operator
ends. With GNU OpenMP's default wait policy a thread that reaches the barrier first spins on its core for
~300,000 iterations before it sleeps; when one core is shared with another busy process, the thread there
gets only its time slices, so every operator (hundreds per training step) waits for that thread's next slice
while its sibling spins, and the spinning keeps the other core busy too. ``OMP_WAIT_POLICY=PASSIVE`` makes a
waiting thread sleep at once, so the scheduler can run the descheduled sibling on the freed core.

Each configuration trains the default model (``tinyvit``, batch 128: forward, backward, AdamW step, as
``bench_train_throughput``) for a fixed wall-clock window in a fresh process (the wait policy is read when
OpenMP loads), idle and then with ``--busy`` processes spinning (``python -c "while True: pass"``). The
configurations take turns in an order that rotates each round; the figure is images per second over the
window, the median over rounds, and each ratio compares two configurations measured in the same run.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

# Each configuration: what differs from a vitlab entry point in the environment of the training process.
# "before" is torch's defaults: OMP_WAIT_POLICY unset, which GNU OpenMP documents as GOMP_SPINCOUNT=300000
# (vitlab leaves an explicit GOMP_SPINCOUNT alone); "after" is vitlab's entry points' default
# (OMP_WAIT_POLICY=PASSIVE, set by vitlab.cpu.prepare_process).
CONFIGS: dict[str, dict[str, str]] = {
    "before": {"GOMP_SPINCOUNT": "300000"},
    "after (vitlab default)": {},
    "after, 1 thread": {"OMP_NUM_THREADS": "1"},
}
PRESET = "tinyvit"


def child(seconds: float) -> None:
    """Train for ``seconds`` of wall-clock time after two warm-up steps; print images per second as JSON."""
    from vitlab.cpu import prepare_process

    prepare_process()  # before torch loads, as every vitlab entry point: it sets the OpenMP wait policy
    sys.path.insert(0, str(Path(__file__).parent))
    import torch
    from bench_train_throughput import BATCH, build, classes_of, trainer

    step = trainer(build("vitlab", PRESET), classes_of(PRESET))
    for _ in range(2):
        step()
    steps, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        step()
        steps += 1
    elapsed = time.perf_counter() - start
    policy = os.environ.get("OMP_WAIT_POLICY") or f"unset, GOMP_SPINCOUNT={os.environ.get('GOMP_SPINCOUNT')}"
    print(
        json.dumps({"img_s": steps * BATCH / elapsed, "threads": torch.get_num_threads(), "policy": policy})
    )


def measure(config: dict[str, str], seconds: float) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT")} | config
    command = [sys.executable, __file__, "--child", "--seconds", str(seconds)]
    output = subprocess.run(command, env=env, check=True, capture_output=True, text=True).stdout
    return json.loads(output.strip().splitlines()[-1])


@contextmanager
def busy_processes(count: int):
    """``count`` processes that each keep a core busy, for as long as the block runs."""
    spinners = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(count)]
    try:
        time.sleep(1.0)  # let the scheduler place them
        yield
    finally:
        for spinner in spinners:
            spinner.kill()
            spinner.wait()


def take_turns(rounds: int, seconds: float) -> dict[str, dict]:
    names = list(CONFIGS)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for round_ in range(rounds):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            runs[name].append(measure(CONFIGS[name], seconds))
    return {
        name: {
            "img_s": statistics.median(r["img_s"] for r in results),
            "threads": results[0]["threads"],
            "policy": results[0]["policy"],
        }
        for name, results in runs.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=8.0, help="training window of one measurement")
    parser.add_argument("--busy", type=int, default=1, help="spinning processes for the loaded condition")
    parser.add_argument("--quick", action="store_true", help="one round of 2 s windows")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help="also write the results as JSON here")
    args = parser.parse_args()
    if args.child:
        child(args.seconds)
        return
    rounds, seconds = (1, 2.0) if args.quick else (args.rounds, args.seconds)
    idle = take_turns(rounds, seconds)
    with busy_processes(args.busy):
        loaded = take_turns(rounds, seconds)

    from vitlab.device import hardware_description

    print(f"{PRESET}, batch 128, {rounds} rounds of {seconds:.0f} s; {hardware_description('cpu')}\n")
    print("| configuration | threads | OMP_WAIT_POLICY | idle img/s | loaded img/s | loaded / idle |")
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for name in CONFIGS:
        i, b = idle[name], loaded[name]
        ratio = b["img_s"] / i["img_s"]
        print(
            f"| {name} | {i['threads']} | {i['policy']} | {i['img_s']:.0f} | {b['img_s']:.0f} | {ratio:.2f} |"
        )
    after, before = "after (vitlab default)", "before"
    print(
        f"\nafter / before: idle {idle[after]['img_s'] / idle[before]['img_s']:.2f}x, "
        f"with {args.busy} busy core(s) {loaded[after]['img_s'] / loaded[before]['img_s']:.2f}x"
    )
    if args.out:
        args.out.write_text(json.dumps({"idle": idle, "loaded": loaded, "busy": args.busy}, indent=2) + "\n")


if __name__ == "__main__":
    main()
