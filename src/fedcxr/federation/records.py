"""Typed results of a federation: site outcomes, round records, the run summary, its seconds.

The seconds are kept in records of their own, so that everything else is reproducible byte for
byte between two runs of the same federation.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# Metrics a site reports that are seconds, not results: split off where an update is received.
TIMING_KEYS = frozenset({"epoch_seconds"})


def split_timings(metrics: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, float]]:
    """A site's reported metrics as (reproducible metrics, timings)."""
    kept = {k: v for k, v in metrics.items() if k not in TIMING_KEYS}
    timings = {k: float(v) for k, v in metrics.items() if k in TIMING_KEYS and _number(v)}
    return kept, timings


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _metric(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    return float(value) if _number(value) else None


@dataclass(frozen=True)
class SiteOutcome:
    """One site in one round: its accepted update, or why it was refused.

    bytes_to_site counts the global model the site downloaded this round, bytes_from_site its
    upload (both as seen by the aggregator); metrics are what the site reported, seconds removed.
    """

    site: str
    accepted: bool
    reason: str = ""
    n_k: int = 0
    bytes_to_site: int = 0
    bytes_from_site: int = 0
    sha256: str = ""
    metrics: dict[str, Any] = field(default_factory=dict)

    @property
    def train_loss(self) -> float | None:
        return _metric(self.metrics, "train_loss")

    @property
    def val_auroc(self) -> float | None:
        return _metric(self.metrics, "val_auroc")

    @property
    def epsilon(self) -> float | None:
        return _metric(self.metrics, "epsilon")

    def to_json(self) -> dict[str, Any]:
        return {
            "accepted": self.accepted,
            "reason": self.reason,
            "n_k": self.n_k,
            "bytes_to_site": self.bytes_to_site,
            "bytes_from_site": self.bytes_from_site,
            "sha256": self.sha256,
            "metrics": dict(self.metrics),
        }

    @classmethod
    def from_json(cls, site: str, data: Mapping[str, Any]) -> SiteOutcome:
        return cls(
            site=site,
            accepted=bool(data["accepted"]),
            reason=str(data.get("reason", "")),
            n_k=int(data.get("n_k", 0)),
            bytes_to_site=int(data.get("bytes_to_site", 0)),
            bytes_from_site=int(data.get("bytes_from_site", 0)),
            sha256=str(data.get("sha256", "")),
            metrics=dict(data.get("metrics") or {}),
        )


def _weighted(pairs: Iterable[tuple[int, float | None]]) -> float | None:
    kept = [(n, v) for n, v in pairs if v is not None]
    total = sum(n for n, _ in kept)
    return sum(n * v for n, v in kept) / total if total else None


@dataclass(frozen=True)
class RoundRecord:
    """A completed round: every site's outcome (in site-id order) and the model it produced."""

    round: int
    model_sha256: str
    sites: dict[str, SiteOutcome]

    def accepted(self) -> list[SiteOutcome]:
        return [o for o in self.sites.values() if o.accepted]

    @property
    def val_auroc(self) -> float | None:
        """Validation AUROC of the accepted sites, weighted by their n_k."""
        return _weighted((o.n_k, o.val_auroc) for o in self.accepted())

    @property
    def train_loss(self) -> float | None:
        """Training loss of the accepted sites, weighted by their n_k."""
        return _weighted((o.n_k, o.train_loss) for o in self.accepted())

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "model_sha256": self.model_sha256,
            "sites": {name: o.to_json() for name, o in self.sites.items()},
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundRecord:
        sites = {name: SiteOutcome.from_json(name, o) for name, o in data["sites"].items()}
        return cls(round=int(data["round"]), model_sha256=str(data["model_sha256"]), sites=sites)


@dataclass(frozen=True)
class RoundTiming:
    """The seconds of one round: its wall time and each site's mean local epoch."""

    round: int
    wall_s: float
    epoch_seconds: dict[str, float] = field(default_factory=dict)

    def to_json(self) -> dict[str, Any]:
        return {
            "round": self.round,
            "wall_s": self.wall_s,
            "epoch_seconds": dict(self.epoch_seconds),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RoundTiming:
        return cls(
            round=int(data["round"]),
            wall_s=float(data["wall_s"]),
            epoch_seconds={k: float(v) for k, v in (data.get("epoch_seconds") or {}).items()},
        )


@dataclass(frozen=True)
class RunSummary:
    """What a federation produced, reproducible byte for byte from the same data and params."""

    strategy: str
    sites: tuple[str, ...]
    rounds: tuple[RoundRecord, ...]
    model_sha256: str
    audit_ok: bool

    @property
    def final_val_auroc(self) -> float | None:
        return self.rounds[-1].val_auroc if self.rounds else None

    def wire_bytes(self) -> int:
        """Bytes of models and updates that crossed the wire, every round and site."""
        return sum(
            o.bytes_to_site + o.bytes_from_site for r in self.rounds for o in r.sites.values()
        )

    def to_json(self) -> dict[str, Any]:
        """The layout of reports/train/federated*/<task>-s<seed>.json (one entry per round)."""
        per_round = []
        for record in self.rounds:
            sites = {}
            for name, o in record.sites.items():
                sites[name] = {
                    "accepted": o.accepted,
                    "n_k": o.n_k,
                    "train_loss": o.train_loss,
                    "val_auroc": o.val_auroc,
                    "bytes_to_site": o.bytes_to_site,
                    "bytes_from_site": o.bytes_from_site,
                    **({"epsilon": o.epsilon} if o.epsilon is not None else {}),
                }
            per_round.append(
                {
                    "round": record.round,
                    "val_auroc": record.val_auroc,
                    "train_loss": record.train_loss,
                    "sites": sites,
                }
            )
        return {
            "rounds": len(self.rounds),
            "strategy": self.strategy,
            "sites": list(self.sites),
            "per_round": per_round,
            "final_val_auroc": self.final_val_auroc,
            "model_sha256": self.model_sha256,
            "audit_ok": self.audit_ok,
        }


@dataclass(frozen=True)
class RunTimings:
    """What differs between two runs of the same federation: seconds, and the audit log's last
    hash (its entries carry timestamps)."""

    wall_s: float
    rounds: tuple[RoundTiming, ...]
    audit_last_hash: str

    def epoch_seconds(self) -> list[float]:
        return [s for r in self.rounds for s in r.epoch_seconds.values()]

    def to_json(self) -> dict[str, Any]:
        return {
            "wall_s": self.wall_s,
            "audit_last_hash": self.audit_last_hash,
            "rounds": [r.to_json() for r in self.rounds],
        }


@dataclass(frozen=True)
class RunResult:
    """A finished (or halted) federation: its reproducible summary and its timings."""

    summary: RunSummary
    timings: RunTimings

    def to_json(self) -> dict[str, Any]:
        """The summary's layout with the seconds put back in: per round `wall_s`, per site
        `epoch_seconds`, and the run's `wall_s` and `audit_last_hash` (for people, not diffs)."""
        out = self.summary.to_json()
        seconds = {t.round: t for t in self.timings.rounds}
        for record in out["per_round"]:
            timing = seconds.get(record["round"])
            record["wall_s"] = timing.wall_s if timing is not None else None
            for name, site in record["sites"].items():
                site["epoch_seconds"] = timing.epoch_seconds.get(name) if timing else None
        out["wall_s"] = self.timings.wall_s
        out["audit_last_hash"] = self.timings.audit_last_hash
        return out
