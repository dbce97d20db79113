"""exp, log, power, sin, cos and arctan2 that give the same bits on every x86-64 CPU.

NumPy picks its transcendental kernels by the CPU's SIMD level (AVX-512, AVX2, or the
baseline); they differ in the last bit, and a last-bit difference that crosses a rounding
boundary changes a pixel of the synthetic radiographs and so the hash of every downstream DVC
output. Measured: with NumPy's AVX-512 kernels switched off (NPY_DISABLE_CPU_FEATURES) 10 of the
first 30 default images changed. These functions use only +, -, *, /, rint, frexp and ldexp,
which IEEE 754 rounds exactly the same way in every SIMD width, in float64 (results are cast
back to the input's float type). Written by hand because no maintained NumPy-compatible library
promises bit-identical results across CPUs; accuracy is a few ulp of float64, far below what a
uint8 pixel can show.

float32 inputs (most of the renderer's arrays) are computed in float32 arithmetic, with the
series cut where float32 stops seeing their terms: about twice as fast and still a few ulp of
float32. The same argument holds: +, -, *, / round alike in every SIMD width, whatever the type.
"""

from __future__ import annotations

import math

import numpy as np

_LN2_HI = 6.93147180369123816490e-01  # ln 2 split so that k * _LN2_HI is exact for |k| < 2**20
_LN2_LO = 1.90821492927058770002e-10
_PIO2_1 = 1.57079632673412561417e00  # pi/2 in three parts (Cody-Waite reduction)
_PIO2_2 = 6.07710050630396597660e-11
_PIO2_3 = 2.02226624879595063154e-21
_EXP_TERMS = 1.0 / np.array([math.factorial(n) for n in range(14)], dtype=np.float64)


# float32 variants: ln 2 split so that k * hi is exact for |k| < 2**15 (Cephes' expf/logf).
_LN2_HI32 = np.float32(0.693359375)
_LN2_LO32 = np.float32(-2.12194440e-4)
_EXP_TERMS32 = _EXP_TERMS[:10].astype(np.float32)  # |r| <= 0.35: r**10 / 10! < 1e-11


def _f64(x: np.ndarray | float) -> np.ndarray:
    return np.asarray(x, dtype=np.float64)


def _is32(*xs: np.ndarray | float) -> bool:
    """True when every input is a float32 array (then the float32 kernels are used)."""
    return all(isinstance(x, np.ndarray) and x.dtype == np.float32 for x in xs)


def _like(result: np.ndarray, x: np.ndarray | float) -> np.ndarray:
    dtype = np.asarray(x).dtype
    return result.astype(dtype) if np.issubdtype(dtype, np.floating) else result


def _horner(z: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    out = np.full_like(z, coefficients[-1])
    for c in coefficients[-2::-1]:
        out = out * z + c
    return out


def _exp32(x: np.ndarray) -> np.ndarray:
    v = np.clip(x, np.float32(-104.0), np.float32(88.0))
    k = np.rint(v * np.float32(1.4426950408889634))  # 1 / ln 2
    r = (v - k * _LN2_HI32) - k * _LN2_LO32
    out = np.ldexp(_horner(r, _EXP_TERMS32), k.astype(np.int32))
    return np.where(x < np.float32(-104.0), np.float32(0.0), out)


def exp(x: np.ndarray | float) -> np.ndarray:
    """e**x; underflows to 0 below -745 like np.exp (inputs here are never large and positive)."""
    if _is32(x):
        return _exp32(x)
    v = np.clip(_f64(x), -745.0, 709.0)
    k = np.rint(v * (1.0 / _LN2_HI))
    r = (v - k * _LN2_HI) - k * _LN2_LO  # |r| <= 0.35
    out = np.ldexp(_horner(r, _EXP_TERMS), k.astype(np.int32))
    return _like(np.where(_f64(x) < -745.0, 0.0, out), x)


_SIN = np.array([(-1) ** n / math.factorial(2 * n + 1) for n in range(9)], dtype=np.float64)
_COS = np.array([(-1) ** n / math.factorial(2 * n) for n in range(10)], dtype=np.float64)


def _reduce(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """x = k * pi/2 + r, |r| <= pi/4 (accurate for |x| up to 1e6); returns (r, k mod 4)."""
    k = np.rint(x * (2.0 / math.pi))
    r = ((x - k * _PIO2_1) - k * _PIO2_2) - k * _PIO2_3
    return r, np.mod(k, 4.0).astype(np.int8)


def _sin_cos_reduced(r: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    z = r * r
    return r * _horner(z, _SIN), _horner(z, _COS)


def sin(x: np.ndarray | float) -> np.ndarray:
    """sin(x)."""
    r, q = _reduce(_f64(x))
    s, c = _sin_cos_reduced(r)
    return _like(np.select([q == 0, q == 1, q == 2], [s, c, -s], -c), x)


def cos(x: np.ndarray | float) -> np.ndarray:
    """cos(x)."""
    r, q = _reduce(_f64(x))
    s, c = _sin_cos_reduced(r)
    return _like(np.select([q == 0, q == 1, q == 2], [c, -s, -c], s), x)


_TAN_PI_8 = math.tan(math.pi / 8)
_ATAN = np.array([(-1) ** n / (2 * n + 1) for n in range(24)], dtype=np.float64)


_ATAN32 = _ATAN[:10].astype(np.float32)  # |u| <= tan(pi/8): u**21 / 21 < 1e-9


def _atan_unit(t: np.ndarray) -> np.ndarray:
    """atan(t) for 0 <= t <= 1: folded to |u| <= tan(pi/8), then its Taylor series."""
    big = t > _TAN_PI_8
    u = np.where(big, (t - 1.0) / (t + 1.0), t)
    a = u * _horner(u * u, _ATAN32 if t.dtype == np.float32 else _ATAN)
    return np.where(big, math.pi / 4 + a, a)


def arctan2(y: np.ndarray | float, x: np.ndarray | float) -> np.ndarray:
    """The angle of (x, y) in (-pi, pi], with arctan2(0, 0) = 0 as np.arctan2 gives."""
    if _is32(y, x):
        yy, xx = np.broadcast_arrays(y, x)
    else:
        yy, xx = np.broadcast_arrays(_f64(y), _f64(x))
    ay, ax = np.abs(yy), np.abs(xx)
    swap = ay > ax
    num, den = np.where(swap, ax, ay), np.where(swap, ay, ax)
    t = np.divide(num, den, out=np.zeros_like(num), where=den > 0)
    a = _atan_unit(t)
    a = np.where(swap, math.pi / 2 - a, a)
    a = np.where(xx < 0, math.pi - a, a)
    a = np.where(yy < 0, -a, a)
    dtype = np.result_type(np.asarray(y).dtype, np.asarray(x).dtype)
    return a.astype(dtype) if np.issubdtype(dtype, np.floating) else a


_ATANH = np.array([2.0 / (2 * n + 1) for n in range(14)], dtype=np.float64)
_SQRT_HALF = math.sqrt(0.5)


_ATANH32 = _ATANH[:7].astype(np.float32)  # |s| <= 0.172: s**15 < 1e-11


def log(x: np.ndarray | float) -> np.ndarray:
    """Natural log of x > 0 (x = m * 2**e, m in [sqrt(1/2), sqrt(2)), log m by atanh's series)."""
    is32 = _is32(x)
    v = x if is32 else _f64(x)
    m, e = np.frexp(v)  # m in [0.5, 1)
    low = m < _SQRT_HALF
    m = np.where(low, m * 2.0, m)
    e = e - low
    s = (m - 1.0) / (m + 1.0)  # |s| <= 0.172
    if is32:
        e = e.astype(np.float32)
        return s * _horner(s * s, _ATANH32) + e * _LN2_LO32 + e * _LN2_HI32
    r = s * _horner(s * s, _ATANH) + e * _LN2_LO + e * _LN2_HI
    return _like(r, x)


def power(x: np.ndarray | float, p: float) -> np.ndarray:
    """x ** p for x >= 0 and p > 0 (0 ** p = 0)."""
    if p <= 0:
        raise ValueError(f"expected an exponent > 0, found {p}")
    if _is32(x):
        pos = x > 0
        one, zero = np.float32(1.0), np.float32(0.0)
        return np.where(pos, _exp32(np.float32(p) * log(np.where(pos, x, one))), zero)
    v = _f64(x)
    pos = v > 0
    r = np.where(pos, exp(p * log(np.where(pos, v, 1.0))), 0.0)
    return _like(r, x)
