"""The report's figures (AUROC forest plot, learning curves, ROC, per-round federated curves)
as PNG bytes."""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.lines import Line2D

from fedcxr.report import fmt
from fedcxr.report.inputs import Curve, LearningCurve
from fedcxr.report.tables import config_label, configs_with, ordered, task_label

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


@dataclass(frozen=True)
class ForestRow:
    """One configuration's point estimate and 95% CI (either end None when not recorded)."""

    config: str
    estimate: float
    lo: float | None
    hi: float | None


FOREST_METRIC = "auroc_macro"
POOLED = ("centralized", "single_node")  # the reference: the best model trained on pooled data
_FOREST_COLORS = {"federated": "#1f77b4", "federated_dp": "#6a3d9a"}
_POOLED_COLOR, _LOCAL_COLOR = "#d95f02", "0.45"


def forest_rows(configs: Mapping[str, Mapping[str, Any]], task: str) -> list[ForestRow]:
    """Configurations with a test AUROC for `task`, in the report's order; absent ones omitted."""
    rows = []
    for config in configs_with(configs, task):
        m = configs[config][task]
        value = fmt.number(m.get(FOREST_METRIC))
        if value is not None:
            lo, hi = (
                fmt.number(m.get(f"{FOREST_METRIC}_lo")),
                fmt.number(m.get(f"{FOREST_METRIC}_hi")),
            )
            rows.append(ForestRow(config, value, lo, hi))
    return rows


def _forest_color(config: str) -> str:
    if config in POOLED:
        return _POOLED_COLOR
    return _FOREST_COLORS.get(config, _LOCAL_COLOR)


def _forest_panel(ax: Axes, rows: list[ForestRow], n_rows: int, title: str, labels: bool) -> None:
    ys = list(range(len(rows)))
    for y, row in zip(ys, rows, strict=True):
        color = _forest_color(row.config)
        if row.lo is not None and row.hi is not None:
            ax.plot([row.lo, row.hi], [y, y], color=color, linewidth=2.0, solid_capstyle="butt")
            for end in (row.lo, row.hi):
                ax.plot([end, end], [y - 0.15, y + 0.15], color=color, linewidth=1.2)
        ax.plot(row.estimate, y, "o", color=color, markersize=6, zorder=3)
        interval = fmt.ci(row.lo, row.hi)
        ax.annotate(
            f"{row.estimate:.3f}" + (f" ({interval})" if interval else ""),
            xy=(1.02, y),
            xycoords=("axes fraction", "data"),
            va="center",
            fontsize=8,
            color=color,
        )
    values = [v for r in rows for v in (r.estimate, r.lo, r.hi) if v is not None]
    lo, hi = min(values), max(values)
    pad = max(0.02, 0.08 * (hi - lo))
    ax.set_xlim(max(0.0, lo - pad), min(1.0, hi + pad))
    left, right = ax.get_xlim()
    if left < 0.5 < right:
        ax.axvline(0.5, color="0.6", linestyle=":", linewidth=1, label="chance (0.5)")
    pooled = [r for r in rows if r.config in POOLED]
    if pooled:
        best = max(pooled, key=lambda r: r.estimate)
        ax.axvline(
            best.estimate,
            color=_POOLED_COLOR,
            linestyle="--",
            linewidth=1,
            label=f"best pooled: {config_label(best.config)}, {best.estimate:.3f}",
        )
    local = [y for y, r in zip(ys, rows, strict=True) if r.config.startswith("local_")]
    if local and local[0] > 0:
        ax.axhline(local[0] - 0.5, color="0.8", linewidth=0.8)  # pooled / federated | site-local
    ax.set_ylim(n_rows - 0.5, -0.5)  # first configuration on top; equal row spacing per panel
    ax.set_yticks(ys, [config_label(r.config) for r in rows])
    ax.tick_params(axis="y", length=0, labelleft=labels)
    ax.set(title=title, xlabel="AUROC on the held-out test set (95% CI)")
    ax.grid(axis="x", alpha=0.3)
    if pooled or left < 0.5 < right:
        ax.legend(
            loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2, fontsize=7.5, frameon=False
        )


def forest_plot(configs: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]) -> Figure | None:
    """Every configuration's test AUROC with its 95% CI, one panel per task (macro AUROC for
    multi-label), configurations as rows in the report's order; None when there is nothing."""
    panels = [(task, rows) for task in tasks if (rows := forest_rows(configs, task))]
    if not panels:
        return None
    n_rows = max(len(rows) for _, rows in panels)
    same = len({tuple(r.config for r in rows) for _, rows in panels}) == 1
    fig = Figure(figsize=(5.2 * len(panels) + 1.6, 0.32 * n_rows + 1.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for i, (ax, (task, rows)) in enumerate(zip(axes, panels, strict=True)):
        kind = "macro AUROC" if task == "multilabel" else "AUROC"
        title = f"{task_label(task)[0].upper()}{task_label(task)[1:]}: {kind}"
        _forest_panel(ax, rows, n_rows, title, labels=i == 0 or not same)
    fig.tight_layout(w_pad=3.0)
    return fig


def forest_figure(configs: Mapping[str, Mapping[str, Any]], tasks: Sequence[str]) -> bytes | None:
    """forest_plot as PNG bytes (None when no configuration has a test AUROC)."""
    fig = forest_plot(configs, tasks)
    return None if fig is None else png_bytes(fig)


# Learning curves: the forest plot's colors; the two pooled references told apart by shade and
# end marker. Site-local runs are thin grey lines.
_LEARNING_STYLE: dict[str, tuple[str, str]] = {
    "federated": (_FOREST_COLORS["federated"], "o"),
    "federated_dp": (_FOREST_COLORS["federated_dp"], "D"),
    "centralized": (_POOLED_COLOR, "s"),
    "single_node": ("#a63603", "^"),
}


def _not_converged_suffix(runs: Mapping[str, LearningCurve], unit: str) -> str:
    stalled = [name for name, run in runs.items() if not run.converged]
    if not stalled:
        return ""
    if len(stalled) == len(runs):
        return " (not converged)"
    return f" (not converged: {len(stalled)} of {len(runs)} {unit})"


def _learning_run(ax: Axes, run: LearningCurve, color: str, marker: str, local: bool) -> None:
    style = "-" if run.converged else "--"
    width = 0.8 if local else 1.2
    ax.plot(run.x, run.y, color=color, linestyle=style, linewidth=width, alpha=0.8)
    defined = np.flatnonzero(np.isfinite(run.y))
    if defined.size:
        end = defined[-1]
        ax.plot(
            run.x[end],
            run.y[end],
            marker=marker,
            markersize=4 if local else 6,
            markerfacecolor=color if run.converged else "white",
            markeredgecolor=color,
            linestyle="none",
            zorder=3,
        )


def _learning_panel(ax: Axes, per_config: Mapping[str, Mapping[str, LearningCurve]]) -> None:
    handles: list[Line2D] = []
    locals_ = {c: per_config[c] for c in ordered(per_config) if c.startswith("local_")}
    for config in ordered(per_config):
        if config in locals_:
            continue
        color, marker = _LEARNING_STYLE.get(config, ("0.2", "o"))
        runs = per_config[config]
        for run in runs.values():
            _learning_run(ax, run, color, marker, local=False)
        seeds = f", {len(runs)} seeds" if len(runs) > 1 else ""
        all_ok = all(r.converged for r in runs.values())
        handles.append(
            Line2D(
                [],
                [],
                color=color,
                marker=marker,
                linestyle="-" if all_ok else "--",
                markerfacecolor=color if all_ok else "white",
                label=config_label(config) + seeds + _not_converged_suffix(runs, "seeds"),
            )
        )
    if locals_:
        for runs in locals_.values():
            for run in runs.values():
                _learning_run(ax, run, _LOCAL_COLOR, "o", local=True)
        stalled = [
            c.removeprefix("local_")
            for c, runs in locals_.items()
            if not all(r.converged for r in runs.values())
        ]
        label = f"Site-local, {len(locals_)} sites"
        if stalled:
            label += f" (not converged: {', '.join(stalled)})"
        handles.append(
            Line2D([], [], color=_LOCAL_COLOR, marker="o", markersize=4, linewidth=0.8, label=label)
        )
    handles += [
        Line2D([], [], color="0.3", marker="o", linestyle="-", label="run end, converged"),
        Line2D(
            [],
            [],
            color="0.3",
            marker="o",
            markerfacecolor="white",
            linestyle="--",
            label="run end, not converged",
        ),
    ]
    ax.legend(
        handles=handles,
        loc="upper center",
        bbox_to_anchor=(0.5, -0.16),
        ncol=2,
        fontsize=7.5,
        frameon=False,
    )


def learning_plot(
    curves: Mapping[str, Mapping[str, Mapping[str, LearningCurve]]], tasks: Sequence[str]
) -> Figure | None:
    """Validation AUROC against cumulative local epochs, one panel per task, every
    configuration (and seed) on the same axes; a run's end marker is filled when it converged,
    hollow (and its line dashed) when not. None when there is no curve."""
    shown = [t for t in tasks if curves.get(t)] + sorted(set(curves) - set(tasks))
    panels = [t for t in shown if any(curves[t].values())]
    if not panels:
        return None
    fig = Figure(figsize=(5.4 * len(panels) + 0.4, 5.6))
    axes = fig.subplots(1, len(panels), squeeze=False)[0]
    for ax, task in zip(axes, panels, strict=True):
        _learning_panel(ax, curves[task])
        ax.set(
            title=f"{task_label(task)[0].upper()}{task_label(task)[1:]}",
            xlabel="Cumulative local epochs",
            ylabel="Validation macro AUROC" if task == "multilabel" else "Validation AUROC",
        )
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.grid(alpha=0.3)
    fig.tight_layout(w_pad=2.5)
    return fig


def learning_figure(
    curves: Mapping[str, Mapping[str, Mapping[str, LearningCurve]]], tasks: Sequence[str]
) -> bytes | None:
    """learning_plot as PNG bytes (None when there is no curve)."""
    fig = learning_plot(curves, tasks)
    return None if fig is None else png_bytes(fig)
