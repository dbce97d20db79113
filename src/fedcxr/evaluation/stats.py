"""Test-set statistics: thresholded metrics, AUROC, patient-level bootstrap CIs, DeLong, t-tests."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats as sps
from sklearn.metrics import (
    accuracy_score,
    f1_score,
    precision_recall_curve,
    precision_score,
    recall_score,
    roc_curve,
)

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

METRIC_KEYS: tuple[str, ...] = ("accuracy", "precision", "recall", "specificity", "f1")


# ---------------------------------------------------------------------------
# input checks
# ---------------------------------------------------------------------------


def _labels(y_true: ArrayLike, name: str = "y_true") -> IntArray:
    """y_true as a 1-D int array of 0/1, or a ValueError saying what was found."""
    y = np.asarray(y_true)
    if y.ndim != 1:
        raise ValueError(f"{name} must be 1-D, found shape {y.shape}")
    bad = ~np.isin(y, (0, 1))
    if bad.any():
        found = np.unique(y[bad])[:5].tolist()
        raise ValueError(f"{name} must hold only 0/1 labels, found {found}")
    return y.astype(np.int64)


def _scores(y_prob: ArrayLike, n: int, name: str = "y_prob") -> FloatArray:
    """y_prob as a 1-D finite float array of length n."""
    p = np.asarray(y_prob, dtype=np.float64)
    if p.shape != (n,):
        raise ValueError(f"{name} must have shape ({n},) to match y_true, found {p.shape}")
    if not np.isfinite(p).all():
        raise ValueError(f"{name} must be finite, found {int((~np.isfinite(p)).sum())} NaN/inf")
    return p


def _has_both_classes(y: IntArray) -> bool:
    return bool(y.min() != y.max()) if y.size else False


# ---------------------------------------------------------------------------
# thresholded metrics
# ---------------------------------------------------------------------------


def binary_metrics(y_true: ArrayLike, y_prob: ArrayLike, threshold: float) -> dict[str, float]:
    """Accuracy, precision, recall (= sensitivity), specificity and F1 at `threshold`.

    A case is called positive when its score is >= threshold (sklearn's roc_curve convention).
    Undefined ratios (no predicted positives, no positives, ...) are 0, as sklearn's
    zero_division=0.
    """
    y = _labels(y_true)
    p = _scores(y_prob, y.size)
    if y.size == 0:
        raise ValueError("binary_metrics needs at least one row, found 0")
    pred = (p >= threshold).astype(np.int64)
    labels = [0, 1]
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "precision": float(precision_score(y, pred, labels=labels, zero_division=0)),
        "recall": float(recall_score(y, pred, labels=labels, zero_division=0)),
        "specificity": float(recall_score(y, pred, labels=labels, pos_label=0, zero_division=0)),
        "f1": float(f1_score(y, pred, labels=labels, zero_division=0)),
    }


def auroc(y_true: ArrayLike, y_prob: ArrayLike) -> float | None:
    """ROC AUC, or None when y_true has one class only (AUC undefined).

    The value is sklearn's roc_auc_score (the tests hold them equal, ties included), computed as
    the Mann-Whitney U / (m n) from scipy midranks, which is about 4x faster at 10k rows: this
    is the statistic a 1000-replicate bootstrap calls 1000 times.
    """
    y = _labels(y_true)
    p = _scores(y_prob, y.size)
    if not _has_both_classes(y):
        return None
    m = int(y.sum())
    ranks = sps.rankdata(p)
    return float((ranks[y == 1].sum() - m * (m + 1) / 2) / (m * (y.size - m)))


# ---------------------------------------------------------------------------
# threshold choice (on a validation split, never on the test set)
# ---------------------------------------------------------------------------


def _youden(y: IntArray, p: FloatArray) -> float:
    """Threshold maximising Youden's J = TPR - FPR over sklearn's roc_curve thresholds."""
    fpr, tpr, thresholds = roc_curve(y, p)
    best = int(np.argmax(tpr - fpr))
    threshold = float(thresholds[best])
    if not math.isfinite(threshold):
        # roc_curve's first threshold is +inf ("call nothing positive"); the same operating
        # point is reached by any finite value just above the largest score.
        threshold = float(np.nextafter(p.max(), np.inf))
    return threshold


def _max_f1(y: IntArray, p: FloatArray) -> float:
    """Threshold maximising F1 over sklearn's precision_recall_curve thresholds."""
    precision, recall, thresholds = precision_recall_curve(y, p)
    precision, recall = precision[:-1], recall[:-1]  # the last point has no threshold
    denom = precision + recall
    f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
    return float(thresholds[int(np.argmax(f1))])


THRESHOLD_RULES: dict[str, Callable[[IntArray, FloatArray], float]] = {
    "youden": _youden,
    "f1": _max_f1,
}


def choose_threshold(y_true: ArrayLike, y_prob: ArrayLike, rule: str = "youden") -> float:
    """Operating threshold chosen on a VALIDATION split by `rule` (a key of THRESHOLD_RULES).

    Pass validation labels and scores: a threshold tuned on the test set inflates every
    thresholded test metric. With one class in y_true no rule is defined and 0.5 is returned.
    """
    if rule not in THRESHOLD_RULES:
        known = sorted(THRESHOLD_RULES)
        raise ValueError(f"unknown threshold rule {rule!r}; expected one of {known}")
    y = _labels(y_true)
    p = _scores(y_prob, y.size)
    if not _has_both_classes(y):
        return 0.5
    return THRESHOLD_RULES[rule](y, p)


# ---------------------------------------------------------------------------
# multi-label
# ---------------------------------------------------------------------------


def multilabel_metrics(
    Y_true: ArrayLike, P: ArrayLike, thresholds: Sequence[float] | ArrayLike
) -> dict[str, Any]:
    """Per-label binary_metrics and AUROC at per-label thresholds, plus their macro means.

    Returns {"per_label": [one dict per column, METRIC_KEYS + "auroc" + "threshold" +
    "n_positive"], "macro": {METRIC_KEYS + "auroc": mean}, "evaluated": [column indices]}.
    A label's AUROC is None when its column of Y_true has one class; the macro means run over
    the labels with both classes only ("evaluated"), so an absent finding does not count as 0.
    """
    Y = np.asarray(Y_true)
    S = np.asarray(P, dtype=np.float64)
    if Y.ndim != 2:
        raise ValueError(f"Y_true must be 2-D (rows, labels), found shape {Y.shape}")
    if S.shape != Y.shape:
        raise ValueError(f"P must have the shape of Y_true {Y.shape}, found {S.shape}")
    t = np.asarray(thresholds, dtype=np.float64)
    if t.shape != (Y.shape[1],):
        raise ValueError(
            f"thresholds must have one value per label ({Y.shape[1]}), found shape {t.shape}"
        )
    per_label: list[dict[str, Any]] = []
    evaluated: list[int] = []
    for j in range(Y.shape[1]):
        y = _labels(Y[:, j], name=f"Y_true[:, {j}]")
        entry: dict[str, Any] = dict(binary_metrics(y, S[:, j], float(t[j])))
        entry["auroc"] = auroc(y, S[:, j])
        entry["threshold"] = float(t[j])
        entry["n_positive"] = int(y.sum())
        per_label.append(entry)
        if entry["auroc"] is not None:
            evaluated.append(j)
    if not evaluated:
        raise ValueError(
            f"no label of {Y.shape[1]} has both classes in Y_true: macro metrics are undefined"
        )
    macro = {
        key: float(np.mean([per_label[j][key] for j in evaluated]))
        for key in (*METRIC_KEYS, "auroc")
    }
    return {"per_label": per_label, "macro": macro, "evaluated": evaluated}


# ---------------------------------------------------------------------------
# patient-level bootstrap
# ---------------------------------------------------------------------------


def group_index(groups: ArrayLike, n: int) -> tuple[IntArray, IntArray, IntArray]:
    """(rows ordered by group, first position of each group in that order, rows per group)."""
    g = np.asarray(groups)
    if g.shape[:1] != (n,) or g.ndim != 1:
        raise ValueError(f"groups must be 1-D with one id per row ({n}), found shape {g.shape}")
    _, inverse = np.unique(g, return_inverse=True)
    order = np.argsort(inverse, kind="stable").astype(np.int64)
    counts = np.bincount(inverse).astype(np.int64)
    starts = np.concatenate(([0], np.cumsum(counts)[:-1])).astype(np.int64)
    return order, starts, counts


def resample_rows(
    rng: np.random.Generator, order: IntArray, starts: IntArray, counts: IntArray
) -> IntArray:
    """Row indices of one replicate: draw groups with replacement, take all rows of each."""
    drawn = rng.integers(0, counts.size, size=counts.size)
    lengths = counts[drawn]
    offsets = np.cumsum(lengths) - lengths
    within = np.arange(int(lengths.sum()), dtype=np.int64) - np.repeat(offsets, lengths)
    return order[np.repeat(starts[drawn], lengths) + within]


def bootstrap_ci(
    stat: Callable[[Any, Any], float | None],
    y_true: ArrayLike,
    y_prob: ArrayLike,
    groups: ArrayLike,
    *,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
) -> tuple[float, float]:
    """Percentile (1 - alpha) CI of stat(y_true, y_prob), resampling GROUPS (patients).

    Each replicate draws as many groups as there are, with replacement, and takes every row of
    each drawn group (a patient drawn twice counts twice), so images of one patient stay
    together, as they must when they are correlated. y_true/y_prob may be 1-D or 2-D (rows
    first). Replicates where stat returns None or NaN (e.g. one class drawn) are skipped; more
    than half skipped is a ValueError. Deterministic for a seed (numpy Generator).
    """
    y = np.asarray(y_true)
    p = np.asarray(y_prob)
    if y.ndim == 0 or p.shape[:1] != y.shape[:1]:
        raise ValueError(
            f"y_true and y_prob need the same number of rows, found {y.shape} and {p.shape}"
        )
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, found {n_boot}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), found {alpha}")
    order, starts, counts = group_index(groups, y.shape[0])
    if counts.size == 0:
        raise ValueError("bootstrap_ci needs at least one row, found 0")
    rng = np.random.default_rng(seed)
    values: list[float] = []
    for _ in range(n_boot):
        rows = resample_rows(rng, order, starts, counts)
        value = stat(y[rows], p[rows])
        if value is not None and math.isfinite(value):
            values.append(float(value))
    skipped = n_boot - len(values)
    if skipped > n_boot / 2:
        raise ValueError(
            f"{skipped} of {n_boot} bootstrap replicates gave an undefined statistic "
            "(None/NaN, e.g. one class drawn); expected at most half"
        )
    low, high = np.quantile(values, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


# ---------------------------------------------------------------------------
# DeLong
# ---------------------------------------------------------------------------


def _delong(y_true: ArrayLike, predictions: Sequence[ArrayLike]) -> tuple[FloatArray, FloatArray]:
    """AUCs (k,) and their DeLong covariance matrix (k, k) for k predictors on the same cases.

    Hand-written (neither sklearn nor scipy has DeLong): the O(n log n) algorithm of Sun & Xu
    (2014), "Fast Implementation of DeLong's Algorithm for Comparing the Areas Under Correlated
    ROC Curves", IEEE Signal Processing Letters 21(11). Midranks (scipy rankdata 'average')
    give tied positive/negative pairs weight 1/2, exactly as DeLong et al. (1988).
    """
    y = _labels(y_true)
    scores = np.vstack(
        [_scores(s, y.size, name=f"predictor {i}") for i, s in enumerate(predictions)]
    )
    m = int(y.sum())
    n = int(y.size - m)
    if m == 0 or n == 0:
        raise ValueError(f"DeLong needs both classes in y_true, found {m} positives, {n} negatives")
    if m < 2 or n < 2:
        raise ValueError(
            f"DeLong variance needs at least 2 positives and 2 negatives, found {m} and {n}"
        )
    pos = scores[:, y == 1]
    neg = scores[:, y == 0]
    tx = sps.rankdata(pos, axis=1)  # midranks within positives
    ty = sps.rankdata(neg, axis=1)  # midranks within negatives
    tz = sps.rankdata(np.hstack([pos, neg]), axis=1)  # midranks in the pooled sample
    aucs = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n  # per positive: share of negatives below it (ties 1/2)
    v01 = 1.0 - (tz[:, m:] - ty) / m  # per negative: share of positives above it
    cov = np.atleast_2d(np.cov(v10)) / m + np.atleast_2d(np.cov(v01)) / n
    return aucs.astype(np.float64), cov.astype(np.float64)


def delong_auc_variance(y_true: ArrayLike, y_prob: ArrayLike) -> tuple[float, float]:
    """(AUC, DeLong variance of the AUC), by the fast midrank algorithm of Sun & Xu (2014)."""
    aucs, cov = _delong(y_true, [y_prob])
    return float(aucs[0]), float(cov[0, 0])


@dataclass(frozen=True)
class DeLongResult:
    """DeLong's test of AUC(a) = AUC(b) for two predictors scored on the same cases."""

    auc_a: float
    auc_b: float
    diff: float  # auc_a - auc_b
    var_a: float
    var_b: float
    cov_ab: float
    z: float
    p_value: float  # two-sided

    @property
    def se_diff(self) -> float:
        """Standard error of diff: sqrt(var_a + var_b - 2 cov_ab)."""
        return math.sqrt(max(self.var_a + self.var_b - 2 * self.cov_ab, 0.0))

    def diff_ci(self, level: float = 0.95) -> tuple[float, float]:
        """Normal-approximation CI of auc_a - auc_b at `level` (as pROC's roc.test)."""
        if not 0.0 < level < 1.0:
            raise ValueError(f"level must be in (0, 1), found {level}")
        half = float(sps.norm.ppf(0.5 + level / 2)) * self.se_diff
        return self.diff - half, self.diff + half


def delong_test(y_true: ArrayLike, prob_a: ArrayLike, prob_b: ArrayLike) -> DeLongResult:
    """DeLong et al. (1988) test for two correlated ROC curves (same cases, two predictors).

    Variances and covariance come from the fast algorithm of Sun & Xu (2014) (see _delong).
    Identical predictors give z = 0, p = 1.
    """
    y = _labels(y_true)
    a = np.asarray(prob_a)
    b = np.asarray(prob_b)
    if a.shape != y.shape or b.shape != y.shape:
        raise ValueError(
            f"y_true, prob_a and prob_b must have the same length, found "
            f"{y.shape}, {a.shape}, {b.shape}"
        )
    aucs, cov = _delong(y, [a, b])
    diff = float(aucs[0] - aucs[1])
    var_diff = max(float(cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]), 0.0)
    if var_diff == 0.0:
        z = 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    else:
        z = diff / math.sqrt(var_diff)
    p_value = float(2 * sps.norm.sf(abs(z)))
    return DeLongResult(
        auc_a=float(aucs[0]),
        auc_b=float(aucs[1]),
        diff=diff,
        var_a=float(cov[0, 0]),
        var_b=float(cov[1, 1]),
        cov_ab=float(cov[0, 1]),
        z=z,
        p_value=p_value,
    )


# ---------------------------------------------------------------------------
# across seeds
# ---------------------------------------------------------------------------


def paired_ttest(a: Sequence[float], b: Sequence[float]) -> tuple[float, float] | None:
    """(t, two-sided p) of scipy's ttest_rel over paired runs (e.g. seeds), or None if undefined.

    None when there are fewer than 2 pairs or every difference a_i - b_i is the same up to
    float rounding (zero variance of the differences: t is 0/0 or infinite).
    """
    x = np.asarray(a, dtype=np.float64)
    z = np.asarray(b, dtype=np.float64)
    if x.ndim != 1 or x.shape != z.shape:
        raise ValueError(f"a and b must be 1-D and paired, found shapes {x.shape} and {z.shape}")
    if x.size < 2:
        return None
    d = x - z
    scale = max(float(np.abs(x).max()), float(np.abs(z).max()))
    if float(np.ptp(d)) <= 1e-12 * scale:  # identical up to rounding: no variance to test
        return None
    result = sps.ttest_rel(x, z)
    return float(result.statistic), float(result.pvalue)


def mean_std(values: Sequence[float] | ArrayLike) -> tuple[float, float]:
    """(mean, sample standard deviation with ddof=1); the std of a single value is 0.0."""
    v = np.asarray(values, dtype=np.float64).ravel()
    if v.size == 0:
        raise ValueError("mean_std needs at least one value, found 0")
    if v.size == 1:
        return float(v[0]), 0.0
    return float(v.mean()), float(v.std(ddof=1))
