"""Decodes each image once and writes fixed-size uint8 pixels into a few large array shards."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image

from fedcxr.config import ResizeConfig
from fedcxr.imaging import open_image, to_gray8
from fedcxr.parallel import pmap
from fedcxr.sources import ImageItem, iter_images

METHOD = "letterbox to square, then PIL reduce() (exact box average) or LANCZOS"


class ResizeError(ValueError):
    """An image that passed ingest but cannot be found or decoded now (source changed?)."""


def square_resize(pixels: np.ndarray, size: int) -> np.ndarray:
    """Pad to a square with black (no distortion), then shrink or grow to size x size."""
    return square_resize_image(Image.fromarray(np.ascontiguousarray(pixels), mode="L"), size)


def square_resize_image(image: Image.Image, size: int) -> np.ndarray:
    """square_resize on an 8-bit PIL image, without a copy through numpy on the fast path."""
    w, h = image.size
    if h != w:
        side = max(h, w)
        canvas = Image.new("L", (side, side), 0)
        canvas.paste(image, ((side - w) // 2, (side - h) // 2))
        image = canvas
    side = image.size[0]
    if side == size:
        return np.asarray(image)
    if side % size == 0:
        image = image.reduce(side // size)  # area average over exact blocks: fast, alias-free
    else:
        image = image.resize((size, size), Image.Resampling.LANCZOS, reducing_gap=3.0)
    return np.asarray(image)


def decode_resize(item: ImageItem, size: int) -> np.ndarray:
    """Decode one image once, convert to 8-bit gray, resize to size x size."""
    try:
        image = open_image(item.read())
        if image.mode != "L":
            image = Image.fromarray(to_gray8(image), mode="L")
    except (OSError, ValueError, SyntaxError) as exc:
        raise ResizeError(f"{item.location}: cannot decode ({exc}); re-run ingest") from exc
    return square_resize_image(image, size)


_OPEN_SHARDS: dict[str, np.ndarray] = {}


def _write_to_shard(task: tuple[ImageItem, str, int, int]) -> str:
    """Worker: decode one image and write it straight into its slot of a shard file.

    Writing through a shared memory map (instead of returning pixels to the parent) keeps
    the parent idle, so the stage runs at decode speed.
    """
    item, shard_path, offset, size = task
    shard = _OPEN_SHARDS.get(shard_path)
    if shard is None:
        shard = _OPEN_SHARDS[shard_path] = np.load(shard_path, mmap_mode="r+")
    shard[offset] = decode_resize(item, size)
    return item.name


def shard_name(k: int) -> str:
    return f"shard_{k:03d}.npy"


def open_shards(folder: Path) -> list[np.ndarray]:
    """Memory-map every shard of a resized folder (read-only)."""
    meta = json.loads((folder / "resize.json").read_text())
    return [np.load(folder / name, mmap_mode="r") for name in meta["shards"]]


def resize_all(
    root: Path, manifest: pd.DataFrame, metadata: pd.DataFrame, cfg: ResizeConfig, out: Path
) -> dict:
    """Write out/shard_NNN.npy (N x size x size uint8) and out/index.csv in metadata order."""
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob("shard_*.npy"):
        old.unlink()
    n, size = len(metadata), cfg.size
    rows = metadata["manifest_row"].to_numpy()
    names = manifest["image_index"].to_numpy()[rows]
    position = {name: i for i, name in enumerate(names)}
    # Only the copy ingest checked and hashed (a name may also exist elsewhere as a duplicate).
    accepted = dict(zip(names, manifest["location"].to_numpy()[rows], strict=True))
    shard_sizes = [min(cfg.shard_images, n - s) for s in range(0, n, cfg.shard_images)]
    shard_paths = [str(out / shard_name(k)) for k in range(len(shard_sizes))]
    for path, count in zip(shard_paths, shard_sizes, strict=True):
        np.lib.format.open_memmap(
            path, mode="w+", dtype=np.uint8, shape=(count, size, size)
        ).flush()
    written = np.zeros(n, dtype=bool)
    tasks = (
        (
            item,
            shard_paths[position[item.name] // cfg.shard_images],
            position[item.name] % cfg.shard_images,
            size,
        )
        for item in iter_images(root, verify_md5=False, wanted=set(position))
        if item.location == accepted[item.name]
    )
    try:
        for name in pmap(_write_to_shard, tasks, total=n, workers=cfg.workers, desc="resize"):
            written[position[name]] = True
    finally:
        for shard in _OPEN_SHARDS.values():
            shard.flush()
        _OPEN_SHARDS.clear()
    if not written.all():
        missing = names[~written][:10].tolist()
        raise ResizeError(
            f"{int((~written).sum())} image(s) listed by ingest were not found under {root}, "
            f"e.g. {missing}; the source changed since ingest: run `dvc repro` again"
        )
    index = pd.DataFrame(
        {
            "image_id": metadata["image_id"].to_numpy(),
            "shard": np.arange(n) // cfg.shard_images,
            "offset": np.arange(n) % cfg.shard_images,
        }
    )
    index.to_csv(out / "index.csv", index=False, lineterminator="\n")
    summary = {
        "size": size,
        "images": n,
        "method": METHOD,
        "dtype": "uint8",
        "shards": [shard_name(k) for k in range(len(shard_sizes))],
        "shard_images": cfg.shard_images,
    }
    (out / "resize.json").write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return summary
