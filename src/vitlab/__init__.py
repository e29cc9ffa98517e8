"""vitlab: Vision Transformers on CIFAR, from download to ONNX Runtime.

The library knows nothing about DVC or the repository layout: functions take arrays, tensors, dataclasses and
paths. ``pipeline/`` and the ``vitlab`` CLI are thin callers of the same functions.
"""

import os

__version__ = "0.1.0"

# torch runs each operator on a team of OpenMP threads that meet at a barrier when it ends, and GNU OpenMP's
# default makes a thread that arrives first spin ~300,000 times before it sleeps. When another process shares
# a core, the thread there waits for its time slices while its sibling spins on the other core: training on
# 2 cores with one busy fell to a fifth of its speed (benchmarks/bench_under_load.py). PASSIVE makes waiting
# threads sleep at once, so the scheduler can run the late one on the freed core; results are unchanged (it
# decides only how threads wait). OpenMP reads this once, when torch loads it: vitlab must be imported first
# (every entry point does); a user's own OMP_WAIT_POLICY or GOMP_SPINCOUNT is left as it is.
if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
    os.environ["OMP_WAIT_POLICY"] = "PASSIVE"

# The same bits on every Intel x86-64 CPU with AVX2 and FMA (README, "Across CPUs"). The libraries torch calls
# pick their code by the CPU they run on, and each choice rounds differently from the first training step on:
# MKL (Linear layers, attention's matrix products), oneDNN (convolutions, GELU) and ATen's own kernels
# (LayerNorm, softmax, reductions, AdamW) by instruction set, and reductions by the number of threads. Pinned
# here: ATen and oneDNN to their AVX2 code, MKL to its AVX2 branch in conditional numerical reproducibility
# mode, and 2 intra-op threads (also on 1 core, or 16). benchmarks/bench_cpu_repro.py measured it on an
# AVX-512 Xeon: unpinned, every instruction set and thread count it played trained other weights; pinned, all
# trained the weights an AVX2-only Intel CPU trains unpinned. MKL honours its AVX2 branch on Intel CPUs only
# (MKL's documentation): on AMD it runs its own code, so bits may differ there; MKL_CBWR=COMPATIBLE is the
# branch MKL documents for every x86-64 CPU, at a quarter of the speed, so it is left to the user. Each
# variable is read once, when torch loads: vitlab must be imported first (every entry point does). A variable
# the user set is kept; VITLAB_PIN_CPU=0 pins nothing; a CPU without AVX2 and FMA is not pinned.
# torch.compile's C++ kernels take their vector width from ATEN_CPU_CAPABILITY but are built with
# -march=native: under the other pins alone, a compiled MLP diverged on an AVX-512 Xeon (loss 1e34 at its
# second step, in CI) while it trained like eager on an AVX2-only EPYC. x86-64-v3, the instruction set level
# of AVX2 and FMA CPUs (gcc 11 or later), builds the kernels an AVX2 CPU builds, on every CPU.
CPU_PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "OMP_NUM_THREADS": "2",
    "TORCHINDUCTOR_CPP_MARCH": "x86-64-v3",
}


def cpu_info(field: str) -> str:
    """The value of the first ``field`` line of Linux's /proc/cpuinfo ("model name", "vendor_id": e.g.
    "GenuineIntel" or "AuthenticAMD", "flags"); "" where there is none or the file is missing (another OS)."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as cpuinfo:
            line = next((line for line in cpuinfo if line.split(":", 1)[0].strip() == field), "")
    except OSError:
        return ""
    return line.partition(":")[2].strip()


def cpu_has(*flags: str) -> bool:
    """Whether this CPU has every one of ``flags`` ("avx2", "fma", "avx512f"...), as Linux lists them in
    /proc/cpuinfo; False where that file cannot be read (another OS)."""
    found = cpu_info("flags").split()
    return all(flag in found for flag in flags)


if os.environ.get("VITLAB_PIN_CPU", "1") != "0" and cpu_has("avx2", "fma"):
    for _name, _value in CPU_PINS.items():
        os.environ.setdefault(_name, _value)
