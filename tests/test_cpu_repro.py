"""CPU training gives the same bits on any Intel x86-64 CPU with AVX2 whatever its instruction set and core
count (issue 12: a run on another CPU parted from the committed one at epoch 7).

One machine plays other CPUs: one without AVX-512 (ATen, oneDNN and MKL limited to AVX2), one where MKL alone
is limited to AVX2, and a container given one core. Each trains a small ViT
(patch-embedding convolution, LayerNorm, attention, GELU, AdamW: the code of all three libraries) in a fresh
process, since the libraries read their settings when they load, and every one must end with the very same
weights as this CPU. Without vitlab's pins (``VITLAB_PIN_CPU=0``) each of them differs on a CPU with AVX-512
(the control below). What one machine cannot play: another vendor (MKL honours its AVX2 branch on Intel CPUs
only: see the README, "Across CPUs").
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest

import vitlab

SRC = Path(vitlab.__file__).resolve().parents[1]
TRAIN = """
import vitlab  # first: the libraries read the variables vitlab pins when torch loads them
import hashlib
import numpy as np
import torch
from vitlab.checkpoint import Normalization
from vitlab.data.prepared import Split
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
print(digest.hexdigest(), torch.backends.cpu.get_cpu_capability(), torch.get_num_threads())
"""
# The variables vitlab pins and the ones that play another CPU: none of the test runner's own may leak in.
PINS = vitlab.CPU_PINS
PINNED = tuple(PINS)
PLAYING = ("MKL_ENABLE_INSTRUCTIONS", "DNNL_MAX_CPU_ISA", "MKL_NUM_THREADS", "VITLAB_PIN_CPU")
CPUS = {
    "this CPU": ({}, None),
    "AVX2, no AVX-512": (
        {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"},
        None,
    ),
    "MKL limited to AVX2": ({"MKL_ENABLE_INSTRUCTIONS": "AVX2"}, None),
    "one core": ({}, {0}),
}


pytestmark = pytest.mark.skipif(
    not vitlab.cpu_has("avx2", "fma"), reason="vitlab pins CPU code paths on Linux x86-64"
)


def _train(env: dict[str, str], cores: set[int] | None) -> tuple[str, str, str]:
    """(sha256 of the weights, ATen's capability, threads) of the small training in a fresh process."""
    base = {k: v for k, v in os.environ.items() if k not in PINNED + PLAYING}
    base["PYTHONPATH"] = str(SRC)
    done = subprocess.run(
        [sys.executable, "-c", TRAIN],
        env=base | env,
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=(lambda: os.sched_setaffinity(0, cores)) if cores else None,
    )
    assert done.returncode == 0, done.stderr
    digest, capability, threads = done.stdout.split()
    return digest, capability, threads


def test_cpu_training_gives_the_same_weights_whatever_the_cpu():
    runs = {cpu: _train(env, cores) for cpu, (env, cores) in CPUS.items()}
    assert len({digest for digest, _, _ in runs.values()}) == 1, runs
    assert {capability for _, capability, _ in runs.values()} == {"AVX2"}
    assert {threads for _, _, threads in runs.values()} == {"2"}


@pytest.mark.skipif(
    not vitlab.cpu_has("avx512f", "avx512bw", "avx512vl", "avx512dq"), reason="needs a CPU with AVX-512"
)
def test_without_the_pins_each_played_cpu_trains_other_weights():
    """The control: the CPUs played above do round differently when nothing is pinned."""
    off = {"VITLAB_PIN_CPU": "0"}
    digests = [_train(env | off, cores)[0] for env, cores in CPUS.values()]
    assert len(set(digests)) == len(CPUS), digests


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({}, PINS),
        ({"VITLAB_PIN_CPU": "0"}, dict.fromkeys(PINS)),
        (
            {"OMP_NUM_THREADS": "8", "MKL_CBWR": "COMPATIBLE"},
            PINS | {"OMP_NUM_THREADS": "8", "MKL_CBWR": "COMPATIBLE"},
        ),
    ],
    ids=["pinned", "opted-out", "user-set-kept"],
)
def test_importing_vitlab_pins_cpu_code_paths_unless_the_user_chose(env, expected):
    base = {k: v for k, v in os.environ.items() if k not in PINNED + PLAYING}
    probe = f"import os, vitlab; print(*(os.environ.get(k) for k in {PINNED!r}))"
    done = subprocess.run([sys.executable, "-c", probe], env=base | env, capture_output=True, text=True)
    assert done.stdout.split() == [str(expected[k]) for k in PINNED]
