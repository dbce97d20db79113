"""The report's figures (ROC curves, per-round training curves) as PNG bytes via matplotlib."""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from fedcxr.report.inputs import Curve

DPI = 110


def png_bytes(fig: Figure) -> bytes:
    """Render a figure (Agg, no pyplot state); no software tag, so a plot gives the same bytes."""
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buf.getvalue()


def curve_area(curve: Curve) -> float:
    """Area under an ROC curve by the trapezoid rule (points sorted by fpr)."""
    order = np.lexsort((curve.y, curve.x))
    x, y = curve.x[order], curve.y[order]
    return float(np.sum(np.diff(x) * (y[1:] + y[:-1]) / 2.0))


def roc_figure(curves: Mapping[str, Curve], labels: Mapping[str, str], title: str) -> bytes:
    """ROC curves of several configurations on one set of axes, with the chance diagonal."""
    fig = Figure(figsize=(5.2, 5.0))
    ax = fig.subplots()
    ax.plot([0, 1], [0, 1], color="0.7", linestyle="--", linewidth=1, label="chance")
    for config, curve in curves.items():
        name = labels.get(config, config)
        ax.plot(curve.x, curve.y, linewidth=1.6, label=f"{name} (area {curve_area(curve):.3f})")
    ax.set(
        xlim=(0, 1),
        ylim=(0, 1.01),
        xlabel="False positive rate",
        ylabel="True positive rate",
        title=title,
    )
    ax.set_aspect("equal")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=7.5)
    return png_bytes(fig)


def _series(ax: Axes, curves: Mapping[str, Curve], title: str, ylabel: str) -> None:
    for name, curve in curves.items():
        ax.plot(curve.x, curve.y, marker="o", markersize=3, linewidth=1.4, label=name)
    ax.set(title=title, xlabel="Round", ylabel=ylabel)
    ax.grid(alpha=0.3)
    if curves:
        ax.legend(fontsize=7.5)
    else:
        ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes)


def training_figure(
    global_curves: Mapping[str, Curve], site_curves: Mapping[str, Mapping[str, Curve]]
) -> bytes:
    """Global validation AUROC and train loss, and each site's train loss and val AUROC."""
    fig = Figure(figsize=(10, 7))
    axes = fig.subplots(2, 2)
    glob = {k: global_curves[k] for k in ("val_auroc", "train_loss") if k in global_curves}
    _series(
        axes[0, 0],
        {"global val AUROC": glob["val_auroc"]} if "val_auroc" in glob else {},
        "Global model: validation AUROC",
        "AUROC",
    )
    _series(
        axes[0, 1],
        {"global train loss": glob["train_loss"]} if "train_loss" in glob else {},
        "Global: mean train loss",
        "loss",
    )
    loss = {s: c["train_loss"] for s, c in site_curves.items() if "train_loss" in c}
    auroc = {s: c["val_auroc"] for s, c in site_curves.items() if "val_auroc" in c}
    _series(axes[1, 0], loss, "Per site: train loss", "loss")
    _series(axes[1, 1], auroc, "Per site: validation AUROC", "AUROC")
    for ax in axes.flat:
        ax.xaxis.get_major_locator().set_params(integer=True)
    fig.tight_layout()
    return png_bytes(fig)


def epsilon_figure(epsilon: Mapping[str, Mapping[int, float]]) -> bytes:
    """Cumulative ε per site over rounds."""
    fig = Figure(figsize=(5.5, 3.8))
    ax = fig.subplots()
    for site in sorted(epsilon):
        rounds = sorted(epsilon[site])
        ax.plot(rounds, [epsilon[site][r] for r in rounds], marker="o", markersize=3, label=site)
    ax.set(title="Privacy spent per site", xlabel="Round", ylabel="ε (cumulative)")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7.5)
    return png_bytes(fig)
