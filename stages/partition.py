"""DVC stage `partition`: patient-disjoint test set and simulated hospital sites."""

import shutil
from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from fedcxr.config import Params
from fedcxr.partition import (
    PartitionError,
    check_disjoint,
    plan_split,
    prevalence_table,
    split_report,
)
from fedcxr.partition.layout import write_sets
from fedcxr.stageio import stage_cli, write_json


def main(
    params: Params,
    metadata: Annotated[Path, typer.Option(help="deid's metadata.csv.")],
    resized: Annotated[Path, typer.Option(help="resize's shards folder.")],
    sites: Annotated[Path, typer.Option(help="Folder to write one folder per site into.")],
    test: Annotated[Path, typer.Option(help="Folder for the held-out test set.")],
    report: Annotated[Path, typer.Option(help="The split's figures (JSON).")],
) -> None:
    """Split patients (never their images) into the held-out test set and the sites."""
    meta = pd.read_csv(metadata, dtype={"image_id": str, "patient_id": str})
    try:
        plan = plan_split(meta, params.partition, params.seed)
    except PartitionError as exc:
        raise PartitionError(f"{exc} (data: {metadata})") from None
    figures = split_report(meta, plan, params.partition, params.seed)
    check_disjoint(figures)
    for folder in (sites, test):
        shutil.rmtree(folder, ignore_errors=True)
    write_sets(meta, plan, resized, sites, test)
    write_json(report, figures)
    print(prevalence_table(figures))
    print(f"partition: {plan.sizes.describe()}; exact sizes: {figures['exact_sizes']}")
    print(
        f"partition: {len(plan.sets) - 1} sites + test, patient overlap "
        f"{figures['patient_overlap_total']} -> {sites}, {test}, {report}"
    )


if __name__ == "__main__":
    stage_cli("partition", main)
