"""Federated training end to end: the aggregator's run, its site processes, resume and PKI."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

from fedcxr.checkpoint import load_checkpoint
from fedcxr.config import Params
from fedcxr.federation import audit as ev
from fedcxr.federation.audit import AuditLog
from fedcxr.federation.pki import CA_CERT, ensure_federation, load_bundle
from fedcxr.federation.protocol import FederationError, round_config
from fedcxr.federation.records import RunResult
from fedcxr.federation.resume import resuming
from fedcxr.federation.server import run_aggregator, serve
from fedcxr.federation.state import FederationState
from fedcxr.federation.strategies import ServerOpt, get_strategy
from fedcxr.federation.summary import AUDIT, summarize
from fedcxr.models import build_model, num_classes_for
from fedcxr.sitedata import find_sites
from fedcxr.stageio import unshare, write_text_atomic
from fedcxr.tensorfile import State
from fedcxr.train.loop import plain_state_dict, seed_everything

CHECKPOINT = "checkpoint.safetensors"
PARAMS = "params.yaml"  # the resolved params the site processes read
SERVER_CN = "aggregator"
# Keys that may change between a run and its resume (more rounds, another port, speed knobs).
RESUMABLE_CHANGES = frozenset(
    {"fl.rounds", "fl.host", "fl.port", "fl.round_timeout_s", "train.num_workers"}
)
_WILDCARD_HOSTS = ("", "0.0.0.0", "::")
# Site processes get at least this long to start (import torch, open their data) and join:
# start-up time says nothing about a round, so it is not held to fl.round_timeout_s.
JOIN_TIMEOUT_S = 600.0


# ---------------------------------------------------------------------- aggregator side


def server_opt(params: Params) -> ServerOpt:
    """The server optimizer settings of fl.strategy from fl.server_* (server_lr auto resolved)."""
    fl = params.fl
    return get_strategy(fl.strategy).server_opt(
        fl.server_lr, fl.server_momentum, fl.server_beta1, fl.server_beta2, fl.server_tau
    )


def _flat(data: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict) and key != "enrich":
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def changed_training_keys(params: Params, out_dir: Path) -> list[str]:
    """Params keys (other than RESUMABLE_CHANGES) that differ from the run saved in out_dir."""
    path = out_dir / PARAMS
    if not path.is_file():
        return []
    a = _flat(yaml.safe_load(path.read_text()) or {})
    b = _flat(params.model_dump(mode="json"))
    changed = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
    return [k for k in changed if k not in RESUMABLE_CHANGES]


def why_not_resumable(params: Params, out_dir: Path) -> str | None:
    """Why the run in `out_dir` cannot be continued under `params` (it must be set aside for a
    new one); None when there is no run there, or one that can resume."""
    if not out_dir.exists() or not any(out_dir.iterdir()):
        return None
    if not (out_dir / PARAMS).is_file():
        return f"{out_dir} holds no federation run ({PARAMS} missing)"
    changed = changed_training_keys(params, out_dir)
    if changed:
        return f"params changed ({', '.join(changed)})"
    checkpoint = out_dir / CHECKPOINT
    if checkpoint.exists() and load_checkpoint(checkpoint).round >= params.fl.rounds:
        return "previous run finished"
    return None


def _write_params(params: Params, out_dir: Path, resuming: bool) -> Path:
    """Save the resolved params beside the outputs; refuse a resume under changed training keys."""
    path = out_dir / PARAMS
    new = params.model_dump(mode="json")
    if resuming and path.is_file():
        changed = changed_training_keys(params, out_dir)
        if changed:
            raise FederationError(
                f"{out_dir / CHECKPOINT} was trained with other params ({', '.join(changed)} "
                f"changed since {path}); to start a new federation, move {out_dir} aside (the "
                "training stage moves it to runs-archive/ itself)"
            )
    write_text_atomic(path, yaml.safe_dump(new, sort_keys=True))
    return path


def prepare_federation(
    params: Params,
    sites: list[str],
    out_dir: Path,
    pki_dir: Path,
    *,
    resume: bool,
    hosts: tuple[str, ...] = (),
    on_round: Callable[[int, State], None] | None = None,
) -> tuple[FederationState, Path]:
    """PKI, resolved params, initial model, audit log and FederationState; (state, params file).

    `on_round(round, new global state)` runs as each round closes (after its checkpoint).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    checkpoint = out_dir / CHECKPOINT
    continuing = resuming(checkpoint, resume)
    ensure_federation(pki_dir, sites, SERVER_CN, hosts=hosts)
    params_file = _write_params(params, out_dir, continuing)
    for stale in out_dir.rglob(".*.tmp"):  # atomic writes cut short by a kill (stageio)
        stale.unlink()
    if not continuing:  # a new federation: site accountants start from zero
        shutil.rmtree(out_dir / "sites", ignore_errors=True)
    seed_everything(params.seed)
    model = build_model(
        params.model.arch,
        num_classes_for(params.task),
        params.model.pretrained,
        dp_safe=params.dp.enabled,
    )
    audit = AuditLog(out_dir / AUDIT)
    holder: dict[str, FederationState] = {}

    def round_closed(rnd: int, state: State) -> None:
        for site, outcome in holder["state"].history[-1].sites.items():
            if outcome.epsilon is not None:
                audit.append(
                    ev.DP_ACCOUNTING,
                    round=rnd,
                    site=site,
                    **{k: outcome.metrics[k] for k in ev.EVENT_FIELDS[ev.DP_ACCOUNTING][2:]},
                )
        if on_round is not None:
            on_round(rnd, state)

    state = FederationState(
        plain_state_dict(model),
        sites=sites,
        rounds=params.fl.rounds,
        strategy=params.fl.strategy,
        round_config=round_config(params),
        audit=audit,
        checkpoint=checkpoint,
        resume=resume,
        on_round_completed=round_closed,
        server_opt=server_opt(params),
    )
    holder["state"] = state
    return state, params_file


def _tail(path: Path, chars: int = 2000) -> str:
    try:
        return path.read_text(errors="replace")[-chars:]
    except OSError:
        return "(no log)"


def _dial_host(host: str) -> str:
    host = "127.0.0.1" if host in _WILDCARD_HOSTS else host
    return f"[{host}]" if ":" in host else host


def _server_hosts(host: str) -> tuple[str, ...]:
    return () if host in _WILDCARD_HOSTS else (host,)


def run_federation(
    params: Params,
    sites_dir: Path,
    out_dir: Path,
    pki_dir: Path,
    *,
    resume: bool,
    poll_s: float = 2.0,
    grace_s: float = 5.0,
    join_timeout_s: float | None = None,
    on_round: Callable[[int, State], None] | None = None,
) -> RunResult:
    """Aggregator in this process, one `fedcxr site run` process per site folder; the result.

    Each site process is handed only its own folder, certificate and key. Site logs go to
    out_dir/logs/<site>.log (appended across resumes). A site that exits early, a round that
    runs past fl.round_timeout_s from its start, or sites that have not joined within
    `join_timeout_s` (default: max(fl.round_timeout_s, JOIN_TIMEOUT_S)) stop the federation
    (all site processes killed) with a FederationError naming the round and the silent sites.
    `on_round(round, new global state)` runs in this process as each round closes.
    """
    if join_timeout_s is None:
        join_timeout_s = max(float(params.fl.round_timeout_s), JOIN_TIMEOUT_S)
    started = time.monotonic()
    sites = find_sites(sites_dir)
    state, params_file = prepare_federation(
        params,
        sites,
        out_dir,
        pki_dir,
        resume=resume,
        hosts=_server_hosts(params.fl.host),
        on_round=on_round,
    )
    if state.finished:
        return summarize(state, out_dir, time.monotonic() - started)
    server, port = serve(
        state, load_bundle(pki_dir, SERVER_CN), params.fl.host, params.fl.port, poll_s=poll_s
    )
    address = f"{_dial_host(params.fl.host)}:{port}"
    (out_dir / "logs").mkdir(exist_ok=True)
    procs: dict[str, subprocess.Popen[bytes]] = {}
    logs: dict[str, Path] = {}
    try:
        for site in sites:
            logs[site] = out_dir / "logs" / f"{site}.log"
            cmd = [
                sys.executable, "-m", "fedcxr.cli", "site", "run",
                "--aggregator", address,
                "--ca", str(pki_dir / CA_CERT),
                "--cert", str(pki_dir / f"{site}.pem"),
                "--key", str(pki_dir / f"{site}.key"),
                "--data", str(sites_dir / site),
                "--params", str(params_file),
                "--n-sites", str(len(sites)),
                "--state", str(out_dir / "sites" / site),
            ]  # fmt: skip
            unshare(logs[site])  # appended across resumes; never written through a link
            with logs[site].open("ab") as fh:
                fh.write(f"--- site process started for round {state.round}\n".encode())
                fh.flush()
                procs[site] = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        seen, since = (state.round, state.round_open), time.monotonic()
        while not state.wait(timeout=0.5):
            for site, proc in procs.items():
                if proc.poll() is not None:
                    raise FederationError(
                        f"site process {site} exited with code {proc.returncode} in round "
                        f"{state.round} ({state.describe()}); end of {logs[site]}:\n"
                        f"{_tail(logs[site])}"
                    )
            phase = (state.round, state.round_open)  # a new round, or the sites all joined
            if phase != seen:
                seen, since = phase, time.monotonic()
                continue
            waited = time.monotonic() - since
            silent = ", ".join(state.silent_sites()) or "none"
            if state.round_open and waited > params.fl.round_timeout_s:
                raise FederationError(
                    f"round {state.round} ran past fl.round_timeout_s="
                    f"{params.fl.round_timeout_s} s without an update from {silent} "
                    f"({state.describe()}); site logs in {out_dir / 'logs'}"
                )
            if not state.round_open and waited > join_timeout_s:
                raise FederationError(
                    f"round {state.round} could not start: {silent} did not join within "
                    f"{join_timeout_s:g} s ({state.describe()}); site logs in {out_dir / 'logs'}"
                )
        for site, proc in procs.items():
            try:
                code = proc.wait(timeout=60 + 2 * poll_s)
            except subprocess.TimeoutExpired:
                raise FederationError(
                    f"site process {site} did not exit after the federation finished"
                ) from None
            if code != 0:
                raise FederationError(
                    f"site process {site} exited with code {code} after the last round; end of "
                    f"{logs[site]}:\n{_tail(logs[site])}"
                )
    finally:
        for proc in procs.values():
            if proc.poll() is None:
                proc.kill()
                proc.wait(timeout=10)
        server.stop(grace_s).wait()
        state.stop_watching()
    return summarize(state, out_dir, time.monotonic() - started)


def serve_aggregator(
    params: Params,
    sites: list[str],
    out_dir: Path,
    pki_dir: Path,
    *,
    resume: bool,
    host: str | None = None,
    port: int | None = None,
    on_ready: Any = None,
) -> RunResult:
    """The aggregator alone (sites run elsewhere): serve until finished; the result."""
    started = time.monotonic()
    host = params.fl.host if host is None else host
    port = params.fl.port if port is None else port
    state, _ = prepare_federation(
        params, sites, out_dir, pki_dir, resume=resume, hosts=_server_hosts(host)
    )
    if not state.finished:
        run_aggregator(
            state,
            load_bundle(pki_dir, SERVER_CN),
            host,
            port,
            timeout_s=float(params.fl.round_timeout_s) * params.fl.rounds,
            on_ready=on_ready,
        )
    return summarize(state, out_dir, time.monotonic() - started)
