"""Typed, frozen configuration read from params.yaml; unknown or mistyped keys are errors."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from fedcxr.labels import FINDINGS

# YAML gives lists; frozen configs hold tuples (strict mode would otherwise refuse the list).
IntTuple = Annotated[
    tuple[int, ...], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)
]


class ConfigError(ValueError):
    """A params file that does not match the schema; the message names each bad key."""


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SyntheticConfig(_Section):
    n_images: int = Field(2000, gt=0)
    miss_prob: float = Field(0.1, ge=0.0, le=1.0)
    # Finding -> how many times likelier a patient with that finding is sampled. The default
    # over-samples pneumonia so the small default test set holds positives; {} = NIH prevalence.
    enrich: dict[str, float] = Field(default_factory=lambda: {"Pneumonia": 8.0})
    workers: int = Field(0, ge=0)  # 0 = one per CPU core

    @field_validator("enrich")
    @classmethod
    def _known_findings(cls, value: dict[str, float]) -> dict[str, float]:
        unknown = sorted(set(value) - set(FINDINGS))
        if unknown:
            raise ValueError(f"unknown finding(s) {unknown}; expected any of {list(FINDINGS)}")
        low = {k: v for k, v in value.items() if v < 1.0}
        if low:
            raise ValueError(f"weights must be >= 1, found {low}")
        return value


class DataConfig(_Section):
    source: Literal["synthetic", "nih"] = "synthetic"
    nih_dir: str = "data/raw/nih"
    synthetic: SyntheticConfig = SyntheticConfig()


class IngestConfig(_Section):
    max_bad_fraction: float = Field(0.0, ge=0.0, le=1.0)
    verify_md5: bool = True
    workers: int = Field(0, ge=0)


class DeidConfig(_Section):
    on_violation: Literal["fail", "scrub"] = "fail"
    secret_env: str = "FEDCXR_DEID_SECRET"
    secret_file: str | None = None
    max_age: int = Field(89, gt=0)


class ResizeConfig(_Section):
    size: int = Field(512, ge=8, le=4096)
    shard_images: int = Field(4096, gt=0)
    workers: int = Field(0, ge=0)


class PartitionConfig(_Section):
    strategy: str = "demographic"
    test_size: int = Field(10120, gt=0)
    site_sizes: IntTuple = (20000, 25000, 15000, 30000, 12000)
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    dirichlet_alpha: float = Field(0.5, gt=0.0)

    @field_validator("site_sizes")
    @classmethod
    def _positive_sizes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(v <= 0 for v in value):
            raise ValueError(f"expected a non-empty list of positive image counts, found {value}")
        return value


class ModelConfig(_Section):
    arch: str = "smallcnn"  # a name in fedcxr.models.MODELS; checked when the model is built
    pretrained: bool = False


class TrainConfig(_Section):
    lr: float = Field(1e-4, gt=0.0)
    batch_size: int = Field(32, gt=0)
    image_size: int = Field(128, ge=8, le=4096)  # must be <= resize.size (checked in Params)
    epochs: int = Field(3, gt=0)  # pooled training epochs; keep = fl.rounds x fl.local_epochs
    ddp_world_size: int = Field(2, gt=0)  # processes of the centralized DDP baseline
    num_workers: int = Field(0, ge=0)
    seeds: IntTuple = (42,)
    augment: bool = True

    @field_validator("seeds")
    @classmethod
    def _non_empty(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("expected a non-empty list of integer seeds, found []")
        return value


class DPConfig(_Section):
    enabled: bool = False
    noise_multiplier: float = Field(1.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    target_epsilon: float | None = Field(None, gt=0.0)  # set: noise is calibrated to reach it


class FLConfig(_Section):
    rounds: int = Field(3, gt=0)
    local_epochs: int = Field(1, gt=0)
    strategy: str = "fedavg"  # fedavg | fedprox (fedcxr.strategies); checked when the run starts
    fedprox_mu: float = Field(0.01, ge=0.0)
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)  # 0 = any free port
    round_timeout_s: int = Field(3600, gt=0)


Task = Literal["multilabel", "pneumonia"]
TaskTuple = Annotated[
    tuple[Task, ...], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)
]


class StudyConfig(_Section):
    tasks: TaskTuple = ("multilabel", "pneumonia")  # every configuration is trained for each

    @field_validator("tasks")
    @classmethod
    def _tasks(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if not value or len(set(value)) != len(value):
            raise ValueError(f"expected a non-empty list of distinct tasks, found {list(value)}")
        return value


class EvaluateConfig(_Section):
    n_boot: int = Field(1000, ge=100)  # bootstrap replicates (patients resampled)
    threshold_rule: Literal["youden", "f1"] = "youden"  # chosen on validation splits only


class Params(_Section):
    """Every section of params.yaml. Later stages add their sections here."""

    seed: int = 42
    data: DataConfig = DataConfig()
    ingest: IngestConfig = IngestConfig()
    deid: DeidConfig = DeidConfig()
    resize: ResizeConfig = ResizeConfig()
    partition: PartitionConfig = PartitionConfig()
    task: Task = "multilabel"
    study: StudyConfig = StudyConfig()
    model: ModelConfig = ModelConfig()
    train: TrainConfig = TrainConfig()
    dp: DPConfig = DPConfig()
    fl: FLConfig = FLConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @field_validator("train")
    @classmethod
    def _image_size_fits(cls, value: TrainConfig, info: ValidationInfo) -> TrainConfig:
        resize = info.data.get("resize")
        if resize is not None and value.image_size > resize.size:
            raise ValueError(
                f"expected image_size <= resize.size (training down-samples the resized "
                f"images), found image_size={value.image_size} > resize.size={resize.size}"
            )
        return value


def _describe(error: ValidationError, source: str) -> str:
    lines = [f"invalid configuration in {source}:"]
    for item in error.errors():
        key = ".".join(str(p) for p in item["loc"])
        if item["type"] == "extra_forbidden":
            lines.append(f"  - unknown key '{key}' (check the spelling; see params.yaml)")
        else:
            found = item.get("input")
            lines.append(f"  - '{key}': {item['msg']}; found {found!r} ({type(found).__name__})")
    return "\n".join(lines)


def parse_params(data: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate a params mapping; raise ConfigError naming every bad key."""
    try:
        return Params.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path.resolve()}")
    with path.open() as fh:
        data = yaml.safe_load(fh)
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping at the top level, found {type(data).__name__}"
        )
    return parse_params(data, str(path))
