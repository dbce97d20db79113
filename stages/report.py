"""DVC stage `report`: the study report (Markdown + self-contained HTML) from the metrics files."""

import shutil
from pathlib import Path

from fedcxr.config import Params
from fedcxr.report import ReportPaths, RunContext, render_report
from fedcxr.stageio import run_stage

OUT_MD = Path("reports/report.md")
OUT_HTML = Path("reports/report.html")
FIGURES = Path("reports/report_figures")  # PNGs the Markdown links; the HTML embeds them


def context_from(params: Params) -> RunContext:
    """Run settings the metrics files do not record, for the summary and the reading."""
    return RunContext(
        data_source=params.data.source,
        arch=params.model.arch,
        image_size=params.train.image_size,
        seeds=params.train.seeds,
        rounds=params.fl.rounds,
        local_epochs=params.fl.local_epochs,
        strategy=params.fl.strategy,
        dp_enabled=params.dp.enabled,
        dp_noise_multiplier=params.dp.noise_multiplier,
        dp_delta=params.dp.delta,
    )


def paths_for(params: Params) -> ReportPaths:
    """Per-round curves and epsilon come from the first (task, seed) of the study matrix:
    the DP federation's when dp.enabled, otherwise the plain one's."""
    family = "federated_dp" if params.dp.enabled else "federated"
    tag = f"{params.study.tasks[0]}-s{params.train.seeds[0]}"
    return ReportPaths(
        live_dir=Path("reports/live") / family / tag / "plots" / "metrics",
        federated=Path("reports/train") / family / f"{tag}.json",
    )


def main(params: Params) -> None:
    shutil.rmtree(FIGURES, ignore_errors=True)  # no figure left over from an earlier run
    result = render_report(paths_for(params), OUT_MD, OUT_HTML, FIGURES, context_from(params))
    if result.absent:
        print("report: inputs not found (noted in the report): " + ", ".join(result.absent))
    print(
        f"report: {len(result.figures)} figures -> {result.markdown}, {result.html} "
        f"(self-contained), {FIGURES}"
    )


if __name__ == "__main__":
    run_stage("report", main)
