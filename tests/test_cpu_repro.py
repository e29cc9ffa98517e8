"""The bit-identical mode (``VITLAB_BIT_IDENTICAL=1``) gives the same bits on any Intel x86-64 CPU with AVX2
whatever its instruction set and core count (issue 12: a run on another CPU parted from the committed one at
epoch 7); the native mode (the default) uses what the CPU has; importing vitlab changes neither.

One machine plays other CPUs: one without AVX-512 (ATen, oneDNN and MKL limited to AVX2), one where MKL alone
is limited to AVX2, and a container given one core. Each trains a small ViT (patch-embedding convolution,
LayerNorm, attention, GELU, AdamW: the code of all three libraries) in a fresh process, since the libraries
read their settings when they load. In the bit-identical mode every one must end with the very same weights
as this CPU. The controls show, for each played CPU, that it does round differently in the native mode, and
each states what the machine must have to show it (AVX-512 to play a CPU without it, an Intel CPU for MKL's
instruction limit, which MKL honours on Intel CPUs only, two cores to play one). What one machine cannot play:
another vendor (see the README, "Across CPUs").
"""

import functools
import os
import subprocess
import sys
from pathlib import Path

import pytest

import vitlab
from vitlab.cli import main
from vitlab.cpu import BIT_IDENTICAL, PINS, bit_identical, cpu_has, cpu_info
from vitlab.errors import VitlabError

SRC = Path(vitlab.__file__).resolve().parents[1]
TRAIN = """
from vitlab.cpu import prepare_process
prepare_process()  # first, as every entry point: the libraries read the variables it sets when torch loads
import hashlib
import numpy as np
import torch
from vitlab.checkpoint import Normalization
from vitlab.data.prepared import Split
from vitlab.device import cpu_record
from vitlab.models import build_model
from vitlab.params import TrainParams
from vitlab.train import train

rng = np.random.default_rng(0)
labels = rng.integers(0, 2, 64)
images = np.where(labels[:, None, None, None] == 1, 170, 80) + rng.normal(0, 40, (64, 32, 32, 3))
images = np.clip(images, 0, 255)
data = Split(images.astype(np.uint8), labels.astype(np.int64))
torch.manual_seed(0)
model = build_model("vit", {"num_classes": 2, "dim": 32, "depth": 2, "heads": 2, "mlp_dim": 64})
params = TrainParams(epochs=2, batch_size=32, warmup_epochs=1, device="cpu", seed=0, resume=False)
train(model, data, None, Normalization.from_images(data.images), params)
digest = hashlib.sha256()
for name, tensor in model.state_dict().items():
    digest.update(name.encode() + tensor.numpy().tobytes())
record = cpu_record()  # what the train stage records beside its metrics
print(digest.hexdigest(), record["isa"], record["threads"], record["mode"])
"""
# The variables the mode pins and the ones that play another CPU: none of the test runner's own may leak in.
PINNED = tuple(PINS)
PLAYING = ("MKL_ENABLE_INSTRUCTIONS", "DNNL_MAX_CPU_ISA", "MKL_NUM_THREADS", BIT_IDENTICAL)
CPUS = {
    "this CPU": ({}, None),
    "AVX2, no AVX-512": (
        {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
        None,
    ),
    "MKL limited to AVX2": ({"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, None),
    "one core": ({}, {0}),
}
ON = {BIT_IDENTICAL: "1"}
AVX512 = cpu_has("avx512f", "avx512bw", "avx512vl", "avx512dq")
INTEL = cpu_info("vendor_id") == "GenuineIntel"


def _physical_cores() -> int:
    """The physical cores among the CPUs this process may use (torch's default threads: one per core)."""
    try:
        cpus = os.sched_getaffinity(0)
        topology = "/sys/devices/system/cpu/cpu{}/topology/{}"
        return len(
            {
                tuple(Path(topology.format(n, f)).read_text() for f in ("physical_package_id", "core_id"))
                for n in cpus
            }
        )
    except (AttributeError, OSError):  # not Linux
        return 1


CORES = _physical_cores()

needs_avx2 = pytest.mark.skipif(
    not cpu_has("avx2", "fma"),
    reason="the bit-identical mode pins the code paths of x86-64 CPUs with AVX2/FMA",
)


@functools.cache
def _train(cpu: str, bit_identical: bool) -> tuple[str, str, str, str]:
    """(sha256 of the weights, ATen's capability, threads, the mode its train metrics record) of the small
    training in a fresh process, on the played ``cpu`` (a key of CPUS), in the bit-identical mode or the
    native one."""
    env, cores = CPUS[cpu]
    base = {k: v for k, v in os.environ.items() if k not in PINNED + PLAYING}
    base["PYTHONPATH"] = str(SRC)
    done = subprocess.run(
        [sys.executable, "-c", TRAIN],
        env=base | env | (ON if bit_identical else {}),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
    )
    assert done.returncode == 0, done.stderr
    digest, capability, threads, mode = done.stdout.split()
    return digest, capability, threads, mode


@needs_avx2
def test_the_bit_identical_mode_gives_the_same_weights_whatever_the_cpu():
    runs = {cpu: _train(cpu, bit_identical=True) for cpu in CPUS}
    assert len({digest for digest, *_ in runs.values()}) == 1, runs
    assert {(capability, threads, mode) for _, capability, threads, mode in runs.values()} == {
        ("AVX2", "2", "bit-identical")
    }


# The controls: each played CPU does round differently in the native mode, where the machine can show it.
CONTROLS = [
    pytest.param(
        "AVX2, no AVX-512",
        marks=pytest.mark.skipif(not AVX512, reason="needs AVX-512 to play a CPU without it"),
    ),
    pytest.param(
        "MKL limited to AVX2",
        marks=pytest.mark.skipif(
            not (AVX512 and INTEL), reason="MKL limits its instructions on an Intel CPU with AVX-512 only"
        ),
    ),
    pytest.param(
        "one core", marks=pytest.mark.skipif(CORES < 2, reason="needs 2 cores to play a CPU with one")
    ),
]


@needs_avx2
@pytest.mark.parametrize("cpu", CONTROLS)
def test_in_the_native_mode_the_played_cpu_trains_other_weights(cpu):
    assert _train(cpu, bit_identical=False)[0] != _train("this CPU", bit_identical=False)[0]


@pytest.mark.skipif(CORES < 2, reason="needs 2 cores to play a CPU with one")
def test_the_native_mode_trains_on_the_cores_the_process_may_use():
    assert _train("one core", bit_identical=False)[2] == "1"
    _, _, threads, mode = _train("this CPU", bit_identical=False)
    assert 1 < int(threads) <= CORES and mode == "native"


def _environment_after(code: str, env: dict[str, str]) -> list[str]:
    """The values of PINNED and OMP_WAIT_POLICY ("None" where unset) after ``code`` in a fresh process."""
    base = {k: v for k, v in os.environ.items() if k not in PINNED + PLAYING + ("OMP_WAIT_POLICY",)}
    base["PYTHONPATH"] = str(SRC)
    probe = f"{code}\nimport os; print(*(os.environ.get(k) for k in {(*PINNED, 'OMP_WAIT_POLICY')!r}))"
    done = subprocess.run([sys.executable, "-c", probe], env=base | env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    return done.stdout.split()


def test_importing_vitlab_changes_no_environment_variable():
    # The modules a notebook imports to train and export, the CLI's included; torch loads with them.
    code = "import vitlab, vitlab.cli, vitlab.cpu, vitlab.device, vitlab.train, vitlab.export, vitlab.stages"
    assert _environment_after(code, ON) == ["None"] * (len(PINNED) + 1)


@needs_avx2
@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, dict.fromkeys(PINS)),
        (ON, PINS),
        (
            ON | {"OMP_NUM_THREADS": "8", "MKL_CBWR": "COMPATIBLE"},
            PINS | {"OMP_NUM_THREADS": "8", "MKL_CBWR": "COMPATIBLE"},
        ),
    ],
    ids=["native", "bit-identical", "user-set-kept"],
)
def test_an_entry_point_pins_cpu_code_paths_in_the_bit_identical_mode_alone(env, expected):
    code = "from vitlab.cpu import prepare_process; prepare_process()"
    assert _environment_after(code, env) == [str(expected[k]) for k in PINNED] + ["PASSIVE"]


@pytest.mark.parametrize("value", ["yes", "true", "2"])
def test_a_bad_switch_is_a_one_line_error_of_every_entry_point(value, monkeypatch, capsys):
    monkeypatch.setenv(BIT_IDENTICAL, value)
    with pytest.raises(VitlabError, match=f"^{BIT_IDENTICAL}='{value}': expected 1"):
        bit_identical()
    assert main(["params"]) == 2
    assert (
        capsys.readouterr().err
        == f"error: {BIT_IDENTICAL}='{value}': expected 1 (bit-identical mode) or 0 (native)\n"
    )
