"""Federated training over gRPC with mutual TLS: the aggregator server and the site workers."""

from fedcxr.federation.aggregator import (
    FederationError,
    FederationServicer,
    FederationState,
    TaskInfo,
    run_aggregator,
    serve,
)
from fedcxr.federation.site import run_site

__all__ = [
    "FederationError",
    "FederationServicer",
    "FederationState",
    "TaskInfo",
    "run_aggregator",
    "run_site",
    "serve",
]
