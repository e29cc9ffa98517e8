"""The schema of ``params.yaml``: one pydantic model per section, with the errors users see.

Every key has a type, a range and a default, and unknown keys are refused, so a typo such as
``model.patch_szie`` is a one-line error naming the key instead of a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PositiveInt,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from vitlab.data.sources import DATASETS
from vitlab.errors import VitlabError, one_line
from vitlab.presets import PRESETS

IMAGE_SIZE = 32
# The ONNX opsets an export works at, measured for every architecture: torch's exporter writes opset 18 and up
# (Split's num_outputs fails the checker at 17), and ONNX Runtime 1.31 runs up to 25 (the ViT fails at 26).
OPSETS = (18, 25)
# numpy's and torch's generators both take any seed in this range.
Seed = Annotated[int, Field(ge=0, le=2**32 - 1)]
DatasetName = Literal[tuple(DATASETS)]  # type: ignore[valid-type]
ModelName = Literal["vit", "cnn", "resnet", "mlp"]
_VIT_KEYS = (
    "patch_size",
    "dim",
    "depth",
    "heads",
    "head_dim",
    "mlp_dim",
    "dropout",
    "stem",
    "pool",
    "pos_embed",
    "drop_path",
)
# The params keys each architecture reads, by the name of the config key they set (vitlab.models): presets
# are written in config keys, and ModelParams.arch_config builds configs from params with this table.
ARCH_PARAMS: dict[str, dict[str, str]] = {
    "vit": {key: key for key in _VIT_KEYS},
    "cnn": {"channels": "cnn_channels", "dropout": "dropout"},
    "resnet": {"widths": "resnet_widths", "blocks": "resnet_blocks", "dropout": "dropout"},
    "mlp": {"hidden": "mlp_hidden", "dropout": "dropout"},
}


class Section(BaseModel):
    # inf and nan are numbers to YAML (.inf, .nan) but no setting of ours can honour them.
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_booleans_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        """pydantic reads true as 1 for an int key: `batch_size: true` would train with batches of one."""
        if isinstance(value, bool) and cls.model_fields[info.field_name].annotation is not bool:
            raise ValueError(f"got {value}; expected a number or a choice, not true/false")
        return value


class DataParams(Section):
    dataset: DatasetName = "cifar10-sample"
    source: str | None = Field(
        None, description="URL or local path of an archive that replaces the dataset's official source"
    )
    # Either case is accepted (tools print md5s both ways) and stored lowercase, as the download compares it.
    md5: Annotated[str, StringConstraints(pattern=r"^[0-9a-fA-F]{32}$", to_lower=True)] | None = Field(
        None, description="md5 of the archive at data.source (32 hex digits)"
    )
    expected_train: int | None = Field(None, gt=0, description="train images the archive must hold")
    expected_test: int | None = Field(None, gt=0, description="test images the archive must hold")
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    seed: Seed = 0

    @model_validator(mode="after")
    def _mirror_needs_md5(self) -> DataParams:
        if self.source is not None and self.md5 is None:
            raise ValueError("data.md5 is required when data.source is set (every archive is verified)")
        return self


class ValidateParams(Section):
    class_balance_tolerance: float = Field(
        0.25,
        gt=0.0,
        description="each class's share of a split may differ from 1/num_classes by this fraction",
    )
    pixel_mean_min: float = Field(90.0, ge=0.0, le=255.0)
    pixel_mean_max: float = Field(160.0, ge=0.0, le=255.0)
    pixel_std_min: float = Field(40.0, ge=0.0, le=255.0)
    pixel_std_max: float = Field(90.0, ge=0.0, le=255.0)
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


class ModelParams(Section):
    """The model: a preset, or an architecture and its keys. A null key is unset: it takes the preset's value,
    else its default. After validation every key holds the value the model is built with."""

    preset: str | None = Field(
        None, description="a named architecture (vitlab.presets); keys set beside it override it"
    )
    name: ModelName = "vit"
    # ViT
    patch_size: int = Field(4, gt=0)
    dim: int = Field(64, gt=0)
    depth: int = Field(6, gt=0)
    heads: int = Field(4, gt=0)
    head_dim: int | None = Field(None, gt=0, description="per-head width; default dim // heads")
    mlp_dim: int = Field(128, gt=0)
    dropout: float = Field(0.0, ge=0.0, lt=1.0)
    stem: Literal["patch", "conv"] = Field("patch", description="conv: CCT's convolutional tokenizer")
    pool: Literal["cls", "mean"] = Field("cls", description="mean: global average pooling, no CLS token")
    pos_embed: Literal["learned", "sincos"] = Field("learned", description="sincos: fixed 2D sin-cos")
    drop_path: float = Field(0.0, ge=0.0, lt=1.0, description="stochastic depth rate of the last block")
    # CNN, ResNet and MLP baselines
    cnn_channels: tuple[PositiveInt, ...] = Field((16, 32), min_length=1)
    resnet_widths: tuple[PositiveInt, ...] = Field((16, 32, 64), min_length=1)
    resnet_blocks: tuple[PositiveInt, ...] = Field((3, 3, 3), min_length=1)
    mlp_hidden: tuple[PositiveInt, ...] = Field((512, 256), min_length=1)

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, raw: Any) -> Any:
        if not isinstance(raw, dict):
            return raw
        given = {key: value for key, value in raw.items() if value is not None}
        if "preset" not in given:
            return given
        name = given["preset"]
        if name not in PRESETS:
            raise ValueError(f"model.preset: got {name!r}; known presets: {', '.join(PRESETS)}")
        preset = PRESETS[name]
        if given.get("name", preset.arch) != preset.arch:
            raise ValueError(
                f"model.name={given['name']} contradicts model.preset={name} (a {preset.arch}); "
                "leave model.name null when a preset is set"
            )
        keys = ARCH_PARAMS[preset.arch]
        return {"name": preset.arch} | {keys[k]: v for k, v in preset.config.items()} | given

    @model_validator(mode="after")
    def _check_geometry(self) -> ModelParams:
        """Only the keys the architecture reads: a resnet preset does not care about a stray model.dim."""
        if self.name == "vit":
            self._check_vit()
        if self.name == "cnn" and len(self.cnn_channels) > 5:
            raise ValueError("model.cnn_channels: at most 5 conv blocks fit a 32x32 image (each halves it)")
        if self.name == "resnet" and len(self.resnet_widths) != len(self.resnet_blocks):
            raise ValueError(
                f"model.resnet_widths has {len(self.resnet_widths)} stages but model.resnet_blocks "
                f"{len(self.resnet_blocks)}: give one block count per stage"
            )
        return self

    def arch_config(self, num_classes: int) -> dict[str, Any]:
        """The config dict of architecture ``self.name`` (``vitlab.models.build_model``'s second argument)."""
        keys = ARCH_PARAMS[self.name]
        return {"num_classes": num_classes} | {key: getattr(self, name) for key, name in keys.items()}

    def _check_vit(self) -> None:
        if IMAGE_SIZE % self.patch_size:
            allowed = [p for p in range(1, IMAGE_SIZE + 1) if IMAGE_SIZE % p == 0]
            raise ValueError(
                f"model.patch_size={self.patch_size} does not divide the image size {IMAGE_SIZE} "
                f"(allowed: {', '.join(map(str, allowed))})"
            )
        if self.head_dim is None and self.dim % self.heads:
            raise ValueError(
                f"model.heads={self.heads} does not divide model.dim={self.dim}; "
                "choose heads that divide dim or set model.head_dim"
            )
        if self.stem == "conv" and self.patch_size < 2:
            raise ValueError("model.stem=conv halves the image per conv stage: model.patch_size must be >= 2")
        if self.pos_embed == "sincos" and self.dim % 4:
            raise ValueError(f"model.pos_embed=sincos needs model.dim divisible by 4 (got {self.dim})")


class TrainParams(Section):
    epochs: int = Field(30, gt=0)
    batch_size: int = Field(128, gt=0)
    learning_rate: float = Field(1e-3, gt=0.0)
    weight_decay: float = Field(0.05, ge=0.0)
    warmup_epochs: float = Field(2.0, ge=0.0)
    label_smoothing: float = Field(0.1, ge=0.0, lt=1.0)
    crop_padding: int = Field(4, ge=0, le=16)
    flip: bool = True
    augment: Literal["none", "randaugment", "autoaugment"] = Field(
        "none", description="policy on the uint8 images, batched on the device (torchvision v2)"
    )
    mixup_alpha: float = Field(0.0, ge=0.0, description="MixUp's Beta(alpha, alpha); 0: off")
    cutmix_alpha: float = Field(0.0, ge=0.0, description="CutMix's Beta(alpha, alpha); 0: off")
    random_erasing: float = Field(0.0, ge=0.0, le=1.0, description="probability per image")
    amp: Literal["auto", "bf16", "off"] = Field(
        "auto", description="bf16 autocast: auto turns it on on CUDA (it measured slower on CPU)"
    )
    compile: bool = Field(False, description="torch.compile the model (worth it on a GPU)")
    time_budget_s: float | None = Field(
        None, gt=0.0, description="stop after so many seconds; the LR schedule follows time (not repeatable)"
    )
    device: Literal["auto", "cpu", "cuda", "mps"] = "auto"
    seed: Seed = 0
    resume: bool = Field(
        True, description="continue an interrupted run of the same config after its last epoch"
    )

    @model_validator(mode="after")
    def _warmup_fits(self) -> TrainParams:
        if self.warmup_epochs >= self.epochs:
            raise ValueError(
                f"train.warmup_epochs={self.warmup_epochs} must be smaller than train.epochs={self.epochs}"
            )
        return self


class EvaluateParams(Section):
    batch_size: int = Field(512, gt=0)
    num_mistakes: int = Field(16, gt=0, le=64, description="most confident mistakes drawn in mistakes.png")


class AttentionParams(Section):
    num_images: int = Field(6, gt=0, le=64, description="first test images to draw, a fixed set")


class ExportParams(Section):
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
    batch_size: int = Field(256, gt=0)
    provider: Literal["auto", "cpu", "cuda", "tensorrt"] = "auto"


class Params(Section):
    data: DataParams = DataParams()
    validate_: ValidateParams = Field(ValidateParams(), alias="validate")
    model: ModelParams = ModelParams()
    train: TrainParams = TrainParams()
    evaluate: EvaluateParams = EvaluateParams()
    attention: AttentionParams = AttentionParams()
    export: ExportParams = ExportParams()
    inference: InferenceParams = InferenceParams()

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)


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
    elif error["type"] == "literal_error":
        message = f"got {error['input']!r}; {message[0].lower()}{message[1:]}"
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


def load_params(path: str | Path = "params.yaml") -> Params:
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise VitlabError(f"{path}: no such params file") from None
    except yaml.YAMLError as error:
        raise VitlabError(f"{path}: not valid YAML ({one_line(error)})") from None
    return parse_params(raw, origin=str(path))
