"""Evaluate stage driver: every trained run predicted on the held-out test set, then scored.

Reads the run layout of `fedcxr.runs`, predicts, chooses thresholds, and hands arrays to
`compare` (per-configuration metrics with patient-bootstrap CIs, and comparisons); also ROC
points, training cost and the Grad-CAM plan.

Operating thresholds are chosen per label on VALIDATION predictions (a local run: its own site's
validation split; every other run: the pooled validation splits of all sites), never on the test
set.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from sklearn.metrics import roc_curve
from torch import nn

from fedcxr.evaluation.bootstrap import ALPHA, N_BOOT
from fedcxr.evaluation.compare import (
    LOCAL_PREFIX,
    ConfigResult,
    SeedRun,
    compare_configs,
    comparison_pairs,
    evaluate_config,
)
from fedcxr.evaluation.stats import FloatArray, IntArray, choose_threshold
from fedcxr.evaluation.training import curves_json, rounds_to_reach, training_entry
from fedcxr.models import build_model, num_classes_for
from fedcxr.runs import MODEL, RunCard, find_runs, read_card, read_run
from fedcxr.sitedata import SiteData, find_sites
from fedcxr.train.data import PNEUMONIA, TASKS, XrayDataset, label_columns, make_loader
from fedcxr.train.loop import load_plain_state_dict, predict

THRESHOLD_RULE = "youden"
ROC_POINTS = 200
GRADCAM_IMAGES = 6
PLATEAU_WINDOW = 3  # study.plateau_window
PLATEAU_TOL = 0.005  # study.plateau_tol


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
    """(rows, positive): the model's n most confident true positives (pneumonia-positive test
    rows, highest score first), or when there are none the n highest-scoring rows
    (positive=False, so the panel can say so)."""
    y = np.asarray(y_pneumonia)
    order = np.argsort(-np.asarray(p_pneumonia, dtype=np.float64), kind="stable")
    positives = order[y[order] == 1]
    if positives.size:
        return positives[:n].astype(np.int64), True
    return order[:n].astype(np.int64), False


# ---------------------------------------------------------------------------
# I/O driver: run folders -> predictions -> results
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class GradcamPlan:
    """Which model and test images one task's Grad-CAM panel shows."""

    folder: Path  # run folder of the task's best model by test AUROC (first seed)
    config: str
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
    curves: dict[str, Any] = field(default_factory=dict)  # task -> curves_json(...)


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
    """Every site folder under sites_dir (sitedata.find_sites), by name, sorted."""
    return {name: SiteData.open(Path(sites_dir) / name) for name in find_sites(Path(sites_dir))}


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
        num_workers: int | str,
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
    num_workers: int | str = 0,
    seed: int = 0,
    n_boot: int = N_BOOT,
    threshold_rule: str = THRESHOLD_RULE,
    alpha: float = ALPHA,
    device: torch.device | None = None,
    plateau_window: int = PLATEAU_WINDOW,
    plateau_tol: float = PLATEAU_TOL,
) -> Evaluation:
    """Predict every run under `models` on the test split of `test_dir`, choose thresholds on
    validation splits under `sites_dir`, and compute metrics, comparisons, efficiency, ROC,
    and from the run cards' learning curves whether each configuration converged
    (`plateau_window` evaluations gaining at most `plateau_tol`)."""
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
    best_score: dict[str, float] = {}  # task -> test AUROC of the Grad-CAM model
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
            result.metrics.setdefault(config, {})[task] = {
                **configs[config].metrics,
                "training": training_entry([c for c, _ in runs], plateau_window, plateau_tol),
            }
            result.efficiency.setdefault(config, {})[task] = efficiency_entry([c for c, _ in runs])
            result.roc.setdefault(task, {})[config] = roc_points(Y, configs[config].mean_probs)
            score = configs[config].metrics["auroc_macro"]
            if score is not None and score > best_score.get(task, -math.inf):
                best_score[task] = score
                plan = _gradcam_plan(runs[0][1], config, seed_runs[0], Y, names, test_index)
                result.gradcam[task] = plan
        cards = {c: [card for card, _ in r] for (t, c), r in grouped.items() if t == task}
        result.curves[task] = curves_json(cards, plateau_window, plateau_tol)
        if "federated" in configs and "centralized" in cards:
            reach = rounds_to_reach(cards["federated"], cards["centralized"])
            result.metrics["federated"][task]["training"].update(reach)
        if configs:
            result.metrics.setdefault("comparisons", {})[task] = {
                f"{a}_vs_{b}": compare_configs(configs[a], configs[b], Y, names, alpha)
                for a, b in comparison_pairs(configs)
            }
    result.metrics = strict_json(result.metrics)
    result.curves = strict_json(result.curves)
    result.efficiency = strict_json(result.efficiency)
    return result


def _gradcam_plan(
    folder: Path,
    config: str,
    seed_run: SeedRun,
    Y: np.ndarray,
    names: Sequence[str],
    test_index: pd.DataFrame,
) -> GradcamPlan:
    k = list(names).index(PNEUMONIA)
    rows, positive = gradcam_pick(Y[:, k], seed_run.probs[:, k])
    ids = test_index["image_id"].to_numpy()
    note = "" if positive else "\ntop score; no positive in test set"
    titles = tuple(f"{config}: {ids[r]} p={seed_run.probs[r, k]:.2f}{note}" for r in rows.tolist())
    return GradcamPlan(folder, config, rows, titles, k)


def write_gradcam(
    plan: GradcamPlan, test_dir: Path, out_png: Path, device: torch.device | None = None
) -> None:
    """Render one task's Grad-CAM panel (the task's best model on its confident true
    positives)."""
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
