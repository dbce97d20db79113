"""Patient-disjoint splitting into a held-out test set and simulated hospital sites."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from itertools import combinations
from typing import Any

import numpy as np
import pandas as pd

from fedcxr.config import REGISTRIES, PartitionConfig
from fedcxr.labels import FINDINGS

TEST = "test"
UNUSED = "unused"  # images of patients in no set (partition.fit exact, sizes below the data)
AGE_BANDS = ((0, 18), (18, 40), (40, 60), (60, 200))
FULL_SCALE_IMAGES = 112_120  # every NIH ChestX-ray14 image: sizes summing to it are full scale


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


@dataclass(frozen=True)
class SizeFit:
    """How the configured sizes [test, site...] were met on the data (partition.fit)."""

    fit: str  # partition.fit as configured: auto | exact | scale
    mode: str  # what it came to: exact | scale
    configured: tuple[int, ...]
    targets: tuple[int, ...]  # the sizes aimed at: configured, or scaled to the data
    n_images: int

    @property
    def scaled(self) -> bool:
        return self.targets != self.configured

    @property
    def unused(self) -> int:
        return self.n_images - sum(self.targets)

    def describe(self) -> str:
        """One sentence for the console and the report."""
        total = sum(self.configured)
        if self.scaled:
            return (
                f"sizes scaled in proportion (partition.fit {self.fit}): configured sum "
                f"{total:,} -> the data's {self.n_images:,} images"
            )
        left = f"; {self.unused:,} image(s) left unused" if self.unused else ""
        return f"sizes used as configured (partition.fit {self.fit}): sum {total:,}{left}"

    def to_json(self) -> dict[str, Any]:
        return {
            "fit": self.fit,
            "mode": self.mode,
            "configured_total": sum(self.configured),
            "data_images": self.n_images,
            "scaled": self.scaled,
            "unused_images": self.unused,
            "note": self.describe(),
        }


def fit_sizes(
    n_images: int, test_size: int, site_sizes: tuple[int, ...], fit: str = "auto"
) -> SizeFit:
    """Set sizes [test, site...] for n_images under partition.fit; a misfit is a PartitionError.

    exact: the sizes are image counts; their sum may not exceed n_images, and images left over
    stay unused. scale: the sizes are proportions, scaled (largest remainder) to all n_images.
    auto: scale when the sizes are full scale (they sum to all 112,120 NIH images) and the data
    is a subset of that (the embedded default); exact otherwise.
    """
    configured = (int(test_size), *(int(s) for s in site_sizes))
    total = sum(configured)
    if fit not in ("auto", "exact", "scale"):
        raise PartitionError(f"expected partition.fit auto, exact or scale, found {fit!r}")
    mode = fit
    if fit == "auto":
        mode = "scale" if total == FULL_SCALE_IMAGES and n_images < total else "exact"
    if mode == "exact":
        if total > n_images:
            why = (
                f" (partition.fit auto scales only full-scale sizes, which sum to "
                f"{FULL_SCALE_IMAGES:,})"
                if fit == "auto"
                else ""
            )
            raise PartitionError(
                f"partition sizes sum to {total:,} images (test_size {test_size:,} + "
                f"site_sizes {' + '.join(f'{s:,}' for s in site_sizes)}) but the data has "
                f"{n_images:,}; expected a sum of at most {n_images:,}{why}. Lower "
                f"partition.test_size/site_sizes, or set partition.fit: scale to use them as "
                f"proportions of the data"
            )
        return SizeFit(fit, mode, configured, configured, n_images)
    targets = tuple(scale_targets(n_images, test_size, site_sizes))
    names = (TEST, *site_names(len(site_sizes)))
    empty = [name for name, t in zip(names, targets, strict=True) if t == 0]
    if empty:
        raise PartitionError(
            f"partition sizes {list(configured)} scaled to the data's {n_images:,} images "
            f"leave {empty} with no image; expected at least one image per set"
        )
    return SizeFit(fit, mode, configured, targets, n_images)


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
    """Add a scorer under `name`, which must also be listed in fedcxr.config.REGISTRIES (so
    partition.strategy is checked when params load, without importing this module)."""
    listed = REGISTRIES["partition.strategy"][1]
    if name not in listed:
        raise ValueError(
            f"partitioner {name!r} is not listed in fedcxr.config.REGISTRIES"
            f"['partition.strategy'] {list(listed)}; add it there too"
        )

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


def _settle_with_unused(
    patient_set: np.ndarray, sizes: np.ndarray, targets: list[int], rng: np.random.Generator
) -> None:
    """Meet every set's target exactly by trading whole patients with the unused images (-1).

    Small sets drawn from a small pool can miss their size by a few images; with unused images
    to spare, an over-full set gives patients back (those no larger than the excess first) and
    an under-full one takes single-image patients from the unused ones. In place.
    """
    for s, target in enumerate(targets):
        got = int(sizes[patient_set == s].sum())
        while got > target:
            members = np.flatnonzero(patient_set == s)
            fitting = members[sizes[members] <= got - target]
            drop = rng.choice(fitting) if len(fitting) else members[np.argmin(sizes[members])]
            patient_set[drop] = -1
            got -= int(sizes[drop])
        free = np.flatnonzero((patient_set < 0) & (sizes == 1))
        if 0 < target - got <= len(free):
            patient_set[rng.choice(free, size=target - got, replace=False)] = s


# ---------------------------------------------------------------- the split


@dataclass(frozen=True)
class SplitPlan:
    """Per image (in metadata order): its set (test, a site, or unused) and split."""

    sets: tuple[str, ...]  # test first, then sites
    targets: tuple[int, ...]
    assignment: np.ndarray  # per image: index into sets, or -1 for an unused image
    split: np.ndarray  # per image: "train" | "val" | "test" | "unused"
    sizes: SizeFit  # how the configured sizes met the data

    def set_of(self) -> np.ndarray:
        names = np.asarray([*self.sets, UNUSED], dtype=object)
        return names[np.where(self.assignment < 0, len(self.sets), self.assignment)]


def plan_split(meta: pd.DataFrame, cfg: PartitionConfig, seed: int) -> SplitPlan:
    """Split images by patient into a test set and len(cfg.site_sizes) sites, exactly sized.

    The sizes are met as partition.fit says (fit_sizes): exactly, leaving any other images
    unused, or scaled in proportion to the data.
    """
    if cfg.strategy not in PARTITIONERS:
        raise PartitionError(
            f"unknown partition.strategy {cfg.strategy!r}; expected one of {sorted(PARTITIONERS)}"
        )
    if meta.empty:
        raise PartitionError("cannot split an empty metadata table")
    rng = np.random.default_rng([seed, 7])
    sets = (TEST, *site_names(len(cfg.site_sizes)))
    fit = fit_sizes(len(meta), cfg.test_size, cfg.site_sizes, cfg.fit)
    targets = list(fit.targets)
    patients = patient_table(meta)
    sizes = patients["n_images"].to_numpy()

    # 1. The held-out test set (and any unused images): random patients, representative of the
    #    whole population. Without unused images this is exactly the two-way draw it always was.
    test_target = targets[0]
    if fit.unused == 0:
        first = fill_exact(
            sizes, _gumbel(rng, (len(patients), 2)), [test_target, len(meta) - test_target], rng
        )
    else:
        # Every single-image patient is held in reserve, so each of the three draws gets them
        # in the data's share (not only a few to close its gap) and the sites, drawn next from
        # a small pool, can still be met exactly.
        capacities = [test_target, sum(targets[1:]), fit.unused]
        first = fill_exact(sizes, _gumbel(rng, (len(patients), 3)), capacities, rng, 1.0)
    is_test = first == 0
    is_unused = first == 2

    # 2. Sites: the configured strategy scores the remaining patients.
    in_sites = ~is_test & ~is_unused
    rest = patients[in_sites]
    scores = PARTITIONERS[cfg.strategy](rest, len(targets) - 1, rng, cfg)
    reserve = 0.05 if fit.unused == 0 else 1.0  # the small pool needs all its singles
    site_of_rest = fill_exact(rest["n_images"].to_numpy(), scores, targets[1:], rng, reserve) + 1
    patient_set = np.zeros(len(patients), dtype=np.int64)
    patient_set[in_sites] = site_of_rest
    patient_set[is_unused] = -1
    if fit.unused:
        _settle_with_unused(patient_set, sizes, targets, rng)

    # 3. A patient-disjoint validation split inside each site.
    patient_split = np.where(patient_set == 0, "test", "train").astype(object)
    patient_split[patient_set < 0] = UNUSED
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
        sizes=fit,
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
    unused = set_of == UNUSED
    if unused.any():  # unused patients must be in no set either
        groups[UNUSED] = set(meta.loc[unused, "patient_id"])
    overlap = patient_overlap(groups)
    targets_met = all(sets[n]["images"] == sets[n]["target"] for n in plan.sets)
    fit = plan.sizes
    report: dict[str, Any] = {
        "strategy": cfg.strategy,
        "seed": seed,
        "config": cfg.model_dump(mode="json"),
        "total_images": len(meta),
        "total_patients": int(meta["patient_id"].nunique()),
        "sets": sets,
        "patient_overlap": overlap,
        "patient_overlap_total": int(sum(overlap.values())),
        # True only when every set holds exactly the configured number of images (not when
        # scaled sizes were met): the sizes meant what they said.
        "exact_sizes": targets_met and not fit.scaled,
        "targets_met": targets_met,
        "sizes": fit.to_json(),
        "unused": {
            "images": int(unused.sum()),
            "patients": int(meta.loc[unused, "patient_id"].nunique()),
        },
    }
    return report


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
