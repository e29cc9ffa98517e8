"""The CPU a run uses, and the two ways vitlab's entry points set up its libraries before torch loads.

Importing vitlab sets nothing: a notebook or a program that imports the library keeps its own threads and
settings. vitlab's own entry points (``pipeline/run.py``, the ``vitlab`` command, the benchmarks that train)
call ``prepare_process`` before torch loads, which gives one of two modes:

- **native** (the default): torch's own choices, so training uses the cores the process may use (torch
  counts ``os.sched_getaffinity``'s physical cores) and the fastest code the CPU has (AVX-512, AMX, native
  bf16). The bits of a run then depend on the CPU: the libraries torch calls pick their code by instruction
  set, and each choice rounds differently from the first training step on.
- **bit-identical** (``VITLAB_BIT_IDENTICAL=1``): ``PINS`` below, the same bits on every Intel x86-64 CPU
  with AVX2 and FMA whatever its instruction set and core count, at the cost of its faster code.

Why an environment variable and not a params.yaml key: the libraries read these settings once, when torch
loads, before any params file is parsed; and the mode decides how a run is computed, not what is computed,
so changing it must not make DVC re-run a stage.
"""

from __future__ import annotations

import functools
import os

from vitlab.errors import VitlabError

BIT_IDENTICAL = "VITLAB_BIT_IDENTICAL"

# The libraries torch calls pick their code by the CPU they run on: MKL (Linear layers, attention's matrix
# products), oneDNN (convolutions, GELU) and ATen's own kernels (LayerNorm, softmax, reductions, AdamW) by
# instruction set, and reductions by the number of threads. The bit-identical mode pins ATen and oneDNN to
# their AVX2 code, MKL to its AVX2 branch in conditional numerical reproducibility mode, and 2 intra-op
# threads (also on 1 core, or 16). benchmarks/bench_cpu_repro.py measured it on an AVX-512 Xeon: unpinned,
# every instruction set and thread count it played trained other weights; pinned, all trained the weights an
# AVX2-only Intel CPU trains unpinned (benchmarks/results/cpu_repro.json). MKL honours its AVX2 branch on
# Intel CPUs only (MKL's documentation): on AMD it runs its own code, so the bits may differ from Intel's
# there, and between AMD models; MKL_CBWR=COMPATIBLE is the branch MKL documents for every x86-64 CPU, at a
# quarter of the speed, so it is left to the user (a variable the user set is kept).
# torch.compile's C++ kernels take their vector width from ATEN_CPU_CAPABILITY but are built with
# -march=native: under the other pins alone, a compiled MLP diverged on an AVX-512 Xeon (loss 1e34 at its
# second step) while it trained like eager on an AVX2-only EPYC. x86-64-v3, the instruction set level of AVX2
# and FMA CPUs (gcc 11 or later), builds the kernels an AVX2 CPU builds, on every CPU.
PINS = {
    "ATEN_CPU_CAPABILITY": "avx2",
    "ONEDNN_MAX_CPU_ISA": "AVX2",
    "MKL_CBWR": "AVX2",
    "OMP_NUM_THREADS": "2",
    "TORCHINDUCTOR_CPP_MARCH": "x86-64-v3",
}


@functools.cache  # a training step may ask (vitlab.device.uses_bf16); the answer never changes
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
    """Whether this CPU has every one of ``flags`` ("avx2", "fma", "avx512f", "avx512_bf16"...), as Linux
    lists them in /proc/cpuinfo; False where that file cannot be read (another OS)."""
    found = cpu_info("flags").split()
    return all(flag in found for flag in flags)


def bit_identical() -> bool:
    """Whether this process runs in the bit-identical mode (``VITLAB_BIT_IDENTICAL=1``).

    Raises VitlabError for a value other than 1, 0 or empty, and for the mode on a CPU without AVX2 and FMA,
    which has no AVX2 code to pin to.
    """
    value = os.environ.get(BIT_IDENTICAL, "").strip()
    if value not in ("", "0", "1"):
        raise VitlabError(f"{BIT_IDENTICAL}={value!r}: expected 1 (bit-identical mode) or 0 (native)")
    if value == "1" and not cpu_has("avx2", "fma"):
        raise VitlabError(
            f"{BIT_IDENTICAL}=1 needs an x86-64 CPU with AVX2 and FMA (Linux); this one has not"
        )
    return value == "1"


def prepare_process() -> None:
    """Set up this process's libraries for a vitlab entry point; call it before torch loads (they read these
    variables once, then): a no-op for the settings of a library already loaded.

    OpenMP's wait policy: torch runs each operator on a team of OpenMP threads that meet at a barrier when it
    ends, and GNU OpenMP's default makes a thread that arrives first spin ~300,000 times before it sleeps.
    When another process shares a core, the thread there waits for its time slices while its sibling spins on
    the other core: training on 2 cores with one busy fell to a fifth of its speed
    (benchmarks/bench_under_load.py). PASSIVE makes waiting threads sleep at once, so the scheduler can run
    the late one on the freed core; results are unchanged (it decides only how threads wait). A user's own
    OMP_WAIT_POLICY or GOMP_SPINCOUNT is left as it is.

    In the bit-identical mode (``bit_identical``), also ``PINS``, each unless the user set that variable.

    Raises VitlabError for a bad ``VITLAB_BIT_IDENTICAL`` (``bit_identical``).
    """
    if "OMP_WAIT_POLICY" not in os.environ and "GOMP_SPINCOUNT" not in os.environ:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    if bit_identical():
        for name, value in PINS.items():
            os.environ.setdefault(name, value)
