"""The GPU check: one command that proves vitlab's CUDA path on a single-GPU machine in under 10 minutes.

    bash benchmarks/gpu_check.sh --prepare          # here, with the registry: wheels and images in .cache/
    bash benchmarks/gpu_check.sh OUT_DIR            # on the GPU machine, from the repository root, offline
    bash benchmarks/gpu_check.sh --dry-run OUT_DIR  # the same code on a CPU, tiny sizes, no .cache/ needed

gpu_check.sh installs the wheels the GPU image lacks and sets the environment; this program runs four
sections in turn, each measurement time-boxed, and rewrites OUT_DIR/gpu_check.json after every one of them,
so that a run cut short still returns what it measured (its ``status`` then stays "running"):

1. ``cuda_tests``: tests/test_cuda.py under pytest (auto device, bf16 autocast, TF32, channels_last, resume,
   DDP over NCCL in a group of one, a checkpoint loaded onto the GPU), each test's outcome and seconds;
   OUT_DIR/cuda_tests.xml is pytest's JUnit report.
2. ``time_to_accuracy``: resnet and tinyvit trained by ``vitlab.train.train`` with the recipe of
   benchmarks/time_to_accuracy.py (its cosine schedule ends with a wall-clock budget, the cap) on the cached
   training images less a 10% hold-out, until the hold-out's accuracy reaches TARGETS: the seconds (wall
   clock from the call of ``train``, validation included) and epochs it took, every epoch's accuracy, and the
   test accuracy of the weights it stopped with.
3. ``onnx``: the GPU-trained tinyvit exported by ``vitlab.export.export_onnx`` (params.yaml's export
   defaults) and checked by ``verify_onnx`` against ONNX Runtime on the CPU, on the test images, with the
   export section's tolerances; TF32 is off during the comparison (training turns it on).
4. ``throughput``: for every preset, images per second of ``train``'s training loop (forward, backward and
   AdamW on augmented batches, bf16 autocast on the GPU) in its second epoch of ``Sizes.steps`` steps, and
   peak GPU memory in MiB (``torch.cuda.max_memory_allocated``: weights, optimizer state, activations and the
   uint8 images), eager for every preset first, then through ``torch.compile``, whose first epoch
   (``first_epoch_s``) includes compilation. Measurements stop at the deadline: the presets left say
   "skipped".

The dry run (CPU) takes the repository's embedded CIFAR-10 sample instead of .cache/, and gpu_check.sh turns
``torch.compile`` into a no-op (TORCH_COMPILE_DISABLE=1): compiling 8 models on 2 cores would take minutes.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import torch
from time_to_accuracy import RECIPE_OF
from torch import nn

import vitlab
from vitlab import files
from vitlab.checkpoint import Normalization
from vitlab.compat import import_torchvision
from vitlab.cpu import bit_identical
from vitlab.data.archive import prepare_dataset
from vitlab.data.prepared import PreparedDataset, Split
from vitlab.data.sources import DATASETS
from vitlab.device import hardware_description, select_device
from vitlab.errors import VitlabError, exit_code, one_line
from vitlab.evaluate import evaluate
from vitlab.export import ensure_parity, export_onnx, verify_onnx
from vitlab.models import PRESETS, build_model, count_parameters, preset_config
from vitlab.params import DataParams, ExportParams, TrainParams
from vitlab.train import split_train_val, train

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / ".cache/gpu_check"
IMAGES = CACHE / "cifar10.npz"
FULL = REPO.parent / "shared/data/cifar-10-full-python.tar.gz"
FULL_MD5 = "a3ac126cd5a9d0f3403886809dfa994e"  # /work/shared/data/README.md
# The first images of the official order: 16,000 images fill ~35 MB compressed, what travels beside the
# wheels within the GPU machine's 64 MiB (the repository itself takes 12).
CACHED_TRAIN, CACHED_TEST = 12_000, 4_000
TARGETS = {"resnet": 0.60, "tinyvit": 0.50}  # hold-out accuracy to reach
ONNX_PRESET = "tinyvit"
TEST_FILE = "tests/test_cuda.py"


@dataclass(frozen=True)
class Sizes:
    """How much each section does: on a GPU (REAL) or in the dry run on a CPU (DRY). Times in seconds."""

    train_images: int  # the first of the cache's (or the sample's) training images
    test_images: int
    batch_size: int  # throughput's
    steps: int  # throughput: training steps per epoch (the second epoch is timed)
    cap_s: float  # time to accuracy: the wall-clock budget of each model
    tests_timeout_s: float
    deadline_s: float  # from the start: no measurement starts after it
    limit_s: float  # from the start: the measurement in progress is interrupted, the JSON written


REAL = Sizes(CACHED_TRAIN, CACHED_TEST, TrainParams().batch_size, 80, 60, 180, 400, 480)
# Generous times: dry runs took 1 to 2.5 minutes on 2 cores that other work kept busy (load 3 to 5).
DRY = Sizes(192, 32, 8, 1, 2, 120, 300, 400)


# --- The cached images: real CIFAR-10 small enough to travel ------------------------------------------------


def residuals(images: np.ndarray) -> np.ndarray:
    """uint8 (N, H, W, C) images as each pixel minus the ones above and to its left, modulo 256 (PNG's
    filters, in one): natural images then compress to 71% of their bytes instead of 92%."""
    return np.diff(np.diff(images, axis=1, prepend=0), axis=2, prepend=0).astype(np.uint8)


def restore(residual: np.ndarray) -> np.ndarray:
    """The images ``residuals`` was given, exactly: sums along columns, then rows, modulo 256."""
    return np.cumsum(np.cumsum(residual, axis=2, dtype=np.uint8), axis=1, dtype=np.uint8)


def save_images(dataset: PreparedDataset, path: Path, n_train: int, n_test: int) -> None:
    """The first ``n_train`` training and ``n_test`` test images of ``dataset`` as one compressed npz."""
    with files.atomic_path(path) as tmp, open(tmp, "wb") as handle:
        np.savez_compressed(
            handle,
            train_images=residuals(dataset.train.images[:n_train]),
            train_labels=dataset.train.labels[:n_train],
            test_images=residuals(dataset.test.images[:n_test]),
            test_labels=dataset.test.labels[:n_test],
            class_names=np.array(dataset.class_names),
        )


def load_images(path: Path) -> PreparedDataset:
    """What ``save_images`` wrote; VitlabError when there is none (run --prepare first)."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            splits = {
                name: Split(restore(arrays[f"{name}_images"]), arrays[f"{name}_labels"])
                for name in ("train", "test")
            }
            class_names = arrays["class_names"].tolist()
    except (OSError, KeyError, ValueError) as error:
        raise VitlabError(
            f"{path}: no prepared images ({one_line(error)}); run bash benchmarks/gpu_check.sh --prepare"
        ) from None
    return PreparedDataset(splits["train"], splits["test"], class_names, {"source": str(path)})


def prepare() -> None:
    """Cut IMAGES from the full CIFAR-10 archive beside the repository (md5-verified, vitlab's parser)."""
    with tempfile.TemporaryDirectory(prefix="vitlab-gpu-check-") as work:
        data = prepare_dataset(
            DATASETS["cifar10"],
            str(FULL),
            FULL_MD5,
            Path(work, "raw"),
            Path(work, "prepared"),
            progress=False,
        )
    IMAGES.parent.mkdir(parents=True, exist_ok=True)
    save_images(data, IMAGES, CACHED_TRAIN, CACHED_TEST)
    print(f"{IMAGES}: {CACHED_TRAIN:,} train + {CACHED_TEST:,} test images, {IMAGES.stat().st_size:,} bytes")


def sample_images() -> PreparedDataset:
    """The repository's embedded CIFAR-10 sample (real images: the dry run needs no cache)."""
    with tempfile.TemporaryDirectory(prefix="vitlab-gpu-check-") as work:
        return prepare_dataset(
            DATASETS["cifar10-sample"], None, None, Path(work, "raw"), Path(work, "prepared"), progress=False
        )


def first_images(data: PreparedDataset, sizes: Sizes) -> PreparedDataset:
    """The first ``sizes.train_images`` and ``sizes.test_images`` of ``data``'s splits."""
    train_split, test_split = data.train, data.test
    return PreparedDataset(
        Split(train_split.images[: sizes.train_images], train_split.labels[: sizes.train_images]),
        Split(test_split.images[: sizes.test_images], test_split.labels[: sizes.test_images]),
        data.class_names,
        data.info,
    )


# --- The check ----------------------------------------------------------------------------------------------


class OutOfTime(BaseException):
    """Sizes.limit_s interrupted a measurement. A BaseException, so that no ``except Exception`` on the way
    (in torch, say) takes it for an error of its own."""


class Reached(Exception):
    """Raised from ``train``'s epoch callback: the hold-out accuracy reached its target."""


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise OutOfTime in whatever runs ``seconds`` from now (a compilation that never ends, say)."""

    def interrupt(signum: int, frame: Any) -> None:
        raise OutOfTime(f"interrupted by the run's limit of {seconds:.0f} s")

    previous = signal.signal(signal.SIGALRM, interrupt)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


@contextlib.contextmanager
def ieee_fp32() -> Iterator[None]:
    """fp32 matrix products and convolutions in full precision (no TF32) inside the block."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn


def failures(results: dict[str, Any], path: str = "") -> list[str]:
    """Where in ``results`` a measurement raised (an "error" key) or a CUDA test failed."""
    found = [path] if "error" in results or results.get("failed") or results.get("errors") else []
    for key, value in results.items():
        if isinstance(value, dict):
            found += failures(value, f"{path}.{key}" if path else key)
    return found


class Check:
    """One run of the GPU check into ``out``/gpu_check.json: on ``device`` ("cuda"; "cpu" in the dry run),
    with ``sizes``, on ``data``. The JSON is rewritten whenever a measurement ends."""

    def __init__(self, out: Path, device: torch.device, sizes: Sizes, data: PreparedDataset, dry_run: bool):
        self.out, self.device, self.sizes, self.data = out, device, sizes, data
        # Throughput's autocast: bf16 on the GPU; off on a CPU, where bf16 ran some presets 50x slower.
        self.amp = "bf16" if device.type == "cuda" else "off"
        self.path = out / "gpu_check.json"
        self.start = time.perf_counter()
        self.results: dict[str, Any] = {
            "status": "running",
            "elapsed_s": 0.0,
            "environment": environment(device, dry_run),
            "sizes": asdict(sizes),
            "data": {
                "source": data.info["source"],
                "train_images": len(data.train),
                "test_images": len(data.test),
            },
            "sections": {},
        }
        self.trained: dict[str, tuple[nn.Module, Normalization]] = {}

    def run(self) -> None:
        """Every section in turn; VitlabError naming what failed, once the JSON says it."""
        self.out.mkdir(parents=True, exist_ok=True)
        self.save()
        sections = self.results["sections"]
        with time_limit(self.sizes.limit_s):
            self.measure(sections, "cuda_tests", self.cuda_tests)
            tta = sections.setdefault("time_to_accuracy", {})
            for name in TARGETS:
                self.measure(tta, name, lambda section, name=name: self.time_to_accuracy(section, name))
            self.measure(sections, "onnx", self.onnx)
            throughput = sections.setdefault("throughput", self.throughput_settings())
            for kind in ("eager", "compiled"):
                for preset, results in throughput["presets"].items():
                    self.measure(
                        results, kind, lambda section, p=preset, k=kind: self.throughput(section, p, k)
                    )
        failed = failures(sections)
        self.results["status"] = f"failed: {', '.join(failed)}" if failed else "passed"
        self.save()
        print(f"{self.path}: {self.results['status']} in {self.elapsed_s():.0f} s", file=sys.stderr)
        if failed:
            raise VitlabError(f"GPU check failed: {', '.join(failed)} (details in {self.path})")

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start

    def save(self) -> None:
        self.results["elapsed_s"] = round(self.elapsed_s(), 1)
        files.write_json(self.path, self.results)

    def measure(self, parent: dict[str, Any], name: str, action: Callable[[dict[str, Any]], None]) -> None:
        """``action`` on ``parent[name]``, a dict of its own, unless the deadline has passed; what it raises
        is recorded there (a finding, not the end of the run) and the run goes on."""
        section = parent.setdefault(name, {})
        if self.elapsed_s() >= self.sizes.deadline_s:
            section["skipped"] = f"out of time (deadline {self.sizes.deadline_s:.0f} s)"
            return
        print(f"gpu_check: {name}", file=sys.stderr, flush=True)
        started = time.perf_counter()
        try:
            action(section)
        except (Exception, OutOfTime) as error:  # every failure is recorded, and the run goes on
            traceback.print_exc()
            section["error"] = f"{type(error).__name__}: {one_line(error)}"
        section["seconds"] = round(time.perf_counter() - started, 1)
        self.save()

    def cuda_tests(self, section: dict[str, Any]) -> None:
        """tests/test_cuda.py in a pytest of its own; each test's outcome from pytest's JUnit report."""
        report = self.out / "cuda_tests.xml"
        command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={report}"]
        timeout = self.sizes.tests_timeout_s
        run = subprocess.run([*command, TEST_FILE], cwd=REPO, capture_output=True, text=True, timeout=timeout)
        print(run.stdout + run.stderr, file=sys.stderr, flush=True)
        section["exit_code"] = run.returncode
        outcomes = {"failure": "failed", "error": "errors", "skipped": "skipped"}
        tests = {}
        for case in ET.parse(report).iter("testcase"):
            found = next((child for child in case if child.tag in outcomes), None)
            tests[case.get("name")] = {
                "outcome": "passed" if found is None else outcomes[found.tag],
                "seconds": round(float(case.get("time", 0)), 2),
            } | ({} if found is None else {"message": found.get("message", "")[:500]})
        for outcome in ("passed", "failed", "errors", "skipped"):
            section[outcome] = sum(test["outcome"] == outcome for test in tests.values())
        section["tests"] = tests

    def time_to_accuracy(self, section: dict[str, Any], name: str) -> None:
        """Train preset ``name`` until the hold-out reaches TARGETS[name] or the cap is spent; keeps the model
        (the weights it stopped with) and its normalization for the ONNX section."""
        held_out = DataParams()
        train_split, val_split = split_train_val(self.data.train, held_out.val_fraction, held_out.seed)
        norm = Normalization.from_images(train_split.images)
        model = self.model(name)
        params = TrainParams(recipe=RECIPE_OF[name], time_budget_s=self.sizes.cap_s, device=self.device.type)
        target = TARGETS[name]
        epochs: list[dict[str, float]] = []
        section |= {
            "target_val_accuracy": target,
            "reached": False,
            "seconds_to_target": None,
            "epochs_to_target": None,
            "cap_s": self.sizes.cap_s,
            "train_images": len(train_split),
            "val_images": len(val_split),
            "recipe": f"vitlab.recipes' {RECIPE_OF[name]}",
            "epochs": epochs,
        }
        start = time.perf_counter()

        def record(row: dict[str, float]) -> None:
            epochs.append(
                {
                    "epoch": row["epoch"],
                    "elapsed_s": round(time.perf_counter() - start, 2),
                    "train_loss": round(row["train_loss"], 4),
                    "val_accuracy": round(row["val_accuracy"], 4),
                    "images_per_s": round(row["images_per_s"], 1),
                }
            )
            self.save()
            if row["val_accuracy"] >= target:
                section.update(
                    reached=True, seconds_to_target=epochs[-1]["elapsed_s"], epochs_to_target=row["epoch"]
                )
                raise Reached

        with contextlib.suppress(Reached):
            train(model, train_split, val_split, norm, params, on_epoch=record)
        test = evaluate(model, self.data.test, norm, self.data.num_classes, device=self.device)
        section |= {"test_accuracy": round(test.accuracy, 4), "test_images": len(self.data.test)}
        self.trained[name] = model, norm

    def onnx(self, section: dict[str, Any]) -> None:
        """Export the GPU-trained ONNX_PRESET and compare ONNX Runtime (CPU) with it on the test images."""
        if ONNX_PRESET not in self.trained:
            raise VitlabError(f"no {ONNX_PRESET} to export: time_to_accuracy did not train one")
        model, norm = self.trained[ONNX_PRESET]
        export = ExportParams()
        section |= {"preset": ONNX_PRESET, "opset": export.opset, "ort_fusions": export.ort_fusions}
        with tempfile.TemporaryDirectory(prefix="vitlab-gpu-check-") as work:
            path = Path(work) / f"{ONNX_PRESET}.onnx"
            start = time.perf_counter()
            export_onnx(
                model, path, self.data.class_names, norm, export.opset, ort_fusions=export.ort_fusions
            )
            section["export_s"] = round(time.perf_counter() - start, 1)
            with ieee_fp32():
                section |= verify_onnx(path, model, self.data.test.images, norm)
        section["torch_device"] = str(next(model.parameters()).device)
        section["parity"] = ensure_parity(section, export.max_abs_diff, export.min_top1_agreement)

    def throughput_settings(self) -> dict[str, Any]:
        compile_off = os.environ.get("TORCH_COMPILE_DISABLE") == "1"
        return {
            "batch_size": self.sizes.batch_size,
            "timed_steps": self.sizes.steps,
            "amp": self.amp,
            "torch_compile": "off: TORCH_COMPILE_DISABLE=1" if compile_off else "inductor",
            "presets": {preset: {} for preset in PRESETS},
        }

    def throughput(self, section: dict[str, Any], preset: str, kind: str) -> None:
        """Images per second of ``train``'s second epoch of ``sizes.steps`` steps, and its peak GPU memory."""
        n = self.sizes.steps * self.sizes.batch_size
        split = Split(self.data.train.images[:n], self.data.train.labels[:n])
        model = self.model(preset)
        params = TrainParams(
            epochs=2,
            warmup_epochs=1,
            batch_size=self.sizes.batch_size,
            amp=self.amp,
            compile=kind == "compiled",
            device=self.device.type,
        )
        cuda = self.device.type == "cuda"
        if params.compile:
            torch.compiler.reset()  # dynamo's recompilation limit counts per code object, over every preset
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        first, timed = train(model, split, None, Normalization.from_images(split.images), params).history
        section |= {
            "images_per_s": round(timed["images_per_s"], 1),
            "first_epoch_s": round(first["images"] / first["images_per_s"], 2),
            "peak_gpu_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
            "parameters": count_parameters(model),
        }
        del model, first, timed
        gc.collect()
        if cuda:
            torch.cuda.empty_cache()

    def model(self, preset: str) -> nn.Module:
        """A new ``preset`` for the data's classes, from seed 0."""
        torch.manual_seed(0)
        arch, config = preset_config(preset)
        return build_model(arch, config | {"num_classes": self.data.num_classes})


def environment(device: torch.device, dry_run: bool) -> dict[str, Any]:
    """What the run ran on and with."""
    properties = torch.cuda.get_device_properties(device) if device.type == "cuda" else None
    return {
        "dry_run": dry_run,
        "device": str(device),
        "hardware": hardware_description(str(device)),
        "gpu_memory_gib": round(properties.total_memory / 2**30, 1) if properties else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if properties else None,
        "torchvision": import_torchvision().__version__,
        "onnx": onnx.__version__,
        "onnxruntime": ort.__version__,
        "vitlab": vitlab.__version__,
        "cpu_mode": "bit-identical" if bit_identical() else "native",  # vitlab.cpu
    }


def check(out: Path, dry_run: bool) -> None:
    """The run: on the CPU with DRY sizes and the sample, or on the GPU with REAL sizes and the cache."""
    device = select_device("cpu" if dry_run else "auto")
    if device.type != "cuda" and not dry_run:
        raise VitlabError(
            f"no CUDA device: torch {torch.__version__} (CUDA {torch.version.cuda}) sees none; "
            "run this on a GPU machine, or pass --dry-run to run it on the CPU"
        )
    sizes = DRY if dry_run else REAL
    data = first_images(sample_images() if dry_run else load_images(IMAGES), sizes)
    Check(out, device, sizes, data, dry_run).run()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", nargs="?", type=Path, help="folder for gpu_check.json (not with --prepare)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--dry-run", action="store_true", help="on the CPU, tiny sizes, the embedded sample")
    mode.add_argument("--prepare", action="store_true", help=f"write {IMAGES.relative_to(REPO)}")
    args = parser.parse_args(argv)
    if args.prepare == (args.out is not None):
        parser.error("give OUT_DIR, or --prepare alone")
    return exit_code(prepare if args.prepare else lambda: check(args.out, args.dry_run))


if __name__ == "__main__":
    sys.exit(main())
