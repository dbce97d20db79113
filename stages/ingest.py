"""DVC stage `ingest`: check and hash every image of the source folder into a manifest."""

from pathlib import Path
from typing import Annotated

import typer

from fedcxr.config import Params
from fedcxr.deid import resolve_secret
from fedcxr.ingest import HASH_METHOD, IngestError, ingest, public_summary
from fedcxr.sources import source_root
from fedcxr.stageio import resolved, stage_cli, write_json


def _write_reports(report: dict, out: Path, public: Path) -> None:
    write_json(out / "details.json", report)  # names files: stays with the data, not in git
    write_json(public, public_summary(report))


def main(
    params: Params,
    out: Annotated[Path, typer.Option(help="Folder for manifest.csv and details.json.")],
    report: Annotated[Path, typer.Option(help="The public summary (JSON, no file names).")],
) -> None:
    """Check and hash every image of the source folder (data.source, data.nih_dir)."""
    root = source_root(params.data.source, params.data.nih_dir)
    # Resolved here, not only in deid: keyed hashes of chunks and withheld names derive from it.
    secret = resolve_secret(params.deid, synthetic=params.data.source == "synthetic")
    hashes = {"method": HASH_METHOD, "secret": secret.source}
    try:
        manifest, details = ingest(root, params.ingest, key=secret.key)
    except IngestError as exc:
        if exc.report is not None:
            found = exc.report | {"params": resolved(params.ingest), "hashes": hashes}
            _write_reports(found, out, report)
        raise
    details["params"] = resolved(params.ingest) | {"source": params.data.source}
    details["hashes"] = hashes
    out.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(out / "manifest.csv", index=False, lineterminator="\n")
    _write_reports(details, out, report)
    print(
        f"ingest: {details['usable']} usable of {details['metadata_rows']} rows; "
        f"{details['problems']['count']} problem(s) -> {out / 'manifest.csv'}, {report}"
    )


if __name__ == "__main__":
    stage_cli("ingest", main)
