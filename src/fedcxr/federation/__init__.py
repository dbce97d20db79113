"""Federated training over gRPC with mutual TLS: the aggregator server and the site workers."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from fedcxr.federation.protocol import FederationError, TaskInfo
    from fedcxr.federation.server import FederationServicer, run_aggregator, serve
    from fedcxr.federation.site import run_site
    from fedcxr.federation.state import FederationState

# Resolved on first use, so that importing one light module of the package (records, pki,
# audit) does not load gRPC, torch and the state machine.
_EXPORTS = {
    "FederationError": "fedcxr.federation.protocol",
    "FederationServicer": "fedcxr.federation.server",
    "FederationState": "fedcxr.federation.state",
    "TaskInfo": "fedcxr.federation.protocol",
    "run_aggregator": "fedcxr.federation.server",
    "run_site": "fedcxr.federation.site",
    "serve": "fedcxr.federation.server",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "FederationError",
    "FederationServicer",
    "FederationState",
    "TaskInfo",
    "run_aggregator",
    "run_site",
    "serve",
]
