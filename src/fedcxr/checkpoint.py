"""Atomic per-round checkpoints of the global model, so a killed federation resumes."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file

from fedcxr.stageio import atomic_path
from fedcxr.tensorfile import State, write_state_file

META_KEY = "fedcxr"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read (damaged, or written by something else)."""


@dataclass(frozen=True)
class Checkpoint:
    state: State
    round: int  # the last completed round (0 = initial model)
    meta: dict[str, Any]  # strategy state, config hash, per-site accountant history, ...


def save_checkpoint(path: Path, state: State, rnd: int, meta: dict) -> None:
    """Write to a new temporary file, fsync, then rename: a crash never leaves a half
    checkpoint, and a checkpoint hard-linked into the DVC cache is replaced, not overwritten."""
    payload = json.dumps({"round": rnd, **meta}, sort_keys=True)
    with atomic_path(path) as tmp:
        write_state_file(tmp, state, metadata={META_KEY: payload})


def load_checkpoint(path: Path) -> Checkpoint:
    try:
        state = load_file(str(path))
        with safe_open(str(path), framework="pt") as fh:
            meta = json.loads((fh.metadata() or {})[META_KEY])
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a fedcxr checkpoint ({exc})") from exc
    rnd = int(meta.pop("round"))
    return Checkpoint(state=state, round=rnd, meta=meta)
