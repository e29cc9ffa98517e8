"""CPU inference speed: ONNX Runtime fp32 and int8 against PyTorch eager, for three vitlab models.

    python benchmarks/bench_inference.py            # about 4 minutes on 2 cores
    python benchmarks/bench_inference.py --quick    # fewer rounds and runs, for a smoke run
    python benchmarks/bench_inference.py --int8 ARCHIVE   # int8 methods on a trained tinyvit, real images

``--int8`` trains a tinyvit on a CIFAR-10 archive (python layout) for ``--epochs`` epochs on one thread,
exports it as the export stage does and compares fp32 with each int8 method on the archive's test images:
accuracy at batch 1 and 256, images whose top-1 or logits change between the two, logit error against fp32,
file size, and speed at batch 1 and 256 (one process, the ORT sessions taking turns). About 5 minutes.

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

    from vitlab.models import build_model, preset_config

    arch, config = preset_config(name)
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
    if model.config.__class__.__name__ == "ViTConfig":
        # onnxruntime's own transformer optimizer: the alternative to onnxscript's fusions.
        optimized = optimize_model(
            str(plain), model_type="vit", num_heads=model.config.heads, hidden_size=model.config.dim
        )
        optimized.save_model_to_file(str(folder / f"{name}.optimizer.onnx"))
        variants["ORT fp32, transformer optimizer"] = ("ort", str(folder / f"{name}.optimizer.onnx"))
    variants[SHIPPED] = ("ort", str(fused))
    weight_only = quantize_onnx(fused, folder / f"{name}.int8.onnx")
    variants["ORT int8 weight-only"] = ("ort", str(weight_only))
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


def dynamic_int8(fp32: Path, path: Path) -> Path:
    """ORT's dynamic quantization as the export stage wrote it before weight-only: batch-dependent scales."""
    from onnxruntime import quantization
    from onnxruntime.quantization.shape_inference import quant_pre_process

    prepared = path.with_suffix(".prepared.onnx")
    quant_pre_process(str(fp32), str(prepared))
    quantization.quantize_dynamic(
        prepared, path, op_types_to_quantize=["MatMul"], weight_type=quantization.QuantType.QInt8
    )
    return path


def int8_report(archive: Path, folder: Path, epochs: int, rounds: int) -> str:
    """Train tinyvit on ``archive``, derive each int8 model, measure them: a Markdown table."""
    import onnxruntime as ort
    import torch

    from vitlab.checkpoint import Normalization
    from vitlab.data.archive import extract_archive, parse_cifar
    from vitlab.data.sources import DATASETS
    from vitlab.export import export_onnx, quantize_onnx
    from vitlab.models import build_model, preset_config
    from vitlab.params import TrainParams
    from vitlab.train import train

    torch.set_num_threads(1)  # training shares the machine: one core
    # parse_cifar reads whatever the batch files hold: a subset archive works as well as the official one.
    data = parse_cifar(extract_archive(archive, folder / "extracted"), DATASETS["cifar10"])
    norm = Normalization(mean=(0.4914, 0.4822, 0.4465), std=(0.2470, 0.2435, 0.2616))
    torch.manual_seed(0)
    arch, config = preset_config("tinyvit")
    model = build_model(arch, config | {"num_classes": 10})
    train_params = TrainParams(
        epochs=epochs, batch_size=128, learning_rate=2e-3, warmup_epochs=1, device="cpu"
    )
    train(model, data.train, None, norm, train_params)
    fp32 = export_onnx(model.eval(), folder / "model.onnx", list(data.class_names), norm, ort_fusions=True)
    calibration = data.train.images[:512]  # as the export stage calibrates
    variants = {
        "fp32 (ORT fusions)": fp32,
        "int8 dynamic (before)": dynamic_int8(fp32, folder / "dynamic.onnx"),
        "int8 weight-only (default)": quantize_onnx(fp32, folder / "weight_only.onnx", "weight_only"),
        "int8 static QDQ": quantize_onnx(fp32, folder / "static.onnx", "static", calibration),
    }
    options = ort.SessionOptions()
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    sessions = {
        label: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        for label, path in variants.items()
    }
    mean, std = np.asarray(norm.mean, np.float32), np.asarray(norm.std, np.float32)
    x = np.ascontiguousarray(((data.test.images / np.float32(255.0) - mean) / std).transpose(0, 3, 1, 2))
    x = x.astype(np.float32)

    def logits(session: ort.InferenceSession, batch: int) -> np.ndarray:
        return np.concatenate(
            [session.run(None, {"images": x[i : i + batch]})[0] for i in range(0, len(x), batch)]
        )

    figures = {}
    for label, session in sessions.items():
        alone, batched = logits(session, 1), logits(session, BATCH)
        figures[label] = {"alone": alone, "batched": batched}
    reference = figures["fp32 (ORT fusions)"]["batched"]
    labels = data.test.labels
    speed: dict[str, dict[str, list[float]]] = {label: {"latency": [], "batch": []} for label in sessions}
    for _ in range(rounds):
        for label, session in sessions.items():
            for key, batch, runs in (("latency", x[:1], 200), ("batch", x[:BATCH], 10)):
                for _ in range(max(3, runs // 5)):
                    session.run(None, {"images": batch})
                seconds = []
                for _ in range(runs):
                    start = time.perf_counter()
                    session.run(None, {"images": batch})
                    seconds.append(time.perf_counter() - start)
                speed[label][key].append(statistics.median(seconds))
    header = (
        "model",
        "accuracy b256",
        "accuracy b1",
        "top-1 changes b1 vs b256",
        "logits changed b1 vs b256",
        "top-1 agreement vs fp32",
        "max \\|logit diff\\| vs fp32",
        "batch 1 (img/s)",
        "batch 256 (img/s)",
        "bytes",
    )
    lines = [
        f"tinyvit, {epochs} epochs on {len(data.train.images):,} images; {len(labels):,} test images; "
        f"torch {torch.__version__}, onnxruntime {ort.__version__}, {THREADS} threads, {rounds} rounds\n",
        "| " + " | ".join(header) + " |",
        "| --- |" + " ---: |" * (len(header) - 1),
    ]
    for label, f in figures.items():
        alone, batched = f["alone"].argmax(1), f["batched"].argmax(1)
        row = (
            label,
            f"{(batched == labels).mean():.4f}",
            f"{(alone == labels).mean():.4f}",
            str(int((alone != batched).sum())),
            str(int((f["alone"] != f["batched"]).any(1).sum())),
            f"{(batched == reference.argmax(1)).mean():.4f}",
            f"{np.abs(f['batched'] - reference).max():.1e}",
            f"{1 / statistics.median(speed[label]['latency']):,.0f}",
            f"{BATCH / statistics.median(speed[label]['batch']):,.0f}",
            f"{variants[label].stat().st_size:,}",
        )
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer rounds and runs (noisier figures)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--child", nargs=4, metavar=("ENGINE", "TARGET", "LATENCY_RUNS", "BATCH_RUNS"))
    parser.add_argument("--int8", type=Path, metavar="ARCHIVE", help="compare int8 methods on this CIFAR-10")
    parser.add_argument("--epochs", type=int, default=12, help="--int8: tinyvit training epochs")
    args = parser.parse_args(argv)
    if args.child:
        engine, target, latency_runs, batch_runs = args.child
        child(engine, target, int(latency_runs), int(batch_runs))
        return 0
    import onnxruntime as ort
    import torch

    warnings.filterwarnings("ignore")  # exporter and quantizer chatter
    if args.int8:
        with tempfile.TemporaryDirectory(prefix="vitlab-bench-int8-") as folder:
            print(int8_report(args.int8, Path(folder), args.epochs, rounds=2 if args.quick else 5))
        return 0
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
