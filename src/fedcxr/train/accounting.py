"""DP-SGD privacy accounting: Opacus accountants by name, epsilon of a history, noise calibration.

A history is Opacus' list of (noise_multiplier, sample_rate, steps) entries of the Poisson
subsampled Gaussian mechanism. Every Opacus accountant records it the same way (RDPAccountant
and PRVAccountant share `step`), so one saved history serves either kind: the kind only decides
how epsilon is computed from it.

- ``rdp``: Renyi DP composed and converted to (epsilon, delta); fast, a loose upper bound
  (equal to Google's dp-accounting RDP to four decimals).
- ``prv``: numerical composition of privacy loss random variables (Gopi et al. 2021); the upper
  bound of its estimate, within ``eps_error`` of Google's PLD accountant. At N = 20,000, B = 32,
  5 epochs, sigma = 1, delta = 1e-5: rdp 0.824, prv 0.438, dp-accounting PLD 0.436.

PRV's ``eps_error`` is absolute; Opacus' default (0.01) is 2% of an epsilon of 0.44. Here it is
a fraction of the (cheap) RDP epsilon, clipped to [PRV_MIN_EPS_ERROR, PRV_MAX_EPS_ERROR]: cost
grows as sqrt(steps) / eps_error (measured, 30 rounds x 5 epochs of a 30,000-image site =
140,700 steps: 1.3 s and 0.9 GB peak RSS at 0.01, 15 s and 3.5 GB at 0.001).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable

from opacus.accountants import IAccountant, PRVAccountant, RDPAccountant

History = list[tuple[float, float, int]]  # (noise_multiplier, sample_rate, steps)

ACCOUNTANTS: dict[str, type[IAccountant]] = {"rdp": RDPAccountant, "prv": PRVAccountant}
PRV_RELATIVE_EPS_ERROR = 0.0025  # of the RDP epsilon, an upper bound of the PRV one
PRV_MIN_EPS_ERROR = 1e-3
PRV_MAX_EPS_ERROR = 1e-2
CALIBRATION_TOLERANCE = 0.01  # calibrated noise ends within 1% below the target epsilon
MAX_NOISE_MULTIPLIER = 1e6  # Opacus' MAX_SIGMA
PRV_MIN_STEP_DOWN, PRV_MAX_STEP_DOWN = 0.5, 0.98  # PRV calibration: steps down from RDP's noise
MAX_CALIBRATION_STEPS = 60


def check_kind(kind: str) -> str:
    """`kind` if it names an accountant, else a ValueError naming dp.accountant."""
    if kind not in ACCOUNTANTS:
        raise ValueError(f"dp.accountant: expected one of {sorted(ACCOUNTANTS)}, found {kind!r}")
    return kind


def as_history(entries: Iterable[Iterable[float]]) -> History:
    """(noise, sample_rate, steps) tuples from any iterable of triples (a JSON list of lists),
    consecutive entries with the same noise and sample rate merged, as Opacus' `step` does."""
    merged: History = []
    for entry in entries:
        noise, rate, steps = entry
        noise, rate, steps = float(noise), float(rate), int(steps)
        if steps < 0 or not (0.0 < rate <= 1.0) or noise < 0.0:
            raise ValueError(
                "expected (noise_multiplier >= 0, 0 < sample_rate <= 1, steps >= 0), "
                f"found {(noise, rate, steps)}"
            )
        if steps == 0:
            continue
        if merged and merged[-1][:2] == (noise, rate):
            merged[-1] = (noise, rate, merged[-1][2] + steps)
        else:
            merged.append((noise, rate, steps))
    return merged


def make_accountant(kind: str, history: Iterable[Iterable[float]] = ()) -> IAccountant:
    """A fresh Opacus accountant of `kind` ('rdp' | 'prv') holding `history`."""
    accountant = ACCOUNTANTS[check_kind(kind)]()
    accountant.history = as_history(history)
    return accountant


def prv_eps_error(history: Iterable[Iterable[float]], delta: float) -> float:
    """The eps_error PRV is asked for: PRV_RELATIVE_EPS_ERROR of the RDP epsilon, clipped."""
    rdp = make_accountant("rdp", history).get_epsilon(delta)
    return min(PRV_MAX_EPS_ERROR, max(PRV_MIN_EPS_ERROR, PRV_RELATIVE_EPS_ERROR * float(rdp)))


def epsilon(history: Iterable[Iterable[float]], delta: float, kind: str) -> float:
    """Epsilon at `delta` after `history`, by accountant `kind`; 0.0 for an empty history."""
    if not 0.0 < delta < 1.0:
        raise ValueError(f"expected 0 < delta < 1, found {delta}")
    merged = as_history(history)
    accountant = make_accountant(kind, merged)
    if not merged:
        return 0.0
    if kind == "prv":
        return float(accountant.get_epsilon(delta, eps_error=prv_eps_error(merged, delta)))
    return float(accountant.get_epsilon(delta))


def noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, kind: str
) -> float:
    """The noise multiplier whose `steps` steps at `sample_rate` end at an epsilon(...) of at
    most `target_epsilon` and above target x (1 - CALIBRATION_TOLERANCE).

    A root search on the same `epsilon` that the site's budget check uses, so a run calibrated
    here is never refused its last round. prv starts from the RDP answer (RDP is the looser
    bound, so its noise is enough) and searches down: PRV is slow at small noise.
    """
    check_kind(kind)
    if target_epsilon <= 0 or steps < 1:
        raise ValueError(
            f"expected target_epsilon > 0 and steps >= 1, found {target_epsilon}, {steps}"
        )

    def eps_rdp(sigma: float) -> float:
        return epsilon([(sigma, sample_rate, steps)], delta, "rdp")

    def eps_prv(sigma: float) -> float:
        return epsilon([(sigma, sample_rate, steps)], delta, "prv")

    # RDP: from [0, 1], doubling the top until it is enough (as Opacus' get_noise_multiplier).
    low, high, low_eps = 0.0, 1.0, math.inf
    while (high_eps := eps_rdp(high)) > target_epsilon:
        low, high, low_eps = high, 2 * high, high_eps
        if high > MAX_NOISE_MULTIPLIER:
            raise ValueError(
                f"dp.target_epsilon={target_epsilon} is out of reach at delta={delta} for "
                f"{steps} steps at sample rate {sample_rate} (noise multiplier > "
                f"{MAX_NOISE_MULTIPLIER:g})"
            )
    low, low_eps, high, high_eps = _shrink(eps_rdp, target_epsilon, low, low_eps, high, high_eps)
    if kind == "rdp":
        return high
    # PRV <= RDP (checked in tests/test_accountant.py): the RDP noise is enough for PRV, and
    # PRV falls about as steeply in sigma; step down along the RDP slope until PRV is over.
    slope = _log_slope(low, low_eps, high, high_eps)
    high_eps = eps_prv(high)
    while high_eps > target_epsilon:  # never seen; doubling keeps the search correct
        high *= 2
        high_eps = eps_prv(high)
    while True:
        guess = high * math.exp(math.log(_aim(target_epsilon) / high_eps) / slope)
        low = min(max(guess, PRV_MIN_STEP_DOWN * high), PRV_MAX_STEP_DOWN * high)
        if (low_eps := eps_prv(low)) > target_epsilon:
            break
        high, high_eps = low, low_eps
        if target_epsilon - high_eps <= CALIBRATION_TOLERANCE * target_epsilon:
            return high
    return _shrink(eps_prv, target_epsilon, low, low_eps, high, high_eps)[2]


def _aim(target_epsilon: float) -> float:
    return target_epsilon * (1 - CALIBRATION_TOLERANCE / 2)


def _log_slope(low: float, low_eps: float, high: float, high_eps: float) -> float:
    """d log(epsilon) / d log(sigma) between two points (negative), -1 where undefined."""
    if low > 0 and math.isfinite(low_eps) and 0 < high_eps < low_eps:
        return math.log(high_eps / low_eps) / math.log(high / low)
    return -1.0


def _shrink(
    eps: Callable[[float], float],
    target_epsilon: float,
    low: float,
    low_eps: float,
    high: float,
    high_eps: float,
) -> tuple[float, float, float, float]:
    """Shrink [low, high] (eps(low) > target >= eps(high)) until eps(high) is within the
    tolerance: interpolate log epsilon in log sigma towards _aim(target), bisecting where that
    cannot be done or keeps moving the same end."""
    moved, run = "", 0
    for _ in range(MAX_CALIBRATION_STEPS):
        if target_epsilon - high_eps <= CALIBRATION_TOLERANCE * target_epsilon:
            break
        mid = (low + high) / 2
        if run < 2 and low > 0 and math.isfinite(low_eps) and 0 < high_eps < low_eps:
            slope = _log_slope(low, low_eps, high, high_eps)
            guess = low * math.exp(math.log(_aim(target_epsilon) / low_eps) / slope)
            if low < guess < high:
                mid = guess
        bisected = mid == (low + high) / 2
        if (mid_eps := eps(mid)) <= target_epsilon:
            side, high, high_eps = "high", mid, mid_eps
        else:
            side, low, low_eps = "low", mid, mid_eps
        run = 0 if bisected or side != moved else run + 1
        moved = side
    return low, low_eps, high, high_eps
