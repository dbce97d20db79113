"""Audit log: the hash chain holds for honest appends and breaks at the first tampered line."""

from __future__ import annotations

import datetime as dt
import hashlib
import itertools
import json
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from typer.testing import CliRunner

from fedcxr.cli import app
from fedcxr.federation import audit
from fedcxr.federation.audit import GENESIS, AuditError, AuditLog, canonical, verify


def _clock() -> Callable[[], dt.datetime]:
    t = [dt.datetime(2025, 1, 1, 12, 0, tzinfo=dt.UTC)]

    def now() -> dt.datetime:
        t[0] += dt.timedelta(seconds=1)
        return t[0]

    return now


def _write_log(path: Path, rounds: int = 2) -> AuditLog:
    """site_joined x2, then per round: broadcast, two updates, aggregate, completed. 2+5r lines."""
    log = AuditLog(path, now=_clock())
    for site in ("site-a", "site-b"):
        log.append(audit.SITE_JOINED, site=site, cert_fingerprint="ab" * 32)
    for r in range(1, rounds + 1):
        log.append(audit.MODEL_BROADCAST, round=r, sha256="00" * 32, bytes=1234)
        for site in ("site-a", "site-b"):
            log.append(
                audit.UPDATE_RECEIVED, round=r, site=site, sha256="11" * 32, n_k=10, bytes=99
            )
        log.append(audit.AGGREGATED, round=r, sha256="22" * 32, strategy="fedavg", sites=["a", "b"])
        log.append(audit.ROUND_COMPLETED, round=r)
    return log


@pytest.fixture
def log_path(tmp_path) -> Path:
    path = tmp_path / "audit.jsonl"
    _write_log(path)
    return path


def _lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_append_writes_a_verifiable_chain(log_path):
    lines = [json.loads(x) for x in _lines(log_path)]
    assert len(lines) == 12
    assert [e["seq"] for e in lines] == list(range(1, 13))
    assert lines[0]["prev"] == GENESIS
    assert lines[0]["time"] == "2025-01-01T12:00:01.000000Z"
    assert list(lines[0]) == ["seq", "time", "event", "site", "cert_fingerprint", "prev", "hash"]
    for before, entry in itertools.pairwise(lines):
        assert entry["prev"] == before["hash"]
    for entry in lines:
        body = {k: v for k, v in entry.items() if k != "hash"}
        assert entry["hash"] == hashlib.sha256(canonical(body).encode()).hexdigest()
    result = verify(log_path)
    assert result.ok and result.entries == 12 and result.first_bad_line is None
    assert result.last_hash == lines[-1]["hash"]


def test_returned_entry_is_what_reads_back(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl", now=_clock())
    entry = log.append("custom_event", note="héllo ✓", pair=(1, 2), nested={3: "x"})
    assert json.loads((tmp_path / "a.jsonl").read_text(encoding="utf-8")) == entry
    assert entry["pair"] == [1, 2] and entry["nested"] == {"3": "x"}
    assert "héllo ✓" in (tmp_path / "a.jsonl").read_text(encoding="utf-8")
    assert verify(tmp_path / "a.jsonl").ok


def _edit(path: Path, line: int, change: Callable[[dict], None]) -> None:
    lines = _lines(path)
    entry = json.loads(lines[line - 1])
    change(entry)
    lines[line - 1] = (json.dumps(entry) + "\n").encode()
    path.write_bytes(b"".join(lines))


def _tamper(kind: str, path: Path) -> None:
    lines = _lines(path)
    if kind == "edited field":
        _edit(path, 5, lambda e: e.update(n_k=10_000))
        return
    if kind == "edited seq":
        _edit(path, 5, lambda e: e.update(seq=50))
        return
    if kind == "deleted line":
        del lines[4]
    elif kind == "reordered lines":
        lines[4], lines[5] = lines[5], lines[4]
    elif kind == "duplicated line":
        lines.insert(5, lines[4])
    elif kind == "non-JSON line":
        lines[4] = b"this is not json\n"
    elif kind == "empty line":
        lines.insert(4, b"\n")
    elif kind == "duplicate key":
        lines[4] = lines[4].replace(b'{"seq": 5,', b'{"seq": 5, "n_k": 1,')
    elif kind == "truncated last line":
        lines[-1] = lines[-1][:40]
        path.write_bytes(b"".join(lines))
        return
    elif kind == "last newline lost":
        lines[-1] = lines[-1][:-1]
    path.write_bytes(b"".join(lines))


@pytest.mark.parametrize(
    ("kind", "line", "reason"),
    [
        ("edited field", 5, "hash mismatch"),
        ("edited seq", 5, "seq is 50, expected 5"),
        ("deleted line", 5, "seq is 6, expected 5"),
        ("reordered lines", 5, "seq is 6, expected 5"),
        ("duplicated line", 6, "seq is 5, expected 6"),
        ("non-JSON line", 5, "not JSON"),
        ("empty line", 5, "empty line"),
        ("duplicate key", 5, "duplicate key(s) ['n_k']"),
        ("truncated last line", 12, "truncated"),
        ("last newline lost", 12, "truncated"),
    ],
)
def test_tampering_is_found_at_the_right_line(log_path, kind, line, reason):
    _tamper(kind, log_path)
    result = verify(log_path)
    assert not result.ok
    assert result.first_bad_line == line, result.reason
    assert reason in result.reason
    assert result.entries == line - 1


def test_a_well_forged_insert_is_found_at_the_next_line(log_path):
    """A forger who recomputes the hash of an inserted entry still breaks the line after it."""
    lines = _lines(log_path)
    fourth = json.loads(lines[3])
    forged = {**json.loads(lines[4]), "site": "site-x", "prev": fourth["hash"]}
    forged["hash"] = audit.entry_hash(forged)
    lines.insert(4, (json.dumps(forged) + "\n").encode())
    log_path.write_bytes(b"".join(lines))
    result = verify(log_path)
    assert (result.ok, result.first_bad_line) == (False, 6)
    assert "seq is 5, expected 6" in result.reason


def test_reopen_continues_the_chain(log_path):
    last = json.loads(_lines(log_path)[-1])
    entry = AuditLog(log_path, now=_clock()).append(audit.FEDERATION_FINISHED, rounds=2)
    assert entry["seq"] == 13 and entry["prev"] == last["hash"]
    assert verify(log_path).entries == 13


def test_appending_to_a_broken_log_is_refused(log_path):
    log = AuditLog(log_path, now=_clock())
    _tamper("edited field", log_path)
    before = log_path.read_bytes()
    with pytest.raises(AuditError, match=r"broken audit log; line 5: hash mismatch"):
        log.append(audit.ROUND_COMPLETED, round=3)
    with pytest.raises(AuditError, match=str(log_path)):
        AuditLog(log_path).append(audit.ROUND_COMPLETED, round=3)
    assert log_path.read_bytes() == before


def test_a_log_changed_behind_the_writers_back_is_rechecked(log_path):
    log = AuditLog(log_path, now=_clock())
    log.append(audit.ROUND_COMPLETED, round=3)
    with log_path.open("ab") as fh:  # someone else appends garbage
        fh.write(b'{"seq": 14}\n')
    with pytest.raises(AuditError, match="line 14"):
        log.append(audit.ROUND_COMPLETED, round=4)


@pytest.mark.parametrize(
    ("event", "fields", "match"),
    [
        (audit.UPDATE_RECEIVED, {"round": 1, "site": "site-a"}, r"needs field\(s\) \['sha256'"),
        (audit.ROUND_COMPLETED, {"round": 1, "prev": "x"}, "reserved"),
        ("Bad Event", {}, "invalid event name"),
        (audit.DP_ACCOUNTING, {"epsilon": float("inf")}, "field 'epsilon' is not plain JSON"),
        ("custom", {"blob": b"bytes"}, "field 'blob' is not plain JSON"),
    ],
)
def test_bad_entries_are_refused_and_nothing_is_written(tmp_path, event, fields, match):
    if event == audit.DP_ACCOUNTING:
        fields = {
            "round": 1,
            "site": "site-a",
            "delta": 1e-5,
            "noise_multiplier": 1.1,
            "max_grad_norm": 1.0,
            **fields,
        }
    path = tmp_path / "a.jsonl"
    with pytest.raises(AuditError, match=match):
        AuditLog(path).append(event, **fields)
    assert not path.exists()


def test_naive_clock_is_refused(tmp_path):
    log = AuditLog(tmp_path / "a.jsonl", now=lambda: dt.datetime(2025, 1, 1))
    with pytest.raises(AuditError, match="timezone-aware"):
        log.append(audit.FEDERATION_FINISHED)


def test_threads_share_one_log(tmp_path):
    path = tmp_path / "a.jsonl"
    log = AuditLog(path)

    def work(site: str) -> None:
        for r in range(20):
            log.append(audit.UPDATE_REFUSED, round=r, site=site, reason="late")

    threads = [threading.Thread(target=work, args=(f"site-{c}",)) for c in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    result = verify(path)
    assert result.ok and result.entries == 80


def test_empty_log_is_ok(tmp_path):
    (tmp_path / "a.jsonl").write_bytes(b"")
    assert verify(tmp_path / "a.jsonl") == audit.VerifyResult(True, 0, None, "", GENESIS)


def test_cli_audit_verify(log_path, tmp_path):
    runner = CliRunner()
    result = runner.invoke(app, ["audit", "verify", str(log_path)])
    assert result.exit_code == 0, result.output
    assert "ok: 12 entries, chain intact" in result.output
    _tamper("deleted line", log_path)
    result = runner.invoke(app, ["audit", "verify", str(log_path)])
    assert result.exit_code == 1
    assert "BROKEN at line 5: seq is 6, expected 5" in result.output
    result = runner.invoke(app, ["audit", "verify", str(tmp_path / "missing.jsonl")])
    assert result.exit_code == 2 and "cannot read audit log" in result.output
