"""Tests for fedcxr.evaluation (evaluate, compare, bootstrap): metrics, CIs, comparisons, stage."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.stats import ttest_rel
from sklearn.metrics import roc_auc_score, roc_curve
from stagecmd import stage_argv

from fedcxr.evaluation import evaluate as ev
from fedcxr.evaluation.bootstrap import (
    bootstrap_p,
    percentile_ci,
    replicate_metrics,
    replicate_weights,
    weighted_auroc,
)
from fedcxr.evaluation.compare import (
    REPORTED,
    SeedRun,
    compare_configs,
    comparison_pairs,
    evaluate_config,
)
from fedcxr.evaluation.stats import (
    auroc,
    binary_metrics,
    bootstrap_ci,
    delong_test,
    multilabel_metrics,
)
from fedcxr.labels import FINDINGS
from fedcxr.models import build_model, num_classes_for
from fedcxr.report.inputs import ReportPaths, load_inputs
from fedcxr.runs import RunCard, run_dir, write_run
from fedcxr.sitedata import INDEX_COLUMNS, SiteData
from fedcxr.train.data import XrayDataset, make_loader
from fedcxr.train.loop import predict

STORED = 32
PNEU = FINDINGS.index("Pneumonia")
VAL_A, VAL_B, N_TEST = 10, 12, 40  # distinct sizes: a threshold's input size names its split
# (family, task, seeds, site): pneumonia runs have one seed, multilabel runs two.
RUNS = (
    ("federated", "pneumonia", (1,), None),
    ("single_node", "pneumonia", (1,), None),
    ("local", "pneumonia", (1,), "site-a"),
    ("federated", "multilabel", (1, 2), None),
    ("single_node", "multilabel", (1, 2), None),
)


@pytest.fixture(autouse=True, scope="module")
def _one_torch_thread():
    # Tiny models: one thread is fastest, and it does not stall when other work holds a core.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ---------------------------------------------------------------------------
# a tiny world: two sites, a test set, untrained smallcnn runs
# ---------------------------------------------------------------------------


def make_folder(folder: Path, splits: list[str], patients: list[str], seed: int) -> None:
    """images.npy + index.csv; Pneumonia alternates, other findings random, Hernia absent."""
    rng = np.random.default_rng(seed)
    n = len(splits)
    folder.mkdir(parents=True, exist_ok=True)
    np.save(folder / "images.npy", rng.integers(0, 256, (n, STORED, STORED), dtype=np.uint8))
    index = pd.DataFrame(
        {
            "image_id": [f"{seed:04d}{i:04d}_000.png" for i in range(n)],
            "patient_id": patients,
            "split": splits,
            **{f: rng.integers(0, 2, n) for f in FINDINGS},
            "age": 50,
            "sex": "F",
            "view": "PA",
        }
    )
    index["Pneumonia"] = np.arange(n) % 2
    index["Hernia"] = 0
    index.loc[:, list(INDEX_COLUMNS)].to_csv(folder / "index.csv", index=False)


def make_world(root: Path) -> Path:
    for name, n_val, seed in (("site-a", VAL_A, 1), ("site-b", VAL_B, 2)):
        splits = ["train"] * 20 + ["val"] * n_val
        patients = [f"{name}-{i}" for i in range(len(splits))]
        make_folder(root / "data/sites" / name, splits, patients, seed)
    patients = [f"t{i // 3}" for i in range(N_TEST)]  # 14 patients, up to 3 images each
    make_folder(root / "data/test", ["test"] * N_TEST, patients, 3)
    for family, task, seeds, site in RUNS:
        for seed in seeds:
            torch.manual_seed(1000 * seed + len(family) + 7 * len(task))
            model = build_model("smallcnn", num_classes_for(task))
            kind = {"federated": "grpc_wire", "single_node": "none", "local": "none"}[family]
            card = RunCard(
                config=f"local_{site}" if site else family,
                task=task,
                seed=seed,
                arch="smallcnn",
                dp_safe=False,
                image_size=32,
                epochs=2,
                time_per_epoch_s=1.0 + seed,
                train_wall_s=2.0 + 2 * seed,
                comm_bytes=1000 if family == "federated" else 0,
                comm_kind=kind,
                world_size=3 if family == "federated" else 1,
                n_train=40,
                sites=(site,) if site else ("site-a", "site-b"),
            )
            write_run(run_dir(root / "models", family, task, seed, site), model.state_dict(), card)
    return root


def run_eval(root: Path, test_dir: Path | None = None, n_boot: int = 50) -> ev.Evaluation:
    return ev.evaluate_all(
        root / "models",
        test_dir or root / "data/test",
        root / "data/sites",
        batch_size=16,
        seed=42,
        n_boot=n_boot,
    )


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_world(tmp_path_factory.mktemp("world"))


@pytest.fixture(scope="module")
def result(world: Path) -> ev.Evaluation:
    return run_eval(world)


# ---------------------------------------------------------------------------
# the driver on the tiny world
# ---------------------------------------------------------------------------


def test_metrics_have_the_contract_keys(result: ev.Evaluation) -> None:
    metrics = json.loads(json.dumps(result.metrics, allow_nan=False))  # strict JSON
    assert set(metrics) == {"federated", "single_node", "local_site-a", "comparisons"}
    assert set(metrics["federated"]) == {"multilabel", "pneumonia"}
    suffixes = ("", "_lo", "_hi", "_std")
    for config, per_task in metrics.items():
        if config == "comparisons":
            continue
        for task, m in per_task.items():
            expected = {f"{k}{s}" for k in REPORTED for s in suffixes}
            expected |= {"auroc", "n_seeds", "n_test_images", "n_test_patients", "training"}
            assert set(m) == expected, (config, task)
            # These runs were written without learning curves: never called converged.
            assert m["training"]["converged"] is False
            assert "no defined validation AUROC" in m["training"]["why"]
            assert m["n_test_images"] == N_TEST and m["n_test_patients"] == 14
            assert m["n_seeds"] == (2 if task == "multilabel" else 1)
            assert list(m["auroc"]) == (list(FINDINGS) if task == "multilabel" else ["Pneumonia"])
            assert m["sensitivity_pneumonia"] is not None
            # the values: test_reported_metrics_and_cis_equal_a_direct_computation
            assert all(m[k] is not None for k in REPORTED), (config, task)
    assert metrics["federated"]["multilabel"]["auroc"]["Hernia"] is None  # one class in test
    assert metrics["federated"]["pneumonia"]["auroc_macro_std"] == 0.0  # one seed
    comps = metrics["comparisons"]
    assert list(comps["pneumonia"]) == ["federated_vs_single_node", "federated_vs_local_site-a"]
    assert list(comps["multilabel"]) == ["federated_vs_single_node"]
    pneu = comps["pneumonia"]["federated_vs_single_node"]
    assert {"auroc_diff", "auroc_diff_lo", "auroc_diff_hi", "bootstrap_p", "delong_z"} <= set(pneu)
    assert pneu["delong_p"] is not None and pneu["ttest_p"] is None  # one seed: no t-test
    multi = comps["multilabel"]["federated_vs_single_node"]
    assert multi["delong_z"] is None and multi["delong_p"] is None  # no DeLong for a macro
    assert multi["delong_p_pneumonia"] is not None
    assert multi["ttest_p"] is not None and multi["n_paired_seeds"] == 2
    eff = result.efficiency["federated"]["multilabel"]
    assert eff == {
        "time_per_epoch_s": 2.5,
        "epochs": 2,
        "train_wall_s": 5.0,
        "comm_bytes": 1000,
        "comm_kind": "grpc_wire",
        "world_size": 3,
        "n_seeds": 2,
    }


# Reference values, computed here without the code under test: the model's probabilities from
# `predict`, then thresholds, metrics, the patient bootstrap and p-values by hand / sklearn.
N_BOOT_FIXTURE, BOOT_SEED = 50, 42  # run_eval's defaults, used by the `result` fixture
RUN_OF = {  # config -> (family, site)
    "federated": ("federated", None),
    "single_node": ("single_node", None),
    "local_site-a": ("local", "site-a"),
}


def _probs(world: Path, config: str, task: str, seed: int, split: str) -> np.ndarray:
    """(n, labels) probabilities of one run on `split`: test, or the validation rows whose
    thresholds the config uses (its own site for a local run, all sites pooled otherwise)."""
    family, site = RUN_OF[config]
    model, _ = ev.load_model(
        run_dir(world / "models", family, task, seed, site), torch.device("cpu")
    )
    if split == "test":
        folders = [SiteData.open(world / "data/test")]
    else:
        names = [site] if site else ["site-a", "site-b"]
        folders = [SiteData.open(world / "data/sites" / name) for name in names]
    data = XrayDataset.from_split(folders, split, task, 32)
    probs, _ = predict(model, make_loader(data, 7, shuffle=False), torch.device("cpu"))
    return probs.astype(np.float64).reshape(len(data), -1)


def _labels(world: Path, config: str, task: str, split: str) -> np.ndarray:
    _, site = RUN_OF[config]
    names = [site] if site else ["site-a", "site-b"]
    folders = ["data/test"] if split == "test" else [f"data/sites/{n}" for n in names]
    index = pd.concat([pd.read_csv(world / f / "index.csv") for f in folders])
    columns = ["Pneumonia"] if task == "pneumonia" else list(FINDINGS)
    return index.loc[index["split"] == split, columns].to_numpy()


def _youden_by_hand(y: np.ndarray, p: np.ndarray) -> float:
    """argmax of TPR - FPR over 'score >= t', the highest t on ties; 0.5 for one class."""
    if len(np.unique(y)) < 2:
        return 0.5
    candidates = [np.nextafter(p.max(), np.inf), *np.unique(p)[::-1]]  # "none positive" first
    j = [(p[y == 1] >= t).mean() - (p[y == 0] >= t).mean() for t in candidates]
    return float(candidates[int(np.argmax(j))])


def _macro_by_hand(Y: np.ndarray, P: np.ndarray, T: np.ndarray) -> dict[str, float]:
    """Every REPORTED value for one seed on the rows given; NaN where undefined."""
    values: dict[str, list[float]] = {k: [] for k in REPORTED[:6]}
    for j in range(Y.shape[1]):
        y, p = Y[:, j], P[:, j]
        if len(np.unique(y)) < 2:
            continue  # no AUROC and left out of every macro mean
        call = p >= T[j]
        tp, fp = int((call & (y == 1)).sum()), int((call & (y == 0)).sum())
        fn, tn = int((~call & (y == 1)).sum()), int((~call & (y == 0)).sum())
        values["auroc_macro"].append(roc_auc_score(y, p))
        values["accuracy"].append((tp + tn) / len(y))
        values["precision"].append(tp / (tp + fp) if tp + fp else 0.0)
        values["recall"].append(tp / (tp + fn))
        values["specificity"].append(tn / (tn + fp))
        values["f1"].append(2 * tp / (2 * tp + fp + fn))
    out = {k: float(np.mean(v)) if v else np.nan for k, v in values.items()}
    k = Y.shape[1] - 1 if Y.shape[1] == 1 else PNEU
    y, call = Y[:, k], P[:, k] >= T[k]
    out["sensitivity_pneumonia"] = (call & (y == 1)).sum() / (y == 1).sum() if y.any() else np.nan
    neg = (y == 0).sum()
    out["specificity_pneumonia"] = (~call & (y == 0)).sum() / neg if neg else np.nan
    return out


def _patient_replicates(groups: np.ndarray, n_boot: int, seed: int) -> list[np.ndarray]:
    """Rows of each replicate: as many patients as there are, drawn with replacement from
    numpy's default_rng(seed), every image of a drawn patient taken (stats.bootstrap_ci's
    documented draws)."""
    patients, inverse = np.unique(groups, return_inverse=True)
    rows_of = [np.flatnonzero(inverse == g) for g in range(len(patients))]
    rng = np.random.default_rng(seed)
    draws = [rng.integers(0, len(patients), size=len(patients)) for _ in range(n_boot)]
    return [np.concatenate([rows_of[g] for g in drawn]) for drawn in draws]


def _ci_by_hand(values: np.ndarray) -> tuple[float | None, float | None]:
    finite = values[np.isfinite(values)]
    if finite.size < values.size / 2:
        return None, None
    return tuple(float(q) for q in np.quantile(finite, [0.025, 0.975]))


def _reference(world: Path, config: str, task: str) -> dict:
    """Per seed: test probabilities and hand-chosen thresholds; per metric: the seed-averaged
    point value, the seed spread and the (n_boot,) seed-averaged bootstrap replicates."""
    seeds = (1, 2) if task == "multilabel" else (1,)  # as in RUNS
    Y = _labels(world, config, task, "test")
    Y_val = _labels(world, config, task, "val")
    groups = pd.read_csv(world / "data/test/index.csv")["patient_id"].to_numpy()
    runs = []
    for seed in seeds:
        P_val = _probs(world, config, task, seed, "val")
        T = np.array([_youden_by_hand(Y_val[:, j], P_val[:, j]) for j in range(Y.shape[1])])
        runs.append((_probs(world, config, task, seed, "test"), T))
    per_seed = [_macro_by_hand(Y, P, T) for P, T in runs]
    reps = _patient_replicates(groups, N_BOOT_FIXTURE, BOOT_SEED)
    boot = [[_macro_by_hand(Y[rows], P[rows], T) for rows in reps] for P, T in runs]
    return {
        "Y": Y,
        "runs": runs,
        "point": {k: np.mean([v[k] for v in per_seed]) for k in REPORTED},
        "std": {
            k: np.std([v[k] for v in per_seed], ddof=1) if len(runs) > 1 else 0.0 for k in REPORTED
        },
        "seed_auroc": [v["auroc_macro"] for v in per_seed],
        "boot": {
            k: np.mean([[r[k] for r in seed_reps] for seed_reps in boot], axis=0) for k in REPORTED
        },
    }


@pytest.fixture(scope="module")
def reference(world: Path) -> dict[tuple[str, str], dict]:
    pairs = [
        ("federated", "pneumonia"),
        ("single_node", "pneumonia"),
        ("local_site-a", "pneumonia"),
    ]
    pairs += [("federated", "multilabel"), ("single_node", "multilabel")]
    return {(c, t): _reference(world, c, t) for c, t in pairs}


@pytest.mark.parametrize(
    ("config", "task"),
    [("federated", "pneumonia"), ("local_site-a", "pneumonia"), ("single_node", "multilabel")],
)
def test_reported_metrics_and_cis_equal_a_direct_computation(
    result: ev.Evaluation, reference: dict, config: str, task: str
) -> None:
    ref, m = reference[config, task], result.metrics[config][task]
    thresholds = result.thresholds[config][task]
    for seed, (_, T) in zip(sorted(thresholds), ref["runs"], strict=True):
        np.testing.assert_allclose(thresholds[seed], T, rtol=0, atol=1e-12)  # validation only
    for key in REPORTED:
        assert m[key] == pytest.approx(ref["point"][key], abs=1e-12), key
        assert m[f"{key}_std"] == pytest.approx(ref["std"][key], abs=1e-12), key
        lo, hi = _ci_by_hand(ref["boot"][key])
        assert (m[f"{key}_lo"], m[f"{key}_hi"]) == pytest.approx((lo, hi), abs=1e-12), key
    names = list(m["auroc"])
    for j, name in enumerate(names):
        y = ref["Y"][:, j]
        want = [roc_auc_score(y, P[:, j]) for P, _ in ref["runs"]] if y.min() < y.max() else None
        assert m["auroc"][name] == (None if want is None else pytest.approx(np.mean(want))), name
    # the CI is not degenerate: replicates differ, so a constant or copied value would fail
    assert m["auroc_macro_lo"] < m["auroc_macro_hi"]


def _p_by_hand(d: np.ndarray) -> float:
    """Two-sided bootstrap p: 2 x (1 + replicates on the smaller side of 0) / (1 + B), <= 1."""
    d = d[np.isfinite(d)]
    return min(1.0, 2 * (1 + min((d <= 0).sum(), (d >= 0).sum())) / (1 + d.size))


@pytest.mark.parametrize(
    ("task", "other"),
    [("pneumonia", "single_node"), ("pneumonia", "local_site-a"), ("multilabel", "single_node")],
)
def test_comparisons_equal_a_direct_computation(
    result: ev.Evaluation, reference: dict, task: str, other: str
) -> None:
    comp = result.metrics["comparisons"][task][f"federated_vs_{other}"]
    a, b = reference["federated", task], reference[other, task]
    assert comp["auroc_diff"] == pytest.approx(
        a["point"]["auroc_macro"] - b["point"]["auroc_macro"], abs=1e-12
    )
    diffs = a["boot"]["auroc_macro"] - b["boot"]["auroc_macro"]  # paired: same replicates
    lo, hi = _ci_by_hand(diffs)
    assert (comp["auroc_diff_lo"], comp["auroc_diff_hi"]) == pytest.approx((lo, hi), abs=1e-12)
    assert comp["bootstrap_p"] == pytest.approx(_p_by_hand(diffs), abs=1e-12)
    column = -1 if task == "pneumonia" else PNEU
    y = a["Y"][:, column]
    fed = np.mean([P[:, column] for P, _ in a["runs"]], axis=0)
    want = delong_test(y, fed, np.mean([P[:, column] for P, _ in b["runs"]], axis=0))
    key = "" if task == "pneumonia" else "_pneumonia"
    assert comp[f"delong_z{key}"] == pytest.approx(want.z)
    assert comp[f"delong_p{key}"] == pytest.approx(want.p_value)
    if task == "multilabel":  # two common seeds: scipy's paired t-test of the seeds' AUROCs
        t, p = ttest_rel(a["seed_auroc"], b["seed_auroc"])
        assert (comp["ttest_t"], comp["ttest_p"]) == pytest.approx((t, p), abs=1e-12)
    else:
        assert comp["ttest_p"] is None


def test_thresholds_are_chosen_on_validation_splits_only(
    world: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    sizes: list[int] = []
    real = ev.choose_threshold

    def spy(y_true, y_prob, rule="youden"):
        sizes.append(len(y_true))
        return real(y_true, y_prob, rule)

    monkeypatch.setattr(ev, "choose_threshold", spy)
    clean = run_eval(world, n_boot=5)
    assert set(sizes) == {VAL_A, VAL_A + VAL_B}  # site-a's own split (local), pooled (others)
    assert N_TEST not in sizes

    # Flipping every test label changes the metrics but not one threshold.
    flipped = tmp_path / "test"
    shutil.copytree(world / "data/test", flipped)
    index = pd.read_csv(flipped / "index.csv", dtype={"image_id": str, "patient_id": str})
    index[list(FINDINGS)] = 1 - index[list(FINDINGS)]
    index.to_csv(flipped / "index.csv", index=False)
    corrupted = run_eval(world, flipped, n_boot=5)
    assert corrupted.thresholds == clean.thresholds
    assert corrupted.metrics != clean.metrics


def test_evaluation_is_deterministic(world: Path, result: ev.Evaluation) -> None:
    again = run_eval(world)
    assert json.dumps(again.metrics, sort_keys=True) == json.dumps(result.metrics, sort_keys=True)
    assert again.efficiency == result.efficiency
    for task, curves in result.roc.items():
        for config, (fpr, tpr) in curves.items():
            np.testing.assert_array_equal(again.roc[task][config][0], fpr)
            np.testing.assert_array_equal(again.roc[task][config][1], tpr)


def _one_core() -> None:
    # The stage uses every core it may run on (pick_device); tiny models stall on 2 threads
    # when other work holds a core, so the test hands it one.
    if hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, sorted(os.sched_getaffinity(0))[:1])


def test_stage_writes_what_the_report_reads(world: Path, tmp_path: Path) -> None:
    work = tmp_path / "work"
    for part in ("data", "models"):
        shutil.copytree(world / part, work / part)
    (work / "params.yaml").write_text("seed: 42\ntrain:\n  batch_size: 16\n")
    done = subprocess.run(
        stage_argv("evaluate"),
        cwd=work,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        preexec_fn=_one_core,
    )
    assert done.returncode == 0, done.stderr
    reports = work / "reports"
    metrics = json.loads((reports / "metrics.json").read_text())
    assert "comparisons" in metrics and "federated" in metrics
    roc = pd.read_csv(reports / "plots/roc/multilabel/federated.csv")
    assert list(roc.columns) == ["fpr", "tpr"] and len(roc) <= ev.ROC_POINTS
    data = load_inputs(ReportPaths().under(work))
    assert set(data.gradcam) == {"multilabel", "pneumonia"}
    assert set(data.roc["pneumonia"]) == {"federated", "single_node", "local_site-a"}
    assert str(work / "reports/metrics.json") not in data.absent
    assert data.efficiency is not None and data.metrics == metrics


# ---------------------------------------------------------------------------
# the pure core on hand-made arrays
# ---------------------------------------------------------------------------


def _toy(n: int = 60, labels: int = 3, seed: int = 0):
    rng = np.random.default_rng(seed)
    Y = rng.integers(0, 2, (n, labels))
    P = np.clip(0.3 * Y + rng.random((n, labels)), 0, 1).round(1)  # many ties
    groups = np.repeat(np.arange(n // 3), 3)
    return Y, P, groups


def test_weighted_auroc_is_sklearns_auroc_of_the_repeated_rows() -> None:
    Y, P, _ = _toy()
    y, p = Y[:, 0], P[:, 0]
    w = np.random.default_rng(1).integers(0, 4, (5, y.size)).astype(float)
    got = weighted_auroc(y, p, np.vstack([np.ones(y.size), w]))
    assert got[0] == pytest.approx(roc_auc_score(y, p), abs=1e-12)
    for i in range(5):
        rows = np.repeat(np.arange(y.size), w[i].astype(int))
        assert got[i + 1] == pytest.approx(roc_auc_score(y[rows], p[rows]), abs=1e-12)
    assert np.isnan(weighted_auroc(np.zeros(4), np.arange(4.0), np.ones((1, 4))))[0]


def test_replicate_metrics_equal_multilabel_metrics_on_the_resampled_rows() -> None:
    Y, P, groups = _toy(labels=14)
    Y[:, 7] = 0  # a label with one class stays out of the macro means
    t = np.linspace(0.3, 0.7, 14)
    weights = next(replicate_weights(groups, 4, seed=3))
    reps = replicate_metrics(Y, P, t, weights, pneumonia=PNEU)
    for i in range(4):
        rows = np.repeat(np.arange(len(Y)), weights[i].astype(int))
        want = multilabel_metrics(Y[rows], P[rows], t)["macro"]
        assert reps["auroc_macro"][i] == pytest.approx(want["auroc"], abs=1e-12)
        for key in ("accuracy", "precision", "recall", "specificity", "f1"):
            assert reps[key][i] == pytest.approx(want[key], abs=1e-12), key
        binary = binary_metrics(Y[rows, PNEU], P[rows, PNEU], t[PNEU])
        assert reps["sensitivity_pneumonia"][i] == pytest.approx(binary["recall"], abs=1e-12)
        assert reps["specificity_pneumonia"][i] == pytest.approx(binary["specificity"], abs=1e-12)


def test_single_seed_cis_are_stats_bootstrap_ci() -> None:
    Y, P, groups = _toy(n=90, labels=1)
    t = np.array([0.5])
    res = evaluate_config(Y, groups, [SeedRun(0, P, t)], ["Pneumonia"], n_boot=100, seed=7)
    m = res.metrics
    assert m["auroc_macro"] == pytest.approx(roc_auc_score(Y[:, 0], P[:, 0]), abs=1e-12)
    lo, hi = bootstrap_ci(auroc, Y[:, 0], P[:, 0], groups, n_boot=100, seed=7)
    assert (m["auroc_macro_lo"], m["auroc_macro_hi"]) == pytest.approx((lo, hi), abs=1e-12)

    def f1(y, p):
        return binary_metrics(y, p, 0.5)["f1"] if 0 < y.sum() < y.size else None

    lo, hi = bootstrap_ci(f1, Y[:, 0], P[:, 0], groups, n_boot=100, seed=7)
    assert (m["f1_lo"], m["f1_hi"]) == pytest.approx((lo, hi), abs=1e-12)
    assert m["sensitivity_pneumonia"] == binary_metrics(Y[:, 0], P[:, 0], 0.5)["recall"]
    assert m["n_test_patients"] == 30 and m["auroc_macro_std"] == 0.0


def test_several_seeds_average_point_estimates_and_spread() -> None:
    Y, P, groups = _toy(labels=14)
    Y[:, 7] = 0
    rng = np.random.default_rng(5)
    P2 = np.clip(P + rng.normal(0, 0.2, P.shape), 0, 1)
    t = np.full(14, 0.5)
    runs = [SeedRun(2, P2, t), SeedRun(1, P, t)]
    res = evaluate_config(Y, groups, runs, list(FINDINGS), n_boot=50, seed=0)
    per_seed = []
    for probs in (P, P2):
        per_seed.append(np.mean([roc_auc_score(Y[:, j], probs[:, j]) for j in range(14) if j != 7]))
    assert res.metrics["auroc_macro"] == pytest.approx(np.mean(per_seed), abs=1e-12)
    assert res.metrics["auroc_macro_std"] == pytest.approx(np.std(per_seed, ddof=1), abs=1e-12)
    assert res.seeds == (1, 2)
    assert res.metrics["auroc"]["Hernia"] is None
    mean_mass = np.mean([roc_auc_score(Y[:, 9], q[:, 9]) for q in (P, P2)])
    assert res.metrics["auroc"]["Mass"] == pytest.approx(mean_mass, abs=1e-12)
    assert res.boot_auroc.shape == (50,)
    np.testing.assert_allclose(res.mean_probs, (P + P2) / 2)


def test_comparing_a_configuration_with_itself_and_with_another() -> None:
    Y, P, groups = _toy(n=90, labels=1)
    t = np.array([0.5])
    a = evaluate_config(Y, groups, [SeedRun(0, P, t)], ["Pneumonia"], n_boot=100)
    same = compare_configs(a, a, Y, ["Pneumonia"])
    assert same["auroc_diff"] == 0.0 and same["bootstrap_p"] == 1.0
    assert (same["auroc_diff_lo"], same["auroc_diff_hi"]) == (0.0, 0.0)
    noisy = np.clip(P + np.random.default_rng(2).normal(0, 0.3, P.shape), 0, 1)
    b = evaluate_config(Y, groups, [SeedRun(0, noisy, t)], ["Pneumonia"], n_boot=100)
    comp = compare_configs(a, b, Y, ["Pneumonia"])
    want = delong_test(Y[:, 0], P[:, 0], noisy[:, 0])
    assert comp["auroc_diff"] == pytest.approx(want.diff, abs=1e-12)
    assert comp["delong_z"] == pytest.approx(want.z) and comp["delong_p"] == want.p_value
    other = evaluate_config(Y, groups, [SeedRun(0, P, t)], ["Pneumonia"], n_boot=10)
    with pytest.raises(ValueError, match="same replicates"):
        compare_configs(a, other, Y, ["Pneumonia"])


def test_comparison_pairs_follow_the_study() -> None:
    configs = ["local_site-b", "centralized", "federated_dp", "local_site-a", "federated"]
    assert comparison_pairs(configs) == [
        ("federated", "centralized"),
        ("federated", "local_site-a"),
        ("federated", "local_site-b"),
        ("federated_dp", "federated"),
    ]
    assert comparison_pairs(["single_node", "centralized"]) == []


def test_roc_points_are_sklearns_and_thinned() -> None:
    Y, P, _ = _toy(labels=1)
    fpr, tpr = ev.roc_points(Y, P)
    want_fpr, want_tpr, _ = roc_curve(Y[:, 0], P[:, 0])
    np.testing.assert_array_equal(fpr, want_fpr)
    np.testing.assert_array_equal(tpr, want_tpr)
    x = np.linspace(0, 1, 5000)
    tx, _ = ev.thin_curve(x, np.sqrt(x), 200)
    assert len(tx) <= 200 and (tx[0], tx[-1]) == (0.0, 1.0) and np.all(np.diff(tx) > 0)


def test_bootstrap_p_and_percentile_ci_edge_cases() -> None:
    assert bootstrap_p(np.full(99, 0.1)) == pytest.approx(2 / 100)
    assert bootstrap_p(np.array([np.nan])) is None
    assert percentile_ci(np.array([np.nan, np.nan, 1.0])) == (None, None)
    assert ev.strict_json({"a": [np.float64("nan"), np.int64(3)], "b": float("inf")}) == {
        "a": [None, 3],
        "b": None,
    }


def test_gradcam_pick_prefers_confident_positives_and_says_when_there_are_none() -> None:
    rows, positive = ev.gradcam_pick(np.array([0, 1, 0, 1]), np.array([0.9, 0.1, 0.8, 0.2]))
    assert positive and rows.tolist() == [3, 1]  # true positives, most confident first
    rows, positive = ev.gradcam_pick(np.zeros(8), np.arange(8.0), n=6)
    assert not positive and rows.tolist() == [7, 6, 5, 4, 3, 2]


def test_threshold_rule_and_missing_validation_are_errors() -> None:
    with pytest.raises(ValueError, match="unknown threshold rule"):
        ev.label_thresholds(np.array([[0], [1]]), np.array([[0.1], [0.9]]), rule="nope")
    with pytest.raises(ValueError, match="validation rows"):
        ev.label_thresholds(np.zeros((0, 1)), np.zeros((0, 1)))


def test_no_runs_is_a_clear_error(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    with pytest.raises(FileNotFoundError, match="no trained runs"):
        ev.evaluate_all(tmp_path / "models", tmp_path, tmp_path, batch_size=4)


def test_no_pneumonia_positive_in_test_gives_null_sensitivity() -> None:
    Y, P, groups = _toy(labels=14)
    Y[:, PNEU] = 0
    runs = [SeedRun(0, P, np.full(14, 0.5))]
    m = evaluate_config(Y, groups, runs, list(FINDINGS), n_boot=20).metrics
    assert m["sensitivity_pneumonia"] is None and m["sensitivity_pneumonia_lo"] is None
    assert m["specificity_pneumonia"] is not None and m["auroc"]["Pneumonia"] is None
