"""Where each trained model lives and the run card beside it, for every configuration alike.

Layout: ``models/<family>/<task>/s<seed>/`` holds ``model.safetensors`` (a plain state dict)
and ``run.json`` (the run card). Families: ``federated``, ``federated_dp``, ``single_node``,
``centralized`` and ``local`` (one sub-folder per site: ``models/local/<task>/s<seed>/<site>``).
The configuration name that evaluation and the report use is the family, except for local
runs, which are named ``local_<site>``.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file

from fedcxr.transport import write_state_file

MODEL = "model.safetensors"
CARD = "run.json"
FAMILIES = ("federated", "federated_dp", "single_node", "centralized", "local")
COMM_KINDS = ("grpc_wire", "allreduce", "none")


@dataclass(frozen=True)
class RunCard:
    """What a training run was and what it cost (Table 3 of the study)."""

    config: str  # federated | federated_dp | single_node | centralized | local_<site>
    task: str
    seed: int
    arch: str
    dp_safe: bool  # GroupNorm variant (DP runs) -> build_model(..., dp_safe=True)
    image_size: int
    epochs: int  # passes over the training data (federated: rounds x local epochs)
    time_per_epoch_s: float
    train_wall_s: float
    comm_bytes: int  # bytes on the wire (federated) or handed to all-reduce (DDP)
    comm_kind: str
    world_size: int  # processes that trained (sites, DDP ranks, 1)
    n_train: int
    sites: tuple[str, ...] = ()  # whose training data went in
    epsilon: dict[str, float] = field(default_factory=dict)  # per site, DP runs only
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.comm_kind not in COMM_KINDS:
            raise ValueError(f"comm_kind must be one of {COMM_KINDS}, found {self.comm_kind!r}")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["sites"] = list(self.sites)
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "run card") -> RunCard:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}")
        try:
            return cls(**{**data, "sites": tuple(data.get("sites", ()))})
        except TypeError as exc:
            raise ValueError(f"{where}: {exc}") from None


def run_dir(models: Path, family: str, task: str, seed: int, site: str | None = None) -> Path:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    base = Path(models) / family / task / f"s{seed}"
    return base / site if site is not None else base


def write_run(folder: Path, state: dict[str, torch.Tensor], card: RunCard) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    write_state_file(folder / MODEL, state)
    (folder / CARD).write_text(json.dumps(card.to_json(), indent=2, sort_keys=True) + "\n")


def read_card(folder: Path) -> RunCard:
    path = Path(folder) / CARD
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a run written by a training stage")
    return RunCard.from_json(json.loads(path.read_text()), str(path))


def read_run(folder: Path) -> tuple[dict[str, torch.Tensor], RunCard]:
    card = read_card(folder)
    path = Path(folder) / MODEL
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found beside {folder / CARD}")
    return load_file(str(path)), card


def find_runs(models: Path) -> list[Path]:
    """Every run folder under `models` (those holding a run card), sorted."""
    return sorted(p.parent for p in Path(models).rglob(CARD))
