"""Renders synthetic chest radiographs whose findings follow NIH ChestX-ray14 labels."""

from __future__ import annotations

import functools
import importlib.resources
import importlib.util
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from fedcxr.labels import BBOX_LABEL_ALIASES, FINDINGS
from fedcxr.synth import detmath as dm

__all__ = ["N_SCANNERS", "RenderSpec", "drawn_findings", "render"]

N_SCANNERS = 4
_WORK = 320  # internal render resolution; the result is upsampled to the requested size
_REF = 1024.0  # NIH boxes are given in pixels of the 1024 image
_U64 = 1 << 64

# Scanner profiles: gamma, gain, offset, noise sigma, blur passes, unsharp amount, heel gradient.
_SCANNERS: tuple[tuple[float, float, float, float, int, float, float], ...] = (
    (1.00, 1.00, 0.00, 0.016, 0, 0.35, 0.04),  # balanced modern DR
    (0.72, 0.80, 0.13, 0.034, 2, 0.00, 0.03),  # bright, flat, noisy, soft CR
    (1.40, 1.12, -0.05, 0.010, 0, 1.10, 0.07),  # dark, contrasty, edge-enhanced
    (1.05, 0.66, 0.18, 0.024, 1, 0.25, 0.12),  # grey background, low contrast, strong heel
)


@dataclass(frozen=True)
class RenderSpec:
    """What to draw: one NIH metadata row plus the seeds that make it reproducible."""

    patient_seed: int
    image_seed: int
    labels: tuple[str, ...]
    boxes: tuple[tuple[str, float, float, float, float], ...] = ()
    view: str = "PA"
    age: float = 50.0
    sex: str = "M"
    scanner: int = 0
    miss_prob: float = 0.1


# --------------------------------------------------------------------------- helpers


def _seed(value: int) -> int:
    return int(value) % _U64


def _rng(spec: RenderSpec, stream: int, with_image: bool = True) -> np.random.Generator:
    parts = [_seed(spec.patient_seed)]
    if with_image:
        parts.append(_seed(spec.image_seed))
    parts.append(stream)
    return np.random.default_rng(parts)


def _ss(e0: Any, e1: Any, x: Any) -> Any:
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


def _resize(a: np.ndarray, h: int, w: int, bicubic: bool = True) -> np.ndarray:
    img = Image.fromarray(np.ascontiguousarray(a, dtype=np.float32))
    res = Image.Resampling.BICUBIC if bicubic else Image.Resampling.BILINEAR
    return np.asarray(img.resize((w, h), res), dtype=np.float32)


def _field(rng: np.random.Generator, cells: tuple[int, int], h: int, w: int) -> np.ndarray:
    """Smooth zero-mean unit-ish noise of shape (h, w) from a small random grid."""
    return _resize(rng.standard_normal(cells).astype(np.float32), h, w)


def _blur(a: np.ndarray, passes: int) -> np.ndarray:
    """Separable [1, 2, 1] / 4 blur applied `passes` times (borders kept)."""
    for _ in range(passes):
        b = a.copy()
        b[1:-1] = 0.25 * (a[:-2] + a[2:]) + 0.5 * a[1:-1]
        c = b.copy()
        c[:, 1:-1] = 0.25 * (b[:, :-2] + b[:, 2:]) + 0.5 * b[:, 1:-1]
        a = c
    return a


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


@functools.lru_cache(maxsize=4)
def _noise_tile(size: int) -> np.ndarray:
    """Fixed full-resolution noise tile; each image reads a randomly offset window of it."""
    rng = np.random.default_rng(0x5EED_0F_C0FFEE)
    return rng.standard_normal((size + 97, size + 97), dtype=np.float32)


def _validate(spec: RenderSpec) -> None:
    unknown = [lab for lab in spec.labels if lab not in FINDINGS]
    if unknown:
        raise ValueError(f"unknown finding label(s) {unknown!r}; expected any of {FINDINGS}")
    if spec.view not in ("PA", "AP"):
        raise ValueError(f"view must be 'PA' or 'AP', got {spec.view!r}")
    if spec.sex not in ("M", "F"):
        raise ValueError(f"sex must be 'M' or 'F', got {spec.sex!r}")
    if not 0 <= int(spec.scanner) < N_SCANNERS:
        raise ValueError(f"scanner must be in 0..{N_SCANNERS - 1}, got {spec.scanner!r}")
    if not 0.0 <= float(spec.miss_prob) <= 1.0:
        raise ValueError(f"miss_prob must be in [0, 1], got {spec.miss_prob!r}")


def drawn_findings(spec: RenderSpec) -> tuple[str, ...]:
    """The labels of `spec` that `render` actually draws (each is missed with miss_prob)."""
    _validate(spec)
    u = _rng(spec, 0x3155).random(len(FINDINGS))
    out: list[str] = []
    for lab in spec.labels:
        if lab not in out and u[FINDINGS.index(lab)] >= spec.miss_prob:
            out.append(lab)
    return tuple(out)


# --------------------------------------------------------------------------- anatomy


_MARGIN = 0.04  # canvas margin (fraction of the image) so the pose warp never samples outside
_VT, _VR = 512, 160  # polar lookup table: angle bins, radius bins


@functools.lru_cache(maxsize=32)
def _vessel_table(pseed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-patient polar noise tables (flattened, both sides) for the vascular tree."""
    rng = np.random.default_rng([pseed, 0x7AB])
    a = rng.standard_normal((2, 40, 4)).astype(np.float32)
    b = rng.standard_normal((2, 120, 4)).astype(np.float32)
    fa = np.stack([_resize(a[i], _VT, _VR) for i in range(2)]).reshape(-1)
    fb = np.stack([_resize(b[i], _VT, _VR) for i in range(2)]).reshape(-1)
    fa.setflags(write=False)
    fb.setflags(write=False)
    return fa, fb


class _Anatomy:
    """Patient anatomy (from patient_seed) adjusted for view, sex, age and image pose."""

    def __init__(self, spec: RenderSpec) -> None:
        p = _rng(spec, 0xA7A, with_image=False)
        female = spec.sex == "F"
        ap = spec.view == "AP"
        ka = float(np.clip((spec.age - 50.0) / 35.0, -1.0, 1.0))
        self.ap = ap
        self.female = female
        self.cx = 0.5 + p.normal(0.0, 0.01)
        self.tw = p.uniform(0.35, 0.41) * (0.95 if female else 1.0)  # lateral lung edge
        self.st = p.uniform(0.03, 0.06)  # soft tissue beyond the ribs
        self.ya = p.uniform(0.13, 0.17) + 0.008 * ka
        self.yd = [p.uniform(0.70, 0.77), 0.0]  # dome top: image left, image right
        self.yd[1] = self.yd[0] + p.uniform(0.01, 0.035)
        self.cp_drop = p.uniform(0.05, 0.08)
        self.mw = p.uniform(0.05, 0.065)
        self.ctr = p.uniform(0.41, 0.48)
        self.hh = p.uniform(0.11, 0.13)
        self.tilt = p.uniform(0.25, 0.45)
        self.rib_y0 = p.uniform(-0.02, 0.005)
        self.rib_sp = p.uniform(0.052, 0.062)
        self.rib_gr = p.uniform(0.0012, 0.0024)
        self.rib_curv = p.uniform(0.8, 1.2)
        self.rot = p.normal(0.0, 0.02)
        self.hil_dx = p.uniform(0.085, 0.11)
        self.hil_q = p.uniform(0.42, 0.5)
        self.knob = 0.026 + 0.01 * max(ka, 0.0) + p.uniform(-0.004, 0.004)
        self.bubble = p.random() < 0.7
        self.breast = p.uniform(0.8, 1.2)
        self.lucency = 1.0 - 0.08 * ka
        self.vessel_table = _vessel_table(_seed(spec.patient_seed))
        self.tex = p.standard_normal((24, 24)).astype(np.float32)
        # Image-level pose jitter and breathing.
        q = _rng(spec, 0x9053)
        self.dx, self.dy = q.normal(0.0, 0.008, 2)
        self.rot += q.normal(0.0, 0.01)
        self.scale = 1.0 + q.normal(0.0, 0.01)
        insp = q.normal(0.0, 0.008)
        self.exposure = q.normal(0.0, 0.025)
        self.noise_off = q.integers(0, 97, 2)
        self.pixel_noise_seed = int(q.integers(0, 2**31))
        if ap:
            insp -= 0.025
        self.yd = [v + insp for v in self.yd]
        # Modifiers that findings may change before the image is drawn.
        self.heart_scale = (1.15, 1.06) if ap else (1.0, 1.0)
        self.dome_shift = [0.0, 0.0]
        self.dome_flat = 1.0
        self.mark_gain = 1.0
        self.mark_blur = False
        self.med_shift = 0.0
        self.ptx: list[tuple[int, float]] = []  # (side, collapse fraction)

    def finalize(self) -> None:
        self.yd = [self.yd[i] + self.dome_shift[i] for i in range(2)]
        self.hw = self.ctr * self.tw * self.heart_scale[0]
        self.hhh = self.hh * self.heart_scale[1]
        self.hx = self.cx + self.med_shift + self.hw / 3.0
        self.hy = self.yd[0] - 0.075 + 0.5 * (self.hhh - self.hh)
        self.hil_y = self.ya + (self.yd[0] - self.ya) * self.hil_q

    def to_anatomy(self, px: Any, py: Any) -> tuple[Any, Any]:
        """Image coordinates (0..1) to anatomy coordinates (undo pose)."""
        c, s = math.cos(self.rot), math.sin(self.rot)
        u = (px - 0.5 - self.dx) / self.scale
        v = (py - 0.5 - self.dy) / self.scale
        return 0.5 + c * u + s * v, 0.5 - s * u + c * v


class _Ctx:
    """Arrays shared by the drawing steps at the internal resolution."""

    def __init__(self, an: _Anatomy, work: int) -> None:
        # The canvas is axis-aligned in anatomy coordinates with a margin, so coordinates are
        # separable (row and column vectors broadcast); pose is applied by one warp at the end.
        self.an = an
        self.work = work
        n = round(work * (1.0 + 2.0 * _MARGIN))
        self.n = n
        self.lo = -_MARGIN
        self.span = 1.0 + 2.0 * _MARGIN
        g = (self.lo + (np.arange(n) + 0.5) * (self.span / n)).astype(np.float32)
        self.x = self.gx = g[None, :]
        self.y = self.gy = g[:, None]
        self.edge = max(1.3 / work, 0.003)
        self.fill = np.zeros((n, n), np.float32)  # fraction of lung air replaced by opacity
        self.extra = np.zeros((n, n), np.float32)  # density added on top of everything
        self.lung = np.zeros((n, n), np.float32)
        # Filled in by _draw_anatomy.
        self.air = self.vess = self.cover = self.abd = self.body = self.lung
        self.t = self.tn = self.ydia = self.yd_arr = self.x
        self.right = np.zeros((1, n), bool)

    def side_params(self, right: np.ndarray) -> dict[str, Any]:
        an = self.an
        yd = np.where(right, np.float32(an.yd[1]), np.float32(an.yd[0]))
        return {"yd": yd}

    def dome(self, t: Any, yd: Any) -> Any:
        """Height of the diaphragm below lateral offset t (yd: dome top for that side)."""
        an = self.an
        m, lw = an.mw, an.tw
        ycp = yd + an.cp_drop
        td = m + 0.45 * (lw - m)
        lat = np.maximum(t - td, 0.0) * (1.0 / (lw - td))
        med = np.maximum(td - t, 0.0) * (1.0 / (td - m))
        return yd + (ycp - yd) * (an.dome_flat * lat * lat + 0.15 * med * med)

    def lung_shape(self, t: Any, y: Any, yd: Any, shrink: float = 0.0) -> tuple[Any, Any]:
        """Soft lung mask for lateral offset t and height y; also returns the dome height."""
        an = self.an
        m, lw = an.mw, an.tw
        ya = an.ya
        yb = ya + 0.24
        ydia = self.dome(t, yd)
        grow = np.clip((y - ya) / (yd - ya), 0.0, 1.0)
        wl = 0.5 * (lw - m) * (0.86 + 0.14 * grow)
        ta = m + wl
        if shrink:
            # Collapse toward the hilum: mostly laterally and apically.
            hx = an.hil_dx
            t = hx + (t - hx) / (1.0 - shrink)
            y = np.where(y < an.hil_y, an.hil_y + (y - an.hil_y) / (1.0 - 0.8 * shrink), y)
        dy = np.minimum(y - yb, 0.0) * (1.0 / (yb - ya))
        dt = (t - ta) / wl
        # Apex sits medially: the lateral half rounds off more slowly.
        dy = dy * (1.0 + 0.25 * _ss(0.4, -0.4, dt))
        r2 = dt * dt + dy * dy
        e = 2.0 * self.edge / wl
        upper = _ss(1.0 + e, 1.0 - e, r2)
        lower = _ss(ydia + self.edge, ydia - self.edge, y)
        return upper * lower, ydia


def _ellipse(x: Any, y: Any, cx: float, cy: float, rx: float, ry: float, e: float) -> Any:
    r = np.sqrt(((x - cx) / rx) ** 2 + ((y - cy) / ry) ** 2)
    return _ss(1.0 + e / min(rx, ry), 1.0 - e / min(rx, ry), r), r


def _span(ctx: _Ctx, lo: float, hi: float) -> slice:
    k = ctx.n / ctx.span
    return slice(max(int((lo - ctx.lo) * k), 0), min(int((hi - ctx.lo) * k) + 1, ctx.n))


def _draw_anatomy(ctx: _Ctx) -> np.ndarray:
    an = ctx.an
    n = ctx.n
    x, y, e = ctx.x, ctx.y, ctx.edge
    dxm = x - an.cx
    right = dxm >= 0.0
    t = np.abs(dxm)
    yd = np.where(right, np.float32(an.yd[1]), np.float32(an.yd[0]))
    ydia = ctx.dome(t, yd)  # (1, n): depends on the column only
    tn = t / an.tw

    # Body silhouette with neck and shoulders.
    neck, sh, bw_low = 0.1, 0.5, an.tw + an.st
    bw = neck + (sh - neck) * _ss(0.0, 0.12, y) - (sh - bw_low) * _ss(0.2, 0.42, y)
    body = _ss(bw + e, bw - e, t)
    rel = np.minimum(t / bw, 1.0)
    tex = _resize(an.tex, n, n)
    abd = _ss(ydia - 0.01, ydia + 0.05, y)
    d = body * (0.33 + 0.13 * (1.0 - rel * rel) + 0.006 * tex + 0.15 * abd)
    d += body * 0.05 * _ss(an.tw - 0.02, an.tw + 0.01, t) * _ss(an.ya - 0.02, an.ya + 0.05, y)

    # Thorax window: everything lung-related is computed inside it only.
    rs = _span(ctx, an.ya - 0.03, max(an.yd) + an.cp_drop + 0.03)
    cs = _span(ctx, an.cx - an.tw - 0.04, an.cx + an.tw + 0.04)
    ws = (rs, cs)
    xw, yw = x[:, cs], y[rs, :]
    tw_, ydw, rw = t[:, cs], yd[:, cs], right[:, cs]
    lung_w, _ = ctx.lung_shape(tw_, yw, ydw)

    # Heart and great vessels (they replace lung air).
    c, s = math.cos(an.tilt), math.sin(an.tilt)
    hxr, hyr = xw - an.hx, yw - an.hy
    u = (c * hxr + s * hyr) * (1.0 / an.hw)
    v = (-s * hxr + c * hyr) * (1.0 / an.hhh)
    hr2 = u * u + v * v
    he = 2.0 * e / an.hhh
    heart = _ss(1.0 + he, 1.0 - he, hr2)
    mx = an.cx + an.med_shift
    knob, _ = _ellipse(xw, yw, mx + an.mw + 0.006, an.hil_y - 0.13, an.knob * 1.1, an.knob, e)
    trunk, _ = _ellipse(xw, yw, mx + an.mw, an.hil_y - 0.05, 0.024, 0.045, e)
    wmed = np.where(right, np.float32(an.mw + 0.004), np.float32(an.mw + 0.01))
    medi = _ss(wmed + e, wmed - e, np.abs(x - mx)) * _ss(an.ya - 0.12, an.ya - 0.02, y)
    cover = medi.copy()
    cw = np.maximum(np.maximum(heart, knob), trunk)
    np.maximum(cover[ws], cw, out=cover[ws])
    notabd = 1.0 - abd
    d += 0.15 * cover * notabd
    d[ws] += 0.03 * heart * (1.0 - np.minimum(hr2, 1.0))
    ctx.cover = cover
    ctx.abd = abd
    spine = _ss(0.034, 0.026, np.abs(dxm - an.med_shift * 0.3))
    vb = 0.5 + 0.5 * dm.cos((y - an.ya) * (2.0 * math.pi / 0.036))
    d += spine * (0.045 + 0.02 * vb)
    carina = an.hil_y - 0.07
    ts = _span(ctx, an.cx - 0.1, an.cx + 0.1)
    tx = np.abs(dxm[:, ts] - 0.5 * an.med_shift)
    trachea = _ss(0.013, 0.009, tx) * _ss(carina + 0.005, carina - 0.005, y)
    ca, sa = math.cos(0.6), math.sin(0.6)
    along = (y - carina) * ca + tx * sa
    perp = np.abs(-(y - carina) * sa + tx * ca)
    bron = _ss(0.010, 0.006, perp) * _ss(0.0, 0.01, along) * _ss(0.075, 0.05, along)
    d[:, ts] -= 0.11 * np.maximum(trachea, bron)

    # Gastric bubble under the left (image right) hemidiaphragm.
    if an.bubble:
        gy0 = an.yd[1] + 0.085
        gs = (_span(ctx, gy0 - 0.04, gy0 + 0.04), _span(ctx, an.cx + 0.11, an.cx + 0.23))
        gb, _ = _ellipse(x[:, gs[1]], y[gs[0], :], an.cx + 0.17, gy0, 0.045, 0.03, e)
        yy = y[gs[0], :]
        gb = gb * _ss(gy0 + 0.005, gy0, yy) * _ss(an.yd[1] + 0.055, an.yd[1] + 0.075, yy)
        d[gs] -= 0.08 * gb

    # Lungs: air darkness with vascular markings.
    lung_w = lung_w * (1.0 - 0.93 * cover[ws])
    ta = 0.5 * (an.mw + an.tw)
    per = np.minimum(np.abs(tw_ - ta) * (1.0 / (0.5 * (an.tw - an.mw))), 1.0)
    air_w = (0.33 * an.lucency) * (0.72 + 0.28 * _ss(an.ya, an.ya + 0.22, yw))
    air_w = air_w * (1.0 - 0.35 * (per * per) ** 2) * (1.0 + 0.04 * tex[ws])
    hx = np.where(rw, np.float32(mx + an.hil_dx), np.float32(mx - an.hil_dx))
    hdx = xw - hx
    hdy = yw - an.hil_y
    r = np.sqrt(hdx * hdx + hdy * hdy)
    theta = dm.arctan2(hdy, np.where(rw, hdx, -hdx))
    vess_w = _vessels(an, theta, r, rw)
    hil = dm.exp(-((hdx * (1.0 / 0.03)) ** 2 + (hdy * (1.0 / 0.055)) ** 2))
    vess_w = vess_w * an.mark_gain + 0.5 * hil
    # Pneumothorax: darker, markingless rim outside the collapsed lung, thin pleural line.
    for side, frac in an.ptx:
        sel = rw if side == 1 else ~rw
        inner, _ = ctx.lung_shape(tw_, yw, ydw, shrink=frac)
        rim = lung_w * (1.0 - inner) * sel
        line = np.clip(inner * (1.0 - inner) * 4.0, 0.0, 1.0) * lung_w * sel
        vess_w = vess_w * (1.0 - rim)
        air_w = air_w * (1.0 + 0.22 * rim)
        ctx.extra[ws] += 0.05 * line
    ctx.lung = np.zeros((n, n), np.float32)
    ctx.lung[ws] = lung_w
    ctx.air = np.zeros((n, n), np.float32)
    ctx.air[ws] = air_w
    ctx.vess = np.zeros((n, n), np.float32)
    ctx.vess[ws] = vess_w
    ctx.t, ctx.tn, ctx.right, ctx.ydia, ctx.yd_arr = t, tn, right, ydia, yd
    ctx.body = body
    return d


def _vessels(an: _Anatomy, theta: np.ndarray, r: np.ndarray, right: np.ndarray) -> np.ndarray:
    nt, nr = _VT, _VR
    fa, fb = an.vessel_table
    it = ((theta + math.pi) * ((nt - 1) / (2.0 * math.pi))).astype(np.int32)
    ir = np.minimum(r * ((nr - 1) / 0.6), nr - 1).astype(np.int32)
    idx = right.astype(np.int32) * (nt * nr) + it * nr + ir
    # Main trunks: wide near the hilum, tapering; branches: thinner, fade sooner.
    wa = 0.02 / (r + 0.03) + 0.04
    main = dm.exp(-((fa[idx] / wa) ** 2))
    wb = 0.01 / (r + 0.03) + 0.03
    branch = dm.exp(-((fb[idx] / wb) ** 2)) * _ss(0.02, 0.08, r)
    amp = dm.exp(-r / 0.15) * _ss(0.0, 0.04, r)
    return _blur(np.maximum(main, 0.6 * branch) * amp, 1)


def _draw_bones(ctx: _Ctx) -> np.ndarray:
    an = ctx.an
    y, t, tn, e = ctx.y, ctx.t, ctx.tn, ctx.edge
    yscale = 0.8 + 0.5 * np.clip((y - an.ya) / (an.yd[0] - an.ya), 0.0, 1.0)
    curve = an.rib_curv * (0.26 * tn * tn - 0.09 * tn) * yscale
    phi = y - curve - (an.ya + an.rib_y0)
    sp, gr = an.rib_sp, an.rib_gr
    k = (-sp + np.sqrt(np.maximum(sp * sp + 4.0 * gr * phi, 0.0))) / (2.0 * gr)
    p = k - np.floor(k)
    rw = 0.42
    soft = min(0.12, 2.5 * e / sp)
    band = _ss(0.0, soft, p) * _ss(rw, rw - soft, p)
    cortex = 0.7 + 0.6 * (np.abs(2.0 * p / rw - 1.0) ** 2) ** 2
    valid = _ss(-0.2, 0.0, k) * _ss(10.4, 10.0, k)
    lat = _ss(0.06, 0.16, tn) * _ss(1.14, 1.04, tn)
    below = (1.0 - 0.6 * ctx.abd) * (1.0 - 0.6 * ctx.cover)
    bones = 0.085 * band * cortex * valid * lat * below
    # Anterior ribs: fainter, sloping down toward the midline.
    phia = y - 0.12 * (1.0 - tn) - (an.ya + 0.02)
    ka = phia / (sp * 1.35)
    pa = ka - np.floor(ka)
    banda = _ss(0.0, soft, pa) * _ss(0.38, 0.38 - soft, pa)
    bones += (
        0.03
        * banda
        * _ss(0.3, 0.45, tn)
        * _ss(1.04, 0.95, tn)
        * _ss(-0.1, 0.0, ka)
        * _ss(6.2, 5.8, ka)
    )
    # Clavicles.
    yc0 = an.ya + (-0.005 if an.ap else 0.035)
    yc = yc0 - 0.05 * tn + 0.018 * dm.sin(math.pi * np.clip(tn, 0.0, 1.0))
    thick = 0.012 + 0.004 * _ss(0.4, 0.1, tn)
    clav = _ss(thick + e, thick - e, np.abs(y - yc)) * _ss(0.07, 0.13, tn) * _ss(1.05, 0.92, tn)
    bones += 0.12 * clav
    # Humeral heads and scapulae.
    hum, _ = _ellipse(t, y, an.tw + an.st + 0.035, an.ya + 0.04, 0.055, 0.06, e)
    bones += 0.07 * hum
    xm = an.tw * (0.68 if an.ap else 0.92) + 0.12 * (y - an.ya)
    scap = _ss(xm - e, xm + e, t) * _ss(an.ya + 0.33, an.ya + 0.26, y) * _ss(an.ya - 0.03, an.ya, y)
    bones += (0.07 if an.ap else 0.05) * scap * _ss(an.tw + 0.12, an.tw + 0.06, t)
    # Breast shadows over the lower lungs.
    if an.female:
        b = an.breast
        by = an.yd[0] - 0.03
        bre, br = _ellipse(t, y, an.tw * 0.62, by, 0.2 * b, 0.14 * b, 0.03)
        lower_fold = _ss(by + 0.14 * b * 0.8, by + 0.14 * b * 0.6, y)
        bones += 0.11 * bre * (0.5 + 0.5 * lower_fold) * (1.0 - 0.3 * np.minimum(br, 1.0))
    return bones * ctx.body


# --------------------------------------------------------------------------- findings


def _box_center(box: tuple[float, float, float, float]) -> tuple[float, float, float, float]:
    """An NIH box (x, y, w, h in 1024 image pixels) as centre and size in image fractions."""
    x, y, w, h = box
    return (x + 0.5 * w) / _REF, (y + 0.5 * h) / _REF, w / _REF, h / _REF


def _box_anat(an: _Anatomy, box: tuple[float, float, float, float]) -> tuple[float, ...]:
    """An NIH box as centre and size in anatomy coordinates (undoing this image's pose)."""
    cx, cy, w, h = _box_center(box)
    ax, ay = an.to_anatomy(cx, cy)
    return ax, ay, w / an.scale, h / an.scale


def _place(
    ctx: _Ctx, rng: np.random.Generator, finding: str, prior: tuple[float, float, float, float]
) -> tuple[float, float, float, float]:
    """Pick a box (cx, cy, w, h in 0..1) from NIH's real boxes, moved into this lung."""
    boxes = _nih_boxes().get(finding)
    an = ctx.an
    if boxes is not None and len(boxes):
        cx, cy, w, h = _box_anat(an, tuple(boxes[int(rng.integers(len(boxes)))]))
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


def _window(ctx: _Ctx, cx: float, cy: float, rx: float, ry: float):
    n, k = ctx.n, ctx.n / ctx.span
    i0, i1 = max(int((cy - ry - ctx.lo) * k) - 2, 0), min(int((cy + ry - ctx.lo) * k) + 3, n)
    j0, j1 = max(int((cx - rx - ctx.lo) * k) - 2, 0), min(int((cx + rx - ctx.lo) * k) + 3, n)
    if i1 <= i0 or j1 <= j0:
        return None
    return (slice(i0, i1), slice(j0, j1)), ctx.gx[:, j0:j1], ctx.gy[i0:i1, :]


def _blob(
    ctx: _Ctx, rng: np.random.Generator, cx: float, cy: float, rad: float, lobes: int, dens: float
) -> None:
    """A round (lobes=0) or lobulated soft-tissue density."""
    win = _window(ctx, cx, cy, rad * 1.6, rad * 1.6)
    if win is None:
        return
    sl, gx, gy = win
    e = ctx.edge
    m = _ellipse(gx, gy, cx, cy, rad, rad * rng.uniform(0.85, 1.1), e)[0]
    for _ in range(lobes):
        a = rng.uniform(0, 2 * math.pi)
        dd = rad * rng.uniform(0.35, 0.6)
        rr = rad * rng.uniform(0.45, 0.7)
        m = np.maximum(
            m, _ellipse(gx, gy, cx + dd * math.cos(a), cy + dd * math.sin(a), rr, rr, e)[0]
        )
    ctx.fill[sl] = np.maximum(ctx.fill[sl], m)
    ctx.extra[sl] += dens * m


def _patches(
    ctx: _Ctx,
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
    win = _window(ctx, cx, cy, rx * 1.3, ry * 1.3)
    if win is None:
        return None
    sl, gx, gy = win
    h, w = gy.shape[0], gx.shape[1]
    noise = _field(rng, (cells, cells), h, w)
    r = np.sqrt(((gx - cx) / rx) ** 2 + ((gy - cy) / ry) ** 2)
    env = _ss(1.15, 0.55, r)
    patch = level * _ss(thresh - soft, thresh + soft, noise + 1.6 * env - 1.0) * env
    if write:
        ctx.fill[sl] = np.maximum(ctx.fill[sl], patch)
    return patch


_Plan = tuple[str, np.random.Generator, list, dict]


def _plan_modifiers(an: _Anatomy, plans: list[_Plan]) -> None:
    """Draw the parameters of findings that change the anatomy itself."""
    for finding, rng, boxes, info in plans:
        if finding == "Cardiomegaly":
            if boxes:
                bw = boxes[0][2] / _REF
                target = float(np.clip(bw / (2.0 * an.tw), 0.56, 0.7))
            else:
                target = rng.uniform(0.57, 0.68)
            an.heart_scale = (an.heart_scale[0] * target / an.ctr, an.heart_scale[1] * 1.08)
        elif finding == "Emphysema":
            shift = rng.uniform(0.035, 0.06)
            an.dome_shift = [v + shift for v in an.dome_shift]
            an.dome_flat = 0.45
            an.mark_gain *= 0.45
            an.lucency *= rng.uniform(1.25, 1.4)
            an.heart_scale = (an.heart_scale[0] * 0.88, an.heart_scale[1])
        elif finding == "Atelectasis":
            side = int(rng.integers(2))
            if boxes:
                side = int(_box_anat(an, boxes[0])[0] >= an.cx)
            info["side"] = side
            an.dome_shift[side] -= rng.uniform(0.03, 0.05)
            an.med_shift += 0.012 if side else -0.012
        elif finding == "Fibrosis":
            an.dome_shift = [v - 0.015 for v in an.dome_shift]
        elif finding == "Pneumothorax":
            if boxes:
                cx, _, w, _ = _box_anat(an, boxes[0])
                side = int(cx >= an.cx)
                frac = float(np.clip(w / an.tw * 0.9, 0.15, 0.45))
            else:
                side = int(rng.integers(2))
                frac = rng.uniform(0.18, 0.4)
            an.ptx.append((side, frac))
            an.med_shift += -0.006 if side else 0.006
        elif finding == "Edema":
            an.mark_gain *= 1.3
        # Effusion side/height are drawn later from the same RNG stream.


def _draw_finding(
    ctx: _Ctx, finding: str, rng: np.random.Generator, boxes: list, info: dict
) -> None:
    an = ctx.an
    x, y, t, e = ctx.x, ctx.y, ctx.t, ctx.edge
    if finding == "Nodule":
        locs = [_box_anat(an, b) for b in boxes] or [
            _place(ctx, rng, finding, (0.3, 0.45, 0.07, 0.07))
        ]
        for cx, cy, w, h in locs:
            rad = float(
                np.clip(
                    0.5 * min(w, h) * rng.uniform(0.7, 0.9) if boxes else rng.uniform(6, 28) / _REF,
                    5 / _REF,
                    30 / _REF,
                )
            )
            _blob(ctx, rng, cx, cy, rad, 0, 0.05)
    elif finding == "Mass":
        locs = [_box_anat(an, b) for b in boxes] or [
            _place(ctx, rng, finding, (0.3, 0.4, 0.15, 0.15))
        ]
        for cx, cy, w, h in locs:
            rad = float(
                np.clip(
                    0.5 * min(w, h) * rng.uniform(0.65, 0.85)
                    if boxes
                    else rng.uniform(40, 110) / _REF,
                    40 / _REF,
                    120 / _REF,
                )
            )
            _blob(ctx, rng, cx, cy, rad * 0.8, int(rng.integers(2, 5)), 0.06)
    elif finding in ("Consolidation", "Pneumonia", "Infiltration"):
        prior = {
            "Consolidation": (0.3, 0.55, 0.2, 0.2),
            "Pneumonia": (0.3, 0.6, 0.25, 0.25),
            "Infiltration": (0.3, 0.45, 0.28, 0.28),
        }[finding]
        locs = [_box_anat(an, b) for b in boxes] or [_place(ctx, rng, finding, prior)]
        for cx, cy, w, h in locs:
            rx = float(np.clip(0.5 * w, 0.06, 0.2))
            ry = float(np.clip(0.5 * h, 0.06, 0.22))
            if finding == "Consolidation":
                _patches(ctx, rng, cx, cy, rx, ry, 6, -0.35, 0.95, 0.3)
            elif finding == "Infiltration":
                for _ in range(int(rng.integers(1, 3))):
                    ox, oy = rng.normal(0.0, 0.3, 2)
                    _patches(
                        ctx, rng, cx + ox * rx, cy + oy * ry, rx * 0.9, ry * 0.9, 5, -0.5, 0.5, 1.0
                    )
            else:
                _pneumonia(ctx, rng, cx, cy, rx, ry)
    elif finding == "Effusion":
        sides = [int(_box_anat(an, b)[0] >= an.cx) for b in boxes]
        if not sides:
            u = rng.random()
            sides = [0, 1] if u < 0.35 else [int(u < 0.68)]
        for side in sorted(set(sides)):
            height = rng.uniform(0.03, 0.17)
            ycp = an.yd[side] + an.cp_drop
            tn = np.clip(t / an.tw, 0.0, 1.2)
            surf = ycp - height - (0.06 + 0.6 * height) * tn * tn - 0.01
            sel = ctx.right if side == 1 else ~ctx.right
            fl = _ss(surf - 0.02, surf + 0.03, y) * sel
            ctx.fill = np.maximum(ctx.fill, fl)
            ctx.extra += 0.03 * fl * ctx.lung
    elif finding == "Pneumothorax":
        pass  # drawn with the anatomy (rim without markings, pleural line)
    elif finding == "Atelectasis":
        if boxes:
            cx, cy, w, h = _box_anat(an, boxes[0])
        else:
            side = info["side"]
            yb = an.yd[side] - rng.uniform(0.04, 0.1)
            ax = an.cx + (1 if side else -1) * rng.uniform(0.45, 0.65) * an.tw
            cx, cy = ax, yb
            w, h = rng.uniform(0.15, 0.28), 0.03
        ang = rng.uniform(-0.25, 0.25)
        half = float(np.clip(0.5 * w, 0.05, 0.18))
        th = rng.uniform(0.007, 0.014)
        win = _window(ctx, cx, cy, half + 0.02, half * 0.3 + 0.03)
        if win is not None:
            sl, gx, gy = win
            ca, sa = math.cos(ang), math.sin(ang)
            al = (gx - cx) * ca + (gy - cy) * sa
            pe = -(gx - cx) * sa + (gy - cy) * ca
            band = _ss(th + e, th - e * 0.5, np.abs(pe)) * _ss(half, half * 0.6, np.abs(al))
            ctx.fill[sl] = np.maximum(ctx.fill[sl], 0.9 * band)
            ctx.extra[sl] += 0.02 * band
            # Some haze around the collapsed segment.
            haze = dm.exp(-((pe / (4 * th)) ** 2)) * _ss(half * 1.2, half * 0.5, np.abs(al))
            ctx.fill[sl] = np.maximum(ctx.fill[sl], 0.3 * haze)
    elif finding == "Edema":
        for side in (0, 1):
            s = 1.0 if side else -1.0
            hx = an.cx + an.med_shift + s * (an.hil_dx + 0.04)
            r2 = ((x - hx) / 0.14) ** 2 + ((y - an.hil_y - 0.02) / 0.16) ** 2
            noise = _field(rng, (10, 10), ctx.n, ctx.n)
            bat = 0.75 * dm.exp(-r2) * (1.0 + 0.25 * noise)
            sel = ctx.right if side else ~ctx.right
            ctx.fill = np.maximum(ctx.fill, np.clip(bat, 0, 1) * sel)
        # Kerley B lines: short horizontal lines at the lateral bases.
        ydm = ctx.yd_arr
        period = rng.uniform(0.011, 0.016)
        ph = (y / period) % 1.0
        lines = _ss(0.22, 0.1, np.abs(ph - 0.5))
        zone = _ss(an.tw - 0.06, an.tw - 0.02, t) * _ss(ydm - 0.17, ydm - 0.1, y)
        ctx.fill = np.maximum(ctx.fill, 0.55 * lines * zone)
    elif finding == "Emphysema":
        # Apical bullae: round lucent areas without markings.
        for _ in range(int(rng.integers(1, 4))):
            side = int(rng.integers(2))
            s = 1.0 if side else -1.0
            bx = an.cx + s * rng.uniform(0.4, 0.75) * an.tw
            by = an.ya + rng.uniform(0.04, 0.12)
            rad = rng.uniform(0.03, 0.06)
            b, _ = _ellipse(x, y, bx, by, rad, rad * 0.9, e)
            ctx.vess = ctx.vess * (1.0 - b)
            ctx.air = ctx.air * (1.0 + 0.15 * b)
            ring = b * (1.0 - b) * 4.0
            ctx.extra += 0.03 * ring * ctx.lung
    elif finding == "Fibrosis":
        n = ctx.n
        n1 = _field(rng, (64, 64), n, n)
        n2 = _field(rng, (64, 64), n, n)
        net = np.maximum(_ss(0.22, 0.0, np.abs(n1)), _ss(0.22, 0.0, np.abs(n2)))
        periph = _ss(an.tw * 0.45, an.tw * 0.9, t)
        upper = rng.random() < 0.5
        zone = (
            _ss(an.hil_y + 0.05, an.ya + 0.05, y)
            if upper
            else _ss(an.hil_y - 0.05, an.hil_y + 0.12, y)
        )
        zone = 0.4 + 0.6 * zone
        ctx.fill = np.maximum(ctx.fill, np.clip((0.55 * net + 0.12) * periph * zone, 0, 1))
    elif finding == "Pleural_Thickening":
        apical = rng.random() < 0.4 and not boxes
        side = int(_box_anat(an, boxes[0])[0] >= an.cx) if boxes else int(rng.integers(2))
        sel = ctx.right if side else ~ctx.right
        wob = _field(rng, (12, 2), ctx.n, 2)[:, :1]
        th = rng.uniform(0.016, 0.03) * (1.0 + 0.35 * wob)
        inner, _ = ctx.lung_shape(t + th, y, ctx.yd_arr)
        rim = (1.0 - inner) * sel
        if apical:
            rim = rim * _ss(an.ya + 0.12, an.ya + 0.06, y)
        else:
            ylo, yhi = an.ya + rng.uniform(0.08, 0.2), an.yd[side] + rng.uniform(-0.05, 0.04)
            rim = rim * _ss(ylo - 0.04, ylo, y) * _ss(yhi, yhi - 0.04, y)
        ctx.fill = np.maximum(ctx.fill, rim)
        ctx.extra += 0.06 * rim * ctx.lung
    elif finding == "Hernia":
        if boxes:
            cx, cy, w, _ = _box_anat(an, boxes[0])
            rad = float(np.clip(0.5 * w, 0.035, 0.09))
        else:
            cx = an.cx + rng.uniform(-0.01, 0.04)
            cy = an.yd[0] - rng.uniform(0.04, 0.07)
            rad = rng.uniform(0.045, 0.075)
        win = _window(ctx, cx, cy, rad * 1.2, rad * 1.2)
        if win is not None:
            sl, gx, gy = win
            m, r = _ellipse(gx, gy, cx, cy, rad, rad * 0.85, e)
            level = cy + rad * rng.uniform(-0.3, 0.2)
            air_part = m * _ss(level + e, level - e, gy)
            wall = dm.exp(-((((r - 1.0) * rad) / (1.5 * e)) ** 2))
            ctx.extra[sl] += -0.2 * air_part + 0.07 * m * (1.0 - air_part) + 0.05 * wall
            lvl = dm.exp(-(((gy - level) / e) ** 2)) * m
            ctx.extra[sl] += 0.06 * lvl


def _pneumonia(
    ctx: _Ctx, rng: np.random.Generator, cx: float, cy: float, rx: float, ry: float
) -> None:
    patch = _patches(
        ctx, rng, cx, cy + 0.2 * ry, rx * 1.1, ry * 1.1, 5, -0.35, 0.92, 0.35, write=False
    )
    win = _window(ctx, cx, cy + 0.2 * ry, rx * 1.1 * 1.3, ry * 1.1 * 1.3)
    if patch is None or win is None:
        return
    sl, gx, gy = win
    # Sharper upper border along a fissure-like line.
    fiss = cy - 0.6 * ry + rng.uniform(-0.1, 0.1) * (gx - cx)
    top = _ss(fiss - 0.004, fiss + 0.01, gy)
    # Air bronchograms: thin dark branching tubes running away from the hilum.
    h, w = gy.shape[0], gx.shape[1]
    a = _field(rng, (4, 14), h, w)
    br = _ss(0.07, 0.0, np.abs(a)) * _ss(0.3, 0.7, patch)
    new = patch * top * (1.0 - 0.4 * br)
    ctx.fill[sl] = np.maximum(ctx.fill[sl], new)


# --------------------------------------------------------------------------- render


def render(spec: RenderSpec, size: int = 1024) -> np.ndarray:
    """Render `spec` as a (size, size) uint8 chest radiograph (air dark, bone bright)."""
    drawn = drawn_findings(spec)
    size = int(size)
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    n = min(size, _WORK)
    an = _Anatomy(spec)
    boxes: dict[str, list] = {}
    for lab, bx, by, bw, bh in spec.boxes:
        lab = BBOX_LABEL_ALIASES.get(lab, lab)
        boxes.setdefault(lab, []).append((float(bx), float(by), float(bw), float(bh)))
    plans = [
        (f, _rng(spec, 0xF00 + FINDINGS.index(f)), boxes.get(f, []), {})
        for f in FINDINGS
        if f in drawn
    ]
    _plan_modifiers(an, plans)
    an.finalize()
    ctx = _Ctx(an, n)
    d = _draw_anatomy(ctx)
    for f, rng, bxs, info in plans:
        _draw_finding(ctx, f, rng, bxs, info)
    fill = np.clip(ctx.fill, 0.0, 1.0)
    lung = ctx.lung
    d -= lung * (1.0 - fill) * (ctx.air - 0.28 * ctx.vess)
    d += ctx.extra * ctx.body + _draw_bones(ctx)
    return _finish(spec, an, ctx, d, size)


def _warp(an: _Anatomy, ctx: _Ctx, d: np.ndarray) -> np.ndarray:
    """Resample the anatomy canvas into the work-size image frame, applying the pose."""
    w = ctx.work
    k = ctx.n / ctx.span
    c, s = math.cos(an.rot), math.sin(an.rot)
    ks = k / an.scale
    u0, v0 = -0.5 - an.dx, -0.5 - an.dy
    base = k * (0.5 - ctx.lo)
    coeffs = (
        ks * c / w,
        ks * s / w,
        base + ks * (c * u0 + s * v0),
        -ks * s / w,
        ks * c / w,
        base + ks * (-s * u0 + c * v0),
    )
    img = Image.fromarray(np.ascontiguousarray(d, dtype=np.float32))
    out = img.transform((w, w), Image.Transform.AFFINE, coeffs, Image.Resampling.BILINEAR)
    return np.asarray(out, dtype=np.float32)


def _finish(spec: RenderSpec, an: _Anatomy, ctx: _Ctx, d: np.ndarray, size: int) -> np.ndarray:
    """Scanner profile (tone curve, blur/sharpening, noise), pose warp and quantisation."""
    gamma, gain, offset, sigma, blur, sharp, heel = _SCANNERS[int(spec.scanner)]
    if an.ap:
        blur += 1
        sigma *= 1.3
        gain *= 0.94
    nc = ctx.n
    prng = np.random.default_rng([_seed(spec.patient_seed), _seed(spec.image_seed), 0xB0B])
    d = d + (sigma * 0.5) * prng.standard_normal((nc, nc), dtype=np.float32)
    img = _warp(an, ctx, d)
    w = img.shape[0]
    grad = (np.arange(w, dtype=np.float32) / w - 0.5)[:, None] * heel
    img = dm.power(np.clip(img * (1.0 + an.exposure) + grad, 0.0, 1.0), gamma)
    img = offset + gain * img
    if blur:
        img = _blur(img, blur)
    if sharp:
        img = img + sharp * (img - _blur(img, 2))
    img = img * 255.0 + 0.5  # PIL's F -> L conversion truncates and clips
    if size != w:
        img = _resize(img, size, size, bicubic=True)
    tile = _noise_tile(size)
    oy, ox = int(an.noise_off[0]), int(an.noise_off[1])
    out = tile[oy : oy + size, ox : ox + size] * np.float32(sigma * 255.0)
    out += img
    quant = Image.fromarray(out).convert("L")
    return np.array(quant, dtype=np.uint8, order="C")
