"""Where each trained model lives and the run card beside it, for every configuration alike.

Layout: ``models/<family>/<task>/s<seed>/`` holds ``model.safetensors`` (a plain state dict)
and ``run.json`` (the run card). Families: ``federated``, ``federated_dp``, ``single_node``,
``centralized`` and ``local`` (one sub-folder per site: ``models/local/<task>/s<seed>/<site>``).
The configuration name that evaluation and the report use is the family, except for local
runs, which are named ``local_<site>``.

A run folder that must make room for a new run is set aside, not deleted, when it holds
evidence (a checkpoint, an audit log) found nowhere else: it moves to
``runs-archive/<family>/<task>-s<seed>-<UTC time>/``, outside every DVC output (the folder is
git- and DVC-ignored), and stays there until the user removes it.
"""

from __future__ import annotations

import datetime as dt
import errno
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from fedcxr.convergence import CurvePoint
from fedcxr.stageio import atomic_path, unshare, write_text_atomic
from fedcxr.tensorfile import MODEL, State, write_state_file

CARD = "run.json"
FAMILIES = ("federated", "federated_dp", "single_node", "centralized", "local")
COMM_KINDS = ("grpc_wire", "allreduce", "none")
ARCHIVE = Path("runs-archive")  # runs set aside for a new one; git- and DVC-ignored


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
    # The learning curve: validation AUROC on the pooled validation splits after each epoch
    # (federated: each round), by cumulative local epochs.
    curve: tuple[CurvePoint, ...] = ()
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.comm_kind not in COMM_KINDS:
            raise ValueError(f"comm_kind must be one of {COMM_KINDS}, found {self.comm_kind!r}")

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["sites"] = list(self.sites)
        out["curve"] = [p.to_json() for p in self.curve]
        return out

    @classmethod
    def from_json(cls, data: dict[str, Any], where: str = "run card") -> RunCard:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"{where}: unknown keys {unknown}")
        try:
            curve = tuple(CurvePoint.from_json(p, where) for p in data.get("curve", ()))
            return cls(**{**data, "sites": tuple(data.get("sites", ())), "curve": curve})
        except TypeError as exc:
            raise ValueError(f"{where}: {exc}") from None


def run_dir(models: Path, family: str, task: str, seed: int, site: str | None = None) -> Path:
    if family not in FAMILIES:
        raise ValueError(f"unknown model family {family!r}; expected one of {FAMILIES}")
    base = Path(models) / family / task / f"s{seed}"
    return base / site if site is not None else base


def write_run(folder: Path, state: State, card: RunCard) -> None:
    """The model and its run card, each written to a new file renamed over the old one."""
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_path(folder / MODEL) as tmp:
        write_state_file(tmp, state)
    write_text_atomic(folder / CARD, json.dumps(card.to_json(), indent=2, sort_keys=True) + "\n")


def read_card(folder: Path) -> RunCard:
    path = Path(folder) / CARD
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: expected a run written by a training stage")
    return RunCard.from_json(json.loads(path.read_text()), str(path))


def read_run(folder: Path) -> tuple[State, RunCard]:
    card = read_card(folder)
    path = Path(folder) / MODEL
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found beside {folder / CARD}")
    return load_file(str(path)), card


def find_runs(models: Path) -> list[Path]:
    """Every run folder under `models` (those holding a run card), sorted."""
    return sorted(p.parent for p in Path(models).rglob(CARD))


def archive_name(label: str, when: dt.datetime) -> str:
    """`<label>-<UTC time>` (like multilabel-s42-20261127T093012Z), sorting by time."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError(f"expected a timezone-aware time for the archive name, found {when!r}")
    return f"{label}-{when.astimezone(dt.UTC):%Y%m%dT%H%M%SZ}"


def set_aside(
    folder: Path,
    archive: Path,
    label: str,
    *,
    evidence: Sequence[str],
    elsewhere: Callable[[Path], bool] = lambda path: False,
    now: Callable[[], dt.datetime] = lambda: dt.datetime.now(dt.UTC),
) -> Path | None:
    """Clear `folder` for a new run without losing what it holds; where it went, or None.

    `evidence` names the files that must never be deleted (checkpoint, audit log). If `folder`
    holds any that `elsewhere(path)` does not vouch for (e.g. an identical object in the DVC
    cache), the whole folder is moved (renamed; copied across file systems) to
    `archive/<label>-<UTC time>[-n]` and that path is returned. Otherwise -- nothing there, or
    only files that can be restored -- the folder is removed and None is returned.
    """
    folder = Path(folder)
    if not folder.exists():
        return None
    if not folder.is_dir():
        raise NotADirectoryError(f"{folder}: expected a run folder, found a file")
    kept = [folder / name for name in evidence if (folder / name).is_file()]
    if all(elsewhere(path) for path in kept):
        shutil.rmtree(folder)
        return None
    archive.mkdir(parents=True, exist_ok=True)
    base = archive / archive_name(label, now())
    target, n = base, 1
    while True:
        try:
            target.mkdir()  # claims the name; rename below replaces the empty folder
            break
        except FileExistsError:
            n += 1
            target = base.with_name(f"{base.name}-{n}")
    try:
        os.replace(folder, target)
    except OSError as exc:
        target.rmdir()
        if exc.errno != errno.EXDEV:
            raise
        shutil.copytree(folder, target)  # another file system: copy (links followed), then drop
        shutil.rmtree(folder)
    # A symlink into the DVC cache (cache.type symlink) would dangle after `dvc gc`: keep copies.
    for link in [p for p in target.rglob("*") if p.is_symlink() and p.is_file()]:
        unshare(link)
    return target


def _md5(path: Path) -> str:
    digest = hashlib.md5(usedforsecurity=False)
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def in_dvc_cache(repo: Path = Path(".")) -> Callable[[Path], bool]:
    """Whether a file's content is an object of this repository's DVC cache (by MD5), so that
    `dvc checkout` can restore it: the `elsewhere` of set_aside. Outside a DVC repository
    nothing is."""
    try:
        from dvc.repo import Repo

        cache = Repo(str(repo)).cache.local
    except Exception:  # not a DVC repository, or DVC unusable: keep everything
        return lambda path: False
    return lambda path: Path(cache.oid_to_path(_md5(path))).is_file()
