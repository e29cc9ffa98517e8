"""CPU inference speed: ONNX Runtime fp32 and int8 against PyTorch eager, for three vitlab models.

    python benchmarks/bench_inference.py            # about 4 minutes on 2 cores
    python benchmarks/bench_inference.py --quick    # fewer rounds and runs, for a smoke run

Weights are random: speed does not depend on training. Each engine is timed in a process of its own, as a
user runs it: 2 intra-op threads, default threading (ORT's workers spin briefly between ops; so do PyTorch's
OpenMP threads), graph optimization level ALL. Engines in one process would share cores with each other's
idle spinning threads, which skews whichever runs next. The engines take turns, round after round, so a
change in machine load during the run spreads over all of them; each figure is the median over rounds of a
process's median. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:  # torch is imported lazily: the ORT children never load it
    import torch

THREADS = 2
BATCH = 256
SHIPPED = "ORT fp32, ORT fusions"  # what the export stage writes: the reference of the int8 rows
# preset -> classes: the presets serving users start from; vit-c100 with its CIFAR-100 head.
MODELS = {"tinyvit": 10, "vit-c100": 100, "cnn-small": 10}


def build(name: str, weights: Path | None = None) -> torch.nn.Module:
    import torch

    from vitlab.models import build_model, preset_spec

    arch, config = preset_spec(name)
    torch.manual_seed(0)
    model = build_model(arch, config | {"num_classes": MODELS[name]}).eval()
    if weights is not None:
        model.load_state_dict(torch.load(weights, weights_only=True))
    return model


def runner(engine: str, target: str) -> Callable[[np.ndarray], np.ndarray]:
    """``engine`` "eager" runs preset ``target`` (weights beside it); "ort" runs the ONNX file ``target``."""
    if engine == "eager":
        import torch

        torch.set_num_threads(THREADS)
        name, weights = target.split("@")
        model = build(name, Path(weights))

        def eager(x: np.ndarray) -> np.ndarray:
            with torch.inference_mode():
                return model(torch.from_numpy(x)).numpy()

        return eager
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    session = ort.InferenceSession(target, options, providers=["CPUExecutionProvider"])
    return lambda x: session.run(None, {"images": x})[0]


def child(engine: str, target: str, latency_runs: int, batch_runs: int) -> None:
    """Time one engine and print its per-run seconds as JSON: batch-1 latencies, then batch-256 runs."""
    run = runner(engine, target)
    rng = np.random.default_rng(0)
    out: dict[str, list[float]] = {}
    for key, x, runs in (
        ("latency", rng.standard_normal((1, 3, 32, 32), dtype=np.float32), latency_runs),
        ("batch", rng.standard_normal((BATCH, 3, 32, 32), dtype=np.float32), batch_runs),
    ):
        warmup = max(3, runs // 5)  # arenas, caches, thread pools
        seconds = []
        for i in range(warmup + runs):
            start = time.perf_counter()
            run(x)
            if i >= warmup:
                seconds.append(time.perf_counter() - start)
        out[key] = seconds
    print(json.dumps(out))


def prepare(name: str, folder: Path) -> dict[str, tuple[str, str]]:
    """Write every variant of preset ``name`` into ``folder``: engine label -> (engine, target)."""
    import torch
    from onnxruntime.transformers.optimizer import optimize_model

    from vitlab.checkpoint import Normalization
    from vitlab.export import export_onnx, quantize_onnx

    model = build(name)
    weights = folder / f"{name}.pt"
    torch.save(model.state_dict(), weights)
    norm = Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    classes = [f"class_{i}" for i in range(MODELS[name])]
    plain = export_onnx(model, folder / f"{name}.plain.onnx", classes, norm)
    fused = export_onnx(model, folder / f"{name}.onnx", classes, norm, ort_fusions=True)
    calibration = np.random.default_rng(1).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    variants = {"pytorch eager": ("eager", f"{name}@{weights}"), "ORT fp32, plain ONNX": ("ort", str(plain))}
    if model.cfg.__class__.__name__ == "ViTConfig":
        # onnxruntime's own transformer optimizer: the alternative to onnxscript's fusions.
        optimized = optimize_model(
            str(plain), model_type="vit", num_heads=model.cfg.heads, hidden_size=model.cfg.dim
        )
        optimized.save_model_to_file(str(folder / f"{name}.optimizer.onnx"))
        variants["ORT fp32, transformer optimizer"] = ("ort", str(folder / f"{name}.optimizer.onnx"))
    variants[SHIPPED] = ("ort", str(fused))
    dynamic = quantize_onnx(fused, folder / f"{name}.int8.onnx")
    variants["ORT int8 dynamic"] = ("ort", str(dynamic))
    static = quantize_onnx(fused, folder / f"{name}.qdq.onnx", "static", calibration)
    variants["ORT int8 static QDQ"] = ("ort", str(static))
    return variants


def max_diffs(variants: dict[str, tuple[str, str]]) -> dict[str, float]:
    x = np.random.default_rng(2).standard_normal((BATCH, 3, 32, 32), dtype=np.float32)
    outputs = {label: runner(engine, target)(x) for label, (engine, target) in variants.items()}
    return {label: float(np.abs(out - outputs["pytorch eager"]).max()) for label, out in outputs.items()}


def bench_model(name: str, folder: Path, rounds: int, latency_runs: int, batch_runs: int) -> list[dict]:
    variants = prepare(name, folder)
    measured: dict[str, dict[str, list[float]]] = {label: {"latency": [], "batch": []} for label in variants}
    for _ in range(rounds):
        for label, (engine, target) in variants.items():
            args = [engine, target, str(latency_runs), str(batch_runs)]
            done = subprocess.run(
                [sys.executable, __file__, "--child", *args], capture_output=True, text=True, check=True
            )
            seconds = json.loads(done.stdout.strip().splitlines()[-1])
            measured[label]["latency"].append(seconds["latency"])
            measured[label]["batch"].append(seconds["batch"])
    diffs = max_diffs(variants)
    return [
        {
            "model": name,
            "engine": label,
            "p50_ms": 1e3 * statistics.median(statistics.median(r) for r in runs["latency"]),
            "p99_ms": 1e3 * statistics.median(float(np.percentile(r, 99)) for r in runs["latency"]),
            "img_s": BATCH / statistics.median(statistics.median(r) for r in runs["batch"]),
            "max_diff": diffs[label],
        }
        for label, runs in measured.items()
    ]


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | engine | batch 1 p50 (ms) | batch 1 p99 (ms) | batch 1 vs eager | batch 256 (img/s) "
        "| batch 256 vs eager | batch 256 vs ORT fp32 fused | max \\|logit diff\\| vs eager |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        same = {r["engine"]: r for r in rows if r["model"] == row["model"]}
        eager, ort_fp32 = same["pytorch eager"], same[SHIPPED]
        lines.append(
            f"| {row['model']} | {row['engine']} | {row['p50_ms']:.3f} | {row['p99_ms']:.3f} "
            f"| {eager['p50_ms'] / row['p50_ms']:.2f}x | {row['img_s']:,.0f} "
            f"| {row['img_s'] / eager['img_s']:.2f}x | {row['img_s'] / ort_fp32['img_s']:.2f}x "
            f"| {row['max_diff']:.1e} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and runs (noisier figures)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--child", nargs=4, metavar=("ENGINE", "TARGET", "LATENCY_RUNS", "BATCH_RUNS"))
    args = parser.parse_args(argv)
    if args.child:
        engine, target, latency_runs, batch_runs = args.child
        child(engine, target, int(latency_runs), int(batch_runs))
        return 0
    import onnxruntime as ort
    import torch

    warnings.filterwarnings("ignore")  # exporter and quantizer chatter
    rounds, latency_runs, batch_runs = (1, 50, 3) if args.quick else (3, 200, 10)
    with tempfile.TemporaryDirectory(prefix="vitlab-bench-") as folder:
        rows = [
            row
            for name in args.models
            for row in bench_model(name, Path(folder), rounds, latency_runs, batch_runs)
        ]
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {THREADS} threads, {rounds} rounds\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
