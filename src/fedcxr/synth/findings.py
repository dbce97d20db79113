"""The findings as tables keyed by label: how each one changes the anatomy and how it is painted."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from fedcxr.synth import detmath as dm
from fedcxr.synth.anatomy import Anatomy, Canvas
from fedcxr.synth.lesions import REF, blob, box_anat, patches, place, window
from fedcxr.synth.raster import ellipse, field, ss

__all__ = ["MODIFIERS", "PAINTERS", "Modifier", "Painter"]

Box = tuple[float, float, float, float]
# Each takes the finding's own random stream, its boxes (NIH pixels) and a dict that carries what
# the modifier decided (e.g. the side) on to the painter.
Modifier = Callable[[Anatomy, np.random.Generator, list[Box], dict], None]
Painter = Callable[[Canvas, np.random.Generator, list[Box], dict], None]


# --------------------------------------------------------------------------- anatomy modifiers


def _modify_cardiomegaly(an: Anatomy, rng: np.random.Generator, boxes: list, info: dict) -> None:
    if boxes:
        bw = boxes[0][2] / REF
        target = float(np.clip(bw / (2.0 * an.tw), 0.56, 0.7))
    else:
        target = rng.uniform(0.57, 0.68)
    an.heart_scale = (an.heart_scale[0] * target / an.ctr, an.heart_scale[1] * 1.08)


def _modify_emphysema(an: Anatomy, rng: np.random.Generator, boxes: list, info: dict) -> None:
    shift = rng.uniform(0.035, 0.06)
    an.dome_shift = [v + shift for v in an.dome_shift]
    an.dome_flat = 0.45
    an.mark_gain *= 0.45
    an.lucency *= rng.uniform(1.25, 1.4)
    an.heart_scale = (an.heart_scale[0] * 0.88, an.heart_scale[1])


def _modify_atelectasis(an: Anatomy, rng: np.random.Generator, boxes: list, info: dict) -> None:
    side = int(rng.integers(2))
    if boxes:
        side = int(box_anat(an, boxes[0])[0] >= an.cx)
    info["side"] = side
    an.dome_shift[side] -= rng.uniform(0.03, 0.05)
    an.med_shift += 0.012 if side else -0.012


def _modify_fibrosis(an: Anatomy, rng: np.random.Generator, boxes: list, info: dict) -> None:
    an.dome_shift = [v - 0.015 for v in an.dome_shift]


def _modify_pneumothorax(an: Anatomy, rng: np.random.Generator, boxes: list, info: dict) -> None:
    if boxes:
        cx, _, w, _ = box_anat(an, boxes[0])
        side = int(cx >= an.cx)
        frac = float(np.clip(w / an.tw * 0.9, 0.15, 0.45))
    else:
        side = int(rng.integers(2))
        frac = rng.uniform(0.18, 0.4)
    an.ptx.append((side, frac))
    an.med_shift += -0.006 if side else 0.006


def _modify_edema(an: Anatomy, rng: np.random.Generator, boxes: list, info: dict) -> None:
    an.mark_gain *= 1.3


# Findings that change the anatomy itself, applied (in FINDINGS order) before it is drawn.
# Effusion side/height are drawn later from the same RNG stream, by its painter.
MODIFIERS: dict[str, Modifier] = {
    "Atelectasis": _modify_atelectasis,
    "Cardiomegaly": _modify_cardiomegaly,
    "Edema": _modify_edema,
    "Emphysema": _modify_emphysema,
    "Fibrosis": _modify_fibrosis,
    "Pneumothorax": _modify_pneumothorax,
}


# --------------------------------------------------------------------------- painters


def _locations(
    ctx: Canvas, rng: np.random.Generator, finding: str, boxes: list, prior: Box
) -> list[tuple[float, ...]]:
    """The given boxes in anatomy coordinates, or else one placed from NIH's boxes (or prior)."""
    return [box_anat(ctx.an, b) for b in boxes] or [place(ctx, rng, finding, prior)]


def _airspace(
    ctx: Canvas, rng: np.random.Generator, finding: str, boxes: list, prior: Box
) -> list[tuple[float, float, float, float]]:
    """Centre and radii (cx, cy, rx, ry) of each airspace opacity of `finding`."""
    out = []
    for cx, cy, w, h in _locations(ctx, rng, finding, boxes, prior):
        rx = float(np.clip(0.5 * w, 0.06, 0.2))
        ry = float(np.clip(0.5 * h, 0.06, 0.22))
        out.append((cx, cy, rx, ry))
    return out


def _opacify(ctx: Canvas, m: np.ndarray, density: float) -> None:
    """Fill the lung air under mask m (whole canvas), adding `density` of tissue inside the lung."""
    ctx.fill = np.maximum(ctx.fill, m)
    ctx.extra += density * m * ctx.lung


def _radius(
    rng: np.random.Generator,
    boxes: list,
    w: float,
    h: float,
    of_box: tuple[float, float],
    prior_px: tuple[int, int],
    clip_px: tuple[int, int],
) -> float:
    """A lesion radius: a random fraction of the given box, else random in NIH pixels; clipped."""
    return float(
        np.clip(
            0.5 * min(w, h) * rng.uniform(of_box[0], of_box[1])
            if boxes
            else rng.uniform(prior_px[0], prior_px[1]) / REF,
            clip_px[0] / REF,
            clip_px[1] / REF,
        )
    )


def _paint_nodule(ctx: Canvas, rng: np.random.Generator, boxes: list, info: dict) -> None:
    for cx, cy, w, h in _locations(ctx, rng, "Nodule", boxes, (0.3, 0.45, 0.07, 0.07)):
        rad = _radius(rng, boxes, w, h, (0.7, 0.9), (6, 28), (5, 30))
        blob(ctx, rng, cx, cy, rad, 0, 0.05)


def _paint_mass(ctx: Canvas, rng: np.random.Generator, boxes: list, info: dict) -> None:
    for cx, cy, w, h in _locations(ctx, rng, "Mass", boxes, (0.3, 0.4, 0.15, 0.15)):
        rad = _radius(rng, boxes, w, h, (0.65, 0.85), (40, 110), (40, 120))
        blob(ctx, rng, cx, cy, rad * 0.8, int(rng.integers(2, 5)), 0.06)


def _paint_consolidation(ctx: Canvas, rng: np.random.Generator, boxes: list, info: dict) -> None:
    for cx, cy, rx, ry in _airspace(ctx, rng, "Consolidation", boxes, (0.3, 0.55, 0.2, 0.2)):
        patches(ctx, rng, cx, cy, rx, ry, 6, -0.35, 0.95, 0.3)


def _paint_infiltration(ctx: Canvas, rng: np.random.Generator, boxes: list, info: dict) -> None:
    for cx, cy, rx, ry in _airspace(ctx, rng, "Infiltration", boxes, (0.3, 0.45, 0.28, 0.28)):
        for _ in range(int(rng.integers(1, 3))):
            ox, oy = rng.normal(0.0, 0.3, 2)
            patches(ctx, rng, cx + ox * rx, cy + oy * ry, rx * 0.9, ry * 0.9, 5, -0.5, 0.5, 1.0)


def _paint_pneumonia(ctx: Canvas, rng: np.random.Generator, boxes: list, info: dict) -> None:
    for cx, cy, rx, ry in _airspace(ctx, rng, "Pneumonia", boxes, (0.3, 0.6, 0.25, 0.25)):
        _pneumonia(ctx, rng, cx, cy, rx, ry)


def _pneumonia(
    ctx: Canvas, rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float
) -> None:
    """One lobar pneumonia: patchy fill with a fissure-sharp upper border and air bronchograms."""
    patch = patches(
        ctx, rng, cx, cy + 0.2 * ry, rx * 1.1, ry * 1.1, 5, -0.35, 0.92, 0.35, write=False
    )
    win = window(ctx, cx, cy + 0.2 * ry, rx * 1.1 * 1.3, ry * 1.1 * 1.3)
    if patch is None or win is None:
        return
    sl, gx, gy = win
    # Sharper upper border along a fissure-like line.
    fiss = cy - 0.6 * ry + rng.uniform(-0.1, 0.1) * (gx - cx)
    top = ss(fiss - 0.004, fiss + 0.01, gy)
    # Air bronchograms: thin dark branching tubes running away from the hilum.
    h, w = gy.shape[0], gx.shape[1]
    a = field(rng, (4, 14), h, w)
    br = ss(0.07, 0.0, np.abs(a)) * ss(0.3, 0.7, patch)
    new = patch * top * (1.0 - 0.4 * br)
    ctx.fill[sl] = np.maximum(ctx.fill[sl], new)


def _paint_effusion(ctx: Canvas, rng: np.random.Generator, boxes: list, info: dict) -> None:
    an = ctx.an
    y, t = ctx.y, ctx.t
    sides = [int(box_anat(an, b)[0] >= an.cx) for b in boxes]
    if not sides:
        u = rng.random()
        sides = [0, 1] if u < 0.35 else [int(u < 0.68)]
    for side in sorted(set(sides)):
        height = rng.uniform(0.03, 0.17)
        ycp = an.yd[side] + an.cp_drop
        tn = np.clip(t / an.tw, 0.0, 1.2)
        surf = ycp - height - (0.06 + 0.6 * height) * tn * tn - 0.01
        sel = ctx.right if side == 1 else ~ctx.right
        fl = ss(surf - 0.02, surf + 0.03, y) * sel
        _opacify(ctx, fl, 0.03)


def _paint_atelectasis(ctx: Canvas, rng: np.random.Generator, boxes: list, info: dict) -> None:
    an, e = ctx.an, ctx.edge
    if boxes:
        cx, cy, w, _ = box_anat(an, boxes[0])
    else:
        side = info["side"]
        yb = an.yd[side] - rng.uniform(0.04, 0.1)
        ax = an.cx + (1 if side else -1) * rng.uniform(0.45, 0.65) * an.tw
        cx, cy = ax, yb
        w = rng.uniform(0.15, 0.28)
    ang = rng.uniform(-0.25, 0.25)
    half = float(np.clip(0.5 * w, 0.05, 0.18))
    th = rng.uniform(0.007, 0.014)
    win = window(ctx, cx, cy, half + 0.02, half * 0.3 + 0.03)
    if win is not None:
        sl, gx, gy = win
        ca, sa = math.cos(ang), math.sin(ang)
        al = (gx - cx) * ca + (gy - cy) * sa
        pe = -(gx - cx) * sa + (gy - cy) * ca
        band = ss(th + e, th - e * 0.5, np.abs(pe)) * ss(half, half * 0.6, np.abs(al))
        ctx.fill[sl] = np.maximum(ctx.fill[sl], 0.9 * band)
        ctx.extra[sl] += 0.02 * band
        # Some haze around the collapsed segment.
        haze = dm.exp(-((pe / (4 * th)) ** 2)) * ss(half * 1.2, half * 0.5, np.abs(al))
        ctx.fill[sl] = np.maximum(ctx.fill[sl], 0.3 * haze)


def _paint_edema(ctx: Canvas, rng: np.random.Generator, boxes: list, info: dict) -> None:
    an = ctx.an
    x, y, t = ctx.x, ctx.y, ctx.t
    for side in (0, 1):
        s = 1.0 if side else -1.0
        hx = an.cx + an.med_shift + s * (an.hil_dx + 0.04)
        r2 = ((x - hx) / 0.14) ** 2 + ((y - an.hil_y - 0.02) / 0.16) ** 2
        noise = field(rng, (10, 10), ctx.n, ctx.n)
        bat = 0.75 * dm.exp(-r2) * (1.0 + 0.25 * noise)
        sel = ctx.right if side else ~ctx.right
        ctx.fill = np.maximum(ctx.fill, np.clip(bat, 0, 1) * sel)
    # Kerley B lines: short horizontal lines at the lateral bases.
    ydm = ctx.yd_arr
    period = rng.uniform(0.011, 0.016)
    ph = (y / period) % 1.0
    lines = ss(0.22, 0.1, np.abs(ph - 0.5))
    zone = ss(an.tw - 0.06, an.tw - 0.02, t) * ss(ydm - 0.17, ydm - 0.1, y)
    ctx.fill = np.maximum(ctx.fill, 0.55 * lines * zone)


def _paint_emphysema(ctx: Canvas, rng: np.random.Generator, boxes: list, info: dict) -> None:
    an = ctx.an
    x, y, e = ctx.x, ctx.y, ctx.edge
    # Apical bullae: round lucent areas without markings.
    for _ in range(int(rng.integers(1, 4))):
        side = int(rng.integers(2))
        s = 1.0 if side else -1.0
        bx = an.cx + s * rng.uniform(0.4, 0.75) * an.tw
        by = an.ya + rng.uniform(0.04, 0.12)
        rad = rng.uniform(0.03, 0.06)
        b, _ = ellipse(x, y, bx, by, rad, rad * 0.9, e)
        ctx.vess = ctx.vess * (1.0 - b)
        ctx.air = ctx.air * (1.0 + 0.15 * b)
        ring = b * (1.0 - b) * 4.0
        ctx.extra += 0.03 * ring * ctx.lung


def _paint_fibrosis(ctx: Canvas, rng: np.random.Generator, boxes: list, info: dict) -> None:
    an = ctx.an
    y, t = ctx.y, ctx.t
    n = ctx.n
    n1 = field(rng, (64, 64), n, n)
    n2 = field(rng, (64, 64), n, n)
    net = np.maximum(ss(0.22, 0.0, np.abs(n1)), ss(0.22, 0.0, np.abs(n2)))
    periph = ss(an.tw * 0.45, an.tw * 0.9, t)
    upper = rng.random() < 0.5
    zone = (
        ss(an.hil_y + 0.05, an.ya + 0.05, y) if upper else ss(an.hil_y - 0.05, an.hil_y + 0.12, y)
    )
    zone = 0.4 + 0.6 * zone
    ctx.fill = np.maximum(ctx.fill, np.clip((0.55 * net + 0.12) * periph * zone, 0, 1))


def _paint_pleural_thickening(
    ctx: Canvas, rng: np.random.Generator, boxes: list, info: dict
) -> None:
    an = ctx.an
    y, t = ctx.y, ctx.t
    apical = rng.random() < 0.4 and not boxes
    side = int(box_anat(an, boxes[0])[0] >= an.cx) if boxes else int(rng.integers(2))
    sel = ctx.right if side else ~ctx.right
    wob = field(rng, (12, 2), ctx.n, 2)[:, :1]
    th = rng.uniform(0.016, 0.03) * (1.0 + 0.35 * wob)
    inner, _ = ctx.lung_shape(t + th, y, ctx.yd_arr)
    rim = (1.0 - inner) * sel
    if apical:
        rim = rim * ss(an.ya + 0.12, an.ya + 0.06, y)
    else:
        ylo, yhi = an.ya + rng.uniform(0.08, 0.2), an.yd[side] + rng.uniform(-0.05, 0.04)
        rim = rim * ss(ylo - 0.04, ylo, y) * ss(yhi, yhi - 0.04, y)
    _opacify(ctx, rim, 0.06)


def _paint_hernia(ctx: Canvas, rng: np.random.Generator, boxes: list, info: dict) -> None:
    an, e = ctx.an, ctx.edge
    if boxes:
        cx, cy, w, _ = box_anat(an, boxes[0])
        rad = float(np.clip(0.5 * w, 0.035, 0.09))
    else:
        cx = an.cx + rng.uniform(-0.01, 0.04)
        cy = an.yd[0] - rng.uniform(0.04, 0.07)
        rad = rng.uniform(0.045, 0.075)
    win = window(ctx, cx, cy, rad * 1.2, rad * 1.2)
    if win is not None:
        sl, gx, gy = win
        m, r = ellipse(gx, gy, cx, cy, rad, rad * 0.85, e)
        level = cy + rad * rng.uniform(-0.3, 0.2)
        air_part = m * ss(level + e, level - e, gy)
        wall = dm.exp(-((((r - 1.0) * rad) / (1.5 * e)) ** 2))
        ctx.extra[sl] += -0.2 * air_part + 0.07 * m * (1.0 - air_part) + 0.05 * wall
        lvl = dm.exp(-(((gy - level) / e) ** 2)) * m
        ctx.extra[sl] += 0.06 * lvl


def _drawn_with_anatomy(ctx: Canvas, rng: np.random.Generator, boxes: list, info: dict) -> None:
    """Nothing to paint: the modifier changed the anatomy, which draws the finding."""


# One painter per finding, called in FINDINGS order after the anatomy is drawn.
PAINTERS: dict[str, Painter] = {
    "Atelectasis": _paint_atelectasis,
    "Cardiomegaly": _drawn_with_anatomy,  # the enlarged heart
    "Consolidation": _paint_consolidation,
    "Edema": _paint_edema,
    "Effusion": _paint_effusion,
    "Emphysema": _paint_emphysema,
    "Fibrosis": _paint_fibrosis,
    "Hernia": _paint_hernia,
    "Infiltration": _paint_infiltration,
    "Mass": _paint_mass,
    "Nodule": _paint_nodule,
    "Pleural_Thickening": _paint_pleural_thickening,
    "Pneumonia": _paint_pneumonia,
    "Pneumothorax": _drawn_with_anatomy,  # rim without markings, pleural line
}
