"""Typed, frozen configuration read from params.yaml; unknown or mistyped keys are errors."""

from __future__ import annotations

import os
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
from fedcxr.sources import SYNTHETIC_DIR

# The names each registry resolves, so params are checked on load without importing torch
# (fedcxr.models costs seconds to import). tests/test_config.py checks that every registry holds
# exactly these names: a new model, strategy or partitioner is registered and listed here.
REGISTRIES: dict[str, tuple[str, tuple[str, ...]]] = {
    "model.arch": ("fedcxr.models.MODELS", ("smallcnn", "resnet50", "densenet121")),
    "fl.strategy": (
        "fedcxr.federation.strategies.STRATEGIES",
        ("fedavg", "fedprox", "fedavgm", "fedadam", "fedyogi"),
    ),
    "partition.strategy": ("fedcxr.partition.PARTITIONERS", ("demographic", "iid", "dirichlet")),
}

# train.lr: auto -> the Adam learning rate of each architecture. smallcnn trains from scratch:
# measured on the embedded default, 1e-3 reaches its plateau within the CPU budget while the
# paper's 1e-4 had not started to learn after 3 epochs. ResNet-50 and DenseNet-121 keep the
# paper's 1e-4 (Adam, batch 32), the rate for ImageNet-pretrained weights.
ARCH_LR: dict[str, float] = {"smallcnn": 1e-3, "resnet50": 1e-4, "densenet121": 1e-4}

# YAML gives lists; frozen configs hold tuples (strict mode would otherwise refuse the list).
IntTuple = Annotated[
    tuple[int, ...], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)
]


class ConfigError(ValueError):
    """A params file that does not match the schema; the message names each bad key."""


def registered(key: str, value: str) -> str:
    """`value` if the registry that `key` names holds it, else a ValueError listing the names."""
    registry, names = REGISTRIES[key]
    if value not in names:
        raise ValueError(f"expected one of the names {sorted(names)} (registry {registry})")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SyntheticConfig(_Section):
    n_images: int = Field(3144, gt=0)
    miss_prob: float = Field(0.1, ge=0.0, le=1.0)
    # Finding -> how many times likelier a patient with that finding is sampled. The default
    # over-samples pneumonia so the small default test set holds positives; {} = NIH prevalence.
    enrich: dict[str, float] = Field(default_factory=lambda: {"Pneumonia": 12.0})
    # Each patient's first k images only (null: all): more patients for the same image count,
    # so narrower confidence intervals from a small test set.
    max_per_patient: int | None = Field(3, ge=1)
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
    # The NIH-format folder ingest and resize read, and the one dvc.yaml makes their input
    # (`${data.nih_dir}`): the embedded default's folder, or the NIH download (anywhere).
    nih_dir: str = Field(str(SYNTHETIC_DIR), validate_default=True)
    synthetic: SyntheticConfig = SyntheticConfig()

    @field_validator("nih_dir")
    @classmethod
    def _folder_matches_source(cls, value: str, info: ValidationInfo) -> str:
        if not value.strip() or value.startswith("~"):
            raise ValueError(
                "expected a folder path, relative to the repository or absolute (DVC expands no ~)"
            )
        synthetic = os.path.normpath(value) == os.path.normpath(SYNTHETIC_DIR)
        source = info.data.get("source")
        if source == "synthetic" and not synthetic:
            raise ValueError(
                f"expected {str(SYNTHETIC_DIR)!r} while data.source is synthetic (synthesize "
                f"renders the embedded default there, and DVC tracks data.nih_dir as the input "
                f"of ingest and resize); set data.nih_dir: {SYNTHETIC_DIR}, or data.source: nih "
                f"to read this folder"
            )
        if source == "nih" and synthetic:
            raise ValueError(
                f"expected the folder of the NIH download while data.source is nih, not the "
                f"embedded default's {str(SYNTHETIC_DIR)!r}; set it, e.g. "
                f"`dvc exp run -S data.source=nih -S data.nih_dir=data/raw/nih`"
            )
        return value


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
    strategy: str = "demographic"  # a name in fedcxr.partition.PARTITIONERS
    test_size: int = Field(900, gt=0)
    site_sizes: IntTuple = (440, 550, 330, 660, 264)
    # How the sizes meet the data (fedcxr.partition.fit_sizes): exact = image counts that must
    # fit (images left over stay unused); scale = proportions scaled to all the data; auto =
    # scale full-scale sizes (summing to all 112,120 NIH images) on a subset, else exact.
    fit: Literal["auto", "exact", "scale"] = "auto"
    val_fraction: float = Field(0.1, ge=0.0, lt=1.0)
    dirichlet_alpha: float = Field(0.5, gt=0.0)

    @field_validator("strategy")
    @classmethod
    def _registered(cls, value: str) -> str:
        return registered("partition.strategy", value)

    @field_validator("site_sizes")
    @classmethod
    def _positive_sizes(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(v <= 0 for v in value):
            raise ValueError(f"expected a non-empty list of positive image counts, found {value}")
        return value


class ModelConfig(_Section):
    arch: str = "smallcnn"  # a name in fedcxr.models.MODELS
    pretrained: bool = False

    @field_validator("arch")
    @classmethod
    def _registered(cls, value: str) -> str:
        return registered("model.arch", value)


def resolve_world_size(value: int | Literal["auto"], gpu_count: int) -> int:
    """Processes of the centralized DDP run: `auto` = one per CUDA GPU, or 2 without CUDA.

    `gpu_count` is the number of CUDA GPUs of the machine that runs it (0: CPU, gloo). Every
    rank needs a GPU of its own under CUDA, so an explicit value above the count is refused.
    """
    if gpu_count < 0:
        raise ValueError(f"expected a GPU count >= 0, found {gpu_count}")
    if value == "auto":
        return gpu_count if gpu_count else 2
    if gpu_count and value > gpu_count:
        raise ConfigError(
            f"'train.ddp_world_size': expected at most {gpu_count} (one process per GPU; this "
            f"machine has {gpu_count} CUDA GPU(s)), found {value}; set it to auto or to at "
            f"most {gpu_count}"
        )
    return value


class TrainConfig(_Section):
    # Adam's learning rate; auto = ARCH_LR[model.arch] (resolved when params are loaded).
    lr: float | Literal["auto"] = "auto"
    # Per epoch: constant, or cosine decay from lr to 0 over the run's epochs (federated: its
    # rounds x local epochs, so every configuration follows the same schedule by epoch).
    lr_schedule: Literal["constant", "cosine"] = "cosine"
    batch_size: int = Field(32, gt=0)
    image_size: int = Field(64, ge=8, le=4096)  # must be <= resize.size (checked in Params)
    epochs: int = Field(20, gt=0)  # pooled training epochs; keep = fl.rounds x fl.local_epochs
    # Processes of the centralized DDP baseline: auto = one per CUDA GPU (2 on CPU), or a count
    # (at most the GPU count on CUDA; checked by check-params and the stage, resolve_world_size).
    ddp_world_size: int | Literal["auto"] = "auto"
    # DataLoader worker processes: auto = none on CPU (the batch augmentation runs where the
    # model trains; workers would only copy uint8 slices), on CUDA the cores shared out among
    # the processes that train on this machine (fedcxr.train.data.loader_workers); or a count.
    num_workers: int | Literal["auto"] = "auto"
    seeds: IntTuple = (42,)
    augment: bool = True
    compile: bool = False  # torch.compile the model's forward (not with dp.enabled)

    @field_validator("lr", mode="before")
    @classmethod
    def _lr(cls, value: Any) -> Any:
        if value == "auto" or (type(value) in (int, float) and 0 < value < float("inf")):
            return float(value) if value != "auto" else value
        raise ValueError("expected 'auto' or a positive, finite learning rate")

    @field_validator("num_workers", mode="before")
    @classmethod
    def _workers(cls, value: Any) -> Any:
        if value == "auto" or (type(value) is int and value >= 0):
            return value
        raise ValueError("expected 'auto' or a number of worker processes >= 0")

    @field_validator("seeds")
    @classmethod
    def _non_empty(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value:
            raise ValueError("expected a non-empty list of integer seeds, found []")
        return value

    @field_validator("ddp_world_size", mode="before")
    @classmethod
    def _world_size(cls, value: Any) -> Any:
        if value == "auto" or (type(value) is int and value > 0):
            return value
        raise ValueError("expected 'auto' or a positive number of processes")

    @field_validator("ddp_world_size")
    @classmethod
    def _batch_splits(cls, value: int | str, info: ValidationInfo) -> int | str:
        batch = info.data.get("batch_size")
        if value != "auto" and batch is not None and batch % int(value):
            raise ValueError(
                f"expected a divisor of train.batch_size={batch} (each DDP rank trains on an "
                f"equal slice of the global batch)"
            )
        return value


class DPConfig(_Section):
    enabled: bool = False
    noise_multiplier: float = Field(1.0, ge=0.0)
    max_grad_norm: float = Field(1.0, gt=0.0)
    delta: float = Field(1e-5, gt=0.0, lt=1.0)
    target_epsilon: float | None = Field(None, gt=0.0)  # set: noise is calibrated to reach it
    # Opacus accountant behind every epsilon (fedcxr.train.accounting.ACCOUNTANTS): prv
    # (numerical composition, tight) or rdp (Renyi DP, a looser upper bound).
    accountant: Literal["rdp", "prv"] = "prv"


class FLConfig(_Section):
    rounds: int = Field(20, gt=0)
    local_epochs: int = Field(1, gt=0)
    # A name in fedcxr.federation.strategies.STRATEGIES: fedavg | fedprox | fedavgm | fedadam |
    # fedyogi (the last three: server optimizers after Reddi et al., ICLR 2021).
    strategy: str = "fedavg"
    fedprox_mu: float = Field(0.01, ge=0.0)
    # Server optimizers only (fedavg and fedprox ignore them). server_lr is eta: auto = the
    # strategy's default (fedavgm 1.0, which with momentum 0 is FedAvg; fedadam and fedyogi
    # 1e-2, within the 1e-2..1e-1 Reddi et al. tuned), or a positive number.
    server_lr: float | Literal["auto"] = "auto"
    server_momentum: float = Field(0.9, ge=0.0, lt=1.0)  # beta of fedavgm
    server_beta1: float = Field(0.9, ge=0.0, lt=1.0)  # fedadam/fedyogi first moment decay
    server_beta2: float = Field(0.99, ge=0.0, lt=1.0)  # fedadam/fedyogi second moment decay
    server_tau: float = Field(1e-3, gt=0.0, allow_inf_nan=False)  # adaptivity (larger: less)
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535)  # 0 = any free port
    round_timeout_s: int = Field(3600, gt=0)

    @field_validator("strategy")
    @classmethod
    def _registered(cls, value: str) -> str:
        return registered("fl.strategy", value)

    @field_validator("server_lr", mode="before")
    @classmethod
    def _server_lr(cls, value: Any) -> Any:
        if value == "auto" or (type(value) in (int, float) and 0 < value < float("inf")):
            return value
        raise ValueError("expected 'auto' or a positive, finite server learning rate (eta)")


Task = Literal["multilabel", "pneumonia"]
TaskTuple = Annotated[
    tuple[Task, ...], BeforeValidator(lambda v: tuple(v) if isinstance(v, list) else v)
]


class StudyConfig(_Section):
    tasks: TaskTuple = ("multilabel", "pneumonia")  # every configuration is trained for each
    # Converged = the best validation AUROC of the last `plateau_window` evaluations (epochs;
    # federated: rounds) exceeds the best before them by at most `plateau_tol`.
    plateau_window: int = Field(3, ge=1)
    plateau_tol: float = Field(0.005, ge=0.0, le=1.0)

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
    train: TrainConfig = Field(TrainConfig(), validate_default=True)  # resolves lr: auto
    dp: DPConfig = DPConfig()
    fl: FLConfig = FLConfig()
    evaluate: EvaluateConfig = EvaluateConfig()

    @field_validator("dp")
    @classmethod
    def _no_compile_under_dp(cls, value: DPConfig, info: ValidationInfo) -> DPConfig:
        train = info.data.get("train")
        if value.enabled and train is not None and train.compile:
            raise ValueError(
                "expected train.compile: false with dp.enabled: true (Opacus computes "
                "per-example gradients with hooks that torch.compile does not trace)"
            )
        return value

    @field_validator("train")
    @classmethod
    def _image_size_fits(cls, value: TrainConfig, info: ValidationInfo) -> TrainConfig:
        model = info.data.get("model")
        if value.lr == "auto" and model is not None:
            value = value.model_copy(update={"lr": ARCH_LR[model.arch]})
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
            error = (item.get("ctx") or {}).get("error")
            message = str(error) if item["type"] == "value_error" and error else item["msg"]
            lines.append(f"  - '{key}': {message}; found {found!r} ({type(found).__name__})")
    return "\n".join(lines)


def parse_params(data: dict[str, Any] | None, source: str = "params") -> Params:
    """Validate a params mapping; raise ConfigError naming every bad key."""
    try:
        return Params.model_validate(data or {})
    except ValidationError as exc:
        raise ConfigError(_describe(exc, source)) from None


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.SafeLoader that refuses a key given twice in one mapping (DVC refuses it too)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if isinstance(key, list | dict):
                continue  # unhashable: SafeLoader's own error follows
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None,
                    None,
                    f"duplicate key {key!r} (first given on line {seen[key] + 1})",
                    key_node.start_mark,
                )
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def _yaml_error(path: Path, exc: yaml.YAMLError) -> ConfigError:
    """One line: file:line:column, what is wrong (a tab gets a hint)."""
    mark = getattr(exc, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    if "'\\t'" in problem:
        problem += " (a tab: YAML indents with spaces)"
    context = getattr(exc, "context", None)
    context_mark = getattr(exc, "context_mark", None)
    if context and context_mark is not None:
        problem += f" ({context} from line {context_mark.line + 1})"
    return ConfigError(f"{where}: invalid YAML: {problem}")


def load_params(path: str | Path = "params.yaml") -> Params:
    """Read and validate params.yaml; a YAML error is one line naming file, line and column."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"params file not found: {path.resolve()}")
    try:
        with path.open() as fh:
            data = yaml.load(fh, Loader=_UniqueKeyLoader)  # a SafeLoader: plain data only
    except yaml.YAMLError as exc:
        raise _yaml_error(path, exc) from None
    if data is not None and not isinstance(data, dict):
        raise ConfigError(
            f"{path}: expected a mapping at the top level, found {type(data).__name__}"
        )
    return parse_params(data, str(path))
