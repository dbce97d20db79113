"""Set names and sizes: the sites' names and how configured sizes meet the data (partition.fit)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

TEST = "test"
UNUSED = "unused"  # images of patients in no set (partition.fit exact, sizes below the data)
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
