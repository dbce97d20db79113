"""DVC stage `deid`: de-identification checks and keyed pseudonymization of the manifest."""

from pathlib import Path
from typing import Annotated

import pandas as pd
import typer

from fedcxr.config import Params
from fedcxr.deid import DeidError, deidentify, resolve_secret
from fedcxr.stageio import resolved, stage_cli, write_json


def _print_warnings(report: dict) -> None:
    for warning in report["warnings"]["listed"]:
        print(f"deid: warning: {warning['message']}")


def main(
    params: Params,
    manifest: Annotated[Path, typer.Option(help="ingest's manifest.csv.")],
    out: Annotated[Path, typer.Option(help="Folder for the pseudonymized metadata.csv.")],
    report: Annotated[Path, typer.Option(help="The de-identification report (JSON).")],
) -> None:
    """Check the manifest for PHI and pseudonymize its identifiers with a keyed hash."""
    table = pd.read_csv(manifest, dtype=str, keep_default_na=False)
    table["age"] = pd.to_numeric(table["age"], errors="coerce")
    secret = resolve_secret(params.deid, synthetic=params.data.source == "synthetic")
    try:
        metadata, found = deidentify(table, params.deid, secret)
    except DeidError as exc:
        if exc.report is not None:
            write_json(report, exc.report)
            _print_warnings(exc.report)
        raise
    found["params"] = resolved(params.deid)
    out.mkdir(parents=True, exist_ok=True)
    metadata.to_csv(out / "metadata.csv", index=False, lineterminator="\n")
    write_json(report, found)
    print(
        f"deid: {found['images']} images, {found['violations']} violation(s), "
        f"{found['warnings']['count']} warning(s), passed={found['passed']} "
        f"-> {out / 'metadata.csv'}, {report}"
    )
    _print_warnings(found)


if __name__ == "__main__":
    stage_cli("deid", main)
