"""The run's outputs: model.safetensors, history.json and the summary per round and per site."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fedcxr.federation.audit import verify
from fedcxr.federation.state import FederationState
from fedcxr.federation.transport import file_sha256, write_state_file
from fedcxr.stageio import atomic_path, write_json

AUDIT = "audit.jsonl"
MODEL = "model.safetensors"
HISTORY = "history.json"


def _weighted(pairs: list[tuple[int, Any]]) -> float | None:
    pairs = [(n, v) for n, v in pairs if isinstance(v, int | float) and math.isfinite(v)]
    total = sum(n for n, _ in pairs)
    return sum(n * v for n, v in pairs) / total if total else None


def summarize(state: FederationState, out_dir: Path, wall_s: float) -> dict[str, Any]:
    """Write model.safetensors and history.json; the run's summary (per round and per site)."""
    final = state.global_state()
    state.close()
    with atomic_path(out_dir / MODEL) as tmp:
        write_state_file(tmp, final)
    history = state.history
    write_json(out_dir / HISTORY, history)
    per_round = []
    for record in history:
        sites: dict[str, Any] = {}
        for site, o in record["sites"].items():
            m = o.get("metrics") or {}
            sites[site] = {
                "accepted": o.get("accepted", False),
                "n_k": o.get("n_k", 0),
                "train_loss": m.get("train_loss"),
                "val_auroc": m.get("val_auroc"),
                "bytes_to_site": o.get("bytes_sent", 0),
                "bytes_from_site": o.get("bytes_received", 0),
                "epoch_seconds": m.get("epoch_seconds"),
                **({"epsilon": m["epsilon"]} if "epsilon" in m else {}),
            }
        ok = [s for s in sites.values() if s["accepted"]]
        per_round.append(
            {
                "round": record["round"],
                "wall_s": record["wall_s"],
                "val_auroc": _weighted([(s["n_k"], s["val_auroc"]) for s in ok]),
                "train_loss": _weighted([(s["n_k"], s["train_loss"]) for s in ok]),
                "sites": sites,
            }
        )
    audit = verify(out_dir / AUDIT)
    return {
        "rounds": len(history),
        "strategy": state.strategy.name,
        "sites": list(state.sites),
        "per_round": per_round,
        "final_val_auroc": per_round[-1]["val_auroc"] if per_round else None,
        "model_sha256": file_sha256(out_dir / MODEL),
        "audit_ok": audit.ok,
        "audit_last_hash": audit.last_hash,
        "wall_s": round(wall_s, 3),
    }
