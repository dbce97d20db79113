"""Federation runtime: site processes against a mutual-TLS aggregator, audited and resumable."""

from __future__ import annotations

import functools
import json
import multiprocessing
import threading
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from fedcxr.checkpoint import load_checkpoint
from fedcxr.federation import FederationError, FederationState, run_aggregator, run_site, serve
from fedcxr.federation import audit as ev
from fedcxr.federation.audit import AuditLog, verify
from fedcxr.federation.pki import TlsBundle, ensure_federation, load_bundle
from fedcxr.federation.transport import state_to_bytes

SITES = ("site-a", "site-b", "site-c")
OFFSET = {"site-a": 1.0, "site-b": 2.0, "site-c": 4.0}
N_K = {"site-a": 10, "site-b": 20, "site-c": 30}
N_TRAIN = {"site-a": 10, "site-b": 20, "site-c": 40}
ROUND_CONFIG = {"local_epochs": 1}
DEADLINE_S = 60.0


def initial_state() -> dict[str, torch.Tensor]:
    return {"w": torch.zeros(10), "b": torch.arange(3, dtype=torch.float32)}


def shift_train(
    state: dict[str, torch.Tensor], rnd: int, config: dict, *, site: str, bad: str = ""
) -> tuple[dict[str, torch.Tensor], int, dict]:
    """A stand-in for local training: add the site's constant; `bad` breaks the update."""
    assert config == {"strategy": "fedavg", **ROUND_CONFIG}
    new = {k: v + OFFSET[site] for k, v in state.items()}
    n_k = N_K[site]
    if bad == "shape":
        new["w"] = torch.zeros(11)
    elif bad == "nan":
        new["w"][3] = float("nan")
    elif bad == "n_k":
        n_k = N_TRAIN[site] + 1
    return new, n_k, {"loss": 1.0 / rnd, "site": site}


def site_process_main(address: str, pki_dir: str, site: str, out: str) -> None:
    """Entry point of a spawned site process: run the site, write its records as JSON."""
    tls = load_bundle(Path(pki_dir), site)
    train_fn = functools.partial(shift_train, site=site)
    records = run_site(address, tls, N_TRAIN[site], 5, train_fn, backoff_s=0.2)
    Path(out).write_text(json.dumps(records))


def expected_round(state: dict[str, torch.Tensor], sites=SITES) -> dict[str, torch.Tensor]:
    """The hand-computed FedAvg of shift_train's updates: sum_k n_k (w + c_k) / sum_k n_k."""
    total = sum(N_K[s] for s in sites)
    shift = sum(N_K[s] * OFFSET[s] for s in sites) / total
    return {k: v.double() + shift for k, v in state.items()}


def audit_events(path: Path) -> list[dict[str, Any]]:
    assert verify(path).ok
    return [json.loads(line) for line in path.read_text().splitlines()]


def count(entries: list[dict[str, Any]], event: str) -> int:
    return sum(e["event"] == event for e in entries)


@pytest.fixture(scope="module")
def pki_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("pki")
    ensure_federation(folder, [*SITES, "site-x"])
    return folder


def make_state(tmp: Path, rounds: int = 2, **kw: Any) -> FederationState:
    return FederationState(
        initial_state(),
        sites=SITES,
        rounds=rounds,
        strategy="fedavg",
        round_config=ROUND_CONFIG,
        audit=AuditLog(tmp / "audit.jsonl"),
        checkpoint=tmp / "global.safetensors",
        **kw,
    )


def run_with_processes(state: FederationState, pki_dir: Path, tmp: Path) -> list[list[dict]]:
    """The aggregator here, one spawned process per site; the sites' records."""
    ctx = multiprocessing.get_context("spawn")
    procs: list[Any] = []
    outs = [tmp / f"{s}.records.json" for s in SITES]

    def start(port: int) -> None:
        for site, out in zip(SITES, outs, strict=True):
            out.unlink(missing_ok=True)
            args = (f"127.0.0.1:{port}", str(pki_dir), site, str(out))
            procs.append(ctx.Process(target=site_process_main, args=args, daemon=True))
            procs[-1].start()

    try:
        run_aggregator(
            state,
            load_bundle(pki_dir, "aggregator"),
            poll_s=2.0,
            on_ready=start,
            timeout_s=DEADLINE_S,
        )
        if state.halted:
            return []
        for p in procs:
            p.join(timeout=DEADLINE_S)
        assert [p.exitcode for p in procs] == [0, 0, 0]
        return [json.loads(out.read_text()) for out in outs]
    finally:
        for p in procs:
            if p.is_alive():
                p.terminate()
                p.join(timeout=10)


def run_with_threads(
    state: FederationState, pki_dir: Path, bad: dict[str, str]
) -> dict[str, list[dict]]:
    """The same federation with the sites as threads of this process (faster, same wire)."""
    results: dict[str, Any] = {}

    def site_thread(site: str, address: str) -> None:
        train_fn = functools.partial(shift_train, site=site, bad=bad.get(site, ""))
        try:
            results[site] = run_site(
                address, load_bundle(pki_dir, site), N_TRAIN[site], 5, train_fn
            )
        except Exception as exc:  # reported by the assertion below
            results[site] = exc

    threads: list[threading.Thread] = []

    def start(port: int) -> None:
        for site in SITES:
            threads.append(threading.Thread(target=site_thread, args=(site, f"127.0.0.1:{port}")))
            threads[-1].start()

    run_aggregator(
        state,
        load_bundle(pki_dir, "aggregator"),
        poll_s=2.0,
        on_ready=start,
        timeout_s=DEADLINE_S,
    )
    for t in threads:
        t.join(timeout=DEADLINE_S)
    assert all(isinstance(r, list) for r in results.values()), results
    return results


@pytest.fixture(scope="module")
def full_run(pki_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """An uninterrupted 2-round federation of three site processes."""
    tmp = tmp_path_factory.mktemp("full")
    per_round: dict[int, dict[str, torch.Tensor]] = {}
    state = make_state(tmp, on_round_completed=lambda r, s: per_round.__setitem__(r, s))
    records = run_with_processes(state, pki_dir, tmp)
    return {"tmp": tmp, "state": state, "per_round": per_round, "records": records}


def test_two_rounds_of_three_site_processes_average_by_n_k(full_run: dict[str, Any]) -> None:
    state, per_round = full_run["state"], full_run["per_round"]
    round1 = expected_round(initial_state())
    round2 = expected_round(round1)
    for rnd, want in ((1, round1), (2, round2)):
        for key, value in want.items():
            torch.testing.assert_close(per_round[rnd][key], value.float(), rtol=0, atol=1e-6)
    torch.testing.assert_close(state.global_state()["w"], round2["w"].float(), rtol=0, atol=1e-6)

    entries = audit_events(full_run["tmp"] / "audit.jsonl")
    assert count(entries, ev.SITE_JOINED) == 3
    assert count(entries, ev.UPDATE_RECEIVED) == 6
    assert count(entries, ev.AGGREGATED) == 2
    assert count(entries, ev.UPDATE_REFUSED) == 0
    assert entries[-1]["event"] == ev.FEDERATION_FINISHED
    aggregated = [e for e in entries if e["event"] == ev.AGGREGATED]
    assert all(e["sites"] == list(SITES) for e in aggregated)

    ckpt = load_checkpoint(full_run["tmp"] / "global.safetensors")
    assert ckpt.round == 2 and ckpt.meta["strategy"] == "fedavg"
    assert torch.equal(ckpt.state["w"], state.global_state()["w"])
    # Per-round records for the caller: metrics, bytes both ways, wall time.
    assert [h.round for h in state.history] == [1, 2] == [h["round"] for h in ckpt.meta["history"]]
    model_bytes = len(state_to_bytes(initial_state()))
    assert [t.round for t in state.timings] == [1, 2] and all(t.wall_s >= 0 for t in state.timings)
    for h in state.history:
        for site in SITES:
            rec = h.sites[site]
            assert rec.accepted and rec.n_k == N_K[site]
            assert rec.metrics == {"loss": 1.0 / h.round, "site": site}
            assert rec.bytes_to_site == rec.bytes_from_site == model_bytes
    # Each site saw the global model of round r-1 (verified by SHA-256) and was accepted.
    for site_records in full_run["records"]:
        assert [r["round"] for r in site_records] == [1, 2]
        assert all(r["accepted"] for r in site_records)
        assert site_records[1]["model_sha256"] == state.history[0].model_sha256


def test_foreign_ca_and_unlisted_cn_cannot_join(pki_dir: Path, tmp_path: Path) -> None:
    other = tmp_path / "other-pki"
    ensure_federation(other, ["site-a"])
    real = load_bundle(pki_dir, "site-a")
    forged = load_bundle(other, "site-a")
    # Trusts the real server, but presents a certificate of another CA under an allowed name.
    foreign = TlsBundle(real.root_certificates, forged.private_key, forged.certificate_chain)
    state = make_state(tmp_path)

    def noop(s: dict, r: int, c: dict) -> tuple[dict, int, dict]:
        raise AssertionError("never trains")

    server, port = serve(state, load_bundle(pki_dir, "aggregator"))
    try:
        address = f"127.0.0.1:{port}"
        with pytest.raises(grpc.RpcError) as foreign_err:
            run_site(address, foreign, 10, 5, noop, connect_attempts=1)
        assert foreign_err.value.code() == grpc.StatusCode.UNAVAILABLE
        with pytest.raises(grpc.RpcError) as unlisted_err:
            run_site(address, load_bundle(pki_dir, "site-x"), 10, 5, noop)
        assert unlisted_err.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "site-x" in unlisted_err.value.details()
    finally:
        server.stop(None).wait()
        state.stop_watching()
    entries = audit_events(tmp_path / "audit.jsonl")
    refused = [e for e in entries if e["event"] == ev.JOIN_REFUSED]
    tls = [e for e in refused if e.get("layer") == "tls"]
    assert tls, "the handshake with the foreign certificate is not in the audit log"
    assert all("CERTIFICATE_VERIFY_FAILED" in e["reason"] for e in tls)
    unlisted = [e for e in refused if e.get("layer") != "tls"]
    assert len(unlisted) == 1 and unlisted[0]["peer"] == "site-x"
    assert "allow-list" in unlisted[0]["reason"]
    assert count(entries, ev.SITE_JOINED) == 0


@pytest.mark.parametrize(
    ("bad", "why"),
    [("shape", "shape (11,), expected (10,)"), ("nan", "non-finite"), ("n_k", "exceeds")],
)
def test_bad_update_is_refused_and_round_goes_on(
    pki_dir: Path, tmp_path: Path, bad: str, why: str
) -> None:
    state = make_state(tmp_path, rounds=1)
    results = run_with_threads(state, pki_dir, {"site-c": bad})
    entries = audit_events(tmp_path / "audit.jsonl")
    refused = [e for e in entries if e["event"] == ev.UPDATE_REFUSED]
    assert len(refused) == 1
    assert refused[0]["site"] == "site-c" and refused[0]["round"] == 1
    assert why in refused[0]["reason"]
    aggregated = [e for e in entries if e["event"] == ev.AGGREGATED]
    assert len(aggregated) == 1 and aggregated[0]["sites"] == ["site-a", "site-b"]
    assert entries[-1]["event"] == ev.FEDERATION_FINISHED
    want = expected_round(initial_state(), sites=("site-a", "site-b"))
    torch.testing.assert_close(state.global_state()["w"], want["w"].float(), rtol=0, atol=1e-6)
    assert results["site-c"][0]["accepted"] is False
    assert why in results["site-c"][0]["reason"]
    assert state.history[0].sites["site-c"].accepted is False


def test_killed_after_round_one_resumes_and_matches_uninterrupted_run(
    pki_dir: Path, tmp_path: Path, full_run: dict[str, Any]
) -> None:
    first = make_state(tmp_path, stop_after_round=1)
    run_with_processes(first, pki_dir, tmp_path)
    assert first.halted and not first.finished
    assert load_checkpoint(tmp_path / "global.safetensors").round == 1

    with pytest.raises(FederationError, match="resume=True"):
        make_state(tmp_path)
    second = make_state(tmp_path, resume=True)
    assert second.round == 2
    run_with_processes(second, pki_dir, tmp_path)
    assert second.finished
    assert [h.round for h in second.history] == [1, 2]
    final, reference = second.global_state(), full_run["state"].global_state()
    assert all(torch.equal(final[k], reference[k]) for k in reference)

    entries = audit_events(tmp_path / "audit.jsonl")
    assert count(entries, "federation_resumed") == 1
    assert count(entries, ev.AGGREGATED) == 2
    assert [e["round"] for e in entries if e["event"] == ev.ROUND_COMPLETED] == [1, 2]
    assert entries[-1]["event"] == ev.FEDERATION_FINISHED


def test_core_waits_for_all_sites_and_refuses_stale_updates(tmp_path: Path) -> None:
    state = make_state(tmp_path, rounds=1)
    with pytest.raises(PermissionError, match="allow-list"):
        state.join("site-z", 10, 1, "", "t")
    assert state.silent_sites() == list(SITES) and not state.round_open
    for site in SITES[:2]:
        state.join(site, N_TRAIN[site], 1, "", "t")
    assert state.next_task("site-a", timeout=0).kind == "WAIT"
    assert state.silent_sites() == ["site-c"] and not state.round_open  # not joined yet
    state.join("site-c", N_TRAIN["site-c"], 1, "", "t")
    task = state.next_task("site-a", timeout=0)
    assert (task.kind, task.round) == ("TRAIN", 1)
    assert state.round_open and state.silent_sites() == list(SITES)  # no update yet
    payload = state_to_bytes({k: v + 1 for k, v in initial_state().items()})
    assert not state.submit("site-a", 2, 5, "{}", payload).accepted  # wrong round
    assert not state.submit("site-a", 1, 5, '{"loss": NaN}', payload).accepted
    assert state.next_task("site-a", timeout=0).kind == "WAIT"  # refused counts for the round
    assert state.submit("site-b", 1, 5, "{}", payload).accepted
    assert not state.submit("site-b", 1, 5, "{}", payload).accepted  # one per round
    assert state.silent_sites() == ["site-c"]  # what a round timeout names
    assert state.submit("site-c", 1, 5, "{}", b"not safetensors").reason.startswith("not a valid")
    assert state.finished and state.next_task("site-a", timeout=0).kind == "STOP"
    assert state.silent_sites() == [] and not state.round_open
    assert torch.equal(state.global_state()["w"], torch.ones(10))
