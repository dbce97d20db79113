"""DVC stage `deid`: de-identification checks and keyed pseudonymization of the manifest."""

from pathlib import Path

import pandas as pd

from fedcxr.config import Params
from fedcxr.deid import DeidError, deidentify, resolve_secret
from fedcxr.stageio import resolved, run_stage, write_json

MANIFEST = Path("data/ingest/manifest.csv")
OUT = Path("data/deid")
REPORT = Path("reports/deid.json")


def _print_warnings(report: dict) -> None:
    for warning in report["warnings"]["listed"]:
        print(f"deid: warning: {warning['message']}")


def main(params: Params) -> None:
    manifest = pd.read_csv(MANIFEST, dtype=str, keep_default_na=False)
    manifest["age"] = pd.to_numeric(manifest["age"], errors="coerce")
    secret = resolve_secret(params.deid, synthetic=params.data.source == "synthetic")
    try:
        metadata, report = deidentify(manifest, params.deid, secret)
    except DeidError as exc:
        if exc.report is not None:
            write_json(REPORT, exc.report)
            _print_warnings(exc.report)
        raise
    report["params"] = resolved(params.deid)
    OUT.mkdir(parents=True, exist_ok=True)
    metadata.to_csv(OUT / "metadata.csv", index=False, lineterminator="\n")
    write_json(REPORT, report)
    print(
        f"deid: {report['images']} images, {report['violations']} violation(s), "
        f"{report['warnings']['count']} warning(s), passed={report['passed']} "
        f"-> {OUT / 'metadata.csv'}, {REPORT}"
    )
    _print_warnings(report)


if __name__ == "__main__":
    run_stage("deid", main)
