"""The machine a run uses: the torch device, its mixed precision, a check that an optional backend
(torch.compile's) works here, and descriptions of the hardware for reports."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from torch import nn

from vitlab.cpu import PINS, bit_identical, cpu_has, cpu_info
from vitlab.errors import VitlabError, one_line

_NO_COMPILE = "set train.compile: false"


def select_device(choice: str = "auto") -> torch.device:
    """The torch device for ``train.device``: "auto" picks cuda, then mps, then cpu.

    Raises VitlabError when an explicitly chosen device is not available on this machine.
    """
    available = {
        "cuda": torch.cuda.is_available(),
        "mps": getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available(),
        "cpu": True,
    }
    if choice == "auto":
        return torch.device(next(name for name, ok in available.items() if ok))
    if not available.get(choice, False):
        raise VitlabError(f"train.device={choice!r} is not available on this machine (use auto or cpu)")
    return torch.device(choice)


def check_compile(device: torch.device) -> None:
    """Check, before any training, what ``train.compile: true`` needs on ``device``: TorchInductor compiles
    the model's kernels with a C++ compiler (the CPU's, and Triton's launchers on CUDA), found as inductor
    finds it (``CXX``, else g++; clang++ on macOS), which must compile a trivial file; on CUDA also Triton.
    Nothing to check when ``TORCH_COMPILE_DISABLE=1`` turns torch.compile off, or on MPS (Metal shaders).

    Raises VitlabError, one line naming ``train.compile``, when something is missing: without this check the
    first training step failed with a 127-line traceback from inside torch.compile.
    """
    import torch._dynamo

    if torch._dynamo.config.disable or device.type not in ("cpu", "cuda"):
        return
    from torch._inductor.cpp_builder import get_cpp_compiler

    try:
        compiler = get_cpp_compiler()
        with tempfile.TemporaryDirectory(prefix="vitlab-cxx-") as folder:
            probe = Path(folder) / "probe.cpp"
            probe.write_text("#include <cmath>\nint main() { return std::isfinite(1.0) ? 0 : 1; }\n")
            done = subprocess.run(
                [compiler, str(probe), "-o", str(Path(folder) / "probe")],
                capture_output=True,
                text=True,
                timeout=120,
            )
    except (OSError, subprocess.SubprocessError, RuntimeError) as error:  # inductor's InvalidCxxCompiler
        raise VitlabError(
            f"train.compile: true needs a C++ compiler for torch.compile ({one_line(error)}); {_NO_COMPILE}, "
            "or install g++ (or set CXX to a compiler)"
        ) from None
    if done.returncode:
        reason = one_line(RuntimeError(done.stderr)) if done.stderr.strip() else f"exit {done.returncode}"
        raise VitlabError(
            f"train.compile: true needs a working C++ compiler for torch.compile, and {compiler} cannot "
            f"compile a trivial file ({reason}); {_NO_COMPILE}, or fix the compiler (or set CXX)"
        )
    if device.type == "cuda":
        from torch.utils._triton import has_triton

        if not has_triton():
            raise VitlabError(
                f"train.compile: true on CUDA needs Triton, which is not installed or finds no GPU it "
                f"supports; {_NO_COMPILE}, or pip install triton"
            )


@contextlib.contextmanager
def compile_backend(enabled: bool, device: str) -> Iterator[None]:
    """Around a stage that trains with ``train.compile`` = ``enabled`` on ``train.device`` = ``device``:
    first ``check_compile`` (when enabled), then, inside the block, a failure of torch.compile's backend
    (TorchInductor, Triton) becomes one VitlabError line naming ``train.compile``; every other exception
    passes unchanged."""
    if enabled:
        check_compile(select_device(device))
    try:
        yield
    except Exception as error:
        if not enabled:
            raise
        from torch._dynamo.exc import BackendCompilerFailed

        if not isinstance(error, BackendCompilerFailed):
            raise
        reason = one_line(error.inner_exception)  # the error's own first line only names the backend
        raise VitlabError(f"train.compile: torch.compile failed ({reason}); {_NO_COMPILE}") from None


def hardware_description(device: str) -> str:
    """The GPU's name for a CUDA device, else the CPU model, the cores this process may use, torch's intra-op
    threads and ATen's instruction set (the last two decide a CPU run's bits: vitlab.cpu)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    capability = torch.backends.cpu.get_cpu_capability()
    model = cpu_info("model name") or platform.processor() or platform.machine()
    return f"{model}, {cores} CPU cores, {torch.get_num_threads()} threads, {capability}"


def cpu_record() -> dict[str, str | int]:
    """What decides a CPU run's bits, for reports/train/run.json: the CPU's vendor ("GenuineIntel",
    "AuthenticAMD"), model name and "family/model" numbers (/proc/cpuinfo: a virtual machine may show a
    generic name, "AMD EPYC", for every generation), ATen's instruction set ("AVX2", "AVX512"), torch's
    intra-op threads and the mode in effect: "bit-identical" when every pin of that mode is (vitlab.cpu.PINS,
    with ATen on AVX2: a process that loaded torch before the pins were set has not), else "native"."""
    pinned = PINS.items() <= os.environ.items() and torch.backends.cpu.get_cpu_capability() == "AVX2"
    return {
        "vendor": cpu_info("vendor_id") or platform.machine(),
        "model": cpu_info("model name") or platform.processor() or platform.machine(),
        "family_model": f"{cpu_info('cpu family')}/{cpu_info('model')}",
        "isa": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        "mode": "bit-identical" if pinned else "native",
    }


def native_bf16() -> bool:
    """Whether this CPU computes bf16 in hardware (AVX512-BF16 or AMX-BF16, as /proc/cpuinfo lists them);
    elsewhere oneDNN emulates it, slower than float32."""
    return cpu_has("avx512_bf16") or cpu_has("amx_bf16")


def uses_bf16(amp: str, device: torch.device, model: nn.Module) -> bool:
    """Whether training ``model`` on ``device`` runs under bf16 autocast for ``train.amp`` ("auto", "bf16",
    "off"); the weights and optimizer stay float32 either way.

    "auto" picks bf16 only where it is measured faster: on a CUDA device with bf16, and on a CPU with native
    bf16 (``native_bf16``) for a model with more than one convolution, outside the bit-identical mode (which
    caps oneDNN to AVX2, where bf16 is emulated, and whose bits are float32's). Measured on a Zen 5 EPYC
    (AVX512-BF16, 2 threads, batch 128; issue 24): bf16 made the training step of ResNet-20 and of CCT-2/3x2
    (a convolutional tokenizer) faster (629-863 img/s against 388-627 in float32; 368-549 against 210-389)
    and tinyvit's (one patch convolution, then Linear layers of width 64-128) slower, so a model of Linear
    layers stays float32. Where nothing was measured (mps, a CPU without native bf16) "auto" is float32.
    """
    if amp != "auto":
        return amp == "bf16"
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    convolutions = sum(isinstance(m, nn.Conv2d) for m in model.modules())
    return device.type == "cpu" and convolutions > 1 and native_bf16() and not bit_identical()


def autocast(amp: str, device: torch.device, model: nn.Module) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` where ``uses_bf16`` says so, else a context that changes nothing."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=uses_bf16(amp, device, model))
