"""Do CPU training's bits depend on the instruction set the libraries use, and what does pinning it cost?

    python benchmarks/bench_cpu_repro.py            # about 35 minutes on 2 idle cores
    python benchmarks/bench_cpu_repro.py --quick    # a smoke run: a few configurations, one short round
    python benchmarks/bench_cpu_repro.py --epochs 40 --rounds 1 --only "unpinned @ native" "unpinned @ avx2"

A training step of the default model (tinyvit) does its float work in three libraries, each of which picks
its code by the CPU it runs on: MKL (every Linear layer, and the matrix products inside attention), oneDNN
(the patch embedding's convolution, GELU) and ATen's own kernels, compiled for several instruction sets and
dispatched by ``ATEN_CPU_CAPABILITY`` (LayerNorm, softmax, reductions, AdamW...). Vectors of 16 floats sum in
another order than vectors of 8, so a CPU without AVX-512 (AMD EPYC before Zen 4, for one) can round
differently from the first step on.

One machine can play older CPUs by lowering what each library may use ("emulations":
``MKL_ENABLE_INSTRUCTIONS``, ``ONEDNN_MAX_CPU_ISA``, ``ATEN_CPU_CAPABILITY``). Each pinning candidate (the
variables vitlab could set) is run under every emulation; a candidate whose bits are the same under all of
them does not depend on the CPU's instruction set. Every configuration runs in a fresh process (the libraries
read these variables when they load) and trains the default model on the embedded CIFAR-10 sample with the
params.yaml train section and seeds for ``--epochs`` epochs (16 steps each); it reports a sha256 of the
weights after the last step, the largest weight difference from the reference configuration, and training
images per second (the median of the epochs after the first). Configurations take turns in an order that
rotates each round, so that load from elsewhere slows them alike; the speed is the median over rounds, and its
ratio compares configurations measured in the same run. Results go to benchmarks/results/cpu_repro.json.

What one machine cannot play: another vendor (MKL documents its code branches other than AUTO and COMPATIBLE
for Intel CPUs only) and other cache sizes: see the README, "Across CPUs".
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "cpu_repro.json"
SWITCH = "VITLAB_BIT_IDENTICAL"  # =1: vitlab's bit-identical mode, its pins (vitlab/cpu.py); unset: native
NO_ONEDNN = "BENCH_NO_ONEDNN"  # =1: torch.backends.mkldnn.enabled = False in the training process
# Every variable a configuration may set; the parent's own values of them never reach a child.
CONTROLLED = (
    "ATEN_CPU_CAPABILITY",
    "ONEDNN_MAX_CPU_ISA",
    "DNNL_MAX_CPU_ISA",
    "MKL_CBWR",
    "MKL_ENABLE_INSTRUCTIONS",
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    SWITCH,
    NO_ONEDNN,
)

# The CPU a library believes it runs on. "native" is this machine as it is (AVX-512 on an AVX-512 CPU).
# Only lower instruction sets can be played: forcing MKL_ENABLE_INSTRUCTIONS=AVX512 on an AVX-512 CPU is not
# another CPU, and it overrides MKL_CBWR (measured: MKL then ran its AVX-512 code under MKL_CBWR=AVX2).
EMULATIONS: dict[str, dict[str, str]] = {
    "native": {},
    "avx2": {"MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"},
}
# What vitlab could pin. None of them touches MKL_ENABLE_INSTRUCTIONS, which stays the emulation's.
PINS: dict[str, dict[str, str]] = {
    "unpinned": {},
    "aten avx2": {"ATEN_CPU_CAPABILITY": "avx2"},
    "aten+onednn avx2": {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"},
    "aten+onednn avx2, mkl cbwr auto": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_CBWR": "AUTO",
    },
    "aten+onednn avx2, mkl cbwr avx2": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_CBWR": "AVX2",
    },
    "aten+onednn avx2, mkl cbwr compatible": {
        "ATEN_CPU_CAPABILITY": "avx2",
        "ONEDNN_MAX_CPU_ISA": "AVX2",
        "MKL_CBWR": "COMPATIBLE",
    },
    "aten avx2, no onednn, mkl cbwr compatible": {
        "ATEN_CPU_CAPABILITY": "avx2",
        NO_ONEDNN: "1",
        "MKL_CBWR": "COMPATIBLE",
    },
    "aten default, onednn sse41, mkl cbwr compatible": {
        "ATEN_CPU_CAPABILITY": "default",
        "ONEDNN_MAX_CPU_ISA": "SSE41",
        "MKL_CBWR": "COMPATIBLE",
    },
}
_ATEN_ORDER = ("default", "avx2", "avx512")
_ONEDNN_ORDER = ("SSE41", "AVX", "AVX2", "AVX512_CORE", "ALL")
REFERENCE = "unpinned @ native"
BIT_IDENTICAL = "vitlab bit-identical"  # named "vitlab default" in results measured before it was a switch
THREADS = ("unpinned", "aten+onednn avx2, mkl cbwr avx2", "aten+onednn avx2, mkl cbwr compatible")


def combine(emulation: dict[str, str], pin: dict[str, str]) -> dict[str, str]:
    """The environment of a pinned process on the emulated CPU: each library gets the lower of the two ISAs
    (a pin never raises what the CPU has); MKL's CPU stays the emulation's, its code branch the pin's."""
    env = emulation | pin
    for key, order in (("ATEN_CPU_CAPABILITY", _ATEN_ORDER), ("ONEDNN_MAX_CPU_ISA", _ONEDNN_ORDER)):
        values = [v for v in (emulation.get(key), pin.get(key)) if v is not None]
        if values:
            env[key] = min(values, key=order.index)
    return env


def configurations(quick: bool) -> dict[str, dict[str, str]]:
    """name -> environment, every pin under every emulation, some at 1 thread, and vitlab's bit-identical
    mode."""
    configs = {BIT_IDENTICAL: {SWITCH: "1"}}
    for pin_name, pin in PINS.items():
        for emu_name, emulation in EMULATIONS.items():
            configs[f"{pin_name} @ {emu_name}"] = combine(emulation, pin)
    for pin_name in THREADS:
        for emu_name in ("native", "avx2"):
            env = configs[f"{pin_name} @ {emu_name}"]
            configs[f"{pin_name} @ {emu_name}, 1 thread"] = env | {"OMP_NUM_THREADS": "1"}
    if quick:
        keep = (REFERENCE, "unpinned @ avx2", BIT_IDENTICAL, "unpinned @ native, 1 thread")
        configs = {k: configs[k] for k in keep}
    return configs


def weights_digest(state: dict) -> str:
    digest = hashlib.sha256()
    for name, tensor in state.items():
        digest.update(f"{name}{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def child(data: str, epochs: int, save: str) -> None:
    """Train the default model ``epochs`` epochs; print one JSON line; save the last weights to ``save``."""
    from vitlab.cpu import prepare_process

    prepare_process()  # before torch loads, as every vitlab entry point: wait policy; pins if asked
    import torch

    if os.environ.get(NO_ONEDNN) == "1":
        torch.backends.mkldnn.enabled = False
    from vitlab.checkpoint import Normalization
    from vitlab.data.prepared import load_prepared
    from vitlab.evaluate import evaluate
    from vitlab.models import build_model
    from vitlab.params import load_params
    from vitlab.train import split_train_val, train

    params = load_params(ROOT / "params.yaml")
    dataset = load_prepared(data)
    tr, va = split_train_val(dataset.train, params.data.val_fraction, params.data.seed)
    norm = Normalization.from_images(tr.images)
    torch.manual_seed(params.train.seed)  # as the train stage: the initialization is seeded too
    model = build_model(params.model.name, params.model.config(dataset.num_classes))
    init = weights_digest(model.state_dict())
    warmup = min(params.train.warmup_epochs, epochs / 2)  # the default's 3 warmup epochs need more epochs
    update = {"epochs": epochs, "warmup_epochs": warmup, "device": "cpu", "resume": False}
    train_params = type(params.train).model_validate(params.train.model_dump() | update)
    last: dict = {}
    result = train(
        model, tr, va, norm, train_params, on_epoch=lambda row: last.update(state=_copy(model.state_dict()))
    )
    torch.save(last["state"], save)
    rates = [row["images_per_s"] for row in result.history]
    report = {
        "sha256": weights_digest(last["state"]),
        "init_sha256": init,
        "images_per_s": statistics.median(rates[1:] or rates),
        "val_loss": [row["val_loss"] for row in result.history],
        "test_accuracy": evaluate(model, dataset.test, norm, dataset.num_classes).accuracy,  # best epoch's
        "aten_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "mkldnn": torch.backends.mkldnn.enabled,
        "env": {k: os.environ[k] for k in CONTROLLED if k in os.environ},
    }
    print(json.dumps(report))


def _copy(state: dict) -> dict:
    return {k: v.detach().clone() for k, v in state.items()}


def step_child(preset: str, steps: int) -> None:
    """Median seconds of ``steps`` training steps of ``preset`` (bench_train_throughput's step) as JSON."""
    from vitlab.cpu import prepare_process

    prepare_process()  # before torch loads, as every vitlab entry point
    import torch

    sys.path.insert(0, str(Path(__file__).parent))
    from bench_train_throughput import build, classes_of, trainer

    step = trainer(build("vitlab", preset), classes_of(preset))
    for _ in range(2):
        step()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    print(json.dumps({"step_s": statistics.median(times), "threads": torch.get_num_threads()}))


def _child_env(env: dict[str, str]) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items() if k not in CONTROLLED}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), os.environ.get("PYTHONPATH")]))
    return base | env


def measure_presets(presets: list[str], steps: int, rounds: int) -> list[dict]:
    """Each preset's step, unpinned (native) and bit-identical, in fresh processes taking turns."""
    cells = [(preset, pins) for preset in presets for pins in ("unpinned", BIT_IDENTICAL)]
    times: dict[tuple[str, str], list[float]] = {cell: [] for cell in cells}
    for r in range(rounds):
        shift = r % len(cells)
        for preset, pins in cells[shift:] + cells[:shift]:
            env = {} if pins == "unpinned" else {SWITCH: "1"}
            command = [sys.executable, __file__, "--step-child", preset, "--epochs", str(steps)]
            done = subprocess.run(command, env=_child_env(env), capture_output=True, text=True)
            if done.returncode:
                raise SystemExit(f"step child failed for {preset}, {pins}:\n{done.stderr[-3000:]}")
            step_s = json.loads(done.stdout.strip().splitlines()[-1])["step_s"]
            times[preset, pins].append(step_s)
            print(f"round {r + 1}: {preset}, {pins}: {step_s * 1000:.0f} ms/step", flush=True)
    rows = []
    for preset in presets:
        before = statistics.median(times[preset, "unpinned"])
        after = statistics.median(times[preset, BIT_IDENTICAL])
        rows.append(
            {
                "preset": preset,
                "unpinned_step_s": round(before, 4),
                "pinned_step_s": round(after, 4),
                "slowdown": round(after / before, 3),
                "unpinned_runs_s": [round(t, 4) for t in times[preset, "unpinned"]],
                "pinned_runs_s": [round(t, 4) for t in times[preset, BIT_IDENTICAL]],
            }
        )
    print(f"\nA training step (batch 128, random images): median of {steps}, median over {rounds} rounds\n")
    print("| preset | unpinned ms/step | bit-identical (pinned) ms/step | pinned / unpinned |")
    print("|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['preset']} | {row['unpinned_step_s'] * 1000:.0f} | {row['pinned_step_s'] * 1000:.0f} | "
            f"{row['slowdown']:.2f}x |"
        )
    return rows


def run_child(env: dict[str, str], data: Path, epochs: int, save: Path) -> dict:
    done = subprocess.run(
        [sys.executable, __file__, "--child", str(data), "--epochs", str(epochs), "--save", str(save)],
        env=_child_env(env),
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise SystemExit(f"child failed with {env}:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def prepare_sample(folder: Path) -> Path:
    from vitlab.data.archive import prepare_dataset
    from vitlab.data.sources import DATASETS

    prepare_dataset(
        DATASETS["cifar10-sample"], None, None, folder / "raw", folder / "prepared", progress=False
    )
    return folder / "prepared"


def max_abs_diff(a: Path, b: Path) -> float:
    import torch

    wa, wb = torch.load(a, weights_only=True), torch.load(b, weights_only=True)
    return max(float((wa[k] - wb[k]).abs().max()) for k in wa)


def groups_of(digests: dict[str, str]) -> dict[str, str]:
    """A letter per distinct digest, in order of first appearance: configurations sharing it share bits."""
    letters: dict[str, str] = {}
    for digest in digests.values():
        letters.setdefault(digest, chr(ord("A") + len(letters)) if len(letters) < 26 else f"#{len(letters)}")
    return {name: letters[digest] for name, digest in digests.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=3, help="epochs of 16 steps (0: no table)")
    parser.add_argument("--rounds", type=int, default=3, help="each configuration runs once per round")
    parser.add_argument("--quick", action="store_true", help="4 configurations, 1 epoch, 1 round")
    parser.add_argument("--only", nargs="+", help="configurations to run (names as in the table)")
    parser.add_argument(
        "--presets",
        nargs="*",
        default=["tinyvit", "vit-tiny", "vit-small", "cnn-small", "resnet"],
        help="presets whose step is timed unpinned and pinned (none: skip that table)",
    )
    parser.add_argument("--preset-steps", type=int, default=10, help="timed steps per process")
    parser.add_argument("--out", type=Path, default=RESULTS, help="merged: each kind of run has its key")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--step-child", help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.epochs, args.save)
        return
    if args.step_child:
        step_child(args.step_child, args.epochs)
        return
    if args.quick:
        args.epochs, args.rounds, args.presets, args.preset_steps = 1, 1, args.presets[:1], 2
    output = json.loads(args.out.read_text()) if args.out.is_file() else {}
    output |= {"hardware": _hardware(), "torch": _torch_version()}
    command = " ".join(["python", "benchmarks/bench_cpu_repro.py", *sys.argv[1:]])
    if args.epochs > 0:  # --epochs 0: the presets' table alone
        output[f"{args.epochs}_epochs"] = {"command": command} | measure_configurations(args)
    if args.presets:
        started = time.time()
        rows = measure_presets(args.presets, args.preset_steps, args.rounds)
        output["presets"] = {
            "command": command,
            "steps": args.preset_steps,
            "rounds": args.rounds,
            "seconds": round(time.time() - started),
            "rows": rows,
        }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(output, indent=1) + "\n")
    print(f"-> {args.out}")


def measure_configurations(args: argparse.Namespace) -> dict:
    """The table of configurations: bits, weight differences and speed, each in fresh processes."""
    configs = configurations(args.quick)
    if args.only:
        unknown = set(args.only) - set(configs)
        if unknown:
            raise SystemExit(f"unknown configurations: {', '.join(sorted(unknown))}")
        configs = {k: configs[k] for k in args.only}
    names = list(configs)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="cpu-repro-") as tmp:
        data = prepare_sample(Path(tmp))
        # Configurations with the same environment (a pin the emulated CPU already implies) run once.
        first_of = {name: next(n for n in names if configs[n] == configs[name]) for name in names}
        unique = [name for name in names if first_of[name] == name]
        weights = {name: Path(tmp) / f"w{unique.index(first_of[name])}.pt" for name in names}
        for r in range(args.rounds):
            shift = r % len(unique)
            for name in unique[shift:] + unique[:shift]:
                runs[name].append(run_child(configs[name], data, args.epochs, weights[name]))
                last = runs[name][-1]
                print(
                    f"round {r + 1}: {name}: {last['sha256'][:12]} {last['images_per_s']:.0f} img/s",
                    flush=True,
                )
        for name in names:
            runs[name] = runs[first_of[name]]
        reference = REFERENCE if REFERENCE in names else names[0]
        diffs = {name: max_abs_diff(weights[name], weights[reference]) for name in names}
    rows = []
    for name in names:
        digests = {run["sha256"] for run in runs[name]}
        if len(digests) != 1:
            raise SystemExit(f"{name}: different weights from one round to the next: {sorted(digests)}")
        first = runs[name][0]
        rows.append(
            {
                "config": name,
                "env": configs[name],
                "sha256": first["sha256"],
                "init_sha256": first["init_sha256"],
                "images_per_s": statistics.median(run["images_per_s"] for run in runs[name]),
                "images_per_s_runs": [round(run["images_per_s"], 1) for run in runs[name]],
                "max_abs_weight_diff_vs_reference": diffs[name],
                "val_loss": first["val_loss"],
                "test_accuracy": first["test_accuracy"],
                "seen_by_process": {k: first[k] for k in ("aten_capability", "threads", "mkldnn", "env")},
            }
        )
    group = groups_of({row["config"]: row["sha256"] for row in rows})
    speed = {row["config"]: row["images_per_s"] for row in rows}
    for row in rows:
        row["group"] = group[row["config"]]
        row["speed_vs_reference"] = round(speed[row["config"]] / speed[reference], 3)
    print_table(rows, reference, args)
    summary = summarize(rows, reference)
    for line in summary:
        print(line)
    return {
        "epochs": args.epochs,
        "steps": args.epochs * 16,
        "rounds": args.rounds,
        "reference": reference,
        "seconds": round(time.time() - started),
        "rows": rows,
        "summary": summary,
    }


def print_table(rows: list[dict], reference: str, args: argparse.Namespace) -> None:
    print(f"\n{args.epochs} epochs ({args.epochs * 16} steps) of tinyvit per run, {args.rounds} round(s)\n")
    print("| configuration | bits | sha256 | max abs weight diff vs reference | img/s | speed vs reference |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['config']} | {row['group']} | {row['sha256'][:12]} | "
            f"{row['max_abs_weight_diff_vs_reference']:.2e} | {row['images_per_s']:.0f} | "
            f"{row['speed_vs_reference']:.2f}x |"
        )
    print(f"\nreference: {reference}; the same letter in 'bits': identical weights")


def summarize(rows: list[dict], reference: str) -> list[str]:
    """Per pin: whether every emulated ISA gives the same bits, and its speed on this CPU (2 threads)."""
    by_name = {row["config"]: row for row in rows}
    lines = []
    for pin in PINS:
        cells = [by_name.get(f"{pin} @ {emu}") for emu in EMULATIONS]
        if any(cell is None for cell in cells):
            continue
        same = len({cell["sha256"] for cell in cells}) == 1
        verdict = "same bits on every ISA" if same else "bits depend on the ISA"
        groups = "/".join(cell["group"] for cell in cells)
        lines.append(
            f"{pin}: {verdict} ({groups}); speed {cells[0]['speed_vs_reference']:.2f}x of {reference}"
        )
    for pin in THREADS:
        one, two = by_name.get(f"{pin} @ native, 1 thread"), by_name.get(f"{pin} @ native")
        if one and two:
            same = one["sha256"] == two["sha256"]
            lines.append(f"{pin}: 1 vs 2 threads {'same bits' if same else 'different bits'}")
    return lines


def _torch_version() -> str:
    import torch

    return torch.__version__


def _hardware() -> str:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            model = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        model = "unknown CPU"
    return f"{model}, {len(os.sched_getaffinity(0))} cores"


if __name__ == "__main__":
    main()
