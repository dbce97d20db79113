"""DVC stage `partition`: patient-disjoint test set and simulated hospital sites."""

import shutil
from pathlib import Path

import pandas as pd

from fedcxr.config import Params
from fedcxr.partition import (
    PartitionError,
    check_disjoint,
    plan_split,
    prevalence_table,
    split_report,
)
from fedcxr.sitedata import write_sets
from fedcxr.stageio import run_stage, write_json

METADATA = Path("data/deid/metadata.csv")
RESIZED = Path("data/resized")
SITES = Path("data/sites")
TEST = Path("data/test")
REPORT = Path("reports/partition.json")


def main(params: Params) -> None:
    meta = pd.read_csv(METADATA, dtype={"image_id": str, "patient_id": str})
    try:
        plan = plan_split(meta, params.partition, params.seed)
    except PartitionError as exc:
        raise PartitionError(f"{exc} (data: {METADATA})") from None
    report = split_report(meta, plan, params.partition, params.seed)
    check_disjoint(report)
    for folder in (SITES, TEST):
        shutil.rmtree(folder, ignore_errors=True)
    write_sets(meta, plan, RESIZED, SITES, TEST)
    write_json(REPORT, report)
    print(prevalence_table(report))
    print(f"partition: {plan.sizes.describe()}; exact sizes: {report['exact_sizes']}")
    print(
        f"partition: {len(plan.sets) - 1} sites + test, patient overlap "
        f"{report['patient_overlap_total']} -> {SITES}, {TEST}, {REPORT}"
    )


if __name__ == "__main__":
    run_stage("partition", main)
