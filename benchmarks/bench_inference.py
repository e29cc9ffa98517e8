"""CPU inference speed: ONNX Runtime fp32 and int8 against PyTorch eager, for three vitlab models.

    python benchmarks/bench_inference.py            # 1-2 minutes on 2 cores
    python benchmarks/bench_inference.py --quick    # fewer repetitions, for a smoke run

Weights are random: speed does not depend on training. Every engine runs on 2 threads in one process, the
engines taking turns run by run, so the ratios compare figures taken under the same machine load. Prints a
Markdown table.
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
from vitlab.models import build_model

THREADS = 2
MODELS = {
    "tinyvit": ("vit", {"patch_size": 4, "dim": 64, "depth": 6, "heads": 4, "mlp_dim": 128}),
    "vit-c100": (
        "vit",
        {"patch_size": 4, "dim": 192, "depth": 6, "heads": 8, "mlp_dim": 256, "num_classes": 100},
    ),
    "cnn": ("cnn", {}),
}
NORM = Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def session(path: Path) -> Callable[[np.ndarray], object]:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.intra_op_num_threads = THREADS
    options.log_severity_level = 3
    # The engines take turns; ORT's idle threads would otherwise spin on the cores the next engine needs.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda x: sess.run(None, {"images": x})


def timings(engines: dict[str, Callable[[np.ndarray], object]], x: np.ndarray, repeats: int) -> dict:
    """Seconds per run of each engine. The engines take turns, one run each per round, so a burst of load
    from elsewhere on the machine slows all of them alike instead of skewing the ratios."""
    seconds: dict[str, list[float]] = {name: [] for name in engines}
    for round_ in range(max(3, repeats // 10) + repeats):  # the first rounds warm up arenas and caches
        for name, run in engines.items():
            start = time.perf_counter()
            run(x)
            if round_ >= max(3, repeats // 10):
                seconds[name].append(time.perf_counter() - start)
    return seconds


def fused(path: Path, config: dict, out: Path) -> Path:
    """ORT's transformer optimizer (model_type "vit"): LayerNorm, SkipLayerNorm, Gelu, Attention fusions."""
    model = optimize_model(str(path), model_type="vit", num_heads=config["heads"], hidden_size=config["dim"])
    model.save_model_to_file(str(out))
    return out


def bench_model(name: str, folder: Path, quick: bool) -> list[dict]:
    arch, config = MODELS[name]
    torch.manual_seed(0)
    model = build_model(arch, config).eval()
    classes = [f"class_{i}" for i in range(model.cfg.num_classes)]
    fp32 = export_onnx(model, folder / f"{name}.onnx", classes, NORM)
    engines: dict[str, Callable[[np.ndarray], object]] = {}

    def eager(x: np.ndarray) -> object:
        with torch.inference_mode():
            return model(torch.from_numpy(x))

    engines["pytorch eager"] = eager
    engines["ORT fp32"] = session(fp32)
    if arch == "vit":
        engines["ORT fp32 + transformer optimizer"] = session(
            fused(fp32, config, folder / f"{name}.fused.onnx")
        )
    engines["ORT int8 (dynamic)"] = session(quantize_onnx(fp32, folder / f"{name}.int8.onnx"))

    rng = np.random.default_rng(0)
    one = rng.standard_normal((1, 3, 32, 32), dtype=np.float32)
    batch = rng.standard_normal((256, 3, 32, 32), dtype=np.float32)
    expected = eager(batch).numpy()
    latency = timings(engines, one, 50 if quick else 200)
    throughput = timings(engines, batch, 3 if quick else 10)
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
        "| batch 256 vs eager | batch 256 vs ORT fp32 | max \\|logit diff\\| vs eager |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for row in rows:
        same = {r["engine"]: r for r in rows if r["model"] == row["model"]}
        eager, ort_fp32 = same["pytorch eager"], same["ORT fp32"]
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
