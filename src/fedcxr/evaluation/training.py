"""What the runs' learning curves say: convergence per configuration and the federated
rounds needed to come within a share of the centralized model (pure, from run cards)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from fedcxr.convergence import first_reaching, plateau
from fedcxr.runs import RunCard

REACH_SHARE = 0.95  # "rounds to reach 95% of centralized AUROC"


def training_entry(cards: Sequence[RunCard], window: int, tol: float) -> dict[str, Any]:
    """A configuration's training record: converged only if every seed's curve converged.

    `epochs` is the budget in cumulative local epochs (passes over each example); the
    validation figures are means over seeds; `last_gain` the largest over seeds.
    """
    if not cards:
        raise ValueError("expected at least one run card, found none")
    judged = [plateau(card.curve, window, tol) for card in cards]
    best = [p.best for p in judged if p.best is not None]
    gains = [p.last_gain for p in judged if p.last_gain is not None]
    finals = [c.curve[-1].val_auroc for c in cards if c.curve and c.curve[-1].val_auroc is not None]
    return {
        "converged": all(p.converged for p in judged),
        "epochs": max(c.epochs for c in cards),
        "best_val_auroc": float(np.mean(best)) if best else None,
        "final_val_auroc": float(np.mean(finals)) if finals else None,
        "last_gain": max(gains) if len(gains) == len(judged) else None,
        "plateau_window": window,
        "plateau_tol": tol,
        "why": "; ".join(f"seed {c.seed}: {p.why()}" for c, p in zip(cards, judged, strict=True)),
    }


def rounds_to_reach(
    federated: Sequence[RunCard], centralized: Sequence[RunCard], share: float = REACH_SHARE
) -> dict[str, Any]:
    """Federated rounds until the global model's validation AUROC first reaches `share` x the
    centralized model's final validation AUROC (means over seeds; None if a seed never does)."""
    finals = [c.curve[-1].val_auroc for c in centralized if c.curve]
    if not finals or any(v is None for v in finals) or not federated:
        return {"reach_share": share, "reach_target_val_auroc": None, "rounds_to_reach": None}
    target = share * float(np.mean(finals))  # type: ignore[arg-type]
    rounds = []
    for card in federated:
        epochs = first_reaching(card.curve, target)
        local = int(card.extra.get("local_epochs", 1)) or 1
        rounds.append(None if epochs is None else epochs / local)
    reached = None if any(r is None for r in rounds) else float(np.mean(rounds))  # type: ignore[arg-type]
    return {"reach_share": share, "reach_target_val_auroc": target, "rounds_to_reach": reached}


def curves_json(
    cards_by_config: Mapping[str, Sequence[RunCard]], window: int, tol: float
) -> dict[str, Any]:
    """{config: {"s<seed>": {"curve": [[epochs, auroc], ...], "converged": bool}}} for plots."""
    return {
        config: {
            f"s{c.seed}": {
                "curve": [p.to_json() for p in c.curve],
                "converged": plateau(c.curve, window, tol).converged,
            }
            for c in sorted(cards, key=lambda c: c.seed)
        }
        for config, cards in sorted(cards_by_config.items())
    }
