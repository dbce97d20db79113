"""DVC stage `report`: the study report (Markdown + self-contained HTML) from the metrics files."""

import shutil
from pathlib import Path
from typing import Annotated

import typer

from fedcxr.config import Params
from fedcxr.report.inputs import ReportPaths, RunContext
from fedcxr.report.render import render_report
from fedcxr.stageio import stage_cli

Input = Annotated[Path, typer.Option(help="An input of the report (see dvc.yaml).")]


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
        # dp.accountant is newer than some params files: absent -> not named from params
        dp_accountant=getattr(params.dp, "accountant", None),
        batch_size=params.train.batch_size,
    )


def federation_of(params: Params, train: Path, live: Path) -> tuple[Path, Path]:
    """The summary and DVCLive curves the report shows per round: the first (task, seed) of
    the study matrix, the DP federation's when dp.enabled, otherwise the plain one's."""
    family = "federated_dp" if params.dp.enabled else "federated"
    tag = f"{params.study.tasks[0]}-s{params.train.seeds[0]}"
    return train / family / f"{tag}.json", live / family / tag / "plots" / "metrics"


def main(
    params: Params,
    metrics: Input,
    efficiency: Input,
    roc: Input,
    gradcam: Input,
    train: Annotated[Path, typer.Option(help="The federations' summaries (<family>/*.json).")],
    live: Annotated[Path, typer.Option(help="The federations' DVCLive folders.")],
    curves: Annotated[
        Path, typer.Option(help="Learning curves of every run (evaluate's curves.json).")
    ],
    partition: Input,
    deid: Input,
    ingest: Input,
    markdown: Annotated[Path, typer.Option(help="Where to write the Markdown report.")],
    html: Annotated[Path, typer.Option(help="Where to write the self-contained HTML report.")],
    figures: Annotated[Path, typer.Option(help="Folder for the PNGs the Markdown links.")],
) -> None:
    """The study report, laid out like the paper's tables, from the pipeline's metrics."""
    federated, live_dir = federation_of(params, train, live)
    paths = ReportPaths(
        metrics=metrics,
        efficiency=efficiency,
        roc_dir=roc,
        live_dir=live_dir,
        federated=federated,
        partition=partition,
        deid=deid,
        ingest=ingest,
        gradcam_dir=gradcam,
        curves=curves,
    )
    shutil.rmtree(figures, ignore_errors=True)  # no figure left over from an earlier run
    result = render_report(paths, markdown, html, figures, context_from(params))
    if result.absent:
        print("report: inputs not found (noted in the report): " + ", ".join(result.absent))
    print(
        f"report: {len(result.figures)} figures -> {result.markdown}, {result.html} "
        f"(self-contained), {figures}"
    )


if __name__ == "__main__":
    stage_cli("report", main)
