"""The round state machine: rounds, sites and the global model (FederationState), no gRPC."""

from __future__ import annotations

import json
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from safetensors.torch import load_file

from fedcxr.federation import audit as ev
from fedcxr.federation import heap
from fedcxr.federation.audit import AuditLog
from fedcxr.federation.protocol import (
    DEFAULT_POLL_S,
    FederationError,
    SiteInfo,
    TaskInfo,
    UploadResult,
)
from fedcxr.federation.records import RoundRecord, RoundTiming, SiteOutcome, split_timings
from fedcxr.federation.resume import restore, resuming, save_round
from fedcxr.federation.strategies import (
    ServerOpt,
    ServerState,
    SiteUpdate,
    check_upload,
    get_strategy,
)
from fedcxr.federation.tlswatch import watch_handshakes
from fedcxr.tensorfile import LazyState, State, file_sha256, write_state_file


class FederationState:
    """Rounds, sites and the global model; every public method is safe to call from any thread.

    Rounds start once every allowed site has joined. In round r each site is told TRAIN(r, sha of
    the global model); the round closes when every site has either submitted an accepted update
    or been refused, and the accepted ones are aggregated in site-id order. After each round the
    checkpoint is written atomically, so a killed federation resumes after its last round.
    `history` holds one RoundRecord per completed round (reproducible), `timings` its seconds.
    A server optimizer's state (`server_state`: m, v of fedavgm/fedadam/fedyogi, settings
    `server_opt`) lives here between rounds and is checkpointed with each round's model.

    Memory does not grow with the number of sites: the global model is served from a file,
    uploads are spooled to files in `work_dir` (a private temporary folder by default) and
    aggregated tensor by tensor, so the aggregator holds about one model (the new one) at most.
    """

    def __init__(
        self,
        initial_state: State,
        *,
        sites: Sequence[str],
        rounds: int,
        strategy: str,
        round_config: dict[str, Any],
        audit: AuditLog,
        checkpoint: Path,
        resume: bool = False,
        federation_id: str = "fedcxr",
        stop_after_round: int | None = None,
        on_round_completed: Callable[[int, State], None] | None = None,
        work_dir: Path | None = None,
        server_opt: ServerOpt | None = None,
    ) -> None:
        if not sites:
            raise FederationError("a federation needs at least one site on its allow-list")
        if len(set(sites)) != len(sites):
            raise FederationError(f"duplicate site names in the allow-list {list(sites)}")
        if rounds < 1:
            raise FederationError(f"rounds must be at least 1, found {rounds}")
        self.sites: tuple[str, ...] = tuple(sorted(sites))
        self.rounds = rounds
        self.strategy = get_strategy(strategy)
        # The server optimizer's settings (its defaults, fl.server_lr auto, when not given).
        self.server_opt = server_opt if server_opt is not None else self.strategy.server_opt()
        self.server_state: ServerState = {}
        self.federation_id = federation_id
        self.config_json = json.dumps(
            {"strategy": self.strategy.name, **round_config}, sort_keys=True, allow_nan=False
        )
        self.audit = audit
        self.checkpoint = Path(checkpoint)
        self.stop_after_round = stop_after_round
        self._on_round_completed = on_round_completed
        self._cond = threading.Condition()
        self.history: list[RoundRecord] = []
        self.timings: list[RoundTiming] = []
        self.joined: dict[str, SiteInfo] = {}
        self._told_stop: set[str] = set()
        self.halted = False

        if work_dir is None:
            self._tmp: tempfile.TemporaryDirectory | None = tempfile.TemporaryDirectory(
                prefix="fedcxr-aggregator-"
            )
            self.work_dir = Path(self._tmp.name)
        else:
            self._tmp = None
            self.work_dir = Path(work_dir)
            self.work_dir.mkdir(parents=True, exist_ok=True)
        self._spool = self.work_dir / "uploads"
        self._spool.mkdir(exist_ok=True)
        self._global_path: Path | None = None
        self._unwatch: list[Callable[[], None]] = []

        start_round = 1
        global_state = {k: v.detach().to("cpu") for k, v in initial_state.items()}
        if resuming(self.checkpoint, resume):
            restored = restore(self.checkpoint, self.strategy, global_state, self.server_opt)
            global_state, start_round = restored.state, restored.round + 1
            self.server_state = restored.server_state
            self.history, self.timings = restored.history, restored.timings
            audit.append("federation_resumed", from_round=start_round, checkpoint=str(checkpoint))
        self.round = start_round  # the round in progress (rounds + 1 once finished)
        self.finished = start_round > rounds
        self._set_model(global_state)
        del global_state
        # Per round: site -> outcome; accepted updates waiting for aggregation; bytes served;
        # each site's mean local epoch in seconds.
        self._outcomes: dict[str, SiteOutcome] = {}
        self._updates: dict[str, SiteUpdate] = {}
        self._bytes_to_site: dict[str, int] = {}
        self._epoch_s: dict[str, float] = {}
        self._round_started = 0.0
        self._round_open = False
        if self.finished:
            audit.append(ev.FEDERATION_FINISHED, rounds=rounds)

    # ------------------------------------------------------------------ helpers (lock held)

    def _set_model(self, state: State) -> None:
        """Make `state` the global model: written to its own file, which downloads stream."""
        path = self.work_dir / f"global-{self.round:05d}.safetensors"
        write_state_file(path, state)
        previous, self._global_path = self._global_path, path
        self._size = path.stat().st_size
        self._sha = file_sha256(path)
        # An update is the same model with other values: a generous bound on its size.
        self.max_update_bytes = 2 * self._size + (1 << 20)
        if previous is not None and previous != path:
            previous.unlink(missing_ok=True)  # a download still reading it keeps its inode

    def _reference(self) -> LazyState:
        assert self._global_path is not None
        return LazyState(self._global_path)

    def _discard_updates(self) -> None:
        for update in self._updates.values():
            if isinstance(update.state, LazyState):
                update.state.close()
                update.state.path.unlink(missing_ok=True)
        self._updates = {}

    def _all_joined(self) -> bool:
        return set(self.joined) == set(self.sites)

    def _open_round(self) -> None:
        if self._round_open or self.finished or self.halted or not self._all_joined():
            return
        self._round_open = True
        self._round_started = time.monotonic()
        self._discard_updates()
        self._outcomes, self._bytes_to_site, self._epoch_s = {}, {}, {}
        self.audit.append(ev.MODEL_BROADCAST, round=self.round, sha256=self._sha, bytes=self._size)
        self._cond.notify_all()

    def _task_for(self, site: str) -> TaskInfo:
        if self.finished:
            self._told_stop.add(site)
            self._cond.notify_all()
            return TaskInfo("STOP", round=self.rounds, message="federation finished")
        if self.halted:
            return TaskInfo("WAIT", message=f"stopped after round {self.round - 1}")
        if not self._round_open:
            missing = sorted(set(self.sites) - set(self.joined))
            return TaskInfo("WAIT", message=f"waiting for sites to join: {missing}")
        if site in self._outcomes:
            return TaskInfo("WAIT", round=self.round, message=f"round {self.round} in progress")
        return TaskInfo("TRAIN", self.round, self._sha, self.config_json)

    def _settle(self, outcome: SiteOutcome) -> None:
        """Record a site's outcome for the current round; close the round if it was the last."""
        site = outcome.site
        self._outcomes[site] = replace(outcome, bytes_to_site=self._bytes_to_site.get(site, 0))
        self._cond.notify_all()
        if set(self._outcomes) == set(self.sites):
            self._close_round()

    def _close_round(self) -> None:
        rnd = self.round
        accepted = [self._updates[s] for s in self.sites if s in self._updates]
        new_state = None
        if accepted:
            current = self._reference()
            try:
                new_state, self.server_state = self.strategy.aggregate(
                    current, accepted, self.server_state, self.server_opt
                )
            finally:
                current.close()
        self._discard_updates()
        timing = RoundTiming(
            rnd, round(time.monotonic() - self._round_started, 6), dict(self._epoch_s)
        )
        self.round = rnd + 1  # names the new global file after the round it serves
        if new_state is None:
            new_state = load_file(str(self._global_path))
        self._set_model(new_state)
        self.history.append(RoundRecord(rnd, self._sha, {s: self._outcomes[s] for s in self.sites}))
        self.timings.append(timing)
        meta: dict[str, object] = {
            "strategy": self.strategy.name,
            "federation_id": self.federation_id,
            "sites": list(self.sites),
        }
        if self.strategy.slots:
            meta["server_opt"] = self.server_opt.to_json()
        save_round(self.checkpoint, new_state, self.history, self.timings, meta, self.server_state)
        if accepted:
            self.audit.append(
                ev.AGGREGATED,
                round=rnd,
                sha256=self._sha,
                strategy=self.strategy.name,
                sites=[u.site for u in accepted],
            )
        self.audit.append(ev.ROUND_COMPLETED, round=rnd, accepted=len(accepted))
        if self._on_round_completed is not None:
            self._on_round_completed(rnd, new_state)
        del new_state
        heap.trim()
        self._round_open = False
        if rnd >= self.rounds:
            self.finished = True
            self.audit.append(ev.FEDERATION_FINISHED, rounds=self.rounds)
        elif self.stop_after_round is not None and rnd >= self.stop_after_round:
            self.halted = True
        self._open_round()
        self._cond.notify_all()

    def _refuse(self, site: str, rnd: int, reason: str, settle: bool) -> UploadResult:
        self.audit.append(ev.UPDATE_REFUSED, round=rnd, site=site, reason=reason)
        if settle:
            self._settle(SiteOutcome(site, accepted=False, reason=reason))
        return UploadResult(False, reason, "")

    # ------------------------------------------------------------------ public API

    def refuse_join(self, peer: str, reason: str, **fields: Any) -> None:
        self.audit.append(ev.JOIN_REFUSED, peer=peer, reason=reason, **fields)

    def refuse_handshake(self, reason: str) -> None:
        """A TLS handshake the server turned away (gRPC does not say from which address)."""
        self.refuse_join("unknown (refused during the TLS handshake)", reason, layer="tls")

    def watch_handshakes(self) -> None:
        """Audit refused TLS handshakes in this process until stop_watching()."""
        self._unwatch.append(watch_handshakes(self.refuse_handshake))

    def stop_watching(self) -> None:
        while self._unwatch:
            self._unwatch.pop()()

    def join(
        self, site: str, n_train: int, n_val: int, cert_fingerprint: str, software_version: str
    ) -> str:
        """Admit an allowed site (a re-join after a restart replaces its record); the config."""
        if site not in self.sites:
            reason = f"common name {site!r} is not on the allow-list {list(self.sites)}"
            self.refuse_join(site, reason)
            raise PermissionError(reason)
        if n_train <= 0 or n_val < 0:
            reason = f"site {site!r} declared n_train={n_train}, n_val={n_val}"
            self.refuse_join(site, reason)
            raise ValueError(reason)
        with self._cond:
            self.joined[site] = SiteInfo(site, n_train, n_val, cert_fingerprint, software_version)
            self.audit.append(
                ev.SITE_JOINED,
                site=site,
                cert_fingerprint=cert_fingerprint,
                n_train=n_train,
                n_val=n_val,
                software_version=software_version,
            )
            self._open_round()
            self._cond.notify_all()
        return self.config_json

    def next_task(self, site: str, timeout: float = DEFAULT_POLL_S) -> TaskInfo:
        """Long-poll: the site's task now if it has one, else WAIT after at most `timeout` s."""
        with self._cond:
            if site not in self.joined:
                raise LookupError(f"site {site!r} has not joined this aggregator; join first")
            self._cond.wait_for(lambda: self._task_for(site).kind != "WAIT", timeout=timeout)
            return self._task_for(site)

    def model_for(self, site: str, rnd: int) -> tuple[Path, str]:
        """The global model's safetensors file and SHA-256 for the round in progress."""
        with self._cond:
            if site not in self.joined:
                raise LookupError(f"site {site!r} has not joined this aggregator; join first")
            if not self._round_open or rnd != self.round:
                raise ValueError(
                    f"site {site!r} asked for the model of round {rnd}; "
                    f"round in progress: {self.round if self._round_open else 'none'}"
                )
            assert self._global_path is not None
            self._bytes_to_site[site] = self._bytes_to_site.get(site, 0) + self._size
            return self._global_path, self._sha

    def spool_file(self) -> Path:
        """A new private file for an incoming upload (removed when refused or aggregated)."""
        fd, name = tempfile.mkstemp(suffix=".safetensors", dir=self._spool)
        os.close(fd)
        return Path(name)

    def refuse_transfer(self, site: str, rnd: int, reason: str) -> UploadResult:
        """A broken upload stream: refuse it, and count it as the site's outcome if current."""
        with self._cond:
            current = self._round_open and rnd == self.round and site not in self._outcomes
            return self._refuse(site, rnd, reason, settle=current and site in self.joined)

    def submit(
        self,
        site: str,
        rnd: int,
        n_examples: int,
        metrics_json: str,
        update: bytes | Path,
        sha256: str | None = None,
    ) -> UploadResult:
        """Validate and record a site's update for round `rnd` (bytes, or a spooled file that
        becomes the aggregator's); may close the round."""
        if isinstance(update, bytes):
            path = self.spool_file()
            path.write_bytes(update)
        else:
            path = Path(update)
        nbytes = path.stat().st_size
        keep = False
        state: LazyState | None = None
        try:
            with self._cond:
                reference = self._reference()
                joined = self.joined.get(site)
            # The heavy checks run outside the lock, one tensor at a time. The reference cannot
            # change under them: the round closes only once this site has an outcome.
            size = joined.n_train if joined is not None else None
            state, metrics, problems = check_upload(
                reference, site, int(n_examples), path, metrics_json, size
            )
            reference.close()
            sha = sha256 or file_sha256(path)
            with self._cond:
                if site not in self.joined:
                    return self._refuse(site, rnd, "site has not joined", settle=False)
                if not self._round_open or rnd != self.round:
                    now = self.round if self._round_open else "none"
                    return self._refuse(
                        site, rnd, f"update for round {rnd}, round in progress: {now}", settle=False
                    )
                if site in self._outcomes:
                    return self._refuse(
                        site, rnd, f"a second update for round {rnd} (one per round)", settle=False
                    )
                if problems:
                    return self._refuse(site, rnd, "; ".join(problems), settle=True)
                assert state is not None
                self._updates[site] = SiteUpdate(site, int(n_examples), state)
                keep = True
                self.audit.append(
                    ev.UPDATE_RECEIVED,
                    round=rnd,
                    site=site,
                    sha256=sha,
                    n_k=int(n_examples),
                    bytes=nbytes,
                )
                kept, seconds = split_timings(metrics)
                if "epoch_seconds" in seconds:
                    self._epoch_s[site] = seconds["epoch_seconds"]
                self._settle(
                    SiteOutcome(
                        site,
                        accepted=True,
                        n_k=int(n_examples),
                        bytes_from_site=nbytes,
                        sha256=sha,
                        metrics=kept,
                    )
                )
                return UploadResult(True, "", sha)
        finally:
            if not keep:
                if state is not None:
                    state.close()
                path.unlink(missing_ok=True)

    def global_state(self) -> State:
        with self._cond:
            return load_file(str(self._global_path))

    def close(self) -> None:
        """Remove spooled uploads and the served model file (the checkpoint stays)."""
        self.stop_watching()
        with self._cond:
            self._discard_updates()
            if self._tmp is not None:
                self._tmp.cleanup()

    def done(self) -> bool:
        """Halted, or finished with every joined site told to stop."""
        return self.halted or (self.finished and self._told_stop >= set(self.joined))

    def wait(self, timeout: float | None = None, stop_grace_s: float = 30.0) -> bool:
        """Block until done(); once finished, wait at most `stop_grace_s` for the STOPs."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while not self.done():
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                if self.finished:
                    grace = stop_grace_s if left is None else min(left, stop_grace_s)
                    self._cond.wait_for(self.done, timeout=grace)
                    return True
                self._cond.wait(timeout=left)
            return True

    @property
    def round_open(self) -> bool:
        """Whether a round is in progress (False while sites are still joining, and at the end)."""
        with self._cond:
            return self._round_open

    def silent_sites(self) -> list[str]:
        """Sites the federation is waiting for: not joined yet, or no outcome in the open round."""
        with self._cond:
            if self.finished or self.halted:
                return []
            if not self._round_open:
                return sorted(set(self.sites) - set(self.joined))
            return sorted(set(self.sites) - set(self._outcomes))

    def describe(self) -> str:
        with self._cond:
            missing = sorted(set(self.sites) - set(self.joined))
            pending = sorted(set(self.sites) - set(self._outcomes)) if self._round_open else []
            return (
                f"round {self.round}/{self.rounds}, finished={self.finished}, "
                f"not joined: {missing}, no update yet: {pending}"
            )
