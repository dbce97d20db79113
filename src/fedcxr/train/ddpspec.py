"""What one centralized (DDP) run is: the DDPSpec, and the one JSON file it travels in."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar, Literal

from pydantic import ConfigDict, TypeAdapter, ValidationError

from fedcxr.config import TrainConfig
from fedcxr.stageio import write_text_atomic
from fedcxr.train.data import TASKS

SPEC_FILE = "spec.json"  # what launch_ddp hands the workers (in a temporary folder)


@dataclass(frozen=True)
class DDPSpec:
    """One centralized run: which site folders to pool, what to train, where to write."""

    data: tuple[Path, ...]
    out: Path
    task: str = "multilabel"
    arch: str = "smallcnn"
    epochs: int = 2
    batch_size: int = 32  # the GLOBAL batch; each of W ranks trains on batch_size / W
    lr: float = 1e-4
    lr_schedule: Literal["constant", "cosine"] = "constant"
    image_size: int = 128
    seed: int = 42
    augment: bool = True
    num_workers: int | Literal["auto"] = 0
    dp_safe: bool = False  # GroupNorm instead of BatchNorm (needed for exact DDP == 1 process)
    pretrained: bool = False
    compile: bool = False  # torch.compile the forward (train.compile)
    # Site folders whose validation splits, pooled, are evaluated after every epoch (the
    # learning curve); empty: no curve. Every configuration of the study uses all the sites.
    val_data: tuple[Path, ...] = ()

    # How the JSON file is read: unknown keys, a value of the wrong JSON type, NaN or Infinity
    # are refused (pydantic validates against the field types; __post_init__ runs after).
    __pydantic_config__: ClassVar[ConfigDict] = ConfigDict(
        extra="forbid", strict=True, allow_inf_nan=False
    )

    def __post_init__(self) -> None:
        object.__setattr__(self, "data", tuple(Path(d) for d in self.data))
        object.__setattr__(self, "out", Path(self.out))
        object.__setattr__(self, "val_data", tuple(Path(d) for d in self.val_data))
        if not self.data:
            raise ValueError("expected at least one site folder in data, found none")
        if len(set(self.data)) != len(self.data):
            raise ValueError(f"expected distinct site folders, found duplicates in {self.data}")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; expected one of {list(TASKS)}")
        for name in ("epochs", "batch_size", "image_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"expected {name} >= 1, found {getattr(self, name)}")
        if self.num_workers != "auto" and self.num_workers < 0:
            raise ValueError(f"expected num_workers >= 0, found {self.num_workers}")

    def train_config(self) -> TrainConfig:
        return TrainConfig(
            lr=float(self.lr),
            lr_schedule=self.lr_schedule,
            batch_size=self.batch_size,
            image_size=self.image_size,
            epochs=self.epochs,
            num_workers=self.num_workers,
            seeds=(self.seed,),
            augment=self.augment,
            compile=self.compile,
        )

    def to_json(self) -> dict[str, Any]:
        """One key per field, in field order: paths as strings, `data` as a list."""
        return _ADAPTER.dump_python(self, mode="json")

    @classmethod
    def from_json(cls, data: Any, source: str | Path = "the spec") -> DDPSpec:
        """The spec `to_json` gave; an unknown or missing key, or a value of the wrong JSON
        type, is a ValueError naming `source` (the file) and the key."""
        return _parse(json.dumps(data), source)


def _parse(text: str | bytes, source: str | Path) -> DDPSpec:
    """Validate JSON text in JSON mode (a path is a string, a tuple a list)."""
    try:
        return _ADAPTER.validate_json(text)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'spec'}: {e['msg']}"
            for e in exc.errors(include_url=False)
        )
        raise ValueError(f"invalid DDP spec in {source}: {problems}") from None


_ADAPTER: TypeAdapter[DDPSpec] = TypeAdapter(DDPSpec)


def write_spec(spec: DDPSpec, path: Path) -> Path:
    """Write spec.to_json() to `path` (strict JSON: no NaN or Infinity) for read_spec."""
    write_text_atomic(path, json.dumps(spec.to_json(), indent=2, allow_nan=False) + "\n")
    return path


def read_spec(path: Path) -> DDPSpec:
    """The DDPSpec that write_spec wrote to `path`; a malformed file is a ValueError naming it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a DDP spec JSON file (write_spec)")
    return _parse(path.read_bytes(), path)
