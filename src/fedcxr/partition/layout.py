"""Writing the partition's layout: each set's pixels and index into its own folder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from fedcxr.partition.plan import SplitPlan
from fedcxr.partition.sizes import TEST
from fedcxr.resize import open_shards
from fedcxr.sitedata import IMAGES, INDEX, INDEX_COLUMNS

COPY_BATCH = 512


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
