"""Number formatting for the report: estimates with 95% CIs, seed spread, sizes and durations."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from fedcxr.report.paper import PaperStat, PaperText

MISSING = "—"
DIGITS = 3  # the paper's one decimal in percent is three on a 0-1 scale


def number(value: Any) -> float | None:
    """A finite float, or None for null / NaN / non-numbers."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def num(value: Any, digits: int = DIGITS) -> str:
    """`value` with `digits` decimals, or an em dash when absent."""
    x = number(value)
    return MISSING if x is None else f"{x:.{digits}f}"


def signed(value: Any, digits: int = DIGITS) -> str:
    """A difference with its sign (+0.012 / −0.004)."""
    x = number(value)
    if x is None:
        return MISSING
    text = f"{x:+.{digits}f}"
    return text.replace("-", "−")


def ci(lo: Any, hi: Any, digits: int = DIGITS) -> str:
    """'0.690–0.730', or '' when either end is absent."""
    a, b = number(lo), number(hi)
    return "" if a is None or b is None else f"{a:.{digits}f}–{b:.{digits}f}"


def estimate(metrics: Mapping[str, Any], key: str, digits: int = DIGITS) -> str:
    """'0.712 (0.690–0.730)'; with n_seeds > 1 '0.712 ± 0.004 (0.690–0.730)'."""
    value = number(metrics.get(key))
    if value is None:
        return MISSING
    text = f"{value:.{digits}f}"
    std = number(metrics.get(f"{key}_std"))
    seeds = metrics.get("n_seeds")
    if std is not None and isinstance(seeds, int) and seeds > 1:
        text += f" ± {std:.{digits}f}"
    interval = ci(metrics.get(f"{key}_lo"), metrics.get(f"{key}_hi"), digits)
    return f"{text} ({interval})" if interval else text


def paper(stat: PaperStat | PaperText | None, digits: int = DIGITS) -> str:
    """A published value on the report's scale: '0.837 ± 0.006' (percent shown as 0-1)."""
    if stat is None:
        return MISSING
    if isinstance(stat, PaperText):
        return stat.text if stat.text == "N/A" else f"{stat.text} {stat.unit}".strip()
    mean, sd = stat.fraction()
    if stat.unit in ("%", ""):
        places = digits if stat.unit == "%" else 2
        text = f"{mean:.{places}f}"
        return text if sd is None else f"{text} ± {sd:.{places}f}"
    text = f"{mean:g}" if sd is None else f"{mean:g} ± {sd:g}"
    return f"{text} {stat.unit}"


def megabytes(n_bytes: Any) -> str:
    """Bytes as MB (10^6 bytes)."""
    x = number(n_bytes)
    if x is None:
        return MISSING
    mb = x / 1e6
    return f"{mb:,.1f}" if mb >= 10 else f"{mb:.2f}"


def seconds(value: Any) -> str:
    """A duration in seconds, 3 significant figures-ish."""
    x = number(value)
    if x is None:
        return MISSING
    return f"{x:,.0f}" if x >= 100 else f"{x:.1f}" if x >= 1 else f"{x:.2f}"


def percent(value: Any, digits: int = 1) -> str:
    """A 0-1 share as a percentage."""
    x = number(value)
    return MISSING if x is None else f"{100 * x:.{digits}f}%"


def count(value: Any) -> str:
    """An integer with thousands separators."""
    x = number(value)
    return MISSING if x is None else f"{round(x):,}"


def p_value(value: Any) -> str:
    """'p = 0.003', 'p < 0.001'."""
    x = number(value)
    if x is None:
        return "p = n/a"
    return "p < 0.001" if x < 0.001 else f"p = {x:.3f}"
