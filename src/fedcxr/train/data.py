"""Training data: a Dataset over site folders with seeded augmentation, labels and class weights."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fedcxr.labels import FINDINGS
from fedcxr.sitedata import IMAGES, SiteData

TASKS = ("multilabel", "pneumonia")
PNEUMONIA = "Pneumonia"
NORM_MEAN = 0.5
NORM_STD = 0.25
# The paper's augmentation: horizontal flip, +-10 degree rotation, random resized crop.
FLIP_P = 0.5
MAX_ROTATION_DEG = 10.0
CROP_SCALE = (0.85, 1.0)
CROP_RATIO = (3.0 / 4.0, 4.0 / 3.0)
POS_WEIGHT_CAP = 100.0


def label_columns(task: str) -> list[str]:
    """Index columns that hold the targets of `task`."""
    if task == "multilabel":
        return list(FINDINGS)
    if task == "pneumonia":
        return [PNEUMONIA]
    raise ValueError(f"unknown task {task!r}; expected one of {list(TASKS)}")


def labels_for(task: str, index_df: pd.DataFrame, source: str = "index") -> np.ndarray:
    """Targets as float32 (N x 14 for multilabel, N x 1 for pneumonia) from a site index."""
    columns = label_columns(task)
    missing = [c for c in columns if c not in index_df.columns]
    if missing:
        raise ValueError(
            f"{source}: expected label column(s) {missing} for task {task!r}, found columns "
            f"{list(index_df.columns)}"
        )
    values = index_df[columns].to_numpy()
    bad = ~np.isin(values, (0, 1))
    if bad.any():
        row, col = np.argwhere(bad)[0]
        raise ValueError(
            f"{source}: expected 0/1 labels, found {values[row, col]!r} in column "
            f"{columns[col]!r} at row {row}"
        )
    return values.astype(np.float32)


def pos_weight(task: str, labels: np.ndarray, cap: float = POS_WEIGHT_CAP) -> torch.Tensor | None:
    """BCE positive-class weight: negatives/positives (capped) for pneumonia; None otherwise."""
    label_columns(task)  # validates the task name
    if task != "pneumonia":
        return None
    labels = np.asarray(labels).reshape(len(labels), -1)
    positives = labels.sum(axis=0)
    negatives = len(labels) - positives
    ratio = np.maximum(negatives, 1.0) / np.maximum(positives, 1.0)
    return torch.as_tensor(np.minimum(ratio, cap), dtype=torch.float32)


def crop_box(
    rng: np.random.Generator,
    size: int,
    scale: tuple[float, float] = CROP_SCALE,
    ratio: tuple[float, float] = CROP_RATIO,
) -> tuple[int, int, int, int]:
    """A random-resized-crop box (top, left, height, width) inside a size x size image."""
    area = size * size * rng.uniform(*scale)
    aspect = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
    width = min(size, max(1, round(math.sqrt(area * aspect))))
    height = min(size, max(1, round(math.sqrt(area / aspect))))
    top = int(rng.integers(0, size - height + 1))
    left = int(rng.integers(0, size - width + 1))
    return top, left, height, width


def to_input(
    image: np.ndarray,
    image_size: int,
    rng: np.random.Generator | None = None,
) -> torch.Tensor:
    """uint8 S x S image -> normalised float 1 x image_size x image_size (augmented if rng).

    Pillow does the per-item work: its resize is antialiased and single-threaded, which is
    several times faster than torch ops on one small image (intra-op threads only add
    overhead there and compete with the training step for the same cores).
    """
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    size = pil.width
    target = (image_size, image_size)
    if rng is None:
        if size != image_size:
            pil = pil.resize(target, Image.Resampling.BILINEAR)
    else:
        top, left, height, width = crop_box(rng, size)
        box = (left, top, left + width, top + height)
        pil = pil.resize(target, Image.Resampling.BILINEAR, box=box)
        if rng.random() < FLIP_P:
            pil = pil.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        angle = float(rng.uniform(-MAX_ROTATION_DEG, MAX_ROTATION_DEG))
        pil = pil.rotate(angle, resample=Image.Resampling.BILINEAR, fillcolor=0)
    x = torch.from_numpy(np.asarray(pil, dtype=np.float32) / 255.0)[None]
    return (x - NORM_MEAN) / NORM_STD


class XrayDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Rows of one or more site folders as (1 x s x s image, label) pairs.

    Augmentation for item i in epoch e is drawn from numpy's generator seeded with
    (seed, e, i), so batches do not depend on worker count or scheduling; call set_epoch(e)
    before each epoch (train_epoch does). Images stay memory-mapped; worker processes reopen
    the folders instead of receiving pickled pixels.
    """

    def __init__(
        self,
        sites: Sequence[SiteData],
        rows: Sequence[np.ndarray],
        task: str,
        image_size: int,
        augment: bool = False,
        seed: int = 0,
    ) -> None:
        if len(sites) == 0 or len(sites) != len(rows):
            raise ValueError(
                f"expected one row selection per site folder, found {len(sites)} folders and "
                f"{len(rows)} selections"
            )
        self.folders = [Path(s.folder) for s in sites]
        self.task = task
        self.image_size = image_size
        self.augment = augment
        self.seed = seed
        self.epoch = 0
        site_of, row_of, labels = [], [], []
        for k, (site, sel) in enumerate(zip(sites, rows, strict=True)):
            sel = np.asarray(sel, dtype=np.int64)
            stored = site.images.shape[-1]
            if image_size > stored:
                raise ValueError(
                    f"{site.folder}: expected train.image_size <= the stored image size "
                    f"{stored} (resize.size), found train.image_size={image_size}"
                )
            if len(sel) and (sel.min() < 0 or sel.max() >= len(site.index)):
                raise IndexError(
                    f"{site.folder}: row selection out of range 0..{len(site.index) - 1}"
                )
            site_of.append(np.full(len(sel), k, dtype=np.int64))
            row_of.append(sel)
            labels.append(labels_for(task, site.index.iloc[sel], str(site.folder / "index.csv")))
        self.site_of = np.concatenate(site_of)
        self.row_of = np.concatenate(row_of)
        self.labels = np.concatenate(labels)
        self._images: list[np.ndarray] | None = [s.images for s in sites]

    @classmethod
    def from_split(
        cls,
        sites: Sequence[SiteData],
        split: str,
        task: str,
        image_size: int,
        augment: bool = False,
        seed: int = 0,
    ) -> XrayDataset:
        """All rows of `split` (train/val/test) from each site, pooled."""
        return cls(sites, [s.rows(split) for s in sites], task, image_size, augment, seed)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.row_of)

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_images"] = None  # memmaps would be pickled as full copies
        return state

    def _arrays(self) -> list[np.ndarray]:
        if self._images is None:
            self._images = [np.load(f / IMAGES, mmap_mode="r") for f in self.folders]
        return self._images

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        image = self._arrays()[self.site_of[i]][self.row_of[i]]
        rng = np.random.default_rng([self.seed, self.epoch, int(i)]) if self.augment else None
        return to_input(image, self.image_size, rng), torch.from_numpy(self.labels[i])


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int = 0,
) -> DataLoader:
    """A DataLoader whose shuffling comes from its own generator seeded with `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=num_workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
