"""What a split plan came to: per-set figures, patient overlap and the leak check."""

from __future__ import annotations

from itertools import combinations
from typing import Any

import pandas as pd

from fedcxr.config import PartitionConfig
from fedcxr.labels import FINDINGS
from fedcxr.partition.plan import SplitPlan
from fedcxr.partition.sizes import TEST, UNUSED, PartitionError

AGE_BANDS = ((0, 18), (18, 40), (40, 60), (60, 200))


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
