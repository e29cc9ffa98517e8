"""The machine a run uses: bf16 autocast where it is measured faster, and the record of a CPU run's mode."""

import pytest
import torch

from vitlab import device
from vitlab.cpu import PINS, cpu_has
from vitlab.models import build_model

CPU = torch.device("cpu")
RESNET = build_model("resnet", {"num_classes": 10, "widths": [8], "blocks": [1]})  # many convolutions
TINYVIT = build_model("vit", {"num_classes": 10, "dim": 32, "depth": 1, "heads": 2, "mlp_dim": 64})  # one


@pytest.mark.parametrize(
    ("amp", "native", "model", "bit_identical", "expected"),
    [
        ("auto", True, RESNET, False, True),  # measured faster (issue 24, Zen 5)
        ("auto", True, TINYVIT, False, False),  # measured slower
        ("auto", False, RESNET, False, False),  # emulated bf16
        ("auto", True, RESNET, True, False),  # oneDNN capped to AVX2, and float32's bits
        ("bf16", False, TINYVIT, False, True),  # asked for: always
        ("off", True, RESNET, False, False),
    ],
)
def test_auto_amp_picks_bf16_on_a_cpu_only_where_it_is_measured_faster(
    amp, native, model, bit_identical, expected, monkeypatch
):
    monkeypatch.setattr(device, "native_bf16", lambda: native)
    monkeypatch.setattr(device, "bit_identical", lambda: bit_identical)
    assert device.uses_bf16(amp, CPU, model) is expected
    x = torch.randn(2, 3, 32, 32)
    with device.autocast(amp, CPU, model):
        assert model(x).dtype == (torch.bfloat16 if expected else torch.float32)


def test_native_bf16_is_read_from_the_cpus_flags():
    assert device.native_bf16() == (cpu_has("avx512_bf16") or cpu_has("amx_bf16"))


@pytest.mark.parametrize("pinned", [False, True])
def test_the_cpu_record_names_the_mode_in_effect_and_what_decides_the_bits(pinned, monkeypatch):
    for name, value in PINS.items():
        monkeypatch.setenv(name, value) if pinned else monkeypatch.delenv(name, raising=False)
    record = device.cpu_record()
    capability = torch.backends.cpu.get_cpu_capability()  # as this process loaded ATen: pinned or not
    assert record["mode"] == ("bit-identical" if pinned and capability == "AVX2" else "native")
    assert record["isa"] == capability
    assert record["threads"] == torch.get_num_threads()
    assert set(record) == {"vendor", "model", "family_model", "isa", "threads", "mode"}
    assert record["vendor"] and record["model"]
