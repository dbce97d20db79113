"""Tests for fedcxr.evaluation.stats: metrics, thresholds, bootstrap, DeLong, paired t-test."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import (
    accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from fedcxr.evaluation.stats import (
    THRESHOLD_RULES,
    DeLongResult,
    auroc,
    binary_metrics,
    bootstrap_ci,
    choose_threshold,
    delong_auc_variance,
    delong_test,
    mean_std,
    multilabel_metrics,
    paired_ttest,
)

Y_FIXED = np.array([0, 0, 1, 1, 0, 1, 0, 1, 1, 0, 0, 1])
P_FIXED = np.array([0.1, 0.4, 0.35, 0.8, 0.5, 0.65, 0.2, 0.9, 0.3, 0.6, 0.05, 0.5])


def _sklearn_metrics(y: np.ndarray, p: np.ndarray, threshold: float) -> dict[str, float]:
    pred = (p >= threshold).astype(int)
    tn, fp, _, _ = confusion_matrix(y, pred, labels=[0, 1]).ravel()
    return {
        "accuracy": accuracy_score(y, pred),
        "precision": precision_score(y, pred, zero_division=0),
        "recall": recall_score(y, pred, zero_division=0),
        "specificity": tn / (tn + fp),
        "f1": f1_score(y, pred, zero_division=0),
    }


# ---------------------------------------------------------------------------
# binary / multi-label metrics
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("threshold", [0.3, 0.5, 0.62])
def test_binary_metrics_match_sklearn_and_confusion_matrix(threshold: float) -> None:
    got = binary_metrics(Y_FIXED, P_FIXED, threshold)
    assert set(got) == {"accuracy", "precision", "recall", "specificity", "f1"}
    want = _sklearn_metrics(Y_FIXED, P_FIXED, threshold)
    for key, value in want.items():
        assert got[key] == pytest.approx(value), key


def test_binary_metrics_threshold_is_inclusive_and_hand_checked() -> None:
    # At 0.5: predicted positive = {0.8, 0.5(neg), 0.65, 0.9, 0.6(neg), 0.5(pos)}
    # TP=4 (0.8, 0.65, 0.9, 0.5), FP=2, FN=2 (0.35, 0.3), TN=4.
    got = binary_metrics(Y_FIXED, P_FIXED, 0.5)
    assert got == pytest.approx(
        {"accuracy": 8 / 12, "precision": 4 / 6, "recall": 4 / 6, "specificity": 4 / 6, "f1": 4 / 6}
    )


def test_binary_metrics_zero_division_is_zero() -> None:
    got = binary_metrics([0, 1, 1], [0.1, 0.2, 0.3], threshold=0.9)  # nothing called positive
    assert got["precision"] == 0.0 and got["recall"] == 0.0 and got["f1"] == 0.0
    assert got["specificity"] == 1.0
    with pytest.raises(ValueError, match="0/1"):
        binary_metrics([0, 2], [0.1, 0.2], 0.5)
    with pytest.raises(ValueError, match="shape"):
        binary_metrics([0, 1], [0.1, 0.2, 0.3], 0.5)


def test_multilabel_metrics_match_sklearn_per_label_and_macro() -> None:
    rng = np.random.default_rng(3)
    n = 60
    Y = np.zeros((n, 3), dtype=int)
    Y[:, 0] = rng.integers(0, 2, n)
    Y[:, 1] = rng.integers(0, 2, n)  # column 2 stays all-negative: AUROC undefined
    P = np.clip(0.3 * Y + rng.uniform(0, 0.7, (n, 3)), 0, 1)
    thresholds = [0.4, 0.55, 0.5]
    out = multilabel_metrics(Y, P, thresholds)
    assert out["evaluated"] == [0, 1]
    assert out["per_label"][2]["auroc"] is None
    for j in range(3):
        want = _sklearn_metrics(Y[:, j], P[:, j], thresholds[j])
        for key, value in want.items():
            assert out["per_label"][j][key] == pytest.approx(value), (j, key)
        assert out["per_label"][j]["threshold"] == thresholds[j]
        assert out["per_label"][j]["n_positive"] == int(Y[:, j].sum())
    for j in (0, 1):
        assert out["per_label"][j]["auroc"] == pytest.approx(roc_auc_score(Y[:, j], P[:, j]))
    macro_auc = roc_auc_score(Y[:, :2], P[:, :2], average="macro")
    assert out["macro"]["auroc"] == pytest.approx(macro_auc)
    for key in ("accuracy", "precision", "recall", "specificity", "f1"):
        want = np.mean([_sklearn_metrics(Y[:, j], P[:, j], thresholds[j])[key] for j in (0, 1)])
        assert out["macro"][key] == pytest.approx(want), key


def test_multilabel_metrics_refuses_bad_shapes() -> None:
    Y = np.array([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match="one value per label"):
        multilabel_metrics(Y, Y.astype(float), [0.5])
    with pytest.raises(ValueError, match="shape of Y_true"):
        multilabel_metrics(Y, np.zeros((2, 3)), [0.5, 0.5])
    with pytest.raises(ValueError, match="both classes"):
        multilabel_metrics(np.zeros((2, 2), dtype=int), np.zeros((2, 2)), [0.5, 0.5])


# ---------------------------------------------------------------------------
# threshold choice
# ---------------------------------------------------------------------------


def _brute_youden(y: np.ndarray, p: np.ndarray) -> float:
    best = -np.inf
    for t in np.unique(p):
        pred = p >= t
        best = max(best, pred[y == 1].mean() - pred[y == 0].mean())
    return float(best)


def _brute_f1(y: np.ndarray, p: np.ndarray) -> float:
    return float(max(f1_score(y, (p >= t).astype(int), zero_division=0) for t in np.unique(p)))


def test_choose_threshold_finds_the_known_cut() -> None:
    y_val = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p_val = np.array([0.10, 0.20, 0.30, 0.45, 0.55, 0.70, 0.80, 0.90])
    assert choose_threshold(y_val, p_val, "youden") == pytest.approx(0.55)
    assert choose_threshold(y_val, p_val, "f1") == pytest.approx(0.55)
    # The test split of the same model is shifted: tuning on it gives another cut. The API
    # takes the validation arrays explicitly, so the caller decides which split tunes it.
    y_test = np.array([0, 0, 0, 0, 1, 1, 1, 1])
    p_test = np.array([0.30, 0.40, 0.50, 0.62, 0.66, 0.75, 0.85, 0.95])
    t_val = choose_threshold(y_val, p_val)
    t_test = choose_threshold(y_test, p_test)
    assert t_test == pytest.approx(0.66)
    assert t_val != pytest.approx(t_test)
    # ...and the thresholded test metrics differ accordingly.
    assert binary_metrics(y_test, p_test, t_val) != binary_metrics(y_test, p_test, t_test)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_choose_threshold_reaches_the_brute_force_optimum(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 200)
    p = np.round(np.clip(0.25 * y + rng.uniform(0, 0.75, 200), 0, 1), 2)  # ties on purpose
    t = choose_threshold(y, p, "youden")
    m = binary_metrics(y, p, t)
    assert m["recall"] + m["specificity"] - 1 == pytest.approx(_brute_youden(y, p))
    t_f1 = choose_threshold(y, p, "f1")
    assert binary_metrics(y, p, t_f1)["f1"] == pytest.approx(_brute_f1(y, p))


def test_choose_threshold_edge_cases() -> None:
    assert choose_threshold([1, 1, 1], [0.2, 0.7, 0.9]) == 0.5
    assert choose_threshold([0, 0], [0.2, 0.7], "f1") == 0.5
    # Anti-informative scores: J is best at roc_curve's +inf threshold; it must come back finite
    # and still mean "call nothing positive".
    y, p = np.array([1, 1, 0, 0]), np.array([0.1, 0.2, 0.8, 0.9])
    t = choose_threshold(y, p, "youden")
    assert math.isfinite(t) and t > p.max()
    assert binary_metrics(y, p, t)["recall"] == 0.0
    with pytest.raises(ValueError, match="unknown threshold rule 'median'"):
        choose_threshold(y, p, "median")
    assert set(THRESHOLD_RULES) == {"youden", "f1"}


# ---------------------------------------------------------------------------
# DeLong
# ---------------------------------------------------------------------------

# Data set aSAH from the R package pROC (Robin et al. 2011; repository xrobin/pROC, file
# data/aSAH.rda): 113 patients with aneurysmal subarachnoid haemorrhage (Turck et al. 2010,
# Intensive Care Med 36:107-115); y = outcome == "Poor" (41 cases), rows in the data set's order.
# The first rows match head(aSAH) as printed in pROC tutorials (s100b 0.13 0.14 0.10 0.04 0.13
# 0.10, wfns 1 1 1 1 3 2); the transcription reproduces pROC's own fixtures to 12 digits below.
# fmt: off
ASAH_POOR = [
    0, 0, 0, 0, 1, 1, 0, 1, 0, 0, 1, 0, 1, 1, 0, 0, 1, 0, 1, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0,
    0, 0, 1, 0, 0, 1, 1, 0, 1, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0,
    1, 0, 0, 1, 1, 1, 0, 1, 1, 0, 1, 1, 1, 1, 0, 0, 0, 1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 1, 0, 0,
    0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 1, 1, 1, 1, 1, 0, 0, 0, 1, 0, 0, 0,
]
ASAH_S100B = [
    0.13, 0.14, 0.10, 0.04, 0.13, 0.10, 0.47, 0.16, 0.18, 0.10, 0.12, 0.10, 0.44, 0.71, 0.04,
    0.08, 0.49, 0.04, 0.07, 0.33, 0.09, 0.09, 0.07, 0.11, 0.07, 0.17, 0.07, 0.11, 0.13, 0.19,
    0.05, 0.16, 0.41, 0.14, 0.34, 0.35, 0.48, 0.09, 0.96, 0.25, 0.50, 0.46, 0.16, 0.07, 0.43,
    0.45, 0.11, 0.08, 0.09, 0.86, 0.52, 0.08, 0.06, 0.13, 2.07, 0.10, 0.14, 0.15, 0.07, 0.06,
    0.77, 0.05, 0.09, 0.30, 0.03, 0.09, 0.04, 0.23, 0.70, 0.09, 0.27, 0.71, 0.08, 0.26, 0.08,
    0.16, 0.09, 0.13, 0.10, 0.08, 0.11, 0.33, 0.11, 0.28, 0.07, 0.10, 0.32, 0.22, 0.07, 0.05,
    0.24, 0.38, 0.10, 0.15, 0.08, 0.14, 0.10, 0.07, 0.04, 0.19, 0.56, 0.14, 0.58, 0.32, 0.82,
    0.74, 0.15, 0.47, 0.17, 0.44, 0.15, 0.50, 0.48,
]
ASAH_WFNS = [
    1, 1, 1, 1, 3, 2, 5, 4, 1, 2, 5, 2, 5, 5, 1, 2, 5, 2, 2, 5, 2, 1, 1, 1, 1, 2, 1, 2, 1, 1,
    3, 4, 2, 1, 4, 5, 4, 1, 4, 2, 5, 5, 1, 1, 2, 4, 1, 1, 2, 5, 5, 2, 1, 2, 5, 1, 2, 2, 2, 1,
    5, 1, 1, 2, 5, 2, 1, 4, 5, 2, 4, 4, 1, 4, 1, 2, 1, 4, 2, 1, 2, 3, 2, 4, 2, 1, 4, 5, 1, 1,
    5, 4, 2, 2, 1, 1, 1, 3, 1, 2, 5, 2, 2, 5, 5, 5, 2, 4, 4, 5, 1, 1, 1,
]
# fmt: on


def test_delong_reproduces_pROC_roc_test_on_aSAH() -> None:
    # Expected values are pROC's own regression fixtures (xrobin/pROC, tests/testthat):
    #   test-var.R:      var(r.s100b) = 0.00266868245717244, var(r.wfns) = 0.00146991470882363
    #   test-cov.R:      cov(r.s100b, r.wfns) = 0.00119615567376754
    #   test-roc.test.R: roc.test(r.wfns, r.s100b): Z = 2.20898359144091,
    #                    p = 0.0271757822291882, 95% CI of the difference
    #                    [0.0104061769564846, 0.174214419249478]
    #   helper-deLongPlacementsCpp-expected.R: theta(s100b) = 0.731368563685637,
    #                    theta(wfns) = 0.823678861788618 (the AUCs)
    res = delong_test(ASAH_POOR, ASAH_WFNS, ASAH_S100B)
    assert isinstance(res, DeLongResult)
    assert res.auc_a == pytest.approx(0.823678861788618, abs=1e-12)
    assert res.auc_b == pytest.approx(0.731368563685637, abs=1e-12)
    assert round(res.auc_b, 4) == 0.7314 and round(res.auc_a, 4) == 0.8237
    assert res.diff == pytest.approx(res.auc_a - res.auc_b)
    assert res.var_a == pytest.approx(0.00146991470882363, rel=1e-12)
    assert res.var_b == pytest.approx(0.00266868245717244, rel=1e-12)
    assert res.cov_ab == pytest.approx(0.00119615567376754, rel=1e-12)
    assert res.z == pytest.approx(2.20898359144091, rel=1e-12)
    assert res.p_value == pytest.approx(0.0271757822291882, rel=1e-10)
    low, high = res.diff_ci(0.95)
    assert low == pytest.approx(0.0104061769564846, rel=1e-9)
    assert high == pytest.approx(0.174214419249478, rel=1e-9)
    # Swapping the curves flips z and keeps p (pROC: "identical p values when reversed").
    swapped = delong_test(ASAH_POOR, ASAH_S100B, ASAH_WFNS)
    assert swapped.z == pytest.approx(-res.z) and swapped.p_value == pytest.approx(res.p_value)
    assert delong_auc_variance(ASAH_POOR, ASAH_S100B) == pytest.approx(
        (0.731368563685637, 0.00266868245717244), rel=1e-12
    )


@pytest.mark.parametrize("seed", [0, 1])
def test_delong_auc_and_auroc_equal_sklearn_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, 300)
    p = np.round(0.5 * y + rng.normal(0, 1, 300), 1)  # rounded: many ties across classes
    auc, var = delong_auc_variance(y, p)
    assert auc == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert auroc(y, p) == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    assert var > 0
    assert auroc(np.ones(5, dtype=int), np.linspace(0, 1, 5)) is None


def _structural_components(y: np.ndarray, p: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """DeLong (1988) by definition: psi = 1 if case > control, 1/2 if tied, 0 otherwise."""
    cases, controls = p[y == 1], p[y == 0]
    psi = (cases[:, None] > controls[None, :]) + 0.5 * (cases[:, None] == controls[None, :])
    return psi.mean(axis=1), psi.mean(axis=0)  # V10 per case, V01 per control


def test_delong_variance_and_covariance_match_brute_force_structural_components() -> None:
    y = np.array([1, 0, 1, 1, 0, 0, 1, 0, 0, 1])
    a = np.array([0.9, 0.3, 0.6, 0.3, 0.6, 0.1, 0.8, 0.3, 0.2, 0.5])  # ties within and across
    b = np.array([0.7, 0.7, 0.4, 0.9, 0.2, 0.2, 0.6, 0.5, 0.1, 0.3])
    m, n = int(y.sum()), int((1 - y).sum())
    v10a, v01a = _structural_components(y, a)
    v10b, v01b = _structural_components(y, b)
    var_a = np.var(v10a, ddof=1) / m + np.var(v01a, ddof=1) / n
    var_b = np.var(v10b, ddof=1) / m + np.var(v01b, ddof=1) / n
    cov_ab = np.cov(v10a, v10b)[0, 1] / m + np.cov(v01a, v01b)[0, 1] / n
    auc, var = delong_auc_variance(y, a)
    assert auc == pytest.approx(v10a.mean(), abs=1e-15)
    assert var == pytest.approx(var_a, rel=1e-12)
    res = delong_test(y, a, b)
    assert (res.var_a, res.var_b, res.cov_ab) == pytest.approx((var_a, var_b, cov_ab), rel=1e-12)
    z = (v10a.mean() - v10b.mean()) / math.sqrt(var_a + var_b - 2 * cov_ab)
    assert res.z == pytest.approx(z, rel=1e-12)
    assert res.p_value == pytest.approx(2 * sps.norm.sf(abs(z)), rel=1e-12)


def test_delong_identical_curves_and_bad_input() -> None:
    same = delong_test(ASAH_POOR, ASAH_WFNS, ASAH_WFNS)
    assert same.z == 0.0 and same.p_value == 1.0 and same.diff == 0.0
    with pytest.raises(ValueError, match="both classes"):
        delong_test([1, 1, 1], [0.1, 0.2, 0.3], [0.3, 0.2, 0.1])
    with pytest.raises(ValueError, match="both classes"):
        delong_auc_variance([0, 0, 0], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="same length"):
        delong_test([0, 1, 0, 1], [0.1, 0.2, 0.3, 0.4], [0.1, 0.2, 0.3])
    with pytest.raises(ValueError, match="at least 2 positives"):
        delong_auc_variance([0, 0, 1], [0.1, 0.2, 0.3])


# ---------------------------------------------------------------------------
# bootstrap over patients
# ---------------------------------------------------------------------------


def _clustered(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """30 patients x 20 near-identical images: labels and scores are per patient."""
    rng = np.random.default_rng(seed)
    n_patients, per = 30, 20
    y_patient = np.repeat([0, 1], n_patients // 2)
    s_patient = 0.8 * y_patient + rng.normal(0, 1, n_patients)
    y = np.repeat(y_patient, per)
    p = np.repeat(s_patient, per) + rng.normal(0, 1e-3, n_patients * per)
    groups = np.repeat([f"P{k:03d}" for k in range(n_patients)], per)
    return y, p, groups


def test_bootstrap_patient_ci_is_wider_than_image_ci() -> None:
    y, p, groups = _clustered()
    point = roc_auc_score(y, p)
    lo_p, hi_p = bootstrap_ci(auroc, y, p, groups, n_boot=300, seed=1)
    lo_i, hi_i = bootstrap_ci(auroc, y, p, np.arange(y.size), n_boot=300, seed=1)
    assert lo_p < point < hi_p and lo_i < point < hi_i
    # 20 copies of each patient make image-level resampling ~sqrt(20) times too confident.
    assert (hi_p - lo_p) > 2.5 * (hi_i - lo_i)
    assert (hi_p - lo_p) - (hi_i - lo_i) > 0.1


def test_bootstrap_takes_whole_patients_and_duplicates_them() -> None:
    # Patient k has k + 1 images; every replicate must hold whole patients (a multiple of
    # k + 1 rows of patient k) and exactly as many patients as there are.
    sizes = np.arange(1, 9)
    groups = np.repeat(np.arange(8) * 10, sizes)  # ids need not be 0..G-1
    y = np.zeros(groups.size)
    seen_duplicate = []

    def check(yb: np.ndarray, pb: np.ndarray) -> float:
        ids, counts = np.unique(pb, return_counts=True)
        draws = counts / sizes[(ids // 10).astype(int)]
        assert np.all(draws == np.round(draws)), "a patient was split"
        assert draws.sum() == 8
        seen_duplicate.append(bool(draws.max() > 1))
        return float(len(yb))

    bootstrap_ci(check, y, groups.astype(float), groups, n_boot=50, seed=0)
    assert any(seen_duplicate)


def test_bootstrap_is_deterministic_for_a_seed() -> None:
    y, p, groups = _clustered(seed=2)
    a = bootstrap_ci(auroc, y, p, groups, n_boot=100, seed=7)
    b = bootstrap_ci(auroc, y, p, groups, n_boot=100, seed=7)
    c = bootstrap_ci(auroc, y, p, groups, n_boot=100, seed=8)
    assert a == b
    assert a != c


def test_bootstrap_skips_undefined_replicates_up_to_half() -> None:
    # One positive patient among 40: about (39/40)**40 = 36% of replicates miss it (AUROC
    # undefined); those are skipped and the CI still comes back.
    y = np.zeros(40, dtype=int)
    y[0] = 1
    p = np.random.default_rng(3).random(40)  # the positive's rank varies between replicates
    low, high = bootstrap_ci(auroc, y, p, np.arange(40), n_boot=200, seed=0)
    # by hand: one row per patient, 40 draws with replacement per replicate from
    # default_rng(seed); replicates without the positive are left out, not counted as 0 or 1
    rng = np.random.default_rng(0)
    draws = [rng.integers(0, 40, size=40) for _ in range(200)]
    kept = [roc_auc_score(y[rows], p[rows]) for rows in draws if y[rows].any()]
    assert 0.25 * 200 < 200 - len(kept) < 0.5 * 200  # about 36% skipped
    assert (low, high) == pytest.approx(tuple(np.quantile(kept, [0.025, 0.975])), abs=1e-12)
    assert low < high
    with pytest.raises(ValueError, match="200 of 200 bootstrap replicates"):
        bootstrap_ci(lambda yb, pb: float("nan"), y, p, np.arange(40), n_boot=200)
    with pytest.raises(ValueError, match="one id per row"):
        bootstrap_ci(auroc, y, p, np.arange(39))


# ---------------------------------------------------------------------------
# across seeds
# ---------------------------------------------------------------------------


def test_paired_ttest_matches_scipy_and_returns_none_when_undefined() -> None:
    a = [0.812, 0.825, 0.807, 0.831, 0.819]
    b = [0.801, 0.809, 0.806, 0.815, 0.800]
    res = sps.ttest_rel(a, b)
    assert paired_ttest(a, b) == pytest.approx((res.statistic, res.pvalue))
    assert paired_ttest([0.8], [0.7]) is None
    assert paired_ttest([0.8, 0.9, 0.7], [0.7, 0.8, 0.6]) is None  # constant difference
    assert paired_ttest([0.8, 0.9], [0.8, 0.9]) is None  # all differences zero
    with pytest.raises(ValueError, match="paired"):
        paired_ttest([0.8, 0.9], [0.8])


def test_mean_std_uses_sample_std() -> None:
    assert mean_std([1.0, 2.0, 3.0, 4.0]) == pytest.approx((2.5, np.std([1, 2, 3, 4], ddof=1)))
    assert mean_std([0.83]) == (0.83, 0.0)
    with pytest.raises(ValueError, match="at least one"):
        mean_std([])


def test_detectable_difference_is_2_8_standard_errors() -> None:
    from fedcxr.evaluation.bootstrap import detectable_difference

    rng = np.random.default_rng(0)
    diffs = rng.normal(0.01, 0.02, size=20_000)
    # z_0.975 + z_0.8 = 1.960 + 0.842 = 2.802
    assert detectable_difference(diffs) == pytest.approx(2.802 * 0.02, rel=0.02)
    assert detectable_difference(np.full(10, np.nan)) is None
