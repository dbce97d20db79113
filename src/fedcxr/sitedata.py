"""Per-site (and test-set) image arrays with their index: the layout training reads."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from fedcxr.labels import FINDINGS
from fedcxr.partition import TEST, SplitPlan
from fedcxr.resize import open_shards

IMAGES = "images.npy"
INDEX = "index.csv"
INDEX_COLUMNS = ("image_id", "patient_id", "split", *FINDINGS, "age", "sex", "view")
COPY_BATCH = 512


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


def _copy_rows(shards: list[np.ndarray], shard_images: int, rows: np.ndarray, dest: Path) -> None:
    size = shards[0].shape[1] if shards else 0
    out = np.lib.format.open_memmap(dest, mode="w+", dtype=np.uint8, shape=(len(rows), size, size))
    for start in range(0, len(rows), COPY_BATCH):
        batch = rows[start : start + COPY_BATCH]
        shard_of, offset = np.divmod(batch, shard_images)
        for k in np.unique(shard_of):
            pick = shard_of == k
            out[start + np.flatnonzero(pick)] = shards[k][offset[pick]]
    out.flush()


def write_sets(
    meta: pd.DataFrame, plan: SplitPlan, resized: Path, sites_dir: Path, test_dir: Path
) -> dict[str, Path]:
    """Copy each set's pixels out of the resize shards into its own folder with an index."""
    shard_images = json.loads((resized / "resize.json").read_text())["shard_images"]
    shards = open_shards(resized)
    set_of = plan.set_of()
    folders = {}
    for name in plan.sets:
        folder = test_dir if name == TEST else sites_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        rows = np.flatnonzero(set_of == name)
        _copy_rows(shards, shard_images, rows, folder / IMAGES)
        index = meta.iloc[rows].assign(split=plan.split[rows]).loc[:, list(INDEX_COLUMNS)]
        index.to_csv(folder / INDEX, index=False, lineterminator="\n")
        folders[name] = folder
    return folders
