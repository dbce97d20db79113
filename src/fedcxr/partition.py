"""Patient-disjoint splitting into a held-out test set and simulated hospital sites."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations

import numpy as np
import pandas as pd

from fedcxr.config import PartitionConfig
from fedcxr.labels import FINDINGS

TEST = "test"
AGE_BANDS = ((0, 18), (18, 40), (40, 60), (60, 200))


class PartitionError(ValueError):
    """A split that cannot be made or that would leak patients between sets."""


def site_names(n_sites: int) -> tuple[str, ...]:
    """site-a, site-b, ... (certificate common names later reuse these)."""
    if not 1 <= n_sites <= 26:
        raise PartitionError(f"expected between 1 and 26 sites, found {n_sites}")
    return tuple(f"site-{chr(ord('a') + i)}" for i in range(n_sites))


def scale_targets(n_images: int, test_size: int, site_sizes: tuple[int, ...]) -> list[int]:
    """Set sizes [test, site...] that sum to n_images, in the configured proportions.

    When the configured sizes already add up to n_images they are used exactly; otherwise they
    are scaled by largest remainder (so a subset keeps the paper's proportions).
    """
    sizes = np.array([test_size, *site_sizes], dtype=np.int64)
    total = int(sizes.sum())
    if total == n_images:
        return sizes.tolist()
    raw = sizes * n_images / total
    out = np.floor(raw).astype(np.int64)
    order = np.argsort(-(raw - out), kind="stable")
    out[order[: n_images - int(out.sum())]] += 1
    return out.tolist()


# ---------------------------------------------------------------- per-patient features


def patient_table(meta: pd.DataFrame) -> pd.DataFrame:
    """One row per patient, in order of first appearance in `meta` (never sorted by ID).

    Ordering by appearance makes the split independent of how IDs are spelled, so the
    pseudonymized metadata and the raw CSV (split-plan) get the same assignment.
    """
    features = pd.DataFrame(
        {
            "patient_id": meta["patient_id"].to_numpy(),
            "age": meta["age"].to_numpy(),
            "male": (meta["sex"] == "M").to_numpy(float),
            "ap_fraction": (meta["view"] == "AP").to_numpy(float),
        }
    )
    grouped = features.groupby("patient_id", sort=False)
    table = pd.DataFrame(
        {
            "n_images": grouped.size(),
            "age": grouped["age"].median(),
            "male": grouped["male"].mean(),
            "ap_fraction": grouped["ap_fraction"].mean(),
        }
    )
    positives = meta.groupby("patient_id", sort=False)[list(FINDINGS)].sum()
    any_pos = positives.to_numpy().sum(axis=1) > 0
    primary = np.where(any_pos, positives.to_numpy().argmax(axis=1), len(FINDINGS))
    table["primary_label"] = primary
    return table


# ---------------------------------------------------------------- partitioner registry
# A partitioner scores how much each patient "belongs" at each site (higher = preferred).
# The capacity-aware fill below turns scores into an exact-size, patient-disjoint split.

Scorer = Callable[[pd.DataFrame, int, np.random.Generator, PartitionConfig], np.ndarray]
PARTITIONERS: dict[str, Scorer] = {}


def register(name: str) -> Callable[[Scorer], Scorer]:
    def wrap(fn: Scorer) -> Scorer:
        PARTITIONERS[name] = fn
        return fn

    return wrap


def _gumbel(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    return rng.gumbel(size=shape)


@register("iid")
def iid_scores(patients: pd.DataFrame, k: int, rng: np.random.Generator, cfg: PartitionConfig):
    """Every patient equally likely at every site."""
    return _gumbel(rng, (len(patients), k))


# Site profiles for the demographic split: weights on (age z-score, male share, AP share).
# A: younger outpatients (PA); B: older inpatients (AP, portable); C: women's hospital;
# D: men (e.g. a veterans' hospital); E: younger emergency department (AP).
DEMOGRAPHIC_PROFILES = np.array(
    [
        [-1.0, 0.0, -1.5],
        [1.2, 0.0, 1.5],
        [0.0, -2.0, 0.0],
        [0.3, 2.0, -0.3],
        [-1.5, 0.0, 1.0],
    ]
)


@register("demographic")
def demographic_scores(
    patients: pd.DataFrame, k: int, rng: np.random.Generator, cfg: PartitionConfig
) -> np.ndarray:
    """Sites differ by age band, sex and view position (the paper's 'demographics and scanning
    methods'); Gumbel noise keeps the split soft, so every site still sees every kind."""
    age = patients["age"].fillna(patients["age"].median()).to_numpy()
    features = np.stack(
        [
            (age - 47.0) / 17.0,
            patients["male"].to_numpy() - 0.5,
            patients["ap_fraction"].to_numpy() - 0.4,
        ],
        axis=1,
    )
    profiles = np.stack([DEMOGRAPHIC_PROFILES[i % len(DEMOGRAPHIC_PROFILES)] for i in range(k)])
    return 1.5 * features @ profiles.T + _gumbel(rng, (len(patients), k))


@register("dirichlet")
def dirichlet_scores(
    patients: pd.DataFrame, k: int, rng: np.random.Generator, cfg: PartitionConfig
) -> np.ndarray:
    """Label skew: each patient's primary finding is spread over sites by Dirichlet(alpha)."""
    n_classes = len(FINDINGS) + 1
    shares = rng.dirichlet(np.full(k, cfg.dirichlet_alpha), size=n_classes)
    log_shares = np.log(np.clip(shares, 1e-12, None))
    return log_shares[patients["primary_label"].to_numpy()] + _gumbel(rng, (len(patients), k))


def fill_exact(
    sizes: np.ndarray,
    scores: np.ndarray,
    capacities: list[int],
    rng: np.random.Generator,
    reserve_fraction: float = 0.05,
) -> np.ndarray:
    """Assign each patient (with sizes[i] images) to one set so every set reaches its capacity.

    Patients are taken in random order (so every set is a random draw of patient kinds, not of
    patient sizes) and go to their best-scoring set that still has room for all their images;
    a capacity prior makes sets fill at the same relative pace. A random reserve of
    single-image patients is held back and fills the last gaps exactly. A patient who fits
    nowhere goes to the set with most room left (the report shows any size deviation).
    """
    n, k = scores.shape
    if len(capacities) != k:
        raise PartitionError(f"expected {k} capacities, found {len(capacities)}")
    capacity = np.asarray(capacities, dtype=np.float64)
    prior = np.log(np.clip(capacity / max(capacity.sum(), 1.0), 1e-12, None))
    ranked = np.argsort(-(scores + prior), axis=1, kind="stable")
    singles = np.flatnonzero(sizes == 1)
    n_reserve = min(len(singles), int(np.ceil(reserve_fraction * sizes.sum())))
    reserve = rng.choice(singles, size=n_reserve, replace=False) if n_reserve else singles[:0]
    is_reserve = np.zeros(n, dtype=bool)
    is_reserve[reserve] = True
    order = np.concatenate([rng.permutation(np.flatnonzero(~is_reserve)), rng.permutation(reserve)])
    remaining = np.asarray(capacities, dtype=np.int64).copy()
    out = np.empty(n, dtype=np.int64)
    for i in order:
        size = sizes[i]
        choice = -1
        for s in ranked[i]:
            if remaining[s] >= size:
                choice = s
                break
        if choice < 0:
            choice = int(np.argmax(remaining))
        out[i] = choice
        remaining[choice] -= size
    return out


# ---------------------------------------------------------------- the split


@dataclass(frozen=True)
class SplitPlan:
    """Per image (in metadata order): its set (test or a site) and split (train/val/test)."""

    sets: tuple[str, ...]  # test first, then sites
    targets: tuple[int, ...]
    assignment: np.ndarray  # per image: index into sets
    split: np.ndarray  # per image: "train" | "val" | "test"

    def set_of(self) -> np.ndarray:
        return np.asarray(self.sets, dtype=object)[self.assignment]


def plan_split(meta: pd.DataFrame, cfg: PartitionConfig, seed: int) -> SplitPlan:
    """Split images by patient into a test set and len(cfg.site_sizes) sites, exactly sized."""
    if cfg.strategy not in PARTITIONERS:
        raise PartitionError(
            f"unknown partition.strategy {cfg.strategy!r}; expected one of {sorted(PARTITIONERS)}"
        )
    if meta.empty:
        raise PartitionError("cannot split an empty metadata table")
    rng = np.random.default_rng([seed, 7])
    sets = (TEST, *site_names(len(cfg.site_sizes)))
    targets = scale_targets(len(meta), cfg.test_size, cfg.site_sizes)
    patients = patient_table(meta)
    sizes = patients["n_images"].to_numpy()

    # 1. The held-out test set: random patients (representative of the whole population).
    test_target = targets[0]
    is_test = (
        fill_exact(
            sizes, _gumbel(rng, (len(patients), 2)), [test_target, len(meta) - test_target], rng
        )
        == 0
    )

    # 2. Sites: the configured strategy scores the remaining patients.
    rest = patients[~is_test]
    scores = PARTITIONERS[cfg.strategy](rest, len(targets) - 1, rng, cfg)
    site_of_rest = fill_exact(rest["n_images"].to_numpy(), scores, targets[1:], rng) + 1
    patient_set = np.zeros(len(patients), dtype=np.int64)
    patient_set[~is_test] = site_of_rest

    # 3. A patient-disjoint validation split inside each site.
    patient_split = np.where(is_test, "test", "train").astype(object)
    for s in range(1, len(sets)):
        members = np.flatnonzero(patient_set == s)
        n_site = int(sizes[members].sum())
        n_val = round(cfg.val_fraction * n_site)
        if n_val == 0 or len(members) < 2:
            continue
        val = fill_exact(
            sizes[members], _gumbel(rng, (len(members), 2)), [n_val, n_site - n_val], rng
        )
        patient_split[members[val == 0]] = "val"

    position = pd.Series(np.arange(len(patients)), index=patients.index)
    per_image = position.loc[meta["patient_id"]].to_numpy()
    return SplitPlan(
        sets=sets,
        targets=tuple(targets),
        assignment=patient_set[per_image],
        split=patient_split[per_image].astype(str),
    )


# ---------------------------------------------------------------- reporting


def patient_overlap(groups: dict[str, set[str]]) -> dict[str, int]:
    """Number of patients shared by each pair of groups ('a|b' -> count)."""
    return {f"{a}|{b}": len(groups[a] & groups[b]) for a, b in combinations(sorted(groups), 2)}


def describe_set(meta: pd.DataFrame) -> dict:
    """Size, prevalence per finding, age, sex and view mix of one set of images."""
    n = len(meta)
    age = meta["age"]
    bands = {
        f"{lo}-{hi - 1}" if hi < 200 else f"{lo}+": int(((age >= lo) & (age < hi)).sum())
        for lo, hi in AGE_BANDS
    }
    return {
        "images": n,
        "patients": int(meta["patient_id"].nunique()),
        "prevalence": {f: round(float(meta[f].mean()) if n else 0.0, 5) for f in FINDINGS},
        "positives": {f: int(meta[f].sum()) for f in FINDINGS},
        "no_finding": round(float((meta[list(FINDINGS)].sum(axis=1) == 0).mean()) if n else 0, 5),
        "age": {
            "mean": round(float(age.mean()), 2) if n else None,
            "std": round(float(age.std()), 2) if n > 1 else None,
            "bands": bands,
        },
        "sex": {k: int(v) for k, v in meta["sex"].value_counts().sort_index().items()},
        "view": {k: int(v) for k, v in meta["view"].value_counts().sort_index().items()},
    }


def split_report(meta: pd.DataFrame, plan: SplitPlan, cfg: PartitionConfig, seed: int) -> dict:
    """The figures of reports/partition.json for a plan over `meta`."""
    set_of = plan.set_of()
    groups: dict[str, set[str]] = {
        name: set(meta.loc[set_of == name, "patient_id"]) for name in plan.sets
    }
    sets = {}
    for name, target in zip(plan.sets, plan.targets, strict=True):
        mask = set_of == name
        entry = describe_set(meta[mask])
        entry["target"] = int(target)
        if name != TEST:
            for part in ("train", "val"):
                sub = mask & (plan.split == part)
                entry[part] = {
                    "images": int(sub.sum()),
                    "patients": int(meta.loc[sub, "patient_id"].nunique()),
                }
            train = set(meta.loc[mask & (plan.split == "train"), "patient_id"])
            val = set(meta.loc[mask & (plan.split == "val"), "patient_id"])
            entry["train_val_patient_overlap"] = len(train & val)
        sets[name] = entry
    overlap = patient_overlap(groups)
    return {
        "strategy": cfg.strategy,
        "seed": seed,
        "config": cfg.model_dump(mode="json"),
        "total_images": len(meta),
        "total_patients": int(meta["patient_id"].nunique()),
        "sets": sets,
        "patient_overlap": overlap,
        "patient_overlap_total": int(sum(overlap.values())),
        "exact_sizes": all(sets[n]["images"] == sets[n]["target"] for n in plan.sets),
    }


def check_disjoint(report: dict) -> None:
    """Fail when any two sets (or a site's train and val) share a patient."""
    leaks = {pair: n for pair, n in report["patient_overlap"].items() if n}
    leaks.update(
        {
            f"{name}:train|val": e["train_val_patient_overlap"]
            for name, e in report["sets"].items()
            if e.get("train_val_patient_overlap")
        }
    )
    if leaks:
        raise PartitionError(f"patients shared between sets (must be 0): {leaks}")


def prevalence_table(report: dict) -> str:
    """A plain-text table: one row per set, prevalence (%) of each finding."""
    short = [f[:6] for f in FINDINGS]
    header = f"{'set':<8}{'images':>8}{'patients':>9} " + " ".join(f"{s:>6}" for s in short)
    lines = [header]
    for name, e in report["sets"].items():
        cells = " ".join(f"{100 * e['prevalence'][f]:>6.2f}" for f in FINDINGS)
        lines.append(f"{name:<8}{e['images']:>8}{e['patients']:>9} {cells}")
    return "\n".join(lines)
