"""Patient anatomy of the synthetic radiographs: pose, lungs, heart, vessels and bones."""

from __future__ import annotations

import functools
import math
from typing import Any

import numpy as np

from fedcxr.synth import detmath as dm
from fedcxr.synth.raster import blur, ellipse, resize, ss
from fedcxr.synth.spec import RenderSpec, seed64, spec_rng

__all__ = ["Anatomy", "Canvas", "draw_anatomy", "draw_bones"]

_MARGIN = 0.04  # canvas margin (fraction of the image) so the pose warp never samples outside
_VT, _VR = 512, 160  # polar lookup table: angle bins, radius bins


@functools.lru_cache(maxsize=32)
def _vessel_table(pseed: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-patient polar noise tables (flattened, both sides) for the vascular tree."""
    rng = np.random.default_rng([pseed, 0x7AB])
    a = rng.standard_normal((2, 40, 4)).astype(np.float32)
    b = rng.standard_normal((2, 120, 4)).astype(np.float32)
    fa = np.stack([resize(a[i], _VT, _VR) for i in range(2)]).reshape(-1)
    fb = np.stack([resize(b[i], _VT, _VR) for i in range(2)]).reshape(-1)
    fa.setflags(write=False)
    fb.setflags(write=False)
    return fa, fb


class Anatomy:
    """Patient anatomy (from patient_seed) adjusted for view, sex, age and image pose."""

    def __init__(self, spec: RenderSpec) -> None:
        p = spec_rng(spec, 0xA7A, with_image=False)
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
        self.vessel_table = _vessel_table(seed64(spec.patient_seed))
        self.tex = p.standard_normal((24, 24)).astype(np.float32)
        # Image-level pose jitter and breathing.
        q = spec_rng(spec, 0x9053)
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
        """Apply the findings' modifiers and derive the heart and hilum geometry."""
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


class Canvas:
    """Arrays shared by the drawing steps at the internal resolution."""

    def __init__(self, an: Anatomy, work: int) -> None:
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
        # Filled in by draw_anatomy.
        self.air = self.vess = self.cover = self.abd = self.body = self.lung
        self.t = self.tn = self.ydia = self.yd_arr = self.x
        self.right = np.zeros((1, n), bool)

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
        dy = dy * (1.0 + 0.25 * ss(0.4, -0.4, dt))
        r2 = dt * dt + dy * dy
        e = 2.0 * self.edge / wl
        upper = ss(1.0 + e, 1.0 - e, r2)
        lower = ss(ydia + self.edge, ydia - self.edge, y)
        return upper * lower, ydia


def _span(ctx: Canvas, lo: float, hi: float) -> slice:
    """The canvas rows (or columns) covering anatomy coordinates lo..hi."""
    k = ctx.n / ctx.span
    return slice(max(int((lo - ctx.lo) * k), 0), min(int((hi - ctx.lo) * k) + 1, ctx.n))


def draw_anatomy(ctx: Canvas) -> np.ndarray:
    """Soft-tissue density of the body, mediastinum and airways; fills the lung arrays of ctx."""
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
    bw = neck + (sh - neck) * ss(0.0, 0.12, y) - (sh - bw_low) * ss(0.2, 0.42, y)
    body = ss(bw + e, bw - e, t)
    rel = np.minimum(t / bw, 1.0)
    tex = resize(an.tex, n, n)
    abd = ss(ydia - 0.01, ydia + 0.05, y)
    d = body * (0.33 + 0.13 * (1.0 - rel * rel) + 0.006 * tex + 0.15 * abd)
    d += body * 0.05 * ss(an.tw - 0.02, an.tw + 0.01, t) * ss(an.ya - 0.02, an.ya + 0.05, y)

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
    heart = ss(1.0 + he, 1.0 - he, hr2)
    mx = an.cx + an.med_shift
    knob, _ = ellipse(xw, yw, mx + an.mw + 0.006, an.hil_y - 0.13, an.knob * 1.1, an.knob, e)
    trunk, _ = ellipse(xw, yw, mx + an.mw, an.hil_y - 0.05, 0.024, 0.045, e)
    wmed = np.where(right, np.float32(an.mw + 0.004), np.float32(an.mw + 0.01))
    medi = ss(wmed + e, wmed - e, np.abs(x - mx)) * ss(an.ya - 0.12, an.ya - 0.02, y)
    cover = medi.copy()
    cw = np.maximum(np.maximum(heart, knob), trunk)
    np.maximum(cover[ws], cw, out=cover[ws])
    notabd = 1.0 - abd
    d += 0.15 * cover * notabd
    d[ws] += 0.03 * heart * (1.0 - np.minimum(hr2, 1.0))
    ctx.cover = cover
    ctx.abd = abd
    spine = ss(0.034, 0.026, np.abs(dxm - an.med_shift * 0.3))
    vb = 0.5 + 0.5 * dm.cos((y - an.ya) * (2.0 * math.pi / 0.036))
    d += spine * (0.045 + 0.02 * vb)
    carina = an.hil_y - 0.07
    ts = _span(ctx, an.cx - 0.1, an.cx + 0.1)
    tx = np.abs(dxm[:, ts] - 0.5 * an.med_shift)
    trachea = ss(0.013, 0.009, tx) * ss(carina + 0.005, carina - 0.005, y)
    ca, sa = math.cos(0.6), math.sin(0.6)
    along = (y - carina) * ca + tx * sa
    perp = np.abs(-(y - carina) * sa + tx * ca)
    bron = ss(0.010, 0.006, perp) * ss(0.0, 0.01, along) * ss(0.075, 0.05, along)
    d[:, ts] -= 0.11 * np.maximum(trachea, bron)

    # Gastric bubble under the left (image right) hemidiaphragm.
    if an.bubble:
        gy0 = an.yd[1] + 0.085
        gs = (_span(ctx, gy0 - 0.04, gy0 + 0.04), _span(ctx, an.cx + 0.11, an.cx + 0.23))
        gb, _ = ellipse(x[:, gs[1]], y[gs[0], :], an.cx + 0.17, gy0, 0.045, 0.03, e)
        yy = y[gs[0], :]
        gb = gb * ss(gy0 + 0.005, gy0, yy) * ss(an.yd[1] + 0.055, an.yd[1] + 0.075, yy)
        d[gs] -= 0.08 * gb

    # Lungs: air darkness with vascular markings.
    lung_w = lung_w * (1.0 - 0.93 * cover[ws])
    ta = 0.5 * (an.mw + an.tw)
    per = np.minimum(np.abs(tw_ - ta) * (1.0 / (0.5 * (an.tw - an.mw))), 1.0)
    air_w = (0.33 * an.lucency) * (0.72 + 0.28 * ss(an.ya, an.ya + 0.22, yw))
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


def _vessels(an: Anatomy, theta: np.ndarray, r: np.ndarray, right: np.ndarray) -> np.ndarray:
    """Vascular markings fanning out from the hila (polar coordinates theta, r per side)."""
    nt, nr = _VT, _VR
    fa, fb = an.vessel_table
    it = ((theta + math.pi) * ((nt - 1) / (2.0 * math.pi))).astype(np.int32)
    ir = np.minimum(r * ((nr - 1) / 0.6), nr - 1).astype(np.int32)
    idx = right.astype(np.int32) * (nt * nr) + it * nr + ir
    # Main trunks: wide near the hilum, tapering; branches: thinner, fade sooner.
    wa = 0.02 / (r + 0.03) + 0.04
    main = dm.exp(-((fa[idx] / wa) ** 2))
    wb = 0.01 / (r + 0.03) + 0.03
    branch = dm.exp(-((fb[idx] / wb) ** 2)) * ss(0.02, 0.08, r)
    amp = dm.exp(-r / 0.15) * ss(0.0, 0.04, r)
    return blur(np.maximum(main, 0.6 * branch) * amp, 1)


def draw_bones(ctx: Canvas) -> np.ndarray:
    """Density of ribs, clavicles, humeral heads, scapulae and breast shadows."""
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
    band = ss(0.0, soft, p) * ss(rw, rw - soft, p)
    cortex = 0.7 + 0.6 * (np.abs(2.0 * p / rw - 1.0) ** 2) ** 2
    valid = ss(-0.2, 0.0, k) * ss(10.4, 10.0, k)
    lat = ss(0.06, 0.16, tn) * ss(1.14, 1.04, tn)
    below = (1.0 - 0.6 * ctx.abd) * (1.0 - 0.6 * ctx.cover)
    bones = 0.085 * band * cortex * valid * lat * below
    # Anterior ribs: fainter, sloping down toward the midline.
    phia = y - 0.12 * (1.0 - tn) - (an.ya + 0.02)
    ka = phia / (sp * 1.35)
    pa = ka - np.floor(ka)
    banda = ss(0.0, soft, pa) * ss(0.38, 0.38 - soft, pa)
    bones += (
        0.03 * banda * ss(0.3, 0.45, tn) * ss(1.04, 0.95, tn) * ss(-0.1, 0.0, ka) * ss(6.2, 5.8, ka)
    )
    # Clavicles.
    yc0 = an.ya + (-0.005 if an.ap else 0.035)
    yc = yc0 - 0.05 * tn + 0.018 * dm.sin(math.pi * np.clip(tn, 0.0, 1.0))
    thick = 0.012 + 0.004 * ss(0.4, 0.1, tn)
    clav = ss(thick + e, thick - e, np.abs(y - yc)) * ss(0.07, 0.13, tn) * ss(1.05, 0.92, tn)
    bones += 0.12 * clav
    # Humeral heads and scapulae.
    hum, _ = ellipse(t, y, an.tw + an.st + 0.035, an.ya + 0.04, 0.055, 0.06, e)
    bones += 0.07 * hum
    xm = an.tw * (0.68 if an.ap else 0.92) + 0.12 * (y - an.ya)
    scap = ss(xm - e, xm + e, t) * ss(an.ya + 0.33, an.ya + 0.26, y) * ss(an.ya - 0.03, an.ya, y)
    bones += (0.07 if an.ap else 0.05) * scap * ss(an.tw + 0.12, an.tw + 0.06, t)
    # Breast shadows over the lower lungs.
    if an.female:
        b = an.breast
        by = an.yd[0] - 0.03
        bre, br = ellipse(t, y, an.tw * 0.62, by, 0.2 * b, 0.14 * b, 0.03)
        lower_fold = ss(by + 0.14 * b * 0.8, by + 0.14 * b * 0.6, y)
        bones += 0.11 * bre * (0.5 + 0.5 * lower_fold) * (1.0 - 0.3 * np.minimum(br, 1.0))
    return bones * ctx.body
