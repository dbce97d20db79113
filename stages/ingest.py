"""DVC stage `ingest`: check and hash every image of the source folder into a manifest."""

from pathlib import Path

from fedcxr.config import Params
from fedcxr.deid import resolve_secret
from fedcxr.ingest import HASH_METHOD, IngestError, ingest, public_summary
from fedcxr.sources import source_root
from fedcxr.stageio import resolved, run_stage, write_json

OUT = Path("data/ingest")
REPORT = Path("reports/ingest.json")


def _write_reports(report: dict) -> None:
    write_json(OUT / "details.json", report)  # names files: stays with the data, not in git
    write_json(REPORT, public_summary(report))


def main(params: Params) -> None:
    root = source_root(params.data.source, params.data.nih_dir)
    # Resolved here, not only in deid: keyed hashes of chunks and withheld names derive from it.
    secret = resolve_secret(params.deid, synthetic=params.data.source == "synthetic")
    hashes = {"method": HASH_METHOD, "secret": secret.source}
    try:
        manifest, report = ingest(root, params.ingest, key=secret.key)
    except IngestError as exc:
        if exc.report is not None:
            _write_reports(exc.report | {"params": resolved(params.ingest), "hashes": hashes})
        raise
    report["params"] = resolved(params.ingest) | {"source": params.data.source}
    report["hashes"] = hashes
    OUT.mkdir(parents=True, exist_ok=True)
    manifest.to_csv(OUT / "manifest.csv", index=False, lineterminator="\n")
    _write_reports(report)
    print(
        f"ingest: {report['usable']} usable of {report['metadata_rows']} rows; "
        f"{report['problems']['count']} problem(s) -> {OUT / 'manifest.csv'}, {REPORT}"
    )


if __name__ == "__main__":
    run_stage("ingest", main)
