"""The patient-disjoint split: per-patient features, exact-size filling and the split plan."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedcxr.config import PartitionConfig
from fedcxr.labels import FINDINGS
from fedcxr.partition.scorers import PARTITIONERS, gumbel
from fedcxr.partition.sizes import TEST, UNUSED, PartitionError, SizeFit, fit_sizes, site_names

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
            sizes, gumbel(rng, (len(patients), 2)), [test_target, len(meta) - test_target], rng
        )
    else:
        # Every single-image patient is held in reserve, so each of the three draws gets them
        # in the data's share (not only a few to close its gap) and the sites, drawn next from
        # a small pool, can still be met exactly.
        capacities = [test_target, sum(targets[1:]), fit.unused]
        first = fill_exact(sizes, gumbel(rng, (len(patients), 3)), capacities, rng, 1.0)
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
            sizes[members], gumbel(rng, (len(members), 2)), [n_val, n_site - n_val], rng
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
