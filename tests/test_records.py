"""The federation's typed records: one name per quantity, seconds apart, JSON round trips."""

from __future__ import annotations

import json

import pytest

from fedcxr.federation.records import (
    RoundRecord,
    RoundTiming,
    RunResult,
    RunSummary,
    RunTimings,
    SiteOutcome,
    split_timings,
)


def _round(rnd: int = 1) -> RoundRecord:
    return RoundRecord(
        round=rnd,
        model_sha256="ab" * 32,
        sites={
            "site-a": SiteOutcome(
                "site-a", True, n_k=30, bytes_to_site=100, bytes_from_site=90, sha256="c" * 64,
                metrics={"train_loss": 0.5, "val_auroc": 0.8, "epsilon": 1.5, "steps": 3},
            ),
            "site-b": SiteOutcome(
                "site-b", True, n_k=10, bytes_to_site=100, bytes_from_site=90,
                metrics={"train_loss": 0.9, "val_auroc": None, "steps": 1},
            ),
            "site-c": SiteOutcome("site-c", False, reason="shape mismatch", bytes_to_site=100),
        },
    )  # fmt: skip


def test_site_metrics_lose_their_seconds_where_an_update_is_received() -> None:
    kept, seconds = split_timings({"train_loss": 0.5, "epoch_seconds": 2.5, "steps": 3})
    assert kept == {"train_loss": 0.5, "steps": 3}
    assert seconds == {"epoch_seconds": 2.5}


def test_round_figures_weight_the_accepted_sites_by_n_k() -> None:
    record = _round()
    assert record.train_loss == pytest.approx((30 * 0.5 + 10 * 0.9) / 40)
    assert record.val_auroc == pytest.approx(0.8)  # site-b has none, site-c was refused
    assert record.sites["site-a"].epsilon == 1.5 and record.sites["site-b"].epsilon is None
    assert [o.site for o in record.accepted()] == ["site-a", "site-b"]


def test_a_round_record_survives_json() -> None:
    record = _round()
    text = json.dumps(record.to_json(), allow_nan=False)
    assert RoundRecord.from_json(json.loads(text)) == record
    timing = RoundTiming(1, 3.25, {"site-a": 1.0})
    assert RoundTiming.from_json(json.loads(json.dumps(timing.to_json()))) == timing


def test_the_summary_has_no_seconds_and_the_result_puts_them_back() -> None:
    summary = RunSummary("fedavg", ("site-a", "site-b", "site-c"), (_round(),), "f" * 64, True)
    timings = RunTimings(12.5, (RoundTiming(1, 3.25, {"site-a": 1.0, "site-b": 2.0}),), "h" * 64)
    plain = summary.to_json()
    assert "seconds" not in json.dumps(plain) and "wall_s" not in json.dumps(plain)
    assert plain["final_val_auroc"] == pytest.approx(0.8)
    assert summary.wire_bytes() == 3 * 100 + 2 * 90
    row = plain["per_round"][0]["sites"]
    assert row["site-c"] == {
        "accepted": False, "n_k": 0, "train_loss": None, "val_auroc": None,
        "bytes_to_site": 100, "bytes_from_site": 0,
    }  # fmt: skip
    full = RunResult(summary, timings).to_json()
    assert full["wall_s"] == 12.5 and full["audit_last_hash"] == "h" * 64
    assert full["per_round"][0]["wall_s"] == 3.25
    assert full["per_round"][0]["sites"]["site-b"]["epoch_seconds"] == 2.0
    assert full["per_round"][0]["sites"]["site-c"]["epoch_seconds"] is None
