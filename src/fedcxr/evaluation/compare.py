"""Per-configuration test results (seed-averaged metrics with bootstrap CIs) and comparisons.

With several training seeds the point estimate is the mean over seeds of the per-seed value, and
each bootstrap replicate computes that same seed-averaged value on the resampled test set: the CI
is test-set sampling uncertainty of the seed-averaged metric; `_std` is the spread over seeds
(training noise). All configurations share the replicates of `bootstrap`, so comparisons are
paired.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from fedcxr.evaluation.bootstrap import (
    ALPHA,
    N_BOOT,
    auroc_plan,
    bootstrap_p,
    detectable_difference,
    percentile_ci,
    replicate_metrics,
    replicate_weights,
)
from fedcxr.evaluation.stats import (
    METRIC_KEYS,
    FloatArray,
    delong_test,
    mean_std,
    multilabel_metrics,
    paired_ttest,
)
from fedcxr.train.data import PNEUMONIA

LOCAL_PREFIX = "local_"
# Every metric reported with _lo/_hi/_std; the macro ones average over the evaluated labels.
REPORTED = ("auroc_macro", *METRIC_KEYS, "sensitivity_pneumonia", "specificity_pneumonia")


@dataclass(frozen=True)
class SeedRun:
    """One trained run's test probabilities (n x labels) and its validation thresholds."""

    seed: int
    probs: FloatArray
    thresholds: FloatArray


@dataclass(frozen=True)
class ConfigResult:
    """A configuration's metrics.json entry and what comparisons with it need."""

    metrics: dict[str, Any]
    seeds: tuple[int, ...]
    seed_auroc: FloatArray  # (S,) per-seed macro AUROC, in `seeds` order
    boot_auroc: FloatArray  # (B,) seed-averaged macro AUROC per replicate (NaN: undefined)
    mean_probs: FloatArray  # (n, labels) test probabilities averaged over seeds
    boot_key: tuple[int, int, int]  # (n_boot, bootstrap seed, n test rows): pairs replicates


def _value(x: float | None) -> float | None:
    return None if x is None or not math.isfinite(x) else float(x)


def evaluate_config(
    Y: np.ndarray,
    groups: np.ndarray,
    runs: Sequence[SeedRun],
    names: Sequence[str],
    *,
    n_boot: int = N_BOOT,
    seed: int = 0,
    alpha: float = ALPHA,
) -> ConfigResult:
    """Metrics of one configuration (one or more seeds) on the test labels Y (n x labels).

    Point estimates: mean over seeds of `stats.multilabel_metrics` at each seed's thresholds
    (one label is the binary case). `_lo`/`_hi`: patient-bootstrap percentile CI of that
    seed-averaged value; `_std`: sample std over seeds (0 for one seed).
    """
    Y = np.asarray(Y)
    if Y.ndim != 2 or Y.shape[1] != len(names):
        raise ValueError(f"expected test labels (n, {len(names)}), found shape {Y.shape}")
    if not runs:
        raise ValueError("expected at least one seed's predictions, found none")
    for run in runs:
        if run.probs.shape != Y.shape or run.thresholds.shape != (Y.shape[1],):
            raise ValueError(
                f"seed {run.seed}: expected probabilities {Y.shape} and {Y.shape[1]} thresholds,"
                f" found {run.probs.shape} and {run.thresholds.shape}"
            )
    runs = sorted(runs, key=lambda r: r.seed)
    k = list(names).index(PNEUMONIA) if PNEUMONIA in names else None
    has_pos = k is not None and bool(Y[:, k].any())
    has_neg = k is not None and bool((Y[:, k] == 0).any())

    per_seed: dict[str, list[float]] = {key: [] for key in REPORTED}
    label_auroc: list[list[float | None]] = []
    for run in runs:
        ml = multilabel_metrics(Y, run.probs, run.thresholds)
        per_seed["auroc_macro"].append(ml["macro"]["auroc"])
        for key in METRIC_KEYS:
            per_seed[key].append(ml["macro"][key])
        if k is not None:
            per_seed["sensitivity_pneumonia"].append(ml["per_label"][k]["recall"])
            per_seed["specificity_pneumonia"].append(ml["per_label"][k]["specificity"])
        label_auroc.append([entry["auroc"] for entry in ml["per_label"]])

    chunks: dict[str, list[FloatArray]] = {}
    plans = [[auroc_plan(Y[:, j], run.probs[:, j]) for j in range(Y.shape[1])] for run in runs]
    for weights in replicate_weights(groups, n_boot, seed):
        reps = [
            replicate_metrics(Y, run.probs, run.thresholds, weights, k, plan)
            for run, plan in zip(runs, plans, strict=True)
        ]
        for key in reps[0]:
            chunks.setdefault(key, []).append(np.mean([r[key] for r in reps], axis=0))
    boot = {key: np.concatenate(parts) for key, parts in chunks.items()}

    metrics: dict[str, Any] = {}
    for key in REPORTED:
        undefined = (
            not per_seed[key]
            or (key == "sensitivity_pneumonia" and not has_pos)
            or (key == "specificity_pneumonia" and not has_neg)
        )
        if not undefined:
            mean, std = mean_std(per_seed[key])
            lo, hi = percentile_ci(boot[key], alpha)
        else:
            mean = std = lo = hi = None
        metrics.update(
            {key: _value(mean), f"{key}_lo": lo, f"{key}_hi": hi, f"{key}_std": _value(std)}
        )
    metrics["auroc"] = {
        name: (
            None
            if any(v[j] is None for v in label_auroc)
            else float(np.mean([v[j] for v in label_auroc]))
        )
        for j, name in enumerate(names)
    }
    metrics["n_seeds"] = len(runs)
    metrics["n_test_images"] = int(Y.shape[0])
    metrics["n_test_patients"] = int(np.unique(np.asarray(groups)).size)
    return ConfigResult(
        metrics=metrics,
        seeds=tuple(r.seed for r in runs),
        seed_auroc=np.asarray(per_seed["auroc_macro"], dtype=np.float64),
        boot_auroc=boot["auroc_macro"],
        mean_probs=np.mean([r.probs for r in runs], axis=0),
        boot_key=(n_boot, seed, int(Y.shape[0])),
    )


def compare_configs(
    a: ConfigResult, b: ConfigResult, Y: np.ndarray, names: Sequence[str], alpha: float = ALPHA
) -> dict[str, Any]:
    """a vs b on the same test set: macro AUROC difference, its paired bootstrap CI and p,
    DeLong's test, and a paired t-test over common training seeds.

    DeLong's test compares two AUROCs of ONE binary label; there is no standard DeLong test for
    a macro (label-averaged) AUROC. For a single-label task it runs on that label (the mean
    over seeds of the probabilities) as `delong_z`/`delong_p`; for a multi-label task
    `delong_z`/`delong_p` stay null and the Pneumonia label's test is reported as
    `delong_z_pneumonia`/`delong_p_pneumonia`. The macro difference is judged by the paired
    patient bootstrap (`bootstrap_p`, `auroc_diff_lo/_hi`) and, with 2+ common seeds,
    `ttest_p`.
    """
    if a.boot_key != b.boot_key:
        raise ValueError(
            f"expected both configurations bootstrapped on the same replicates (n_boot, seed, "
            f"test rows), found {a.boot_key} and {b.boot_key}"
        )
    diff = _value(
        None
        if a.metrics["auroc_macro"] is None or b.metrics["auroc_macro"] is None
        else a.metrics["auroc_macro"] - b.metrics["auroc_macro"]
    )
    diffs = a.boot_auroc - b.boot_auroc
    lo, hi = percentile_ci(diffs, alpha)
    out: dict[str, Any] = {
        "auroc_diff": diff,
        "auroc_diff_lo": lo,
        "auroc_diff_hi": hi,
        "bootstrap_p": bootstrap_p(diffs),
        # the smallest difference this test set detects (paired, two-sided, 80% power)
        "mdd_80": detectable_difference(diffs, alpha),
        "delong_z": None,
        "delong_p": None,
    }
    if PNEUMONIA in names:
        k = list(names).index(PNEUMONIA)
        try:
            result = delong_test(Y[:, k], a.mean_probs[:, k], b.mean_probs[:, k])
            z, p = _value(result.z), _value(result.p_value)
        except ValueError:  # too few positives or negatives for DeLong's variance
            z = p = None
        if len(names) == 1:
            out["delong_z"], out["delong_p"] = z, p
        else:
            out["delong_z_pneumonia"], out["delong_p_pneumonia"] = z, p
    common = sorted(set(a.seeds) & set(b.seeds))
    test = paired_ttest(
        [float(a.seed_auroc[a.seeds.index(s)]) for s in common],
        [float(b.seed_auroc[b.seeds.index(s)]) for s in common],
    )
    out["ttest_t"] = None if test is None else _value(test[0])
    out["ttest_p"] = None if test is None else _value(test[1])
    out["n_paired_seeds"] = len(common)
    return out


def comparison_pairs(configs: Collection[str]) -> list[tuple[str, str]]:
    """(a, b) pairs to compare: federated vs single_node, centralized and each local site;
    federated_dp vs federated. Only pairs whose two configurations are both present."""
    pairs: list[tuple[str, str]] = []
    if "federated" in configs:
        local = sorted(c for c in configs if c.startswith(LOCAL_PREFIX))
        pairs += [("federated", c) for c in ("single_node", "centralized", *local) if c in configs]
        if "federated_dp" in configs:
            pairs.append(("federated_dp", "federated"))
    return pairs
