"""Pixel primitives of the synthetic radiographs: smoothstep, resampling, noise, blur, ellipses."""

from __future__ import annotations

from typing import Any

import numpy as np
from PIL import Image

__all__ = ["blur", "ellipse", "field", "resize", "ss", "upsample4"]


def ss(e0: Any, e1: Any, x: Any) -> Any:
    """Smoothstep from e0 to e1 (e0 > e1 gives a falling edge)."""
    if np.ndim(e0) == 0 and np.ndim(e1) == 0:
        t = (x - e0) * (1.0 / (e1 - e0))
    else:
        t = (x - e0) / (e1 - e0)
    if np.ndim(t) == 0:
        t = min(max(float(t), 0.0), 1.0)
        return t * t * (3.0 - 2.0 * t)
    np.maximum(t, 0.0, out=t)  # = np.clip(t, 0, 1), without clip's overhead
    np.minimum(t, 1.0, out=t)
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


# Output pixel 4i + p of a 4x upsampling sits at input i - 0.375, -0.125, +0.125, +0.375:
# a[i] plus that fraction of the step to the neighbour on that side (linear interpolation).
_PHASES4 = (
    (-1, np.float32(0.375)),
    (-1, np.float32(0.125)),
    (1, np.float32(0.125)),
    (1, np.float32(0.375)),
)


def _up4_rows(pad: np.ndarray, step: np.ndarray, i0: int, i1: int, out: np.ndarray) -> None:
    """Input rows i0..i1 upsampled 4x into out[i1 - i0, 4, ...].

    pad is the input with its edge rows repeated once (row i is pad[i + 1]); step[j] is
    pad[j + 1] - pad[j].
    """
    n = i1 - i0
    rows = pad[i0 + 1 : i1 + 1]
    for p, (side, frac) in enumerate(_PHASES4):
        o = out[:n, p]
        if side < 0:
            np.multiply(step[i0:i1], -frac, out=o)
        else:
            np.multiply(step[i0 + 1 : i1 + 1], frac, out=o)
        o += rows


def _up4(a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The rows of `a` with the edge rows repeated, and their steps, for `_up4_rows`."""
    pad = np.concatenate([a[:1], a, a[-1:]])
    return pad, pad[1:] - pad[:-1]


def upsample4(
    a: np.ndarray, noise: np.ndarray | None = None, quantize: bool = False, block: int = 16
) -> np.ndarray:
    """`a` (2-D) upsampled 4x in both axes by bilinear interpolation, in float32.

    `resize(a, 4h, 4w, bicubic=False)` (PIL's BILINEAR) up to rounding, in NumPy and several
    times as fast: two operations per output pixel. float32 + and * round identically on every
    CPU, so the bits do not depend on it. `noise` (shape (4h, 4w)) is added; with `quantize`
    the result is clipped to 0..255 and truncated to uint8. Full-size rows are made `block`
    input rows at a time, so the temporaries stay in cache.
    """
    a = np.asarray(a, dtype=np.float32)
    h, w = a.shape
    across = np.empty((w, 4, h), np.float32)
    _up4_rows(*_up4(np.ascontiguousarray(a.T)), 0, w, across)
    pad, step = _up4(np.ascontiguousarray(across.reshape(4 * w, h).T))
    result = np.empty((4 * h, 4 * w), np.uint8 if quantize else np.float32)
    buf = np.empty((block, 4, 4 * w), np.float32)
    for i0 in range(0, h, block):
        i1 = min(i0 + block, h)
        rows = slice(4 * i0, 4 * i1)
        _up4_rows(pad, step, i0, i1, buf)
        part = buf[: i1 - i0].reshape(4 * (i1 - i0), 4 * w)
        if noise is not None:
            part += noise[rows]
        if quantize:
            np.clip(part, 0.0, 255.0, out=part)
            result[rows] = part  # truncates toward zero
        else:
            result[rows] = part
    return result


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
