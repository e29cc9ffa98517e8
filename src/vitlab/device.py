"""The machine a run uses: the torch device, a check that an optional backend (torch.compile's) works here,
and a one-line description of the hardware for reports."""

from __future__ import annotations

import contextlib
import os
import platform
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch

from vitlab import cpu_info
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
    threads and ATen's instruction set (the last two decide a CPU run's bits: vitlab/__init__.py)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    capability = torch.backends.cpu.get_cpu_capability()
    model = cpu_info("model name") or platform.processor() or platform.machine()
    return f"{model}, {cores} CPU cores, {torch.get_num_threads()} threads, {capability}"
