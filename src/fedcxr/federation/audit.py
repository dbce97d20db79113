"""Append-only, hash-chained JSONL audit log of what the federation did, and its verifier.

Each line is one JSON object::

    {"seq": n, "time": "...Z", "event": "...", <fields>, "prev": "<hex>", "hash": "<hex>"}

`seq` counts from 1 (so it equals the line number), `time` is ISO-8601 UTC, `prev` is the `hash`
of the previous entry (64 zeros for the first), and `hash` is the SHA-256 of the entry's
canonical JSON without `hash` (`json.dumps(obj, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)`, UTF-8). Editing, deleting, inserting or moving a line breaks the chain at
that line. Dropping whole lines from the *end* keeps a valid (shorter) chain: record the last
hash somewhere else (e.g. the stage's metrics) to catch that too.

Events the federation writes (required fields in brackets; more fields are allowed):

- ``site_joined`` (site, cert_fingerprint): a site connected with a certificate from the
  federation CA whose common name is on the allow-list; the SHA-256 fingerprint of its cert.
- ``join_refused`` (peer, reason): a connection was turned away (unknown common name, site
  not on the allow-list, duplicate session, ...); `peer` is the address or common name.
- ``model_broadcast`` (round, sha256, bytes): the global model of `round` was sent to the
  sites; digest and size of the serialized weights.
- ``update_received`` (round, site, sha256, n_k, bytes): a site's update for `round` was
  accepted; `n_k` is the number of training examples it was computed on (the FedAvg weight).
- ``update_refused`` (round, site, reason): a site's update was rejected (wrong round, shape
  mismatch, non-finite values, too late, ...).
- ``aggregated`` (round, sha256, strategy, sites): the new global model of `round`, the
  aggregation strategy, and the list of sites whose updates went into it.
- ``dp_accounting`` (round, site, epsilon, delta, noise_multiplier, max_grad_norm): a site's
  differential-privacy budget spent so far, as reported after `round`.
- ``round_completed`` (round): the round is over.
- ``federation_finished`` (): training ended; put the reason / final round in fields.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import re
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedcxr.stageio import fsync_dir, unshare

SITE_JOINED = "site_joined"
JOIN_REFUSED = "join_refused"
MODEL_BROADCAST = "model_broadcast"
UPDATE_RECEIVED = "update_received"
UPDATE_REFUSED = "update_refused"
AGGREGATED = "aggregated"
DP_ACCOUNTING = "dp_accounting"
ROUND_COMPLETED = "round_completed"
FEDERATION_FINISHED = "federation_finished"

# Known events -> fields they must carry. Other event names are allowed (no required fields).
EVENT_FIELDS: dict[str, tuple[str, ...]] = {
    SITE_JOINED: ("site", "cert_fingerprint"),
    JOIN_REFUSED: ("peer", "reason"),
    MODEL_BROADCAST: ("round", "sha256", "bytes"),
    UPDATE_RECEIVED: ("round", "site", "sha256", "n_k", "bytes"),
    UPDATE_REFUSED: ("round", "site", "reason"),
    AGGREGATED: ("round", "sha256", "strategy", "sites"),
    DP_ACCOUNTING: ("round", "site", "epsilon", "delta", "noise_multiplier", "max_grad_norm"),
    ROUND_COMPLETED: ("round",),
    FEDERATION_FINISHED: (),
}
RESERVED = ("seq", "time", "event", "prev", "hash")
GENESIS = "0" * 64
_EVENT_NAME = re.compile(r"^[a-z][a-z0-9_]{0,63}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")


class AuditError(ValueError):
    """An entry that cannot be written, or a log that is broken and must not be extended."""


@dataclass(frozen=True)
class VerifyResult:
    """`entries` counts the intact entries before the first bad line (all of them when ok)."""

    ok: bool
    entries: int
    first_bad_line: int | None
    reason: str
    last_hash: str = GENESIS  # hash of the last intact entry: anchor it elsewhere


# ---------------------------------------------------------------- pure core


def canonical(obj: Any) -> str:
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    )


def entry_hash(entry: Mapping[str, Any]) -> str:
    """SHA-256 hex of the entry's canonical JSON, leaving out its own `hash`."""
    body = {k: v for k, v in entry.items() if k != "hash"}
    return hashlib.sha256(canonical(body).encode("utf-8")).hexdigest()


def _utc_iso(when: dt.datetime) -> str:
    if when.tzinfo is None or when.utcoffset() is None:
        raise AuditError(f"audit clock must return a timezone-aware datetime, found {when!r}")
    return when.astimezone(dt.UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


def make_entry(
    seq: int, prev: str, when: dt.datetime, event: str, fields: Mapping[str, Any]
) -> dict[str, Any]:
    """The entry as it will read back from the log (JSON types only), `hash` included."""
    if not isinstance(event, str) or not _EVENT_NAME.fullmatch(event):
        raise AuditError(
            f"invalid event name {event!r}: expected lower_snake_case like {SITE_JOINED!r}"
        )
    clash = sorted(set(fields) & set(RESERVED))
    if clash:
        raise AuditError(f"field name(s) {clash} are reserved for the log itself: {RESERVED}")
    missing = [f for f in EVENT_FIELDS.get(event, ()) if f not in fields]
    if missing:
        raise AuditError(
            f"event {event!r} needs field(s) {missing}; expected {list(EVENT_FIELDS[event])}, "
            f"found {sorted(fields)}"
        )
    for name, value in fields.items():
        try:
            json.dumps(value, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise AuditError(
                f"event {event!r}: field {name!r} is not plain JSON ({exc}); "
                f"found {type(value).__name__} {value!r:.80}"
            ) from None
    entry = {"seq": seq, "time": _utc_iso(when), "event": event, **fields, "prev": prev}
    # Round-trip through JSON so the hash is computed over exactly what a reader will parse
    # (tuples become lists, non-string keys become strings).
    entry = json.loads(json.dumps(entry, ensure_ascii=False, allow_nan=False))
    entry["hash"] = entry_hash(entry)
    return entry


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    dupes = sorted({k for k in keys if keys.count(k) > 1})
    if dupes:
        raise ValueError(f"duplicate key(s) {dupes}")
    return dict(pairs)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def check_line(raw: bytes, line_no: int, prev: str) -> tuple[dict[str, Any] | None, str]:
    """Parse and check one raw line (with its newline); (entry, "") or (None, reason)."""
    if not raw.endswith(b"\n"):
        return None, "truncated: the last line has no newline (an interrupted write?)"
    try:
        text = raw[:-1].decode("utf-8")
    except UnicodeDecodeError as exc:
        return None, f"not UTF-8 ({exc.reason} at byte {exc.start})"
    if not text.strip():
        return None, "empty line, expected a JSON object"
    try:
        entry = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_reject_constant)
    except ValueError as exc:
        return None, f"not JSON ({exc})"
    if not isinstance(entry, dict):
        return None, f"expected a JSON object, found {type(entry).__name__}"
    missing = [k for k in RESERVED if k not in entry]
    if missing:
        return None, f"missing key(s) {missing}"
    seq = entry["seq"]
    if type(seq) is not int or seq != line_no:
        return None, (f"seq is {seq!r}, expected {line_no} (a line was deleted, inserted or moved)")
    if not isinstance(entry["hash"], str) or not _HEX64.fullmatch(entry["hash"]):
        return None, f"hash is {entry['hash']!r}, expected 64 lower-case hex digits"
    if entry["prev"] != prev:
        return None, (
            f"prev is {str(entry['prev'])[:16]}..., expected the hash of the line before "
            f"({prev[:16]}...): a line was deleted, inserted or moved"
        )
    try:
        actual = entry_hash(entry)
    except (TypeError, ValueError) as exc:
        return None, f"cannot hash the entry ({exc})"
    if actual != entry["hash"]:
        return None, (
            f"hash mismatch: stored {entry['hash'][:16]}..., content hashes to "
            f"{actual[:16]}... (the entry was edited)"
        )
    return entry, ""


def verify_bytes(data: bytes) -> VerifyResult:
    """Check a whole log held in memory: the chain from the first line to the last."""
    prev = GENESIS
    good = 0
    # Split on '\n' only (not splitlines' \r, \x1c, ...) so line numbers match an editor's.
    lines = data.split(b"\n")
    # A log ending in '\n' yields a final empty piece; anything else there is a partial line.
    tail = lines.pop()
    raws = [piece + b"\n" for piece in lines] + ([tail] if tail else [])
    for line_no, raw in enumerate(raws, start=1):
        entry, reason = check_line(raw, line_no, prev)
        if entry is None:
            return VerifyResult(False, good, line_no, reason, prev)
        prev = entry["hash"]
        good += 1
    return VerifyResult(True, good, None, "", prev)


# ---------------------------------------------------------------- I/O


def verify(path: str | Path) -> VerifyResult:
    """Verify the log at `path` (FileNotFoundError if it does not exist)."""
    return verify_bytes(Path(path).read_bytes())


class AuditLog:
    """Appends entries to a hash-chained JSONL file, continuing an existing chain.

    Safe to share between threads of one process (the aggregator's gRPC handlers). If the file
    changed behind its back (another writer, an edit), it re-verifies before the next append and
    refuses to extend a broken log.

    Never written through a link: before each append, a log that is a symlink or has other hard
    links (after `dvc checkout`, the workspace file can be the DVC cache object itself) is first
    replaced by a private copy (stageio.unshare: temp file, fsync, rename), and the entry is
    appended to that copy. Copying once when the log is shared, rather than copying the whole
    log for every entry, keeps appends O(1): a federation writes hundreds of entries per run.
    """

    def __init__(self, path: str | Path, *, now: Callable[[], dt.datetime] | None = None) -> None:
        self.path = Path(path)
        self._now = now or (lambda: dt.datetime.now(dt.UTC))
        self._lock = threading.Lock()
        self._state: tuple[int, str, int] | None = None  # (entries, last hash, file size)

    def _tip(self) -> tuple[int, str]:
        """(entries, last hash) of the existing log, re-verified if the file size changed."""
        size = self.path.stat().st_size if self.path.exists() else 0
        if self._state is not None and self._state[2] == size:
            return self._state[0], self._state[1]
        if size == 0:
            return 0, GENESIS
        result = verify(self.path)
        if not result.ok:
            raise AuditError(
                f"{self.path}: refusing to append to a broken audit log; "
                f"line {result.first_bad_line}: {result.reason}. "
                f"Keep it as evidence and start a new log."
            )
        return result.entries, result.last_hash

    def append(self, event: str, **fields: Any) -> dict[str, Any]:
        """Write one entry (flushed and fsynced before returning) and return it."""
        with self._lock:
            entries, prev = self._tip()
            entry = make_entry(entries + 1, prev, self._now(), event, fields)
            line = (json.dumps(entry, ensure_ascii=False, allow_nan=False) + "\n").encode()
            created = not self.path.exists()
            if created:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            else:
                unshare(self.path)  # a DVC cache object is never appended to
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            try:
                written = os.write(fd, line)
                if written != len(line):  # pragma: no cover - disk full and the like
                    raise AuditError(
                        f"{self.path}: short write ({written} of {len(line)} bytes); "
                        f"the log now ends in a partial line"
                    )
                os.fsync(fd)
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if created:
                fsync_dir(self.path.parent)
            self._state = (entries + 1, entry["hash"], size)
            return entry
