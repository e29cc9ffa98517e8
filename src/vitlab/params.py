"""The schema of ``params.yaml``: one pydantic model per section, with the errors users see.

Every key has a type, a range and a default, and unknown keys are refused, so a typo such as
``model.patch_szie`` is a one-line error naming the key instead of a silently ignored setting. Each setting
is defined here once: the training loop reads ``TrainParams`` itself, and the model section is the union of
the architectures' configs (``ViTConfig`` ...), which the models read. params.yaml holds these defaults.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, get_args

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    create_model,
    field_validator,
    model_validator,
)

from vitlab.data.sources import DATASETS, DEFAULT_DATASET, DatasetSpec
from vitlab.errors import VitlabError, one_line
from vitlab.presets import PRESETS
from vitlab.recipes import RECIPES

# The ONNX opsets an export works at, measured for every architecture: torch's exporter writes opset 18 and up
# (Split's num_outputs fails the checker at 17), and ONNX Runtime 1.31 runs up to 25 (the ViT fails at 26).
OPSETS = (18, 25)
# Test-time augmentation (evaluate.tta; vitlab.models.tta): the views each test image is predicted from.
TTA_MODES = ("none", "flip", "flip_translate")
# numpy's and torch's generators both take any seed in this range.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
DatasetName = Literal[tuple(DATASETS)]  # type: ignore[valid-type]
Widths = Annotated[tuple[PositiveInt, ...], Field(min_length=1)]


class Section(BaseModel):
    """A section of params.yaml (or an architecture's config): frozen, unknown keys refused."""

    # inf and nan are numbers to YAML (.inf, .nan) but no setting of ours can honour them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads true as 1 for an int key: `batch_size: true` would train with batches of one."""
        annotation = cls.model_fields[info.field_name].annotation
        args = get_args(annotation)
        takes_booleans = annotation is bool or bool in args or any(arg is True for arg in args)
        if isinstance(value, bool) and not takes_booleans:
            raise ValueError(f"got {value}; expected a number or a choice, not true/false")
        return value


# --- The architectures' configs: each key of the model section, its default, its range and its rules -------


_DEFAULT_DATA = DATASETS[DEFAULT_DATASET]


class ArchConfig(Section):
    """What every architecture takes from the dataset rather than from params.yaml (by default the default
    dataset's), and the dropout they all share. A checkpoint stores its model's config as a dict, so it
    rebuilds without params.yaml."""

    num_classes: int = Field(_DEFAULT_DATA.num_classes, gt=0)
    image_size: int = Field(_DEFAULT_DATA.image_size, gt=0)  # height = width, in pixels
    in_channels: int = Field(_DEFAULT_DATA.channels, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="dropout probability (vit: also attention)")


class ViTConfig(ArchConfig):
    """The Vision Transformer's shape (``vitlab.models.vit.ViT``; Dosovitskiy et al., 2021), with the options
    known to matter when a ViT is trained from scratch on small data: a conv stem or shifted patches, mean or
    sequence pooling, fixed positions, locality self-attention and stochastic depth."""

    patch_size: int = Field(4, gt=0, description="each token covers patch_size x patch_size pixels")
    dim: int = Field(64, gt=0, description="token width")
    depth: int = Field(6, gt=0, description="transformer blocks")
    heads: int = Field(4, gt=0, description="attention heads; must divide dim unless head_dim is set")
    head_dim: int | None = Field(
        None, gt=0, description="per-head width (lucidrains' dim_head); null: dim // heads"
    )
    qkv_bias: bool = Field(True, description="biases on the query, key and value projections (CCT: none)")
    lsa: bool = Field(
        False,
        description="locality self-attention: a learned temperature per head, no token attends to itself",
    )
    mlp_dim: int = Field(128, gt=0, description="hidden width of each block's MLP")
    stem: Literal["patch", "conv", "spt"] = Field(
        "patch",
        description="patch: a linear map per patch; conv: CCT's tokenizer, log2(patch_size) stages; "
        "spt: shifted patch tokenization (the image and its 4 diagonal half-patch shifts)",
    )
    pool: Literal["cls", "mean", "seq"] = Field(
        "cls",
        description="cls: the CLS token's output; mean: global average pooling; seq: CCT's sequence pooling, "
        "a learned softmax-weighted average of the tokens (mean and seq: no CLS token)",
    )
    pos_embed: Literal["learned", "sincos"] = Field("learned", description="sincos: fixed 2D sin-cos (MAE)")
    drop_path: float = Field(
        0.0, ge=0.0, lt=1.0, description="stochastic depth rate of the last block, rising from 0 at the first"
    )
    distillation: bool = Field(
        False,
        description="DeiT: a distillation token after CLS and a second head, taught by the teacher stage",
    )
    whiten_stem: bool = Field(
        False,
        description="start the stem's first conv as a whitening of the training images' patches (airbench); "
        "stem patch or conv",
    )

    @model_validator(mode="after")
    def _geometry(self) -> ViTConfig:
        if self.image_size % self.patch_size:
            allowed = [p for p in range(1, self.image_size + 1) if self.image_size % p == 0]
            raise ValueError(
                f"patch_size={self.patch_size} does not divide the image size {self.image_size} "
                f"(allowed: {', '.join(map(str, allowed))})"
            )
        if self.head_dim is None and self.dim % self.heads:
            raise ValueError(
                f"heads={self.heads} does not divide dim={self.dim}; "
                "choose heads that divide dim or set head_dim"
            )
        if self.stem == "conv" and (self.patch_size < 2 or self.patch_size & (self.patch_size - 1)):
            raise ValueError(
                f"stem=conv halves the image per conv stage: patch_size={self.patch_size} must be "
                "2, 4, 8, ..."
            )
        if self.stem == "spt" and self.patch_size < 2:
            raise ValueError(
                f"stem=spt shifts the image by half a patch: patch_size={self.patch_size} must be 2 or more"
            )
        if self.lsa and self.num_tokens < 2:
            raise ValueError(
                "lsa=true (no token attends to itself) needs 2 tokens or more: "
                f"patch_size={self.patch_size} with pool={self.pool} gives {self.num_tokens}"
            )
        if self.whiten_stem and self.stem == "spt":
            raise ValueError("whiten_stem=true needs a conv to whiten: stem=patch or stem=conv, not stem=spt")
        if self.pos_embed == "sincos" and self.dim % 4:
            raise ValueError(f"pos_embed=sincos needs dim={self.dim} to be divisible by 4")
        return self

    @model_validator(mode="after")
    def _distillation_beside_cls(self) -> ViTConfig:
        if self.distillation and self.pool != "cls":
            raise ValueError(
                f"distillation=true needs pool=cls, not pool={self.pool}: DeiT's distillation token and head "
                "sit beside the CLS token and its head"
            )
        return self

    @property
    def inner_dim(self) -> int:
        """Width of the concatenated heads: heads x head_dim (dim when head_dim is unset)."""
        return self.heads * (self.head_dim or self.dim // self.heads)

    @property
    def grid_size(self) -> int:
        """Tokens per side, for any stem."""
        return self.image_size // self.patch_size

    @property
    def num_patches(self) -> int:
        """Patch tokens: grid_size squared."""
        return self.grid_size**2

    @property
    def num_prefix_tokens(self) -> int:
        """Tokens before the patches: the CLS token (token 0) with ``pool="cls"``, then DeiT's distillation
        token (token 1) with ``distillation``."""
        return (self.pool == "cls") + self.distillation

    @property
    def num_tokens(self) -> int:
        """Sequence length: the prefix tokens, then the patches."""
        return self.num_prefix_tokens + self.num_patches


class CNNConfig(ArchConfig):
    """The small CNN baseline (``vitlab.models.cnn.CNN``): a conv3x3-ReLU-maxpool block per width."""

    channels: Widths = Field((16, 32), description="cnn: output channels of each conv block")

    @model_validator(mode="after")
    def _fits_the_image(self) -> CNNConfig:
        most = self.image_size.bit_length() - 1  # each block halves the side
        if len(self.channels) > most:
            raise ValueError(
                f"channels has {len(self.channels)} conv blocks; at most {most} fit a "
                f"{self.image_size}x{self.image_size} image (each halves it)"
            )
        return self


class ResNetConfig(ArchConfig):
    """A CIFAR ResNet (``vitlab.models.resnet.ResNet``; He et al., 2016, section 4.2)."""

    widths: Widths = Field((16, 32, 64), description="resnet: channels of each stage")
    blocks: Widths = Field((3, 3, 3), description="resnet: BasicBlocks per stage (3, 3, 3: ResNet-20)")

    @model_validator(mode="after")
    def _one_block_count_per_stage(self) -> ResNetConfig:
        if len(self.widths) != len(self.blocks):
            raise ValueError(
                f"widths has {len(self.widths)} stages but blocks {len(self.blocks)}: "
                "give one block count per stage"
            )
        return self


class MLPConfig(ArchConfig):
    """The MLP floor (``vitlab.models.mlp.MLP``) on the flattened pixels."""

    hidden: Widths = Field((512, 256), description="mlp: hidden layer widths")


class AirbenchConfig(ArchConfig):
    """airbench's CNN (``vitlab.models.airbench.Airbench``; Jordan, 2024, "94% on CIFAR-10 in 3.29 seconds
    on a single GPU"): a frozen patch-whitening conv, then a conv group per width, each halving the side."""

    group_widths: Widths = Field(
        (64, 256, 256), description="airbench: output channels of each conv group (each halves the side)"
    )
    whiten_kernel: int = Field(
        2, ge=1, le=5, description="airbench: side of the patches its first conv whitens (no padding)"
    )

    @model_validator(mode="after")
    def _fits_the_image(self) -> AirbenchConfig:
        side = self.image_size - self.whiten_kernel + 1  # after the whitening conv
        if side >> len(self.group_widths) < 1:
            raise ValueError(
                f"group_widths has {len(self.group_widths)} conv groups; a {self.image_size}-pixel image is "
                f"{side} pixels a side after the whitening conv and each group halves it"
            )
        return self


CONFIGS: dict[str, type[ArchConfig]] = {
    "vit": ViTConfig,
    "cnn": CNNConfig,
    "resnet": ResNetConfig,
    "mlp": MLPConfig,
    "airbench": AirbenchConfig,
}
FROM_DATA = ("num_classes", "image_size", "in_channels")  # set from the dataset, not from params.yaml


class DataParams(Section):
    """data: which dataset (or a verified mirror of it), and the seeded validation hold-out."""

    dataset: DatasetName = DEFAULT_DATASET
    source: str | None = Field(
        None, description="URL or local path of an archive that replaces the dataset's official source"
    )
    # Either case is accepted (tools print md5s both ways) and stored lowercase, as the download compares it.
    # Required for an archive whose files are not the official ones: the download stage says so, as only the
    # files inside tell (vitlab.data.archive.prepare_dataset).
    md5: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{32}$", to_lower=True)] | None = Field(
        None, description="md5 of the archive at data.source (32 hex digits)"
    )
    expected_train: int | None = Field(None, gt=0, description="train images the archive must hold")
    expected_test: int | None = Field(None, gt=0, description="test images the archive must hold")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: Seed = 0

    @model_validator(mode="after")
    def _md5_needs_a_source(self) -> DataParams:
        # The official download and the embedded sample are checked against their own md5s: an md5 given
        # without a source would be ignored while the log says the archive was verified. (expected_train and
        # expected_test apply to any source: the validate stage checks the counts.)
        if self.md5 is not None and self.source is None:
            raise ValueError(
                "data.md5 is set but data.source is null: data.md5 checks the archive at data.source (the "
                "official download and the embedded sample have their own md5s); set data.source or "
                "remove data.md5"
            )
        return self


def dataset_defaults(spec: DatasetSpec) -> dict[str, dict[str, Any]]:
    """The keys whose null (or absence) means the dataset's value, by section, with ``spec``'s values: each
    one is defined once, in the dataset's DatasetSpec."""
    return {
        "train": {"flip": spec.flip, "crop_padding": spec.crop_padding},
        "validate": {
            "pixel_mean_min": spec.pixel_mean[0],
            "pixel_mean_max": spec.pixel_mean[1],
            "pixel_std_min": spec.pixel_std[0],
            "pixel_std_max": spec.pixel_std[1],
        },
    }


def _left_to_the_dataset(defaults: dict[str, Any], train: Any, spec: DatasetSpec) -> dict[str, Any]:
    """The train keys of ``defaults`` (the dataset's crop padding and flip) that the recipe named in the raw
    train section ``train`` does not set: a recipe's value wins over the dataset's, but for a dataset that
    is not flipped (digits), whose ``flip: false`` wins over a recipe's flips."""
    train = train if isinstance(train, dict) else {}
    name = train.get("recipe", TrainParams.model_fields["recipe"].default)
    recipe = RECIPES[name].train if isinstance(name, str) and name in RECIPES else {}
    return {
        key: value
        for key, value in defaults.items()
        if key not in recipe or (key == "flip" and spec.flip is False)
    }


def _fill(raw: Any, defaults: dict[str, Any]) -> Any:
    """A section's raw mapping with each of ``defaults``' keys that is null or absent set to its value."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        return raw  # not a mapping: the section reports it
    return raw | {key: value for key, value in defaults.items() if raw.get(key) is None}


class _FromDataset(Section):
    """A section with keys whose null means the dataset's value (``dataset_defaults``). ``Params`` fills in
    those of params.yaml's data.dataset; a section validated on its own takes the default dataset's."""

    section: ClassVar[str]

    @model_validator(mode="before")
    @classmethod
    def _default_dataset(cls, raw: Any) -> Any:
        return _fill(raw, dataset_defaults(_DEFAULT_DATA)[cls.section])


class ValidateParams(_FromDataset):
    """validate: the thresholds of the Great Expectations suite over the prepared data; the pixel ranges
    default to the dataset's (DatasetSpec.pixel_mean, pixel_std)."""

    section: ClassVar[str] = "validate"

    class_balance_tolerance: float = Field(
        0.25,
        gt=0.0,
        description="each class's share of a split may differ from 1/num_classes by this fraction",
    )
    # No defaults here: null or absent is the dataset's (_FromDataset).
    pixel_mean_min: float = Field(ge=0.0, le=255.0, description="mean of the per-image mean pixel (0-255)")
    pixel_mean_max: float = Field(ge=0.0, le=255.0)
    pixel_std_min: float = Field(ge=0.0, le=255.0, description="mean of the per-image pixel std (0-255)")
    pixel_std_max: float = Field(ge=0.0, le=255.0)
    max_cross_split_duplicates: int = Field(
        0, ge=0, description="test images allowed to be exact copies of a train image"
    )

    @model_validator(mode="after")
    def _ranges_are_not_empty(self) -> ValidateParams:
        for stat in ("pixel_mean", "pixel_std"):
            low, high = getattr(self, f"{stat}_min"), getattr(self, f"{stat}_max")
            if low > high:
                raise ValueError(
                    f"validate.{stat}_min={low} is above validate.{stat}_max={high}: no data passes"
                )
        return self


class _ModelSection(Section):
    """The model section: a ``preset`` or an architecture (``name``), and every architecture's keys (below).

    The rule (a plain override): every key but ``preset`` is null unless set. A key that is set wins over the
    preset; a null key takes the preset's value, else the architecture's default. So
    ``-S model.preset=vit-c100 -S model.depth=8`` trains vit-c100 with 8 blocks, whatever the default run's
    depth. With a preset, ``name`` is null or the preset's architecture; without one (``preset: null``, or
    absent beside ``name``) it names the architecture (null: vit). A key set for another architecture than
    the one built (model.dim beside a resnet) is an error, not ignored. After validation each key the
    architecture reads holds the value the model is built with and the others are null (what ``vitlab
    params`` prints)."""

    preset: str | None = Field("cct-2-3x2", description="a named architecture (vitlab.presets); null: none")
    name: Literal[tuple(CONFIGS)] = Field(  # type: ignore[valid-type]
        "vit", description="the architecture: the preset's, or with preset null the one chosen here"
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        given = {key: value for key, value in raw.items() if value is not None}
        if given.get("name", "vit") not in CONFIGS:
            return raw  # model.name reports it
        # null: no preset; absent: the default run's, unless model.name picks an architecture instead
        preset_name = raw.get("preset", None if "name" in given else cls.model_fields["preset"].default)
        if preset_name is None:
            arch, preset_config = given.get("name", "vit"), {}
        elif preset_name not in PRESETS:
            raise ValueError(f"model.preset: got {preset_name!r}; known presets: {', '.join(PRESETS)}")
        else:
            arch, preset_config = PRESETS[preset_name].arch, PRESETS[preset_name].config
            if given.get("name", arch) != arch:
                raise ValueError(
                    f"model.name={given['name']} contradicts model.preset={preset_name} (a {arch}); "
                    "set model.preset to null to choose the architecture by model.name"
                )
        reads = {key for key in CONFIGS[arch].model_fields if key not in FROM_DATA}
        stray = [key for key in given if key not in reads | {"preset", "name"} and key in cls.model_fields]
        if stray:
            keys = ", ".join(f"model.{key}={given[key]}" for key in stray)
            raise ValueError(
                f"{keys}: not read by a {arch} (model.preset={preset_name}); set it to null or remove it"
            )
        built = {key: CONFIGS[arch].model_fields[key].default for key in reads} | preset_config | given
        unread = {key: None for key in cls.model_fields if key not in reads | {"preset", "name"}}
        return built | unread | {"preset": preset_name, "name": arch}

    def config(
        self, num_classes: int | None = None, image_size: int | None = None, in_channels: int | None = None
    ) -> ArchConfig:
        """The config of architecture ``name`` from this section's keys, for data of ``num_classes`` classes
        and ``image_size`` x ``image_size`` images of ``in_channels`` channels (None: the default dataset's).

        Raises pydantic's ValidationError when the keys do not fit that data (``Params`` words it per key).
        """
        config = CONFIGS[self.name]
        data = zip(FROM_DATA, (num_classes, image_size, in_channels), strict=True)
        keys = [key for key in config.model_fields if key not in FROM_DATA]
        return config(**{k: v for k, v in data if v is not None}, **{key: getattr(self, key) for key in keys})


# Flat, so that `-S model.patch_size=2` addresses a key: every architecture's keys, each defined once in its
# config above (dropout, which all of them read, is one key).
ModelParams = create_model(
    "ModelParams",
    __base__=_ModelSection,
    __doc__=_ModelSection.__doc__,
    **{
        key: (field.annotation | None, field)  # null: the preset's value or the default (_apply_preset)
        for config in CONFIGS.values()
        for key, field in config.model_fields.items()
        if key not in FROM_DATA
    },
)


# The length of a training run and its schedule, in the train section and (the teacher's run) the teacher's.
Epochs = Annotated[int, Field(gt=0)]
WarmupEpochs = Annotated[float, Field(ge=0.0, description="linear warmup, then cosine decay to 0")]
WarmupFraction = Annotated[
    float | None,
    Field(ge=0.0, lt=1.0, description="the warmup's share of the run (of its time budget with one)"),
]
TimeBudget = Annotated[
    float | None,
    Field(gt=0.0, description="stop after so many seconds; the LR schedule follows time (not repeatable)"),
]


def _check_warmup(section: str, warmup_epochs: float, epochs: int) -> None:
    if warmup_epochs >= epochs:
        raise ValueError(
            f"{section}.warmup_epochs={warmup_epochs} must be smaller than {section}.epochs={epochs}"
        )


class TrainParams(_FromDataset):
    """train: the optimizer, schedule, augmentation and run settings ``vitlab.train.train`` reads; the crop
    padding and flips default to the dataset's (DatasetSpec.crop_padding, flip).

    A ``recipe`` (vitlab.recipes) is applied the way ``model.preset`` is: a key set beside it wins, a null (or
    absent) key takes the recipe's value, else its default. The warmup is ``warmup_epochs`` or, set instead,
    ``warmup_fraction``, a share of the run (of its time budget with one); whichever of the two is set wins
    over the recipe's, and the other is null after validation.
    """

    section: ClassVar[str] = "train"

    recipe: str | None = Field(
        "vit-sample", description="a named recipe (vitlab.recipes); keys set beside it win; null: none"
    )
    epochs: int | None = Field(40, gt=0, description="null: no limit, until train.time_budget_s is spent")
    batch_size: int = Field(128, gt=0, description="global: a DDP run gives each process an equal share")
    learning_rate: float = Field(2e-3, gt=0.0, description="the peak, after the linear warmup")
    weight_decay: float = Field(0.05, ge=0.0)
    optimizer: Literal["adamw", "sgd"] = Field(
        "adamw", description="adamw, or sgd with Nesterov momentum (weight decay as L2 there)"
    )
    momentum: float = Field(0.9, ge=0.0, lt=1.0, description="SGD's Nesterov momentum (airbench: 0.85)")
    muon: bool = Field(False, description="Muon for the 2-D weight matrices but the head's (vitlab.optim)")
    muon_filters: bool = Field(
        False, description="Muon for the conv filters, kept at a fixed norm (airbench94_muon; vitlab.optim)"
    )
    muon_filters_lr: float = Field(0.24, gt=0.0, description="muon_filters' step relative to the weights")
    muon_filters_momentum: float = Field(0.6, ge=0.0, lt=1.0, description="muon_filters' Nesterov momentum")
    bias_lr_scale: float = Field(
        1.0, gt=0.0, description="learning-rate multiplier of BatchNorm and whitening biases (airbench: 64)"
    )
    whiten_bias_epochs: int | None = Field(
        None, ge=0, description="train airbench's whitening bias so many epochs, then freeze it; null: all"
    )
    lr_schedule: Literal["cosine", "linear"] = Field(
        "cosine", description="the decay to 0 after the warmup: cosine, or linear (airbench)"
    )
    selective_decay: bool = Field(
        False, description="no weight decay on norms, biases, position embeddings and tokens (vitlab.optim)"
    )
    grad_clip: float | None = Field(None, gt=0.0, description="clip the gradient L2 norm to this; null: off")
    ema_decay: float = Field(
        0.0, ge=0.0, lt=1.0, description="per-step decay of the weight average validated and saved; 0: off"
    )
    warmup_epochs: float | None = Field(
        3.0, ge=0.0, description="linear warmup, then the lr_schedule's decay to 0; null with warmup_fraction"
    )
    warmup_fraction: WarmupFraction = None
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    # No defaults here: null or absent is the dataset's (_FromDataset).
    crop_padding: int = Field(ge=0, le=16, description="random crop after padding so many pixels")
    flip: Literal[True, False, "alternate"] = Field(
        description="random horizontal flips; alternate: each image mirrored in every other epoch (airbench)"
    )
    augment: Literal["none", "randaugment", "autoaugment"] = Field(
        "none", description="policy on the uint8 images, batched on the device (torchvision v2)"
    )
    mixup_alpha: float = Field(0.0, ge=0.0, description="MixUp's Beta(alpha, alpha); 0: off")
    cutmix_alpha: float = Field(0.0, ge=0.0, description="CutMix's Beta(alpha, alpha); 0: off")
    random_erasing: float = Field(0.0, ge=0.0, le=1.0, description="probability per image")
    amp: Literal["auto", "bf16", "off"] = Field(
        "auto", description="bf16 autocast: auto where measured faster (vitlab.device.uses_bf16)"
    )
    compile: bool = Field(False, description="torch.compile the model (worth it on a GPU)")
    time_budget_s: TimeBudget = None
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    seed: Seed = 0
    resume: bool = Field(
        True, description="continue an interrupted run of the same config after its last epoch"
    )

    @model_validator(mode="before")
    @classmethod
    def _apply_recipe(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        name = raw.get("recipe", cls.model_fields["recipe"].default)  # null: no recipe
        if name is not None and name not in RECIPES:
            raise ValueError(f"train.recipe: got {name!r}; known recipes: {', '.join(RECIPES)}")
        given = {key: value for key, value in raw.items() if value is not None}
        if "warmup_epochs" in given and "warmup_fraction" in given:
            raise ValueError(
                "train.warmup_epochs and train.warmup_fraction are both set: set one (the other null)"
            )
        built = (RECIPES[name].train if name is not None else {}) | given
        if "warmup_epochs" in given:
            built["warmup_fraction"] = None
        if built.get("warmup_fraction") is not None:
            built["warmup_epochs"] = None
        return built | {"recipe": name}  # null stays null: not the default recipe's name

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainParams:
        if self.epochs is None and self.time_budget_s is None:
            raise ValueError("train.epochs=null trains until a time budget ends: set train.time_budget_s")
        if self.epochs is None and self.warmup_epochs is not None:
            raise ValueError(
                "train.epochs=null: warm up over a share of the time budget, train.warmup_fraction, "
                "not train.warmup_epochs"
            )
        if self.warmup_epochs is not None and self.epochs is not None:
            _check_warmup("train", self.warmup_epochs, self.epochs)
        return self


class TeacherParams(Section):
    """teacher: the CNN a ViT with ``model.distillation`` learns from (DeiT; Touvron et al., 2021), trained by
    the teacher stage on the student's training images with the train section's recipe; this section holds
    what differs: the architecture, and the length of the run (the train keys of the same names)."""

    preset: Literal[tuple(PRESETS)] = Field(  # type: ignore[valid-type]
        "resnet", description="the teacher's architecture, a model.preset (resnet: ResNet-20)"
    )
    epochs: Epochs = 10
    warmup_epochs: WarmupEpochs = 1.0
    warmup_fraction: WarmupFraction = None  # set: the warmup's share of the run, instead of warmup_epochs
    time_budget_s: TimeBudget = None

    @model_validator(mode="after")
    def _warmup_fits(self) -> TeacherParams:
        _check_warmup("teacher", self.warmup_epochs, self.epochs)
        return self

    @classmethod
    def replaced_train_keys(cls) -> list[str]:
        """The train section's keys this section replaces for the teacher: epochs, warmup_epochs,
        warmup_fraction, time_budget_s."""
        return [key for key in cls.model_fields if key in TrainParams.model_fields]

    def recipe(self, train: TrainParams) -> TrainParams:
        """The teacher's training: the train section ``train`` with this section's ``replaced_train_keys``."""
        update = {key: getattr(self, key) for key in self.replaced_train_keys()}
        if self.warmup_fraction is not None:
            update["warmup_epochs"] = None
        return train.model_copy(update=update)


class EvaluateParams(Section):
    """evaluate: test-set scoring and the mistakes figure."""

    batch_size: int = Field(512, gt=0)
    num_mistakes: int = Field(16, gt=0, le=64, description="most confident mistakes drawn in mistakes.png")
    tta: Literal[TTA_MODES] = Field(  # type: ignore[valid-type]
        "none",
        description="test-time augmentation, also inside the exported model: flip (2 views) or "
        "flip_translate (6 views, airbench)",
    )


class AttentionParams(Section):
    """attention: which test images get attention maps and rollout."""

    num_images: int = Field(6, gt=0, le=64, description="first test images to draw, a fixed set")


class ExportParams(Section):
    """export: the ONNX opset, the parity checks against PyTorch and the int8 model."""

    opset: int = Field(18, ge=OPSETS[0], le=OPSETS[1])
    max_abs_diff: float = Field(1e-4, gt=0.0, description="largest logit difference ORT vs PyTorch allowed")
    min_top1_agreement: float = Field(1.0, gt=0.0, le=1.0)
    quantize: Literal["weight_only", "static"] = Field(
        "weight_only", description="int8 method: weight_only (MatMul weights) or static (QDQ, calibrated)"
    )
    max_int8_accuracy_drop: float = Field(
        1.0, ge=0.0, le=100.0, description="test accuracy points int8 may lose"
    )
    ort_fusions: bool = Field(
        True, description="rewrite with ONNX Runtime's fused operators (faster; loads in ONNX Runtime only)"
    )
    attention_model: bool = Field(
        True, description="also export a ViT with its attention weights as a second output"
    )


class InferenceParams(Section):
    """inference: ONNX Runtime's batch size and execution provider."""

    batch_size: int = Field(256, gt=0)
    provider: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"


class Params(Section):
    """The whole params.yaml: one section per stage (``validate`` is ``validate_`` in Python)."""

    data: DataParams = DataParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    teacher: TeacherParams = TeacherParams()
    evaluate: EvaluateParams = EvaluateParams()
    attention: AttentionParams = AttentionParams()
    export: ExportParams = ExportParams()
    inference: InferenceParams = InferenceParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _dataset_defaults(cls, raw: Any) -> Any:
        """Null (or absent) keys of ``dataset_defaults`` take data.dataset's values."""
        if not isinstance(raw, dict):
            return raw
        data = raw.get("data")
        name = data.get("dataset", DEFAULT_DATASET) if isinstance(data, dict) else DEFAULT_DATASET
        if not isinstance(name, str) or name not in DATASETS:
            return raw  # data.dataset reports it
        filled = dict(raw)
        for section, defaults in dataset_defaults(DATASETS[name]).items():
            key = "validate_" if section == "validate" and "validate_" in raw else section
            if section == "train":
                defaults = _left_to_the_dataset(defaults, raw.get(key), DATASETS[name])
            filled[key] = _fill(raw.get(key), defaults)
        return filled

    @model_validator(mode="after")
    def _model_fits_the_data(self) -> Params:
        """Only the keys the architecture reads (a resnet preset does not care about a stray model.dim), for
        data.dataset's classes and image geometry (a patch size must divide MNIST's 28)."""
        spec = DATASETS[self.data.dataset]
        try:
            self.model.config(spec.num_classes, spec.image_size, spec.channels)
        except ValidationError as error:
            keys = "|".join(CONFIGS[self.model.name].model_fields)
            messages = [e["msg"].removeprefix("Value error, ") for e in error.errors()]
            named = [re.sub(rf"\b({keys})(=| has )", r"model.\1\2", m) for m in messages]
            raise ValueError("; ".join(named)) from None
        return self


_BOUND_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def allowed_range(section: str, key: str) -> str:
    """The range of a numeric key as its schema states it, e.g. ``>= 18 and <= 25`` or ``> 0``."""
    sections = {info.alias or name: info.annotation for name, info in Params.model_fields.items()}
    field = sections[section].model_fields[key]
    symbols = {"gt": ">", "ge": ">=", "lt": "<", "le": "<="}
    bounds = [
        f"{symbol} {getattr(m, name)}"
        for m in field.metadata
        for name, symbol in symbols.items()
        if hasattr(m, name)
    ]
    return " and ".join(bounds)


def _describe(error: dict[str, Any]) -> str:
    key = ".".join("validate" if part == "validate_" else str(part) for part in error["loc"])
    message = error["msg"].removeprefix("Value error, ")
    if error["type"] == "extra_forbidden":
        message = "unknown key"
    elif error["type"] in _BOUND_ERRORS | {"finite_number"} and len(error["loc"]) == 2:
        bounds = allowed_range(*error["loc"])
        allowed = f"a finite number {bounds}".strip() if error["type"] == "finite_number" else bounds
        message = f"got {error['input']!r}; allowed: {allowed}"
    elif error["type"] == "literal_error" or (
        error["type"].endswith(("_parsing", "_type")) and isinstance(error["input"], str | int | float)
    ):
        # The value as read (YAML's reading of it), which may not be the value as written: `md5: 0123` is 123.
        message = f"got {error['input']!r}; {message[0].lower()}{message[1:]}"
        if error["type"] == "string_type" and not isinstance(error["input"], str | bool):
            message += " (quote it: unquoted digits are a number to YAML)"
    if key and message.startswith(f"{key}."):  # cross-field checks already name their keys
        return message
    return f"{key}: {message}" if key else message


def parse_params(raw: Any, origin: str = "params") -> Params:
    """Validate a params mapping; raise VitlabError with one line per problem, each naming its key."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise VitlabError(f"{origin}: expected a mapping of sections, got {type(raw).__name__}")
    try:
        return Params.model_validate(raw)
    except ValidationError as error:
        problems = "; ".join(_describe(e) for e in error.errors())
        raise VitlabError(f"{origin}: {problems}") from None


def read_yaml(path: str | Path) -> Any:
    """The YAML file at ``path`` read as DVC reads params files (YAML 1.2: ruamel.yaml's safe loader, the
    call of ``dvc.utils.serialize.parse_yaml``), so that every value means the same to vitlab as to ``dvc exp
    run -S`` and ``dvc params diff``. PyYAML's YAML 1.1 would differ: there ``off``/``no``/``yes`` are
    booleans, ``1:30`` is 90 (sexagesimal) and ``010`` is 8 (octal); here they are the strings ``off``,
    ``no``, ``yes``, ``1:30`` and the number 10, as DVC writes and shows them.

    Raises VitlabError, one line, for a missing file, bad YAML, or a key given twice in a mapping (which DVC
    refuses too), naming the key's dotted path and both line numbers.
    """
    from ruamel.yaml import YAML, YAMLError
    from ruamel.yaml.constructor import DuplicateKeyError

    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise VitlabError(f"{path}: no such params file") from None
    loader = YAML(typ="safe")
    try:
        return loader.load(text)
    except DuplicateKeyError as error:
        twice = _duplicate_key(loader.compose(text))
        if twice is None:  # keys equal only once constructed (1 and 0x1): ruamel's own words and line
            line = error.problem_mark.line + 1 if error.problem_mark else "?"
            raise VitlabError(f"{path}: {error.problem} on line {line}") from None
        key, first, second = twice
        raise VitlabError(f"{path}: {key} is given twice, on lines {first} and {second}") from None
    except YAMLError as error:
        raise VitlabError(f"{path}: not valid YAML ({one_line(error)})") from None


def _duplicate_key(node: Any, prefix: str = "") -> tuple[str, int, int] | None:
    """The first key written twice in one mapping under ``node`` (a composed YAML node): its dotted path and
    both (1-based) line numbers; None if there is none."""
    from ruamel.yaml.nodes import MappingNode, ScalarNode, SequenceNode

    if isinstance(node, SequenceNode):
        children = [(f"{prefix}[{i}]", item) for i, item in enumerate(node.value)]
    elif isinstance(node, MappingNode):
        lines: dict[str, int] = {}
        children = []
        for key, value in node.value:
            if not isinstance(key, ScalarNode):  # a list or mapping as a key: never a params key
                continue
            name = f"{prefix}.{key.value}" if prefix else str(key.value)
            if key.value in lines:
                return name, lines[key.value], key.start_mark.line + 1
            lines[key.value] = key.start_mark.line + 1
            children.append((name, value))
    else:
        return None
    return next((found for name, child in children if (found := _duplicate_key(child, name))), None)


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read (``read_yaml``) and validate a params file; VitlabError for a missing file, bad YAML, a key given
    twice or an invalid value."""
    return parse_params(read_yaml(path), origin=str(Path(path)))
