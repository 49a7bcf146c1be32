"""Typed configuration: one model per section of params.yaml.

`load_params()` is the only place params.yaml is read. Steps take their own section;
Kubeflow components receive the same sections as dicts and validate them here too,
so both runners reject the same bad value with the same message. The models hold no
defaults: every value comes from params.yaml (or a section of it passed to Kubeflow), so
there is one place to read what a run used. `override` derives a changed copy.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError, model_validator

PARAMS_FILE = "params.yaml"


class ConfigError(ValueError):
    """A configuration value is missing or wrong; the message names the key."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class DemoConfig(Section):
    source_classes: list[int] = Field(min_length=2)
    target_classes: list[int] = Field(min_length=2)
    arch: str
    image_size: int = Field(ge=8)
    epochs: int = Field(ge=1)
    seed: int


class DataConfig(Section):
    source: str                     # a folder, s3://bucket/prefix, or a path inside `repo`
    repo: str                       # git repository (URL or path) whose DVC-tracked `source` to read
    rev: str                        # its revision: tag, branch or commit; empty: the default branch
    classes: list[str]
    val_fraction: float = Field(gt=0.0, lt=1.0)
    test_fraction: float = Field(gt=0.0, lt=1.0)
    seed: int
    extensions: list[str]
    workers: int = Field(ge=0)
    on_invalid: Literal["error", "skip"]
    max_invalid_fraction: float = Field(ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _fractions_leave_training_data(self):
        if self.val_fraction + self.test_fraction >= 0.9:
            raise ValueError("val_fraction + test_fraction must stay below 0.9 to leave training data")
        return self


class AugmentConfig(Section):
    image_size: int = Field(ge=8)
    resize_scale: tuple[float, float]
    resize_ratio: tuple[float, float]
    hflip: float = Field(ge=0.0, le=1.0)
    rotation: float = Field(ge=0.0, le=180.0)
    brightness: float = Field(ge=0.0)
    contrast: float = Field(ge=0.0)
    saturation: float = Field(ge=0.0)
    hue: float = Field(ge=0.0, le=0.5)
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    preview_images: int = Field(ge=1, le=64)

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
    sha256: str = Field(pattern=r"^([0-9a-f]{64})?$")
    library: Literal["torchvision", "timm"]   # whose architecture `arch` is
    arch: str
    max_size_mb: float = Field(gt=0)

    @model_validator(mode="after")
    def _scheme_fits_library(self):
        scheme = self.uri.split("://")[0] if "://" in self.uri else ""
        wanted = {"torchvision": "torchvision", "timm": "timm", "hf-hub": "timm"}.get(scheme)
        if wanted and wanted != self.library:
            raise ValueError(f"uri {scheme}:// holds {wanted} weights but library is '{self.library}'")
        return self


class UnfreezeStep(Section):
    epoch: int = Field(ge=2)        # unfrozen at the start of this epoch (1-based)
    modules: list[str] = Field(min_length=1)
    lr: float | None = Field(default=None, gt=0.0)  # their learning rate; None: finetune.lr


class LrGroup(Section):
    modules: list[str] = Field(min_length=1)
    lr: float = Field(gt=0.0)


def _rate(value):
    """finetune.lr: a number above 0, or `auto`; one message for either mistake (not one per union member)."""
    if value == "auto":
        return value
    try:
        if isinstance(value, bool):
            raise TypeError
        rate = float(value)
    except (TypeError, ValueError):
        raise ValueError("Input should be a number greater than 0, or auto") from None
    if not rate > 0:
        raise ValueError("Input should be greater than 0 (or auto)")
    return rate


class FinetuneConfig(Section):
    freeze: list[str]
    freeze_until: str               # freeze everything before this module (e.g. layer3, features.7)
    reinit: list[str]               # modules to re-initialise before training (too source-specific to keep)
    unfreeze: list[UnfreezeStep]
    lr_groups: list[LrGroup]        # discriminative learning rates by module
    schedule: Literal["constant", "cosine", "step"]
    warmup_epochs: int = Field(ge=0)
    step_size: int = Field(ge=1)
    gamma: float = Field(gt=0.0, le=1.0)
    checkpoint_dir: str             # checkpoint every epoch here and resume from it; empty: off
    optimizer: Literal["sgd", "adamw"]
    lr: Annotated[Literal["auto"] | float, BeforeValidator(_rate)]  # auto: the learning-rate range test's pick
    momentum: float = Field(ge=0.0, lt=1.0)
    weight_decay: float = Field(ge=0.0)
    batch_size: int = Field(ge=1)
    max_epochs: int = Field(ge=1)
    patience: int = Field(ge=1)
    min_delta: float = Field(ge=0.0)
    seed: int
    num_workers: int = Field(ge=0)
    devices: Literal["auto"] | Annotated[int, Field(ge=1)]  # data-parallel processes per node (distributed.py)
    sync_batchnorm: bool            # BatchNorm over the whole batch across processes (GPUs: SyncBatchNorm)
    precision: Literal["auto", "fp32", "bf16", "fp16"]  # auto: the fastest this device has (distributed.precision)
    compile: bool                   # torch.compile the trained layers
    gpu_augment: bool               # on a GPU, augment there (CPU loader workers only decode)
    channels_last: bool             # NHWC memory layout for convolutions
    prefix_cache: bool              # frozen-prefix features computed once (components/prefix_cache.py)
    prefix_copies: int = Field(ge=1)  # augmented copies of the training split's prefix features
    prefix_int8: bool               # the cached prefix in int8 (x86 post-training quantisation; CPU only)

    @model_validator(mode="after")
    def _warmup_fits(self):
        if self.warmup_epochs >= self.max_epochs:
            raise ValueError("warmup_epochs must be smaller than max_epochs")
        late = [step.epoch for step in self.unfreeze if step.epoch > self.max_epochs]
        if late:
            raise ValueError(f"unfreeze: epoch {late[0]} is after max_epochs ({self.max_epochs}): it would never "
                             "be applied")
        return self


class ValidateConfig(Section):
    min_accuracy: float = Field(ge=0.0, le=1.0)
    min_macro_f1: float = Field(ge=0.0, le=1.0)
    min_class_recall: float = Field(ge=0.0, le=1.0)
    compare_with_champion: bool
    champion_margin: float = Field(ge=0.0, le=1.0)
    confidence: float = Field(gt=0.5, lt=1.0)
    bootstrap_samples: int = Field(ge=100)
    seed: int


class RegisterConfig(Section):
    model_name: str = Field(min_length=1, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
    alias: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    challenger_alias: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_-]*$")
    promotion: Literal["auto", "manual"]

    @model_validator(mode="after")
    def _aliases_differ(self):
        if self.alias == self.challenger_alias:
            raise ValueError("alias and challenger_alias must differ")
        return self


class TrackingConfig(Section):
    experiment: str = Field(min_length=1)
    system_metrics: bool                # CPU, memory, disk, network (and GPU) of the training run


CPU = r"^[0-9]+(\.[0-9]+)?m?$"                               # Kubernetes quantities: "2", "500m"
MEMORY = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|K|M|G|T)?$"         # "16Gi"


class TaskSettings(Section):
    cpu: str = Field(pattern=CPU)                               # request = limit: Guaranteed QoS
    memory: str = Field(pattern=MEMORY)
    timeout_s: int = Field(ge=60)
    retries: int = Field(ge=0, le=10)


class Toleration(Section):
    key: str
    operator: Literal["Equal", "Exists"]
    value: str | None = None                                    # with operator Equal
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"]


class VolumeSettings(Section):
    claim: str = Field(pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")  # the PersistentVolumeClaim's name
    size: str = Field(pattern=MEMORY)                           # "20Gi"
    storage_class: str                                          # empty: the cluster's default StorageClass


TASKS = ("resolve", "data", "augment", "fetch_pretrained", "finetune", "validate", "register")  # Kubeflow's


class PipelineConfig(Section):
    image: str = Field(min_length=1)
    tasks: dict[Literal[TASKS], TaskSettings]   # every Kubeflow task once: a misspelt one is not a task
    retry_backoff_s: int = Field(ge=1)
    finetune_gpus: int = Field(ge=0)
    gpu_node_selector: dict[str, str]
    gpu_tolerations: list[Toleration]
    mlflow_config_map: str
    mlflow_secret: str
    credentials_secret: str         # optional Secret with a `netrc` key: tokens for https weights and git repositories
    checkpoint_volume: VolumeSettings  # holds finetune.checkpoint_dir on the cluster: a retried fine-tune resumes

    @model_validator(mode="after")
    def _every_task_sized(self):
        missing = [t for t in TASKS if t not in self.tasks]
        if missing:
            raise ValueError(f"tasks: no settings for {', '.join(missing)} (cpu, memory, timeout_s, retries each)")
        return self


class Params(Section):
    demo: DemoConfig | None = None      # only the embedded demo has this section
    data: DataConfig
    augment: AugmentConfig
    pretrained: PretrainedConfig
    finetune: FinetuneConfig
    # `validate` and `register` are BaseModel method names, so these two take aliases.
    validation: ValidateConfig = Field(alias="validate")
    registry: RegisterConfig = Field(alias="register")
    tracking: TrackingConfig
    pipeline: PipelineConfig


def _describe(err: ValidationError, where: str, prefix: str = "") -> str:
    lines = []
    for e in err.errors():
        key = ".".join(str(p) for p in (prefix, *e["loc"]) if p != "")
        lines.append(f"{where}: {key or '(top level)'}: {e['msg'].removeprefix('Value error, ')}")
    return "\n".join(lines)


def parse_section(model: type[Section], values: dict, name: str, where: str = PARAMS_FILE):
    """Validate one section (as a Kubeflow component receives it) into its typed model."""
    try:
        return model.model_validate(values)
    except ValidationError as err:
        raise ConfigError(_describe(err, where, name)) from None


def override(section: Section, **changes) -> Section:
    """A validated copy of `section` with `changes` (model_copy would not validate them)."""
    try:
        return type(section).model_validate({**section.model_dump(), **changes})
    except ValidationError as err:
        raise ConfigError(_describe(err, "override")) from None


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
