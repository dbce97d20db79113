"""Resuming a federation: the one decision to continue, what a checkpoint restores, and saves."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from fedcxr.checkpoint import load_checkpoint, save_checkpoint
from fedcxr.federation.protocol import FederationError
from fedcxr.federation.records import RoundRecord, RoundTiming
from fedcxr.federation.strategies import SiteUpdate, check_update
from fedcxr.stageio import write_json
from fedcxr.tensorfile import State

TIMINGS = "timings.json"  # beside the checkpoint: each completed round's seconds


def resuming(checkpoint: Path, resume: bool) -> bool:
    """Whether to continue the federation checkpointed at `checkpoint`: the one place that
    decides. No checkpoint: a new federation. One, without `resume`: a FederationError."""
    if not checkpoint.exists():
        return False
    if not resume:
        raise FederationError(
            f"{checkpoint} already exists: pass resume=True (--resume) to continue that "
            "federation, or remove it to start a new one"
        )
    return True


@dataclass(frozen=True)
class Restored:
    """A checkpointed federation: the global model after `round`, and the rounds before."""

    state: State
    round: int
    history: list[RoundRecord]
    timings: list[RoundTiming]


def restore(checkpoint: Path, strategy: str, reference: State) -> Restored:
    """The federation at `checkpoint`, if written by `strategy` for a model shaped like
    `reference`; else a FederationError. Seconds come from the timings file beside it."""
    ckpt = load_checkpoint(checkpoint)
    if ckpt.meta.get("strategy") != strategy:
        raise FederationError(
            f"{checkpoint}: written by strategy {ckpt.meta.get('strategy')!r}, "
            f"this federation uses {strategy!r}"
        )
    problems = check_update(reference, SiteUpdate("checkpoint", 1, ckpt.state), None)
    if problems:
        raise FederationError(f"{checkpoint}: does not match the model: {'; '.join(problems)}")
    history = [RoundRecord.from_json(r) for r in ckpt.meta.get("history", [])]
    timings_file = checkpoint.parent / TIMINGS
    timings = []
    if timings_file.is_file():
        saved = json.loads(timings_file.read_text())
        timings = [RoundTiming.from_json(t) for t in saved if t["round"] <= ckpt.round]
    return Restored(ckpt.state, ckpt.round, history, timings)


def save_round(
    checkpoint: Path,
    state: State,
    history: list[RoundRecord],
    timings: list[RoundTiming],
    meta: dict[str, object],
) -> None:
    """After a round: the checkpoint (model, reproducible history), then the timings file."""
    rnd = history[-1].round
    save_checkpoint(checkpoint, state, rnd, {**meta, "history": [r.to_json() for r in history]})
    write_json(checkpoint.parent / TIMINGS, [t.to_json() for t in timings])
