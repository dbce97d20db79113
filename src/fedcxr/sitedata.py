"""Per-site (and test-set) image arrays with their index: the layout training reads."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedcxr.labels import FINDINGS

IMAGES = "images.npy"
INDEX = "index.csv"
INDEX_COLUMNS = ("image_id", "patient_id", "split", *FINDINGS, "age", "sex", "view")


def find_sites(sites_dir: Path) -> list[str]:
    """Names of the site folders (holding images.npy and index.csv) under `sites_dir`, sorted:
    the one site discovery that training, federation and evaluation share."""
    if not sites_dir.is_dir():
        raise FileNotFoundError(f"sites folder {sites_dir} not found (run the partition stage)")
    names = sorted(
        p.name for p in sites_dir.iterdir() if (p / IMAGES).is_file() and (p / INDEX).is_file()
    )
    if not names:
        raise FileNotFoundError(f"{sites_dir}: expected site folders with {IMAGES} and {INDEX}")
    return names


@dataclass(frozen=True)
class SiteData:
    """One folder: images.npy (N x S x S uint8, memory-mapped) and index.csv (row i = image i)."""

    folder: Path
    images: np.ndarray
    index: pd.DataFrame

    @classmethod
    def open(cls, folder: str | Path) -> SiteData:
        folder = Path(folder)
        for name in (IMAGES, INDEX):
            if not (folder / name).is_file():
                raise FileNotFoundError(
                    f"{folder / name} not found: expected a site folder written by the "
                    "partition stage (images.npy + index.csv)"
                )
        images = np.load(folder / IMAGES, mmap_mode="r")
        index = pd.read_csv(folder / INDEX, dtype={"image_id": str, "patient_id": str})
        if len(index) != len(images):
            raise ValueError(
                f"{folder}: index.csv has {len(index)} rows but images.npy has {len(images)}"
            )
        return cls(folder, images, index)

    def labels(self) -> np.ndarray:
        return self.index[list(FINDINGS)].to_numpy(np.float32)

    def rows(self, split: str) -> np.ndarray:
        return np.flatnonzero(self.index["split"].to_numpy() == split)
