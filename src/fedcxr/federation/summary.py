"""The run's outputs: model.safetensors, history.json, and its RunSummary with RunTimings."""

from __future__ import annotations

from pathlib import Path

from fedcxr.federation.audit import verify
from fedcxr.federation.records import RunResult, RunSummary, RunTimings
from fedcxr.federation.state import FederationState
from fedcxr.stageio import atomic_path, write_json
from fedcxr.tensorfile import MODEL, file_sha256, write_state_file

AUDIT = "audit.jsonl"
HISTORY = "history.json"


def summarize(state: FederationState, out_dir: Path, wall_s: float) -> RunResult:
    """Write model.safetensors and history.json (one RoundRecord per round); the run's result."""
    final = state.global_state()
    state.close()
    with atomic_path(out_dir / MODEL) as tmp:
        write_state_file(tmp, final)
    write_json(out_dir / HISTORY, [record.to_json() for record in state.history])
    audit = verify(out_dir / AUDIT)
    summary = RunSummary(
        strategy=state.strategy.name,
        sites=state.sites,
        rounds=tuple(state.history),
        model_sha256=file_sha256(out_dir / MODEL),
        audit_ok=audit.ok,
    )
    timings = RunTimings(round(wall_s, 3), tuple(state.timings), audit.last_hash)
    return RunResult(summary, timings)
