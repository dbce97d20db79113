"""Learning curves (validation AUROC per epoch or round) and when a run has converged (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class CurvePoint:
    """Validation macro AUROC after `epochs` cumulative local epochs (None: undefined)."""

    epochs: float
    val_auroc: float | None

    def to_json(self) -> list[float | None]:
        return [self.epochs, self.val_auroc]

    @classmethod
    def from_json(cls, item: Sequence[float | None], where: str = "curve") -> CurvePoint:
        if len(item) != 2 or item[0] is None:
            raise ValueError(f"{where}: expected [epochs, val_auroc], found {list(item)!r}")
        return cls(float(item[0]), None if item[1] is None else float(item[1]))


@dataclass(frozen=True)
class Plateau:
    """Whether a curve reached its plateau: its last `window` evaluations improved on the best
    before them by at most `tol` (and there were more than `window` evaluations to judge)."""

    converged: bool
    best: float | None  # the run's best validation AUROC
    best_at: float | None  # cumulative local epochs where it was reached
    last_gain: float | None  # best of the last `window` minus best before them
    window: int
    tol: float

    def why(self) -> str:
        if self.best is None:
            return "no defined validation AUROC"
        if self.last_gain is None:
            return f"only {self.window} or fewer evaluations: too short to judge"
        verdict = "converged" if self.converged else "still improving"
        return (
            f"{verdict}: the last {self.window} evaluations gained {self.last_gain:+.4f} "
            f"over the best before them (tolerance {self.tol})"
        )


def plateau(curve: Sequence[CurvePoint], window: int, tol: float) -> Plateau:
    """Judge convergence of a learning curve (pure).

    Converged means the best validation AUROC of the last `window` evaluations exceeds the best
    of all earlier ones by no more than `tol`: more training stopped paying. A run with at most
    `window` defined evaluations cannot be judged and counts as not converged.
    """
    if window < 1:
        raise ValueError(f"expected window >= 1, found {window}")
    if tol < 0:
        raise ValueError(f"expected tol >= 0, found {tol}")
    points = [p for p in curve if p.val_auroc is not None]
    if not points:
        return Plateau(False, None, None, None, window, tol)
    top = max(points, key=lambda p: (p.val_auroc, -p.epochs))
    if len(points) <= window:
        return Plateau(False, top.val_auroc, top.epochs, None, window, tol)
    before = max(p.val_auroc for p in points[:-window])  # type: ignore[type-var]
    last = max(p.val_auroc for p in points[-window:])  # type: ignore[type-var]
    gain = float(last - before)
    return Plateau(gain <= tol, top.val_auroc, top.epochs, gain, window, tol)


def first_reaching(curve: Sequence[CurvePoint], target: float) -> float | None:
    """Cumulative local epochs of the first evaluation at or above `target` (None: never)."""
    for p in curve:
        if p.val_auroc is not None and p.val_auroc >= target:
            return p.epochs
    return None
