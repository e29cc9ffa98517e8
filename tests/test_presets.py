import typing

import pytest
import torch
from benchmark_modules import load_benchmark

from vitlab.errors import VitlabError
from vitlab.models import MODELS, PRESETS, build_model, count_parameters, preset_config
from vitlab.models.__main__ import preset_table
from vitlab.params import CONFIGS, FROM_DATA, ModelParams, parse_params

# Computed by hand (tests/test_models.py has the per-layer formulas); the plain ViTs' cross-checked against
# timm's VisionTransformer with the identical configuration, the CCTs' against the paper (below). For 10
# classes unless stated.
EXPECTED_PARAMETERS = {
    ("tinyvit", 10): 208_970,
    ("vit-tiny", 10): 5_362_762,
    ("vit-small", 10): 12_470_026,
    ("vit-c100", 100): 1_528_228,  # the ~1.5M of the CIFAR-100 seed
    ("vit-c100", 10): 1_510_858,
    ("vit-p2", 10): 435_722,
    ("cct-2-3x2", 10): 283_723,
    ("cct-4-3x2", 10): 482_123,
    ("cct-6-3x1", 10): 3_168_267,
    ("cct-6-3x2", 10): 3_326_923,
    ("cct-7-3x1", 10): 3_760_139,
    ("cct-7-3x2", 10): 3_853_259,
    ("vit-sl", 10): 2_729_878,  # tests/test_models.py has SPT's and LSA's per-layer formulas
    ("cnn-small", 10): 25_578,
    ("resnet", 10): 272_474,  # ResNet-20
    ("mlp", 10): 1_707_274,
    ("airbench", 10): 1_971_352,  # tests/test_airbench.py has the per-layer formula
}


# The CCT paper's CIFAR table (Hassani et al., 2021; in millions, as its reference repository's README prints
# them, to 3 decimals; the paper rounds them to 2), for 10 classes. CCT-6/3x1 was published with sine
# positions, which are no parameters (the preset has sin-cos ones).
PUBLISHED_MILLIONS = {
    "cct-2-3x2": 0.284,
    "cct-4-3x2": 0.482,
    "cct-6-3x1": 3.168,
    "cct-6-3x2": 3.327,
    "cct-7-3x1": 3.760,
    "cct-7-3x2": 3.853,
}
# The keys timm's VisionTransformer has an argument for (benchmarks/bench_train_throughput.timm_vit).
TIMM_KEYS = {"patch_size", "dim", "depth", "heads", "head_dim", "mlp_dim", "dropout", "drop_path"}


def test_every_preset_has_an_expected_parameter_count():
    assert {name for name, _ in EXPECTED_PARAMETERS} == set(PRESETS)


@pytest.mark.parametrize("name", list(PUBLISHED_MILLIONS))
def test_cct_presets_have_the_papers_parameter_counts(name):
    assert round(EXPECTED_PARAMETERS[name, 10] / 1e6, 3) == PUBLISHED_MILLIONS[name]
    config = PRESETS[name].config
    cct = {"stem": "conv", "pool": "seq", "qkv_bias": False, "drop_path": 0.1}
    assert {key: config[key] for key in cct} == cct


@pytest.mark.parametrize("name", [name for name, preset in PRESETS.items() if preset.arch == "vit"])
def test_vit_presets_fit_mnist(name):
    arch, config = preset_config(name)
    model = build_model(arch, config | {"image_size": 28, "in_channels": 1})
    assert model.grid_size == 28 // config["patch_size"]
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)


@pytest.mark.parametrize(("name", "classes"), list(EXPECTED_PARAMETERS))
def test_presets_build_with_their_parameter_counts(name, classes):
    arch, config = preset_config(name)
    model = build_model(arch, config | {"num_classes": classes})
    assert count_parameters(model) == EXPECTED_PARAMETERS[name, classes]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, classes)


@pytest.mark.parametrize(
    "name",
    [name for name, preset in PRESETS.items() if preset.arch == "vit" and set(preset.config) <= TIMM_KEYS],
)
def test_vit_presets_have_the_parameter_count_of_timms_identical_vit(name):
    bench = load_benchmark("bench_train_throughput")  # its timm and seed-style engines must match our presets
    arch, config = preset_config(name)
    config |= {"num_classes": 100 if name == "vit-c100" else 10}
    ours = build_model(arch, config)
    assert count_parameters(bench.timm_vit(config)) == count_parameters(ours)
    if config.get("head_dim") is None:  # nn.MultiheadAttention cannot give heads a width of their own
        assert count_parameters(bench.SeedViT(config)) == count_parameters(ours)


def test_preset_values_are_overridable_key_by_key():
    arch, config = preset_config("vit-c100", depth=2, pool="mean")
    assert arch == "vit"
    assert config == PRESETS["vit-c100"].config | {"depth": 2, "pool": "mean"}
    assert PRESETS["vit-c100"].config["depth"] == 6  # the table itself is left alone


def test_unknown_presets_and_keys_are_one_line_errors():
    with pytest.raises(
        VitlabError, match=r"unknown preset 'vit-huge' \(known: tinyvit, vit-tiny, .*, mlp, airbench\)"
    ):
        preset_config("vit-huge")
    with pytest.raises(VitlabError, match="resnet config: dim: unknown key"):
        preset_config("resnet", dim=64)


def test_vit_p2_gives_its_three_heads_a_width_of_their_own():
    arch, config = preset_config("vit-p2")
    model = build_model(arch, config)
    assert config["dim"] % config["heads"] != 0
    assert model.blocks[0].attn.qkv.out_features == 3 * 3 * 32
    assert model.config.num_tokens == 257


def test_cct_7_3x1_is_the_reference_codes_cct_7_3x1_32():
    # cct_7_3x1_32 of SHI-Labs/Compact-Transformers: 7 layers, 4 heads, embedding 256, mlp ratio 2, one conv
    # layer of kernel 3 (and max pool 3/2) to 256 channels, sequence pooling, learnable positions.
    arch, config = preset_config("cct-7-3x1")
    model = build_model(arch, config)
    (conv,) = [m for m in model.patch_embed if isinstance(m, torch.nn.Conv2d)]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias) == (3, 256, (3, 3), None)
    assert (len(model.blocks), model.blocks[0].attn.heads, model.blocks[0].mlp[0].out_features) == (7, 4, 512)
    assert model.blocks[0].attn.qkv.bias is None and model.cls_token is None
    assert model.attention_pool.in_features == 256 and model.pos_embed.shape == (1, 256, 256)
    assert model.blocks[-1].drop_path.p == pytest.approx(0.1)


def test_vit_sl_has_shifted_patches_and_locality_self_attention():
    arch, config = preset_config("vit-sl")
    model = build_model(arch, config)
    assert model.patch_embed.proj.in_features == 5 * 3 * 4 * 4  # the image and 4 shifts, 4x4 patches
    assert model.blocks[0].attn.scale.shape == (12,) and model.blocks[0].attn.qkv.out_features == 3 * 192
    assert model.config.num_tokens == 65 and model.blocks[0].attn.qkv.bias is None
    # Per block: 2 LayerNorms, qkv without biases, the output projection, the MLP and 12 temperatures.
    block = 2 * 2 * 192 + 192 * 576 + (192 * 192 + 192) + (192 * 384 + 384) + (384 * 192 + 192) + 12
    spt = 2 * 240 + 240 * 192 + 192  # LayerNorm and Linear over a patch's 5 x 3 x 4 x 4 values
    cls_and_positions = 192 + 65 * 192
    assert count_parameters(model) == spt + cls_and_positions + 9 * block + 2 * 192 + 192 * 10 + 10


# --- params.yaml: model.preset ---------------------------------------------------------------------------


def test_every_architectures_config_keys_are_the_model_sections_keys():
    assert set(CONFIGS) == set(MODELS) == set(typing.get_args(ModelParams.model_fields["name"].annotation))
    for arch, config in CONFIGS.items():
        keys = set(config.model_fields) - set(FROM_DATA)
        assert keys <= set(ModelParams.model_fields), arch
        for key in keys:  # the same definition: default, range and description
            assert ModelParams.model_fields[key].default == config.model_fields[key].default, (arch, key)
            assert ModelParams.model_fields[key].metadata == config.model_fields[key].metadata, (arch, key)
    for name, preset in PRESETS.items():
        assert set(preset.config) <= set(CONFIGS[preset.arch].model_fields), name


@pytest.mark.parametrize("name", list(PRESETS))
def test_a_preset_in_params_builds_the_presets_model(name):
    params = parse_params({"model": {"preset": name}})
    arch, config = preset_config(name)
    assert params.model.name == arch
    built = params.model.config(10).model_dump()
    assert {key: built[key] for key in config} == config
    assert count_parameters(build_model(arch, built)) == EXPECTED_PARAMETERS[name, 10]


def test_python_m_vitlab_models_prints_every_preset_with_its_counts():
    rows = {line.split(" | ")[0].strip("| "): line for line in preset_table().splitlines()[2:]}
    assert list(rows) == list(PRESETS)
    assert rows["vit-c100"].endswith("| 1,510,858 | 1,528,228 |")
    assert rows["resnet"].endswith("| 272,474 | 278,324 |")
