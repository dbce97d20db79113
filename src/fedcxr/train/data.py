"""Training data: a Dataset of uint8 site images with seeded augmentation, labels, class weights."""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from fedcxr.labels import FINDINGS
from fedcxr.parallel import available_cores
from fedcxr.sitedata import IMAGES, SiteData
from fedcxr.train.augment import draw_params, model_input

TASKS = ("multilabel", "pneumonia")
PNEUMONIA = "Pneumonia"
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


def to_input(image: np.ndarray, image_size: int) -> torch.Tensor:
    """uint8 S x S image -> normalised float 1 x image_size x image_size (no augmentation):
    the pixels an unaugmented loader item gives the model, for one image (Grad-CAM)."""
    small = resize_image(image, image_size)
    return model_input(torch.from_numpy(small)[None, None], None)[0]


def resize_image(image: np.ndarray, size: int) -> np.ndarray:
    """uint8 S x S -> uint8 size x size with Pillow's antialiased bilinear filter."""
    if image.shape[-1] == size:
        return np.ascontiguousarray(image, dtype=np.uint8)
    pil = Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8))
    return np.array(pil.resize((size, size), Image.Resampling.BILINEAR), dtype=np.uint8)


def training_copy(
    arrays: Sequence[np.ndarray], site_of: np.ndarray, row_of: np.ndarray, size: int
) -> np.ndarray:
    """Image k = arrays[site_of[k]][row_of[k]], down-sampled once to size x size into one
    uint8 array in memory, so that no item is resized again per epoch. Pillow releases the
    GIL: threads share the work."""
    out = np.empty((len(row_of), size, size), dtype=np.uint8)

    def one(k: int) -> None:
        out[k] = resize_image(arrays[site_of[k]][row_of[k]], size)

    with ThreadPoolExecutor(max_workers=available_cores()) as pool:
        list(pool.map(one, range(len(row_of))))
    return out


class XrayDataset(Dataset[tuple[torch.Tensor, ...]]):
    """Rows of one or more site folders as (uint8 1 x s x s image, label[, augmentation]).

    The model takes an item through `fedcxr.train.augment.model_input`, on the training
    device (train_epoch and predict do it): the loader only moves uint8 pixels. Below the
    stored size (resize.size) the rows are down-sampled to image_size once, when the dataset is
    made (`training_copy`, in memory: image_size^2 bytes per image); at the stored size they
    stay memory-mapped. Augmentation parameters for item i in epoch e are drawn from numpy's
    generator seeded with (seed, e, i), so batches do not depend on worker count or
    scheduling; call set_epoch(e) before each epoch (train_epoch does).
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
        # Below the stored size: every selected row once at image_size, in item order.
        self._small: np.ndarray | None = None
        if any(s.images.shape[-1] != image_size for s in sites):
            self._small = training_copy(self._images, self.site_of, self.row_of, image_size)

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

    def __getitem__(self, i: int) -> tuple[torch.Tensor, ...]:
        if self._small is not None:
            image = self._small[i]
        else:
            image = np.asarray(self._arrays()[self.site_of[i]][self.row_of[i]])
        x = torch.from_numpy(np.array(image, dtype=np.uint8))[None]
        y = torch.from_numpy(self.labels[i])
        if not self.augment:
            return x, y
        rng = np.random.default_rng([self.seed, self.epoch, int(i)])
        return x, y, torch.from_numpy(draw_params(rng, self.image_size))


MAX_AUTO_WORKERS = 8


def loader_workers(value: int | str, processes: int = 1, cuda: bool | None = None) -> int:
    """The DataLoader workers for train.num_workers: a count as given; `auto` gives none on
    CPU (items are uint8 slices; the augmentation runs where the model trains, and workers
    would take cores from it) and, on CUDA, this process's share of the cores less the one
    that drives the GPU: max(1, min(8, cores // processes - 1))."""
    if value != "auto":
        return int(value)
    if not (torch.cuda.is_available() if cuda is None else cuda):
        return 0
    return max(1, min(MAX_AUTO_WORKERS, available_cores() // max(1, processes) - 1))


def make_loader(
    dataset: Dataset,
    batch_size: int,
    *,
    shuffle: bool,
    seed: int = 0,
    num_workers: int | str = 0,
    processes: int = 1,
) -> DataLoader:
    """A DataLoader whose shuffling comes from its own generator seeded with `seed`; workers
    from `loader_workers(num_workers, processes)`. Workers are started for each epoch, not
    kept: a kept worker holds its own copy of the dataset and would not see set_epoch, so its
    augmentation would repeat epoch 0's (forked workers start in milliseconds)."""
    generator = torch.Generator().manual_seed(seed)
    workers = loader_workers(num_workers, processes)
    return DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=shuffle,
        generator=generator,
        num_workers=workers,
        pin_memory=torch.cuda.is_available(),
        persistent_workers=False,
    )
