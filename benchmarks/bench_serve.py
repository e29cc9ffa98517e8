"""`vitlab serve` under load, against `Classifier.predict` in process on the same model and threads.

    python benchmarks/bench_serve.py               # a random-weight tinyvit, as the export stage writes it
    python benchmarks/bench_serve.py --model models/model.onnx
    python benchmarks/bench_serve.py --quick       # a few hundred requests: a smoke run

Loopback only. The server runs in a subprocess (`vitlab serve --threads N`, its defaults otherwise); this
process is the load generator: C connections (C = 1, 8, 64), each sending single-image requests (the PNG
bytes of one 32x32 image) one after another, until --requests answers or --seconds per concurrency, whichever
comes first. It speaks HTTP/1.1 over asyncio streams itself: a full client (httpx) spends about as much CPU
per request as the server, on the same cores. Every answer's top label is checked against the in-process one.

In process: `Classifier.predict` on the decoded uint8 images with the same threads, batch 1 (latency) and
batch 256 (throughput), measured before and after the server's runs (both printed; the ratios use their
mean). Speed does not depend on training, so random weights measure the same. Memory: the server's resident
set (/proc, Linux) after a warm-up at the highest concurrency, after each measured concurrency, and its peak.
Speed depends on the machine and its load: the figures are this run's, side by side.
"""

from __future__ import annotations

import argparse
import asyncio
import io
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from vitlab.inference import Classifier, decode_image

CONCURRENCY = (1, 8, 64)
IMAGES = 256  # distinct images the requests cycle through; also the in-process throughput batch


@dataclass
class Load:
    """One concurrency's measurement."""

    concurrency: int
    answers: int
    seconds: float
    latencies_ms: list[float]
    wrong: int  # answers whose top label differs from the in-process one, or that are not 200

    @property
    def img_s(self) -> float:
        return self.answers / self.seconds


def random_model(folder: Path) -> Path:
    """A tinyvit with random weights, exported as the export stage does (ONNX Runtime fusions)."""
    import torch

    from vitlab.checkpoint import Normalization
    from vitlab.export import export_onnx
    from vitlab.models import build_model, preset_config

    arch, config = preset_config("tinyvit")
    torch.manual_seed(0)
    model = build_model(arch, config | {"num_classes": 10}).eval()
    norm = Normalization(mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))
    classes = [f"class_{i}" for i in range(10)]
    return export_onnx(model, folder / "tinyvit.onnx", classes, norm, ort_fusions=True)


def pngs(classifier: Classifier, n: int) -> tuple[list[bytes], np.ndarray]:
    """n random images of the model's geometry: their PNG bytes, and the uint8 arrays the server decodes."""
    size, channels = classifier.image_size, classifier.channels
    pixels = np.random.default_rng(0).integers(0, 256, (n, size, size, channels), dtype=np.uint8)
    encoded = []
    for image in pixels:
        buffer = io.BytesIO()
        Image.fromarray(image.squeeze(-1) if channels == 1 else image).save(buffer, format="PNG")
        encoded.append(buffer.getvalue())
    decoded = np.stack([decode_image(io.BytesIO(b), "bench", size, channels) for b in encoded])
    assert np.array_equal(decoded, pixels)  # PNG is lossless: the server sees these very pixels
    return encoded, pixels


def in_process(model: Path, threads: int, images: np.ndarray, runs: int) -> dict[str, float]:
    """Batch-1 p50/p99 latency (ms) and batch-256 img/s of Classifier.predict, after a warm-up."""
    classifier = Classifier(model, provider="cpu", threads=threads)
    for _ in range(3):
        classifier.predict(images)
    latencies = []
    for i in range(runs):
        start = time.perf_counter()
        classifier.predict(images[i % len(images)][None])
        latencies.append(1e3 * (time.perf_counter() - start))
    batches = []
    for _ in range(max(3, runs // 50)):
        start = time.perf_counter()
        classifier.predict(images, batch_size=len(images))
        batches.append(time.perf_counter() - start)
    return {
        "batch1_img_s": 1e3 / statistics.median(latencies),
        "p50_ms": statistics.median(latencies),
        "p99_ms": float(np.percentile(latencies, 99)),
        "img_s": len(images) / statistics.median(batches),
    }


async def _load(
    port: int, requests: list[bytes], expected: list[str], concurrency: int, budget: int, seconds: float
) -> Load:
    remaining = budget
    latencies: list[float] = []
    wrong = 0
    deadline = time.perf_counter() + seconds

    async def connection(offset: int) -> None:
        nonlocal remaining, wrong
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = offset
        while remaining > 0 and time.perf_counter() < deadline:
            remaining -= 1
            start = time.perf_counter()
            writer.write(requests[i % len(requests)])
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)[1])
            body = await reader.readexactly(length)
            latencies.append(1e3 * (time.perf_counter() - start))
            status = int(head.split(b" ", 2)[1])
            if (
                status != 200
                or json.loads(body)["predictions"][0]["labels"][0] != expected[i % len(expected)]
            ):
                wrong += 1
            i += 1
        writer.close()

    start = time.perf_counter()
    await asyncio.gather(*(connection(c * 7) for c in range(concurrency)))
    return Load(concurrency, len(latencies), time.perf_counter() - start, latencies, wrong)


def memory_mib(pid: int) -> dict[str, float]:
    """The process's resident set now (VmRSS) and at its peak (VmHWM), MiB."""
    status = Path(f"/proc/{pid}/status").read_text()
    return {key: int(re.search(rf"{key}:\s+(\d+) kB", status)[1]) / 1024 for key in ("VmRSS", "VmHWM")}


def start_server(model: Path, threads: int) -> tuple[subprocess.Popen, int]:
    command = [sys.executable, "-m", "vitlab.cli", "serve", str(model), "--port", "0", "--provider", "cpu"]
    server = subprocess.Popen([*command, "--threads", str(threads)], stdout=subprocess.PIPE, text=True)
    found = re.search(r"http://127\.0\.0\.1:(\d+)", server.stdout.readline())
    if not found:
        server.kill()
        sys.exit("error: the server did not start (its error is above)")
    return server, int(found[1])


def markdown(before: dict, after: dict, loads: list[Load], memory: dict, threads: int) -> str:
    base = {key: (before[key] + after[key]) / 2 for key in before}

    def both(key: str, form: str) -> str:
        return f"{format(before[key], form)} / {format(after[key], form)}"

    rows = [
        "| run | img/s | p50 (ms) | p99 (ms) | vs in process |",
        "| --- | ---: | ---: | ---: | --- |",
        f"| in process, batch 1 (before / after) | {both('batch1_img_s', ',.0f')} "
        f"| {both('p50_ms', '.2f')} | {both('p99_ms', '.2f')} | |",
        f"| in process, batch {IMAGES} (before / after) | {both('img_s', ',.0f')} | | | |",
    ]
    for load in loads:
        p50, p99 = statistics.median(load.latencies_ms), float(np.percentile(load.latencies_ms, 99))
        versus = f"{load.img_s / base['img_s']:.0%} of batch {IMAGES} img/s"
        if load.concurrency == 1:
            versus = f"p50 {p50 - base['p50_ms']:+.2f} ms over batch 1; {versus}"
        rows.append(
            f"| serve, {load.concurrency} connection(s), {load.answers:,} requests | {load.img_s:,.0f} "
            f"| {p50:.2f} | {p99:.2f} | {versus} |"
        )
    wrong = sum(load.wrong for load in loads)
    levels = ", ".join(f"{memory[c]:.1f} after {c} connection(s)" for c in CONCURRENCY)
    growth = memory[CONCURRENCY[-1]] - memory["warm"]
    rows += [
        "",
        f"Single-image requests over loopback; the server and the in-process runs on {threads} ONNX Runtime "
        f"thread(s); {wrong} answers differed from the in-process top label or were not 200.",
        f"Server memory (RSS, MiB): {memory['warm']:.1f} after the warm-up, {levels}; "
        f"peak {memory['peak']:.1f}; growth after the warm-up {growth:+.1f}.",
    ]
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, help="a vitlab ONNX model (default: a random-weight tinyvit)")
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads, both sides")
    parser.add_argument("--requests", type=int, default=5000, help="answers per concurrency, at most")
    parser.add_argument("--seconds", type=float, default=30.0, help="seconds per concurrency, at most")
    parser.add_argument("--quick", action="store_true", help="300 requests, 5 s per concurrency")
    args = parser.parse_args(argv)
    requests_per_level, seconds = (300, 5.0) if args.quick else (args.requests, args.seconds)
    latency_runs = 100 if args.quick else 1000

    with tempfile.TemporaryDirectory() as tmp:
        model = args.model or random_model(Path(tmp))
        classifier = Classifier(model, provider="cpu", threads=args.threads)
        encoded, pixels = pngs(classifier, IMAGES)
        names = classifier.class_names
        expected = [names[i] for i in classifier.predict(pixels).argmax(1)]
        del classifier
        head = "POST /predict?top_k=1 HTTP/1.1\r\nHost: bench\r\nContent-Type: image/png\r\n"
        requests = [f"{head}Content-Length: {len(png)}\r\n\r\n".encode() + png for png in encoded]

        before = in_process(model, args.threads, pixels, latency_runs)
        server, port = start_server(model, args.threads)
        memory: dict = {}
        loads = []
        try:
            # At the highest concurrency, every connection answered a few times: the buffers a level needs.
            warmup = (CONCURRENCY[-1], max(requests_per_level // 5, 4 * CONCURRENCY[-1]), seconds / 5)
            asyncio.run(_load(port, requests, expected, *warmup))
            memory["warm"] = memory_mib(server.pid)["VmRSS"]
            for concurrency in CONCURRENCY:
                load = asyncio.run(_load(port, requests, expected, concurrency, requests_per_level, seconds))
                loads.append(load)
                memory[concurrency] = memory_mib(server.pid)["VmRSS"]
                print(f"{concurrency} connection(s): {load.img_s:,.0f} img/s", file=sys.stderr)
            memory["peak"] = memory_mib(server.pid)["VmHWM"]
        finally:
            server.terminate()
            server.wait(timeout=120)
        after = in_process(model, args.threads, pixels, latency_runs)
    print(markdown(before, after, loads, memory, args.threads))
    return 0 if server.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
