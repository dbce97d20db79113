"""What the aggregator and the sites share: types, the round config, gRPC options, credentials."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import grpc

if TYPE_CHECKING:
    from fedcxr.config import Params
    from fedcxr.federation.pki import TlsBundle


# Both ends ping every 30 s on idle connections (long local rounds, NAT/firewall idle timeouts);
# the server accepts pings as often as every 10 s, so the clients' pings never count as strikes.
KEEPALIVE_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 30_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
]
DEFAULT_POLL_S = 5.0


class FederationError(RuntimeError):
    """A federation that cannot start or go on (bad checkpoint, unknown site, ...)."""


@dataclass(frozen=True)
class TaskInfo:
    """What NextTask answers, without gRPC: kind is "WAIT", "TRAIN" or "STOP"."""

    kind: str
    round: int = 0
    model_sha256: str = ""
    config_json: str = ""
    message: str = ""


@dataclass(frozen=True)
class SiteInfo:
    name: str
    n_train: int
    n_val: int
    cert_fingerprint: str
    software_version: str


@dataclass(frozen=True)
class UploadResult:
    accepted: bool
    reason: str
    sha256: str


def round_config(params: Params) -> dict[str, Any]:
    """What the aggregator announces each round; sites check it against their own params."""
    return {
        "rounds": params.fl.rounds,
        "local_epochs": params.fl.local_epochs,
        "fedprox_mu": params.fl.fedprox_mu,
    }


def strict_json_obj(text: str, what: str) -> dict[str, Any]:
    """Parse a JSON object, rejecting NaN/Infinity (the audit log and DVCLive need plain JSON)."""
    if not text:
        return {}

    def reject(name: str) -> Any:
        raise ValueError(f"{name} is not valid JSON")

    try:
        value = json.loads(text, parse_constant=reject)
    except ValueError as exc:
        raise ValueError(f"{what}: not strict JSON ({exc})") from None
    if not isinstance(value, dict):
        raise ValueError(f"{what}: expected a JSON object, found {type(value).__name__}")
    return value


def server_credentials(tls: TlsBundle) -> grpc.ServerCredentials:
    return grpc.ssl_server_credentials(
        [(tls.private_key, tls.certificate_chain)],
        root_certificates=tls.root_certificates,
        require_client_auth=True,
    )


def channel_credentials(tls: TlsBundle) -> grpc.ChannelCredentials:
    """A site's side of mutual TLS: trust the federation CA, present the site certificate."""
    return grpc.ssl_channel_credentials(
        root_certificates=tls.root_certificates,
        private_key=tls.private_key,
        certificate_chain=tls.certificate_chain,
    )
