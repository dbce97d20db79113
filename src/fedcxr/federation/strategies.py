"""Aggregation strategies (FedAvg, FedProx); the aggregator's checks on updates and checkpoints."""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fedcxr.federation.protocol import strict_json_obj
from fedcxr.tensorfile import LazyState, State, TensorFileError

_CHECK_LOCK = threading.Lock()


@dataclass(frozen=True)
class SiteUpdate:
    """One site's contribution to a round: its weights after local training and n_k."""

    site: str
    n_examples: int
    state: State


def weighted_average(updates: list[SiteUpdate]) -> State:
    """w = sum_k n_k w_k / sum_k n_k (McMahan et al.; the paper's FedAvg), key by key.

    Sites are summed in site-id order, in float64, so the result does not depend on the order
    updates arrived in. Integer tensors (e.g. BatchNorm's num_batches_tracked) are rounded.
    """
    if not updates:
        raise ValueError("cannot aggregate zero updates")
    ordered = sorted(updates, key=lambda u: u.site)
    total = sum(u.n_examples for u in ordered)
    if total <= 0:
        raise ValueError(f"total n_k must be positive, found {total}")
    first = ordered[0].state
    specs = {key: _spec(first, key) for key in first}
    largest = max((math.prod(shape) for _, shape in specs.values()), default=0)
    # One float64 accumulator for every key, so aggregation allocates nothing but the result.
    scratch = torch.empty(largest, dtype=torch.float64)
    out: State = {}
    for key, (dtype, shape) in specs.items():
        acc = scratch[: math.prod(shape)].view(shape).zero_()
        for update in ordered:
            acc.add_(update.state[key], alpha=update.n_examples / total)
        out[key] = acc.round().to(dtype) if not dtype.is_floating_point else acc.to(dtype)
    return out


def _spec(state: Mapping[str, torch.Tensor], key: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """dtype and shape of state[key], without reading it when the mapping can say."""
    spec = getattr(state, "spec", None)
    if callable(spec):
        return spec(key)
    tensor = state[key]
    return tensor.dtype, tuple(tensor.shape)


# FedProx aggregates like FedAvg; its proximal term (mu/2)||w - w_global||^2 acts in local
# training (fl.fedprox_mu), so the registry records what each strategy asks of the sites.
@dataclass(frozen=True)
class Strategy:
    name: str
    aggregate: Callable[[list[SiteUpdate]], State]
    proximal: bool


STRATEGIES: dict[str, Strategy] = {
    "fedavg": Strategy("fedavg", weighted_average, proximal=False),
    "fedprox": Strategy("fedprox", weighted_average, proximal=True),
}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown fl.strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    return STRATEGIES[name]


def check_update(
    reference: Mapping[str, torch.Tensor], update: SiteUpdate, site_size: int | None
) -> list[str]:
    """Why an update must be refused (empty list = acceptable).

    Same keys, shapes and dtypes as the global model; every value finite; 0 < n_k <= the
    number of training examples the site declared when it joined.
    """
    problems = []
    missing = sorted(set(reference) - set(update.state))
    extra = sorted(set(update.state) - set(reference))
    if missing:
        problems.append(f"missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for key in sorted(set(reference) & set(update.state)):
        ref, got = reference[key], update.state[key]
        if tuple(got.shape) != tuple(ref.shape):
            problems.append(f"{key}: shape {tuple(got.shape)}, expected {tuple(ref.shape)}")
        elif got.dtype != ref.dtype:
            problems.append(f"{key}: dtype {got.dtype}, expected {ref.dtype}")
        elif got.is_floating_point() and not bool(torch.isfinite(got).all()):
            problems.append(f"{key}: non-finite values")
    if update.n_examples <= 0:
        problems.append(f"n_k must be positive, found {update.n_examples}")
    elif site_size is not None and update.n_examples > site_size:
        problems.append(f"n_k {update.n_examples} exceeds the site's {site_size} examples")
    return problems


def check_upload(
    reference: Mapping[str, torch.Tensor],
    site: str,
    n_examples: int,
    path: Path,
    metrics_json: str,
    site_size: int | None,
) -> tuple[LazyState | None, dict[str, Any], list[str]]:
    """Open a spooled upload and check it against the reference, one tensor at a time.

    Returns (the update's LazyState, or None if the file is unreadable; its metrics; why it
    must be refused, empty if acceptable). The caller owns (and closes) the LazyState.
    """
    problems: list[str] = []
    state: LazyState | None = None
    try:
        state = LazyState(path)
    except TensorFileError as exc:
        problems.append(str(exc))
    try:
        try:
            metrics = strict_json_obj(metrics_json, "metrics_json")
        except ValueError as exc:
            metrics = {}
            problems.append(str(exc))
        if state is not None:
            with _CHECK_LOCK:
                problems += check_update(reference, SiteUpdate(site, n_examples, state), site_size)
    except BaseException:
        if state is not None:
            state.close()
        raise
    return state, metrics, problems
