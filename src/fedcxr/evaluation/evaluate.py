"""Every trained model on the held-out test set: metrics with patient-bootstrap CIs, comparisons.

Pure core (arrays in, numbers out) first, then a thin I/O driver that reads the run layout of
`fedcxr.runs`, predicts, and hands arrays to the core.

Rules that make the numbers honest:

- Operating thresholds are chosen per label on VALIDATION predictions (a local run: its own
  site's validation split; every other run: the pooled validation splits of all sites), never
  on the test set.
- Confidence intervals resample test PATIENTS (all images of a drawn patient come along), with
  the same replicate draws as `stats.bootstrap_ci` for the same seed. Every configuration uses
  the same seed, hence the same replicates, so differences between configurations are paired.
- With several training seeds the point estimate is the mean over seeds of the per-seed value,
  and each bootstrap replicate computes that same seed-averaged value on the resampled test set:
  the CI is test-set sampling uncertainty of the seed-averaged metric; `_std` is the spread over
  seeds (training noise).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from numpy.typing import NDArray
from sklearn.metrics import roc_curve
from torch import nn

from fedcxr.evaluation.stats import (
    METRIC_KEYS,
    _group_index,
    _resample_rows,
    choose_threshold,
    delong_test,
    mean_std,
    multilabel_metrics,
    paired_ttest,
)
from fedcxr.models import build_model, num_classes_for
from fedcxr.runs import MODEL, RunCard, find_runs, read_card, read_run
from fedcxr.sitedata import SiteData
from fedcxr.train.data import PNEUMONIA, TASKS, XrayDataset, label_columns, make_loader
from fedcxr.train.loop import load_plain_state_dict, predict

FloatArray = NDArray[np.float64]
IntArray = NDArray[np.int64]

N_BOOT = 1000
THRESHOLD_RULE = "youden"
ALPHA = 0.05
BOOT_CHUNK = 100  # replicates held in memory at once (100 x 10k test images x 8 bytes = 8 MB)
ROC_POINTS = 200
GRADCAM_IMAGES = 6
LOCAL_PREFIX = "local_"
# Every metric reported with _lo/_hi/_std; the macro ones average over the evaluated labels.
REPORTED = ("auroc_macro", *METRIC_KEYS, "sensitivity_pneumonia", "specificity_pneumonia")


# ---------------------------------------------------------------------------
# thresholds (validation only)
# ---------------------------------------------------------------------------


def label_thresholds(
    y_val: np.ndarray, p_val: np.ndarray, rule: str = THRESHOLD_RULE
) -> FloatArray:
    """One operating threshold per label column, chosen by `rule` on VALIDATION predictions."""
    y = np.asarray(y_val)
    p = np.asarray(p_val, dtype=np.float64)
    if y.ndim != 2 or p.shape != y.shape:
        raise ValueError(
            f"expected validation labels and probabilities of one shape (rows, labels), found "
            f"{y.shape} and {p.shape}"
        )
    if y.shape[0] == 0:
        raise ValueError("expected validation rows to choose thresholds on, found none")
    return np.array(
        [choose_threshold(y[:, j], p[:, j], rule) for j in range(y.shape[1])], dtype=np.float64
    )


# ---------------------------------------------------------------------------
# bootstrap replicates as case weights
# ---------------------------------------------------------------------------


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
    order, starts, counts = _group_index(groups, n)
    if counts.size == 0:
        raise ValueError("the bootstrap needs at least one test row, found 0")
    rng = np.random.default_rng(seed)
    done = 0
    while done < n_boot:
        b = min(chunk, n_boot - done)
        weights = np.empty((b, n), dtype=np.float64)
        for i in range(b):
            weights[i] = np.bincount(_resample_rows(rng, order, starts, counts), minlength=n)
        done += b
        yield weights


@dataclass(frozen=True)
class _AurocPlan:
    """Per column, what a weighted AUROC needs: positives and each one's rank among negatives."""

    pos: IntArray
    neg_order: IntArray  # negative rows sorted by score
    lo: IntArray  # per positive: negatives with a strictly lower score
    hi: IntArray  # per positive: negatives with a lower or equal score


def _auroc_plan(y: np.ndarray, p: np.ndarray) -> _AurocPlan | None:
    pos = np.flatnonzero(y == 1)
    neg = np.flatnonzero(y == 0)
    if pos.size == 0 or neg.size == 0:
        return None
    neg_order = neg[np.argsort(p[neg], kind="stable")]
    neg_scores = p[neg_order]
    lo = np.searchsorted(neg_scores, p[pos], side="left")
    hi = np.searchsorted(neg_scores, p[pos], side="right")
    return _AurocPlan(pos, neg_order, lo, hi)


def _plan_auroc(plan: _AurocPlan | None, weights: FloatArray) -> FloatArray:
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
    return _plan_auroc(_auroc_plan(y, p), w)


def _safe_ratio(num: FloatArray, den: FloatArray, fill: float = 0.0) -> FloatArray:
    return np.divide(num, den, out=np.full(np.broadcast(num, den).shape, fill), where=den > 0)


def replicate_metrics(
    Y: np.ndarray,
    P: np.ndarray,
    thresholds: np.ndarray,
    weights: np.ndarray,
    pneumonia: int | None = None,
    plans: Sequence[_AurocPlan | None] | None = None,
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
        plans = [_auroc_plan(Y[:, j], P[:, j]) for j in range(n_labels)]
    per_label["auroc_macro"] = np.column_stack([_plan_auroc(plan, W) for plan in plans])
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


# ---------------------------------------------------------------------------
# one configuration, comparisons between two
# ---------------------------------------------------------------------------


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
    plans = [[_auroc_plan(Y[:, j], run.probs[:, j]) for j in range(Y.shape[1])] for run in runs]
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


# ---------------------------------------------------------------------------
# ROC points, efficiency, JSON
# ---------------------------------------------------------------------------


def thin_curve(
    fpr: np.ndarray, tpr: np.ndarray, max_points: int = ROC_POINTS
) -> tuple[FloatArray, FloatArray]:
    """At most max_points of a curve, evenly spaced along its length, both ends kept."""
    x = np.asarray(fpr, dtype=np.float64)
    y = np.asarray(tpr, dtype=np.float64)
    if x.size <= max_points:
        return x, y
    if max_points < 2:
        raise ValueError(f"expected max_points >= 2, found {max_points}")
    length = np.concatenate(([0.0], np.cumsum(np.hypot(np.diff(x), np.diff(y)))))
    targets = np.linspace(0.0, length[-1], max_points)
    keep = np.unique(np.clip(np.searchsorted(length, targets), 0, x.size - 1))
    keep = np.union1d(keep, [0, x.size - 1])
    return x[keep], y[keep]


def roc_points(
    Y: np.ndarray, P: np.ndarray, max_points: int = ROC_POINTS
) -> tuple[FloatArray, FloatArray]:
    """ROC curve (fpr, tpr) by sklearn's roc_curve: of the one column for a single label,
    else micro-averaged over the labels with both classes; thinned to max_points."""
    Y = np.asarray(Y)
    P = np.asarray(P, dtype=np.float64)
    evaluated = [j for j in range(Y.shape[1]) if 0 < Y[:, j].sum() < Y.shape[0]]
    if not evaluated:
        raise ValueError("expected a label with both classes in the test set for an ROC curve")
    fpr, tpr, _ = roc_curve(Y[:, evaluated].ravel(), P[:, evaluated].ravel())
    return thin_curve(fpr, tpr, max_points)


def _mean_number(values: Sequence[float]) -> float | int:
    mean = float(np.mean(values))
    return int(values[0]) if all(v == values[0] for v in values) and mean.is_integer() else mean


def efficiency_entry(cards: Sequence[RunCard]) -> dict[str, Any]:
    """Training cost of one configuration (Table 3), mean over its seeds' run cards."""
    if not cards:
        raise ValueError("expected at least one run card, found none")
    kinds = sorted({c.comm_kind for c in cards})
    if len(kinds) != 1:
        raise ValueError(
            f"{cards[0].config}/{cards[0].task}: expected one comm_kind across seeds, found {kinds}"
        )
    out: dict[str, Any] = {
        key: _mean_number([float(getattr(c, key)) for c in cards])
        for key in ("time_per_epoch_s", "epochs", "train_wall_s", "comm_bytes", "world_size")
    }
    out["time_per_epoch_s"] = float(out["time_per_epoch_s"])
    out["train_wall_s"] = float(out["train_wall_s"])
    out["comm_kind"] = kinds[0]
    out["n_seeds"] = len(cards)
    return out


def strict_json(data: Any) -> Any:
    """`data` with every NaN/inf float replaced by None (JSON has no NaN) and numpy scalars
    turned into Python numbers."""
    if isinstance(data, Mapping):
        return {str(k): strict_json(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [strict_json(v) for v in data]
    if isinstance(data, np.generic):
        data = data.item()
    if isinstance(data, float) and not math.isfinite(data):
        return None
    return data


def gradcam_pick(
    y_pneumonia: np.ndarray, p_pneumonia: np.ndarray, n: int = GRADCAM_IMAGES
) -> tuple[IntArray, bool]:
    """(rows, positive): the first n pneumonia-positive test rows, or when there are none the
    n highest-scoring rows (positive=False, so the panel can say so)."""
    y = np.asarray(y_pneumonia)
    positives = np.flatnonzero(y == 1)
    if positives.size:
        return positives[:n].astype(np.int64), True
    order = np.argsort(-np.asarray(p_pneumonia, dtype=np.float64), kind="stable")
    return order[:n].astype(np.int64), False


# ---------------------------------------------------------------------------
# I/O driver: run folders -> predictions -> results
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GradcamPlan:
    """Which model and test images one task's Grad-CAM panel shows."""

    folder: Path  # run folder of the federated model (first seed)
    rows: IntArray  # rows of the test split (positions in the test dataset)
    titles: tuple[str, ...]
    target_class: int  # output column of Pneumonia


@dataclass
class Evaluation:
    """What the evaluate stage writes."""

    metrics: dict[str, Any]  # config -> task -> metrics, plus "comparisons": task -> pair -> …
    efficiency: dict[str, Any]  # config -> task -> cost
    roc: dict[str, dict[str, tuple[FloatArray, FloatArray]]]  # task -> config -> (fpr, tpr)
    gradcam: dict[str, GradcamPlan] = field(default_factory=dict)  # task -> plan
    thresholds: dict[str, Any] = field(default_factory=dict)  # config -> task -> seed -> list


def collect_runs(models: Path) -> dict[tuple[str, str], list[tuple[RunCard, Path]]]:
    """Run folders under `models` grouped by (task, config), each list sorted by seed."""
    grouped: dict[tuple[str, str], list[tuple[RunCard, Path]]] = {}
    for folder in find_runs(models):
        card = read_card(folder)
        if card.task not in TASKS:
            raise ValueError(
                f"{folder}/run.json: expected task in {list(TASKS)}, found {card.task}"
            )
        grouped.setdefault((card.task, card.config), []).append((card, folder))
    for (task, config), runs in grouped.items():
        seeds = [c.seed for c, _ in runs]
        if len(set(seeds)) != len(seeds):
            raise ValueError(
                f"under {models}: expected one run per seed for {config}/{task}, found seeds "
                f"{sorted(seeds)} in {[str(f) for _, f in runs]}"
            )
        runs.sort(key=lambda item: item[0].seed)
    return dict(sorted(grouped.items()))


def load_model(folder: Path, device: torch.device) -> tuple[nn.Module, RunCard]:
    """A run's model (architecture from its card) with its weights, in eval mode."""
    state, card = read_run(folder)
    model = build_model(
        card.arch, num_classes_for(card.task), pretrained=False, dp_safe=card.dp_safe
    )
    try:
        load_plain_state_dict(model, state)
    except RuntimeError as exc:
        raise ValueError(
            f"{Path(folder) / MODEL}: expected weights of {card.arch} (dp_safe={card.dp_safe}) "
            f"for task {card.task}, found a state dict that does not fit: {exc}"
        ) from None
    return model.to(device).eval(), card


def open_sites(sites_dir: Path) -> dict[str, SiteData]:
    """Every site folder (holding index.csv) under sites_dir, by name, sorted."""
    folders = sorted(p for p in Path(sites_dir).iterdir() if (p / "index.csv").is_file())
    if not folders:
        raise FileNotFoundError(
            f"no site folders (with index.csv) under {sites_dir}: expected the partition "
            "stage's data/sites/site-*"
        )
    return {p.name: SiteData.open(p) for p in folders}


def _split(sites: Sequence[SiteData], split: str, task: str, image_size: int) -> XrayDataset:
    """All rows of `split` in `sites`, pooled; an error naming the index files if none."""
    if sum(site.rows(split).size for site in sites) == 0:
        where = ", ".join(str(site.folder / "index.csv") for site in sites)
        why = " (thresholds are chosen on validation data, never on the test set)"
        raise ValueError(
            f"{where}: expected rows with split {split!r}, found none"
            + (why if split == "val" else "")
        )
    return XrayDataset.from_split(sites, split, task, image_size)


class _Predictor:
    """Test and validation datasets (built once per task and image size) and predictions."""

    def __init__(
        self,
        test: SiteData,
        sites: dict[str, SiteData],
        batch_size: int,
        num_workers: int,
        device: torch.device,
    ) -> None:
        self.test, self.sites = test, sites
        self.batch_size, self.num_workers, self.device = batch_size, num_workers, device
        self._datasets: dict[tuple[str, str, int], XrayDataset] = {}

    def dataset(self, key: str, task: str, image_size: int) -> XrayDataset:
        """key: 'test' (the test split), 'pooled' (every site's val split) or a site name."""
        if (key, task, image_size) not in self._datasets:
            if key == "test":
                folders, split = [self.test], "test"
            elif key == "pooled":
                folders, split = list(self.sites.values()), "val"
            else:
                folders, split = [self.sites[key]], "val"
            self._datasets[key, task, image_size] = _split(folders, split, task, image_size)
        return self._datasets[key, task, image_size]

    def probs(self, model: nn.Module, data: XrayDataset) -> FloatArray:
        loader = make_loader(data, self.batch_size, shuffle=False, num_workers=self.num_workers)
        p, _ = predict(model, loader, self.device)
        return np.asarray(p, dtype=np.float64).reshape(len(data), -1)

    def seed_run(self, folder: Path, val_key: str, rule: str) -> tuple[SeedRun, np.ndarray]:
        """(test probabilities + validation thresholds of one run, the test labels)."""
        model, card = load_model(folder, self.device)
        test = self.dataset("test", card.task, card.image_size)
        val = self.dataset(val_key, card.task, card.image_size)
        thresholds = label_thresholds(val.labels, self.probs(model, val), rule)
        run = SeedRun(card.seed, self.probs(model, test), thresholds)
        return run, test.labels.astype(np.int64)


def _validation_key(config: str, sites: Collection[str], where: Path) -> str:
    """Whose validation split sets a configuration's thresholds: its own site, or all pooled."""
    if not config.startswith(LOCAL_PREFIX):
        return "pooled"
    site = config.removeprefix(LOCAL_PREFIX)
    if site not in sites:
        raise FileNotFoundError(
            f"{where}: a local run of site {site!r}, but there is no such site folder "
            f"(found {sorted(sites)})"
        )
    return site


def evaluate_all(
    models: Path,
    test_dir: Path,
    sites_dir: Path,
    *,
    batch_size: int,
    num_workers: int = 0,
    seed: int = 0,
    n_boot: int = N_BOOT,
    threshold_rule: str = THRESHOLD_RULE,
    alpha: float = ALPHA,
    device: torch.device | None = None,
) -> Evaluation:
    """Predict every run under `models` on the test split of `test_dir`, choose thresholds on
    validation splits under `sites_dir`, and compute metrics, comparisons, efficiency, ROC."""
    grouped = collect_runs(models)
    if not grouped:
        raise FileNotFoundError(
            f"no trained runs (run.json) under {models}: expected "
            "models/<family>/<task>/s<seed>/ from the training stages"
        )
    test = SiteData.open(test_dir)
    sites = open_sites(sites_dir)
    predictor = _Predictor(test, sites, batch_size, num_workers, device or torch.device("cpu"))
    test_index = test.index.iloc[test.rows("test")]
    groups = test_index["patient_id"].to_numpy()
    result = Evaluation(metrics={}, efficiency={}, roc={})
    for task in TASKS:
        names = label_columns(task)
        if not any(len(np.unique(test_index[name].to_numpy())) == 2 for name in names):
            # A small test set can lack positives entirely (e.g. pneumonia in a few hundred
            # images): no metric of this task is defined, so it is left out, and said so.
            print(
                f"evaluate: skipping task {task!r}: no label in {test_dir} has both classes "
                f"({len(test_index)} test images); enlarge the test set or enrich the data",
                file=sys.stderr,
            )
            continue
        configs: dict[str, ConfigResult] = {}
        Y = np.zeros((0, len(names)), dtype=np.int64)
        for config, runs in [(c, r) for (t, c), r in grouped.items() if t == task]:
            val_key = _validation_key(config, sites, runs[0][1])
            seed_runs = []
            for _, folder in runs:
                run, Y = predictor.seed_run(folder, val_key, threshold_rule)
                seed_runs.append(run)
                thresholds = result.thresholds.setdefault(config, {}).setdefault(task, {})
                thresholds[f"s{run.seed}"] = run.thresholds.tolist()
            try:
                configs[config] = evaluate_config(
                    Y, groups, seed_runs, names, n_boot=n_boot, seed=seed, alpha=alpha
                )
            except ValueError as exc:
                raise ValueError(f"{config}/{task} on {test_dir}: {exc}") from None
            result.metrics.setdefault(config, {})[task] = configs[config].metrics
            result.efficiency.setdefault(config, {})[task] = efficiency_entry([c for c, _ in runs])
            result.roc.setdefault(task, {})[config] = roc_points(Y, configs[config].mean_probs)
            if config == "federated":
                result.gradcam[task] = _gradcam_plan(runs[0][1], seed_runs[0], Y, names, test_index)
        if configs:
            result.metrics.setdefault("comparisons", {})[task] = {
                f"{a}_vs_{b}": compare_configs(configs[a], configs[b], Y, names, alpha)
                for a, b in comparison_pairs(configs)
            }
    result.metrics = strict_json(result.metrics)
    result.efficiency = strict_json(result.efficiency)
    return result


def _gradcam_plan(
    folder: Path,
    seed_run: SeedRun,
    Y: np.ndarray,
    names: Sequence[str],
    test_index: pd.DataFrame,
) -> GradcamPlan:
    k = list(names).index(PNEUMONIA)
    rows, positive = gradcam_pick(Y[:, k], seed_run.probs[:, k])
    ids = test_index["image_id"].to_numpy()
    note = "" if positive else "\ntop score; no positive in test set"
    titles = tuple(f"{ids[r]} p={seed_run.probs[r, k]:.2f}{note}" for r in rows.tolist())
    return GradcamPlan(folder, rows, titles, k)


def write_gradcam(
    plan: GradcamPlan, test_dir: Path, out_png: Path, device: torch.device | None = None
) -> None:
    """Render one task's Grad-CAM panel (the federated model on the chosen test images)."""
    from fedcxr.report.gradcam import gradcam_panel

    model, card = load_model(plan.folder, device or torch.device("cpu"))
    test = SiteData.open(test_dir)
    images = np.asarray(test.images[test.rows("test")[plan.rows]])
    gradcam_panel(
        model,
        card.arch,
        images,
        plan.target_class,
        out_png,
        titles=plan.titles,
        image_size=card.image_size,
    )


def write_roc(roc: Mapping[str, Mapping[str, tuple[np.ndarray, np.ndarray]]], out: Path) -> None:
    """ROC points as out/<task>/<config>.csv with columns fpr,tpr."""
    for task, curves in sorted(roc.items()):
        for config, (fpr, tpr) in sorted(curves.items()):
            path = Path(out) / task / f"{config}.csv"
            path.parent.mkdir(parents=True, exist_ok=True)
            frame = pd.DataFrame({"fpr": fpr, "tpr": tpr})
            frame.to_csv(path, index=False, float_format="%.6f", lineterminator="\n")
