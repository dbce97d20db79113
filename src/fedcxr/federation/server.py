"""The aggregator's gRPC server: the mutual-TLS Federation servicer around a FederationState."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from concurrent import futures

import grpc

from fedcxr.federation import heap
from fedcxr.federation.pki import TlsBundle, fingerprint
from fedcxr.federation.proto import fedcxr_pb2 as pb
from fedcxr.federation.proto import fedcxr_pb2_grpc as pb_grpc
from fedcxr.federation.protocol import (
    DEFAULT_POLL_S,
    KEEPALIVE_OPTIONS,
    FederationError,
    server_credentials,
)
from fedcxr.federation.records import RoundRecord
from fedcxr.federation.state import FederationState
from fedcxr.federation.transport import TransferError, file_chunks, receive_to_file


def _peer_cn(context: grpc.ServicerContext) -> str:
    names = context.auth_context().get("x509_common_name") or []
    return names[0].decode() if names else ""


class FederationServicer(pb_grpc.FederationServicer):
    """The Federation service: identity from the client certificate, work from the core."""

    def __init__(self, state: FederationState, poll_s: float = DEFAULT_POLL_S) -> None:
        self.state = state
        self.poll_s = poll_s

    def _site(self, context: grpc.ServicerContext) -> str:
        cn = _peer_cn(context)
        if not cn:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate common name")
        if cn not in self.state.sites:
            context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"site {cn!r} is not on the allow-list"
            )
        return cn

    def Join(self, request: pb.JoinRequest, context: grpc.ServicerContext) -> pb.JoinReply:
        cn = _peer_cn(context)
        if not cn:
            self.state.refuse_join(context.peer(), "no client certificate common name")
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no client certificate common name")
        pems = context.auth_context().get("x509_pem_cert") or []
        fp = fingerprint(pems[0]) if pems else ""
        try:
            config = self.state.join(
                cn, request.n_train, request.n_val, fp, request.software_version
            )
        except PermissionError as exc:
            context.abort(grpc.StatusCode.PERMISSION_DENIED, str(exc))
        except ValueError as exc:
            context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
        return pb.JoinReply(site=cn, federation_id=self.state.federation_id, config_json=config)

    def NextTask(self, request: pb.TaskRequest, context: grpc.ServicerContext) -> pb.Task:
        site = self._site(context)
        left = context.time_remaining()
        timeout = self.poll_s if left is None else max(0.0, min(self.poll_s, left - 1.0))
        try:
            task = self.state.next_task(site, timeout=timeout)
        except LookupError as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        return pb.Task(
            kind=pb.Task.Kind.Value(task.kind),
            round=task.round,
            model_sha256=task.model_sha256,
            config_json=task.config_json,
            message=task.message,
        )

    def DownloadModel(
        self, request: pb.ModelRequest, context: grpc.ServicerContext
    ) -> Iterator[pb.Chunk]:
        site = self._site(context)
        try:
            path, sha = self.state.model_for(site, request.round)
        except (LookupError, ValueError) as exc:
            context.abort(grpc.StatusCode.FAILED_PRECONDITION, str(exc))
        yield from file_chunks(path, sha)

    def UploadUpdate(
        self, request_iterator: Iterator[pb.Chunk], context: grpc.ServicerContext
    ) -> pb.UploadReply:
        site = self._site(context)
        header: pb.UpdateHeader | None = None

        def seen(h: pb.UpdateHeader) -> None:
            nonlocal header
            header = h

        path = self.state.spool_file()
        try:
            header, _, sha = receive_to_file(
                request_iterator,
                path,
                max_bytes=self.state.max_update_bytes,
                what=f"update from {site!r}",
                on_header=seen,
            )
        except TransferError as exc:
            rnd = header.round if header is not None else 0
            result = self.state.refuse_transfer(site, rnd, str(exc))
            return pb.UploadReply(accepted=False, reason=result.reason)
        if header is None:
            path.unlink(missing_ok=True)
            result = self.state.refuse_transfer(site, 0, "upload without an UpdateHeader")
            return pb.UploadReply(accepted=False, reason=result.reason)
        heap.trim()
        result = self.state.submit(
            site, header.round, header.n_examples, header.metrics_json, path, sha256=sha
        )
        return pb.UploadReply(accepted=result.accepted, reason=result.reason, sha256=result.sha256)


def serve(
    state: FederationState,
    tls: TlsBundle,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    poll_s: float = DEFAULT_POLL_S,
) -> tuple[grpc.Server, int]:
    """Start the mutual-TLS server (port 0 picks a free one); return (server, bound port)."""
    heap.limit_arenas()
    workers = 8 + 2 * len(state.sites)  # each long-poll holds a thread for up to poll_s
    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=workers, thread_name_prefix="fedcxr-agg"),
        options=KEEPALIVE_OPTIONS,
    )
    pb_grpc.add_FederationServicer_to_server(FederationServicer(state, poll_s), server)
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    try:
        bound = server.add_secure_port(address, server_credentials(tls))
    except RuntimeError as exc:
        raise FederationError(f"cannot listen on {address}: {exc}") from None
    if bound == 0:
        raise FederationError(f"cannot listen on {address} (in use?)")
    server.start()
    state.watch_handshakes()
    return server, bound


def run_aggregator(
    state: FederationState,
    tls: TlsBundle,
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    poll_s: float = DEFAULT_POLL_S,
    timeout_s: float | None = None,
    on_ready: Callable[[int], None] | None = None,
    grace_s: float = 5.0,
) -> list[RoundRecord]:
    """Serve until the federation finished (or halted), stop gracefully, return the history."""
    server, bound = serve(state, tls, host, port, poll_s=poll_s)
    try:
        if on_ready is not None:
            on_ready(bound)
        if not state.wait(timeout=timeout_s):
            raise FederationError(
                f"federation on port {bound} did not finish within {timeout_s} s: "
                f"{state.describe()}"
            )
    finally:
        # A halted federation is stopped like a kill: no grace for calls in flight.
        server.stop(None if state.halted else grace_s).wait()
        state.stop_watching()
    return state.history
