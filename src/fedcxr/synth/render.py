"""Renders synthetic chest radiographs whose findings follow NIH ChestX-ray14 labels."""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image

from fedcxr.labels import BBOX_LABEL_ALIASES, FINDINGS
from fedcxr.synth import detmath as dm
from fedcxr.synth.anatomy import Anatomy, Canvas, draw_anatomy, draw_bones
from fedcxr.synth.findings import MODIFIERS, PAINTERS
from fedcxr.synth.raster import blur, resize, upsample4
from fedcxr.synth.spec import RenderSpec, seed64, spec_rng

__all__ = ["N_SCANNERS", "RenderSpec", "drawn_findings", "render"]

N_SCANNERS = 4
# Internal render resolution; the result is upsampled to the requested size (exactly 4x, by
# NumPy, for NIH's 1024). The content is smooth at this scale and the CNN sees 224-256 pixels;
# the full-resolution pixel noise is added after upsampling.
_WORK = 256

# Scanner profiles: gamma, gain, offset, noise sigma, blur passes, unsharp amount, heel gradient.
_SCANNERS: tuple[tuple[float, float, float, float, int, float, float], ...] = (
    (1.00, 1.00, 0.00, 0.016, 0, 0.35, 0.04),  # balanced modern DR
    (0.72, 0.80, 0.13, 0.034, 2, 0.00, 0.03),  # bright, flat, noisy, soft CR
    (1.40, 1.12, -0.05, 0.010, 0, 1.10, 0.07),  # dark, contrasty, edge-enhanced
    (1.05, 0.66, 0.18, 0.024, 1, 0.25, 0.12),  # grey background, low contrast, strong heel
)


@functools.lru_cache(maxsize=4)
def _noise_tile(size: int) -> np.ndarray:
    """Fixed full-resolution noise tile; each image reads a randomly offset window of it."""
    rng = np.random.default_rng(0x5EED_0F_C0FFEE)
    return rng.standard_normal((size + 97, size + 97), dtype=np.float32)


@functools.lru_cache(maxsize=8)
def _scaled_noise_tile(size: int, scale: float) -> np.ndarray:
    """The noise tile times `scale` (one per scanner and view), computed once per process."""
    out = _noise_tile(size) * np.float32(scale)
    out.setflags(write=False)
    return out


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
    u = spec_rng(spec, 0x3155).random(len(FINDINGS))
    out: list[str] = []
    for lab in spec.labels:
        if lab not in out and u[FINDINGS.index(lab)] >= spec.miss_prob:
            out.append(lab)
    return tuple(out)


def render(spec: RenderSpec, size: int = 1024) -> np.ndarray:
    """Render `spec` as a (size, size) uint8 chest radiograph (air dark, bone bright)."""
    drawn = drawn_findings(spec)
    size = int(size)
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    n = min(size, _WORK)
    an = Anatomy(spec)
    boxes: dict[str, list] = {}
    for lab, bx, by, bw, bh in spec.boxes:
        lab = BBOX_LABEL_ALIASES.get(lab, lab)
        boxes.setdefault(lab, []).append((float(bx), float(by), float(bw), float(bh)))
    # (finding, its own random stream, its boxes, what its modifier tells its painter)
    plans = [
        (f, spec_rng(spec, 0xF00 + FINDINGS.index(f)), boxes.get(f, []), {})
        for f in FINDINGS
        if f in drawn
    ]
    for f, rng, bxs, info in plans:
        if f in MODIFIERS:
            MODIFIERS[f](an, rng, bxs, info)
    an.finalize()
    ctx = Canvas(an, n)
    d = draw_anatomy(ctx)
    for f, rng, bxs, info in plans:
        PAINTERS[f](ctx, rng, bxs, info)
    fill = np.clip(ctx.fill, 0.0, 1.0)
    lung = ctx.lung
    d -= lung * (1.0 - fill) * (ctx.air - 0.28 * ctx.vess)
    d += ctx.extra * ctx.body + draw_bones(ctx)
    return _finish(spec, an, ctx, d, size)


def _warp(an: Anatomy, ctx: Canvas, d: np.ndarray) -> np.ndarray:
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


def _finish(spec: RenderSpec, an: Anatomy, ctx: Canvas, d: np.ndarray, size: int) -> np.ndarray:
    """Scanner profile (tone curve, blur/sharpening, noise), pose warp and quantisation."""
    gamma, gain, offset, sigma, passes, sharp, heel = _SCANNERS[int(spec.scanner)]
    if an.ap:
        passes += 1
        sigma *= 1.3
        gain *= 0.94
    nc = ctx.n
    prng = np.random.default_rng([seed64(spec.patient_seed), seed64(spec.image_seed), 0xB0B])
    d = d + (sigma * 0.5) * prng.standard_normal((nc, nc), dtype=np.float32)
    img = _warp(an, ctx, d)
    w = img.shape[0]
    grad = (np.arange(w, dtype=np.float32) / w - 0.5)[:, None] * heel
    img = dm.power(np.clip(img * (1.0 + an.exposure) + grad, 0.0, 1.0), gamma)
    img = offset + gain * img
    if passes:
        img = blur(img, passes)
    if sharp:
        img = img + sharp * (img - blur(img, 2))
    img = img * 255.0 + 0.5  # rounds: the conversion to uint8 below truncates
    oy, ox = int(an.noise_off[0]), int(an.noise_off[1])
    noise = _scaled_noise_tile(size, sigma * 255.0)[oy : oy + size, ox : ox + size]
    if size == 4 * w:
        return upsample4(img, noise, quantize=True)
    if size != w:
        img = resize(img, size, size, bicubic=True)
    out = noise + img
    np.clip(out, 0.0, 255.0, out=out)
    return out.astype(np.uint8)
