"""Aggregation strategies (FedAvg, FedProx, server optimizers); the aggregator's update checks."""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

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
        # copy=True: a float64 tensor would otherwise be a view of the shared scratch buffer.
        out[key] = (
            acc.round().to(dtype) if not dtype.is_floating_point else acc.to(dtype, copy=True)
        )
    return out


def _spec(state: Mapping[str, torch.Tensor], key: str) -> tuple[torch.dtype, tuple[int, ...]]:
    """dtype and shape of state[key], without reading it when the mapping can say."""
    spec = getattr(state, "spec", None)
    if callable(spec):
        return spec(key)
    tensor = state[key]
    return tensor.dtype, tuple(tensor.shape)


# ---------------------------------------------------------------- server optimizers
#
# Reddi et al., "Adaptive Federated Optimization" (ICLR 2021), Algorithm 2, and FedAvgM (Hsu et
# al. 2019, as written in Reddi et al.). With x the global model and avg the n_k-weighted average
# of the sites' models (weighted_average; Reddi et al. average unweighted over the sampled
# clients), the pseudo-gradient is D = avg - x and
#   FedAvgM: m = b m + D;                                  x' = x + lr m
#   FedAdam: m = b1 m + (1 - b1) D; v = b2 v + (1 - b2) D^2; x' = x + lr m / (sqrt(v) + tau)
#   FedYogi: m as FedAdam;  v = v - (1 - b2) D^2 sign(v - D^2); x' as FedAdam
# with m = 0 and v = tau^2 before the first round (Algorithm 2 asks v_-1 >= tau^2), and no bias
# correction (there is none in Algorithm 2). Only the tensors `optimized` selects are stepped;
# BatchNorm statistics and integer tensors take avg. Deterministic and independent of arrival
# order: avg comes from weighted_average (site-id order, float64), each step is computed in
# float64 key by key, and m, v are kept in each tensor's own dtype (what the checkpoint holds,
# so a resumed run steps from exactly the state an uninterrupted one has).

BN_STATISTICS = ("running_mean", "running_var")  # buffers that are averaged, never stepped
# The state each server optimizer keeps between rounds, per stepped tensor.
SLOTS: dict[str, tuple[str, ...]] = {
    "fedavgm": ("m",),
    "fedadam": ("m", "v"),
    "fedyogi": ("m", "v"),
}


def optimized(key: str, dtype: torch.dtype) -> bool:
    """Whether a server optimizer steps tensor `key`: floating-point tensors other than
    BatchNorm's running statistics. The rest (integer tensors such as num_batches_tracked,
    running_mean, running_var) take the plain weighted average: they are estimates of the data,
    not parameters that a gradient moves, and momentum on them would bias them."""
    return dtype.is_floating_point and key.rsplit(".", 1)[-1] not in BN_STATISTICS


@dataclass(frozen=True)
class ServerOpt:
    """Hyperparameters of the server optimizers (fl.server_* in params.yaml, resolved)."""

    lr: float = 1.0  # eta
    momentum: float = 0.9  # beta of FedAvgM
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # adaptivity: the larger, the less adaptive FedAdam/FedYogi are

    def __post_init__(self) -> None:
        problems = []
        if not (math.isfinite(self.lr) and self.lr > 0):
            problems.append(f"lr must be a positive number, found {self.lr}")
        for name in ("momentum", "beta1", "beta2"):
            value = getattr(self, name)
            if not 0.0 <= value < 1.0:
                problems.append(f"{name} must lie in [0, 1), found {value}")
        if not (math.isfinite(self.tau) and self.tau > 0):
            problems.append(f"tau must be a positive number, found {self.tau}")
        if problems:
            raise ValueError(f"invalid server optimizer settings: {'; '.join(problems)}")

    def to_json(self) -> dict[str, float]:
        return asdict(self)


# The server optimizer's state between rounds, keyed "<slot>/<tensor name>" (slot m or v) for
# every tensor `optimized` selects; {} before the first aggregation.
ServerState = State


class Aggregate(Protocol):
    def __call__(
        self,
        global_state: Mapping[str, torch.Tensor],
        updates: list[SiteUpdate],
        server_state: Mapping[str, torch.Tensor],
        opt: ServerOpt,
    ) -> tuple[State, ServerState]: ...


def fedavg(
    global_state: Mapping[str, torch.Tensor],
    updates: list[SiteUpdate],
    server_state: Mapping[str, torch.Tensor],
    opt: ServerOpt,
) -> tuple[State, ServerState]:
    """The weighted average of the updates; no server state, the global model is not read."""
    return weighted_average(updates), {}


def _server_step(kind: str) -> Aggregate:
    """The aggregate function of server optimizer `kind` (fedavgm, fedadam or fedyogi)."""

    def aggregate(
        global_state: Mapping[str, torch.Tensor],
        updates: list[SiteUpdate],
        server_state: Mapping[str, torch.Tensor],
        opt: ServerOpt,
    ) -> tuple[State, ServerState]:
        new = weighted_average(updates)
        slots = SLOTS[kind]
        fresh = not server_state
        missing = [
            f"{slot}/{key}"
            for key, value in new.items()
            if optimized(key, value.dtype)
            for slot in slots
            if not fresh and f"{slot}/{key}" not in server_state
        ]
        if missing:
            raise ValueError(
                f"{kind}: server state lacks {missing[:5]}{' ...' if len(missing) > 5 else ''}"
            )
        out_state: ServerState = {}
        for key in sorted(new):
            avg = new[key]
            if not optimized(key, avg.dtype):
                continue
            x = global_state[key].to(torch.float64)
            delta = avg.to(torch.float64) - x
            m = (
                torch.zeros_like(x)
                if fresh
                else server_state[f"m/{key}"].to(torch.float64, copy=True)
            )
            if kind == "fedavgm":
                m = m.mul_(opt.momentum).add_(delta)
                step = m * opt.lr
            else:
                v = (
                    torch.full_like(x, opt.tau**2)
                    if fresh
                    else server_state[f"v/{key}"].to(torch.float64, copy=True)
                )
                m = m.mul_(opt.beta1).add_(delta, alpha=1.0 - opt.beta1)
                square = delta.square()
                if kind == "fedadam":
                    v = v.mul_(opt.beta2).add_(square, alpha=1.0 - opt.beta2)
                else:  # fedyogi
                    v = v.sub_(torch.sign(v - square).mul_(square), alpha=1.0 - opt.beta2)
                step = m / (v.sqrt() + opt.tau) * opt.lr
                out_state[f"v/{key}"] = v.to(avg.dtype)
            out_state[f"m/{key}"] = m.to(avg.dtype)
            new[key] = (x + step).to(avg.dtype)
        return new, out_state

    aggregate.__name__ = kind
    aggregate.__doc__ = (
        f"{kind} after Reddi et al. (2021), as the comment above BN_STATISTICS says."
    )
    return aggregate


@dataclass(frozen=True)
class Strategy:
    """A registered strategy: how the aggregator combines a round's updates, and what it asks
    of the sites. `aggregate(global_state, updates, server_state, opt)` returns (the new global
    model, the new server state) and changes none of its arguments. FedProx aggregates like
    FedAvg; its proximal term (mu/2)||w - w_global||^2 acts in local training (fl.fedprox_mu).
    A server optimizer keeps `slots` (m, v) of state per stepped tensor across rounds (the
    aggregator holds it, the checkpoint saves it) and steps with `default_lr` when
    fl.server_lr is auto."""

    name: str
    aggregate: Aggregate
    proximal: bool
    slots: tuple[str, ...] = ()
    default_lr: float = 1.0

    def server_opt(
        self,
        lr: float | str = "auto",
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> ServerOpt:
        """This strategy's hyperparameters, fl.server_lr `auto` resolved to `default_lr`."""
        eta = self.default_lr if lr == "auto" else float(lr)
        return ServerOpt(eta, momentum, beta1, beta2, tau)


# Default server learning rates (fl.server_lr: auto): FedAvgM's eta = 1 makes beta = 0 plain
# FedAvg; FedAdam and FedYogi step every weight by about eta per round whatever the update's
# scale, and Reddi et al.'s tuned eta lie around 10^-2 to 10^-1 (their Table 8): 1e-2.
STRATEGIES: dict[str, Strategy] = {
    "fedavg": Strategy("fedavg", fedavg, proximal=False),
    "fedprox": Strategy("fedprox", fedavg, proximal=True),
    "fedavgm": Strategy("fedavgm", _server_step("fedavgm"), False, SLOTS["fedavgm"], 1.0),
    "fedadam": Strategy("fedadam", _server_step("fedadam"), False, SLOTS["fedadam"], 1e-2),
    "fedyogi": Strategy("fedyogi", _server_step("fedyogi"), False, SLOTS["fedyogi"], 1e-2),
}


def get_strategy(name: str) -> Strategy:
    if name not in STRATEGIES:
        raise ValueError(f"unknown fl.strategy {name!r}; expected one of {sorted(STRATEGIES)}")
    return STRATEGIES[name]


def check_server_state(
    strategy: Strategy, reference: Mapping[str, torch.Tensor], server_state: Mapping[str, Any]
) -> list[str]:
    """Why `server_state` cannot continue `strategy` on a model shaped like `reference`
    (empty list = it can): {} (before any aggregation), or exactly one tensor per slot and
    stepped tensor, of that tensor's shape and dtype."""
    if not server_state:
        return []
    want = {
        f"{slot}/{key}": key
        for key in reference
        if optimized(key, _spec(reference, key)[0])
        for slot in strategy.slots
    }
    problems = []
    missing = sorted(set(want) - set(server_state))
    extra = sorted(set(server_state) - set(want))
    if missing:
        problems.append(f"missing server state {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra:
        problems.append(f"unexpected server state {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for name in sorted(set(want) & set(server_state)):
        dtype, shape = _spec(reference, want[name])
        got = server_state[name]
        if tuple(got.shape) != shape or got.dtype != dtype:
            problems.append(f"{name}: {got.dtype} {tuple(got.shape)}, expected {dtype} {shape}")
        elif not bool(torch.isfinite(got).all()):
            problems.append(f"{name}: non-finite values")
    return problems


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
