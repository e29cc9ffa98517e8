"""The machine a run uses: the torch device, and a one-line description of the hardware for reports."""

from __future__ import annotations

import os
import platform

import torch

from vitlab import cpu_info
from vitlab.errors import VitlabError


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


def hardware_description(device: str) -> str:
    """The GPU's name for a CUDA device, else the CPU model, the cores this process may use, torch's intra-op
    threads and ATen's instruction set (the last two decide a CPU run's bits: vitlab/__init__.py)."""
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(0)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    capability = torch.backends.cpu.get_cpu_capability()
    model = cpu_info("model name") or platform.processor() or platform.machine()
    return f"{model}, {cores} CPU cores, {torch.get_num_threads()} threads, {capability}"
