"""Pixel primitives of the synthetic radiographs: smoothstep, resampling, noise, blur, ellipses."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

__all__ = ["blur", "ellipse", "field", "resize", "ss"]


def ss(e0: Any, e1: Any, x: Any) -> Any:
    """Smoothstep from e0 to e1 (e0 > e1 gives a falling edge)."""
    if np.ndim(e0) == 0 and np.ndim(e1) == 0:
        t = (x - e0) * (1.0 / (e1 - e0))
    else:
        t = (x - e0) / (e1 - e0)
    if np.ndim(t) == 0:
        t = min(max(float(t), 0.0), 1.0)
        return t * t * (3.0 - 2.0 * t)
    np.clip(t, 0.0, 1.0, out=t)
    t2 = t * t
    t *= -2.0
    t += 3.0
    t *= t2
    return t


def resize(a: np.ndarray, h: int, w: int, bicubic: bool = True) -> np.ndarray:
    """`a` resampled by PIL (float32) to shape (h, w)."""
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))
    res = Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR
    return np.asarray(img.resize((w, h), res), dtype=np.float32)


def field(rng: np.random.Generator, cells: tuple[int, int], h: int, w: int) -> np.ndarray:
    """Smooth zero-mean unit-ish noise of shape (h, w) from a small random grid."""
    return resize(rng.standard_normal(cells).astype(np.float32), h, w)


def blur(a: np.ndarray, passes: int) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur applied `passes` times (borders kept)."""
    for _ in range(passes):
        b = a.copy()
        b[1:-1] = 0.25 * (a[:-2] + a[2:]) + 0.5 * a[1:-1]
        c = b.copy()
        c[:, 1:-1] = 0.25 * (b[:, :-2] + b[:, 2:]) + 0.5 * b[:, 1:-1]
        a = c
    return a


def ellipse(x: Any, y: Any, cx: float, cy: float, rx: float, ry: float, e: float) -> Any:
    """Soft ellipse mask (edge width e) and the normalised radius r (1 on the outline)."""
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return ss(1.0 + e / min(rx, ry), 1.0 - e / min(rx, ry), r), r
