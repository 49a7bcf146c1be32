"""Typed configuration: one model per section of params.yaml.

`load_params()` is the only place params.yaml is read. Steps take their own section;
Kubeflow components receive the same sections as dicts and validate them here too,
so both runners reject the same bad value with the same message.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoConfig(Section):
    source_classes: list[int] = Field(min_length=2)
    target_classes: list[int] = Field(min_length=2)
    arch: str = "resnet18"
    image_size: int = Field(default=32, ge=8)
    epochs: int = Field(default=6, ge=1)
    seed: int = 0


class DataConfig(Section):
    source: str                     # a folder, s3://bucket/prefix, or a path inside `repo`
    repo: str = ""                  # git repository (URL or path) whose DVC-tracked `source` to read
    rev: str = ""                   # its revision: tag, branch or commit; empty: the default branch
    classes: list[str] = []
    val_fraction: float = Field(default=0.15, gt=0.0, lt=1.0)
    test_fraction: float = Field(default=0.15, gt=0.0, lt=1.0)
    seed: int = 0
    extensions: list[str] = [".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"]
    workers: int = Field(default=0, ge=0)
    on_invalid: Literal["error", "skip"] = "error"
    max_invalid_fraction: float = Field(default=0.01, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _fractions_leave_training_data(self):
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must stay below 0.9 to leave training data")
        return self


class AugmentConfig(Section):
    image_size: int = Field(default=224, ge=8)
    resize_scale: tuple[float, float] = (0.08, 1.0)
    resize_ratio: tuple[float, float] = (0.75, 1.3333)
    hflip: float = Field(default=0.5, ge=0.0, le=1.0)
    rotation: float = Field(default=0.0, ge=0.0, le=180.0)
    brightness: float = Field(default=0.0, ge=0.0)
    contrast: float = Field(default=0.0, ge=0.0)
    saturation: float = Field(default=0.0, ge=0.0)
    hue: float = Field(default=0.0, ge=0.0, le=0.5)
    mean: tuple[float, float, float] = (0.485, 0.456, 0.406)
    std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    preview_images: int = Field(default=8, ge=1, le=64)

    @model_validator(mode="after")
    def _ranges_are_ordered(self):
        for key in ("resize_scale", "resize_ratio"):
            low, high = getattr(self, key)
            if not 0 < low <= high:
                raise ValueError(f"{key} must be [low, high] with 0 < low <= high, got {[low, high]}")
        if self.resize_scale[1] > 1.0:
            raise ValueError("resize_scale upper bound must be at most 1.0")
        if any(s <= 0 for s in self.std):
            raise ValueError("std values must be positive")
        return self


class PretrainedConfig(Section):
    uri: str = Field(min_length=1)
    sha256: str = Field(default="", pattern=r"^([0-9a-f]{64})?$")
    arch: str = "resnet18"
    max_size_mb: float = Field(default=2048, gt=0)


class UnfreezeStep(Section):
    epoch: int = Field(ge=2)        # unfrozen at the start of this epoch (1-based)
    modules: list[str] = Field(min_length=1)
    lr: float | None = Field(default=None, gt=0.0)  # their learning rate; default finetune.lr


class LrGroup(Section):
    modules: list[str] = Field(min_length=1)
    lr: float = Field(gt=0.0)


class FinetuneConfig(Section):
    freeze: list[str] = []
    freeze_until: str = ""          # freeze everything before this module (e.g. layer3, features.7)
    reinit: list[str] = []          # modules to re-initialise before training (too source-specific to keep)
    unfreeze: list[UnfreezeStep] = []
    lr_groups: list[LrGroup] = []   # discriminative learning rates by module
    schedule: Literal["constant", "cosine", "step"] = "constant"
    warmup_epochs: int = Field(default=0, ge=0)
    step_size: int = Field(default=5, ge=1)
    gamma: float = Field(default=0.1, gt=0.0, le=1.0)
    checkpoint_dir: str = ""        # checkpoint every epoch here and resume from it; empty: off
    optimizer: Literal["sgd", "adamw"] = "sgd"
    lr: float = Field(default=0.01, gt=0.0)
    momentum: float = Field(default=0.9, ge=0.0, lt=1.0)
    weight_decay: float = Field(default=1e-4, ge=0.0)
    batch_size: int = Field(default=32, ge=1)
    max_epochs: int = Field(default=10, ge=1)
    patience: int = Field(default=3, ge=1)
    min_delta: float = Field(default=0.0, ge=0.0)
    seed: int = 0
    num_workers: int = Field(default=0, ge=0)

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.warmup_epochs >= self.max_epochs:
            raise ValueError("warmup_epochs must be smaller than max_epochs")
        return self


class ValidateConfig(Section):
    min_accuracy: float = Field(default=0.0, ge=0.0, le=1.0)
    min_macro_f1: float = Field(default=0.0, ge=0.0, le=1.0)
    min_class_recall: float = Field(default=0.0, ge=0.0, le=1.0)
    compare_with_champion: bool = True
    champion_margin: float = Field(default=0.01, ge=0.0, le=1.0)
    confidence: float = Field(default=0.95, gt=0.5, lt=1.0)
    bootstrap_samples: int = Field(default=2000, ge=100)
    seed: int = 0


class RegisterConfig(Section):
    model_name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    alias: str = Field(default="champion", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    challenger_alias: str = Field(default="challenger", pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    promotion: Literal["auto", "manual"] = "auto"

    @model_validator(mode="after")
    def _aliases_differ(self):
        if self.alias == self.challenger_alias:
            raise ValueError("alias and challenger_alias must differ")
        return self


class TrackingConfig(Section):
    experiment: str = Field(min_length=1)


class PipelineConfig(Section):
    image: str = Field(min_length=1)
    finetune_cpu: str = Field(default="2", pattern=r"^[0-9]+(\.[0-9]+)?m?$")
    finetune_memory: str = Field(default="8Gi", pattern=r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$")
    finetune_gpus: int = Field(default=0, ge=0)
    mlflow_config_map: str = "mlflow"
    mlflow_secret: str = "mlflow-credentials"


class Params(Section):
    demo: DemoConfig
    data: DataConfig
    augment: AugmentConfig
    pretrained: PretrainedConfig
    finetune: FinetuneConfig
    # `validate` and `register` are BaseModel method names, so these two take aliases.
    gate: ValidateConfig = Field(alias="validate")
    registry: RegisterConfig = Field(alias="register")
    tracking: TrackingConfig
    pipeline: PipelineConfig


def _describe(err: ValidationError, where: str, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        lines.append(f"{where}: {key or '(top level)'}: {e['msg']}")
    return "\n".join(lines)


def parse_section(model: type[Section], values: dict, name: str, where: str = PARAMS_FILE):
    """Validate one section (as a Kubeflow component receives it) into its typed model."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_describe(err, where, name)) from None


def load_params(path: str | os.PathLike = PARAMS_FILE) -> Params:
    """Read and validate params.yaml; errors name the file and the key."""
    path = Path(path)
    try:
        raw = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except yaml.YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {err}") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping of sections at the top level")
    try:
        return Params.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, str(path))) from None
