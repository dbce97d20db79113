"""Resuming a federation: the one decision to continue, what a checkpoint restores, and saves."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from fedcxr.checkpoint import load_checkpoint, save_checkpoint
from fedcxr.federation.protocol import FederationError
from fedcxr.federation.records import RoundRecord, RoundTiming
from fedcxr.federation.strategies import (
    ServerOpt,
    ServerState,
    SiteUpdate,
    Strategy,
    check_server_state,
    check_update,
)
from fedcxr.stageio import write_json
from fedcxr.tensorfile import State

TIMINGS = "timings.json"  # beside the checkpoint: each completed round's seconds
# The server optimizer's state (fedavgm, fedadam, fedyogi: m, v) travels in the checkpoint file
# itself, its tensors named SERVER_PREFIX + "<slot>/<tensor name>", so one atomic rename saves
# the model and the state that continues it. No PyTorch state-dict key starts with "@".
SERVER_PREFIX = "@server/"


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
    """A checkpointed federation: the global model after `round`, the server optimizer's
    state that continues it ({} for strategies without one), and the rounds before."""

    state: State
    round: int
    history: list[RoundRecord]
    timings: list[RoundTiming]
    server_state: ServerState = field(default_factory=dict)


def restore(
    checkpoint: Path, strategy: Strategy, reference: State, opt: ServerOpt | None = None
) -> Restored:
    """The federation at `checkpoint`, if written by `strategy` (with server optimizer settings
    `opt`, where it has a server optimizer) for a model shaped like `reference`; else a
    FederationError. Seconds come from the timings file beside it."""
    ckpt = load_checkpoint(checkpoint)
    if ckpt.meta.get("strategy") != strategy.name:
        raise FederationError(
            f"{checkpoint}: written by strategy {ckpt.meta.get('strategy')!r}, "
            f"this federation uses {strategy.name!r}"
        )
    saved_opt = ckpt.meta.get("server_opt")
    if strategy.slots and opt is not None and saved_opt != opt.to_json():
        raise FederationError(
            f"{checkpoint}: written with server optimizer settings {saved_opt}, "
            f"this federation uses {opt.to_json()}"
        )
    model = {k: v for k, v in ckpt.state.items() if not k.startswith(SERVER_PREFIX)}
    server = {
        k.removeprefix(SERVER_PREFIX): v
        for k, v in ckpt.state.items()
        if k.startswith(SERVER_PREFIX)
    }
    problems = check_update(reference, SiteUpdate("checkpoint", 1, model), None)
    problems += check_server_state(strategy, reference, server)
    if problems:
        raise FederationError(f"{checkpoint}: does not match the model: {'; '.join(problems)}")
    history = [RoundRecord.from_json(r) for r in ckpt.meta.get("history", [])]
    timings_file = checkpoint.parent / TIMINGS
    timings = []
    if timings_file.is_file():
        saved = json.loads(timings_file.read_text())
        timings = [RoundTiming.from_json(t) for t in saved if t["round"] <= ckpt.round]
    return Restored(model, ckpt.round, history, timings, server)


def save_round(
    checkpoint: Path,
    state: State,
    history: list[RoundRecord],
    timings: list[RoundTiming],
    meta: dict[str, object],
    server_state: ServerState | None = None,
) -> None:
    """After a round: the checkpoint (model, server optimizer state, reproducible history),
    then the timings file."""
    rnd = history[-1].round
    tensors = dict(state)
    for key, value in (server_state or {}).items():
        tensors[SERVER_PREFIX + key] = value
    save_checkpoint(checkpoint, tensors, rnd, {**meta, "history": [r.to_json() for r in history]})
    write_json(checkpoint.parent / TIMINGS, [t.to_json() for t in timings])
