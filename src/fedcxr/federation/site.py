"""The site worker: dials out to the aggregator over mutual TLS and trains when told to."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from typing import Any, TypeVar

import grpc

from fedcxr import __version__
from fedcxr.federation.pki import TlsBundle
from fedcxr.federation.proto import fedcxr_pb2 as pb
from fedcxr.federation.proto import fedcxr_pb2_grpc as pb_grpc
from fedcxr.federation.protocol import KEEPALIVE_OPTIONS, channel_credentials
from fedcxr.federation.transport import (
    TransferError,
    bytes_to_state,
    from_chunks,
    sha256_hex,
    state_to_bytes,
    to_chunks,
)
from fedcxr.tensorfile import State

TrainFn = Callable[[State, int, dict[str, Any]], tuple[State, int, dict[str, Any]]]
T = TypeVar("T")

log = logging.getLogger(__name__)

JOIN_DEADLINE_S = 30.0
POLL_DEADLINE_S = 60.0
TRANSFER_DEADLINE_S = 600.0
# Worth retrying: the aggregator is not up yet, restarting, or a connection dropped.
RETRYABLE = (grpc.StatusCode.UNAVAILABLE,)


def _retry(call: Callable[[], T], attempts: int, backoff_s: float, what: str) -> T:
    """Run `call`, retrying UNAVAILABLE with exponential backoff; re-raise the last error."""
    for attempt in range(1, attempts + 1):
        try:
            return call()
        except grpc.RpcError as exc:
            if exc.code() not in RETRYABLE or attempt == attempts:
                raise
            delay = backoff_s * 2 ** (attempt - 1)
            log.warning(
                "%s: %s (attempt %d/%d), retrying in %.1f s",
                what,
                exc.code().name,
                attempt,
                attempts,
                delay,
            )
            time.sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def _metrics_json(metrics: dict[str, Any], rnd: int) -> str:
    try:
        return json.dumps(metrics, sort_keys=True, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"train_fn metrics of round {rnd} are not strict JSON: {exc}") from None


def run_site(
    address: str,
    tls: TlsBundle,
    n_train: int,
    n_val: int,
    train_fn: TrainFn,
    *,
    connect_attempts: int = 5,
    backoff_s: float = 0.5,
    poll_deadline_s: float = POLL_DEADLINE_S,
    transfer_deadline_s: float = TRANSFER_DEADLINE_S,
) -> list[dict[str, Any]]:
    """Join the federation at `address`, train every round it is told to; per-round records.

    `train_fn(global_state, round, round_config) -> (new_state, n_k, metrics)`. Connection
    failures (UNAVAILABLE) are retried `connect_attempts` times with backoff, re-joining after
    a dropped connection; any other error, or a model whose SHA-256 differs from the task's,
    raises. Returns on STOP.
    """
    creds = channel_credentials(tls)
    records: list[dict[str, Any]] = []
    with grpc.secure_channel(address, creds, options=KEEPALIVE_OPTIONS) as channel:
        stub = pb_grpc.FederationStub(channel)
        request = pb.JoinRequest(n_train=n_train, n_val=n_val, software_version=__version__)

        def join() -> pb.JoinReply:
            return _retry(
                lambda: stub.Join(request, timeout=JOIN_DEADLINE_S),
                connect_attempts,
                backoff_s,
                f"join {address}",
            )

        reply = join()
        site = reply.site
        log.info("joined federation %s at %s as %s", reply.federation_id, address, site)
        last_round = 0
        failures = 0
        while True:
            try:
                task = stub.NextTask(
                    pb.TaskRequest(last_completed_round=last_round), timeout=poll_deadline_s
                )
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED:
                    continue
                if exc.code() not in RETRYABLE or failures + 1 >= connect_attempts:
                    raise
                failures += 1
                time.sleep(backoff_s * 2 ** (failures - 1))
                join()  # the aggregator may have restarted and forgotten us
                continue
            failures = 0
            if task.kind == pb.Task.STOP:
                log.info("%s: federation finished (%s)", site, task.message)
                return records
            if task.kind != pb.Task.TRAIN:
                continue
            records.append(_train_round(stub, site, task, train_fn, transfer_deadline_s))
            last_round = task.round


def _train_round(
    stub: pb_grpc.FederationStub,
    site: str,
    task: pb.Task,
    train_fn: TrainFn,
    transfer_deadline_s: float,
) -> dict[str, Any]:
    rnd = task.round
    started = time.monotonic()
    _, data = from_chunks(
        stub.DownloadModel(pb.ModelRequest(round=rnd), timeout=transfer_deadline_s),
        what=f"{site}: global model of round {rnd}",
    )
    sha = sha256_hex(data)
    if sha != task.model_sha256:
        raise TransferError(
            f"{site}: global model of round {rnd} has SHA-256 {sha}, the task announced "
            f"{task.model_sha256}"
        )
    global_state = bytes_to_state(data)
    round_config = json.loads(task.config_json) if task.config_json else {}
    t_train = time.monotonic()
    new_state, n_k, metrics = train_fn(global_state, rnd, round_config)
    train_s = time.monotonic() - t_train
    payload = state_to_bytes(new_state)
    header = pb.UpdateHeader(round=rnd, n_examples=n_k, metrics_json=_metrics_json(metrics, rnd))
    reply = stub.UploadUpdate(to_chunks(payload, header), timeout=transfer_deadline_s)
    if not reply.accepted:
        log.warning("%s: update for round %d refused: %s", site, rnd, reply.reason)
    return {
        "round": rnd,
        "model_sha256": sha,
        "accepted": reply.accepted,
        "reason": reply.reason,
        "n_k": n_k,
        "metrics": metrics,
        "bytes_to_site": len(data),  # the global model this site downloaded
        "bytes_from_site": len(payload),  # its update
        "train_s": round(train_s, 6),
        "round_s": round(time.monotonic() - started, 6),
    }
