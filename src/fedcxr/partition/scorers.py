"""The partitioner registry: how much each patient belongs at each site, per strategy."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd

from fedcxr.config import REGISTRIES, PartitionConfig
from fedcxr.labels import FINDINGS

# A partitioner scores how much each patient "belongs" at each site (higher = preferred).
# The capacity-aware fill (plan.fill_exact) turns scores into an exact-size, patient-disjoint split.

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


def gumbel(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Standard Gumbel noise of `shape`: the soft randomness of every scorer and draw."""
    return rng.gumbel(size=shape)


@register("iid")
def iid_scores(patients: pd.DataFrame, k: int, rng: np.random.Generator, cfg: PartitionConfig):
    """Every patient equally likely at every site."""
    return gumbel(rng, (len(patients), k))


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
    return 1.5 * features @ profiles.T + gumbel(rng, (len(patients), k))


@register("dirichlet")
def dirichlet_scores(
    patients: pd.DataFrame, k: int, rng: np.random.Generator, cfg: PartitionConfig
) -> np.ndarray:
    """Label skew: each patient's primary finding is spread over sites by Dirichlet(alpha)."""
    n_classes = len(FINDINGS) + 1
    shares = rng.dirichlet(np.full(k, cfg.dirichlet_alpha), size=n_classes)
    log_shares = np.log(np.clip(shares, 1e-12, None))
    return log_shares[patients["primary_label"].to_numpy()] + gumbel(rng, (len(patients), k))
