"""Patient-bootstrap engine: replicate case weights, weighted AUROC and metrics, CIs, p-values.

Replicates are case weights (how often each test row was drawn), drawn exactly as
`stats.bootstrap_ci` draws them for the same groups and seed, so a statistic computed on weights
equals bootstrap_ci's on the resampled rows. Every configuration uses the same seed, hence the
same replicates, so differences between configurations are paired.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
from scipy.stats import norm

from fedcxr.evaluation.stats import FloatArray, IntArray, group_index, resample_rows

N_BOOT = 1000
ALPHA = 0.05
BOOT_CHUNK = 100  # replicates held in memory at once (100 x 10k test images x 8 bytes = 8 MB)


def replicate_weights(
    groups: np.ndarray, n_boot: int, seed: int, chunk: int = BOOT_CHUNK
) -> Iterator[FloatArray]:
    """Patient-bootstrap replicates as (b x n) case weights (how often each row was drawn).

    The draws are exactly those of `stats.bootstrap_ci` for the same groups and seed, so a
    statistic computed on weights equals bootstrap_ci's on the resampled rows. Yields chunks
    of at most `chunk` replicates, n_boot in all.
    """
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, found {n_boot}")
    n = len(groups)
    order, starts, counts = group_index(groups, n)
    if counts.size == 0:
        raise ValueError("the bootstrap needs at least one test row, found 0")
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        weights = np.empty((b, n), dtype=np.float64)
        for i in range(b):
            weights[i] = np.bincount(resample_rows(rng, order, starts, counts), minlength=n)
        done += b
        yield weights


@dataclass(frozen=True)
class AurocPlan:
    """Per column, what a weighted AUROC needs: positives and each one's rank among negatives."""

    pos: IntArray
    neg_order: IntArray  # negative rows sorted by score
    lo: IntArray  # per positive: negatives with a strictly lower score
    hi: IntArray  # per positive: negatives with a lower or equal score


def auroc_plan(y: np.ndarray, p: np.ndarray) -> AurocPlan | None:
    """One column's AurocPlan, sorted once for every replicate; None when a class is absent."""
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    if pos.size == 0 or neg.size == 0:
        return None
    neg_order = neg[np.argsort(p[neg], kind="stable")]
    neg_scores = p[neg_order]
    lo = np.searchsorted(neg_scores, p[pos], side="left")
    hi = np.searchsorted(neg_scores, p[pos], side="right")
    return AurocPlan(pos, neg_order, lo, hi)


def plan_auroc(plan: AurocPlan | None, weights: FloatArray) -> FloatArray:
    """AUROC of a planned column under each row of weights (b x n); NaN without a class."""
    if plan is None:
        return np.full(weights.shape[0], np.nan)
    cum = np.zeros((weights.shape[0], plan.neg_order.size + 1))
    np.cumsum(weights[:, plan.neg_order], axis=1, out=cum[:, 1:])
    below = cum[:, plan.lo] + 0.5 * (cum[:, plan.hi] - cum[:, plan.lo])  # ties count 1/2
    w_pos = weights[:, plan.pos]
    num = (w_pos * below).sum(axis=1)
    den = w_pos.sum(axis=1) * cum[:, -1]
    return np.divide(num, den, out=np.full(den.shape, np.nan), where=den > 0)


def weighted_auroc(y_true: np.ndarray, y_prob: np.ndarray, weights: np.ndarray) -> FloatArray:
    """AUROC under each row of `weights` (b x n case weights); NaN where a class has no weight.

    With integer weights this is the Mann-Whitney AUROC of the data with row i repeated
    weights[i] times (sklearn's roc_auc_score of that data, ties counted 1/2), computed in
    O(b n) from one sort instead of re-ranking each replicate.
    """
    y = np.asarray(y_true)
    p = np.asarray(y_prob, dtype=np.float64)
    w = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    if y.ndim != 1 or p.shape != y.shape or w.shape[1] != y.size:
        raise ValueError(
            f"expected y_true (n,), y_prob (n,) and weights (b, n), found {y.shape}, {p.shape} "
            f"and {w.shape}"
        )
    return plan_auroc(auroc_plan(y, p), w)


def _safe_ratio(num: FloatArray, den: FloatArray, fill: float = 0.0) -> FloatArray:
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, fill), where=den > 0)


def replicate_metrics(
    Y: np.ndarray,
    P: np.ndarray,
    thresholds: np.ndarray,
    weights: np.ndarray,
    pneumonia: int | None = None,
    plans: Sequence[AurocPlan | None] | None = None,
) -> dict[str, FloatArray]:
    """`stats.multilabel_metrics`' macro values on each weighted replicate, vectorised.

    For each row of `weights` (b x n): per-label AUROC and thresholded metrics (zero_division
    0, as binary_metrics) averaged over the labels with both classes in that replicate; NaN
    when no label has both. With `pneumonia` (a column index) also `sensitivity_pneumonia`
    and `specificity_pneumonia` of that column (NaN when the replicate holds no positive /
    no negative). Returns name -> (b,) array. `plans` (from the same Y, P) skips re-sorting.
    """
    Y = np.asarray(Y)
    P = np.asarray(P, dtype=np.float64)
    W = np.atleast_2d(np.asarray(weights, dtype=np.float64))
    n, n_labels = Y.shape
    if P.shape != Y.shape or W.shape[1] != n or np.shape(thresholds) != (n_labels,):
        raise ValueError(
            f"expected Y and P (n, labels), thresholds (labels,) and weights (b, n), found "
            f"{Y.shape}, {P.shape}, {np.shape(thresholds)} and {W.shape}"
        )
    yf = Y.astype(np.float64)
    pred = (np.asarray(thresholds, dtype=np.float64) <= P).astype(np.float64)
    counts = W @ np.hstack([yf * pred, (1.0 - yf) * pred, yf])  # b x 3L
    tp, fp, pos = np.split(counts, 3, axis=1)
    total = W.sum(axis=1, keepdims=True)
    neg = total - pos
    fn, tn = pos - tp, neg - fp
    per_label = {
        "accuracy": _safe_ratio(tp + tn, total),
        "precision": _safe_ratio(tp, tp + fp),
        "recall": _safe_ratio(tp, pos),
        "specificity": _safe_ratio(tn, neg),
        "f1": _safe_ratio(2 * tp, 2 * tp + fp + fn),
    }
    if plans is None:
        plans = [auroc_plan(Y[:, j], P[:, j]) for j in range(n_labels)]
    per_label["auroc_macro"] = np.column_stack([plan_auroc(plan, W) for plan in plans])
    defined = (pos > 0) & (neg > 0)
    n_defined = defined.sum(axis=1)
    out = {
        key: _safe_ratio(np.where(defined, values, 0.0).sum(axis=1), n_defined, np.nan)
        for key, values in per_label.items()
    }
    if pneumonia is not None:
        k = pneumonia
        out["sensitivity_pneumonia"] = np.where(pos[:, k] > 0, per_label["recall"][:, k], np.nan)
        out["specificity_pneumonia"] = np.where(
            neg[:, k] > 0, per_label["specificity"][:, k], np.nan
        )
    return out


def percentile_ci(values: np.ndarray, alpha: float = ALPHA) -> tuple[float | None, float | None]:
    """Percentile CI of the finite replicate values (as bootstrap_ci); (None, None) when more
    than half the replicates are undefined (NaN: e.g. no positive patient drawn)."""
    v = np.asarray(values, dtype=np.float64)
    finite = v[np.isfinite(v)]
    if v.size == 0 or finite.size < v.size / 2:
        return None, None
    low, high = np.quantile(finite, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


def bootstrap_p(diffs: np.ndarray) -> float | None:
    """Two-sided bootstrap p-value of H0: difference = 0, from replicate differences.

    2 x the smaller tail share of replicates on either side of 0, each tail counted as
    (1 + k) / (1 + B) so that a finite bootstrap never reports p = 0; capped at 1.
    """
    d = np.asarray(diffs, dtype=np.float64)
    d = d[np.isfinite(d)]
    if d.size == 0:
        return None
    tail = min(int((d <= 0).sum()), int((d >= 0).sum()))
    return float(min(1.0, 2.0 * (1 + tail) / (1 + d.size)))


def detectable_difference(
    diffs: np.ndarray, alpha: float = ALPHA, power: float = 0.8
) -> float | None:
    """The smallest true difference a two-sided paired test at level alpha detects with the
    given power: (z_(1-alpha/2) + z_power) x the bootstrap standard error of the paired
    difference (normal approximation; None when fewer than half the replicates are defined).
    """
    d = np.asarray(diffs, dtype=np.float64)
    finite = d[np.isfinite(d)]
    if d.size == 0 or finite.size < max(d.size / 2, 2):
        return None
    z = float(norm.ppf(1 - alpha / 2) + norm.ppf(power))
    return z * float(finite.std(ddof=1))
