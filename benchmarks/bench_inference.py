"""CPU inference speed: ONNX Runtime fp32 and int8 against PyTorch eager, for three vitlab models.

    python benchmarks/bench_inference.py            # about 3 minutes on 2 cores
    python benchmarks/bench_inference.py --quick    # fewer repetitions, for a smoke run

Weights are random: speed does not depend on training. Every engine runs on 2 threads in one process with its
default threading (ORT's workers spin briefly between ops, as in serving). The engines take turns in blocks
of runs, round after round, so that every engine sees the same machine load over the whole measurement while
no engine's spinning threads overlap another's timed runs: the first runs of each block are warm-up and not
counted. Prints a Markdown table.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from onnxruntime.transformers.optimizer import optimize_model

from vitlab.checkpoint import Normalization
from vitlab.export import export_onnx, quantize_onnx
from vitlab.models import build_model, preset_spec

THREADS = 2
SHIPPED = "ORT fp32, ORT fusions"  # what the export stage writes: the reference of the int8 rows
# (preset, classes): the presets serving users start from; vit-c100 with its CIFAR-100 head.
MODELS = {"tinyvit": 10, "vit-c100": 100, "cnn-small": 10}
NORM = Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def session(path: Path) -> Callable[[np.ndarray], object]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"images": x})


def timings(
    engines: dict[str, Callable[[np.ndarray], object]], x: np.ndarray, runs: int, rounds: int
) -> dict[str, list[float]]:
    """Seconds per run of each engine: ``rounds`` rounds, each giving every engine a block of ``runs`` timed
    runs after warm-up runs. Blocks, rather than single runs, keep one engine's threads from spinning
    through the next engine's timed run; the rounds spread any change in machine load over all engines."""
    warmup = max(2, runs // 5)
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for _ in range(rounds):
        for name, run in engines.items():
            for i in range(warmup + runs):
                start = time.perf_counter()
                run(x)
                if i >= warmup:
                    seconds[name].append(time.perf_counter() - start)
    return seconds


def fused(path: Path, config: dict, out: Path) -> Path:
    """onnxruntime's own transformer optimizer (model_type "vit"), the alternative to onnxscript's fusions."""
    model = optimize_model(str(path), model_type="vit", num_heads=config["heads"], hidden_size=config["dim"])
    model.save_model_to_file(str(out))
    return out


def bench_model(name: str, folder: Path, quick: bool) -> list[dict]:
    arch, config = preset_spec(name)
    torch.manual_seed(0)
    model = build_model(arch, config | {"num_classes": MODELS[name]}).eval()
    classes = [f"class_{i}" for i in range(model.cfg.num_classes)]
    plain = export_onnx(model, folder / f"{name}.plain.onnx", classes, NORM)
    fp32 = export_onnx(model, folder / f"{name}.onnx", classes, NORM, ort_fusions=True)
    engines: dict[str, Callable[[np.ndarray], object]] = {}

    def eager(x: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    engines["pytorch eager"] = eager
    engines["ORT fp32, plain ONNX"] = session(plain)
    if arch == "vit":
        engines["ORT fp32, transformer optimizer"] = session(
            fused(plain, config, folder / f"{name}.optimizer.onnx")
        )
    engines[SHIPPED] = session(fp32)
    engines["ORT int8 dynamic"] = session(quantize_onnx(fp32, folder / f"{name}.int8.onnx"))
    calibration = np.random.default_rng(1).integers(0, 256, (64, 32, 32, 3), dtype=np.uint8)
    engines["ORT int8 static QDQ"] = session(
        quantize_onnx(fp32, folder / f"{name}.qdq.onnx", "static", calibration)
    )

    rng = np.random.default_rng(0)
    one = rng.standard_normal((1, 3, 32, 32), dtype=np.float32)
    batch = rng.standard_normal((256, 3, 32, 32), dtype=np.float32)
    expected = eager(batch).numpy()
    latency = timings(engines, one, runs=20, rounds=3 if quick else 10)
    throughput = timings(engines, batch, runs=2, rounds=2 if quick else 6)
    rows = []
    for engine, run in engines.items():
        output = run(batch)
        logits = output if isinstance(output, torch.Tensor) else output[0]
        rows.append(
            {
                "model": name,
                "engine": engine,
                "p50_ms": 1e3 * statistics.median(latency[engine]),
                "p99_ms": 1e3 * float(np.percentile(latency[engine], 99)),
                "img_s": 256 / statistics.median(throughput[engine]),
                "max_diff": float(np.abs(np.asarray(logits) - expected).max()),
            }
        )
    return rows


def markdown(rows: list[dict]) -> str:
    lines = [
        "| model | engine | batch 1 p50 (ms) | batch 1 p99 (ms) | batch 1 vs eager | batch 256 (img/s) "
        f"| batch 256 vs eager | batch 256 vs {SHIPPED} | max \\|logit diff\\| vs eager |",
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
    parser.add_argument("--quick", action="store_true", help="fewer repetitions (noisier figures)")
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    args = parser.parse_args(argv)
    torch.set_num_threads(THREADS)
    warnings.filterwarnings("ignore")  # exporter and quantizer chatter
    with tempfile.TemporaryDirectory(prefix="vitlab-bench-") as folder:
        rows = [row for name in args.models for row in bench_model(name, Path(folder), args.quick)]
    print(f"torch {torch.__version__}, onnxruntime {ort.__version__}, {THREADS} threads\n")
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
