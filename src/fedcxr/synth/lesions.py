"""Where findings go and the shapes they are drawn with: NIH boxes, placement, blobs, patches."""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import math
from pathlib import Path

import numpy as np

from fedcxr.labels import BBOX_LABEL_ALIASES, FINDINGS
from fedcxr.synth.anatomy import Anatomy, Canvas
from fedcxr.synth.raster import ellipse, field, ss

__all__ = ["REF", "blob", "box_anat", "patches", "place", "window"]

REF = 1024.0  # NIH boxes are given in pixels of the 1024 image


@functools.lru_cache(maxsize=1)
def _nih_boxes() -> dict[str, np.ndarray]:
    """NIH's real finding boxes, (n, 4) arrays of x, y, w, h per finding; {} if unavailable."""
    try:
        spec = importlib.util.find_spec("torchxrayvision")
        if spec is None or not spec.submodule_search_locations:
            return {}
        # Locate the file without importing torchxrayvision (which would import torch).
        path = Path(next(iter(spec.submodule_search_locations))) / "data" / "BBox_List_2017.csv.gz"
        if not path.is_file():
            path = Path(str(importlib.resources.files("torchxrayvision") / "data" / path.name))
        import pandas as pd

        df = pd.read_csv(path, usecols=["Finding Label", "Bbox [x", "y", "w", "h]"])
    except Exception:  # pragma: no cover - torchxrayvision is a hard dependency
        return {}
    df["Finding Label"] = df["Finding Label"].replace(BBOX_LABEL_ALIASES)
    out: dict[str, np.ndarray] = {}
    for name, grp in df.groupby("Finding Label", sort=True):
        if name in FINDINGS:
            arr = grp[["Bbox [x", "y", "w", "h]"]].to_numpy(dtype=np.float64)
            out[str(name)] = arr[np.all(np.isfinite(arr), axis=1)]
    return out


def _box_center(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """An NIH box (x, y, w, h in 1024 image pixels) as centre and size in image fractions."""
    x, y, w, h = box
    return (x + 0.5 * w) / REF, (y + 0.5 * h) / REF, w / REF, h / REF


def box_anat(an: Anatomy, box: tuple[float, float, float, float]) -> tuple[float, ...]:
    """An NIH box as centre and size in anatomy coordinates (undoing this image's pose)."""
    cx, cy, w, h = _box_center(box)
    ax, ay = an.to_anatomy(cx, cy)
    return ax, ay, w / an.scale, h / an.scale


def place(
    ctx: Canvas, rng: np.random.Generator, finding: str, prior: tuple[float, float, float, float]
) -> tuple[float, float, float, float]:
    """Pick a box (cx, cy, w, h in 0..1) from NIH's real boxes, moved into this lung."""
    boxes = _nih_boxes().get(finding)
    an = ctx.an
    if boxes is not None and len(boxes):
        cx, cy, w, h = box_anat(an, tuple(boxes[int(rng.integers(len(boxes)))]))
    else:
        cx, cy, w, h = prior
        cx = cx if rng.random() < 0.5 else 1.0 - cx
    cx += rng.normal(0.0, 0.02)
    cy += rng.normal(0.0, 0.02)
    # Pull the centre into the lung field of the same side.
    side = 1.0 if cx >= an.cx else -1.0
    lx, ly = an.cx + side * 0.5 * (an.mw + an.tw), 0.5 * (an.ya + an.yd[0]) + 0.03
    n, k = ctx.n, ctx.n / ctx.span
    for f in np.linspace(0.0, 1.0, 11):
        px, py = cx + f * (lx - cx), cy + f * (ly - cy)
        i = min(max(int((py - ctx.lo) * k), 0), n - 1)
        j = min(max(int((px - ctx.lo) * k), 0), n - 1)
        if ctx.lung[i, j] > 0.6:
            return px, py, w, h
    return lx, ly, w, h


def window(ctx: Canvas, cx: float, cy: float, rx: float, ry: float):
    n, k = ctx.n, ctx.n / ctx.span
    i0, i1 = max(int((cy - ry - ctx.lo) * k) - 2, 0), min(int((cy + ry - ctx.lo) * k) + 3, n)
    j0, j1 = max(int((cx - rx - ctx.lo) * k) - 2, 0), min(int((cx + rx - ctx.lo) * k) + 3, n)
    if i1 <= i0 or j1 <= j0:
        return None
    return (slice(i0, i1), slice(j0, j1)), ctx.gx[:, j0:j1], ctx.gy[i0:i1, :]


def blob(
    ctx: Canvas, rng: np.random.Generator, cx: float, cy: float, rad: float, lobes: int, dens: float
) -> None:
    """A round (lobes=0) or lobulated soft-tissue density."""
    win = window(ctx, cx, cy, rad * 1.6, rad * 1.6)
    if win is None:
        return
    sl, gx, gy = win
    e = ctx.edge
    m = ellipse(gx, gy, cx, cy, rad, rad * rng.uniform(0.85, 1.1), e)[0]
    for _ in range(lobes):
        a = rng.uniform(0, 2 * math.pi)
        dd = rad * rng.uniform(0.35, 0.6)
        rr = rad * rng.uniform(0.45, 0.7)
        m = np.maximum(
            m, ellipse(gx, gy, cx + dd * math.cos(a), cy + dd * math.sin(a), rr, rr, e)[0]
        )
    ctx.fill[sl] = np.maximum(ctx.fill[sl], m)
    ctx.extra[sl] += dens * m


def patches(
    ctx: Canvas,
    rng: np.random.Generator,
    cx: float,
    cy: float,
    rx: float,
    ry: float,
    cells: int,
    thresh: float,
    level: float,
    soft: float,
    write: bool = True,
) -> np.ndarray | None:
    """Patchy airspace opacity inside an ellipse; returns the added fill in its window."""
    win = window(ctx, cx, cy, rx * 1.3, ry * 1.3)
    if win is None:
        return None
    sl, gx, gy = win
    h, w = gy.shape[0], gx.shape[1]
    noise = field(rng, (cells, cells), h, w)
    r = np.sqrt(((gx - cx) / rx) ** 2 + ((gy - cy) / ry) ** 2)
    env = ss(1.15, 0.55, r)
    patch = level * ss(thresh - soft, thresh + soft, noise + 1.6 * env - 1.0) * env
    if write:
        ctx.fill[sl] = np.maximum(ctx.fill[sl], patch)
    return patch
